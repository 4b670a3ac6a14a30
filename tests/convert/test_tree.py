"""The layout on arbitrary prefix trees, including the awkward cases real templates
rarely produce: samples that are prefixes of others, trained ranges that overlap, two
trained branches leaving one token."""

from collections import Counter

import numpy as np
from helpers.reference import n_pass_pairs, one_pass_pairs, weight_totals, weighted_pairs
from hypothesis import given, settings
from hypothesis import strategies as st

from onepass_prep.convert.render import Sample
from onepass_prep.convert.share import samples_of
from onepass_prep.convert.tree import PrefixTree, layout_samples


@st.composite
def sample_sets(draw):
    """Sequences over a tiny vocabulary, so they share prefixes and collide often."""
    samples = []
    for _ in range(draw(st.integers(1, 6))):
        if samples and draw(st.booleans()):
            base, _ = draw(st.sampled_from(samples))
            keep = draw(st.integers(0, len(base)))
            ids = base[:keep] + draw(st.lists(st.integers(0, 2), max_size=6))
        else:
            ids = draw(st.lists(st.integers(0, 2), min_size=1, max_size=10))
        if not ids:
            ids = [0]
        samples.append((ids, draw(st.integers(1, len(ids) + 1))))
    return samples


def as_row(layout):
    return {
        "input_ids": layout.input_ids,
        "labels": layout.labels,
        "position_ids": layout.position_ids,
        "mask_spec": {"seg_lens": layout.seg_lens, "seg_parents": layout.seg_parents},
        "loss_weights": layout.loss_weights,
    }


@settings(max_examples=400, deadline=None)
@given(sample_sets())
def test_every_trained_pair_exactly_once(samples):
    layout = layout_samples([Sample(np.asarray(ids, np.int32), start) for ids, start in samples])
    assert one_pass_pairs(as_row(layout)) == n_pass_pairs(samples)
    assert layout.seg_lens.sum() == len(layout)
    assert all(0 <= p < s or p == -1 for s, p in enumerate(layout.seg_parents))
    assert layout.n_pass_tokens == sum(len(ids) for ids, start in samples if start < len(ids))
    assert layout.n_pass_pairs == sum(len(ids) * (len(ids) + 1) // 2 for ids, start in samples if start < len(ids))


@settings(max_examples=300, deadline=None)
@given(sample_sets(), st.data(), st.sampled_from(["token", "turn", "conversation"]))
def test_every_trained_pair_carries_its_samples_loss_weight(samples, data, normalization):
    """Weight-0 samples train nothing; the others' pairs carry the docs/FORMAT.md weight."""
    weights = [data.draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])) for _ in samples]
    layout = layout_samples(
        [Sample(np.asarray(ids, np.int32), start, weight=w) for (ids, start), w in zip(samples, weights, strict=True)],
        normalization,
    )
    expected, units = weighted_pairs(samples, weights, normalization)
    assert one_pass_pairs(as_row(layout), with_weight=True) == expected
    assert layout.loss_units == units
    assert (layout.loss_weights[layout.labels == -100] == 0).all()


def test_shared_prefix_is_laid_out_once():
    """A template that keeps reasoning: later samples extend earlier ones, nothing is copied."""
    first = [1, 2, 3, 4, 5]
    second = first + [6, 7, 8, 9]
    layout = layout_samples(
        [Sample(np.asarray(first, np.int32), 3), Sample(np.asarray(second, np.int32), 7)]
    )
    assert layout.input_ids.tolist() == second
    assert layout.labels.tolist() == [-100, -100, -100, 4, 5, -100, -100, 8, 9]


def test_second_trained_branch_gets_a_copy_of_the_branch_point():
    a = [1, 2, 3, 4]
    b = [1, 2, 5, 6]
    layout = layout_samples(
        [Sample(np.asarray(a, np.int32), 2), Sample(np.asarray(b, np.int32), 2)]
    )
    assert layout.input_ids.tolist() == [1, 2, 3, 4, 2, 5, 6]
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 1, 2, 3]
    assert layout.labels.tolist() == [-100, -100, 3, 4, -100, 5, 6]


def test_a_branch_that_leaves_through_context_needs_no_copy():
    """The second sample leaves the shared prefix where the first one's training starts, but
    its own tokens there are context: it hangs under the prefix itself, no token repeated."""
    layout = layout_samples([Sample(np.asarray([1, 2, 3, 4], np.int32), 2),
                             Sample(np.asarray([1, 2, 5, 6, 7], np.int32), 4)])
    assert layout.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert layout.labels.tolist() == [-100, -100, 3, 4, -100, -100, 7]


def test_a_split_context_run_stays_shared():
    """The second sample splits the first one's context run; the third shares the lower
    half again (only the trained branch point is repeated); the fourth shares the second
    child of the split, not just the first."""
    layout = layout_samples([Sample(np.asarray([1, 2, 3, 4, 9], np.int32), 4),
                             Sample(np.asarray([1, 2, 7, 8], np.int32), 3),
                             Sample(np.asarray([1, 2, 3, 4, 6], np.int32), 4),
                             Sample(np.asarray([1, 2, 7, 8, 5], np.int32), 4)])
    assert layout.input_ids.tolist() == [1, 2, 3, 4, 9, 4, 6, 7, 8, 5]
    assert layout.seg_parents.tolist() == [-1, 0, 1, 1, 0]


@settings(max_examples=300, deadline=None)
@given(sample_sets(), st.data(), st.sampled_from(["token", "turn", "conversation"]), st.booleans())
def test_conversations_sharing_a_tree_keep_each_pairs_total_weight(samples, data, normalization, merge):
    """The samples cut into conversations that share one tree: every pair's summed weight is
    the sum over conversations of the FORMAT.md weights; units add up; the tree's token
    count is its layout's length; each sample reads back from the layout as it went in."""
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(samples) - 1)))))
    cuts = [c for c in cuts if c < len(samples)]
    conversations = [samples[a:b] for a, b in zip([0, *cuts], [*cuts, len(samples)], strict=True)]
    tree, expected, units = PrefixTree(merge_trained=merge), Counter(), 0
    for conversation in conversations:
        weights = [data.draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])) for _ in conversation]
        tree.add([Sample(np.asarray(ids, np.int32), start, weight=w)
                  for (ids, start), w in zip(conversation, weights, strict=True)], normalization)
        pairs, found_units = weighted_pairs(conversation, weights, normalization)
        expected, units = expected + pairs, units + found_units
    layout = tree.layout()
    assert tree.tokens == len(layout) and layout.loss_units == units
    got = weight_totals(one_pass_pairs(as_row(layout), with_weight=True))
    want = weight_totals(expected)
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) <= 1e-6 * want[k] for k in want)
    trained = sorted((s.input_ids.tolist(), s.train_start) for s in tree.samples if s.is_trained)
    assert sorted((s.input_ids.tolist(), s.train_start) for s in samples_of(layout)) == trained
    assert len(layout.conversation_segments) == len(conversations)

"""Turning the collated structure into the model's ``attention_mask``, inside ``model(...)``.

A forward pre-hook is the one place every training loop passes through: plain loops,
``transformers.Trainer`` and TRL ``SFTTrainer`` all call ``model(**batch)``. The batch stays
O(L) until the model's forward, and the L x L mask is built there, on the model's device
(or, for tree attention, the O(L) chain plan that replaces the mask).

Each layer gets the mask of its kind (layers.py): a model whose layers are all one kind gets
one mask, and a model with several kinds gets ``attention_mask`` as a mapping from layer type
to mask, which transformers 5 models take as given ("it may already have been prepared by
generate"), one mask per layer type, built once per call. Models no mask can make exact are
refused when the hook is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.hooks import RemovableHandle

from .collate import STRUCTURE_KEY
from .layers import LayerKind, check_layers, row_limit
from .loss import UNITS_KEY, WEIGHTS_KEY, plain_token_mean
from .masks import block_mask, bool_mask, float_mask, key_limits
from .recurrent import RECURRENT_PLAN_KEY, handles, install_tree_recurrence, recurrent_plan
from .tree_attention import PLAN_KEY, TREE_ATTENTION, register_tree_attention, tree_plan

if TYPE_CHECKING:  # the hook serves transformers models; the runtime does not import it
    from transformers import PreTrainedModel

MaskKind = Literal["float", "bool", "flex", "tree"]

# What each attention implementation can take: eager adds the mask to the scores (a bool
# mask would be added as 0/1, silently wrong); a 4D tensor under flex can crash.
_ALLOWED: dict[str, tuple[MaskKind, ...]] = {
    "sdpa": ("bool", "float"),
    "eager": ("float",),
    "flex_attention": ("flex",),
    TREE_ATTENTION: ("tree",),
}


def _kind_for(model: PreTrainedModel, kind: MaskKind | None) -> MaskKind:
    implementation = model.config._attn_implementation
    allowed = _ALLOWED.get(implementation)
    if allowed is None:
        raise ValueError(
            f"attn_implementation {implementation!r} cannot take a tree mask; "
            f"use one of {sorted(_ALLOWED)}"
        )
    if kind is None:
        return allowed[0]
    if kind not in allowed:
        raise ValueError(f"a {kind!r} mask is wrong for attn_implementation {implementation!r}")
    return kind


Mask = torch.Tensor | BlockMask


def build_attention_mask(
    model: PreTrainedModel,
    subtree_end: torch.Tensor,
    kind: MaskKind | None = None,
    position_ids: torch.Tensor | None = None,
    layers: list[LayerKind] | None = None,
) -> Mask | dict[str, Mask | None]:
    """The mask ``model`` needs for this batch, on the model's device and in its dtype: one
    mask, or one per layer type (``{layer_type: mask}``) for a model with several kinds of
    layer. ``position_ids`` are needed by sliding-window and chunked layers; ``layers`` is
    ``check_layers(model)``, read here when not given."""
    layers = check_layers(model) if layers is None else layers
    chosen = _kind_for(model, kind)
    if chosen == "tree":
        raise ValueError(f"tree attention takes no mask: pass {PLAN_KEY}=tree_plan(subtree_end)")
    subtree_end = subtree_end.to(model.device, non_blocking=True)
    by_type = {
        layer.layer_type: layer for layer in layers if layer.attention not in ("recurrent", "positionwise")
    }
    built: dict[tuple, Mask] = {}
    masks: dict[str | None, Mask] = {}
    for layer_type, layer in by_type.items():
        key = (layer.attention, layer.window, layer.chunk)
        if key not in built:
            built[key] = _mask(model, chosen, subtree_end, position_ids, layer)
        masks[layer_type] = built[key]
    if len(masks) == 1:
        return next(iter(masks.values()))
    # A model given the mapping looks every layer's mask up by its type (LaraMini: its
    # "linear_attention" layers too): None for layers a mask does not serve, as transformers'
    # own create_recurrent_attention_mask answers for a 4D mask.
    unmasked = {str(layer.layer_type): None for layer in layers if layer.attention in ("recurrent", "positionwise")}
    return {**unmasked, **{str(layer_type): mask for layer_type, mask in masks.items()}}


def _mask(
    model: PreTrainedModel,
    chosen: MaskKind,
    subtree_end: torch.Tensor,
    position_ids: torch.Tensor | None,
    layer: LayerKind,
) -> Mask:
    limit = None
    if layer.attention != "full":
        if position_ids is None:
            raise ValueError(f"a layer with {layer.describe()} needs the batch's position_ids")
        position_ids = position_ids.to(model.device, non_blocking=True)
        limit = key_limits(position_ids, layer.window, layer.chunk)
    if chosen == "flex":  # block tables straight from subtree_end: no L x L, no compile
        return block_mask(subtree_end, position_ids=position_ids, limit=limit)
    if chosen == "bool":
        return bool_mask(subtree_end, position_ids, limit)
    return float_mask(subtree_end, model.dtype, position_ids, limit)


def _structure_inputs(
    model: PreTrainedModel,
    subtree_end: torch.Tensor,
    position_ids: torch.Tensor,
    kind: MaskKind | None,
    layers: list[LayerKind],
) -> dict[str, Any]:
    """The model-call arguments that carry the tree: a mask, or tree attention's plan."""
    if _kind_for(model, kind) == "tree":
        limits = tuple((layer.window, layer.chunk) for layer in layers)
        if all(limit == (None, None) for limit in limits):
            return {PLAN_KEY: tree_plan(subtree_end.to(model.device, non_blocking=True))}
        return {PLAN_KEY: tree_plan(subtree_end.to(model.device, non_blocking=True), position_ids, limits)}
    return {"attention_mask": build_attention_mask(model, subtree_end, kind, position_ids, layers)}


def install_mask_hook(model: PreTrainedModel, kind: MaskKind | None = None) -> RemovableHandle:
    """Make ``model(**batch)`` build ``attention_mask`` from the collator's ``subtree_end``.

    Raises ``ValueError`` here, not at the first step, for a model that no mask makes exact
    (a layer that is not full, sliding-window or chunked attention: ``layers.check_layers``).
    Each layer type gets its own mask (sliding windows and chunks need ``position_ids``).

    ``kind`` defaults to what the model's attention implementation takes (sdpa: bool, eager:
    float, flex_attention: a ``BlockMask`` whose block tables come from ``subtree_end`` on the
    model's device, masks.py), read at every call. ``kind="tree"`` switches the model to
    ``attn_implementation="onepass_tree"`` (tree_attention.py: no L x L mask, work on about the
    visible pairs) and passes the chain plan instead of a mask. Every call must carry
    ``subtree_end`` and ``position_ids``: without a 4D mask transformers would read the
    restarting position ids as packed documents and attend across branches. Call
    ``.remove()`` on the returned handle to use the model normally again (e.g. generation; after
    ``kind="tree"`` also set another attention implementation).

    The hook also takes ``loss_weights`` and ``loss_units`` out of the call: the model never
    sees them. If they are not the plain token mean (a trained weight other than 1, or a row's
    units other than its trained tokens) it raises ``ValueError``: whatever computes the loss of
    this call did not take the weights out of the batch, so it ignores them (the model's own
    loss, Trainer's ``compute_loss_func``, SFTTrainer's fused head). ``onepass_loss`` through
    ``forward_loss`` or ``onepass_trainer`` takes them out first.
    """
    if any(getattr(h, "onepass_mask_hook", False) for h in model._forward_pre_hooks.values()):
        raise ValueError("a mask hook is already installed on this model (the second would fail)")
    layers = check_layers(model)
    longest = row_limit(model)
    if kind == "tree":
        softcap = getattr(model.config.get_text_config(), "attn_logit_softcapping", None)
        if softcap is not None:
            raise ValueError(
                f"{TREE_ATTENTION!r} attention has no logit softcapping, and {type(model).__name__} "
                f"caps its attention logits at {softcap}: use install_mask_hook(model) with "
                "attn_implementation 'eager' or 'flex_attention'"
            )
        register_tree_attention()
        model.set_attn_implementation(TREE_ATTENTION)
    recurrent = handles(model)
    if recurrent and _kind_for(model, kind) == "flex":
        raise ValueError(
            f"{type(model).__name__} has recurrent layers, and transformers hands a flex BlockMask to its "
            "create_recurrent_attention_mask, which takes only tensors: use attn_implementation 'sdpa' or "
            "'eager', or install_mask_hook(model, kind='tree')"
        )
    _kind_for(model, kind)  # fail at install time on an impossible combination
    if recurrent:  # recurrent mixers: each chain from its parent's state (recurrent/)
        install_tree_recurrence(model)

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if STRUCTURE_KEY not in kwargs:
            raise ValueError(
                f"the mask hook needs '{STRUCTURE_KEY}' in the model's inputs (OnePassCollator "
                "output); remove the hook to call the model on other inputs"
            )
        if kwargs.get("position_ids") is None:
            raise ValueError("the mask hook needs the batch's position_ids (tree depths)")
        if kwargs.get("attention_mask") is not None:
            raise ValueError("the batch already has an attention_mask; the hook builds it")
        if longest is not None and kwargs[STRUCTURE_KEY].shape[-1] > longest[0]:
            raise ValueError(f"rows of {kwargs[STRUCTURE_KEY].shape[-1]} tokens: {longest[1]}")
        _check_loss_columns(kwargs.pop(WEIGHTS_KEY, None), kwargs.pop(UNITS_KEY, None))
        structure = kwargs.pop(STRUCTURE_KEY)
        if recurrent:
            kwargs[RECURRENT_PLAN_KEY] = recurrent_plan(structure, model.device)
        kwargs.update(_structure_inputs(model, structure, kwargs["position_ids"], kind, layers))
        return args, kwargs

    hook.onepass_mask_hook = True  # type: ignore[attr-defined]
    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _check_loss_columns(weights: torch.Tensor | None, units: torch.Tensor | None) -> None:
    if weights is None or plain_token_mean(weights, units):
        return
    raise ValueError(
        "this batch's loss_weights are not the plain token mean (loss normalization 'turn' or "
        "'conversation', or message weights), and they reached the model: the loss of this call "
        "ignores them. Compute it with onepass_prep.torch.forward_loss / onepass_loss in a plain "
        "loop, or train with onepass_trainer(Trainer) / onepass_trainer(SFTTrainer)"
    )

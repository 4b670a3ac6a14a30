"""Output format v4 (and reading v1 to v3) in code: the one home of docs/FORMAT.md's rules, shared by the
converter's writer, the inspect/stats/verify readers and the torch runtime.

Imports numpy and pyarrow only (no torch, no transformers).
"""

from onepass_prep.format.files import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IGNORE_INDEX,
    LOCK,
    MANIFEST,
    NORMALIZATIONS,
    READ_VERSIONS,
    REJECTED,
    SCHEMA,
    SCHEMA_V1,
    SCHEMA_V2,
    TRAIN_ON,
    FormatError,
    Source,
    judge_lock,
    listed_shards,
    lock_holder,
    loss_settings,
    open_shard,
    read_manifest,
    read_row_group,
    resolve_shards,
    shard_name,
)
from onepass_prep.format.rows import list_columns, list_parts, validate_batch, with_loss_columns
from onepass_prep.format.structure import (
    root_segments,
    subtree_last,
    token_parents,
    token_subtree_end,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "LOCK",
    "MANIFEST",
    "NORMALIZATIONS",
    "READ_VERSIONS",
    "REJECTED",
    "SCHEMA",
    "SCHEMA_V1",
    "SCHEMA_V2",
    "TRAIN_ON",
    "FormatError",
    "Source",
    "list_columns",
    "list_parts",
    "listed_shards",
    "judge_lock",
    "lock_holder",
    "loss_settings",
    "open_shard",
    "read_manifest",
    "read_row_group",
    "resolve_shards",
    "root_segments",
    "shard_name",
    "subtree_last",
    "token_parents",
    "token_subtree_end",
    "validate_batch",
    "with_loss_columns",
]

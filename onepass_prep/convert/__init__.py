"""The conversion pipeline, one module per step: records -> render (with tokenizer,
encode) -> tree -> pack -> shards, with work (batches on threads and workers) and
checkpoint (--resume); `run` wires them together and keeps the counts."""

from onepass_prep.convert.run import (
    ConvertError,
    ConvertOptions,
    ConvertSummary,
    StrictError,
    convert,
)

__all__ = ["ConvertError", "ConvertOptions", "ConvertSummary", "StrictError", "convert"]

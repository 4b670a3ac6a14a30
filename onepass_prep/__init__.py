"""onepass-prep: exact one-pass training data for multi-turn reasoning chats.

The packages follow the data: `onepass_prep.convert` (JSONL -> shards; needs no torch),
`onepass_prep.format` (the on-disk format v1: schema, manifest, row invariants),
`onepass_prep.inspection` (inspect, stats, verify) and `onepass_prep.torch` (the training
runtime, which needs nothing from the converter).
"""

__version__ = "0.1.0"

"""onepass-prep: exact one-pass training data for multi-turn reasoning chats.

The converter (`onepass_prep.convert`) needs no torch; the training runtime lives in
`onepass_prep.torch` and needs nothing from the converter.
"""

__version__ = "0.1.0"
FORMAT_VERSION = 1

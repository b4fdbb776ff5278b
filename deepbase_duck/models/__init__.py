"""Models bundled with deepbase_duck (currently: a character-level LSTM)."""

from .charlstm import (
    CHECKPOINTS,
    VOCAB,
    VOCAB_SIZE,
    CharLSTM,
    config,
    decode_ids,
    encode_chars,
    load_charlstm,
    weights_path,
)

__all__ = [
    "CHECKPOINTS",
    "VOCAB",
    "VOCAB_SIZE",
    "CharLSTM",
    "config",
    "decode_ids",
    "encode_chars",
    "load_charlstm",
    "weights_path",
]

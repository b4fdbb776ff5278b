"""Loaders for the bundled models, usable as loader specs ('deepbase_duck.models.zoo:charlstm').

A loader returns a ModelAdapter; the store records the spec and its keyword arguments, so any
process (a shell, a Ray worker) can rebuild the same model and check it against the checksum.
"""
from __future__ import annotations

import hashlib

from ..extraction.adapters import CharAdapter
from .charlstm import VOCAB, encode_chars, load_charlstm

CHAR_TOKENIZATION = "chars:" + hashlib.sha256("".join(VOCAB).encode()).hexdigest()[:10]


def charlstm(checkpoint: str = "final", device: str | None = None) -> CharAdapter:
    """The bundled character-level LSTM trained on the Python standard library."""
    module = load_charlstm(checkpoint, device="cpu")
    return CharAdapter(module, encode_chars, CHAR_TOKENIZATION, device=device)


def sqllstm(device: str | None = None) -> CharAdapter:
    """The bundled SQL autocompletion char-LSTM, trained on generated SQL (models/train_sqllstm.py)."""
    from .sqllstm import load_sqllstm
    return CharAdapter(load_sqllstm(device="cpu"), encode_chars, CHAR_TOKENIZATION, device=device)

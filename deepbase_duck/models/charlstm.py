"""The embedded default model: a 2-layer character-level LSTM language model.

It was trained by :mod:`deepbase_duck.models.train_charlstm` on the "train"
split of Python's standard-library source (see
:mod:`deepbase_duck.corpora.stdlib`). Weights ship beside this file as
safetensors checkpoints; ``charlstm.json`` records how they were produced.

Each LSTM layer is its own module (``lstm0``, ``lstm1``) so that a layer can be
addressed by dotted module path (e.g. for forward hooks).
"""

from __future__ import annotations

import json
import pathlib

import torch
from torch import nn

__all__ = [
    "VOCAB",
    "VOCAB_SIZE",
    "UNK_ID",
    "encode_chars",
    "decode_ids",
    "CharLSTM",
    "CHECKPOINTS",
    "CONFIG_FILENAME",
    "weights_path",
    "config",
    "load_charlstm",
]

#: Index 0 is the unknown character; then tab, newline, and printable ASCII.
UNK = "\x00"
UNK_ID = 0
VOCAB: list[str] = [UNK, "\t", "\n"] + [chr(c) for c in range(32, 127)]
VOCAB_SIZE: int = len(VOCAB)
_CHAR_TO_ID: dict[str, int] = {ch: i for i, ch in enumerate(VOCAB) if i != UNK_ID}

#: Human-readable vocabulary description (also stored in charlstm.json).
VOCAB_DESCRIPTION = (
    "index 0 = unknown character; 1 = '\\t'; 2 = '\\n'; "
    "3..97 = chr(32)..chr(126) (printable ASCII)"
)


def encode_chars(text: str) -> list[int]:
    """Map each character of ``text`` to its vocabulary id (unknown -> 0)."""
    get = _CHAR_TO_ID.get
    return [get(ch, UNK_ID) for ch in text]


def decode_ids(ids) -> str:
    """Inverse of :func:`encode_chars`; id 0 decodes to U+FFFD."""
    return "".join("\ufffd" if int(i) == UNK_ID else VOCAB[int(i)] for i in ids)


class CharLSTM(nn.Module):
    """Embedding -> LSTM -> LSTM -> Linear, over characters.

    ``forward(ids[B, T]) -> logits[B, T, vocab_size]``; every call starts from a
    zero hidden state.
    """

    def __init__(self, vocab_size: int = VOCAB_SIZE, embed_dim: int = 64, hidden: int = 256):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.hidden = hidden
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm0 = nn.LSTM(embed_dim, hidden, num_layers=1, batch_first=True)
        self.lstm1 = nn.LSTM(hidden, hidden, num_layers=1, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x, _ = self.lstm0(x)
        x, _ = self.lstm1(x)
        return self.head(x)


_DIR = pathlib.Path(__file__).resolve().parent
CONFIG_FILENAME = "charlstm.json"

#: Checkpoint name -> file name (in this package directory).
CHECKPOINTS: dict[str, str] = {
    "step0": "charlstm_step0.safetensors",
    "early": "charlstm_early.safetensors",
    "mid": "charlstm_mid.safetensors",
    "final": "charlstm_final.safetensors",
}


def _check_name(name: str) -> str:
    if name not in CHECKPOINTS:
        raise ValueError(
            f"unknown CharLSTM checkpoint {name!r}; valid names: {', '.join(CHECKPOINTS)}"
        )
    return CHECKPOINTS[name]


def weights_path(name: str = "final") -> pathlib.Path:
    """Path of the bundled safetensors file for checkpoint ``name``."""
    return _DIR / _check_name(name)


def config() -> dict:
    """The training/architecture record stored in ``charlstm.json``."""
    with open(_DIR / CONFIG_FILENAME, encoding="utf-8") as fh:
        return json.load(fh)


def _architecture() -> dict:
    try:
        arch = config().get("architecture", {})
    except FileNotFoundError:
        arch = {}
    return {
        "vocab_size": int(arch.get("vocab_size", VOCAB_SIZE)),
        "embed_dim": int(arch.get("embed_dim", 64)),
        "hidden": int(arch.get("hidden", 256)),
    }


def load_charlstm(name: str = "final", device="cpu") -> CharLSTM:
    """Load a bundled checkpoint (safetensors only, never pickle) in eval mode.

    Half-precision checkpoints are cast to float32.
    """
    from safetensors.torch import load_file

    path = weights_path(name)
    state = load_file(str(path), device="cpu")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    model = CharLSTM(**_architecture())
    model.load_state_dict(state, strict=True)
    model.to(device)
    model.eval()
    return model

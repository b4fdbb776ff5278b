"""The bundled SQL autocompletion model: a small character-level LSTM trained on generated SQL.

Same architecture as :class:`deepbase_duck.models.charlstm.CharLSTM` (embedding -> ``lstm0`` ->
``lstm1`` -> linear head over the same printable-ASCII vocabulary), smaller (2 x 128 units by
default). Trained by :mod:`deepbase_duck.models.train_sqllstm` on queries from
:mod:`deepbase_duck.corpora.sqlgen`; ``sqllstm.json`` records the run (held-out loss included).
"""
from __future__ import annotations

import json
import pathlib

from .charlstm import VOCAB_SIZE, CharLSTM

_DIR = pathlib.Path(__file__).resolve().parent
WEIGHTS_FILENAME = "sqllstm.safetensors"
CONFIG_FILENAME = "sqllstm.json"


def weights_path() -> pathlib.Path:
    return _DIR / WEIGHTS_FILENAME


def config() -> dict:
    """The training record stored beside the weights (``sqllstm.json``)."""
    with open(_DIR / CONFIG_FILENAME, encoding="utf-8") as fh:
        return json.load(fh)


def load_sqllstm(device="cpu") -> CharLSTM:
    """Load the bundled SQL LSTM (safetensors, never pickle) in eval mode."""
    from safetensors.torch import load_file

    arch = config()["architecture"]
    model = CharLSTM(int(arch.get("vocab_size", VOCAB_SIZE)), int(arch["embed_dim"]), int(arch["hidden"]))
    state = load_file(str(weights_path()), device="cpu")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device).eval()

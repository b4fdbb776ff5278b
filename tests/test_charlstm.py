"""Tests for the bundled character-level LSTM and the stdlib corpus helpers."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepbase_duck.corpora.stdlib import (
    chunk_text,
    is_heldout,
    read_source,
    stdlib_files,
    stdlib_records,
)
from deepbase_duck.models.charlstm import (
    CHECKPOINTS,
    VOCAB,
    VOCAB_SIZE,
    CharLSTM,
    config,
    encode_chars,
    load_charlstm,
    weights_path,
)

EXCLUDED = ("test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "ensurepip", "turtledemo")


# --------------------------------------------------------------------- vocab
def test_vocab_layout():
    assert VOCAB_SIZE == len(VOCAB) == 98
    assert VOCAB[1] == "\t" and VOCAB[2] == "\n"
    assert VOCAB[3:] == [chr(c) for c in range(32, 127)]


def test_vocab_round_trip():
    text = "def f(x):\n\treturn {'a': [x ~ 1]}  # ok\n" + "".join(chr(c) for c in range(32, 127))
    ids = encode_chars(text)
    assert len(ids) == len(text)
    assert all(0 < i < VOCAB_SIZE for i in ids)
    assert "".join(VOCAB[i] for i in ids) == text


def test_unknown_chars_map_to_zero():
    assert encode_chars("é\r\x00€💥") == [0, 0, 0, 0, 0]
    assert encode_chars("aé b") == [encode_chars("a")[0], 0, encode_chars(" ")[0], encode_chars("b")[0]]
    assert encode_chars("") == []


# -------------------------------------------------------------------- corpus
@pytest.fixture(scope="module")
def files():
    return stdlib_files()


def test_stdlib_files_nonempty_and_filtered(files):
    assert len(files) > 100
    assert files == sorted(files)
    assert "os.py" in files and "json/decoder.py" in files
    for f in files:
        assert f.endswith(".py")
        assert "\\" not in f and not f.startswith("/")
        for part in f.split("/"):
            assert not part.startswith(EXCLUDED), f


def test_split_deterministic_and_sized(files):
    first = [is_heldout(f) for f in files]
    assert first == [is_heldout(f) for f in files]
    frac = sum(first) / len(files)
    assert 0.05 <= frac <= 0.20, frac
    # A pure function of the path string, independent of the file list.
    assert is_heldout("some/made_up/path.py") == is_heldout("some/made_up/path.py")


def test_read_source_normalises_newlines(files):
    text = read_source("os.py")
    assert "\r\n" not in text and "def " in text


TEXTS = [
    "",
    "x",
    "a\nbb\nccc\n",
    "no newline at end",
    "\n\n\n\n",
    "y" * 5000,  # one long line: must be split hard
    ("short line\n" * 40) + ("z" * 333) + "\nend",
    "".join(f"line {i}: " + "w" * (i % 37) + "\n" for i in range(300)),
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("max_chars", [1, 7, 64, 2000])
def test_chunk_text_properties(text, max_chars):
    chunks = chunk_text(text, max_chars)
    assert "".join(c for _, c in chunks) == text
    pos = 0
    for offset, chunk in chunks:
        assert offset == pos
        assert text[offset : offset + len(chunk)] == chunk
        assert 0 < len(chunk) <= max_chars
        pos += len(chunk)
    # Cuts fall on line boundaries unless the chunk is a hard-split long line.
    for (offset, chunk), _ in zip(chunks, chunks[1:]):
        if not chunk.endswith("\n"):
            assert len(chunk) == max_chars and "\n" not in chunk


def test_chunk_text_prefers_line_boundaries():
    text = "aaaa\nbbbb\ncccc\n"
    assert chunk_text(text, 11) == [(0, "aaaa\nbbbb\n"), (10, "cccc\n")]
    assert chunk_text("q" * 10, 4) == [(0, "qqqq"), (4, "qqqq"), (8, "qq")]


def test_stdlib_records():
    recs = stdlib_records("heldout", max_chars=500, limit_chars=3000)
    assert recs and sum(len(r["text"]) for r in recs) >= 3000
    assert sum(len(r["text"]) for r in recs[:-1]) < 3000
    for r in recs:
        assert set(r) == {"source", "offset", "text"}
        assert is_heldout(r["source"]) and 0 < len(r["text"]) <= 500
        assert read_source(r["source"])[r["offset"] : r["offset"] + len(r["text"])] == r["text"]
    train = stdlib_records("train", limit_chars=1000)
    assert train and not any(is_heldout(r["source"]) for r in train)
    with pytest.raises(ValueError, match="validation"):
        stdlib_records("validation")


# --------------------------------------------------------------------- model
def test_forward_shape_final():
    model = load_charlstm("final")
    assert isinstance(model, CharLSTM) and not model.training
    ids = torch.tensor([encode_chars("import os\n" * 5), encode_chars("x = [1, 2]\n" * 5)[:50]])
    assert ids.shape == (2, 50)
    with torch.no_grad():
        out = model(ids)
    assert out.shape == (2, 50, VOCAB_SIZE) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    names = dict(model.named_modules())
    assert isinstance(names["embed"], torch.nn.Embedding)
    assert isinstance(names["lstm0"], torch.nn.LSTM) and isinstance(names["lstm1"], torch.nn.LSTM)
    assert isinstance(names["head"], torch.nn.Linear)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_every_checkpoint_loads(name):
    assert weights_path(name).is_file()
    model = load_charlstm(name)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training


def test_config_and_bundle_size():
    cfg = config()
    assert cfg["architecture"]["vocab_size"] == VOCAB_SIZE
    assert set(cfg["checkpoints"]) == set(CHECKPOINTS)
    total = sum(weights_path(n).stat().st_size for n in CHECKPOINTS)
    assert total < 12 * 1024 * 1024


def test_unknown_checkpoint_name():
    with pytest.raises(ValueError) as exc:
        load_charlstm("nope")
    for name in CHECKPOINTS:
        assert name in str(exc.value)
    with pytest.raises(ValueError):
        weights_path("nope")


def _heldout_loss(model, records):
    seqs = [torch.tensor(encode_chars(r["text"])) for r in records if len(r["text"]) > 1]
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    lengths = torch.tensor([len(s) for s in seqs])
    mask = torch.arange(ids.shape[1] - 1)[None, :] < (lengths[:, None] - 1)
    with torch.no_grad():
        logits = model(ids[:, :-1])
    nll = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), ids[:, 1:].reshape(-1), reduction="none")
    return float(nll[mask.reshape(-1)].mean())


def test_final_beats_step0_and_uniform():
    records = stdlib_records("heldout", max_chars=2000, limit_chars=20000)
    assert sum(len(r["text"]) for r in records) >= 20000
    final = _heldout_loss(load_charlstm("final"), records)
    step0 = _heldout_loss(load_charlstm("step0"), records)
    assert final < step0
    assert final < math.log(VOCAB_SIZE)
    assert final < 2.0  # a trained model, well below the unigram entropy (~3.1-3.3 nats)

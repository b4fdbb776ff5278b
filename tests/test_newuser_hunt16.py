"""A new user's own character model (embedding, a planted unit, a causal transformer encoder and
a GRU), registered as a live CharAdapter and checked against activations captured with plain
forward hooks: an interrupted extraction resumed, the planted unit ranked first by scipy's r,
and what the engine must refuse instead of storing wrong rows (an encoder that does not give one
id per character, a sequence-first GRU whose batch has as many records as characters) or leave
unexplained (a model error that names no record)."""
from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch
from scipy import stats

import deepbase_duck as dbd
from deepbase_duck.errors import ActivationError, DeepBaseError
from deepbase_duck.extraction.adapters import CharAdapter

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["x = 12", "def f(y): return 7", "abc", "total 345 items", "no digits here", "9a8b7c", "q",
         "sum 10 20", "", "it is 3 am", "zz 0"]


def ascii_ids(text):
    return [min(ord(c), 127) for c in text]


class TinyText(torch.nn.Module):
    """Embedding dim 0 is 1 on digits; unit 0 of ``proj`` copies it (the planted unit)."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(128, 8)
        self.proj = torch.nn.Linear(8, 8)
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.gru = torch.nn.GRU(8, 5, batch_first=batch_first)
        with torch.no_grad():
            self.emb.weight[:, 0] = torch.tensor([float(chr(i).isdigit()) for i in range(128)])
            self.proj.weight[0] = 0.0
            self.proj.weight[0, 0] = 1.0
            self.proj.bias[0] = 0.0

    def forward(self, ids):
        h = self.proj(self.emb(ids))
        mask = torch.nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        h = self.encoder(h, mask=mask, is_causal=True)
        if not self.gru.batch_first:
            return self.gru(h.transpose(0, 1))[0]
        return self.gru(h)[0]


def hooked(module, layer, texts, seq_first=False):
    """Each record's activations of ``layer``, one record per forward pass (no padding)."""
    got = []
    handle = module.get_submodule(layer).register_forward_hook(
        lambda m, i, o: got.append((o[0] if isinstance(o, tuple) else o).detach()))
    try:
        with torch.no_grad():
            for t in texts:
                if t:                                   # (an empty record has no symbol to read)
                    module(torch.tensor([ascii_ids(t)], dtype=torch.long))
    finally:
        handle.remove()
    got = iter(got)
    return [(lambda g: (g[:, 0] if seq_first else g[0]).numpy())(next(got)) if t else None for t in texts]


def stored(con, view) -> dict:
    out = {}
    for rid, pos, act in con.sql(f"SELECT record_id, pos, act FROM {view} ORDER BY record_id, pos").fetchall():
        out.setdefault(rid, []).append((pos, act))
    return out


class FailingAt(CharAdapter):
    """A CharAdapter whose ``fail_at``-th forward pass raises ``exc`` (an interrupt from inside
    the scan); its module, weights and so checksum are the plain model's."""
    fail_at, exc, calls = None, KeyboardInterrupt, 0

    def forward(self, encoded):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.exc("interrupted")
        return super().forward(encoded)


@pytest.mark.parametrize("pipeline", [False, True])
def test_interrupted_extraction_resumes_without_lost_or_duplicated_rows(tmp_path, pipeline):
    con = dbd.connect(str(tmp_path / "s.duckdb"), progress=False)
    try:
        adapter = FailingAt(TinyText(), ascii_ids, "ascii128")
        dbd.register_model(con, "tiny", adapter)
        dbd.add_dataset(con, "txt", TEXTS)
        layers = ["proj", "encoder.layers.0", "gru"]
        adapter.calls = 0
        adapter.exits_early(layers)                 # (its checks run forward passes of their own)
        adapter.calls, adapter.fail_at = 0, 3
        with pytest.raises(KeyboardInterrupt):
            dbd.extract(con, "tiny", layers, "txt", batch_size=3, pipeline=pipeline)
        kept = con.sql("SELECT behavior_id, count(*), count(DISTINCT record_id) FROM behavior_records "
                       "GROUP BY 1").fetchall()
        assert kept and all(n == d == 6 for _, n, d in kept)          # the two batches committed
        adapter.fail_at = None
        out = dbd.extract(con, "tiny", layers, "txt", batch_size=4, pipeline=pipeline)
        assert [(r["extracted"], r["reused"]) for r in out] == [(len(TEXTS) - 6, 6)] * 3
        ids = dict(con.sql("SELECT text, record_id FROM records WHERE dataset = 'txt'").fetchall())
        for r in out:
            ref = hooked(adapter.module, r["layer"], TEXTS)
            rows = stored(con, r["view"])
            assert sorted(rows) == sorted(ids[t] for t in TEXTS if t)
            for text, want in zip(TEXTS, ref):
                if not text:
                    continue
                pos = [p for p, _ in rows[ids[text]]]
                assert pos == list(range(len(text)))                   # each row once, none missing
                np.testing.assert_allclose(np.asarray([a for _, a in rows[ids[text]]]), want, atol=1e-5)
    finally:
        dbd.close(con)


def test_planted_unit_ranks_first_with_scipy_score(con):
    adapter = CharAdapter(TinyText(), ascii_ids, "ascii128")
    dbd.register_model(con, "tiny", adapter)
    dbd.add_dataset(con, "txt", TEXTS)
    dbd.hypothesis("nu16_digit", kind="binary")(lambda t: [(i, i + 1) for i, c in enumerate(t) if c.isdigit()])
    rows = dbd.inspect(con, "tiny", ["proj", "gru"], ["nu16_digit"], "txt", reuse=False).to_pylist()
    y = np.asarray([c.isdigit() for t in TEXTS for c in t], float)
    best = max(rows, key=lambda r: abs(r["score"]))
    assert (best["layer"], best["unit"]) == ("proj", 0)
    assert best["score"] == pytest.approx(1.0, abs=1e-9) and best["n"] == len(y)
    for layer in ["proj", "gru"]:
        x = np.concatenate([a for a in hooked(adapter.module, layer, TEXTS) if a is not None])
        for r in (r for r in rows if r["layer"] == layer and r["score"] is not None):
            assert r["score"] == pytest.approx(stats.pearsonr(x[:, r["unit"]], y)[0], abs=1e-6)


# -- a CharAdapter's encoder must give one integer id per character ----------------------------

def test_char_adapter_refuses_an_encoder_that_drops_characters():
    adapter = CharAdapter(TinyText(), lambda t: [ord(c) for c in t if c != " "], "nospace")
    with pytest.raises(DeepBaseError, match=r"returned 4 ids for a text of 5 characters"):
        adapter.encode(["ab cd"])
    # a record the example text does not show: refused at the scan, naming the text
    adapter = CharAdapter(TinyText(), lambda t: [min(ord(c), 127) for c in t if c != "\t"], "notab")
    con = dbd.connect(None, progress=False)
    try:
        dbd.register_model(con, "notab", adapter)
        dbd.add_dataset(con, "tabs", ["ok", "a\tb"])
        with pytest.raises(DeepBaseError, match=r"encode_chars\('a\\tb'\) returned 2 ids"):
            dbd.extract(con, "notab", ["proj"], "tabs")
        assert con.sql("SELECT count(*) FROM behaviors").fetchall() == [(0,)]
    finally:
        dbd.close(con)


def test_char_adapter_refuses_float_ids():
    """Float ids were cast to long silently (0.7 -> 0): another character's embedding."""
    adapter = CharAdapter(TinyText(), lambda t: [ord(c) / 2 for c in t], "halves")
    with pytest.raises(DeepBaseError, match="float64 values; it must return integer ids"):
        adapter.encode(["abc"])
    ok = CharAdapter(TinyText(), lambda t: np.asarray([ord(c) for c in t], np.int32), "np-ids")
    assert ok.encode(["abc"]).inputs.tolist() == [[97, 98, 99]]


# -- a sequence-first recurrent layer ----------------------------------------------------------

def test_sequence_first_gru_is_refused_when_its_shape_looks_batch_first(con):
    """4 records of 4 characters in a batch of 4: the (sequence, batch, width) output of a GRU
    built without batch_first has the shape the default reader expects, so records and positions
    were stored swapped."""
    dbd.register_model(con, "seqfirst", CharAdapter(TinyText(batch_first=False), ascii_ids, "ascii128"))
    dbd.add_dataset(con, "four", ["ab12", "3cde", "x9y8", "wxyz"])
    with pytest.raises(ActivationError, match=r"'gru' \(an nn.GRU without batch_first=True\)"):
        dbd.extract(con, "seqfirst", ["gru"], "four", batch_size=4)
    assert con.sql("SELECT count(*) FROM behaviors").fetchall() == [(0,)]


class TransposingAdapter(CharAdapter):
    """An adapter of one's own that reads the sequence-first layer by transposing it."""

    def symbol_activations(self, layer, output, encoded):
        if layer == "gru":
            output = output.transpose(0, 1)
        return super().symbol_activations(layer, output, encoded)


def test_adapter_that_transposes_a_sequence_first_layer_reads_it(con):
    texts = ["ab12", "3cde", "x9y8", "wxyz", "7"]
    module = TinyText(batch_first=False)
    dbd.register_model(con, "seqfirst", TransposingAdapter(module, ascii_ids, "ascii128"))
    dbd.add_dataset(con, "four", texts)
    (r,) = dbd.extract(con, "seqfirst", ["gru"], "four", batch_size=4)
    ids = dict(con.sql("SELECT text, record_id FROM records").fetchall())
    rows = stored(con, r["view"])
    for text, want in zip(texts, hooked(module, "gru", texts, seq_first=True)):
        np.testing.assert_allclose(np.asarray([a for _, a in rows[ids[text]]]), want, atol=1e-5)


# -- a model's own error names the records it failed on -----------------------------------------

def test_model_error_keeps_its_type_and_names_the_records(con):
    dbd.register_model(con, "ord", CharAdapter(TinyText(), lambda t: [ord(c) for c in t], "ord"))
    dbd.add_dataset(con, "txt", ["plain", "caf\u00e9 au lait", "more"])
    bad = dict(con.sql("SELECT text, record_id FROM records").fetchall())["caf\u00e9 au lait"]
    with pytest.raises(IndexError) as info:                     # the embedding's own error, as torch raises it
        dbd.extract(con, "ord", ["proj"], "txt", batch_size=1)
    notes = getattr(info.value, "__notes__", [])
    assert any(f"record_id {bad} " in n and "dataset 'txt'" in n and "model 'ord'" in n for n in notes), notes
    with pytest.raises(IndexError) as info:
        dbd.inspect(con, "ord", ["proj"], ["in_string"], "txt", batch_size=1)
    assert any(f"record_id {bad} " in n for n in getattr(info.value, "__notes__", []))
    # in SQL, where DuckDB shows only the exception's type and str(): the note is in the message
    with pytest.raises(duckdb.Error, match=rf"IndexError: index out of range.*dataset 'txt' with record_id {bad} "):
        con.sql("SELECT * FROM inspect('ord', ['proj'], ['in_string'], 'txt', batch_size := 1, "
                "reuse := false)").fetchall()


# -- a model that reads ahead sees CharAdapter's padding ------------------------------------------

class ReadsAhead(TinyText):
    """TinyText without its causal mask: every position attends to the padding after a record."""

    def forward(self, ids):
        return self.gru(self.encoder(self.proj(self.emb(ids))))[0]


def test_a_model_that_reads_ahead_is_warned_of(con):
    dbd.add_dataset(con, "txt", TEXTS)
    module = ReadsAhead()
    dbd.register_model(con, "ahead", CharAdapter(module, ascii_ids, "ascii128"))
    with pytest.warns(UserWarning, match=r"'encoder.layers.0' \(by up to .*right-padded.*batch_size=1"):
        (r,) = dbd.extract(con, "ahead", ["encoder.layers.0"], "txt", batch_size=4)
    # what it warns of: stored rows of a padded record differ from the record's own forward pass
    ids = dict(con.sql("SELECT text, record_id FROM records").fetchall())
    rows = stored(con, r["view"])
    gaps = [np.abs(np.asarray([a for _, a in rows[ids[t]]]) - want).max()
            for t, want in zip(TEXTS, hooked(module, "encoder.layers.0", TEXTS)) if t]
    assert max(gaps) > 1e-3 and min(gaps) < 1e-5            # the longest record of a batch is not padded

    import warnings
    dbd.register_model(con, "causal", CharAdapter(TinyText(), ascii_ids, "ascii128"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*right-padded.*")
        dbd.extract(con, "causal", ["encoder.layers.0", "gru"], "txt", batch_size=4)


class PackedSeqFirst(torch.nn.Module):
    """A sequence-first bidirectional GRU run on packed input: its output is a PackedSequence,
    which Retain pads batch first, so the default reader is right for it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(128, 4)
        self.gru = torch.nn.GRU(4, 3, bidirectional=True)

    def forward(self, ids, lengths):
        x = torch.nn.utils.rnn.pack_padded_sequence(self.emb(ids).transpose(0, 1), lengths.clamp(min=1),
                                                    enforce_sorted=False)
        return self.gru(x)[0]


class LengthsAdapter(CharAdapter):
    def encode(self, texts):
        enc = super().encode(texts)
        enc.inputs = (enc.inputs, torch.tensor([len(t) for t in texts]))
        return enc


def test_packed_sequence_first_rnn_is_read_batch_first(con):
    texts = ["ab12", "3cde", "x9y8", "wxyz", "7", "long record 42"]
    module = PackedSeqFirst()
    dbd.register_model(con, "packed", LengthsAdapter(module, ascii_ids, "ascii128"))
    dbd.add_dataset(con, "four", texts)
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*right-padded.*")       # (lengths given: no padding seen)
        (r,) = dbd.extract(con, "packed", ["gru"], "four", batch_size=4)
    ids = dict(con.sql("SELECT text, record_id FROM records").fetchall())
    rows = stored(con, r["view"])
    for t in texts:
        with torch.no_grad():
            want = module.gru(module.emb(torch.tensor([ascii_ids(t)])).transpose(0, 1))[0][:, 0].numpy()
        np.testing.assert_allclose(np.asarray([a for _, a in rows[ids[t]]]), want, atol=1e-5)


class CharCNN(torch.nn.Module):
    """A non-causal 1-D CNN over characters (kernel 5, 'same' padding): it reads two characters
    ahead, so the last two characters of a padded record see pad ids."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(128, 6)
        self.conv = torch.nn.Conv1d(6, 5, 5, padding=2)
        self.out = torch.nn.Linear(5, 4)

    def forward(self, ids):
        return self.out(torch.relu(self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)))


def test_checkpoints_of_a_cnn_scanned_together_are_warned_of_padding(con):
    import json
    for k in range(2):
        dbd.register_model(con, f"cnn{k}", CharAdapter(CharCNN(k), ascii_ids, "ascii128"))
    dbd.add_dataset(con, "txt", TEXTS)
    with pytest.warns(UserWarning, match=r"'out' \(by up to .*right-padded"):
        dbd.inspect(con, ["cnn0", "cnn1"], ["out"], ["in_string"], "txt", batch_size=4)
    params = json.loads(con.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    assert params["forward"] == "vmap"                   # the fused pass, which runs no exits_early check

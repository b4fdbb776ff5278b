"""Scores cached under an earlier model identity are served after the store is adopted.

A store written before model identities covered module classes (the weights' checksum alone)
or submodule settings (``model_checksum_v2``) is adopted in place when its model loads or is
registered again: its row and stored activations move to the current checksum. Its cached
scores stayed keyed by a query fingerprint over the old checksum, so the same query missed the
cache and scanned again. Now adoption records the old checksum for the model's name, and the
lookup also tries the query's fingerprint under it; only scans of that same name are served,
never another model's scores.

The old stores are written by this code with the checksum computed as the earlier code did
(``model_checksum`` swapped for the old identity), so their queries' fingerprints are those the
earlier code computed from such a row.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import deepbase_duck as dbd
from conftest import TEXTS, numpy_corr, planted_adapter
from deepbase_duck.extraction import adapters
from deepbase_duck.extraction.adapters import CharAdapter, model_checksum_v2, weights_checksum
from deepbase_duck.models.charlstm import VOCAB, encode_chars

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = Path(__file__).parent
OLD = {"v2": (model_checksum_v2, 2), "weights": (lambda module, variant="": weights_checksum(module), None)}


class Scaled(torch.nn.Module):
    """A char model whose layer `out` reads tanh(scale * embedding): ``scale`` a setting the v2
    identity did not cover (two scales had one v2 checksum) and the weights' checksum neither."""

    def __init__(self, scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(len(VOCAB), 4)
        self.out = torch.nn.Linear(4, 4)
        self.scale = scale
        self.calls = 0

    def forward(self, ids):
        self.calls += 1
        return self.out(torch.tanh(self.scale * self.embed(ids)))


def scaled(scale: float = 1.0):
    """A loader spec for Scaled ('test_cache_adoption17:scaled')."""
    return CharAdapter(Scaled(scale), encode_chars, "chars-test", device="cpu")


def last_query(con):
    qid, source, params = con.sql("SELECT query_id, source, params FROM queries "
                                  "ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    return qid, source, json.loads(params)


def by_key(table):
    return {(r["model"], r["layer"], r["unit"], r["hypothesis"], r["measure"]): r["score"] for r in table.to_pylist()}


def written_by_earlier_code(monkeypatch, era: str, path: str, work) -> None:
    """Open ``path``, run ``work(con)`` with models' checksums computed as the code of ``era``
    did ('v2' or 'weights'), mark the rows with that era's identity, and close."""
    checksum, identity = OLD[era]
    with monkeypatch.context() as patch:
        patch.setattr(adapters, "model_checksum", checksum)
        con = dbd.connect(path, progress=False)
        try:
            work(con)
            con.execute("UPDATE models SET identity = ?", [identity])
        finally:
            dbd.close(con)


def corr_reference(module, layer_output, hypothesis: str = "digit") -> dict:
    """{(layer, unit): Pearson r (numpy) or None for a constant unit} of ``layer_output(module,
    ids)`` over TEXTS (conftest.numpy_corr)."""
    return numpy_corr(lambda ids: layer_output(module, ids), TEXTS, hypothesis)


def assert_scores(table, model: str, want: dict) -> None:
    got = {(layer, unit): s for (m, layer, unit, _, _), s in by_key(table).items() if m == model}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert (got[k] is None) if v is None else got[k] == pytest.approx(v, abs=1e-5), k


@pytest.mark.parametrize("era, how", [("v2", "load"), ("weights", "load"), ("v2", "register")])
def test_a_query_cached_under_the_earlier_identity_is_a_cache_hit_after_adoption(tmp_path, monkeypatch, era, how):
    """The store's query is cached under the old checksum; after the model is adopted (loaded
    by its loader, or its live object registered again) the same query is served those scores:
    the model does not run, nothing is read or scanned, and the scores are the same (and
    numpy's). The copy is stored under the current fingerprint: the next query finds it."""
    sys.path.insert(0, str(TESTS))                             # tests/ray_models.py: a loader spec
    path = str(tmp_path / f"{era}.duckdb")
    query = dict(layers=["planted", "mix"], hypotheses=["digit"], dataset="snippets")
    cached = {}

    def work(con):
        dbd.register_model(con, "p", "ray_models:planted")
        dbd.add_dataset(con, "snippets", TEXTS)
        cached["scores"] = by_key(dbd.inspect(con, "p", **query))
        cached["qid"], source, _ = last_query(con)
        assert source == "model"
    written_by_earlier_code(monkeypatch, era, path, work)
    current = planted_adapter()
    old, new = OLD[era][0](current.module), current.checksum
    con = dbd.connect(path, progress=False)
    try:
        assert con.sql("SELECT checksum FROM models").fetchall() == [(old,)] and old != new
        session = dbd.catalog.session_of(con)
        calls = 0
        if how == "register":
            live = planted_adapter()
            session.register_model("p", live, replace=False)      # adopts: no 'different model' error
            calls = live.module.calls                              # (the registration measured widths)
        t = dbd.inspect(con, "p", **query)
        adapter = session.adapters["p"]
        assert adapter.module.calls == calls                      # the model did not run
        qid, source, params = last_query(con)
        assert source == "cache" and params["reused"]["scores_of_query"] == cached["qid"]
        assert params["reused"]["activation_records_read"] == 0 == params["reused"]["activation_records_computed"]
        assert params["models"] == ["p"] and params["checksums"] == [new]           # this query's provenance
        assert set(t.column("query_id").to_pylist()) == {qid}
        assert by_key(t) == cached["scores"]
        assert con.sql("SELECT checksum, identity FROM models").fetchall() == [(new, 3)]
        assert session.earlier_checksums("p", new) == [old]

        def layers(m, ids):
            return {"planted": m.planted(ids), "mix": m(ids)}
        assert_scores(t, "p", corr_reference(planted_adapter().module, layers))
        # the copy is keyed by the current fingerprint: the next query is served it directly
        again = dbd.inspect(con, "p", **query)
        _, source, params = last_query(con)
        assert source == "cache" and params["reused"]["scores_of_query"] == qid
        assert by_key(again) == cached["scores"] and adapter.module.calls == calls
    finally:
        dbd.close(con)


def test_only_the_adopted_names_own_scans_are_served(tmp_path, monkeypatch):
    """Two models the v2 identity could not tell apart (one weights, scale 0.5 and 4.0): under
    v2 they had one checksum, and 'b' was served the scores 'a' scanned (a copy under 'b'). Both
    are adopted (v2's rule: each one's v2 checksum is the row's), each to its own checksum. 'a'
    is served its own scan; 'b' is not served 'a''s scan nor its copy of it: it scans, and its
    scores are scale 4.0's (numpy), not 'a''s."""
    sys.path.insert(0, str(TESTS))
    path = str(tmp_path / "two.duckdb")
    spec = f"{Path(__file__).stem}:scaled"
    query = dict(layers=["out"], hypotheses=["digit"], dataset="d")
    cached = {}

    def work(con):
        dbd.register_model(con, "a", spec, {"scale": 0.5})
        dbd.register_model(con, "b", spec, {"scale": 4.0})
        assert con.sql("SELECT count(DISTINCT checksum) FROM models").fetchall() == [(1,)]   # v2: one identity
        dbd.add_dataset(con, "d", TEXTS)
        cached["a"] = by_key(dbd.inspect(con, "a", **query))
        cached["qid"], source, _ = last_query(con)
        assert source == "model"
        dbd.inspect(con, "b", **query)
        assert last_query(con)[1] == "cache"                   # the old identity's mistake, kept in the store
    written_by_earlier_code(monkeypatch, "v2", path, work)
    con = dbd.connect(path, progress=False)
    try:
        session = dbd.catalog.session_of(con)
        a = dbd.inspect(con, "a", **query)
        _, source, params = last_query(con)
        assert source == "cache" and params["reused"]["scores_of_query"] == cached["qid"]
        assert by_key(a) == cached["a"] and session.adapters["a"].module.calls == 0
        b = dbd.inspect(con, "b", **query)
        _, source, params = last_query(con)
        assert source == "model" and params["reused"]["scores_of_query"] is None
        assert session.adapters["b"].module.calls > 0
        checksums = dict(con.sql("SELECT name, checksum FROM models").fetchall())
        assert checksums["a"] != checksums["b"] and session.earlier_checksums("b", checksums["b"])   # b was adopted

        def out(m, ids):
            return {"out": m(ids)}
        assert_scores(b, "b", corr_reference(Scaled(4.0), out))
        assert_scores(a, "a", corr_reference(Scaled(0.5), out))
        far = max(abs(cached["a"][("a", "out", u, "digit", "corr")] - by_key(b)[("b", "out", u, "digit", "corr")])
                  for u in range(4))
        assert far > 1e-3                                      # the two scales' scores do differ
    finally:
        dbd.close(con)


def test_a_different_model_under_the_adopted_name_is_not_served(tmp_path, monkeypatch):
    """The name of the v2 row registered again with other weights (not one of its earlier
    identities): nothing is adopted or recorded, and its query scans."""
    sys.path.insert(0, str(TESTS))
    path = str(tmp_path / "v2.duckdb")

    def work(con):
        dbd.register_model(con, "p", "ray_models:planted")
        dbd.add_dataset(con, "snippets", TEXTS)
        dbd.inspect(con, "p", ["mix"], ["digit"], "snippets")
    written_by_earlier_code(monkeypatch, "v2", path, work)
    con = dbd.connect(path, progress=False)
    try:
        other = planted_adapter()
        with torch.no_grad():
            other.module.mix[0].bias += 1.0
        other._checksum = None
        session = dbd.catalog.session_of(con)
        with pytest.raises(dbd.DeepBaseError, match="different model"):
            session.register_model("p", other, replace=False)
        session.register_model("p", other)                     # replace: another model under the name
        assert session.earlier_checksums("p", other.checksum) == []
        dbd.inspect(con, "p", ["mix"], ["digit"], "snippets")
        _, source, params = last_query(con)
        assert source == "model" and params["reused"]["scores_of_query"] is None
    finally:
        dbd.close(con)

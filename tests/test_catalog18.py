"""The catalog's model identity: what is stored for a model is reused only for that model.

A model's checksum keys everything stored from it (activations, cached scores). These tests
check that the key is never loose: weights changed in place, or in the checkpoint file a
loader reads, are another model (scanned again, or refused until registered again, never
served the registered weights' results), while the same weights registered again reuse what
was stored; several checkpoints of one model in one store each read their own rows, also when
an earlier store's identities are adopted; and register_model's refusals name the bad thing.
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
from deepbase_duck.extraction.adapters import model_checksum_v2
from deepbase_duck.models.charlstm import encode_chars, load_charlstm

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = Path(__file__).parent


def last_query(con) -> tuple[int, str, dict]:
    qid, source, params = con.sql("SELECT query_id, source, params FROM queries "
                                  "ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    return qid, source, json.loads(params)


def unit_scores(table, model: str) -> dict:
    """{(layer, unit): score} of ``model``'s rows."""
    return {(r["layer"], r["unit"]): r["score"] for r in table.to_pylist() if r["model"] == model}


def assert_close(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert (got[k] is None) if v is None else got[k] == pytest.approx(v, abs=tol), k


def planted_mix(module):
    return lambda ids: {"mix": module(ids)}


# -- lead 1: a changed model never reuses the old one's rows; the same model does ---------------

def test_a_weight_changed_in_place_scans_again_and_the_same_weights_registered_again_do_not(con):
    """One weight of the registered live model changed in place: the next query runs the model
    and its scores are the new weights' (numpy), not the stored ones. A new object with the
    original weights registered again under the name is the first model: served its stored
    scores, no forward pass."""
    adapter = planted_adapter()
    dbd.register_model(con, "p", adapter)
    dbd.add_dataset(con, "d", TEXTS)
    first = unit_scores(dbd.inspect(con, "p", ["mix"], ["digit"], "d"), "p")
    qid1, source, _ = last_query(con)
    assert source == "model"
    assert_close(first, numpy_corr(planted_mix(planted_adapter().module), TEXTS))

    calls = adapter.module.calls
    with torch.no_grad():
        adapter.module.mix[0].weight[0, 0] += 0.5
    second = unit_scores(dbd.inspect(con, "p", ["mix"], ["digit"], "d"), "p")
    _, source, params = last_query(con)
    assert source == "model" and params["reused"]["activation_records_read"] == 0
    assert adapter.module.calls > calls                                      # the model ran
    assert_close(second, numpy_corr(planted_mix(adapter.module), TEXTS))
    assert abs(second[("mix", 0)] - first[("mix", 0)]) > 1e-3                 # unit 0 reads that weight

    again = planted_adapter()                                                 # the original weights
    dbd.register_model(con, "p", again)
    calls = again.module.calls
    third = unit_scores(dbd.inspect(con, "p", ["mix"], ["digit"], "d"), "p")
    _, source, params = last_query(con)
    assert source == "cache" and params["reused"]["scores_of_query"] == qid1
    assert again.module.calls == calls and third == first


FILE_QUERY = dict(layers=["mix"], hypotheses=["digit"], dataset="d")


def scanned_from_file(tmp_path, state) -> tuple[Path, str, dict, int]:
    """A first session: the planted model's ``state`` saved to a weights file, registered by the
    loader that reads it (tests/ray_models.py: from_file), scanned by FILE_QUERY. Returns (the
    weights file, the store's path, its scores, its query id)."""
    sys.path.insert(0, str(TESTS))
    weights, path = tmp_path / "w.pt", str(tmp_path / "s.duckdb")
    torch.save(state, weights)
    con = dbd.connect(path, progress=False)
    try:
        dbd.register_model(con, "f", "ray_models:from_file", {"path": str(weights)})
        dbd.add_dataset(con, "d", TEXTS)
        scores = unit_scores(dbd.inspect(con, "f", **FILE_QUERY), "f")
        return weights, path, scores, last_query(con)[0]
    finally:
        dbd.close(con)


def test_a_checkpoint_file_overwritten_since_registration_is_refused_not_served(tmp_path):
    """A model registered by a loader that reads a weights file; the file is overwritten with
    one weight changed. In the next session the same query was served the registered weights'
    stored scores (the model never loaded: everything was stored), while any query that had to
    run the model was refused. Now the first query of the session loads the model and refuses
    it, naming the model and saying to register it again; registered again, it scans, and its
    scores are the new weights' (numpy)."""
    state = planted_adapter().module.state_dict()
    weights, path, old, _ = scanned_from_file(tmp_path, state)
    query = FILE_QUERY
    state["mix.0.weight"][0, 0] += 0.5
    torch.save(state, weights)
    changed = planted_adapter()
    changed.module.load_state_dict(state)

    con = dbd.connect(path, progress=False)
    try:
        n_queries = con.sql("SELECT count(*) FROM queries").fetchall()[0][0]
        with pytest.raises(dbd.DeepBaseError, match=r"model 'f': the loader 'ray_models:from_file' now yields "
                                                    r"weights with checksum .*register it again"):
            dbd.inspect(con, "f", **query)
        with pytest.raises(dbd.DeepBaseError, match="register it again"):   # and again: not once only
            dbd.inspect(con, "f", **query)
        assert con.sql("SELECT count(*) FROM queries").fetchall()[0][0] == n_queries
        dbd.register_model(con, "f", "ray_models:from_file", {"path": str(weights)})
        new = unit_scores(dbd.inspect(con, "f", **query), "f")
        _, source, params = last_query(con)
        assert source == "model" and params["reused"]["activation_records_read"] == 0
        assert_close(new, numpy_corr(planted_mix(changed.module), TEXTS))
        assert abs(new[("mix", 0)] - old[("mix", 0)]) > 1e-3
    finally:
        dbd.close(con)


def test_an_unchanged_checkpoint_file_is_served_its_stored_scores_in_the_next_session(tmp_path):
    """The check above costs one load per session and refuses nothing else: the same file in the
    next session is served the stored scores (the model loaded, never run)."""
    _, path, old, qid = scanned_from_file(tmp_path, planted_adapter().module.state_dict())
    query = FILE_QUERY
    con = dbd.connect(path, progress=False)
    try:
        again = unit_scores(dbd.inspect(con, "f", **query), "f")
        _, source, params = last_query(con)
        assert source == "cache" and params["reused"]["scores_of_query"] == qid and again == old
        assert dbd.catalog.session_of(con).adapters["f"].module.calls == 0
    finally:
        dbd.close(con)


# -- lead 2: several checkpoints of one model in one store ------------------------------------

CHECKPOINTS = ("early", "mid", "final")
SHORT = [t for t in TEXTS[:8]]


def lstm0_of(checkpoint: str):
    module = load_charlstm(checkpoint)
    return lambda ids: {"lstm0": module.lstm0(module.embed(ids))[0]}


def register_checkpoints(con) -> None:
    for c in CHECKPOINTS:
        dbd.register_model(con, c, "deepbase_duck.models.zoo:charlstm", {"checkpoint": c, "device": "cpu"})


def test_three_checkpoints_in_one_store_read_only_their_own_rows(tmp_path, monkeypatch):
    """The char-LSTM's early, mid and final checkpoints registered side by side in a store an
    earlier version wrote (identities of the v2 era: monkeypatched as the earlier code computed
    them), each extracted and scanned there. Opened now, each is adopted to its own current checksum, is
    served its own scan (not another checkpoint's), and its scores are its own weights' (numpy);
    the three differ."""
    path = str(tmp_path / "three.duckdb")
    query = dict(layers=["lstm0"], hypotheses=["digit"], dataset="d")
    scans = {}
    with monkeypatch.context() as patch:
        patch.setattr(adapters, "model_checksum", model_checksum_v2)
        con = dbd.connect(path, progress=False)
        try:
            register_checkpoints(con)
            dbd.add_dataset(con, "d", SHORT)
            for c in CHECKPOINTS:
                dbd.extract(con, c, ["lstm0"], "d")
                dbd.inspect(con, c, **query)
                scans[c], source, _ = last_query(con)
                assert source == "stored"                # read the activations just extracted
            con.execute("UPDATE models SET identity = 2")
            assert con.sql("SELECT count(DISTINCT checksum) FROM models").fetchall() == [(3,)]
        finally:
            dbd.close(con)
    con = dbd.connect(path, progress=False)
    try:
        session = dbd.catalog.session_of(con)
        got = {}
        for c in reversed(CHECKPOINTS):                   # another order than they were scanned in
            got[c] = unit_scores(dbd.inspect(con, c, **query), c)
            _, source, params = last_query(con)
            assert source == "cache" and params["reused"]["scores_of_query"] == scans[c], c
            checksum = session.model_row(c)["checksum"]
            assert checksum == session.adapters[c].checksum
            assert len(session.earlier_checksums(c, checksum)) == 1
        rows = con.sql("SELECT model, model_checksum FROM behaviors ORDER BY model").fetchall()
        assert {m: k for m, k in rows} == {c: session.model_row(c)["checksum"] for c in CHECKPOINTS}
        for c in CHECKPOINTS:
            assert_close(got[c], numpy_corr(lstm0_of(c), SHORT), tol=1e-4)
        assert got["early"] != got["mid"] != got["final"] != got["early"]
    finally:
        dbd.close(con)


def test_three_checkpoints_extracted_then_scanned_each_read_their_own_activations(con):
    """In one current store: each checkpoint's activations extracted, each query reads back
    all of its own (computes none) and scores as numpy says: from its own weights, not another
    checkpoint's."""
    register_checkpoints(con)
    dbd.add_dataset(con, "d", SHORT)
    for c in CHECKPOINTS:
        dbd.extract(con, c, ["lstm0"], "d")
    for c in CHECKPOINTS:
        t = dbd.inspect(con, c, ["lstm0"], ["digit"], "d", reuse=False)
        _, source, params = last_query(con)
        assert source == "stored" and params["reused"]["activation_records_computed"] == 0
        assert params["reused"]["activation_records_read"] == len(SHORT)
        assert_close(unit_scores(t, c), numpy_corr(lstm0_of(c), SHORT), tol=1e-4)


# -- register_model's refusals -----------------------------------------------------------------

def test_loader_params_json_cannot_keep_are_refused_naming_the_key(con, tmp_path):
    """A Path among the loader's params: the loader ran, then the row's INSERT failed with a bare
    TypeError ('Object of type PosixPath is not JSON serializable') naming neither the model nor
    the key. Now refused first, naming both and what to give; nothing is registered."""
    sys.path.insert(0, str(TESTS))
    weights = tmp_path / "w.pt"
    torch.save(planted_adapter().module.state_dict(), weights)
    with pytest.raises(dbd.DeepBaseError, match=r"register_model\('f'\): params\['path'\] is PosixPath .*"
                                                r"stored as JSON.*str\(path\)"):
        dbd.register_model(con, "f", "ray_models:from_file", {"path": weights})
    assert con.sql("SELECT count(*) FROM models").fetchall() == [(0,)]
    dbd.register_model(con, "f", "ray_models:from_file", {"path": str(weights)})
    assert con.sql("SELECT params FROM models").fetchall() == [(json.dumps({"path": str(weights)}),)]


def test_a_different_model_under_a_name_without_replace_says_what_to_do(con):
    """register_model(replace=False) over a name holding another model names both checksums and
    the two ways on."""
    session = dbd.catalog.session_of(con)
    first = planted_adapter()
    session.register_model("p", first)
    other = planted_adapter()
    with torch.no_grad():
        other.module.mix[0].bias += 1.0
    with pytest.raises(dbd.DeepBaseError, match=rf"a different model is already registered as 'p' \(checksum "
                                                rf"{first.checksum[:12]}\.\.\., this one {other.checksum[:12]}"
                                                rf"\.\.\.\); pass replace=True .* or register it under another name"):
        session.register_model("p", other, replace=False)
    assert con.sql("SELECT checksum FROM models").fetchall() == [(first.checksum,)]


def test_a_checkpoint_file_overwritten_under_a_store_of_the_v2_era_is_refused_too(tmp_path, monkeypatch):
    """The same with the row of an earlier version (v2 identities, which loading adopts): the
    overwritten file's model is neither adopted nor served the stored scores of the registered
    weights; the query is refused, naming the model."""
    sys.path.insert(0, str(TESTS))
    weights, path = tmp_path / "w.pt", str(tmp_path / "s.duckdb")
    state = planted_adapter().module.state_dict()
    torch.save(state, weights)
    query = dict(layers=["mix"], hypotheses=["digit"], dataset="d")
    with monkeypatch.context() as patch:
        patch.setattr(adapters, "model_checksum", model_checksum_v2)
        con = dbd.connect(path, progress=False)
        try:
            dbd.register_model(con, "f", "ray_models:from_file", {"path": str(weights)})
            dbd.add_dataset(con, "d", TEXTS)
            dbd.inspect(con, "f", **query)
            con.execute("UPDATE models SET identity = 2")
        finally:
            dbd.close(con)
    state["mix.0.weight"][0, 0] += 0.5
    torch.save(state, weights)
    con = dbd.connect(path, progress=False)
    try:
        with pytest.raises(dbd.DeepBaseError, match="model 'f': the loader .* now yields weights"):
            dbd.inspect(con, "f", **query)
        assert con.sql("SELECT identity FROM models").fetchall() == [(2,)]      # not adopted
    finally:
        dbd.close(con)


class Scaled(torch.nn.Module):
    """A char model whose layer `out` reads tanh(scale * embedding): ``scale`` is a setting the
    v2 identity did not cover, so two scales had one v2 checksum."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(98, 4)
        self.out = torch.nn.Linear(4, 4)
        self.scale = scale

    def forward(self, ids):
        return self.out(torch.tanh(self.scale * self.embed(ids)))


def scaled(scale: float = 1.0):
    """A loader spec for Scaled ('test_catalog18:scaled')."""
    from deepbase_duck.extraction.adapters import CharAdapter
    return CharAdapter(Scaled(scale), encode_chars, "chars-test", device="cpu")


@pytest.mark.parametrize("first", [(), ("a",)])
def test_a_scan_that_read_another_models_activations_under_a_shared_v2_identity_is_not_served(
        tmp_path, monkeypatch, first):
    """Under v2, 'a' (scale 0.5) and 'b' (scale 4.0) had one checksum: 'a' extracted its
    activations, and 'b''s scan read them as its own (they were keyed by the checksum alone), so
    its stored scores are 'a''s. Adopted now, 'b' was served that scan (its own name's) as a
    cache hit: 'a''s scores under 'b'. Now the scan is not served (a warning says why): 'b' runs
    and scores as numpy says for scale 4.0, whether or not 'a' was adopted first; 'a' is still
    served its own scan."""
    sys.path.insert(0, str(TESTS))
    path = str(tmp_path / "shared.duckdb")
    spec = f"{Path(__file__).stem}:scaled"
    query = dict(layers=["out"], hypotheses=["digit"], dataset="d")
    with monkeypatch.context() as patch:
        patch.setattr(adapters, "model_checksum", model_checksum_v2)
        con = dbd.connect(path, progress=False)
        try:
            dbd.register_model(con, "a", spec, {"scale": 0.5})
            dbd.register_model(con, "b", spec, {"scale": 4.0})
            assert con.sql("SELECT count(DISTINCT checksum) FROM models").fetchall() == [(1,)]
            dbd.add_dataset(con, "d", TEXTS)
            dbd.extract(con, "a", ["out"], "d")
            dbd.inspect(con, "a", **query)
            a_scan, source, _ = last_query(con)
            assert source == "stored"
            dbd.inspect(con, "b", **query, reuse=False)
            _, source, params = last_query(con)
            assert source == "stored" and params["reused"]["activation_records_read"] == len(TEXTS)   # a's
            con.execute("UPDATE models SET identity = 2")
        finally:
            dbd.close(con)
    con = dbd.connect(path, progress=False)
    try:
        served = {a_scan}
        for name in first:
            dbd.inspect(con, name, **query)
            qid, source, params = last_query(con)
            assert source == "cache" and params["reused"]["scores_of_query"] == a_scan
            served.add(qid)                          # a copy of a's scan, under the current key
        with pytest.warns(UserWarning, match="model 'b': the scores this store cached for it under its earlier "
                                             "identity are not reused: model 'a'"):
            b = unit_scores(dbd.inspect(con, "b", **query), "b")
        _, source, params = last_query(con)
        assert source == "model" and params["reused"]["scores_of_query"] is None
        assert params["reused"]["activation_records_read"] == 0                  # not a's activations either
        assert_close(b, numpy_corr(lambda ids: {"out": Scaled(4.0)(ids)}, TEXTS))
        a = unit_scores(dbd.inspect(con, "a", **query), "a")
        _, source, params = last_query(con)
        assert source == "cache" and params["reused"]["scores_of_query"] == max(served)
        assert_close(a, numpy_corr(lambda ids: {"out": Scaled(0.5)(ids)}, TEXTS))
    finally:
        dbd.close(con)


# -- datasets ----------------------------------------------------------------------------------

def test_a_dataset_replaced_without_a_description_keeps_its_description(con):
    """add_dataset(replace=True) with new texts and no description erased the stored description
    (set to ''), whether some records were kept or none; an append or the same records kept it.
    Now none given keeps it in every case, and one given replaces it."""
    dbd.add_dataset(con, "d", ["a", "b"], description="my corpus")
    dbd.add_dataset(con, "d", ["a", "c"], replace=True)                 # record 0 kept
    assert con.sql("SELECT description FROM datasets").fetchall() == [("my corpus",)]
    dbd.add_dataset(con, "d", ["x", "y"], replace=True)                 # none kept
    assert con.sql("SELECT description FROM datasets").fetchall() == [("my corpus",)]
    dbd.add_dataset(con, "d", ["x", "z"], replace=True, description="edited")
    assert con.sql("SELECT description FROM datasets").fetchall() == [("edited",)]
    assert con.sql("SELECT text FROM records ORDER BY record_id").fetchall() == [("x",), ("z",)]

"""Hunt 19 of the query cache and the library's argument checks: a hypothesis whose meaning (kind,
categories, settings such as an image grid's coverage) changed under a version given by hand is
not served the cached scores of its old meaning; a None, empty or non-string name in a list of
names is refused as such, at its position."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.corpora import scenes
from deepbase_duck.errors import DeepBaseError
from deepbase_duck.extraction.image_adapter import ImageAdapter
from deepbase_duck.hypotheses import register
from deepbase_duck.hypotheses.core import Hypothesis
from deepbase_duck.hypotheses.grid import GridHypothesis

from conftest import TEXTS, planted_per_record
from test_vision_hunt16 import _Conv

pytestmark = pytest.mark.usefixtures("one_thread")


def _sources(con) -> list[str]:
    return [r[0] for r in con.sql("SELECT source FROM queries ORDER BY query_id").fetchall()]


# -- 1. the cache key and a hypothesis' meaning ----------------------------------------------------
def _scene_masks(recs) -> dict[str, np.ndarray]:
    return {r["text"]: scenes.render(r["text"]).mask("colour:" + json.loads(r["text"])["background"].get(
        "colour", "red")) for r in recs}


def _numpy_grid_corr(recs, masks, coverage) -> list[float]:
    """Independent reference: Pearson r (numpy) of each unit of the conv layer, pooled to its 4x4
    grid, against the cells whose mask covers at least ``coverage``."""
    x = torch.stack([torch.from_numpy(scenes.render(r["text"]).image).permute(2, 0, 1).float() / 255 for r in recs])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        out = torch.nn.functional.avg_pool2d(_Conv()(x), 4).numpy()
    acts = out.transpose(0, 2, 3, 1).reshape(-1, 3).astype(np.float64)
    labels = np.concatenate([(masks[r["text"]].reshape(4, 4, 4, 4).mean((1, 3)) >= coverage).ravel() for r in recs])
    return [float(np.corrcoef(acts[:, u], labels)[0, 1]) for u in range(3)]


def test_grid_coverage_changed_under_a_hand_given_version_is_not_served_old_scores(con):
    """Version "1" scored with coverage 0.5; version "2" labelled (the labels of "1" are deleted);
    version "1" back with coverage 0.25: the store's meaning check passes (no labels of "1" are
    left) and the labels are computed with the new coverage, but the query cache, keyed by name
    and version only, served the scores of coverage 0.5. Now the query scans, and its scores are
    numpy's over the new cells; asked again, it is served from the cache."""
    recs = scenes.scene_records(6, seed=7, size=16)
    masks = _scene_masks(recs)
    dbd.register_model(con, "conv19", ImageAdapter(_Conv(), grid=4, size=16, device="cpu"))
    dbd.add_dataset(con, "sc19", recs)

    def bg(coverage, version):
        register(GridHypothesis("bg19", lambda t: masks[t], "binary", grid=4, coverage=coverage, version=version))

    def scores():
        rows = dbd.inspect(con, "conv19", ["conv"], ["bg19"], "sc19").to_pylist()
        return [r["score"] for r in sorted(rows, key=lambda r: r["unit"])]

    bg(0.5, "1")
    half = scores()
    assert half == pytest.approx(_numpy_grid_corr(recs, masks, 0.5), abs=1e-5)
    bg(0.5, "2")
    dbd.annotate(con, "bg19", "sc19")
    bg(0.25, "1")
    quarter = _numpy_grid_corr(recs, masks, 0.25)
    assert quarter != pytest.approx(half, abs=1e-3)                 # the settings change the scores
    assert scores() == pytest.approx(quarter, abs=1e-5)
    assert _sources(con) == ["model", "model"]
    assert scores() == pytest.approx(quarter, abs=1e-5)             # the same meaning again: cached
    assert _sources(con) == ["model", "model", "cache"]


def _cls(cats, version):
    """A categorical hypothesis over TEXTS: digits vs every other character, named by ``cats``."""
    return register(Hypothesis("cls19", lambda t: [cats[0] if c.isdigit() else cats[1] for c in t], "categorical",
                               categories=cats, version=version))


@pytest.fixture
def planted19(planted):
    dbd.add_dataset(planted, "few19", TEXTS[:8])
    return planted


def _numpy_digit_corr() -> dict[int, float]:
    """Pearson r (numpy) of each planted unit against the digit indicator over TEXTS[:8]."""
    x, y, rec = planted_per_record(["digit"])
    keep = rec < 8
    x, y = x[keep].astype(np.float64), y[keep, 0]
    return {u: float(np.corrcoef(x[:, u], y)[0, 1]) for u in range(x.shape[1]) if np.ptp(x[:, u]) > 1e-9}


def test_categories_renamed_under_a_hand_given_version_are_not_served_old_rows(planted19):
    """Categories renamed under the same version (after the labels of that version were dropped
    by labelling another one) were served the cached rows of the old names: 'cls19=digit' for a
    hypothesis whose categories are now 'num' and 'rest'."""
    con = planted19
    _cls(["digit", "other"], "1")
    first = dbd.inspect(con, "planted", ["planted"], ["cls19"], "few19").to_pylist()
    assert {r["hypothesis"] for r in first} == {"cls19=digit", "cls19=other"}
    _cls(["digit", "other"], "2")
    dbd.annotate(con, "cls19", "few19")
    _cls(["num", "rest"], "1")
    rows = dbd.inspect(con, "planted", ["planted"], ["cls19"], "few19").to_pylist()
    assert {r["hypothesis"] for r in rows} == {"cls19=num", "cls19=rest"}
    want = _numpy_digit_corr()
    got = {r["unit"]: r["score"] for r in rows if r["hypothesis"] == "cls19=num" and r["score"] is not None}
    assert set(got) == set(want)
    for u, r in want.items():
        assert got[u] == pytest.approx(r, abs=1e-5)
    assert _sources(con) == ["model", "model"]


def test_a_cached_query_of_an_earlier_version_is_still_served(planted19):
    """A store written before queries recorded their hypotheses' meaning keeps its cached scores
    (nothing tells that the meaning changed); once a later scan of the same fingerprint records
    another meaning, those older queries are no longer served: which meaning they had is not
    known."""
    con = planted19
    _cls(["digit", "other"], "1")
    dbd.inspect(con, "planted", ["planted"], ["cls19"], "few19")
    assert "hypothesis_meanings" in json.loads(con.sql("SELECT params FROM queries").fetchall()[0][0])
    con.execute("UPDATE queries SET params = json_object('fingerprint', json_extract_string(params, '$.fingerprint'), "
                "'models', json_extract(params, '$.models'))")                # as a store written before
    dbd.inspect(con, "planted", ["planted"], ["cls19"], "few19")
    assert _sources(con) == ["model", "cache"]
    _cls(["digit", "other"], "2")
    dbd.annotate(con, "cls19", "few19")
    _cls(["num", "rest"], "1")
    # (served the old store's query, which records no meaning, it would name digit and other: scanned)
    rows = dbd.inspect(con, "planted", ["planted"], ["cls19"], "few19", reuse=False).to_pylist()
    assert {r["hypothesis"] for r in rows} == {"cls19=num", "cls19=rest"}
    assert _sources(con) == ["model", "cache", "model"]
    _cls(["digit", "other"], "3")
    dbd.annotate(con, "cls19", "few19")
    _cls(["digit", "other"], "1")
    # the scans of "1" as (digit, other): one recorded no meaning, and a later one records another
    rows = dbd.inspect(con, "planted", ["planted"], ["cls19"], "few19").to_pylist()
    assert {r["hypothesis"] for r in rows} == {"cls19=digit", "cls19=other"}
    assert _sources(con) == ["model", "cache", "model", "model"]


# -- 2. None, empty and non-string names in the library's lists -------------------------------------
@pytest.mark.parametrize("call, pattern", [
    (lambda c: dbd.annotate(c, ["digit", None], "snippets"),
     r"^annotate: hypotheses\[1\] is None \(NULL\); give a hypothesis name there or leave it out"),
    (lambda c: dbd.annotate(c, ("digit", " "), "snippets"), r"^annotate: hypotheses\[1\] is the empty name ' '"),
    (lambda c: dbd.annotate(c, [7], "snippets"),
     r"^annotate: hypotheses\[0\] is int 7, not a hypothesis name \(a string\)"),
    (lambda c: dbd.annotate(c, None, "snippets"), r"^annotate: hypotheses is None"),
    (lambda c: dbd.annotate(c, ["digit"], None), r"^annotate: dataset is None \(NULL\); give a dataset name"),
    (lambda c: dbd.inspect(c, "planted", ["planted", None], ["digit"], "snippets"),
     r"^inspect: layers\[1\] is None \(NULL\); give a layer name there.*layers=\['planted', None\]"),
    (lambda c: dbd.inspect(c, "planted", ["planted"], [None, "digit"], "snippets"),
     r"^inspect: hypotheses\[0\] is None"),
    (lambda c: dbd.inspect(c, "planted", ["planted"], ["digit", ""], "snippets"),
     r"^inspect: hypotheses\[1\] is the empty name ''"),
    (lambda c: dbd.inspect(c, "planted", ["planted"], ["digit"], "snippets", measures=["corr", None]),
     r"^inspect: measures\[1\] is None"),
    (lambda c: dbd.inspect(c, ["planted", None], ["planted"], ["digit"], "snippets"), r"^inspect: model\[1\] is None"),
    (lambda c: dbd.inspect(c, "planted", ["planted"], ["digit"], None), r"^inspect: dataset is None"),
    (lambda c: dbd.inspect(c, "planted", ["planted"], ["digit"], 3),
     r"^inspect: dataset is int 3, not a dataset name"),
    (lambda c: dbd.extract(c, "planted", [None], "snippets"), r"^extract: layers\[0\] is None"),
    (lambda c: dbd.extract(c, None, ["planted"], "snippets"), r"^extract: model is None"),
    (lambda c: dbd.drop_dataset(c, None), r"^drop_dataset: name is None"),
    (lambda c: dbd.export(c, None), r"^export: out_dir is None; give the path of a folder"),
    (lambda c: dbd.export(c, ""), r"^export: out_dir is ''"),
])
def test_a_none_or_empty_name_in_a_list_is_named_with_its_place(planted, call, pattern):
    """['digit', None] (SQL's ['digit', NULL]) was refused as "unknown hypothesis None; valid
    hypotheses: ...", a name the store lacks; annotate(None) and export(None) failed with a
    TypeError, export('') wrote into the current folder. Now each names the None (NULL), empty
    or non-string value and its place in the list, and nothing is stored."""
    from conftest import snapshot
    before = snapshot(planted)
    with pytest.raises(DeepBaseError, match=pattern):
        call(planted)
    assert snapshot(planted) == before


def test_names_the_checks_let_through_still_work(planted):
    """Hypothesis objects in the list, a set of layers and the default measures (None) pass the
    checks as before, and the engine's own answer to no layers stays."""
    from deepbase_duck.hypotheses.core import get_hypothesis
    t = dbd.inspect(planted, "planted", {"planted"}, [get_hypothesis("digit")], "snippets", measures=None)
    assert t.num_rows == 5 and set(t.column("measure").to_pylist()) == {"corr"}
    assert [o["hypothesis"] for o in dbd.annotate(planted, (get_hypothesis("digit"),), "snippets")] == ["digit"]
    with pytest.raises(DeepBaseError, match="no layers given for model 'planted'; its layers"):
        dbd.inspect(planted, "planted", None, ["digit"], "snippets")


def test_connect_refuses_an_empty_path_and_threads_that_are_no_count(tmp_path, monkeypatch):
    """connect('') opened DuckDB in memory but wrote the activations to '<current folder>.acts'
    beside the current folder, left there after close; threads=0 fell through to DuckDB's default
    (every core), 2.5 ran two threads and -1 failed with DuckDB's "Syntax Error". Now each is
    refused by name before anything is written; a whole number of threads is kept."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(DeepBaseError, match=r"^connect: path is ''; give the path of a store file, or None"):
        dbd.connect("", progress=False)
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(DeepBaseError, match=r"^connect: threads must be an integer >= 1, got .*or None"):
            dbd.connect(None, threads=bad, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and not any(work.iterdir())
    con = dbd.connect(str(tmp_path / "s.duckdb"), threads=2.0, progress=False)
    try:
        assert con.sql("SELECT current_setting('threads')").fetchall()[0][0] == 2
    finally:
        dbd.close(con)

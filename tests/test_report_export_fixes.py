"""Reports, exports, progress bars and the catalog's errors: what a bug hunt found (each test
fails without its fix). Tiny data: the planted character model of conftest.py and a planted
convolutional image model over a few generated scenes."""
from __future__ import annotations

import io
import json
import re
import shutil
import sys

import duckdb
import numpy as np
import pytest
import torch
from conftest import TEXTS, planted_adapter, snapshot

import deepbase_duck as dbd
from deepbase_duck import Hypothesis
from deepbase_duck.catalog import session_of
from deepbase_duck.corpora import scenes
from deepbase_duck.errors import DeepBaseError
from deepbase_duck.extraction.image_adapter import ImageAdapter
from deepbase_duck.hypotheses.grid import concept_hypotheses
from deepbase_duck.reports import images

pytestmark = pytest.mark.usefixtures("one_thread")

OTHER_TEXTS = ["zzq = 11 + 22\n", "qq = [9, 8]\n", "rr = (7)\n", "# 5 and 6\n", "ww = 'x3'\n", "vv = {4: 0}\n",
               "uu = 1\n", "tt = 2\n"]


def edited_adapter():
    """The planted model with other weights in its 'mix' layer."""
    a = planted_adapter()
    with torch.no_grad():
        a.module.mix[0].weight.mul_(-3)
    return a


def coloured_records(doc: str) -> list[str]:
    return re.findall(r'<div class="meta">(record \d+, peak [-\d.]+)', doc)


def activations_section(doc: str) -> str:
    return doc[doc.index('<section id="activations">'):doc.index("</section>", doc.index('<section id="activations">'))]


# -- image stores ----------------------------------------------------------------------------------
# the planted convolution of test_vision (units: 0 red pixels, 1 green pixels, 2 a fixed random
# filter, at the grid's resolution)
from test_vision import G, PlantedConv as Conv  # noqa: E402


def image_store(con, n=5, seed=0):
    dbd.register_model(con, "conv", ImageAdapter(Conv(), grid=G, name="conv", device="cpu"))
    dbd.add_dataset(con, "scenes", scenes.scene_records(n, seed=seed))
    concept_hypotheses(["colour:red", "colour:green"], grid=G)
    return con


def ranking(con, unit, k=5):
    return [(t["record_id"], round(t["max_activation"], 6)) for t in images.top_images(con, "conv", "units", unit,
                                                                                        "scenes", k=k)]


def fresh_ranking(con, unit, k=5):
    session_of(con).__dict__.pop("_unit_maxima", None)
    return ranking(con, unit, k)


# 1 ------------------------------------------------------------------------------------------------
def test_top_images_follow_the_dataset_replaced_dropped_or_edited(con):
    """The session's image maxima are keyed by the records' texts: after add_dataset(replace=True),
    drop + add, or an in-place UPDATE, the new images are ranked, never the old maxima."""
    image_store(con, n=5, seed=0)
    before = ranking(con, 2)
    dbd.add_dataset(con, "scenes", scenes.scene_records(5, seed=300), replace=True)
    after = ranking(con, 2)
    assert after == fresh_ranking(con, 2) and after != before
    dbd.drop_dataset(con, "scenes")
    dbd.add_dataset(con, "scenes", scenes.scene_records(5, seed=0))
    assert ranking(con, 2) == before == fresh_ranking(con, 2)
    other = scenes.scene_records(1, seed=900)[0]["text"]
    con.execute("UPDATE records SET text = ? WHERE dataset = 'scenes' AND record_id = 0", [other])
    with pytest.warns(UserWarning, match="changed since it was stored"):
        edited = ranking(con, 2)
    assert edited == fresh_ranking(con, 2) and edited != before


# 2 ------------------------------------------------------------------------------------------------
def test_report_of_an_earlier_query_shows_the_weights_it_scored(tmp_path, con):
    """Queries record each model's checksum and tokenisation and the dataset's text hash; a report
    of an earlier query colours records from the weights that query scored, or says they are gone
    instead of showing the current weights' activations."""
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    dbd.inspect(con, "planted", ["mix"], ["digit"], "snippets")                       # query 1: not stored
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", keep_activations=True)   # query 2: stored
    want = con.sql("SELECT checksum, tokenization FROM models WHERE name = 'planted'").fetchall()[0]
    dbd.report(con, str(tmp_path / "b.html"), query_id=2)
    before = coloured_records((tmp_path / "b.html").read_text())
    assert before
    dbd.register_model(con, "planted", edited_adapter())         # the name now holds other weights
    dbd.extract(con, "planted", ["mix", "planted"], "snippets")  # ... whose activations are stored
    r1 = dbd.report(con, str(tmp_path / "q1.html"), query_id=1)
    doc = (tmp_path / "q1.html").read_text()
    assert r1["units_with_text"] == 0 and r1["missing_activations"] == ["planted:mix"]
    assert "was registered again since query 1" in doc and not coloured_records(doc)
    assert "deepbase-duck extract" not in activations_section(doc)   # extracting now would store other weights
    # the weights query 2 scored are still stored (by checksum): its report shows them, as before
    r2 = dbd.report(con, str(tmp_path / "q2.html"), query_id=2)
    assert r2["units_with_text"] >= 1 and coloured_records((tmp_path / "q2.html").read_text()) == before
    params = json.loads(con.sql("SELECT params FROM queries WHERE query_id = 1").fetchall()[0][0])
    assert params["checksums"] == [want[0]] and params["tokenizations"] == [want[1]]
    assert params["dataset_records"] == 8 and len(params["dataset_md5"]) == 32


def test_report_of_a_query_whose_dataset_was_replaced_or_dropped(tmp_path, con):
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", keep_activations=True)
    dbd.drop_dataset(con, "snippets")
    r = dbd.report(con, str(tmp_path / "a.html"), query_id=1)
    doc = (tmp_path / "a.html").read_text()
    assert "was dropped since query 1" in doc and "deepbase-duck extract" not in doc and r["units_with_text"] == 0
    dbd.add_dataset(con, "snippets", OTHER_TEXTS)
    dbd.extract(con, "planted", ["planted"], "snippets")
    r = dbd.report(con, str(tmp_path / "b.html"), query_id=1)
    doc = (tmp_path / "b.html").read_text()
    assert r["units_with_text"] == 0 and not coloured_records(doc)
    assert "were replaced or edited since query 1" in doc and "zzq" not in doc
    # records appended after the query leave its records as they were
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets")              # query 2, on OTHER_TEXTS
    dbd.add_dataset(con, "snippets", OTHER_TEXTS + ["extra = 42\n"])
    dbd.extract(con, "planted", ["planted"], "snippets")
    assert dbd.report(con, str(tmp_path / "c.html"), query_id=2)["units_with_text"] >= 1


def test_report_of_an_old_query_without_recorded_provenance(tmp_path, con):
    """A query from before checksums were recorded: a dataset created after it is refused; a model
    registered again after it gets a note."""
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", keep_activations=True)
    params = json.loads(con.sql("SELECT params FROM queries").fetchall()[0][0])
    for k in ("checksums", "tokenizations", "dataset_records", "dataset_md5"):
        params.pop(k, None)
    con.execute("UPDATE queries SET params = ?, started_at = started_at - INTERVAL 1 HOUR", [json.dumps(params)])
    con.execute("UPDATE datasets SET created_at = current_timestamp - INTERVAL 2 HOUR")
    con.execute("UPDATE models SET registered_at = current_timestamp - INTERVAL 2 HOUR")
    assert dbd.report(con, str(tmp_path / "a.html"))["units_with_text"] == 1
    assert "registered again" not in (tmp_path / "a.html").read_text()
    con.execute("UPDATE models SET registered_at = current_timestamp")
    assert dbd.report(con, str(tmp_path / "b.html"))["units_with_text"] == 1
    assert "did not record its weights&#x27; checksum" in (tmp_path / "b.html").read_text()
    con.execute("UPDATE datasets SET created_at = current_timestamp")
    assert dbd.report(con, str(tmp_path / "c.html"))["units_with_text"] == 0
    assert "dropped and added again" in (tmp_path / "c.html").read_text()
    # the same query again is a cache hit: the new query records what it stands for now
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets")
    source, params = con.sql("SELECT source, params FROM queries WHERE query_id = 2").fetchall()[0]
    want = con.sql("SELECT checksum FROM models").fetchall()[0][0]
    assert source == "cache" and json.loads(params)["checksums"] == [want]
    assert dbd.report(con, str(tmp_path / "d.html"))["units_with_text"] == 1


# 3 ------------------------------------------------------------------------------------------------
def test_export_holds_the_activations_of_every_name_of_the_same_weights(tmp_path, con):
    dbd.register_model(con, "a", planted_adapter())
    dbd.register_model(con, "b", planted_adapter())          # the same weights under another name
    dbd.add_dataset(con, "snippets", TEXTS[:4])
    dbd.extract(con, "a", ["planted"], "snippets")
    assert dbd.extract(con, "b", ["planted"], "snippets")[0]["extracted"] == 0     # shared, not stored twice
    written = dbd.export(con, str(tmp_path / "out"), activations=True)
    side = duckdb.connect(written["duckdb"], read_only=True)
    rows = side.sql("SELECT model, count(*) FROM activations GROUP BY ALL ORDER BY ALL").fetchall()
    side.close()
    assert rows == [("a", rows[0][1]), ("b", rows[0][1])] and rows[0][1] > 0
    dbd.register_model(con, "a", edited_adapter())           # 'a' now other weights: 'b' keeps its own
    written = dbd.export(con, str(tmp_path / "out"), activations=True, overwrite=True)
    side = duckdb.connect(written["duckdb"], read_only=True)
    assert side.sql("SELECT DISTINCT model FROM activations").fetchall() == [("b",)]
    side.close()


# 4 ------------------------------------------------------------------------------------------------
def test_report_and_export_after_activation_folders_were_deleted_by_hand(tmp_path):
    db = str(tmp_path / "s.duckdb")
    con = dbd.connect(db, progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:6])
    dbd.inspect(con, "planted", ["planted", "mix"], ["digit"], "snippets", keep_activations=True)
    dbd.close(con)
    for d in (tmp_path / "s.duckdb.acts").iterdir():
        shutil.rmtree(d)
    con = dbd.connect(db, progress=False)
    try:
        # the views of the deleted folders are dropped when the store opens
        assert con.sql("SELECT count(*) FROM duckdb_views() WHERE view_name LIKE 'behavior_%'").fetchall() == [(0,)]
        dbd.register_model(con, "planted", planted_adapter())
        with pytest.warns(UserWarning, match="part files are missing"):
            r = dbd.report(con, str(tmp_path / "r.html"))
        assert r["units_with_text"] == 0 and r["missing_activations"]
        assert "are not stored" in (tmp_path / "r.html").read_text()
        with pytest.warns(UserWarning, match="part files are missing"):    # the layer the report did not read
            dbd.extract(con, "planted", ["planted", "mix"], "snippets")
        assert dbd.report(con, str(tmp_path / "r2.html"))["units_with_text"] == 1
        for d in (tmp_path / "s.duckdb.acts").iterdir():        # now while the store is open: the views stay
            shutil.rmtree(d)
        with pytest.warns(UserWarning, match="part files are missing"):
            r = dbd.report(con, str(tmp_path / "r3.html"))
        assert r["units_with_text"] == 0 and r["missing_activations"]
        with pytest.warns(UserWarning, match="part files are missing"):    # the other layer's
            dbd.extract(con, "planted", ["planted", "mix"], "snippets")
        shutil.rmtree(next((tmp_path / "s.duckdb.acts").glob("*-planted-planted-*")))    # one layer's
        with pytest.warns(UserWarning, match="part files are missing"):
            written = dbd.export(con, str(tmp_path / "out"), activations=True)
        assert "layer 'planted' on dataset 'snippets' were left out: their files are gone" in written["notes"]
        side = duckdb.connect(written["duckdb"], read_only=True)
        assert side.sql("SELECT DISTINCT layer FROM activations").fetchall() == [("mix",)]
        assert side.sql("SELECT count(*) FROM scores").fetchall()[0][0] > 0
        side.close()
        shutil.rmtree(next((tmp_path / "s.duckdb.acts").glob("*-planted-mix-*")))      # and the other
        with pytest.warns(UserWarning, match="part files are missing"):
            written = dbd.export(con, str(tmp_path / "out"), activations=True, overwrite=True)
        assert "activations" not in written and "layer 'mix' on dataset 'snippets' were left out" in written["notes"]
    finally:
        dbd.close(con)


# 8 ------------------------------------------------------------------------------------------------
def test_image_figures_carry_the_reported_querys_iou(tmp_path, con, monkeypatch):
    """The images section of query 1's report titles and outlines each unit with query 1's own
    Network Dissection result, not a later query's."""
    image_store(con)
    dbd.inspect(con, "conv", ["units"], ["colour:red"], "scenes", measures=["iou"], iou={"quantile": 0.05})
    dbd.inspect(con, "conv", ["units"], ["colour:green"], "scenes", measures=["iou"], iou={"quantile": 0.2})
    seen = []
    real = images.unit_dissection
    monkeypatch.setattr(images, "unit_dissection", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    dbd.report(con, str(tmp_path / "q1.html"), query_id=1, top_units=1, records_per_unit=2)
    top = con.sql("SELECT unit FROM scores WHERE query_id = 1 ORDER BY abs(score) DESC NULLS LAST, unit LIMIT 1"
                  ).fetchall()[0][0]
    own = con.sql("SELECT hypothesis, score, (detail::JSON->>'threshold')::DOUBLE FROM scores WHERE query_id = 1 "
                  "AND unit = ? ORDER BY score DESC NULLS LAST LIMIT 1", params=[top]).fetchall()[0]
    assert own[1] > 0.5                           # the planted red unit
    assert [(d["concept"], d["iou"], d["threshold"]) for d in seen] == [(own[0], own[1], pytest.approx(own[2]))]
    assert images.unit_dissection(con, "conv", "units", top, "scenes")["concept"] == "colour:green"   # the latest


# 5 ------------------------------------------------------------------------------------------------
def test_image_report_in_a_session_without_the_live_model(tmp_path):
    """The image model was registered as a live object in another session: the report is written,
    with a note in place of the images (only they need the model)."""
    db = str(tmp_path / "v.duckdb")
    con = image_store(dbd.connect(db, progress=False))
    dbd.inspect(con, "conv", ["units"], ["colour:red"], "scenes", measures=["iou"], iou={"quantile": 0.05})
    dbd.close(con)
    con = dbd.connect(db, progress=False)
    try:
        r = dbd.report(con, str(tmp_path / "v.html"), top_units=1, records_per_unit=2)
        doc = (tmp_path / "v.html").read_text()
        assert r["sections"][-1] == "images" and r["figures"] >= 2 and '<section id="heatmap">' in doc
        section = doc[doc.index('<section id="images">'):]
        assert "Top images of conv's units are not shown" in section and "live Python object" in section
        assert "<img " not in section
    finally:
        dbd.close(con)
    r = run_cli("report", db, "--out", str(tmp_path / "cli.html"))
    assert r.returncode == 0, r.stderr
    assert "live Python object" in (tmp_path / "cli.html").read_text()


def run_cli(*args, **kw):
    import os
    import subprocess
    return subprocess.run([sys.executable, "-m", "deepbase_duck", "--quiet", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False, **kw)


# 6 ------------------------------------------------------------------------------------------------
class Sink:
    """A stream with write and flush only (no isatty)."""

    def write(self, s):
        return len(s)

    def flush(self):
        pass


@pytest.mark.parametrize("stream", ["none", "closed", "no-isatty", "isatty-fails"])
@pytest.mark.parametrize("forced", [False, True])
def test_progress_bars_without_a_usable_stderr(monkeypatch, stream, forced):
    from deepbase_duck.progress import progress_bar
    if forced:
        monkeypatch.setenv("DEEPBASE_DUCK_PROGRESS", "1")
    else:
        monkeypatch.delenv("DEEPBASE_DUCK_PROGRESS", raising=False)
    if stream == "none":
        err = None
    elif stream == "closed":
        err = io.StringIO()
        err.close()
    elif stream == "no-isatty":
        err = Sink()
    else:
        err = Sink()
        err.isatty = lambda: (_ for _ in ()).throw(ValueError("I/O operation on closed file"))
    monkeypatch.setattr(sys, "stderr", err)
    bar = progress_bar(3, "test", "rec", True)
    bar.update(2)
    bar.close()


def test_inspect_with_progress_and_no_stderr(monkeypatch, tmp_path):
    con = dbd.connect(None, progress=True)
    try:
        dbd.register_model(con, "planted", planted_adapter())
        dbd.add_dataset(con, "snippets", TEXTS[:3])
        monkeypatch.setattr(sys, "stderr", None)
        assert dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets").num_rows == 5
    finally:
        monkeypatch.undo()
        dbd.close(con)


# 7 ------------------------------------------------------------------------------------------------
def test_overwrite_keeps_the_earlier_export_when_it_is_open_or_the_new_one_fails(tmp_path, planted, monkeypatch):
    from deepbase_duck import exports
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets")
    out = tmp_path / "out"
    dbd.export(planted, str(out))
    before = sorted(p.name for p in out.iterdir())
    reader = duckdb.connect(str(out / "study.duckdb"), read_only=True)
    try:
        with pytest.raises(DeepBaseError, match=r"study\.duckdb is open in this process"):
            dbd.export(planted, str(out), overwrite=True)
        assert sorted(p.name for p in out.iterdir()) == before
        assert reader.sql("SELECT count(*) FROM scores").fetchall() == [(5,)]
    finally:
        reader.close()

    def broken(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(exports, "_write", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        dbd.export(planted, str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]          # nothing left beside it
    monkeypatch.undo()
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", reuse=False)
    written = dbd.export(planted, str(out), overwrite=True)
    side = duckdb.connect(written["duckdb"], read_only=True)
    assert side.sql("SELECT count(*) FROM scores").fetchall() == [(10,)]
    side.close()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# 9 ------------------------------------------------------------------------------------------------
def chartype(text):
    return ["alpha" if c.isalpha() else "digit" if c.isdigit() else "space" if c.isspace() else "punct"
            for c in text]


def test_probe_only_report_ranks_every_hypothesis_by_probe_weight(tmp_path, planted):
    h = Hypothesis("chartype_t", chartype, "categorical", "character class",
                   categories=("alpha", "digit", "space", "punct"))
    dbd.inspect(planted, "planted", ["planted"], [h, "digit"], "snippets", measures=["probe"])
    assert {m for (m,) in planted.sql("SELECT DISTINCT measure FROM scores").fetchall()} >= {
        "probe", "probe_weight", "probe_class_weight"}
    r = dbd.report(planted, str(tmp_path / "p.html"), top_units=1)
    doc = (tmp_path / "p.html").read_text()
    assert r["measure"] == "probe_weight"
    ranked = re.findall(r"<figcaption>([^<:]+): the 1 best unit by \|probe_weight\|", doc)
    assert sorted(ranked) == ["chartype_t", "digit"]
    assert "1 layer &times; 2 hypotheses" in doc
    assert "scored no unit-level affinity measure" in doc      # no heatmap of weight shares


# 10 -----------------------------------------------------------------------------------------------
def test_clear_errors_for_bad_loader_params_and_records(con):
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:3])
    was = snapshot(con)
    spec = "deepbase_duck.models.zoo:charlstm"
    with pytest.raises(DeepBaseError, match=r"model 'planted': loader 'deepbase_duck\.models\.zoo:charlstm' failed "
                                            r"with params \{\"bogus\": 1\}: TypeError"):
        dbd.register_model(con, "planted", spec, {"bogus": 1})
    with pytest.raises(DeepBaseError, match=r"failed with params \{\"checkpoint\": \"nope\"\}: ValueError"):
        dbd.register_model(con, "planted", spec, {"checkpoint": "nope"})
    with pytest.raises(DeepBaseError, match="empty module name"):
        dbd.register_model(con, "planted", ":charlstm")
    with pytest.raises(DeepBaseError, match="empty function name"):
        dbd.register_model(con, "planted", "deepbase_duck.models.zoo:")
    with pytest.raises(duckdb.Error, match="model 'x': loader .* failed with params"):
        con.sql(f"""SELECT register_model('x', '{spec}', '{{"bogus": 1}}')""").fetchall()
    for bad in (None, 42, {"text": "a"}):
        with pytest.raises(DeepBaseError, match=r"dataset 'snippets': records must be a list of texts"):
            dbd.add_dataset(con, "snippets", bad, replace=True)
    assert snapshot(con) == was
    assert con.sql("SELECT checksum FROM models").fetchall() == [(session_of(con).adapters["planted"].checksum,)]


# 11 -----------------------------------------------------------------------------------------------
NO_COMMENT = ["x = 1\n", "y = (2)\n", "z = x + y\n", "w = [3, 4]\n"]


def test_report_ranks_by_a_measure_that_has_scores(tmp_path, con):
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "nc", NO_COMMENT)
    dbd.inspect(con, "planted", ["planted"], ["in_comment"], "nc", measures=["corr"])           # every corr NULL
    assert con.sql("SELECT count(score) FROM scores").fetchall() == [(0,)]
    r = dbd.report(con, str(tmp_path / "a.html"))
    doc = (tmp_path / "a.html").read_text()
    assert r["figures"] == 0 and "Every score of this query's corr is NULL" in doc
    assert "Every corr score of this query is NULL" in doc
    heat = doc[doc.index('<section id="heatmap">'):doc.index('<section id="hypotheses">')]
    assert "<img" not in heat
    dbd.inspect(con, "planted", ["planted"], ["in_comment"], "nc", measures=["corr", "iou"])
    assert con.sql("SELECT count(score) FROM scores WHERE query_id = 2 AND measure = 'iou'").fetchall()[0][0] > 0
    r = dbd.report(con, str(tmp_path / "b.html"))
    doc = (tmp_path / "b.html").read_text()
    assert r["measure"] == "iou" and r["figures"] >= 2
    assert "<h3>Best unit per hypothesis (by |iou|)</h3>" in doc


# 12 -----------------------------------------------------------------------------------------------
def test_export_with_no_stored_activations_says_so(tmp_path, planted):
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets")
    written = dbd.export(planted, str(tmp_path / "out"), activations=True)
    assert "activations" not in written and "no activations were exported" in written["notes"]
    side = duckdb.connect(written["duckdb"], read_only=True)
    assert side.sql("SELECT count(*) FROM duckdb_views() WHERE view_name = 'activations'").fetchall() == [(0,)]
    side.close()
    assert "notes" not in dbd.export(planted, str(tmp_path / "out2"))            # none asked for: nothing to say

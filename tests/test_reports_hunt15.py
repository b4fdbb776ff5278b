"""Reports and BI exports: what a bug hunt found (each test fails without its fix). Tiny data:
the planted character model of conftest.py and the planted convolution of test_vision.py over a
few generated scenes."""
from __future__ import annotations

import html as htmllib
import json
import re

import duckdb
import polars as pl
import pyarrow.dataset as pds
import pytest
import torch
from conftest import TEXTS, planted_adapter

import deepbase_duck as dbd
from deepbase_duck import Hypothesis
from deepbase_duck.reports import build, data, figures

pytestmark = pytest.mark.usefixtures("one_thread")

NO_COMMENT = ["x = 1\n", "y = (2)\n", "z = x + y\n", "w = [3, 4]\n"]


def facts(doc: str) -> dict:
    """The summary's (name, value) facts, unescaped."""
    table = doc[doc.index('<table class="facts">'):]
    table = table[:table.index("</table>")]
    return {htmllib.unescape(k): htmllib.unescape(v) for k, v in re.findall(r"<th>([^<]*)</th><td>([^<]*)</td>", table)}


def section(doc: str, sid: str) -> str:
    start = doc.index(f'<section id="{sid}">')
    return doc[start:doc.index("</section>", start)]


# 1 -----------------------------------------------------------------------------------------------
def test_summary_says_how_an_early_stopped_scan_ended_and_shows_every_setting(tmp_path, con):
    """Before: the settings were cut at 400 characters, which lost stopped_early, stop_rule and the
    seed of every early-stopped query (they sort after 'reused'), and a setting of 0 (seed 0) was
    dropped as if unset: the report never said the scan stopped early."""
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS * 4)
    dbd.inspect(con, "planted", ["planted", "mix"], ["digit"], "snippets", ["corr"], max_error=0.5, seed=0,
                batch_size=2)
    params = json.loads(con.sql("SELECT params FROM queries").fetchall()[0][0])
    assert params["stopped_early"] and params["records_used"] < params["record_count"] == 96
    dbd.report(con, str(tmp_path / "r.html"))
    got = facts((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert got["scan"] == (f"stopped early (max_error) after {params['records_used']} of 96 records; largest "
                           f"error bound {params['bound_reached']:.3f}; max_error 0.5, seed 0")
    shown = json.loads(got["settings"])                     # whole, so it parses
    assert shown["seed"] == 0 and shown["stop_rule"] == "max_error" and shown["stopped_early"] is True
    assert shown == {k: v for k, v in params.items() if v not in (None, False, {}, [])
                     and k not in build.PROVENANCE_KEYS} | {"seed": 0, "baseline_seed": 0}
    # a full scan with a rule that never held says so; a query without a rule has no such row
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", ["corr"], max_error=1e-6, seed=3)
    dbd.report(con, str(tmp_path / "full.html"))
    assert facts((tmp_path / "full.html").read_text(encoding="utf-8"))["scan"].startswith(
        "every record was read (96 of 96; the stop rule held at no earlier window), so the scores and intervals "
        "are the full scan's, whose largest half-width is ")
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", ["corr"])
    dbd.report(con, str(tmp_path / "plain.html"))
    assert "scan" not in facts((tmp_path / "plain.html").read_text(encoding="utf-8"))


# 2 -----------------------------------------------------------------------------------------------
def test_names_with_dollar_signs_are_drawn_literally(tmp_path, con):
    """Before: matplotlib typeset a name holding two '$' as mathtext, and a report with a
    hypothesis named 'price $\\frac$' failed with a mathtext ValueError."""
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    h = Hypothesis("price $\\frac$", lambda t: [(i, i + 1) for i, c in enumerate(t) if c.isdigit()], "binary", "x")
    dbd.inspect(con, "planted", ["planted"], [h], "snippets", ["corr", "probe"])
    r = dbd.report(con, str(tmp_path / "r.html"))
    assert r["figures"] == 3
    assert "price $\\frac$: the 4 best units" in (tmp_path / "r.html").read_text(encoding="utf-8")
    from matplotlib.text import Text
    label = Text(text=figures.plain("between $x$ and $y$"))
    assert label._preprocess_math(label.get_text()) == ("between $x$ and $y$", False)   # plain text, as written


# 3 -----------------------------------------------------------------------------------------------
def test_checkpoints_are_reported_in_the_querys_order(tmp_path, con):
    """Before: the report sorted a query's models by name, so checkpoints early, mid, final came out
    as early, final, mid in the summary, the heatmap rows and the probe plot's x axis."""
    for name, k in [("early", 0.1), ("mid", 0.5), ("final", 1.0)]:
        a = planted_adapter()
        with torch.no_grad():
            a.module.mix[0].weight.mul_(k)
        dbd.register_model(con, name, a)
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    dbd.inspect(con, ["early", "mid", "final"], ["mix"], ["digit"], "snippets", ["corr", "probe"], baseline=True)
    q = data.select_query(con)
    assert q.models[:3] == ["early", "mid", "final"] and q.models[3:] == ["early~untrained"]   # one untrained twin
    dbd.report(con, str(tmp_path / "r.html"))
    doc = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert facts(doc)["model"] == ", ".join(q.models)
    probes = re.findall(r"<tr><td>digit</td><td>([^<]+):mix</td>", section(doc, "probes"))
    assert probes == q.models


# 4 -----------------------------------------------------------------------------------------------
def test_an_image_dataset_is_not_coloured_as_text(tmp_path, con):
    """Before: the 'Top-activating records' section coloured each scene's JSON descriptor one
    character per grid cell ('peak 1.0 at character 88'), which shows nothing of the image."""
    from test_report_export_fixes import image_store
    image_store(con, n=4)
    dbd.inspect(con, "conv", ["units"], ["colour:red"], "scenes", measures=["iou", "corr"], keep_activations=True)
    r = dbd.report(con, str(tmp_path / "v.html"), top_units=1, records_per_unit=2)
    doc = (tmp_path / "v.html").read_text(encoding="utf-8")
    acts = section(doc, "activations")
    assert '<pre class="acts">' not in acts and "peak" not in acts and "are images" in acts
    assert r["units_with_text"] == 0 and r["missing_activations"] == []
    assert r["sections"][-1] == "images" and section(doc, "images").count("<img ") == 1


# 5 -----------------------------------------------------------------------------------------------
def test_hypotheses_whose_every_score_is_null_are_named(tmp_path, con):
    """Before: a hypothesis with only NULL scores (in_comment on code without comments) vanished
    from the summary's best units, the heatmap and the ranked units, with nothing said."""
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "nc", NO_COMMENT)
    dbd.inspect(con, "planted", ["planted"], ["digit", "in_comment"], "nc", measures=["corr"])
    dbd.report(con, str(tmp_path / "r.html"))
    doc = (tmp_path / "r.html").read_text(encoding="utf-8")
    for sid, what in [("summary", "ranked"), ("heatmap", "mapped"), ("hypotheses", "ranked")]:
        assert f"in_comment: every corr score is NULL" in section(doc, sid), sid
        assert f"so it is not {what} here" in section(doc, sid), sid
    assert "digit: every" not in doc


# 6 -----------------------------------------------------------------------------------------------
def test_heatmap_cells_keep_small_scores(monkeypatch):
    """Before: every cell was written with 2 decimals, so an IoU or a mutual information of 0.0042
    read '0.00', as if the best unit scored nothing."""
    from matplotlib.axes import Axes
    drawn = []
    real = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, *a, **k: drawn.append(s) or real(self, x, y, s, *a, **k))
    cells = [("iou", "m", "l0", "a", 0.0042), ("iou", "m", "l0", "b", 0.31), ("iou", "m", "l1", "a", 0.0),
             ("iou", "m", "l1", "b", -0.00031)]
    figures.heatmap(cells, ["iou"], [("m", "l0"), ("m", "l1")], ["a", "b"], ["m"])
    assert drawn == ["0.0042", "0.31", "0.00", "-0.00031"]


# 7 -----------------------------------------------------------------------------------------------
def test_probe_hint_quotes_names_with_spaces(tmp_path, con):
    """Before: the command suggested when a query trained no probes left a model or dataset name
    with a space unquoted, so it could not be run as shown."""
    dbd.register_model(con, "my model", planted_adapter())
    dbd.add_dataset(con, "my data", TEXTS[:4])
    dbd.inspect(con, "my model", ["planted"], ["digit"], "my data", ["corr"])
    dbd.report(con, str(tmp_path / "r.html"))
    probes = section((tmp_path / "r.html").read_text(encoding="utf-8"), "probes")
    hint = re.search(r"<code>(deepbase-duck inspect [^<]+)</code>", probes)
    assert htmllib.unescape(hint.group(1)).startswith("deepbase-duck inspect STORE 'my model' 'my data' --layers")


# 8 -----------------------------------------------------------------------------------------------
def test_export_of_a_store_without_scores_keeps_the_scores_folder(tmp_path, con):
    """Before: a store without scores was exported as scores.parquet, not scores/, so a reader of
    out/scores (pyarrow.dataset, polars, read_parquet('out/scores/**/*.parquet')) failed with no
    such file; the folder now holds one empty file with the store's columns."""
    want = [(c, t) for c, t, *_ in con.sql("DESCRIBE scores").fetchall()]
    out = tmp_path / "out"
    written = dbd.export(con, str(out))
    t = pds.dataset(out / "scores", format="parquet", partitioning="hive").to_table()
    assert t.num_rows == 0 and t.column_names == [c for c, _ in want]
    assert pl.scan_parquet(str(out / "scores" / "**" / "*.parquet"), hive_partitioning=True).collect().height == 0
    side = duckdb.connect(written["duckdb"], read_only=True)
    try:
        assert [(c, t) for c, t, *_ in side.sql("DESCRIBE scores").fetchall()] == want
        assert side.sql("SELECT count(*) FROM top_units(3)").fetchall() == [(0,)]
    finally:
        side.close()
    # an export of scores replaces it, and an export of none replaces that in turn
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:4])
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", ["corr"])
    dbd.export(con, str(out), overwrite=True)
    assert pds.dataset(out / "scores", format="parquet", partitioning="hive").to_table().num_rows == 5
    con.execute("DELETE FROM scores")
    dbd.export(con, str(out), overwrite=True)
    assert pds.dataset(out / "scores", format="parquet", partitioning="hive").to_table().num_rows == 0
    assert sorted(p.name for p in (out / "scores").iterdir()) == ["data_0.parquet"]


# 9 -----------------------------------------------------------------------------------------------
def test_export_folder_with_a_backslash_is_refused_up_front(tmp_path, planted):
    """Before: DuckDB's partitioned writer split the folder 'back\\slash' at the backslash and the
    export failed with its bare 'Failed to create directory .../back/slash/scores/model=planted',
    after making the folder."""
    from deepbase_duck.errors import DeepBaseError
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", ["corr"])
    with pytest.raises(DeepBaseError, match=r"holds a '\\', which DuckDB's Parquet writer takes for a folder"):
        dbd.export(planted, str(tmp_path / "back\\slash"))
    assert list(tmp_path.iterdir()) == []


def test_a_nan_score_is_never_ranked_first(con):
    """DuckDB sorts NaN above every number: a NaN score (inserted by hand or imported) topped the
    report's ranked units and its heatmap cell."""
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets")
    qid = con.sql("SELECT max(query_id) FROM queries").fetchall()[0][0]
    con.execute("UPDATE scores SET score = 'NaN'::DOUBLE WHERE query_id = ? AND unit = 0", [qid])
    q = data.select_query(con, qid)
    ranked = data.top_units(con, q, "corr", 3)
    assert ranked and all(r["unit"] != 0 for r in ranked)
    assert all(cell[4] != 0 for cell in data.best_per_cell(con, q, "corr"))

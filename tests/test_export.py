"""BI export: read back as BI tools would (pyarrow.dataset, polars, SQLAlchemy + duckdb-engine)."""
from __future__ import annotations

import json
import subprocess
import sys

import duckdb
import polars as pl
import pyarrow.dataset as ds
import pytest

import deepbase_duck as dbd

from conftest import TEXTS


@pytest.fixture
def exported(planted, tmp_path):
    dbd.extract(planted, "planted", ["planted"], "snippets", dtype="float16")
    t = dbd.inspect(planted, "planted", ["planted", "mix"], ["digit", "in_string"], "snippets")
    out = tmp_path / "bi"
    written = dbd.export(planted, str(out), activations=True)
    return planted, t, out, written


def test_parquet_reads_in_pyarrow_and_polars(exported):
    con, t, out, written = exported
    scores = ds.dataset(out / "scores", format="parquet", partitioning="hive").to_table()
    assert scores.num_rows == t.num_rows
    assert set(scores.column("layer").to_pylist()) == {"planted", "mix"}
    pl_scores = pl.scan_parquet(str(out / "scores" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert pl_scores.height == t.num_rows
    best = pl_scores.filter((pl.col("hypothesis") == "digit") & (pl.col("layer") == "planted")) \
        .sort("score", descending=True, nulls_last=True).row(0, named=True)
    assert best["unit"] == 0 and best["score"] == pytest.approx(1.0)
    acts = pl.scan_parquet(str(out / "activations" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert acts.height == sum(len(x) for x in TEXTS)
    assert set(acts["layer"].unique().to_list()) == {"planted"}
    assert pl.read_parquet(out / "models.parquet")["name"].to_list() == ["planted"]


BI_SCRIPT = """
import json, sys
import sqlalchemy
engine = sqlalchemy.create_engine("duckdb:///" + sys.argv[1], connect_args={"read_only": True})
with engine.connect() as c:
    insp = sqlalchemy.inspect(c)
    names = sorted(set(insp.get_view_names()) | set(insp.get_table_names()))
    n = c.execute(sqlalchemy.text("SELECT count(*) FROM scores")).scalar()
    top = c.execute(sqlalchemy.text("SELECT unit FROM top_units(1) WHERE hypothesis = 'digit' "
                                    "AND layer = 'planted'")).fetchall()
engine.dispose()
print(json.dumps({"names": names, "n": n, "top": [list(r) for r in top]}))
"""


def test_duckdb_file_reads_through_sqlalchemy(exported):
    """As a BI tool (Superset and other SQLAlchemy clients) would, in its own process."""
    import importlib.util
    if importlib.util.find_spec("duckdb_engine") is None:   # not imported here: it keeps DuckDB objects alive
        pytest.skip("duckdb-engine is not installed (part of the test extra)")
    con, t, out, written = exported
    r = subprocess.run([sys.executable, "-c", BI_SCRIPT, str(out / "study.duckdb")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"scores", "models", "layers", "activations"} <= set(got["names"])
    assert got["n"] == t.num_rows
    assert got["top"] == [[0]]


def test_export_refuses_a_non_empty_folder(exported, tmp_path):
    con, t, out, written = exported
    with pytest.raises(FileExistsError, match="is not empty"):
        dbd.export(con, str(out))
    assert dbd.export(con, str(out), overwrite=True)["scores"].endswith("*.parquet")


def test_export_cli(tmp_path):
    db = str(tmp_path / "s.duckdb")
    con = dbd.connect(db, progress=False)
    from conftest import planted_adapter
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:4])
    dbd.close(con)
    r = subprocess.run([sys.executable, "-m", "deepbase_duck", "export", db, str(tmp_path / "out"), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "study.duckdb" in r.stdout
    r = subprocess.run([sys.executable, "-m", "deepbase_duck", "export", db, str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "is not empty" in r.stderr


def test_overwrite_replaces_only_an_earlier_export(tmp_path):
    """overwrite=True never deletes the store's own folder, nor a folder with other files; it
    replaces an earlier export; the exported file carries labeled_records (stratified_records)."""
    import deepbase_duck as dbd
    from deepbase_duck.errors import DeepBaseError
    from conftest import TEXTS, planted_adapter
    folder = tmp_path / "study"
    folder.mkdir()
    con = dbd.connect(str(folder / "s.duckdb"), progress=False)
    try:
        dbd.register_model(con, "planted", planted_adapter())
        dbd.add_dataset(con, "snippets", TEXTS)
        dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets")
        with pytest.raises(DeepBaseError, match="holds the store"):
            dbd.export(con, str(folder), overwrite=True)
        assert (folder / "s.duckdb").exists()
        other = tmp_path / "other"
        other.mkdir()
        (other / "notes.txt").write_text("mine")
        with pytest.raises(DeepBaseError, match=r"holds files no export writes \(notes.txt\)"):
            dbd.export(con, str(other), overwrite=True)
        assert (other / "notes.txt").read_text() == "mine"
        out = tmp_path / "out"
        dbd.export(con, str(out), text=True)
        written = dbd.export(con, str(out), text=True, overwrite=True)
        assert "labeled_records" in written
    finally:
        dbd.close(con)
    side = duckdb.connect(written["duckdb"], read_only=True)
    try:
        n = side.sql("SELECT count(*) FROM stratified_records('snippets', 'chars-test', 'digit', 2)").fetchall()[0][0]
        assert n == 4
    finally:
        side.close()


def test_exported_activations_hold_one_behavior_per_layer_and_dataset(tmp_path):
    """float32 and float16 copies of a layer, and a layer stored from weights since edited: the
    export holds each symbol once per (model, layer, dataset), from the current weights, float32
    preferred; a folder name with a quote works."""
    import torch
    import deepbase_duck as dbd
    from conftest import planted_adapter
    con = dbd.connect(str(tmp_path / "s.duckdb"), progress=False)
    try:
        dbd.register_model(con, "planted", planted_adapter())
        dbd.add_dataset(con, "snip", TEXTS[:4])
        dbd.extract(con, "planted", ["planted", "mix"], "snip")
        dbd.extract(con, "planted", ["planted"], "snip", dtype="float16")
        edited = planted_adapter()
        with torch.no_grad():
            edited.module.mix[0].weight.mul_(2)
        dbd.register_model(con, "planted", edited)
        new_mix = dbd.extract(con, "planted", ["mix", "planted"], "snip")[0]["view"]
        want = con.sql(f"SELECT sum(act[1]) FROM {new_mix}").fetchall()[0][0]
        out = tmp_path / "it's out"
        written = dbd.export(con, str(out), activations=True)
    finally:
        dbd.close(con)
    side = duckdb.connect(written["duckdb"], read_only=True)
    try:
        rows = side.sql("SELECT layer, count(*), count(DISTINCT (record_id, pos)) FROM activations "
                        "GROUP BY ALL ORDER BY ALL").fetchall()
        assert rows == [("mix", rows[0][1], rows[0][1]), ("planted", rows[1][1], rows[1][1])]
        got = side.sql("SELECT sum(act[1]) FROM activations WHERE layer = 'mix'").fetchall()[0][0]
        assert got == pytest.approx(want, rel=1e-6)          # the edited weights' activations
    finally:
        side.close()

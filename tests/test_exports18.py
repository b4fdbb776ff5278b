"""BI export, handed on: a copied or moved export folder still reads (after one SET VARIABLE
naming its new place), and each Parquet file of the hive-partitioned scores and activations
holds its own model, layer (and dataset), so a BI tool reading one file keeps them."""
from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

import deepbase_duck as dbd

from conftest import TEXTS, planted_adapter

CLI = Path(sys.executable).parent / "duckdb"


def view_rows(db: str, setup: str = "") -> dict:
    """Every view of an export's study.duckdb, its rows in a fixed order (python duckdb)."""
    side = duckdb.connect(db, read_only=True)
    try:
        if setup:
            side.execute(setup)
        names = [n for (n,) in side.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal "
                                        "ORDER BY view_name").fetchall()]
        return {n: side.sql(f"SELECT * FROM {n} ORDER BY ALL").fetchall() for n in names}
    finally:
        side.close()


@pytest.fixture
def exported(tmp_path):
    """An export of two models (one named 'NULL', one '007') with activations and text."""
    con = dbd.connect(str(tmp_path / "s.duckdb"), progress=False)
    try:
        for name in ("NULL", "007"):
            dbd.register_model(con, name, planted_adapter())
        dbd.add_dataset(con, "snippets", TEXTS[:5])
        dbd.inspect(con, ["NULL", "007"], ["planted", "mix"], ["digit", "in_string"], "snippets",
                    keep_activations=True)
        scores = con.sql("SELECT * FROM scores ORDER BY ALL").fetchall()
        out = tmp_path / "out"
        written = dbd.export(con, str(out), activations=True, text=True)
    finally:
        dbd.close(con)
    return out, written, scores


def test_a_moved_export_reads_every_view_once_told_where_it_is(exported, tmp_path):
    """The views named each file by the absolute path it was written to: a copied folder (the way
    results go to a BI user) read nothing once the original was gone."""
    out, written, scores = exported
    before = view_rows(written["duckdb"])
    assert {"scores", "activations", "records", "models"} <= set(before)
    assert before["scores"] == scores and len(before["activations"]) == 2 * 2 * sum(len(t) for t in TEXTS[:5])
    moved = tmp_path / "handed on [1]" / "results"       # glob characters in the new place, too
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    assert view_rows(str(moved / "study.duckdb"), f"SET VARIABLE deepbase_export = '{moved.as_posix()}'") == before
    side = duckdb.connect(str(moved / "study.duckdb"), read_only=True)
    try:       # the views say how, for a BI tool that shows comments
        comment = side.sql("SELECT comment FROM duckdb_views() WHERE view_name = 'scores'").fetchall()[0][0]
        assert "SET VARIABLE deepbase_export" in comment
        side.execute(f"SET VARIABLE deepbase_export = '{moved.as_posix()}'")
        assert side.sql("SELECT count(*) FROM top_units(1)").fetchall()[0][0] == 2 * 2      # models x hypotheses
    finally:
        side.close()
    if not CLI.exists():
        return
    # the DuckDB 1.5 CLI, the folder named relative to its working directory (trailing '/' too)
    sql = "SELECT model, layer, count(*), round(sum(score), 9) FROM scores GROUP BY ALL ORDER BY ALL"
    r = subprocess.run([str(CLI), "-readonly", "-csv", "-noheader", "study.duckdb", "-c",
                        "SET VARIABLE deepbase_export = './'", "-c", sql, "-c",
                        "SELECT model, dataset, count(*) FROM activations GROUP BY ALL ORDER BY ALL"],
                       capture_output=True, text=True, timeout=120, cwd=moved)
    assert r.returncode == 0, r.stderr
    side = duckdb.connect(str(moved / "study.duckdb"), read_only=True)
    try:
        side.execute(f"SET VARIABLE deepbase_export = '{moved.as_posix()}'")
        want = [tuple(str(v) for v in row) for row in side.sql(sql).fetchall()]
    finally:
        side.close()
    got = [tuple(row) for row in csv.reader(io.StringIO(r.stdout))]
    assert got[:len(want)] == want and len(want) == 4
    assert got[len(want):] == [("007", "snippets", str(2 * sum(len(t) for t in TEXTS[:5]))),
                               ("NULL", "snippets", str(2 * sum(len(t) for t in TEXTS[:5])))]


def test_an_export_left_in_place_reads_without_the_variable(exported):
    out, written, scores = exported
    side = duckdb.connect(written["duckdb"], read_only=True)
    try:
        assert side.sql("SELECT * FROM scores ORDER BY ALL").fetchall() == scores
        assert side.sql("SELECT export_root()").fetchall()[0][0] == out.as_posix()
    finally:
        side.close()


def test_each_partition_file_holds_its_partition_columns(exported):
    """Hive partitions kept model and layer only in folder names: a BI tool reading one file
    (pyarrow, polars) lost which model and layer its scores were of."""
    out, written, scores = exported
    files = sorted((out / "scores").rglob("*.parquet"))
    assert len(files) == 4
    names = [c for c in pq.read_schema(files[0]).names]
    for f in files:
        model, layer = (p.name.split("=", 1)[1] for p in (f.parent.parent, f.parent))
        want = sorted(r for r in scores if r[names.index("model")] == model and r[names.index("layer")] == layer)
        assert want
        t = pq.read_table(f)
        assert t.column("model").to_pylist() == [model] * len(want)
        assert t.column("layer").to_pylist() == [layer] * len(want)
        got = pl.read_parquet(f)
        assert got["model"].to_list() == [model] * len(want) and got.height == len(want)
    for f in sorted((out / "activations").rglob("*.parquet")):
        t = pq.read_table(f)
        assert set(t.column("model").to_pylist()) == {f.parent.parent.parent.name.split("=", 1)[1]}
        assert set(t.column("layer").to_pylist()) == {f.parent.parent.name.split("=", 1)[1]}
        assert set(t.column("dataset").to_pylist()) == {"snippets"}
    # read as a hive dataset the columns come once, with their values as text ('007' stays '007')
    n_cols = len(names)
    whole = pds.dataset(out / "scores", format="parquet", partitioning="hive").to_table()
    assert whole.num_columns == n_cols and sorted(set(whole.column("model").to_pylist())) == ["007", "NULL"]
    hive = pl.scan_parquet(str(out / "scores" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert hive.width == n_cols and hive.height == len(scores)
    assert sorted(hive["model"].unique().to_list()) == ["007", "NULL"]
    assert duckdb.sql(f"SELECT count(*), count(DISTINCT model) FROM read_parquet('{out.as_posix()}/scores/**/*.parquet', "
                      f"hive_partitioning = false) WHERE model IN ('NULL', '007')").fetchall() == [(len(scores), 2)]

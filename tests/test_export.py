"""BI export: read back as BI tools would (pyarrow.dataset, polars, SQLAlchemy + duckdb-engine)."""
from __future__ import annotations

import json
import re
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


def numeric_store(con):
    """A model, layers and a dataset whose names all look like numbers ('007', '0', '1',
    '20240101'), inspected with stored activations of one width (3)."""
    import torch
    from deepbase_duck.extraction.adapters import CharAdapter
    from deepbase_duck.models.charlstm import encode_chars, VOCAB
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Embedding(len(VOCAB), 3), torch.nn.Linear(3, 3))
    dbd.register_model(con, "007", CharAdapter(seq, encode_chars, "chars-test", device="cpu"))
    dbd.add_dataset(con, "20240101", TEXTS[:6])
    dbd.inspect(con, "007", ["0", "1"], ["digit"], "20240101", keep_activations=True)


def test_exported_views_keep_the_store_columns_order_and_types(con, tmp_path):
    """Partition values that look like numbers stay VARCHAR ('007', not 7), model and layer
    stay where the store has them, act keeps its fixed width."""
    numeric_store(con)
    want_scores = con.sql("DESCRIBE scores").fetchall()
    want_rows = con.sql("SELECT * FROM scores ORDER BY ALL").fetchall()
    written = dbd.export(con, str(tmp_path / "out"), activations=True)
    side = duckdb.connect(written["duckdb"], read_only=True)
    try:
        assert side.sql("DESCRIBE scores").fetchall() == want_scores
        assert side.sql("SELECT * FROM scores ORDER BY ALL").fetchall() == want_rows
        assert [(c, t) for c, t, *_ in side.sql("DESCRIBE activations").fetchall()] == [
            ("model", "VARCHAR"), ("layer", "VARCHAR"), ("dataset", "VARCHAR"), ("record_id", "INTEGER"),
            ("pos", "INTEGER"), ("act", "FLOAT[3]")]
        assert side.sql("SELECT DISTINCT model, layer, dataset FROM activations ORDER BY ALL").fetchall() == \
            [("007", "0", "20240101"), ("007", "1", "20240101")]
        assert side.sql("SELECT DISTINCT model FROM scores").fetchall() == [("007",)]
    finally:
        side.close()


def test_export_to_a_folder_named_with_glob_characters(planted, tmp_path):
    """[ ] * in the folder's name: the views read this export's files, not the files a glob of
    that name would match (the decoy folder 'out1' matches 'out[1]'); '?' (which DuckDB cannot
    open a database under) is refused before anything is written."""
    from deepbase_duck.errors import DeepBaseError
    dbd.inspect(planted, "planted", ["planted", "mix"], ["digit"], "snippets")
    decoy = dbd.export(planted, str(tmp_path / "out1"))            # this one holds 9 scores ...
    dbd.inspect(planted, "planted", ["mix"], ["in_string"], "snippets")
    for name in ["out[1]", "o*t"]:                                  # ... these 13
        written = dbd.export(planted, str(tmp_path / name))
        side = duckdb.connect(written["duckdb"], read_only=True)
        try:
            assert side.sql("SELECT count(*) FROM scores").fetchall() == [(13,)]
            assert side.sql("SELECT count(*) FROM models").fetchall() == [(1,)]
        finally:
            side.close()
    assert decoy["scores"].startswith((tmp_path / "out1").as_posix())
    with pytest.raises(DeepBaseError, match=r"holds a '\?'"):
        dbd.export(planted, str(tmp_path / "out?x"))
    assert not (tmp_path / "out?x").exists()
    # a folder 'model=x' above the partitions would be read as every score's model
    with pytest.raises(DeepBaseError, match="has a folder named 'model=x'"):
        dbd.export(planted, str(tmp_path / "model=x" / "out"))
    assert not (tmp_path / "model=x").exists()


def test_a_failed_export_leaves_its_folder_empty(planted, tmp_path, monkeypatch):
    from deepbase_duck import exports

    def broken(kind):
        raise RuntimeError("simulated failure while writing study.duckdb")
    monkeypatch.setattr(exports.store, "sql_files", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        dbd.export(planted, str(tmp_path / "out"), activations=True)
    assert list((tmp_path / "out").iterdir()) == []


def test_export_to_a_file_is_a_clear_error(planted, tmp_path, capsys):
    from deepbase_duck.cli import main
    from deepbase_duck.errors import DeepBaseError
    target = tmp_path / "afile"
    target.write_text("mine")
    with pytest.raises(DeepBaseError, match=re.escape(f"export folder {target} is a file")):
        dbd.export(planted, str(target))
    with pytest.raises(DeepBaseError, match=re.escape(f"{target} is a file")):
        dbd.export(planted, str(target / "sub"))
    assert target.read_text() == "mine"
    db = str(tmp_path / "s.duckdb")
    dbd.close(dbd.connect(db, progress=False))
    assert main(["--quiet", "export", db, str(target)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and f"export folder {target} is a file" in err

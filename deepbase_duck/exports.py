"""Export a store for BI tools and other readers: Parquet files plus a small DuckDB file.

    out/
      scores/model=<m>/layer=<l>/*.parquet        hive-partitioned by model and layer
      similarities.parquet, queries.parquet, models.parquet, layers.parquet, datasets.parquet,
      hypotheses.parquet, behaviors.parquet        the catalog, one file each
      activations/model=<m>/layer=<l>/dataset=<d>/*.parquet   (with activations=True: per model,
                                                   layer and dataset the activations of the
                                                   model's current weights, float32 preferred)
      study.duckdb                                 DuckDB 1.5-readable: one view per file set above

The .duckdb file holds only views (absolute paths to the Parquet files) and the pure-SQL macros
over them (top_units, compare_scores; with ``text=True`` also symbol_labels and sampling),
so any DuckDB 1.5+ client (the CLI, duckdb-engine / SQLAlchemy, ADBC) reads it, and tools that
read Parquet use the files directly (pyarrow.dataset, polars, Spark...). Nothing in it needs
Python UDFs. Records, symbols and labels are left out unless ``text=True`` (they can be large).
``overwrite=True`` replaces an earlier export in ``out_dir`` and nothing else.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import duckdb

from . import store

CATALOG = ["models", "layers", "datasets", "hypotheses", "queries", "behaviors", "similarities"]
TEXT_TABLES = ["records", "symbols", "labels", "labeled_records"]   # labeled_records: stratified_records


def _lit(path) -> str:
    """A path as a SQL string literal (quotes doubled)."""
    return "'" + Path(path).as_posix().replace("'", "''") + "'"


def check_replaceable(session, out: Path) -> None:
    """Refuse to delete ``out`` unless it holds an earlier export and nothing else: never the
    folder of the store or of its activations, nor a folder with other files."""
    from .errors import DeepBaseError
    db = session.db_path if session.db_path not in (None, ":memory:") else None
    store_files = [Path(p).resolve() for p in (db, session.act_root) if p]
    for f in store_files:
        if f == out or out in f.parents:
            raise DeepBaseError(f"export folder {out} holds the store ({f}); overwrite would delete it: "
                                f"export to another folder")
    known = ({"scores", "scores.parquet", "activations", "study.duckdb", "study.duckdb.wal"}
             | {f"{t}.parquet" for t in CATALOG + TEXT_TABLES})
    other = sorted(p.name for p in out.iterdir() if p.name not in known)
    if other:
        raise DeepBaseError(f"export folder {out} holds files no export writes ({', '.join(other[:5])}"
                            f"{' ...' if len(other) > 5 else ''}); overwrite replaces only an earlier export")


def export_store(session, out_dir: str, activations: bool = False, text: bool = False,
                 overwrite: bool = False) -> dict:
    """Write the export to ``out_dir``; returns {name: path} of what was written."""
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"export folder {out} is not empty; pass overwrite=True (CLI: --overwrite) "
                                  f"to replace an earlier export there")
        check_replaceable(session, out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    con = session.con
    written = {}
    scores_dir = out / "scores"
    n_scores = store.q_scalar(con, "SELECT count(*) FROM scores")
    if n_scores:
        con.execute(f"COPY scores TO {_lit(scores_dir)} (FORMAT parquet, PARTITION_BY (model, layer))")
        written["scores"] = f"{scores_dir.as_posix()}/**/*.parquet"
    else:                                   # no partitions to write: one empty file keeps the schema
        con.execute(f"COPY scores TO {_lit(out / 'scores.parquet')} (FORMAT parquet)")
        written["scores"] = (out / "scores.parquet").as_posix()
    for table in CATALOG + (TEXT_TABLES if text else []):
        path = out / f"{table}.parquet"
        con.execute(f"COPY {table} TO {_lit(path)} (FORMAT parquet)")
        written[table] = path.as_posix()
    if activations:
        act_dir = out / "activations"
        # one stored behavior per (model, layer, dataset): the model's current weights and
        # tokenisation, float32 preferred, the latest (others are older weights or copies)
        rows = store.q_all(con, "SELECT b.view_name, b.model, b.layer, b.dataset FROM behaviors b "
                                "JOIN models m ON m.name = b.model AND m.checksum = b.model_checksum "
                                "AND m.tokenization = b.tokenization WHERE EXISTS "
                                "(SELECT 1 FROM behavior_parts p WHERE p.behavior_id = b.behavior_id) "
                                "QUALIFY row_number() OVER (PARTITION BY b.model, b.layer, b.dataset "
                                "ORDER BY b.dtype = 'float32' DESC, b.behavior_id DESC) = 1")
        for view, model, layer, dataset in rows:
            con.execute(f"COPY (SELECT ? AS model, ? AS layer, ? AS dataset, record_id, pos, act FROM {view}) "
                        f"TO {_lit(act_dir)} (FORMAT parquet, PARTITION_BY (model, layer, dataset), "
                        "APPEND)", [model, layer, dataset])
        if rows:
            written["activations"] = f"{act_dir.as_posix()}/**/*.parquet"
    db = out / "study.duckdb"
    side = duckdb.connect(str(db), config={"storage_compatibility_version": "v1.5.0"})
    try:
        for name, path in written.items():
            hive = ", hive_partitioning = true" if "**" in path else ""
            side.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({_lit(path)}{hive})")
        # the macros over what was exported: results always; alignment and sampling with the text
        wanted = ("10_", "20_", "30_") if text else ("30_",)
        for name, text_sql in store.sql_files("pure"):
            if name.startswith(wanted):
                side.execute(text_sql)
        side.execute("CHECKPOINT")
    finally:
        side.close()
    written["duckdb"] = db.as_posix()
    return written

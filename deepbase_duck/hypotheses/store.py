"""Materialise hypothesis labels in the store, once per (hypothesis version, dataset, record).

Labels are computed in Python from each record's text and appended in transactions of a few
hundred records, together with the rows of ``labeled_records`` that say which records are done:
an interrupted run resumes where it stopped, and labels are reused by every model.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .. import store
from ..errors import UnknownNameError
from .core import Hypothesis, get_hypothesis, registry
from ..progress import progress_bar

CHUNK = 256


def catalog_hypothesis(con, name: str) -> dict | None:
    row = store.q_one(con, "SELECT name, kind, version, categories FROM hypotheses WHERE name = ?", [name])
    if row is None:
        return None
    return {"name": row[0], "kind": row[1], "version": row[2], "categories": row[3]}


def resolve(con, names) -> list[dict]:
    """Catalog descriptions of ``names``: a registered Python hypothesis wins; a name known only
    to the store (labels computed in another session) is used with its stored labels."""
    out = []
    for name in names:
        if isinstance(name, Hypothesis):
            h = name
        elif name in registry():
            h = get_hypothesis(name)
        else:
            row = catalog_hypothesis(con, name)
            if row is None:
                stored = [r[0] for r in store.q_all(con, "SELECT name FROM hypotheses")]
                raise UnknownNameError("hypothesis", name, set(registry()) | set(stored))
            out.append(dict(row, live=None))
            continue
        out.append({"name": h.name, "kind": h.kind, "version": h.version,
                    "categories": list(h.categories) if h.categories else None, "live": h})
    return out


def upsert_catalog(con, h: Hypothesis) -> None:
    row = catalog_hypothesis(con, h.name)
    cats = list(h.categories) if h.categories else None
    if row and row["version"] == h.version and row["kind"] == h.kind and row["categories"] == cats:
        return
    with store.Transaction(con):
        con.execute("DELETE FROM labels WHERE hypothesis = ? AND version <> ?", [h.name, h.version])
        con.execute("DELETE FROM labeled_records WHERE hypothesis = ? AND version <> ?", [h.name, h.version])
        con.execute("DELETE FROM hypotheses WHERE name = ?", [h.name])
        con.execute("INSERT INTO hypotheses (name, kind, description, version, categories, source) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [h.name, h.kind, h.description, h.version, cats, h.source])


def missing_records(con, h: dict, dataset: str, record_ids: np.ndarray) -> np.ndarray:
    done = store.q_arrow(con, "SELECT record_id FROM labeled_records WHERE hypothesis = ? AND version = ? "
                              "AND dataset = ?", [h["name"], h["version"], dataset]).column(0).to_numpy()
    return np.setdiff1d(np.asarray(record_ids, dtype=np.int64), done.astype(np.int64))


def annotate(session, hypotheses, dataset: str, record_ids=None, progress: bool | None = None) -> list[dict]:
    """Compute and store the labels of ``hypotheses`` for the records of ``dataset`` (all, or
    ``record_ids``). Returns one summary dict per hypothesis."""
    con = session.con
    session.check_dataset(dataset)
    all_ids = session.record_ids(dataset)
    ids = all_ids if record_ids is None else np.asarray(record_ids, dtype=np.int64)
    summaries = []
    for h in resolve(con, hypotheses):
        live = h["live"]
        todo = missing_records(con, h, dataset, ids)
        if live is None:
            if len(todo):
                raise UnknownNameError("hypothesis", h["name"], registry())
            summaries.append({"hypothesis": h["name"], "labeled": 0, "reused": len(ids)})
            continue
        upsert_catalog(con, live)
        todo = missing_records(con, h, dataset, ids)
        bar = progress_bar(len(todo), f"labels {h['name']}", "rec",
                           session.progress if progress is None else progress)
        for lo in range(0, len(todo), CHUNK):
            chunk = todo[lo:lo + CHUNK]
            texts = session.texts(dataset, chunk)
            cols = {"rid": [], "s": [], "e": [], "v": []}
            counts = []
            for rid in chunk:
                s, e, v = live.spans(texts[int(rid)], record=f"{dataset}:{int(rid)}")
                cols["rid"].append(np.full(len(s), rid, np.int32))
                cols["s"].append(s); cols["e"].append(e); cols["v"].append(v)
                counts.append(len(s))
            n = sum(counts)
            labels = pa.table({
                "hypothesis": pa.array([live.name] * n, pa.string()),
                "version": pa.array([live.version] * n, pa.string()),
                "dataset": pa.array([dataset] * n, pa.string()),
                "record_id": pa.array(np.concatenate(cols["rid"]) if n else np.zeros(0, np.int32)),
                "start_char": pa.array(np.concatenate(cols["s"]).astype(np.int32) if n else np.zeros(0, np.int32)),
                "end_char": pa.array(np.concatenate(cols["e"]).astype(np.int32) if n else np.zeros(0, np.int32)),
                "value": pa.array(np.concatenate(cols["v"]).astype(np.float64) if n else np.zeros(0)),
            })
            done = pa.table({
                "hypothesis": pa.array([live.name] * len(chunk), pa.string()),
                "version": pa.array([live.version] * len(chunk), pa.string()),
                "dataset": pa.array([dataset] * len(chunk), pa.string()),
                "record_id": pa.array(np.asarray(chunk, np.int32)),
                "n_spans": pa.array(np.asarray(counts, np.int32)),
            })
            with store.Transaction(con):
                if n:
                    store.insert_arrow(con, "labels", labels)
                store.insert_arrow(con, "labeled_records", done)
            bar.update(len(chunk))
        bar.close()
        summaries.append({"hypothesis": live.name, "labeled": int(len(todo)), "reused": int(len(ids) - len(todo))})
    return summaries

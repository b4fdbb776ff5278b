"""Extraction: run a model over a dataset and store the activations of named layers.

Activations ("behaviors") are stored per (model checksum, layer, dataset, tokenisation, dtype)
as Parquet parts ``part-NNNNNN.parquet`` with columns (record_id INT32, pos INT32,
act FIXED_SIZE_LIST<float32|float16>[width]) in a folder beside the DuckDB file; the catalog
(behaviors, behavior_parts, behavior_records) says which parts and records are committed and a
view per behavior reads them as (record_id, pos, act FLOAT[width]).

One forward pass per batch of records feeds every requested layer. The write protocol keeps
every file the views' glob (``part-*.parquet``) matches a committed part:

1. the part is written under a temporary name ``.part-NNNNNN.parquet.<pid>.tmp``, then renamed
   to its staged name ``.part-NNNNNN.parquet.staged`` (whole, still hidden from the glob);
2. the catalog commits it (behavior_parts, behavior_records) in one transaction per batch;
3. it is published: renamed from its staged name to ``part-NNNNNN.parquet``.

A kill before 2 leaves hidden files the catalog does not list: deleted by the next extraction of
the behavior, or when the store is next opened (``refresh_views``). A kill between 2 and 3
leaves committed parts under their staged names, which the views do not read yet (they never
read rows the catalog does not list; they may lack committed ones until then): the next
opening, extraction or read of the behavior (``settle_folder``, ``forget_missing_parts``) rolls
them forward. An exception or Ctrl-C settles the folder at once. An interrupted extraction
resumes after its last committed batch with no duplicate or missing rows. Peak memory is one
batch.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import store
from ..errors import ActivationError, DeepBaseError, EmptyDatasetError, check_int
from ..extraction.hooks import Retain, run_until_retained
from ..progress import progress_bar
from .memory import caps_store_memory, release_freed_memory
from .prefetch import batch_source, pipeline_by_default

# rows per Parquet row group of a part: a progressive scan reads stored records by the groups'
# record_id statistics (engine/inspect.py StoredRows), so it decodes a few groups per record
PART_ROW_GROUP_ROWS = 1024
DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}
SYMBOL_CHUNK = 256


# -- symbols -------------------------------------------------------------------------------
def stored_symbol_counts(session, dataset: str, tokenization: str) -> dict[int, int]:
    """{record_id: n_symbols} of the records of ``dataset`` already tokenised (symbols stored)."""
    done = store.q_arrow(session.con, "SELECT record_id, n_symbols FROM tokenized_records WHERE dataset = ? AND "
                                      "tokenization = ?", [dataset, tokenization])
    return dict(zip(done.column(0).to_pylist(), done.column(1).to_pylist()))


def ensure_symbols(session, adapter, dataset: str, record_ids) -> dict[int, int]:
    """Store the symbols of ``record_ids`` under the adapter's tokenisation (once); return
    {record_id: n_symbols}. Scans that run the model store them from their own forward passes'
    encodings instead (``SymbolWriter``)."""
    ids = np.asarray(record_ids, dtype=np.int64)
    counts = stored_symbol_counts(session, dataset, adapter.tokenization)
    todo = np.array([i for i in ids if int(i) not in counts], dtype=np.int64)
    writer = SymbolWriter(session, adapter.tokenization, dataset, counts)
    for lo in range(0, len(todo), SYMBOL_CHUNK):
        chunk = todo[lo:lo + SYMBOL_CHUNK]
        texts = session.texts(dataset, chunk)
        writer.add(chunk, adapter.encode([texts[int(r)] for r in chunk]))
    writer.flush()
    return {int(i): counts[int(i)] for i in ids}


def _repeat(value: str, n: int) -> pa.Array:
    """A string column of ``n`` copies of ``value``, built by Arrow (no Python list)."""
    return pa.repeat(pa.scalar(value, pa.string()), n)


class SymbolWriter:
    """Stores the symbols of records from an encoding already made: a scan that runs the model
    hands each forward batch's encoding here, so a record is tokenised once per scan (not once
    for the symbols table and again for its forward pass). Records already in ``counts``
    ({record_id: n_symbols}, updated in place) are skipped; the rest are written with their
    ``tokenized_records`` marks, SYMBOL_CHUNK records per transaction, and by ``flush``."""

    def __init__(self, session, tokenization: str, dataset: str, counts: dict):
        self.session, self.tokenization, self.dataset, self.counts = session, tokenization, dataset, counts
        self.pending = []                      # (record_id, starts, ends, tokens)

    def add(self, ids, enc) -> None:
        for b, r in enumerate(ids):
            if int(r) not in self.counts:
                s, e = np.asarray(enc.starts[b], np.int32), np.asarray(enc.ends[b], np.int32)
                self.pending.append((int(r), s, e, enc.tokens[b] if enc.tokens is not None else [None] * len(s)))
                self.counts[int(r)] = len(s)
        if len(self.pending) >= SYMBOL_CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rows, self.pending = self.pending, []
        n_sym = np.asarray([len(p[1]) for p in rows], np.int32)
        n, m = int(n_sym.sum()), len(rows)
        cat = lambda k: np.concatenate([p[k] for p in rows]) if n else np.zeros(0, np.int32)  # noqa: E731
        symbols = pa.table({
            "dataset": _repeat(self.dataset, n),
            "tokenization": _repeat(self.tokenization, n),
            "record_id": pa.array(np.repeat(np.asarray([p[0] for p in rows], np.int32), n_sym)),
            "pos": pa.array(np.concatenate([np.arange(k, dtype=np.int32) for k in n_sym]) if n else np.zeros(0, np.int32)),
            "start_char": pa.array(cat(1)),
            "end_char": pa.array(cat(2)),
            "token": pa.array([t for p in rows for t in p[3]], pa.string()),
        })
        marks = pa.table({
            "dataset": _repeat(self.dataset, m),
            "tokenization": _repeat(self.tokenization, m),
            "record_id": pa.array(np.asarray([p[0] for p in rows], np.int32)),
            "n_symbols": pa.array(n_sym),
        })
        with store.Transaction(self.session.con) as con:
            if n:
                store.insert_arrow(con, "symbols", symbols)
            store.insert_arrow(con, "tokenized_records", marks)
        del symbols, marks
        pa.default_memory_pool().release_unused()   # the tables' buffers: not kept by Arrow's pool mid-scan

    def close(self, failed: bool = False) -> None:
        """Write what is buffered; after a failure (``failed``) a failing write is not raised over
        the original error (those records are simply tokenised again next time)."""
        try:
            self.flush()
        except Exception:
            if not failed:
                raise


# -- behaviors -------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]


def view_sql(session, b: dict) -> str:
    # the folder's own [ * ? are written as one-character classes (DuckDB globs the whole path:
    # a store in 'runs[1]/' would read 'runs1/'), its quotes doubled; part-*.parquet stays a glob
    path = re.sub(r"([\[*?])", r"[\1]", (session.act_root / b["directory"]).as_posix()).replace("'", "''")
    return (f"CREATE OR REPLACE VIEW {b['view_name']} AS SELECT record_id, pos, "
            f"CAST(act AS FLOAT[{int(b['width'])}]) AS act FROM read_parquet('{path}/part-*.parquet')")


def refresh_views(session, clean: bool = False) -> None:
    """(Re)create the view of every behavior that has parts, with this store's folder, and drop
    the view of one whose files are all gone (the catalog's parts are forgotten, with a warning,
    when they are next read: ``forget_missing_parts``). ``clean``
    (the store is opened to write): first settle each behavior's folder (``settle_folder``):
    committed parts that a kill left under their staged names are published, files the catalog
    does not list (a kill before the commit) deleted, and a behavior with no committed part (a
    kill before its extraction's first commit) taken out of the catalog, as a failed extraction
    takes it out (``drop_unstored_behaviors``): it holds nothing to resume from."""
    empty = []
    for bid, directory, view, width, model, layer, dataset, files in store.q_all(
            session.con, "SELECT b.behavior_id, b.directory, b.view_name, b.width, b.model, b.layer, b.dataset, "
                         "list(p.file) FILTER (WHERE p.file IS NOT NULL) FROM behaviors b "
                         "LEFT JOIN behavior_parts p USING (behavior_id) GROUP BY ALL"):
        folder = session.act_root / directory
        if clean:
            try:
                settle_folder(folder, set(files or ()))
            except OSError as exc:
                warnings.warn(f"{folder}: the part files could not be brought in line with the catalog ({exc}); "
                              f"until they are, view {view} may lack committed rows, or read a file the "
                              f"catalog does not list", stacklevel=3)
            if files and folder.is_dir():
                check_part_files(folder, files, view, f"model {model!r}, layer {layer!r} on dataset {dataset!r}")
        if files and folder.is_dir() and any(folder.glob("part-*.parquet")):
            session.con.execute(view_sql(session, {"view_name": view, "directory": directory, "width": width}))
        else:     # no file to read (its folder deleted or moved by hand): a view kept in the store would fail
            session.con.execute(f"DROP VIEW IF EXISTS {view}")   # on the first read; forget_missing_parts says so
        if clean and not files:
            empty.append({"behavior_id": bid, "view_name": view, "directory": directory})
    drop_unstored_behaviors(session, empty)


def check_part_files(folder, files, view: str, what: str) -> None:
    """At the store's opening, before ``view`` is made over ``folder``: warn where committed part
    ``files`` are missing (deleted or moved by hand), since the view would read fewer records than
    the catalog lists; delete, with the same warning, a part that is not a whole Parquet file (a
    copy of the store cut short by a full disk, a machine crash before the file reached the disk),
    which would make every read of the view fail. Either way its records are computed again at
    the next extraction or scan of the layer (``forget_missing_parts``). One small read per part
    (its last four bytes)."""
    missing, damaged = [], []
    for name in files:
        try:
            with open(folder / name, "rb") as f:
                whole = f.seek(0, os.SEEK_END) >= 12 and f.seek(-4, os.SEEK_END) and f.read(4) == b"PAR1"
        except FileNotFoundError:
            missing.append(name)
            continue
        except OSError:
            continue                   # unreadable here (permissions): DuckDB's own error names it on read
        if not whole:
            try:
                os.unlink(folder / name)
            except OSError:
                continue
            damaged.append(name)
    if not missing and not damaged:
        return
    shown = lambda names: ", ".join(sorted(names)[:3]) + (" ..." if len(names) > 3 else "")  # noqa: E731
    said = []
    if missing:
        said.append(f"missing (deleted or moved?): {len(missing)}, {shown(missing)}")
    if damaged:
        said.append(f"not whole Parquet files (cut short: a copy that ran out of disk, a crash), deleted: "
                    f"{len(damaged)}, {shown(damaged)}")
    lacks = "has no file left to read" if len(missing) + len(damaged) == len(files) else "lacks their records"
    warnings.warn(f"stored activations of {what}: of the {len(files)} part files in {folder}, {'; '.join(said)}. "
                  f"View {view} {lacks} until the next extract or inspect of that layer computes them again",
                  stacklevel=4)


def find_behavior(con, checksum, layer, dataset, tokenization, dtype) -> dict | None:
    row = store.q_one(con, "SELECT behavior_id, directory, view_name, width, model FROM behaviors WHERE model_checksum = ? "
                           "AND layer = ? AND dataset = ? AND tokenization = ? AND dtype = ?",
                      [checksum, layer, dataset, tokenization, dtype])
    if row is None:
        return None
    return {"behavior_id": row[0], "directory": row[1], "view_name": row[2], "width": row[3], "model": row[4],
            "layer": layer, "dtype": dtype, "dataset": dataset}


def stored_behavior(session, checksum, layer, dataset, tokenization, dtype) -> dict | None:
    """``find_behavior``, with the catalog first brought in line with the files on disk
    (``forget_missing_parts``): what it then lists as stored can be read."""
    b = find_behavior(session.con, checksum, layer, dataset, tokenization, dtype)
    if b is not None:
        forget_missing_parts(session, b)
    return b


def forget_missing_parts(session, b: dict) -> int:
    """Parts of ``b`` that the catalog lists but whose file is gone (its folder deleted or moved
    by hand) are taken out of the catalog, with a warning: their records count as not stored, so
    a scan computes them again and an extraction stores them again, instead of failing on a
    missing file. Returns the number of records forgotten.

    Where the store's whole activation folder is missing (a drive not mounted, a folder moved),
    nothing is forgotten: a DeepBaseError says so, since forgetting would lose the parts for
    good (once back, files the catalog no longer lists are deleted at the next opening). A
    folder deleted on purpose is made again, empty, to go on (its activations computed again)."""
    folder = session.act_root / b["directory"]
    parts = store.q_all(session.con, "SELECT part, file FROM behavior_parts WHERE behavior_id = ?", [b["behavior_id"]])
    try:                           # one listing of the folder, not a stat per part
        present = {e.name for e in os.scandir(folder) if e.is_file()}
    except FileNotFoundError:
        if parts and not os.path.isdir(session.act_root):
            raise DeepBaseError(
                f"the activation folder of this store, {session.act_root}, is missing, while the store lists "
                f"{len(parts)} stored part(s) of model {b.get('model')!r}, layer {b.get('layer')!r} on dataset "
                f"{b.get('dataset')!r} in it: if it is on a drive that is not mounted, or was moved, put it back "
                f"(nothing was changed); if it was deleted, make it again, empty (mkdir {str(session.act_root)!r}), "
                f"and what it held will be computed again") from None
        present = set()
    for _, name in parts:          # committed, not yet published (a kill after the commit): published now
        if name not in present and staged_name(name) in present:
            publish_part(folder, name)
            present.add(name)
    gone = [int(part) for part, name in parts if name not in present]
    if not gone:
        return 0
    with store.Transaction(session.con) as con:
        n, _ = forget_parts(con, b, gone)
    warnings.warn(f"stored activations of model {b.get('model')!r}, layer {b.get('layer')!r} on dataset "
                  f"{b.get('dataset')!r}: {len(gone)} of {len(parts)} part files are missing from {folder} "
                  f"(deleted or moved?); their {n} records will be computed again", stacklevel=3)
    return n


def forget_parts(con, b: dict, parts: list[int]) -> tuple[int, list[str]]:
    """In the caller's transaction: take ``parts`` of behavior ``b`` out of the catalog (their
    records then count as not stored), dropping its view when no part is left. Returns the
    number of records forgotten and the parts' file names, which are the caller's to delete
    after the commit."""
    bid = b["behavior_id"]
    n = int(store.q_scalar(con, "SELECT count(*) FROM behavior_records WHERE behavior_id = ? AND "
                                "list_contains(?, part)", [bid, parts]))
    files = [f for (f,) in store.q_all(con, "SELECT file FROM behavior_parts WHERE behavior_id = ? AND "
                                            "list_contains(?, part)", [bid, parts])]
    con.execute("DELETE FROM behavior_records WHERE behavior_id = ? AND list_contains(?, part)", [bid, parts])
    con.execute("DELETE FROM behavior_parts WHERE behavior_id = ? AND list_contains(?, part)", [bid, parts])
    if not store.q_scalar(con, "SELECT count(*) FROM behavior_parts WHERE behavior_id = ?", [bid]):
        con.execute(f"DROP VIEW IF EXISTS {b['view_name']}")     # no file left for it to read
    return n, files


def get_or_create_behavior(session, model: str, checksum: str, layer: str, dataset: str, tokenization: str,
                           dtype: str, width: int) -> dict:
    con = session.con
    b = stored_behavior(session, checksum, layer, dataset, tokenization, dtype)
    if b is not None:
        return b
    bid = int(store.q_scalar(con, "SELECT coalesce(max(behavior_id), 0) + 1 FROM behaviors"))
    directory = f"b{bid:05d}-{_safe(model)}-{_safe(layer)}-{_safe(dataset)}-{dtype}"
    view = f"behavior_{bid}"
    con.execute("INSERT INTO behaviors VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [bid, model, checksum, layer, dataset, tokenization, dtype, width, directory, view])
    return {"behavior_id": bid, "directory": directory, "view_name": view, "width": width, "model": model,
            "layer": layer, "dtype": dtype, "dataset": dataset}


def drop_unstored_behaviors(session, behaviors) -> list[int]:
    """After a failed scan: delete the catalog rows (and view and folder) of each
    of ``behaviors`` that holds no committed part, so that the catalog lists no behavior whose
    activations were never stored; behaviors with parts stay as they are (an extraction resumes
    after their last committed batch). Best effort: the original error is what matters. Returns
    the behavior ids dropped."""
    dropped = []
    for b in behaviors:
        try:
            with store.Transaction(session.con) as con:
                if part_count(con, b["behavior_id"]):
                    continue
                con.execute("DELETE FROM behavior_records WHERE behavior_id = ?", [b["behavior_id"]])
                con.execute("DELETE FROM behaviors WHERE behavior_id = ?", [b["behavior_id"]])
                con.execute(f"DROP VIEW IF EXISTS {b['view_name']}")
            store.remove_tree(session.act_root / b["directory"])
            dropped.append(b["behavior_id"])
        except Exception:
            pass
    return dropped


def cleanup_orphans(session, b: dict) -> int:
    """Bring the folder of ``b`` in line with the catalog (``settle_folder``): before a run
    resumes, and after one failed."""
    listed = {r[0] for r in store.q_all(session.con, "SELECT file FROM behavior_parts WHERE behavior_id = ?",
                                        [b["behavior_id"]])}
    return settle_folder(session.act_root / b["directory"], listed)


def staged_name(name: str) -> str:
    """The hidden name a part is written under until its catalog commit (not matched by the views'
    ``part-*.parquet``): one name per part, so that a roll-forward finds it from the catalog."""
    return f".{name}.staged"


def publish_part(folder, name: str) -> None:
    """Rename the committed part ``name`` from its staged name to the name the views read. Already
    published (by a roll-forward, or a Ray block run twice): nothing to do."""
    from pathlib import Path
    try:
        os.replace(Path(folder) / staged_name(name), Path(folder) / name)
    except FileNotFoundError:
        pass                       # no staged file: published already, or gone (forget_missing_parts says so)


def settle_folder(folder, listed: set) -> int:
    """Bring a behavior's ``folder`` in line with its committed parts ``listed`` (file names):
    a listed part still under its staged name (a kill between the commit and the rename) is
    published; every other file the catalog does not list (a part staged or being written when
    its run failed or was killed before the commit, a staged copy of a published part) is
    deleted. Returns the number of files deleted."""
    if not folder.is_dir():
        return 0
    staged = {staged_name(n): n for n in listed}
    removed = 0
    for f in folder.iterdir():
        if f.name in listed:
            continue
        if f.name in staged and not (folder / staged[f.name]).exists():
            publish_part(folder, staged[f.name])
            continue
        f.unlink(missing_ok=True)
        removed += 1
    return removed


def done_records(con, behavior_id: int) -> np.ndarray:
    return store.q_arrow(con, "SELECT record_id FROM behavior_records WHERE behavior_id = ?",
                         [behavior_id]).column(0).to_numpy().astype(np.int64)


# -- the forward loop (shared by extract and inspect) -----------------------------------------
@dataclass
class Batch:
    record_ids: np.ndarray            # records in row order
    n_symbols: np.ndarray             # symbols per record
    acts: dict                        # layer -> tensor (sum(n_symbols), width), rows in (record, pos) order
    chars: tuple | None = None        # (starts, ends): each symbol's characters, rows as acts (None: ask the store)
    texts: list | None = None         # the records' texts, in record_ids order (None: ask the store)
    pending: object = None            # a deferred finite check of acts (batch_from_outputs); verify() runs it
    encoded: object = None            # the forward pass's Encoded, kept when the consumer stores the symbols

    def verify(self) -> "Batch":
        """Run the deferred check that every activation is finite (raises ActivationError)."""
        if self.pending is not None:
            check, self.pending = self.pending, None
            check()
        return self


def plan_batches(session, dataset: str, record_ids, batch_size: int) -> list[list[int]]:
    """Forward batches of records of similar length (fewer padded positions): record ids sorted
    by text length, then id, cut into runs of ``batch_size``. Only ids and lengths are read."""
    ids = pa.table({"record_id": pa.array(np.asarray(record_ids, dtype=np.int32))})
    session.con.register("__dbd_ids", ids)
    try:
        order = store.q_arrow(session.con, "SELECT r.record_id FROM records r JOIN __dbd_ids USING (record_id) "
                                           "WHERE r.dataset = ? ORDER BY length(r.text), r.record_id",
                              [dataset]).column(0).to_pylist()
    finally:
        session.con.unregister("__dbd_ids")
    # within a batch, records go in id order: stored parts and label blocks then agree on row order
    return [sorted(order[lo:lo + batch_size]) for lo in range(0, len(order), batch_size)]


def forward_batches(session, adapter, model: str, layers, dataset, batches, symbol_counts, symbols=None,
                    defer_check: bool = False, keep_encoding: bool = False):
    """Yield a Batch per forward pass: the activations of ``layers`` for each symbol. When
    ``batches`` is a list (a full scan), texts are read SYMBOL_CHUNK records per query; a
    generator (a progressive scan, which may stop) is read a batch at a time. ``symbols``: a
    SymbolWriter that stores the symbols of records not yet tokenised from each batch's encoding
    (``symbol_counts`` is then its counts); or ``keep_encoding``: each Batch carries its encoding
    (``Batch.encoded``) for the consumer to store them (the local engine, whose forward passes
    may run in another thread). ``defer_check``: see batch_from_outputs."""
    with Retain(adapter.module, layers) as ret:
        for ids, texts in batches_with_texts(session, dataset, batches):
            yield forward_batch(adapter, ret, model, layers, dataset, ids, [texts[r] for r in ids], symbol_counts,
                                symbols, defer_check, keep_encoding)


def batches_with_texts(session, dataset: str, batches):
    """(ids, {record_id: text}) per batch of ``batches``: a list is read SYMBOL_CHUNK records per
    query, a generator (which may be stopped) a batch at a time."""
    if not isinstance(batches, list):
        for ids in batches:
            yield ids, session.texts(dataset, ids)
        return
    per_query = max(1, SYMBOL_CHUNK // max(1, max((len(b) for b in batches), default=1)))
    for lo in range(0, len(batches), per_query):
        group = batches[lo:lo + per_query]
        texts = session.texts(dataset, [r for ids in group for r in ids])
        for ids in group:
            yield ids, texts


def encoded_chars(enc, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The character ranges of the first ``n`` records' symbols of an encoding, concatenated."""
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (np.concatenate([np.asarray(enc.starts[b], np.int64) for b in range(n)]),
            np.concatenate([np.asarray(enc.ends[b], np.int64) for b in range(n)]))


def forward_batch(adapter, ret: Retain, model: str, layers, dataset: str, ids, texts: list[str],
                  symbol_counts, symbols=None, defer_check: bool = False, keep_encoding: bool = False) -> Batch:
    """One forward pass over the records ``ids`` (texts in the same order) with ``ret`` retaining
    ``layers``: their activations per symbol, checked. Shared by the local loop above and the Ray
    workers (engine/ray_engine.py). ``symbols``: see forward_batches; the symbols are handed to it
    after the forward is launched, so that on CUDA this host work overlaps the device's."""
    with naming_records(model, dataset, ids):
        enc = adapter.encode(texts)
        run_until_retained(adapter, enc, ret)
    if symbols is not None:
        symbols.add(ids, enc)
    batch = batch_from_outputs(adapter, ret.outputs, enc, model, layers, dataset, ids, symbol_counts, texts,
                               defer_check)
    if keep_encoding:
        batch.encoded = enc
    return batch


NOTE_PREFIX = "deepbase_duck: "       # the notes the engine adds to an error (surface/udfs.py shows them in SQL)


@contextlib.contextmanager
def naming_records(model: str, dataset: str, ids):
    """An error of the model's encoder or forward pass inside the block (torch's "index out of
    range in self" for a character beyond an embedding's vocabulary, a shape mismatch) keeps its
    type and message, with a note naming the model, the dataset and the records of the batch
    that raised it, which its own message never does."""
    try:
        yield
    except Exception as exc:
        shown = ", ".join(str(int(r)) for r in list(ids)[:8]) + (" ..." if len(ids) > 8 else "")
        note = (f"{NOTE_PREFIX}raised by model {model!r} on the batch of {len(ids)} record(s) of dataset "
                f"{dataset!r} with record_id {shown} (SELECT record_id, text FROM records WHERE dataset = "
                f"'{dataset.replace(chr(39), chr(39) * 2)}' AND record_id IN ({shown.replace(' ...', '')}))")
        if note not in (getattr(exc, "__notes__", None) or []):
            exc.add_note(note)
        raise


def batch_from_outputs(adapter, outputs: dict, enc, model: str, layers, dataset: str, ids, symbol_counts,
                       texts=None, defer_check: bool = False) -> Batch:
    """The Batch of one forward pass over records ``ids``: each layer's output (``outputs``)
    cut into per-symbol rows by the adapter, checked (row counts against ``symbol_counts``, all
    finite). Shared by forward_batch and the stacked loop (engine/stacking.py). With
    ``defer_check`` the finite check, which reads a value back from the device and so waits for
    a CUDA forward pass to finish, runs at ``Batch.verify()`` instead: the consumer does its host
    work (the batch's labels) first, while the device computes."""
    acts = {}
    # records met for the first time count the symbols of this very encoding (their symbols are
    # stored from it, by the consumer when the forward passes run in another thread)
    n_symbols = np.asarray([symbol_counts.get(int(r), len(enc.starts[b])) for b, r in enumerate(ids)])
    for layer in layers:
        out = outputs.get(layer)
        per_record = adapter.symbol_activations(layer, out, enc)
        for r, a, n in zip(ids, per_record, n_symbols):
            if a.shape[0] != n:
                raise ActivationError(
                    f"model {model!r} layer {layer!r}: record {r} gave {a.shape[0]} activation rows "
                    f"for {n} symbols")
        x = torch.cat(per_record, 0) if per_record else torch.zeros(0, 1)
        if x.dim() != 2:
            raise ActivationError(f"model {model!r} layer {layer!r}: activations of shape {tuple(x.shape)}")
        acts[layer] = x

    def check():
        for layer, x in acts.items():
            check_finite(x, model, layer, dataset, ids, n_symbols)

    batch = Batch(np.asarray(ids, np.int64), n_symbols, acts, chars=encoded_chars(enc, len(ids)),
                  texts=None if texts is None else list(texts), pending=check)
    return batch if defer_check else batch.verify()


def check_finite(x: torch.Tensor, model: str, layer: str, dataset: str, ids, n_symbols) -> None:
    """Raise ActivationError naming the first record whose activations hold NaN or inf."""
    # the max and min are finite exactly when no NaN or inf is present (NaN propagates);
    # the elementwise search runs only to name the record
    if x.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):
        row = int((~torch.isfinite(x)).any(1).nonzero()[0])
        rec = ids[int(np.searchsorted(np.cumsum(n_symbols), row, side="right"))]
        raise ActivationError(
            f"model {model!r} layer {layer!r} produced NaN or infinite activations on record "
            f"{rec} of dataset {dataset!r}; nothing of this batch was stored")


def write_part(session, b: dict, batch: Batch, x: torch.Tensor, rows_mask: np.ndarray | None) -> tuple[str, int, int]:
    """Write the rows of ``batch`` for behavior ``b`` as the next Parquet part; return (file, part, rows)."""
    folder = session.act_root / b["directory"]
    part = int(store.q_scalar(session.con, "SELECT coalesce(max(part), 0) + 1 FROM behavior_parts WHERE behavior_id = ?",
                              [b["behavior_id"]]))
    name = f"part-{part:06d}.parquet"
    what = f"model {b.get('model')!r} layer {b.get('layer')!r} on dataset {b.get('dataset')!r}"
    return name, part, write_part_file(folder, name, b["dtype"], batch, x, rows_mask, what=what)


def write_part_file(folder, name: str, dtype: str, batch: Batch, x: torch.Tensor, rows_mask: np.ndarray | None,
                    what: str | None = None) -> int:
    """Write (record_id, pos, act) rows of ``batch`` as part ``name`` of ``folder``, staged: under
    a temporary name of this process, then renamed to the part's staged name (a rewrite of the
    same part replaces it whole), which the views do not read until ``commit_parts`` publishes
    it; return the rows written. Used by write_part and by Ray workers (engine/ray_engine.py),
    which write to a shared folder for the driver to commit. ``what``: the activations' model,
    layer and dataset in words, for an error (else the folder's name).

    float16: the values are converted as torch converts them (``x.to(torch.float16)``): float64
    through float32, so that a float16 behavior holds its float32 behavior's values rounded, and
    a value that rounds to float16's largest (65504) is stored as such; one that would become
    inf is refused."""
    from pathlib import Path
    np_dtype, pa_dtype = DTYPES[dtype]
    rec = np.repeat(batch.record_ids.astype(np.int32), batch.n_symbols)
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in batch.n_symbols]) if len(rec) else np.zeros(0, np.int32)
    t = x.detach().to("cpu")
    if t.dtype not in (torch.float32, torch.float16, torch.float64):
        t = t.float()                                  # bfloat16 and the like: numpy has no such type
    values = t.numpy()
    if rows_mask is not None:
        rec, pos, values = rec[rows_mask], pos[rows_mask], values[rows_mask]
    if dtype == "float16" and values.dtype != np.float16:
        # numpy rounds float64 to float16 in one step, torch through float32 (the two differ by one
        # unit in the last place at about one value in 30,000): torch's, as the float32 behavior
        source = values
        with np.errstate(over="ignore"):
            values = source.astype(np.float32, copy=False).astype(np.float16)
        if values.size and not np.isfinite(values).all():      # finite before (check_finite): overflow
            top = float(np.abs(source).max())
            raise ActivationError(f"activations of {what or Path(folder).name} reach {top:.9g}, beyond float16's "
                                  f"largest value (65504), which dtype='float16' would store as inf: store "
                                  f"them as float32 (dtype='float32'); nothing of this batch was stored")
    values = values.astype(np_dtype, copy=False)
    width = values.shape[1]
    act = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa_dtype), width)
    table = pa.table({"record_id": pa.array(rec), "pos": pa.array(pos), "act": act})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    pq.write_table(table, tmp, compression="zstd" if dtype == "float16" else "none", use_dictionary=False,
                   write_statistics=["record_id", "pos"], row_group_size=PART_ROW_GROUP_ROWS)
    os.replace(tmp, folder / staged_name(name))
    return len(rec)


def commit_parts(session, written: list[tuple[dict, str, int, int, np.ndarray]]) -> None:
    """One transaction: the parts just written (staged) and the records they hold; then each part
    is published under the name the views read, and a behavior's first parts get its view."""
    con = session.con
    with store.Transaction(con):
        for b, name, part, n_rows, recs in written:
            con.execute("INSERT INTO behavior_parts VALUES (?, ?, ?, ?)", [b["behavior_id"], part, name, n_rows])
            store.insert_arrow(con, "behavior_records", pa.table({
                "behavior_id": pa.array(np.full(len(recs), b["behavior_id"], np.int32)),
                "record_id": pa.array(recs.astype(np.int32)),
                "part": pa.array(np.full(len(recs), part, np.int32))}))
    for b, name, *_ in written:               # committed: now the views may read them
        publish_part(session.act_root / b["directory"], name)
    new = {}
    for b, *_ in written:
        new.setdefault(b["behavior_id"], [b, 0])[1] += 1
    for b, n in new.values():                 # the behavior's first parts: its view
        if part_count(con, b["behavior_id"]) == n:
            con.execute(view_sql(session, b))


def store_batch(session, behaviors: dict, missing: dict, batch: Batch, symbols=None) -> None:
    """Write, per layer, the rows of the batch's records that ``missing[layer]`` (ids not yet
    stored) holds, then commit every part of the batch in one transaction. ``symbols``: the
    scan's SymbolWriter, flushed first, so that stored activations always have their symbols
    (an interrupted scan leaves at most symbols without activations)."""
    written = []
    try:
        for layer, b in behaviors.items():
            need = np.isin(batch.record_ids, missing[layer])
            if not need.any():
                continue
            rows_mask = None if need.all() else np.repeat(need, batch.n_symbols)
            name, part, n_rows = write_part(session, b, batch, batch.acts[layer], rows_mask)
            written.append((b, name, part, n_rows, batch.record_ids[need]))
        if symbols is not None:
            symbols.flush()
        commit_parts(session, written)
    except BaseException:
        settle_parts(session, behaviors.values())
        raise


def settle_parts(session, behaviors) -> None:
    """After a batch failed or was interrupted (Ctrl-C) while writing, committing or publishing
    its parts: settle the behaviors' folders (staged parts that committed are published, the
    others deleted) and create the view of a behavior whose first parts did commit. Best effort:
    the original error is what matters, and opening the store settles them too (``refresh_views``)."""
    for b in behaviors:
        try:
            cleanup_orphans(session, b)
            if part_count(session.con, b["behavior_id"]):
                session.con.execute(view_sql(session, b))
        except Exception:
            pass


def part_count(con, behavior_id):
    return store.q_scalar(con, "SELECT count(*) FROM behavior_parts WHERE behavior_id = ?", [behavior_id])


@store.one_writer                 # outermost: a query waiting for the lock is not capped yet
@caps_store_memory
def extract(session, model: str, layers, dataset: str, dtype: str = "float32", record_ids=None,
            batch_size: int = 16, progress: bool | None = None, pipeline: bool | None = None) -> list[dict]:
    """Store the activations of ``layers`` of ``model`` over ``dataset`` (all records, or
    ``record_ids``). Returns one dict per layer: behavior id, view name, records extracted and
    records reused from the cache. ``pipeline``: run the forward passes in a background thread,
    one batch ahead of the Parquet writes (engine/prefetch.py); None: where the model runs on
    CUDA (``pipeline_by_default``). The stored rows are the same either way."""
    if dtype not in DTYPES:
        raise DeepBaseError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    batch_size = check_int("batch_size", batch_size, 1)
    session.check_dataset(dataset)
    adapter = session.adapter(model)
    layers = session.check_layers(model, layers)
    mrow = session.model_row(model)
    ids = session.select_records(dataset, record_ids)
    if len(ids) == 0:
        raise EmptyDatasetError(f"no records selected from dataset {dataset!r}")
    widths = session.stored_widths(model)
    behaviors = {}
    try:
        for layer in layers:
            if not widths.get(layer):
                raise ActivationError(f"layer {layer!r} of model {model!r} yields no tensor output to store")
            behaviors[layer] = get_or_create_behavior(session, model, mrow["checksum"], layer, dataset,
                                                      adapter.tokenization, dtype, widths[layer])
            cleanup_orphans(session, behaviors[layer])
        missing = {l: np.setdiff1d(ids, done_records(session.con, b["behavior_id"])) for l, b in behaviors.items()}
        todo = np.unique(np.concatenate(list(missing.values())))
        results = []
        t0 = time.time()
        if len(todo):
            counts = stored_symbol_counts(session, dataset, adapter.tokenization)
            symbols = SymbolWriter(session, adapter.tokenization, dataset, counts)   # from the forward's encodings
            run_layers = [l for l in layers if len(missing[l])]
            bar = progress_bar(len(todo), f"extract {model}", "rec", session.progress if progress is None else progress)
            batches = plan_batches(session, dataset, todo, batch_size)
            # each batch keeps its encoding: its symbols are stored below, in this thread
            source = batch_source(
                session, lambda reader: forward_batches(reader, adapter, model, run_layers, dataset, batches, counts,
                                                        defer_check=True, keep_encoding=True),
                pipeline_by_default(adapter) if pipeline is None else bool(pipeline))
            try:
                for batch in source:
                    if batch.encoded is not None:
                        symbols.add(batch.record_ids, batch.encoded)
                        batch.encoded = None
                    store_batch(session, {l: behaviors[l] for l in run_layers}, missing, batch.verify(), symbols)
                    release_freed_memory()
                    bar.update(len(batch.record_ids))
            finally:
                bar.close()
                source.close()            # a prefetching producer stops (and its thread ends) here
                symbols.close(failed=sys.exc_info()[0] is not None)
    except BaseException:
        # a failed or interrupted extraction (an error: NaN activations, a layer the adapter
        # cannot cut into symbols; Ctrl-C) leaves no catalog row for a behavior with no committed
        # part, whose activations were never stored: such a row would be listed and exported as
        # stored activations with no view to read; there is nothing in it to resume from. One
        # with parts stays, for a later call to resume after its last committed batch.
        drop_unstored_behaviors(session, behaviors.values())
        raise
    for layer in layers:
        b = behaviors[layer]
        results.append({"model": model, "layer": layer, "behavior_id": b["behavior_id"], "view": b["view_name"],
                        "dtype": dtype, "width": b["width"], "extracted": int(len(missing[layer])),
                        "reused": int(len(ids) - len(missing[layer])), "seconds": round(time.time() - t0, 3)})
    return results

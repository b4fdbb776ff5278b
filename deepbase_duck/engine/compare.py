"""compare_layers(): linear CKA between every pair of unit groups (model, layer) over the same
symbols of a dataset, streamed block by block (one forward pass per model and block; a model's
layers share it). A model whose compared layers are all stored for every selected record
(``extract``, ``keep_activations``) is read from its stored activations instead of run, as
``inspect`` does. Groups of different models must share a tokenisation, so that their symbols
are the same. Results go to the ``similarities`` table (one query id per call; the queries row's
source says 'stored', 'model' or 'stored+model').
"""
from __future__ import annotations

import itertools
import math
import sys
import time

import numpy as np
import pyarrow as pa

from .. import store
from ..errors import DeepBaseError, EmptyDatasetError, check_int
from ..inspectors.cka import LinearCKAState
from ..progress import progress_bar
from ..extraction.adapters import default_device
from ..extraction.hooks import hold_model_locks
from .extract import SymbolWriter, forward_batches, plan_batches, stored_symbol_counts


def parse_group(g) -> tuple[str, str]:
    if isinstance(g, (tuple, list)) and len(g) == 2:
        return str(g[0]), str(g[1])
    if isinstance(g, str) and ":" in g:
        model, layer = g.rsplit(":", 1)          # layers are module paths (no ':'); a model name may hold one
        if not model or not layer:
            raise DeepBaseError(f"unit group {g!r} has an empty {'model' if not model else 'layer'}: "
                                f"write it 'model:layer'")
        return model, layer
    raise DeepBaseError(f"unit group {g!r} is not 'model:layer' or (model, layer)")


def _stored_rows(session, model: str, layers: list[str], dataset: str, ids, tokenization: str):
    """A StoredRows over ``model``'s stored activations of ``layers`` when they cover every
    record of ``ids`` (float32 preferred), else None (the model runs)."""
    from types import SimpleNamespace
    from .inspect import StoredRows, stored_coverage, stored_part_blocks
    plan = SimpleNamespace(layers=layers, dataset=dataset, record_ids=np.asarray(ids, np.int64))
    behaviors, covered = stored_coverage(session, plan, session.model_row(model)["checksum"], tokenization)
    if not behaviors or len(covered) < len(np.unique(ids)):
        return None
    return StoredRows(stored_part_blocks(session, plan, behaviors, covered))


def _read_stored(rows, blocks, counts):
    """The stored activations of each block of records, as forward_batches yields a model's
    (a function of its own: a generator in the comprehension above would read the last model's)."""
    for b in blocks:
        yield rows.batch(b, counts)


def _defined(x: float):
    """NULL, as in scores, where CKA is undefined (a constant group, fewer than 2 symbols)."""
    return None if math.isnan(x) else x


@store.one_writer
def compare_layers(session, groups, dataset: str, record_ids=None, limit=None, batch_size: int = 16,
                   device=None, progress=None) -> pa.Table:
    if isinstance(groups, str):
        raise DeepBaseError(f"groups must be a list of unit groups ('model:layer'), got the string {groups!r}")
    try:
        groups = list(groups)
    except TypeError:              # None (SQL NULL), a number: not "'NoneType' object is not iterable"
        raise DeepBaseError(f"groups must be a list of unit groups ('model:layer'), got {groups!r}") from None
    groups = [parse_group(g) for g in groups]
    if len(groups) < 2:
        raise DeepBaseError(f"compare_layers needs at least two unit groups, got {len(groups)}")
    session.check_dataset(dataset)
    by_model: dict[str, list[str]] = {}
    for model, layer in groups:
        session.model_row(model)
        session.check_layers(model, [layer])
        by_model.setdefault(model, [])
        if layer not in by_model[model]:
            by_model[model].append(layer)
    toks = {m: session.model_row(m)["tokenization"] for m in by_model}
    if len(set(toks.values())) > 1:
        raise DeepBaseError("compare_layers: the models' tokenisations differ, so their symbols do not line up: "
                            + ", ".join(f"{m}: {t}" for m, t in toks.items()))
    batch_size = check_int("batch_size", batch_size, 1)
    ids = session.select_records(dataset, record_ids, limit)
    if len(ids) == 0:
        raise EmptyDatasetError(f"no records selected from dataset {dataset!r}")
    widths = {(m, l): w for m in by_model for l, w in session.stored_widths(m).items()}
    dev = default_device(device)
    pairs = list(itertools.combinations(groups, 2))
    states = {(a, b): LinearCKAState(widths[a], widths[b], dev) for a, b in pairs}
    t0 = time.time()
    tokenization = next(iter(toks.values()))
    stored = {m: _stored_rows(session, m, by_model[m], dataset, ids, tokenization) for m in by_model}
    run = [m for m in by_model if stored[m] is None]
    adapters = {m: session.adapter(m) for m in run}
    # symbols come from the first model run's forward batches (one tokenisation for all: checked
    # above; stored activations come with their symbols); the streams are advanced in order, so
    # each batch's symbols are counted before the next model's
    counts = stored_symbol_counts(session, dataset, tokenization)
    symbols = SymbolWriter(session, tokenization, dataset, counts)
    blocks = plan_batches(session, dataset, ids, batch_size)
    streams = {m: (forward_batches(session, adapters[m], m, by_model[m], dataset, blocks, counts,
                                   symbols if run and m == run[0] else None) if stored[m] is None
                   else _read_stored(stored[m], blocks, counts)) for m in by_model}
    bar = progress_bar(len(ids), f"compare {len(groups)} groups", "rec",
                       session.progress if progress is None else progress)
    # every model run is locked for the whole scan; the locks are taken together, in one global
    # order: each stream's Retain would take its model's lock when first read, in the groups'
    # order, and compare_layers([A, B]) beside compare_layers([B, A]) (two stores sharing live
    # models, two threads) would each hold one lock and wait for the other
    try:
        with hold_model_locks([adapters[m].module for m in run]):
            for batches in zip(*streams.values()):
                acts = {(m, l): b.acts[l] for m, b in zip(streams, batches) for l in by_model[m]}
                for (a, b), st in states.items():
                    st.update(acts[a], acts[b])
                bar.update(len(batches[0].record_ids))
    finally:
        bar.close()
        for stream in streams.values():    # each model's hooks and model lock released now, not
            close = getattr(stream, "close", None)     # when a kept traceback lets go of them
            if close is not None:
                close()
        symbols.close(failed=sys.exc_info()[0] is not None)
    n = int(sum(counts[int(r)] for r in ids))
    if n == 0:
        raise EmptyDatasetError(f"the selected records of dataset {dataset!r} hold no symbols")
    con = session.con
    with store.Transaction(con):
        qid = int(store.q_scalar(con, "SELECT coalesce(max(query_id), 0) + 1 FROM queries"))
        con.execute("INSERT INTO queries (query_id, model, dataset, layers, measures, n_records, n_symbols, source, "
                    "started_at, seconds) VALUES (?, ?, ?, ?, ['cka'], ?, ?, ?, ?, ?)",
                    [qid, ",".join(by_model), dataset, [f"{m}:{l}" for m, l in groups], int(len(ids)), n,
                     "model" if len(run) == len(by_model) else "stored+model" if run else "stored",
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)), round(time.time() - t0, 4)])
        table = pa.table({
            "query_id": pa.array([qid] * len(pairs), pa.int32()),
            "dataset": pa.array([dataset] * len(pairs), pa.string()),
            "model_a": [a[0] for a, _ in pairs], "layer_a": [a[1] for a, _ in pairs],
            "model_b": [b[0] for _, b in pairs], "layer_b": [b[1] for _, b in pairs],
            "measure": pa.array(["cka"] * len(pairs), pa.string()),
            "score": pa.array([_defined(states[p].finalize()) for p in pairs], pa.float64()),
            "n": pa.array([n] * len(pairs), pa.int64()),
        })
        store.insert_arrow(con, "similarities", table)
    return table

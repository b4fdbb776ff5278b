"""The labels of each block of an inspect scan: one row per symbol, one column per label column.

For each block of records the stream
1. evaluates the hypotheses in Python for the records whose labels (of the hypothesis' current
   version) are not stored yet, and reads the stored spans of the others (read ahead: one
   query per ``CHUNK`` records of the scan order);
2. gives each symbol its value by the alignment rule (hypotheses/align.py: numpy, equal to the
   SQL reference ``symbol_labels`` of sql/10_alignment.sql) from the symbols' character ranges,
   which the forward pass hands over with the activations (or one query reads them);
3. appends the computed spans to the store every ``CHUNK`` records, with the ``labeled_records``
   marks, in one transaction: a later query (or model) reuses them, an interrupted scan keeps the
   chunks it wrote.

A block costs its hypotheses' Python time and a few numpy passes, with no store round trip in
the common case (labels computed in this scan). Computed on demand in the scan's thread: a
background thread preparing the next blocks was measured slower on 2 cores, where the forward
pass already uses both (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from .. import store
from ..hypotheses.align import align
from ..hypotheses.store import CHUNK, append_labels, labels_to_compute


class LabelStream:
    """``next(ids)``: the (rows, label columns) float64 tensor of a block, rows in (record order
    of ``ids``, pos) order, NaN = no label. ``close()`` writes the labels still buffered."""

    def __init__(self, session, plan, tokenization: str, counts: dict, order=None):
        """``order``: the scan's record ids in the order it will ask for them (optional: stored
        labels are then read ahead in chunks)."""
        self.session, self.plan, self.tokenization, self.counts = session, plan, tokenization, counts
        self.order = None if order is None else [int(r) for r in order]
        self.position = {} if order is None else {r: i for i, r in enumerate(self.order)}
        self.cache, self.fetched = {}, set()
        # a scan that reads stored layers one at a time meets each record once per layer: then
        # every record's spans stay cached for its next meeting (else they go after their block)
        self.repeats = self.order is not None and len(set(self.order)) != len(self.order)
        self.hyps = plan.hypotheses
        missing = labels_to_compute(session.con, self.hyps, plan.dataset, np.unique(plan.record_ids))
        self.missing = {name: set(ids.tolist()) for name, ids in missing.items()}
        self.pending, self.pending_records = [], set()
        self.checked = set()              # versions whose other versions are gone (append_labels, once per scan)

    # -- one block ---------------------------------------------------------------------------
    def next(self, ids, chars=None, texts=None) -> torch.Tensor:
        """``chars``: (starts, ends) of the block's symbols, rows in block order (None: read from
        the store); ``texts``: the records' texts in ``ids`` order (None: read when needed)."""
        ids = np.asarray(ids, np.int64)
        n_symbols = np.asarray([self.counts[int(r)] for r in ids], np.int64)
        if chars is None:
            chars = self._stored_chars(ids, n_symbols)
        need = [int(r) for r in ids if any(int(r) in self.missing[h["name"]] for h in self.hyps)]
        if need:
            if texts is None:
                got = self.session.texts(self.plan.dataset, need)
                texts = [got.get(int(r)) for r in ids]
            text_of = dict(zip(ids.tolist(), texts))
        stored = self._stored_spans(ids)
        values = {}
        for h in self.hyps:
            name = h["name"]
            parts = []                       # (block index, starts, ends, values) per record
            todo = [r for r in ids.tolist() if r in self.missing[name]]
            computed = dict(zip(todo, h["live"].spans_many([text_of[r] for r in todo],
                                                           [f"{self.plan.dataset}:{r}" for r in todo]))) if todo else {}
            for i, r in enumerate(ids.tolist()):
                if r in computed:
                    s, e, v = computed[r]
                    self._buffer(h, r, s, e, v)
                    if self.repeats:
                        self.cache[(name, r)] = (s, e, v)
                else:
                    s, e, v = stored.get((name, r), (np.zeros(0, np.int64),) * 2 + (np.zeros(0),))
                parts.append((np.full(len(s), i), s, e, v))
            cat = [np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in range(4)]
            values[name] = align(n_symbols, chars[0], chars[1], *cat, binary=h["kind"] == "binary")
        for r in need:                       # computed now: stored at the next flush
            for h in self.hyps:
                self.missing[h["name"]].discard(r)
            self.pending_records.add(r)
            self.fetched.add(r)              # known now: never read back from the store
        if len(self.pending_records) >= CHUNK:
            self.flush()
        return torch.from_numpy(label_matrix(self.session, self.plan, self.tokenization, ids, n_symbols, values))

    def _buffer(self, h: dict, r: int, s, e, v) -> None:
        self.pending.append((h["name"], h["version"], r, s, e, v))

    def _stored_spans(self, ids: np.ndarray) -> dict:
        """{(hypothesis, record): (starts, ends, values)} of the stored labels of the block's
        records. Read ahead: one query fetches the stored spans of the next ``CHUNK`` records of
        the scan order (``order``) that have any, so a scan over labelled data costs a query per
        CHUNK records, not per block (each query scans the labels table)."""
        stored_of = lambda r: [h for h in self.hyps if r not in self.missing[h["name"]]]  # noqa: E731
        want = [int(r) for r in ids if int(r) not in self.fetched and stored_of(int(r))]
        if want:
            fetch = list(want)
            if self.order is not None:
                start = min(self.position.get(r, len(self.order)) for r in want)
                for r in self.order[start:]:
                    if len(fetch) >= CHUNK:
                        break
                    if r not in self.fetched and r not in want and stored_of(r):
                        fetch.append(r)
            keys = [f"{h['name']}\x00{h['version']}" for h in self.hyps]
            t = store.q_arrow(self.session.con,
                              "SELECT hypothesis, record_id, start_char, end_char, value FROM labels "
                              "WHERE dataset = ? AND list_contains(?, record_id) "
                              "AND list_contains(?, hypothesis || chr(0) || version) "
                              "ORDER BY hypothesis, record_id, start_char",
                              [self.plan.dataset, fetch, keys])
            names = t.column(0).combine_chunks().dictionary_encode()     # a code per row, not a str
            hyp = names.indices.to_numpy(zero_copy_only=False)
            name_of = names.dictionary.to_pylist()
            rec = t.column(1).to_numpy().astype(np.int64)
            st, en = t.column(2).to_numpy().astype(np.int64), t.column(3).to_numpy().astype(np.int64)
            v = t.column(4).to_numpy(zero_copy_only=False).astype(np.float64)
            if len(rec):
                cut = np.flatnonzero((hyp[1:] != hyp[:-1]) | (rec[1:] != rec[:-1])) + 1
                for lo, hi in zip(np.r_[0, cut], np.r_[cut, len(rec)]):
                    self.cache[(name_of[hyp[lo]], int(rec[lo]))] = (st[lo:hi], en[lo:hi], v[lo:hi])
            self.fetched.update(fetch)
        out = {}
        for r in ids.tolist():
            for h in self.hyps:
                got = self.cache.get((h["name"], r)) if self.repeats else self.cache.pop((h["name"], r), None)
                if got is not None:
                    out[(h["name"], r)] = got
        return out

    def _stored_chars(self, ids: np.ndarray, n_symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, t = block_symbols(self.session, self.plan.dataset, self.tokenization, ids, n_symbols,
                                "start_char, end_char")
        starts, ends = np.zeros(int(n_symbols.sum()), np.int64), np.zeros(int(n_symbols.sum()), np.int64)
        starts[rows], ends[rows] = t.column(0).to_numpy(), t.column(1).to_numpy()
        return starts, ends

    # -- writes ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Append the buffered labels and their ``labeled_records`` marks in one transaction."""
        append_labels(self.session.con, self.plan.dataset, self.pending, self.checked)
        self.pending, self.pending_records = [], set()

    def close(self, failed: bool = False) -> None:
        """Write what is buffered. After a failure (``failed``) a failing write is not raised
        over the original error: those labels are simply computed again next time."""
        try:
            self.flush()
        except Exception:
            if not failed:
                raise


def block_symbols(session, dataset: str, tokenization: str, ids: np.ndarray, n_symbols: np.ndarray,
                  columns: str):
    """The stored symbols of a block's records (``ids``, in row order): each one's row in the
    block and a table of ``columns`` (SQL, from ``symbols``) in the same order."""
    t = store.q_arrow(session.con, f"SELECT record_id, pos, {columns} FROM symbols WHERE dataset = ? AND "
                                   "tokenization = ? AND list_contains(?, record_id)",
                      [dataset, tokenization, [int(r) for r in ids]])
    offsets = np.concatenate([[0], np.cumsum(n_symbols)])
    order = np.argsort(ids, kind="stable")
    rec = t.column(0).to_numpy().astype(np.int64)
    rows = offsets[order[np.searchsorted(ids[order], rec)]] + t.column(1).to_numpy().astype(np.int64)
    return rows, t.drop_columns(["record_id", "pos"])


def label_matrix(session, plan, tokenization: str, ids: np.ndarray, n_symbols: np.ndarray,
                 values: dict) -> np.ndarray:
    """The plan's label columns from each hypothesis' per-symbol values: a hypothesis' values as
    they are, one indicator column per category (``code``), control tasks (``control_of``).

    A control task's draw (which class each word type holds) is seeded by the probe's ``seed``
    (``inspect(..., control=True, probe={"seed": s})``, default 0), the seed of its split and
    sample: selectivity's spread is judged over several control draws, and a seed that changed
    the split but always drew the same control task would show only part of it."""
    n = int(n_symbols.sum())
    y = np.full((n, len(plan.label_columns)), np.nan)
    for j, c in enumerate(plan.label_columns):
        if c.get("control_of"):
            continue
        v = values[c["source"]]
        y[:, j] = v if c["code"] is None else np.where(np.isnan(v), np.nan, (v == c["code"]).astype(np.float64))
    controls = [(j, c) for j, c in enumerate(plan.label_columns) if c.get("control_of")]
    if controls:
        from ..inspectors.probes import control_labels
        srow, sym = block_symbols(session, plan.dataset, tokenization, ids, n_symbols, "token")
        types = np.array(sym.column(0).to_pylist(), dtype=object)
        types[types == None] = ""  # noqa: E711  (a symbol without token text is one type)
        seed = int((plan.measure_params or {}).get("probe", {}).get("seed", 0))   # (checked by the probe)
        for j, c in controls:
            real = y[:, [i for i, x in enumerate(plan.label_columns) if x["name"] == c["control_of"]][0]]
            freq = plan.control_freq[c["control_of"]]
            lab = np.full(n, np.nan)
            lab[srow] = control_labels(types, len(freq), freq, seed=seed)
            y[:, j] = np.where(np.isnan(real), np.nan, lab)     # the same symbols as the real task
    return y


def block_labels(session, plan, tokenization: str, record_ids, n_symbols) -> torch.Tensor:
    """The labels of one block of records, outside a scan (writes what it computes)."""
    ids = np.asarray(record_ids, np.int64)
    stream = LabelStream(session, plan, tokenization, dict(zip(ids.tolist(), np.asarray(n_symbols).tolist())))
    try:
        return stream.next(ids)
    finally:
        stream.close(failed=sys.exc_info()[0] is not None)


class LabelSupport:
    """How often a scan has seen each label column, for ``min_support``: a binary column's rarer
    value (the smaller of its counts of 1 and of 0), a categorical column's rarest category, a
    continuous column's labelled symbols. A record is counted once, however many times a scan
    meets it (stored layers read one at a time)."""

    def __init__(self, columns: list[dict]):
        self.columns = columns
        self.counts = [np.zeros(len(c["categories"]) if c["kind"] == "categorical" else
                                2 if c["kind"] == "binary" else 1, np.int64) for c in columns]
        self.seen: set[int] = set()

    def add(self, y, record_ids, n_symbols) -> None:
        """Count the labels ``y`` (rows x columns; NaN = none) of records ``record_ids`` with
        ``n_symbols`` rows each."""
        ids = np.asarray(record_ids, np.int64)
        new = np.array([int(r) not in self.seen for r in ids], bool)
        if not new.any():
            return
        y = np.asarray(y)
        if not new.all():
            y = y[np.repeat(new, np.asarray(n_symbols, np.int64))]
        self.seen.update(int(r) for r in ids[new])
        for j, c in enumerate(self.columns):
            v = y[:, j]
            v = v[~np.isnan(v)]
            if c["kind"] == "binary":
                self.counts[j] += (int((v == 0).sum()), int((v != 0).sum()))   # (any non-zero value: 1)
            elif c["kind"] == "categorical":
                k = len(self.counts[j])
                self.counts[j] += np.bincount(v.astype(np.int64).clip(0, k - 1), minlength=k)[:k]
            else:
                self.counts[j][0] += v.size

    def merge(self, other: "LabelSupport") -> "LabelSupport":
        """Add the counts of another stream's records (its own, distinct records)."""
        for j in range(len(self.columns)):
            self.counts[j] += other.counts[j]
        self.seen |= other.seen
        return self

    def support(self) -> dict[str, int]:
        return {c["name"]: int(n.min()) for c, n in zip(self.columns, self.counts)}

"""The engine's numpy alignment (hypotheses/align.py) equals the SQL reference ``symbol_labels``
(sql/10_alignment.sql) exactly, on random blocks with every case of the rule: single-character
symbols, word pieces voting across span edges, ties, characters outside every span, gaps between
symbols, symbols with no characters, records without spans."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import deepbase_duck as dbd
from deepbase_duck.hypotheses.align import align
from deepbase_duck import store


def random_block(rng, n_records: int, binary: bool, n_values: int):
    n_symbols, s_all, e_all, spans = [], [], [], []
    for r in range(n_records):
        length = int(rng.integers(0, 40))
        # symbols: consecutive pieces of 0-4 characters, sometimes leaving a gap (a space)
        s, e, c = [], [], 0
        while c < length:
            w = int(rng.integers(0, 5))
            s.append(c); e.append(min(c + w, length))
            c = e[-1] + int(rng.random() < 0.3) + (w == 0)
        n_symbols.append(len(s)); s_all += s; e_all += e
        # disjoint spans with values (binary: value 1)
        c = int(rng.integers(0, 4))
        while c < length:
            w = int(rng.integers(1, 6))
            v = 1.0 if binary else float(rng.integers(0, n_values))
            spans.append((r, c, min(c + w, length), v))
            c = min(c + w, length) + int(rng.integers(0, 4))
    return np.array(n_symbols), np.array(s_all), np.array(e_all), spans


@pytest.mark.parametrize("kind,n_values", [("binary", 2), ("categorical", 3), ("continuous", 7)])
def test_numpy_alignment_equals_symbol_labels(kind, n_values):
    rng = np.random.default_rng({"binary": 1, "categorical": 2, "continuous": 3}[kind])
    con = dbd.connect(None, progress=False)
    try:
        n_symbols, starts, ends, spans = random_block(rng, 60, kind == "binary", n_values)
        ids = np.arange(100, 160)                      # record ids differ from block positions
        rec = np.repeat(ids, n_symbols)
        pos = np.concatenate([np.arange(n) for n in n_symbols])
        store.insert_arrow(con, "symbols", pa.table({
            "dataset": ["d"] * len(rec), "tokenization": ["t"] * len(rec), "record_id": rec.astype(np.int32),
            "pos": pos.astype(np.int32), "start_char": starts.astype(np.int32), "end_char": ends.astype(np.int32),
            "token": [None] * len(rec)}))
        con.execute("INSERT INTO hypotheses VALUES ('h', ?, '', 'v1', ?, '')",
                    [kind, ["a", "b", "c"] if kind == "categorical" else None])
        sr, ss, se, sv = (np.array([x[i] for x in spans]) for i in range(4))
        store.insert_arrow(con, "labels", pa.table({
            "hypothesis": ["h"] * len(sr), "version": ["v1"] * len(sr), "dataset": ["d"] * len(sr),
            "record_id": ids[sr].astype(np.int32), "start_char": ss.astype(np.int32),
            "end_char": se.astype(np.int32), "value": sv.astype(np.float64)}))
        rows = con.execute("SELECT record_id, pos, value FROM symbol_labels('d', 't', ['h'])").fetchall()
        expected = np.full(len(rec), np.nan)
        first_row = dict(zip(ids.tolist(), (np.cumsum(n_symbols) - n_symbols).tolist()))
        for r, p, v in rows:
            expected[first_row[r] + p] = np.nan if v is None else v
        got = align(n_symbols, starts, ends, sr, ss, se, sv, binary=kind == "binary")
        np.testing.assert_array_equal(got, expected)
        # the block covers every case of the rule
        width = ends - starts
        assert (width == 0).any() and (width == 1).any() and (width > 1).any()
        assert np.isnan(got[width == 0]).all()
    finally:
        dbd.close(con)


def test_alignment_ties_go_to_the_earliest_character():
    # one symbol of 4 characters: 2 inside a span of value 2, 2 outside (NaN for categorical)
    got = align([1], [0], [4], [0], [2], [4], [2.0], binary=False)
    assert np.isnan(got[0])                              # the earliest tied character is outside
    got = align([1], [0], [4], [0], [0], [2], [2.0], binary=False)
    assert got[0] == 2.0
    got = align([1], [0], [3], [0], [1], [3], [1.0], binary=True)
    assert got[0] == 1.0                                 # 2 of 3 characters inside
    got = align([2], [0, 3], [3, 4], [0], [3], [4], [1.0], binary=True)
    np.testing.assert_array_equal(got, [0.0, 1.0])       # outside = 0 for binary

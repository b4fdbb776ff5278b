"""The alignment rule of sql/10_alignment.sql in numpy, for the engine's hot loop.

Labels live on character spans, symbols cover character spans too. A symbol takes the value held
by the majority of its characters, where a character outside every span holds the hypothesis'
default (0 for binary, NaN = unlabelled otherwise); a tie goes to the value of the earliest of
the tied characters; a symbol with no characters has no label (NaN).

``symbol_labels`` (SQL) is the reference, used from the DuckDB shell and by every query over the
stored tables; the engine labels each block of records with ``align`` instead, from the spans it
has just computed (or read) and the symbols' character ranges it already holds, without a round
trip through the store. ``tests/test_alignment.py`` checks that the two agree exactly.
"""
from __future__ import annotations

import numpy as np


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of range(s, s + n) for each (s, n): one vectorised expansion."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    first = np.cumsum(lengths) - lengths             # where each range starts in the output
    return np.repeat(np.asarray(starts, np.int64) - first, lengths) + np.arange(total)


def align(n_symbols, sym_starts, sym_ends, span_record, span_starts, span_ends, span_values,
          binary: bool) -> np.ndarray:
    """Each symbol's value under one hypothesis, for a block of records.

    ``n_symbols``: symbols per record, records in block order; ``sym_starts``/``sym_ends``: the
    symbols' character ranges within their record, concatenated in (record, pos) order;
    ``span_record`` (index of the record in the block), ``span_starts``, ``span_ends``,
    ``span_values``: the hypothesis' labelled spans (disjoint within a record, as
    ``Hypothesis.spans`` returns them). Returns float64 (sum(n_symbols),), NaN = no label."""
    n_symbols = np.asarray(n_symbols, np.int64)
    sym_rec = np.repeat(np.arange(len(n_symbols)), n_symbols)
    starts, ends = np.asarray(sym_starts, np.int64), np.asarray(sym_ends, np.int64)
    span_record = np.asarray(span_record, np.int64)
    span_starts, span_ends = np.asarray(span_starts, np.int64), np.asarray(span_ends, np.int64)
    # one character array for the block: record r's characters at off[r] .. off[r] + extent[r]
    extent = np.zeros(len(n_symbols), np.int64)
    np.maximum.at(extent, sym_rec, ends)
    np.maximum.at(extent, span_record, span_ends)
    off = np.cumsum(extent) - extent
    chars = np.full(int(extent.sum()), 0.0 if binary else np.nan)
    lengths = span_ends - span_starts
    chars[_ranges(off[span_record] + span_starts, lengths)] = np.repeat(np.asarray(span_values, np.float64), lengths)
    g_start, width = off[sym_rec] + starts, ends - starts
    out = np.full(len(starts), np.nan)
    single = width == 1
    out[single] = chars[g_start[single]]
    multi = np.flatnonzero(width > 1)
    if multi.size:
        mw = width[multi]
        sym = np.repeat(np.arange(multi.size), mw)      # which multi-character symbol
        c = _ranges(g_start[multi], mw)                  # its characters, ascending
        v = chars[c]
        nan = np.isnan(v)
        values, code = np.unique(v[~nan], return_inverse=True)
        codes = np.full(len(v), len(values), np.int64)   # NaN is one more value, as NULL in SQL
        codes[~nan] = code
        pair = sym * (len(values) + 1) + codes
        uniq, first, count = np.unique(pair, return_index=True, return_counts=True)
        who, what = uniq // (len(values) + 1), uniq % (len(values) + 1)
        # per symbol: most characters, then the earliest first character
        order = np.lexsort((c[first], -count, who))
        lead = order[np.r_[True, who[order][1:] != who[order][:-1]]]
        won = np.append(values, np.nan)[what[lead]]
        out[multi[who[lead]]] = won
    return out

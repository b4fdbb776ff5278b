"""Which error bound should a progressive correlation scan use? An offline study (issue: query
optimisation, item 2).

    .venv/bin/python benchmarks/study_intervals.py                 # 1M held-out characters, 20 seeds

The engine's progressive scans bound each correlation by batch means: the spread of the scores
of windows of 16 whole records, t_{k-1} sd / sqrt(k) over k windows (engine/inspect.py,
``batch_means_half_width``). A record-level alternative is the linearised ("cluster-robust",
delta-method) variance of r with records as clusters: r is a function of six sums (n, Sx, Sy,
Sxx, Syy, Sxy); each record's influence is the gradient of r at the totals times the record's
own sums, and var(r) = (1 - N/N_total) N / (N - 1) * sum of the squared influences, with t_{N-1}
and the finite-population correction (the target is the full scan's score). Its variance
estimate has N - 1 degrees of freedom instead of k - 1, so it needs fewer records to bring the
largest of 2,560 half-widths under a given max_error.

This script runs the bundled char-LSTM over the held-out code once, keeps each record's six sums
for every (unit, hypothesis) pair (not the activations), and then, for seeded record orders and
prefixes of N records, compares the two bounds: the largest half-width (what the stop rule
reads) and the coverage (the share of the 2,560 intervals that hold the full scan's score).
Coverage is one event per (seed, N) shared by every score of that sample, so it is read over
many seeds.

A second table replays the ranking query's stop rule (``top_k``: every (layer, hypothesis)
top-10 set by |r| unchanged over ``stable_windows`` windows of 16 records, after at least 5
windows) on the same seeded orders, for several ``stable_windows``, and a looser rule (at most
one member changed over the last m windows), and reports where each stops and how many of the
full scan's top 10 it holds: how many records a top-10 agreement of 9 in 10 costs here.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_baseline as bb  # noqa: E402  (the workload's records, hypotheses and layers)


def record_sums(texts, threads: int) -> list[np.ndarray]:
    """Per record: n (H), Sx (U, H), Sy (H), Sxx (U, H), Syy (H), Sxy (U, H) over the symbols each
    hypothesis labels, activations and labels shifted by the first record's means."""
    import torch
    import deepbase_duck.hypotheses.library  # noqa: F401
    from deepbase_duck.extraction.hooks import Retain
    from deepbase_duck.hypotheses.core import get_hypothesis
    from deepbase_duck.models.zoo import charlstm
    bb.limit_threads(threads)
    adapter = charlstm("final", device="cpu")
    hyps = [get_hypothesis(h) for h in bb.HYPS]
    sums, shift = [], None
    with Retain(adapter.module, bb.LAYERS) as ret:
        for lo in range(0, len(texts), 16):
            batch = texts[lo:lo + 16]
            with torch.inference_mode():
                adapter.forward(adapter.encode(batch))
            for b, t in enumerate(batch):
                x = np.concatenate([ret[layer][b, :len(t)].float().numpy() for layer in bb.LAYERS], 1).astype(np.float64)
                y = np.stack([bb.per_char_labels(h, t) for h in hyps], 1)
                if shift is None:
                    shift = x.mean(0), np.nanmean(y, 0)
                x = x - shift[0]
                m = ~np.isnan(y)
                y0, mf = np.where(m, y - shift[1], 0.0), m.astype(np.float64)
                sums.append((mf.sum(0), x.T @ mf, y0.sum(0), (x * x).T @ mf, (y0 * y0).sum(0), x.T @ y0))
    parts = [np.stack([s[j] for s in sums]) for j in range(6)]
    for j in (0, 2, 4):                          # per-hypothesis sums broadcast over units
        parts[j] = parts[j][:, None, :]
    return parts


def pearson(n, sx, sy, sxx, syy, sxy):
    a, b, c = n * sxy - sx * sy, n * sxx - sx ** 2, n * syy - sy ** 2
    with np.errstate(all="ignore"):
        return a / np.sqrt(b * c), b, c


def linearised_half(parts, N: int, n_total: int, confidence: float) -> np.ndarray:
    from scipy import stats
    tn, tsx, tsy, tsxx, tsyy, tsxy = (p[:N].sum(0) for p in parts)
    r, b, c = pearson(tn, tsx, tsy, tsxx, tsyy, tsxy)
    s = np.sqrt(b * c)
    grad = [tsxy / s - r / 2 * (tsxx / b + tsyy / c), -tsy / s + r * tsx / b, -tsx / s + r * tsy / c,
            -r / 2 * tn / b, -r / 2 * tn / c, tn / s]
    z = sum(g * p[:N] for g, p in zip(grad, parts))          # each record's influence on r
    var = (1 - N / n_total) * N / (N - 1) * (z ** 2).sum(0)
    return stats.t.ppf(0.5 + confidence / 2, N - 1) * np.sqrt(var)


def batch_means_half(parts, N: int, window: int, confidence: float) -> np.ndarray:
    from deepbase_duck.engine.inspect import batch_means_half_width
    scores = [pearson(*(p[lo:lo + window].sum(0) for p in parts))[0].reshape(-1) for lo in range(0, N, window)]
    return batch_means_half_width(scores, confidence).reshape(parts[1].shape[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chars", type=int, default=1_000_000)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--prefixes", type=int, nargs="+", default=[96, 160, 256, 384, 512])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    texts = [r["text"] for r in bb.records_for(a.chars, 600)]
    t0 = time.perf_counter()
    parts = record_sums(texts, a.threads)
    n_total = len(texts)
    full = pearson(*(p.sum(0) for p in parts))[0]
    print(f"{n_total} records, {sum(map(len, texts))} characters, sums in {time.perf_counter() - t0:.0f} s; "
          f"{a.seeds} seeded orders, windows of 16 records, 95% intervals")
    # a prefix longer than the corpus is the full scan: its finite-population correction turns
    # negative (NaN half-widths, coverage 0); left out, and said so
    prefixes = [N for N in a.prefixes if N <= n_total]
    if len(prefixes) < len(a.prefixes):
        print(f"prefixes over the {n_total} records left out: {', '.join(str(N) for N in a.prefixes if N > n_total)} "
              "(--chars gives more records)")
    print(f"{'N':>5} {'lin max half':>12} {'bm max half':>11} {'lin coverage mean/min':>22} {'bm coverage mean/min':>21}")
    for N in prefixes:
        row = {"lin": ([], []), "bm": ([], [])}
        for seed in range(a.seeds):
            order = np.random.default_rng(seed).permutation(n_total)
            p = [x[order] for x in parts]
            r = pearson(*(x[:N].sum(0) for x in p))[0]
            ok = ~np.isnan(r) & ~np.isnan(full)
            for name, half in (("lin", linearised_half(p, N, n_total, 0.95)), ("bm", batch_means_half(p, N, 16, 0.95))):
                row[name][0].append(np.nanmax(half[ok]))
                row[name][1].append(np.mean(np.abs(r - full)[ok] <= half[ok]))
        print(f"{N:>5} {np.mean(row['lin'][0]):>12.3f} {np.mean(row['bm'][0]):>11.3f} "
              f"{np.mean(row['lin'][1]):>14.3f} / {np.min(row['lin'][1]):.3f} "
              f"{np.mean(row['bm'][1]):>13.3f} / {np.min(row['bm'][1]):.3f}", flush=True)
    agreement_by_prefix(parts, full, a.seeds, sorted(N for N in set(prefixes) | {176, 700, 1072} if N <= n_total))
    replay_ranking(parts, full, a.seeds)
    replay_ranking(parts, full, a.seeds, layers=1)


def top10(r: np.ndarray, layers: int) -> list[frozenset]:
    """The top-10 units by |r| of every (layer, hypothesis), layers stacked along the units; with
    ``layers=1``, of every hypothesis over all the model's units."""
    out = []
    for block in np.split(np.nan_to_num(np.abs(r), nan=-1.0), layers):
        out += [frozenset(np.argsort(-block[:, j], kind="stable")[:10].tolist()) for j in range(block.shape[1])]
    return out


def agreement_by_prefix(parts, full: np.ndarray, seeds: int, prefixes: list[int]) -> None:
    """How many of the full scan's top 10 a prefix of N records holds, per (layer, hypothesis) and
    per hypothesis over all units of both layers (the model's top 10), over seeded orders."""
    n_total = parts[0].shape[0]
    want = {"layer": top10(full, len(bb.LAYERS)), "model": top10(full, 1)}
    print(f"\ntop-10 agreement of the first N records with the full scan, {seeds} seeded orders "
          f"(min over seeds of the worst set / mean over seeds and sets)")
    print(f"{'N':>5} {'per (layer, hypothesis)':>24} {'per hypothesis, model-wide':>27}")
    for N in prefixes:
        got = {"layer": [], "model": []}
        for seed in range(seeds):
            order = np.random.default_rng(seed).permutation(n_total)
            r = pearson(*(x[order[:N]].sum(0) for x in parts))[0]
            for kind, layers in (("layer", len(bb.LAYERS)), ("model", 1)):
                got[kind].append([len(a & b) for a, b in zip(top10(r, layers), want[kind])])
        cells = [f"{np.min([min(g) for g in got[k]]):>2} / {np.mean(got[k]):.2f}" for k in ("layer", "model")]
        print(f"{N:>5} {cells[0]:>24} {cells[1]:>27}", flush=True)


def rank_rules() -> dict:
    rules = {}
    for m in (2, 3, 5, 8):
        rules[f"same top-10 over {m} windows"] = (lambda m: lambda h: len(h) > m and all(x == h[-1] for x in h[-m - 1:]))(m)
    for m in (4, 8):
        rules[f"<= 1 change over {m} windows"] = (lambda m: lambda h: len(h) > m and
                                                 all(len(x & h[-1]) >= 9 for x in h[-m - 1:]))(m)
    return rules


def replay_ranking(parts, full: np.ndarray, seeds: int, window: int = 16, min_windows: int = 5,
                   layers: int | None = None) -> None:
    """``layers=1``: the sets are each hypothesis' top 10 over all units of the model."""
    n_total = parts[0].shape[0]
    layers = len(bb.LAYERS) if layers is None else layers
    want = top10(full, layers)
    rules = rank_rules()
    stops = {k: [] for k in rules}
    for seed in range(seeds):
        order = np.random.default_rng(seed).permutation(n_total)
        cum = [np.cumsum(x[order], 0) for x in parts]
        history, done = [], {}
        for w in range(1, n_total // window + 1):
            history.append(top10(pearson(*(c[w * window - 1] for c in cum))[0], layers))
            for name, rule in rules.items():
                if name not in done and w >= min_windows and all(rule([h[p] for h in history]) for p in range(len(want))):
                    agree = [len(a & b) for a, b in zip(history[-1], want)]
                    done[name] = (w * window, min(agree), float(np.mean(agree)))
            if len(done) == len(rules):
                break
        for name in rules:
            stops[name].append(done.get(name, (n_total, 10, 10.0)))
    sets = "per (layer, hypothesis)" if layers > 1 else "per hypothesis, model-wide"
    print(f"\nranking stop rules over {seeds} seeded orders ({n_total} records; a rule that never fires "
          f"scans them all), top-10 sets {sets}")
    print(f"{'rule':<30} {'records mean':>12} {'max':>6} {'seeds with min >= 9/10':>23} {'worst min':>9} {'mean':>6}")
    for name, v in stops.items():
        v = np.array(v)
        print(f"{name:<30} {v[:, 0].mean():>12.0f} {v[:, 0].max():>6.0f} {np.mean(v[:, 1] >= 9):>23.2f} "
              f"{v[:, 1].min():>9.0f} {v[:, 2].mean():>6.2f}")


if __name__ == "__main__":
    main()

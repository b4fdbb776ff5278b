"""Which stop rule should a ranking query (``top_k``) use? An offline study (issue: query
optimisation, item 2 and its 9-of-10 target).

    .venv/bin/python benchmarks/study_topk_rules.py --chars 4000000 --split all     # the benchmark's corpus

The engine's ranking rule so far stops when every top-k set has stayed the same over
``stable_windows`` windows. Stability says nothing about near-ties: a set can stay put for a
few windows while its k-th and (k+1)-th units are a coin toss apart, and a longer wait costs
records whatever the gaps. This study replays, on seeded record orders, that rule beside a
*separation* rule that reads the scan's own error bounds (batch means over windows, the bound
``max_error`` uses): in every set, count the members of the current top k whose lower bound on
|score| lies above the highest upper bound of every unit outside the set; stop once that count
is at least k - ``tolerance`` in every set. With tolerance 1, the rule stops when at most one
place of each top k is still uncertain, so when the intervals hold, at least k - 1 of the
reported units are in the full scan's top k (a LUCB-style top-k identification rule).

The char-LSTM runs once over the corpus and each record's six sums per (unit, hypothesis) are
kept (study_intervals.record_sums); every rule then replays on the same seeded orders, windows of
16 records, at least 5 windows, and reports the records it reads, how many of the full scan's
top 10 it holds (worst set of a run, mean over sets), and in how many orders every set held 9.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_baseline as bb  # noqa: E402
from study_intervals import pearson, record_sums  # noqa: E402


def t_quantile(k: np.ndarray, confidence: float) -> np.ndarray:
    from scipy import stats
    return stats.t.ppf(0.5 + confidence / 2, np.maximum(k - 1, 1))


def sets_and_bounds(r_cum: np.ndarray, half: np.ndarray, k: int, layers: int):
    """Per (layer, hypothesis): the current top-k (unit indices) and how many of them are
    separated (lower bound above every outsider's upper bound)."""
    out = []
    a = np.nan_to_num(np.abs(r_cum), nan=-1.0)
    for block, hb in zip(np.split(a, layers), np.split(half, layers)):
        for j in range(block.shape[1]):
            s, h = block[:, j], hb[:, j]
            order = np.argsort(-s, kind="stable")
            top, rest = order[:k], order[k:]
            upper_out = np.max(s[rest] + h[rest]) if len(rest) else -np.inf
            settled = int(np.sum(s[top] - h[top] > upper_out))
            out.append((frozenset(top.tolist()), settled))
    return out


def replay(parts, full, seeds: int, k: int, window: int, min_windows: int, confidence: float, rules: dict):
    n_total = parts[0].shape[0]
    layers = len(bb.LAYERS)
    want = [s for s, _ in sets_and_bounds(full, np.zeros_like(full), k, layers)]
    stops = {name: [] for name in rules}
    settled_at_end = []
    for seed in range(seeds):
        order = np.random.default_rng(seed).permutation(n_total)
        p = [x[order] for x in parts]
        cum = [np.zeros_like(x[0]) for x in p]
        kw = np.zeros(full.shape, np.int64)          # window moments of the window scores (Welford)
        mean, m2 = np.zeros(full.shape), np.zeros(full.shape)
        history, done, cur = [], {}, []
        for w in range(n_total // window):
            blk = [x[w * window:(w + 1) * window].sum(0) for x in p]
            cum = [c + b for c, b in zip(cum, blk)]
            rw = pearson(*blk)[0]
            ok = ~np.isnan(rw)
            kw += ok
            d = np.where(ok, rw - mean, 0.0)
            mean += d / np.maximum(kw, 1)
            m2 += np.where(ok, d * (np.nan_to_num(rw) - mean), 0.0)
            windows = w + 1
            if windows < 2:
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                half = t_quantile(kw, confidence) * np.sqrt(m2 / np.maximum(kw - 1, 1)) / np.sqrt(np.maximum(kw, 1))
            half = np.where(kw <= 1, np.inf, half)
            cur = sets_and_bounds(pearson(*cum)[0], half, k, layers)
            history.append([s for s, _ in cur])
            for name, rule in rules.items():
                if name not in done and windows >= min_windows and rule(history, cur, k):
                    agree = [len(a & b) for a, b in zip(history[-1], want)]
                    done[name] = (windows * window, min(agree), float(np.mean(agree)))
            if len(done) == len(rules):
                break
        if len(done) < len(rules):                   # read to the end: how separated the sets are there
            settled_at_end.append([settled for _, settled in cur])
        for name in rules:
            stops[name].append(done.get(name, (n_total, k, float(k))))
    return stops, np.array(settled_at_end)


def rules_to_try(windows=(3, 4, 5, 6, 8)) -> dict:
    rules = {}
    for m in windows:
        rules[f"same top-k over {m} windows"] = (
            lambda m: lambda h, cur, k: len(h) > m and all(x == h[-1] for x in h[-m - 1:]))(m)
    for frac in (0.5, 0.33):       # the sets unchanged since the scan had read (1 - frac) of its records
        rules[f"same top-k over the last {frac:.0%}"] = (
            lambda frac: lambda h, cur, k: len(h) >= 8 and all(
                x == h[-1] for x in h[-max(2, int(round(frac * len(h)))):]))(frac)
    for tol in (0, 1, 2):
        rules[f"separated, tolerance {tol}"] = (
            lambda tol: lambda h, cur, k: all(settled >= k - tol for _, settled in cur))(tol)
    rules["separated tol 1 or same over 8"] = (
        lambda h, cur, k: all(s >= k - 1 for _, s in cur) or (len(h) > 8 and all(x == h[-1] for x in h[-9:])))
    rules["separated tol 1 and same over 3"] = (
        lambda h, cur, k: all(s >= k - 1 for _, s in cur) and len(h) > 3 and all(x == h[-1] for x in h[-4:]))
    return rules


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chars", type=int, default=1_000_000)
    ap.add_argument("--split", choices=["heldout", "train", "all"], default="heldout")
    ap.add_argument("--record-chars", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", default="3,4,5,6,8",
                    help="the stability rules to replay: same top-k over m windows, for these m")
    ap.add_argument("--sums", help="an .npz file keeping the per-record sums between runs (made if missing)")
    a = ap.parse_args()
    texts = [r["text"] for r in bb.records_for(a.chars, a.record_chars, a.split)]
    t0 = time.perf_counter()
    if a.sums and os.path.exists(a.sums):
        with np.load(a.sums) as z:
            parts = [z[f"p{i}"] for i in range(len(z.files))]
    else:
        parts = record_sums(texts, a.threads)
        if a.sums:
            np.savez(a.sums, **{f"p{i}": x for i, x in enumerate(parts)})
    full = pearson(*(p.sum(0) for p in parts))[0]
    n_total = len(texts)
    print(f"{n_total} records, {sum(map(len, texts))} characters, sums in {time.perf_counter() - t0:.0f} s; "
          f"{a.seeds} seeded orders, windows of 16 records, {a.confidence:.0%} batch-means bounds, top {a.k}", flush=True)
    t0 = time.perf_counter()
    rules = rules_to_try(tuple(int(m) for m in a.windows.split(",")))
    stops, settled = replay(parts, full, a.seeds, a.k, 16, 5, a.confidence, rules)
    print(f"replayed in {time.perf_counter() - t0:.0f} s")
    print(f"{'rule':<34} {'records mean':>12} {'share':>6} {'max':>6} {'orders with min >= k-1':>23} "
          f"{'worst min':>9} {'mean':>6}")
    for name, v in stops.items():
        v = np.array(v)
        print(f"{name:<34} {v[:, 0].mean():>12.0f} {v[:, 0].mean() / n_total:>6.2f} {v[:, 0].max():>6.0f} "
              f"{np.mean(v[:, 1] >= a.k - 1):>23.2f} {v[:, 1].min():>9.0f} {v[:, 2].mean():>6.2f}")
    if len(settled):
        print(f"\nwith all {n_total} records read ({len(settled)} orders; the bounds differ by order): members of each "
              f"top {a.k} separated from every outsider, per set: min {settled.min()}, median "
              f"{np.median(settled):.0f}, sets with >= {a.k - 1}: {np.mean(settled >= a.k - 1):.2f}; "
              f"per set (min over orders): {settled.min(0).tolist()}")


if __name__ == "__main__":
    main()

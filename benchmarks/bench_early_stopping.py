"""Early stopping vs the full scan, side by side on one store (issue: query optimisation).

    .venv/bin/python benchmarks/bench_early_stopping.py                 # 600k characters
    .venv/bin/python benchmarks/bench_early_stopping.py --chars 300000 --max-error 0.15 0.1

Workload: the bundled char-LSTM (final), layer lstm1 (256 units), hypotheses in_string,
in_comment, bracket_depth, held-out standard-library code. For each max_error: the time of the
progressive scan against the full scan's, the records used, the bound reached, the coverage
(share of scores whose reported interval contains the full-scan score) and, per hypothesis, how
many of the early-stopped top-10 units (by |r|) are in the full scan's top 10.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import deepbase_duck as dbd
from deepbase_duck.corpora.code import code_records

HYPS = ["in_string", "in_comment", "bracket_depth"]


def top10(rows, h):
    ok = [r for r in rows if r["hypothesis"] == h and r["score"] is not None]
    return [r["unit"] for r in sorted(ok, key=lambda r: -abs(r["score"]))[:10]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chars", type=int, default=600_000)
    ap.add_argument("--max-error", type=float, nargs="+", default=[0.15, 0.1])
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    con = dbd.connect(None, progress=False)
    dbd.register_model(con, "charlstm", "deepbase_duck.models.zoo:charlstm")
    n = dbd.add_dataset(con, "held", code_records("heldout", limit_chars=a.chars))
    dbd.annotate(con, HYPS, "held")                      # labels once, as a study would have them
    t0 = time.perf_counter()
    full = dbd.inspect(con, "charlstm", ["lstm1"], HYPS, "held").to_pylist()
    t_full = time.perf_counter() - t0
    f = {(r["unit"], r["hypothesis"]): r["score"] for r in full}
    print(f"full scan: {n} records, {t_full:.2f} s")
    print(f"{'max_error':>9} {'seconds':>8} {'fraction':>8} {'records':>8} {'bound':>7} {'coverage':>8}  top-10 agreement")
    for me in a.max_error:
        t0 = time.perf_counter()
        early = dbd.inspect(con, "charlstm", ["lstm1"], HYPS, "held", max_error=me, seed=a.seed).to_pylist()
        t = time.perf_counter() - t0
        used, params = con.sql("SELECT n_records, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
        bound = json.loads(params)["bound_reached"]
        inside = [e["ci_low"] <= f[(e["unit"], e["hypothesis"])] <= e["ci_high"] for e in early
                  if e["score"] is not None and f[(e["unit"], e["hypothesis"])] is not None]
        agree = ", ".join(f"{h} {len(set(top10(full, h)) & set(top10(early, h)))}/10" for h in HYPS)
        print(f"{me:>9} {t:>8.2f} {t / t_full:>8.2f} {used:>8} {bound:>7.3f} {np.mean(inside):>8.3f}  {agree}")
    dbd.close(con)


if __name__ == "__main__":
    main()

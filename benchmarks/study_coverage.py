"""How often an early-stopped corr query's intervals hold the full scan's score, over seeded
record orders: the coverage of one run is one draw shared by every score (they come from the
same records), so its rate is read over many seeds.

    .venv/bin/python benchmarks/study_coverage.py --chars 4000000 --seeds 20 --max-error 0.15

bench_baseline.py's workload (the char-LSTM, layers lstm0 and lstm1, its five hypotheses, records
of the standard library, labels stored first). One full corr scan, then one progressive query
per seed (``max_error``, ``seed``), none of them stored (``store_scores=False``: no cache hit
between them). Prints per seed the records read, the bound reached and the coverage overall and
per hypothesis, then their mean, minimum and maximum. Counts only: a busy machine changes no
figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chars", type=int, default=4_000_000)
    ap.add_argument("--split", choices=["heldout", "train", "all"], default="all")
    ap.add_argument("--seeds", type=int, default=20, help="seeds 1..N")
    ap.add_argument("--max-error", type=float, default=0.15)
    ap.add_argument("--confidence", type=float, default=0.95)
    a = ap.parse_args()
    from bench_baseline import HYPS, LAYERS, engine_corr, limit_threads, records_for
    limit_threads(2)
    import deepbase_duck as dbd
    records = records_for(a.chars, 600, a.split)
    with tempfile.TemporaryDirectory() as tmp:
        con = dbd.connect(os.path.join(tmp, "c.duckdb"), progress=False)
        dbd.register_model(con, "charlstm", "deepbase_duck.models.zoo:charlstm", {"checkpoint": "final"})
        dbd.add_dataset(con, "held", records)
        dbd.annotate(con, HYPS, "held")
        full = dbd.inspect(con, "charlstm", LAYERS, HYPS, "held", measures=["corr"], store_scores=False)
        f, _, _ = engine_corr(full.to_pylist(), LAYERS, HYPS, 256)
        print(f"{len(records)} records, {sum(len(r['text']) for r in records)} characters; "
              f"max_error {a.max_error}, confidence {a.confidence}")
        print("seed records  bound coverage  " + "  ".join(h[:12] for h in HYPS))
        covs, per = [], []
        for seed in range(1, a.seeds + 1):
            t = dbd.inspect(con, "charlstm", LAYERS, HYPS, "held", measures=["corr"], max_error=a.max_error,
                            seed=seed, store_scores=False, corr={"confidence": a.confidence})
            params = json.loads(t.schema.metadata[b"queries.params"])
            e, lo, hi = engine_corr(t.to_pylist(), LAYERS, HYPS, 256)
            ok = ~np.isnan(e) & ~np.isnan(f)
            inside = (lo <= f) & (f <= hi)
            covs.append(float(inside[ok].mean()))
            per.append([float(inside[:, :, j][ok[:, :, j]].mean()) for j in range(len(HYPS))])
            print(f"{seed:4d} {params.get('records_used'):7d} {params.get('bound_reached'):6.3f} {covs[-1]:8.3f}  "
                  + "  ".join(f"{c:12.3f}" for c in per[-1]), flush=True)
        dbd.close(con)
    covs = np.asarray(covs)
    print(f"coverage over {len(covs)} seeds: mean {covs.mean():.3f}, min {covs.min():.3f}, max {covs.max():.3f}; "
          f"seeds at or above {a.confidence}: {(covs >= a.confidence).sum()} of {len(covs)}; per hypothesis mean "
          + ", ".join(f"{h} {c:.3f}" for h, c in zip(HYPS, np.mean(per, 0))))


if __name__ == "__main__":
    main()

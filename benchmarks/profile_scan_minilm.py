"""cProfile of one MiniLM-L6 corr scan over PTB sentences (labels stored first), to see where a
full scan's or a ranking scan's time goes beside the forward passes.

    .venv/bin/python benchmarks/profile_scan_minilm.py --sentences 1000 --kind rank
    .venv/bin/python benchmarks/profile_scan_minilm.py --sentences 1000 --kind full

``rank`` is bench_baseline_minilm.py's ranking query (``top_k := 10``, ``min_support := 50``, seed
1) with ``stable_windows`` set out of reach, so that it reads every window and its stop-rule
cost can be compared across versions on the same work; ``full`` is the corr-only full scan.
Prints the inspect time, the top functions by own time, and the stop rule's functions.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--kind", choices=["rank", "full"], default="rank")
    ap.add_argument("--top", type=int, default=22, help="functions to list by own time")
    a = ap.parse_args()
    import bench_baseline_minilm as bm
    from bench_baseline import limit_threads
    limit_threads(2)
    import deepbase_duck as dbd
    records = bm.records_for(a.sentences, "train", 0)
    with tempfile.TemporaryDirectory() as tmp:
        con = dbd.connect(os.path.join(tmp, "p.duckdb"), progress=False)
        dbd.register_model(con, "minilm", "deepbase_duck.models.zoo:minilm")
        dbd.add_dataset(con, "ptb", records)
        dbd.annotate(con, [bm.HYP], "ptb")
        kw = dict(top_k=10, seed=1, min_support=50, stable_windows=10 ** 6) if a.kind == "rank" else {}
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        dbd.inspect(con, "minilm", bm.LAYERS, [bm.HYP], "ptb", measures=["corr"], batch_size=32, **kw)
        prof.disable()
        print(f"{a.kind}: inspect {time.perf_counter() - t0:.2f} s over {a.sentences} sentences")
        dbd.close(con)
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(a.top)
    stats.sort_stats("cumtime").print_stats(r"\(check\)|_score_matrix|top_sets|rank_sets|half_width|score_rows")


if __name__ == "__main__":
    main()

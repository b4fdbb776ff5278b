"""cProfile of one full corr scan (labels stored first) on any device: where the time goes
beside the forward passes, which on a GPU cost little.

    .venv/bin/python benchmarks/profile_scan.py --model charlstm --records 200000
    python benchmarks/profile_scan.py --model charlstm --records 1000000 --device cuda
    python benchmarks/profile_scan.py --model minilm --records 2000 --device cuda --random-minilm DIR \\
        --hypotheses uppercase digit python_keyword

The workloads are bench_scan_overhead.py's. Prints the scan time, the bare forward passes' time
(the same batches, nothing kept; CUDA synchronised), and the top functions by own time.
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
    ap.add_argument("--model", choices=["minilm", "charlstm"], default="charlstm")
    ap.add_argument("--records", type=int, default=200_000, help="minilm: sentences; charlstm: characters")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 (minilm), 16 (charlstm)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-minilm", metavar="FOLDER", default=None)
    ap.add_argument("--hypotheses", nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25, help="functions to list")
    ap.add_argument("--sort", choices=["tottime", "cumulative"], default="tottime",
                    help="list functions by their own time (default) or with their callees'")
    a = ap.parse_args()
    from bench_baseline import limit_threads
    from bench_scan_overhead import forward_seconds, workload
    limit_threads(a.threads)
    import deepbase_duck as dbd
    batch = a.batch_size or (32 if a.model == "minilm" else 16)
    records, name, layers, hyps, make = workload(a.model, a.records, a.device, a.random_minilm, a.hypotheses)
    adapter = make()
    forward_seconds(adapter, [r["text"] for r in records[:50]], batch)              # warm-up
    fwd = forward_seconds(adapter, [r["text"] for r in records], batch)
    with tempfile.TemporaryDirectory() as tmp:
        con = dbd.connect(os.path.join(tmp, "p.duckdb"), progress=False)
        dbd.register_model(con, name, adapter)
        dbd.add_dataset(con, "d", records)
        dbd.annotate(con, hyps, "d")
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        dbd.inspect(con, name, layers, hyps, "d", measures=["corr"], batch_size=batch, device=a.device)
        prof.disable()
        scan = time.perf_counter() - t0
        dbd.close(con)
    print(f"{a.model} on {a.device}: {len(records)} records; scan {scan:.2f} s (profiled), bare forward {fwd:.2f} s")
    pstats.Stats(prof).sort_stats(a.sort).print_stats(a.top)


if __name__ == "__main__":
    main()

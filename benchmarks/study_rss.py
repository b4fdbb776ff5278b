"""Where a char-LSTM full scan's peak RSS comes from: the peak after each phase (setup, inspect,
closing the store) for settings of DuckDB's scan-time memory limit and torch's oneDNN kernel cache.

    .venv/bin/python benchmarks/study_rss.py --chars 400000 4000000

Each (variant, size) runs in a fresh process (oneDNN reads its cache setting once per process):

    default      deepbase_duck as shipped: scan_memory_limit '128MB', oneDNN cache 64 entries
    no-cap       scan_memory_limit=None (DuckDB's own limit, 80% of RAM); oneDNN cache 64
    no-cap-1024  scan_memory_limit=None and oneDNN's own cache size (1024): the code before the cap
    cap-256MB    scan_memory_limit '256MB'; oneDNN cache 64
    onednn-1024  scan_memory_limit '128MB'; oneDNN's own cache size (1024)

The workload is bench_baseline.py's (layers lstm0 + lstm1, five hypotheses, corr, labels computed
in the scan, a fresh file-backed store). ``peak`` is the process's maximum RSS so far
(``ru_maxrss``), ``now`` its RSS at that moment.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "default": ("128MB", None),
    "no-cap": (None, None),
    "no-cap-1024": (None, "1024"),
    "cap-256MB": ("256MB", None),
    "onednn-1024": ("128MB", "1024"),
}


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(chars: int, limit: str | None) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_baseline as bb
    bb.limit_threads(2)
    import deepbase_duck as dbd
    import deepbase_duck.engine.inspect  # noqa: F401
    out = {}

    def mark(phase):
        out[phase] = {"peak": round(peak_mb()), "now": round(rss_now_mb())}

    records = bb.records_for(chars, 600, "all")
    with tempfile.TemporaryDirectory() as tmp:
        con = dbd.connect(os.path.join(tmp, "s.duckdb"), progress=False, scan_memory_limit=limit)
        dbd.register_model(con, "charlstm", "deepbase_duck.models.zoo:charlstm", {"checkpoint": "final"})
        dbd.add_dataset(con, "held", records)
        mark("setup")
        t0 = time.perf_counter()
        dbd.inspect(con, "charlstm", bb.LAYERS, bb.HYPS, "held", measures=["corr"])
        out["seconds"] = round(time.perf_counter() - t0, 1)
        mark("inspect")
        dbd.close(con)
        mark("close")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chars", type=int, nargs="+", default=[400_000, 4_000_000])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        limit = VARIANTS[a.child][0]
        print(json.dumps(child(a.chars[0], limit)))
        return
    print(f"{'variant':<12} {'chars':>9} {'inspect s':>9} {'setup':>6} {'inspect peak/now':>17} "
          f"{'close peak/now':>15}")
    for variant in a.variants:
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
        if VARIANTS[variant][1] is not None:
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = VARIANTS[variant][1]
        for chars in a.chars:
            res = subprocess.run([sys.executable, __file__, "--child", variant, "--chars", str(chars)],
                                 env=env, capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{variant:<12} {chars:>9} {r['seconds']:>9.1f} {r['setup']['peak']:>6} "
                  f"{r['inspect']['peak']:>8}/{r['inspect']['now']:<8} {r['close']['peak']:>6}/{r['close']['now']:<8}",
                  flush=True)


if __name__ == "__main__":
    main()

"""Should a progressive scan cut each window into several length-sorted forward batches? Times
the bare forward passes over the same random windows, each run as 1, 2 or 4 batches.

    .venv/bin/python benchmarks/study_window_split.py --model minilm
    .venv/bin/python benchmarks/study_window_split.py --model charlstm

A progressive scan reads records in a seeded random order, in windows of ``batch_size`` records
(one forward batch each today), so a window mixes short and long records and pads them all to the
longest; a full scan's batches are sorted by length over the whole dataset and pad little. The
records of a window are fixed by the seeded order, but how the window is cut into forward
batches is free: sorting it by length and cutting it into k batches pads less and runs smaller
batches. Which wins depends on the model: a transformer's cost follows the padded tokens, an
LSTM pays a per-step overhead for every batch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["minilm", "charlstm"], default="minilm")
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    from bench_baseline import limit_threads
    limit_threads(2)
    if a.model == "minilm":
        import bench_baseline_minilm as bm
        from deepbase_duck.models.zoo import minilm
        adapter, size = minilm(), 32
        texts = [r["text"] for r in bm.records_for(size * a.windows, "train", 0)]
    else:
        import bench_baseline as bb
        from deepbase_duck.models.zoo import charlstm
        adapter, size = charlstm("final", device="cpu"), 16
        texts = [r["text"] for r in bb.records_for(600_000, 600, "all")]
    order = np.random.default_rng(0).permutation(len(texts))
    windows = [sorted(order[i:i + size], key=lambda j: len(texts[j])) for i in range(0, size * a.windows, size)]

    def run(parts: int) -> float:
        t0 = time.perf_counter()
        for w in windows:
            step = -(-len(w) // parts)
            for lo in range(0, len(w), step):
                with torch.no_grad():
                    adapter.forward(adapter.encode([texts[j] for j in w[lo:lo + step]]))
        return time.perf_counter() - t0

    run(1)                                               # warm-up
    print(f"{a.model}: {len(windows)} random windows of {size} records, forward seconds per split")
    for rep in range(a.repeat):
        times = {k: run(k) for k in (1, 2, 4)}
        print(f"  run {rep + 1}: " + ", ".join(f"{k} batch{'es' if k > 1 else ''} {t:.2f} s ({t / times[1]:.2f})"
                                             for k, t in times.items()))


if __name__ == "__main__":
    main()

"""What do record-clustered correlation intervals cost per update? (session 11)

    .venv/bin/python benchmarks/study_corr_clusters.py

Times ``PearsonState.update`` with ``intervals='symbols'`` (the moments alone: scipy's Fisher
interval) and ``intervals='records'`` (the default: also each record's totals and the sums of
their products, for the sandwich interval) on a char-LSTM-like block (8,100 symbols x 256 units
x 5 labels, 14 records) and a MiniLM-like one (4,000 x 384 x 17, 64 records), with every label
present and with some missing (the masked path). Inputs rotate over six batches, so each call
starts cold as in a scan; medians over ``--calls`` calls per round, rounds alternating, and the
range of the round medians is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import numpy as np
    import torch
    from deepbase_duck.inspectors.correlation import PearsonState
    torch.set_num_threads(a.threads)
    for n, W, H, R in ((8100, 256, 5, 14), (4000, 384, 17, 64)):
        for masked in (False, True):
            g = torch.Generator().manual_seed(0)
            xs = [torch.randn(n, W, generator=g) for _ in range(6)]
            ys = [(torch.rand(n, H, generator=g) > 0.5).double() for _ in range(6)]
            if masked:
                for y in ys:
                    y[::7, 0] = float("nan")
            rec = torch.from_numpy(np.repeat(np.arange(R), n // R + 1)[:n])
            hyps = [{"name": f"h{i}", "kind": "binary"} for i in range(H)]
            res = {}
            for mode in ("symbols", "records") * a.rounds:
                st = PearsonState(W, hyps, intervals=mode)
                times = []
                for i in range(a.calls):
                    t0 = time.perf_counter()
                    st.update(xs[i % 6], ys[i % 6], rec)
                    times.append(time.perf_counter() - t0)
                res.setdefault(mode, []).append(statistics.median(times) * 1e3)
            print(f"{n} x {W} units x {H} labels, {R} records{', some labels missing' if masked else ''}: "
                  + ", ".join(f"{k} {min(v):.2f}-{max(v):.2f} ms" for k, v in res.items()))


if __name__ == "__main__":
    main()

"""Is the correlation update worth restructuring? (issue: query optimisation, scan overhead)

    .venv/bin/python benchmarks/study_corr_update.py --rounds 3

Times ``PearsonState.update`` (a float64 copy of the batch centred on its mean, one skinny
product, the sums of squares, the pairwise merge) against a candidate that walks the batch in
row chunks of about ``--chunk-mb`` (centred on the batch mean taken in one float32 pass, the
cross products and the sums of x by one ``addmm_`` per chunk against [labels, 1], the squares
summed per chunk): the same moments (checked here to 1e-12) with the float64 copy kept in cache.
The candidate leaves out the min/max and the merge (about 0.5 ms), so its time is a lower
bound. Inputs rotate over six batches of char-LSTM size (``--rows`` symbols x 256 units x 5
labels), so each call starts cold, as in a scan; medians over ``--calls`` calls, rounds
alternating. The scan share uses the update count of a 300k-character char-LSTM scan (74).
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
    ap.add_argument("--rows", type=int, default=9600)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--labels", type=int, default=5)
    ap.add_argument("--chunk-mb", type=float, default=4.0)
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import numpy as np
    import torch
    from deepbase_duck.inspectors.correlation import PearsonState

    F64 = torch.float64
    torch.set_num_threads(a.threads)
    n, W, H = a.rows, a.width, a.labels
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, W, generator=g) * 0.2 + torch.randn(W, generator=g) for _ in range(6)]
    ys = [(torch.rand(n, H, generator=g) > 0.5).to(torch.float32) for _ in range(6)]
    work = {}

    def buffer(key, rows, cols):
        b = work.get(key)
        if b is None or b.numel() < rows * cols:
            b = work[key] = torch.empty(rows * cols, dtype=F64)
        return b[:rows * cols].view(rows, cols)

    def chunked_moments(x, y):
        shift = x.mean(0, dtype=F64)
        A = buffer("labels", n, H + 1)
        A[:, :H].copy_(y)
        A[:, :H].sub_(A[:, :H].mean(0))
        A[:, H] = 1.0
        prod, sq = torch.zeros(H + 1, W, dtype=F64), torch.zeros(W, dtype=F64)
        step = max(64, int(a.chunk_mb * 2 ** 20) // (W * 8))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            b = buffer("chunk", hi - lo, W)
            b.copy_(x[lo:hi])
            b.sub_(shift)
            prod.addmm_(A[lo:hi].T, b)
            sq.add_(b.square_().sum(0))
        sx = prod[H]
        return shift + sx / n, sq - sx * sx / n, prod[:H].T - (sx / n)[:, None] * A[:, :H].sum(0)[None, :]

    x, y = xs[0].double(), ys[0].double()
    mx, m2x, c = chunked_moments(xs[0], ys[0])
    xc, yc = x - x.mean(0), y - y.mean(0)
    err = max(float((mx - x.mean(0)).abs().max()), float(((m2x - (xc * xc).sum(0)) / (xc * xc).sum(0)).abs().max()),
              float(((c - xc.T @ yc).abs() / (xc.T @ yc).abs().max()).max()))
    assert err < 1e-12, err

    state = PearsonState(W, [{"name": f"h{i}", "kind": "binary"} for i in range(H)])

    def median_ms(f):
        times = []
        for i in range(a.calls + 6):
            t = time.perf_counter()
            f(xs[i % 6], ys[i % 6])
            times.append(time.perf_counter() - t)
        return statistics.median(times[6:]) * 1e3

    print(f"batch {n} x {W} units x {H} labels, chunks of {a.chunk_mb} MB; moments agree to {err:.1e}")
    print("round  update ms  chunked ms  chunked/update  saved per 300k scan (74 updates)")
    for r in range(a.rounds):
        first, second = (state.update, chunked_moments) if r % 2 == 0 else (chunked_moments, state.update)
        t1, t2 = median_ms(first), median_ms(second)
        u, cm = (t1, t2) if r % 2 == 0 else (t2, t1)
        print(f"{r + 1:5d}  {u:9.2f}  {cm:10.2f}  {cm / u:14.2f}  {(u - cm) * 74 / 1e3:.2f} s")


if __name__ == "__main__":
    main()

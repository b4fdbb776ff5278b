"""Per-state costs of measures (default iou and spearman; ``--measures mi ap`` ...), for comparing
two versions of the code side by side (alternate old and new runs: this machine is shared and
noisy).

    .venv/bin/python benchmarks/study_measure_costs.py                                   # this checkout
    (cd /tmp && PYTHONPATH=/tmp/wt_old <checkout>/.venv/bin/python <checkout>/benchmarks/study_measure_costs.py)  # a worktree
    .venv/bin/python benchmarks/study_measure_costs.py --measures mi ap

30 batches of 8,000 rows x 256 units and 5 binary labels, 14 records per batch (the char-LSTM's
block shape); prints the best of 2 rounds of the update time per batch and the finalize time.
"""
import argparse
import time

import numpy as np
import torch

import deepbase_duck
from deepbase_duck.inspectors import measure_class


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measures", nargs="+", default=["iou", "spearman"])
    a = ap.parse_args()
    print(deepbase_duck.__file__)
    torch.set_num_threads(2)
    hyps = [{"name": f"h{i}", "kind": "binary"} for i in range(5)]
    rng = np.random.default_rng(0)
    batches = []
    for b in range(30):
        x = torch.randn(8000, 256)
        y = torch.tensor((rng.random((8000, 5)) < 0.1).astype(float))
        r = torch.tensor(np.repeat(np.arange(b * 14, (b + 1) * 14), 8000 // 14 + 1)[:8000])
        batches.append((x, y, r))
    for m in a.measures:
        best_u = best_f = float("inf")
        for _ in range(2):
            st = measure_class(m)(256, hyps)
            t = time.perf_counter()
            for x, y, r in batches:
                st.update(x, y, r)
            t1 = time.perf_counter()
            st.finalize()
            t2 = time.perf_counter()
            best_u, best_f = min(best_u, (t1 - t) / 30 * 1e3), min(best_f, t2 - t1)
        print(f"{m} update {best_u:.1f} ms/batch, finalize {best_f:.2f} s")


if __name__ == "__main__":
    main()

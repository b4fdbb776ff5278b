"""Core benchmark (issue: core engine): bare forward pass vs end-to-end inspect, and peak RSS.

Runs every measurement in its own fresh process (peak RSS is per process), side by side in one
run, on the demo workload: the bundled char-LSTM (both LSTM layers) over held-out standard-
library code, with the demo's six hypotheses.

    .venv/bin/python benchmarks/bench_core.py            # 1x = 150k characters, and 4x
    .venv/bin/python benchmarks/bench_core.py --chars 50000 --repeat 1

Measured:
  forward  : the forward passes alone, batched exactly as the engine batches them (records
             sorted by length, 16 per batch), inference mode, no hooks, nothing stored;
  inspect  : dbd.inspect(...) on a fresh in-memory store, from records to scores: symbols,
             labels (all six hypotheses computed and joined in DuckDB), forward passes with
             hooks, correlation states, scores written ("cold");
  warm     : the same query for the final checkpoint after another checkpoint (mid) of the same
             architecture was inspected on the dataset, so the hypothesis labels and symbols are
             reused from the store (labels are materialised once per dataset for every model);
             the span join and everything else still run;
  ratio    : inspect / forward (target <= 1.5), cold and warm;
  RSS      : peak resident memory of the inspect process at 1x and 4x the records
             (target: growth <= 1.3x).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

HYPS = ["in_string", "in_comment", "indent_level", "position_in_line", "bracket_depth", "python_keyword"]
LAYERS = ["lstm0", "lstm1"]


def child(kind: str, chars: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from deepbase_duck.corpora.code import code_records
    records = code_records("heldout", max_chars=2000, limit_chars=chars)
    n_chars = sum(len(r["text"]) for r in records)
    if kind == "forward":
        from deepbase_duck.models.zoo import charlstm
        adapter = charlstm("final", device="cpu")
        texts = sorted((r["text"] for r in records), key=len)
        t0 = time.perf_counter()
        for lo in range(0, len(texts), 16):
            enc = adapter.encode(texts[lo:lo + 16])
            adapter.forward(enc)
        seconds = time.perf_counter() - t0
    else:
        import deepbase_duck as dbd
        con = dbd.connect(None, threads=threads, progress=False)
        dbd.register_model(con, "charlstm", "deepbase_duck.models.zoo:charlstm", {"checkpoint": "final"})
        dbd.add_dataset(con, "held", records)
        if kind == "warm":
            dbd.register_model(con, "charlstm_mid", "deepbase_duck.models.zoo:charlstm", {"checkpoint": "mid"})
            dbd.inspect(con, "charlstm_mid", LAYERS, HYPS, "held", batch_size=16)
        t0 = time.perf_counter()
        dbd.inspect(con, "charlstm", LAYERS, HYPS, "held", batch_size=16)
        seconds = time.perf_counter() - t0
        dbd.close(con)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "chars": n_chars, "records": len(records), "seconds": seconds, "peak_rss_mb": rss}


def run(kind, chars, threads):
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--chars", str(chars), "--threads", str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chars", type=int, default=150_000)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each measurement; the best is kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.chars, a.threads)))
        return
    best = {}
    for scale in (1, a.scale):
        for _ in range(a.repeat):
            for kind in ("forward", "inspect", "warm"):          # interleaved, so drift hits all alike
                r = run(kind, a.chars * scale, a.threads)
                key = (kind, scale)
                if key not in best or r["seconds"] < best[key]["seconds"]:
                    best[key] = r
    print(f"deepbase_duck core benchmark  (threads={a.threads}, best of {a.repeat}, char-LSTM 2x256, "
          f"{len(LAYERS)} layers, {len(HYPS)} hypotheses)")
    print(f"{'scale':>5} {'records':>8} {'chars':>9} {'forward s':>10} {'inspect s':>10} {'ratio':>6} "
          f"{'warm s':>7} {'ratio':>6} {'fwd RSS MB':>10} {'insp RSS MB':>11}")
    for scale in (1, a.scale):
        f, i, w = best[("forward", scale)], best[("inspect", scale)], best[("warm", scale)]
        print(f"{scale:>4}x {i['records']:>8} {i['chars']:>9} {f['seconds']:>10.2f} {i['seconds']:>10.2f} "
              f"{i['seconds'] / f['seconds']:>6.2f} {w['seconds']:>7.2f} {w['seconds'] / f['seconds']:>6.2f} "
              f"{f['peak_rss_mb']:>10.0f} {i['peak_rss_mb']:>11.0f}")
    g = best[("inspect", a.scale)]["peak_rss_mb"] / best[("inspect", 1)]["peak_rss_mb"]
    print(f"inspect peak-RSS growth {a.scale}x records: {g:.2f}x (target <= 1.3)")
    for kind in ("inspect", "warm"):
        print(f"{kind}/forward ratio at 1x: {best[(kind, 1)]['seconds'] / best[('forward', 1)]['seconds']:.2f}, "
              f"at {a.scale}x: {best[(kind, a.scale)]['seconds'] / best[('forward', a.scale)]['seconds']:.2f} "
              "(target <= 1.5)")


if __name__ == "__main__":
    main()

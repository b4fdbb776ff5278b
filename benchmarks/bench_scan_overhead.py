"""Full scan over bare forward passes, measured as interleaved pairs (issue: query optimisation,
target: a full scan costs at most 1.15x the bare forward passes).

    .venv/bin/python benchmarks/bench_scan_overhead.py --model minilm --records 2000 --pairs 5
    .venv/bin/python benchmarks/bench_scan_overhead.py --model charlstm --records 1000000 --pairs 5
    python benchmarks/bench_scan_overhead.py --model charlstm --device cuda     # on a GPU machine
    python benchmarks/bench_scan_overhead.py --model charlstm --device cuda --pipeline off   # serial loop
    python benchmarks/bench_scan_overhead.py --model charlstm --device cuda --what extract --pipeline on
    python benchmarks/bench_scan_overhead.py --model charlstm --device cuda --what checkpoints --pipeline on
    .venv/bin/python benchmarks/bench_scan_overhead.py --model minilm --records 500 --pairs 2 --what checkpoints

On a shared machine two runs of the same work can differ by 30% (benchmarks/RESULTS.md), so a
ratio taken from two runs minutes apart says little. This script measures the two sides as
pairs, one right after the other in the same process, alternating which goes first, and prints
every pair's ratio with their median and range:

  forward   the bare forward passes over the records, batched as the engine batches a full
            scan (length-sorted batches of ``--batch-size``), nothing kept;
  scan      ``dbd.inspect(..., measures=['corr'])`` over the same records and layers on a fresh
            file-backed store whose labels were stored beforehand (``dbd.annotate``, before the
            clock, as on labelled data); timed over ``inspect`` alone: symbols (tokenised once,
            from the forward passes' encodings), label alignment, forward passes, the
            correlation states, the scores written, the closing checkpoint;
  extract   (``--what extract``) ``dbd.extract`` of the same layers instead of the scan: the
            symbols and the activations' Parquet parts written;
  checkpoints (``--what checkpoints``) three models of one architecture scanned together
            (``dbd.inspect`` of the three: the char-LSTM's early, mid and final checkpoints, run
            one after another per batch; MiniLM's weights and two noisy copies, fused by vmap),
            against the three models' forward passes.

Workloads: ``minilm`` = bench_baseline_minilm.py's (all-MiniLM-L6-v2, three layers, spaCy UPOS,
``--records`` PTB training sentences); ``charlstm`` = bench_baseline.py's (the bundled
char-LSTM, both layers, five code hypotheses, ``--records`` characters of standard-library
records). One untimed warm-up pair runs first (model weights paged in, kernels built).
``--device cuda`` runs the model and the inspectors on the GPU (the clocks wait for its queue);
``--random-minilm FOLDER`` times MiniLM's architecture and tokenizer with random weights where
the published weights cannot be installed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def workload(model: str, records: int, device: str, config: str | None, hyps: list[str] | None):
    """(records, model name, layers, hypotheses, adapter factory) for ``model`` on ``device``."""
    if model == "minilm":
        import bench_baseline_minilm as bm
        from deepbase_duck.models.zoo import minilm
        make = (lambda: random_minilm(config, device)) if config else (lambda: minilm(device=device))
        return bm.records_for(records, "train", 0), "minilm", bm.LAYERS, hyps or [bm.HYP], make
    import bench_baseline as bb
    from deepbase_duck.models.zoo import charlstm
    return (bb.records_for(records, 600, "all"), "charlstm", bb.LAYERS, hyps or bb.HYPS,
            lambda: charlstm("final", device=device))


def random_minilm(folder: str, device: str):
    """all-MiniLM-L6-v2's architecture and tokenizer (``folder``: its config.json and tokenizer
    files, no weights) with seeded random weights: the same forward cost, for machines the
    published weights cannot be carried to (the lent GPU's transfer limit)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from deepbase_duck.extraction.transformers_adapter import WordPieceAdapter
    torch.manual_seed(0)
    module = AutoModel.from_config(AutoConfig.from_pretrained(folder, local_files_only=True))
    return WordPieceAdapter(module, AutoTokenizer.from_pretrained(folder, local_files_only=True),
                            "all-MiniLM-L6-v2-random", 256, device)


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously) before a clock is read."""
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def forward_seconds(adapter, texts: list[str], batch_size: int) -> float:
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    synchronize(adapter.device)
    t0 = time.perf_counter()
    for lo in range(0, len(order), batch_size):
        adapter.forward(adapter.encode([texts[i] for i in order[lo:lo + batch_size]]))
    synchronize(adapter.device)
    return time.perf_counter() - t0


CHECKPOINTS = ("early", "mid", "final")


def checkpoint_models(model: str, make, device: str) -> list:
    """Three models of one architecture, as a study comparing training checkpoints holds: the
    char-LSTM's early, mid and final checkpoints (trained; run one after another on each batch,
    torch.vmap has no rule for the LSTM), or MiniLM's published weights and two copies moved by
    seeded noise (1% of each tensor's spread: stand-ins for fine-tuning steps, fused by vmap)."""
    if model == "charlstm":
        from deepbase_duck.models.zoo import charlstm
        return [charlstm(c, device=device) for c in CHECKPOINTS]
    import torch
    out = []
    for seed in range(3):
        adapter = make()
        if seed:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in adapter.module.parameters():
                    if p.numel() > 1:
                        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device, p.dtype)
                        p.add_(noise * (0.01 * float(p.float().std())))
        out.append(adapter)
    return out


def scan_seconds(records, name, make, layers, hyps, batch_size: int, device: str, pipeline=None,
                 what: str = "scan", model: str = "charlstm") -> float:
    """Seconds of the engine's work over ``records`` on a fresh file-backed store: ``scan`` (one
    model's corr scan), ``extract`` (storing the layers' activations as Parquet), or
    ``checkpoints`` (``checkpoint_models``' three models scanned together)."""
    import deepbase_duck as dbd
    from deepbase_duck.engine.inspect import LocalEngine
    with tempfile.TemporaryDirectory() as tmp:
        con = dbd.connect(os.path.join(tmp, "scan.duckdb"), progress=False)
        if what == "checkpoints":
            names = [f"checkpoint{i}" for i in range(3)]
            for c, m in zip(names, checkpoint_models(model, make, device)):
                dbd.register_model(con, c, m)
        else:
            names = name
            dbd.register_model(con, name, make())
        dbd.add_dataset(con, "d", records)
        dbd.annotate(con, hyps, "d")
        t0 = time.perf_counter()
        if what == "extract":
            dbd.extract(con, name, layers, "d", batch_size=batch_size, pipeline=pipeline)
        else:
            dbd.inspect(con, names, layers, hyps, "d", measures=["corr"], batch_size=batch_size, reuse=False,
                        device=device, engine=LocalEngine(pipeline=pipeline))
        synchronize(device)
        seconds = time.perf_counter() - t0
        dbd.close(con)
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["minilm", "charlstm"], default="minilm")
    ap.add_argument("--records", type=int, default=None,
                    help="minilm: sentences (default 2000); charlstm: characters (default 1,000,000)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 (minilm), 16 (charlstm)")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where the model and the inspectors run (cpu, cuda)")
    ap.add_argument("--random-minilm", metavar="FOLDER", default=None,
                    help="minilm: the architecture and tokenizer from FOLDER (config.json, tokenizer files) "
                         "with seeded random weights instead of the published ones")
    ap.add_argument("--hypotheses", nargs="+", default=None,
                    help="default: upos (minilm), the five code hypotheses (charlstm)")
    ap.add_argument("--layers", nargs="+", default=None,
                    help="the layers the scan reads (default: the workload's); the bare forward runs the "
                         "whole model, as a study script does")
    ap.add_argument("--pipeline", choices=["auto", "on", "off"], default="auto",
                    help="the scan's forward passes in a background thread (engine/prefetch.py): auto = on CUDA only")
    ap.add_argument("--what", choices=["scan", "extract", "checkpoints"], default="scan",
                    help="the engine's work timed against the bare forward passes: a corr scan (default), an "
                         "extraction of the layers, or three checkpoints scanned together (charlstm: its "
                         "trained checkpoints; minilm: three weight sets), against three models' forward passes")
    a = ap.parse_args()
    pipeline = {"auto": None, "on": True, "off": False}[a.pipeline]
    from bench_baseline import limit_threads
    limit_threads(a.threads)
    records = a.records or (2000 if a.model == "minilm" else 1_000_000)
    batch = a.batch_size or (32 if a.model == "minilm" else 16)
    recs, name, layers, hyps, make = workload(a.model, records, a.device, a.random_minilm, a.hypotheses)
    layers = a.layers or layers
    texts = [r["text"] for r in recs]
    adapter = make()
    print(f"{a.model}: {len(recs)} records, {sum(map(len, texts))} characters, layers {', '.join(layers)}, "
          f"hypotheses {', '.join(hyps)}, batch {batch}, threads {a.threads}, device {a.device}, "
          f"pipeline {a.pipeline}, timing {a.what}"
          + (" (random weights)" if a.random_minilm else ""))
    models = [adapter]
    if a.what == "checkpoints":                  # the forward side: each checkpoint's own passes
        models = checkpoint_models(a.model, make, a.device)

    def forward(part):
        return sum(forward_seconds(m, part, batch) for m in models)

    def work(part):
        return scan_seconds(part, name, make, layers, hyps, batch, a.device, pipeline, a.what, a.model)

    forward(texts[: max(1, len(texts) // 10)])                                 # warm-up
    work(recs[: max(1, len(recs) // 10)])
    ratios = []
    for p in range(a.pairs):
        if p % 2 == 0:
            f = forward(texts)
            s = work(recs)
        else:
            s = work(recs)
            f = forward(texts)
        ratios.append(s / f)
        print(f"  pair {p + 1} ({'forward first' if p % 2 == 0 else a.what + ' first'}): forward {f:.2f} s, "
              f"{a.what} {s:.2f} s, {a.what} / forward {s / f:.3f}", flush=True)
    print(f"{a.what} / forward: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, "
          f"max {max(ratios):.3f} over {len(ratios)} pairs")


if __name__ == "__main__":
    main()

"""deepbase_duck against a standard Python implementation, side by side in one run (issue: query
optimisation, item 6).

    .venv/bin/python benchmarks/bench_baseline.py                       # 1M characters, 1 repeat
    .venv/bin/python benchmarks/bench_baseline.py --chars 200000 --max-error 0.15 0.08
    python benchmarks/bench_baseline.py --device cuda --threads 16        # on a GPU machine

Every measurement runs in its own fresh process (peak RSS is per process); all of them run in one
invocation, one after the other, so that the ratios are taken on the same machine state.

Workload: the bundled char-LSTM (final checkpoint), layers lstm0 and lstm1 (2 x 256 units), over
held-out standard-library code cut into records of at most ``--record-chars`` characters, scored
against five hypotheses (in_string, in_comment, bracket_depth, indent_level, position_in_line):
2,560 (unit, hypothesis) correlations.

  forward   the bare forward passes, batched as the engine batches them, nothing kept;
  baseline  what a study script does: run the model over every record and keep every character's
            activations in one dense numpy matrix per layer (forward hooks), compute every
            hypothesis for every character, then loop over (unit, hypothesis) with
            scipy.stats.pearsonr on the labelled characters;
  full      ``dbd.inspect(...)`` on a fresh store (records inserted, symbols, labels, forward
            passes, correlation states, scores written): the full scan. As in the baseline,
            whose clock starts once the model is loaded, ``register_model`` (which loads the
            model, hashes its weights and probes its layer widths with one forward pass) is not
            timed: a study registers a model once and queries it many times;
  early     the same query with ``max_error`` (and ``seed``): a progressive scan in the seeded
            record order that stops once every correlation's batch-means bound is within
            ``max_error``; its own fresh store, everything included as for ``full``.
  labelled  ``full`` with the hypotheses' labels stored before the clock starts (``dbd.annotate``),
            as when a study scores a second model or layer over labelled data: the engine's
            own cost over the forward passes;
  rank      the ranking query ``top_k`` (and ``seed``): progressive, stopping once every
            (layer, hypothesis) top-k set is stable (see inspect's docstring).
  full/10   ``full`` on a tenth of the records, for the peak-RSS growth at 10x the records.

Checks printed: max |r_full - r_scipy| (must be < 1e-5); for the early-stopped query, the share
of its intervals that contain the full-scan score (coverage) and, per hypothesis, how many of its
top-10 units by |r| are in the full scan's top 10.

A second workload, ``--dissection``, adds what the issue's baseline also names: IoU at the top
0.005 quantile (numpy loop per unit and hypothesis) and one scikit-learn LogisticRegression probe
per (layer, binary hypothesis), against ``measures = ['corr', 'iou', 'probe']`` in one query.
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

import numpy as np

HYPS = ["in_string", "in_comment", "bracket_depth", "indent_level", "position_in_line"]
BINARY = ["in_string", "in_comment"]
LAYERS = ["lstm0", "lstm1"]
SIGNAL = 0.1                  # |r| below which a top-10 ranking is noise (early_check)


def records_for(chars: int, record_chars: int, split: str = "heldout"):
    """Whole records of standard-library code up to ``chars`` characters: the held-out split
    (1.68M characters), or 'all': the held-out split, then the training split's files."""
    from deepbase_duck.corpora.code import code_records
    out = code_records("heldout", max_chars=record_chars, limit_chars=chars) if split in ("heldout", "all") else []
    have = sum(len(r["text"]) for r in out)
    if split in ("train", "all") and have < chars:
        out += code_records("train", max_chars=record_chars, limit_chars=chars - have)
    return out


def per_char_labels(h, text: str, spans=None) -> np.ndarray:
    """The hypothesis' value at every character (NaN = no label), as a study script writes it;
    ``spans``: the hypothesis' (starts, ends, values) of ``text`` when already computed."""
    starts, ends, values = h.spans(text) if spans is None else spans
    out = np.zeros(len(text)) if h.kind == "binary" else np.full(len(text), np.nan)
    for s, e, v in zip(starts, ends, values):
        out[s:e] = v
    return out


def scipy_corr(acts: dict, labels: dict, layers, names) -> np.ndarray:
    """The study script's loop: ``scipy.stats.pearsonr`` per (layer, unit, hypothesis) over the
    symbols the hypothesis labels (NaN = no label); NaN where either side is constant.
    Returns an array (layer, unit, hypothesis)."""
    from scipy import stats
    width = acts[layers[0]].shape[1]
    r = np.full((len(layers), width, len(names)), np.nan)
    for li, layer in enumerate(layers):
        a = acts[layer]
        for j, name in enumerate(names):
            y = labels[name]
            ok = ~np.isnan(y)
            yy = y[ok]
            for u in range(a.shape[1]):
                x = a[ok, u].astype(np.float64)
                if x.min() == x.max() or yy.min() == yy.max():
                    continue
                r[li, u, j] = stats.pearsonr(x, yy)[0]
    return r


def engine_corr(rows, layers, names, width: int):
    """(corr, ci_low, ci_high) arrays (layer, unit, hypothesis) from ``inspect``'s 'corr' rows;
    NaN where the score is NULL."""
    corr = np.full((len(layers), width, len(names)), np.nan)
    lo, hi = corr.copy(), corr.copy()
    for row in rows:
        if row["measure"] == "corr" and row["score"] is not None:
            at = layers.index(row["layer"]), row["unit"], names.index(row["hypothesis"])
            corr[at], lo[at], hi[at] = row["score"], row["ci_low"], row["ci_high"]
    return corr, lo, hi


def query_stats(con) -> dict:
    """Records and symbols the (first) query used, and the bound it reached."""
    n_records, n_symbols, params = con.sql(
        "SELECT n_records, n_symbols, params FROM queries ORDER BY query_id LIMIT 1").fetchall()[0]
    params = json.loads(params)
    return {"records_used": n_records, "symbols_used": n_symbols, "bound": params.get("bound_reached"),
            "rare": params.get("rare")}


def limit_threads(threads: int) -> None:
    """torch and the BLAS / OpenMP pools (numpy, scipy, scikit-learn) on ``threads`` threads."""
    import torch
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except ImportError:
        pass


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spawn(script: str, kind: str, argv: list[str]) -> dict:
    """One measurement in a fresh process: ``script --child kind *argv``, whose last line of
    output is its result as JSON."""
    res = subprocess.run([sys.executable, script, "--child", kind, *argv], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def print_runs(res: dict, kinds, reference: dict | None = None) -> None:
    """The side-by-side table: seconds, speed-up over the baseline (or over ``reference[kind]``
    seconds), ratio to the bare forward passes, records used, peak RSS."""
    print(f"{'run':<12} {'seconds':>8} {'vs baseline':>11} {'vs forward':>10} {'records':>8} {'peak RSS MB':>11}")
    for kind in kinds:
        r = res[kind]
        ref = (reference or {}).get(kind, res["baseline"]["seconds"])
        print(f"{kind:<12} {r['seconds']:>8.2f} {ref / r['seconds']:>10.1f}x "
              f"{r['seconds'] / res['forward']['seconds']:>10.2f} {r.get('records_used', r['records']):>8} "
              f"{r['peak_rss_mb']:>11.0f}")


def corr_check(f: np.ndarray, b: np.ndarray) -> str:
    return (f"max |r_deepbase_duck - r_scipy| = {np.nanmax(np.abs(f - b)):.2e} "
            f"(NULL where scipy is NaN: {bool(np.array_equal(np.isnan(f), np.isnan(b)))})")


def early_check(e, f: np.ndarray) -> tuple[float, list[int], list[tuple[int, int]], list[int]]:
    """Coverage (share of the early intervals holding the full-scan score); per (layer,
    hypothesis) scored by both scans, how many of the early top-10 units are in the full scan's
    top 10; the (layer, hypothesis) pairs the full scan scores but the early one leaves NULL
    (a class it never saw); and the agreement on the pairs with signal, whose full-scan 10th-best
    |r| is at least SIGNAL (below it the ranking is noise, in the full scan too)."""
    ok = ~np.isnan(e["corr"]) & ~np.isnan(f)
    inside = (e["ci_low"][ok] <= f[ok]) & (f[ok] <= e["ci_high"][ok])
    agree, missing, strong = [], [], []
    for li in range(f.shape[0]):
        top_e, top_f = top10(e["corr"][li]), top10(f[li])
        for j in range(f.shape[2]):
            if np.isnan(f[li, :, j]).all():
                continue
            if np.isnan(e["corr"][li, :, j]).all():
                missing.append((li, j))
            else:
                agree.append(len(top_e[j] & top_f[j]))
                if np.sort(np.nan_to_num(np.abs(f[li, :, j]), nan=0.0))[-10] >= SIGNAL:
                    strong.append(agree[-1])
    return float(inside.mean()), agree, missing, strong


def agreement_text(agree: list, strong: list) -> str:
    return (f"min {min(agree)}/10, mean {np.mean(agree):.1f}/10; on the {len(strong)} pairs whose full-scan "
            f"10th |r| >= {SIGNAL}: " + (f"min {min(strong)}/10, mean {np.mean(strong):.1f}/10" if strong else "none"))


def rss_growth(res: dict) -> str:
    """Peak-RSS growth from a tenth of the workload to all of it, for each kind run at both sizes."""
    parts = [f"{'deepbase_duck ' if kind != 'baseline' else ''}{kind} {res[kind]['peak_rss_mb'] / res[kind + '/10']['peak_rss_mb']:.2f}x "
             f"({res[kind + '/10']['peak_rss_mb']:.0f} -> {res[kind]['peak_rss_mb']:.0f} MB)"
             for kind in res if kind + "/10" in res]
    return "peak RSS growth for 10x the records: " + ", ".join(parts)


def run_baseline(records, dissection: bool, out: str, device: str = "cpu") -> dict:
    import torch
    from deepbase_duck.extraction.hooks import Retain
    import deepbase_duck.hypotheses.library  # noqa: F401  (registers the built-ins)
    from deepbase_duck.hypotheses.core import get_hypothesis
    from deepbase_duck.models.zoo import charlstm
    adapter = charlstm("final", device=device)
    t0 = time.perf_counter()
    texts = sorted((r["text"] for r in records), key=len)
    # 1. extract everything into numpy
    chunks = {layer: [] for layer in LAYERS}
    with Retain(adapter.module, LAYERS) as ret:
        for lo in range(0, len(texts), 16):
            batch = texts[lo:lo + 16]
            with torch.inference_mode():
                adapter.forward(adapter.encode(batch))
            for layer in LAYERS:
                o = ret[layer].float().cpu()
                for b, t in enumerate(batch):
                    chunks[layer].append(o[b, :len(t)].numpy().copy())
    acts = {layer: np.concatenate(c) for layer, c in chunks.items()}
    del chunks
    t_extract = time.perf_counter() - t0
    # 2. every hypothesis for every character
    labels = {}
    for name in HYPS + (BINARY if dissection else []):
        h = get_hypothesis(name)
        labels[name] = np.concatenate([per_char_labels(h, t) for t in texts])
    t_labels = time.perf_counter() - t0 - t_extract
    # 3. the (unit, hypothesis) loop
    r = scipy_corr(acts, labels, LAYERS, HYPS)
    result = {"t_extract": t_extract, "t_labels": t_labels}
    extra = {}
    if dissection:
        from sklearn.linear_model import LogisticRegression
        iou = np.full((len(LAYERS), 256, len(BINARY)), np.nan)
        acc = np.full((len(LAYERS), len(BINARY)), np.nan)
        for li, layer in enumerate(LAYERS):
            a = acts[layer]
            for u in range(a.shape[1]):
                x = a[:, u]
                thr = np.quantile(x, 1 - 0.005)
                fires = x > thr
                for j, name in enumerate(BINARY):
                    pos = labels[name] == 1
                    inter, union = np.sum(fires & pos), np.sum(fires | pos)
                    iou[li, u, j] = inter / union if union else np.nan
            rng = np.random.default_rng(0)
            test = rng.random(len(a)) < 0.2
            mu, sd = a[~test].mean(0), a[~test].std(0) + 1e-8
            z = (a - mu) / sd
            for j, name in enumerate(BINARY):
                y = labels[name]
                clf = LogisticRegression(max_iter=500).fit(z[~test], y[~test])
                acc[li, j] = clf.score(z[test], y[test])
        extra = {"iou": iou, "probe_acc": acc}
    np.savez(out, corr=r, **extra)
    result["seconds"] = time.perf_counter() - t0
    return result


def run_engine(records, kind: str, dissection: bool, max_error: float, seed: int, top_k: int, out: str,
               device: str = "cpu") -> dict:
    import deepbase_duck as dbd
    import deepbase_duck.engine.inspect  # noqa: F401  (library imports before the clock, as the baseline's)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        con = dbd.connect(os.path.join(tmp, "bench.duckdb"), progress=False)
        t_load = time.perf_counter()      # loading the model is outside the clock, as the baseline's
        dbd.register_model(con, "charlstm", "deepbase_duck.models.zoo:charlstm", {"checkpoint": "final", "device": device})
        t0 += time.perf_counter() - t_load
        dbd.add_dataset(con, "held", records)
        measures = ["corr", "iou", "probe"] if dissection else ["corr"]
        hyps = HYPS if not dissection else HYPS          # iou/probe take the binary ones only
        if kind == "labelled":                        # labels stored beforehand, as a study has them
            dbd.annotate(con, HYPS + (BINARY if dissection else []), "held")
            t0 = time.perf_counter()
        opts = ({"max_error": max_error, "seed": seed} if kind == "early" else
                {"top_k": top_k, "seed": seed} if kind == "rank" else {})
        opts["device"] = device
        if dissection:
            rows = []
            rows += dbd.inspect(con, "charlstm", LAYERS, HYPS, "held", measures=["corr"], **opts).to_pylist()
            rows += dbd.inspect(con, "charlstm", LAYERS, BINARY, "held", measures=["iou", "probe"],
                                device=device).to_pylist()
        else:
            rows = dbd.inspect(con, "charlstm", LAYERS, hyps, "held", measures=measures, **opts).to_pylist()
        seconds = time.perf_counter() - t0            # scores are on the host: the device is done
        used = query_stats(con)
        dbd.close(con)
    corr, lo, hi = engine_corr(rows, LAYERS, HYPS, 256)
    iou = np.full((len(LAYERS), 256, len(BINARY)), np.nan)
    acc = np.full((len(LAYERS), len(BINARY)), np.nan)
    for row in rows:
        li = LAYERS.index(row["layer"])
        if row["measure"] == "iou" and row["score"] is not None:
            iou[li, row["unit"], BINARY.index(row["hypothesis"])] = row["score"]
        elif row["measure"] == "probe" and row["unit"] is None and row["hypothesis"] in BINARY:
            acc[li, BINARY.index(row["hypothesis"])] = row["score"]
    np.savez(out, corr=corr, ci_low=lo, ci_high=hi, iou=iou, probe_acc=acc)
    return {"seconds": seconds, **used}


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously) before a clock is read."""
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_forward(records, device: str = "cpu") -> dict:
    from deepbase_duck.models.zoo import charlstm
    adapter = charlstm("final", device=device)
    texts = sorted((r["text"] for r in records), key=len)
    adapter.forward(adapter.encode(texts[:16]))           # CUDA context and kernels, outside the clock
    synchronize(device)
    t0 = time.perf_counter()
    for lo in range(0, len(texts), 16):
        adapter.forward(adapter.encode(texts[lo:lo + 16]))
    synchronize(device)
    return {"seconds": time.perf_counter() - t0}


def child(a) -> dict:
    limit_threads(a.threads)
    records = records_for(a.chars, a.record_chars, a.split)
    if a.child == "forward":
        r = run_forward(records, a.device)
    elif a.child == "baseline":
        r = run_baseline(records, a.dissection, a.out, a.device)
    else:
        r = run_engine(records, a.child.split(":")[0], a.dissection, a.max_error[0], a.seed, a.top_k, a.out,
                       a.device)
    r.update(kind=a.child, records=len(records), chars=sum(len(x["text"]) for x in records),
             peak_rss_mb=peak_rss_mb())
    return r


def run(kind, a, chars, out):
    argv = ["--chars", str(chars), "--record-chars", str(a.record_chars), "--split", a.split, "--threads", str(a.threads),
            "--max-error", kind_max_error(kind, a.max_error), "--seed", str(a.seed), "--top-k", str(a.top_k),
            "--out", out, "--device", a.device]
    return spawn(__file__, kind, argv + (["--dissection"] if a.dissection else []))


def parse_with_common(ap: argparse.ArgumentParser, max_error: list[float]):
    """Add the options every workload has (early stopping, threads, the child's role) and parse."""
    ap.add_argument("--max-error", type=float, nargs="+", default=max_error, help="one early-stopped run per value")
    ap.add_argument("--seed", type=int, default=1, help="record order of the progressive scans")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", default=None)
    return ap.parse_args()


def early_kinds(max_errors) -> list[str]:
    """One early-stopped run per max_error value: 'early:0.15', ..."""
    return [f"early:{m:g}" for m in max_errors]


def kind_max_error(kind: str, max_errors) -> str:
    """The --max-error a child runs with: its own for 'early:<m>', else the first value."""
    return kind.split(":")[1] if kind.startswith("early:") else str(max_errors[0])


def measure_all(kinds, run_kind, small: bool, small_kinds=("full", "baseline")) -> tuple[dict, dict]:
    """Each kind in its own process, one after the other: ``run_kind(kind, div, out)`` measures
    it on a ``div``-th of the workload and writes its arrays to ``out``. With ``small``, the
    ``small_kinds`` again at a tenth ('full/10', 'baseline/10'). Returns (results, arrays)."""
    tmp = tempfile.mkdtemp()
    res, arrays = {}, {}
    for kind in kinds:
        out = os.path.join(tmp, f"{kind}.npz")
        res[kind] = run_kind(kind, 1, out)
        if kind != "forward":
            arrays[kind] = np.load(out)
        print(f"  {kind:<12} {res[kind]['seconds']:8.2f} s   peak RSS {res[kind]['peak_rss_mb']:7.0f} MB", flush=True)
    if small:
        for kind in small_kinds:
            res[f"{kind}/10"] = run_kind(kind, 10, os.path.join(tmp, f"{kind}-small.npz"))
    return res, arrays


def top10(m):
    return [set(np.argsort(-np.nan_to_num(np.abs(m[:, j]), nan=-1))[:10].tolist()) for j in range(m.shape[1])]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chars", type=int, default=1_000_000)
    ap.add_argument("--record-chars", type=int, default=600)
    ap.add_argument("--split", choices=["heldout", "train", "all"], default="heldout",
                    help="the code records: held-out files (1.68M characters), training files, or both")
    ap.add_argument("--top-k", type=int, default=10, help="the ranking query's k (run 'rank')")
    ap.add_argument("--dissection", action="store_true", help="add IoU and probes (full scans only)")
    ap.add_argument("--no-rss", action="store_true", help="skip the 1/10-size run")
    ap.add_argument("--device", default="cpu", help="where the models (both sides) and the inspectors run: cpu, cuda")
    a = parse_with_common(ap, max_error=[0.15, 0.08])
    if a.child:
        print(json.dumps(child(a)))
        return
    early = early_kinds(a.max_error)
    kinds = ["forward", "baseline", "full", "labelled"] + ([] if a.dissection else early + ["rank"])
    res, arrays = measure_all(kinds, lambda kind, div, out: run(kind, a, a.chars // div, out), not a.no_rss)
    f, b = arrays["full"], arrays["baseline"]
    n = res["full"]
    print(f"\ndeepbase_duck vs a standard Python implementation: char-LSTM 2x256, layers {', '.join(LAYERS)}, "
          f"{len(HYPS)} hypotheses, {n['records']} records, {n['chars']} characters, threads={a.threads}, "
          f"device={a.device}")
    print_runs(res, kinds)
    bl = res["baseline"]
    print(f"baseline split: extract {bl['t_extract']:.1f} s, hypotheses {bl['t_labels']:.1f} s, "
          f"scipy loop {bl['seconds'] - bl['t_extract'] - bl['t_labels']:.1f} s")
    print(corr_check(f["corr"], b["corr"]))
    if a.dissection:
        print(f"max |IoU diff| = {np.nanmax(np.abs(f['iou'] - b['iou'])):.2e}; probe accuracy "
              f"ours {np.round(f['probe_acc'], 4).tolist()} vs sklearn {np.round(b['probe_acc'], 4).tolist()}")
    else:
        for kind, rule in [(k, f"max_error {k.split(':')[1]}") for k in early] + [("rank", f"top_k {a.top_k}")]:
            coverage, agree, missing, strong = early_check(arrays[kind], f["corr"])
            print(f"{kind} ({rule}, seed {a.seed}): {res[kind]['records_used']} of {n['records']} records, "
                  f"bound {res[kind]['bound']:.3f}, time {res[kind]['seconds'] / n['seconds']:.2f} of the full scan; "
                  f"coverage {coverage:.3f}; top-10 agreement per (layer, hypothesis) {agreement_text(agree, strong)}"
                  + (f"; {len(missing)} NULL" if missing else ""))
    if not a.no_rss:
        print(rss_growth(res))


if __name__ == "__main__":
    main()

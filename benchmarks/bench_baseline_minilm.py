"""deepbase_duck against a standard Python implementation on a transformer: all-MiniLM-L6-v2 word
pieces scored against spaCy POS tags, side by side in one run (issue: query optimisation, item 6;
the char-LSTM workload is benchmarks/bench_baseline.py, whose helpers this script shares).

    .venv/bin/python benchmarks/bench_baseline_minilm.py                    # 4,000 sentences, ~106k word pieces
    .venv/bin/python benchmarks/bench_baseline_minilm.py --sentences 200    # a quick check
    .venv/bin/python benchmarks/bench_baseline_minilm.py --rss              # + peak RSS at a tenth of the sentences

Every measurement runs in its own fresh process (peak RSS is per process), one after the other
in one invocation, so that the ratios are taken on the same machine state. Both sides run on
``--threads`` threads (torch, BLAS, OpenMP). On a machine shared with other work use
``--threads 1``: 2-thread BLAS and OpenMP loops whose threads get descheduled slow down many-fold
(scikit-learn's fit most of all: 8x measured here under a load of 6 on 2 cores).

Workload: all-MiniLM-L6-v2 (the ``minilm`` zoo loader; 6 BERT layers x 384 units), the outputs of
``--layers`` (default encoder.layer.1, .3 and .5), over ``--sentences`` Penn Treebank sentences
(a seeded sample of ``--split``, about 26.5 word pieces each), labelled with spaCy's coarse POS
tags (the ``upos`` hypothesis, 17 classes; word pieces inside PTB's ``<unk>`` are unlabelled).
Two measures on the labelled word pieces:
  corr   Pearson r of every unit with every class's one-vs-rest indicator (deepbase_duck expands
         a categorical hypothesis into binary columns 'upos=NOUN', ...): 3 x 384 x 17 = 19,584
         correlations; a class that never occurs gives NULL (scipy: NaN);
  probe  one multinomial logistic-regression POS probe per layer, held-out accuracy on a test
         split by record (deepbase_duck's ``test_split_mask``: the same 20% of the sentences on
         both sides), features standardised with the training rows' mean and population standard
         deviation, L2 penalty l2 = 1e-3 per training row (sklearn's C = 1 / (n_train l2)).

  forward   the bare forward passes, batched as the engine batches them (length-sorted), nothing kept;
  baseline  what a study script does: forward hooks into one dense numpy matrix per layer over every
            word piece (the adapter's own tokenisation and forward pass, so the symbols are the
            engine's), spaCy's tags for every sentence, each word piece labelled by the majority of
            its characters in numpy (the rule of sql/10_alignment.sql), then scipy.stats.pearsonr
            per (unit, class indicator) and one scikit-learn LogisticRegression per layer; timed
            from before the model is loaded (deepbase_duck's ``register_model`` loads it, timed);
  full      ``dbd.annotate`` (spaCy) then one ``dbd.inspect(..., measures=['corr', 'probe'])`` on a
            fresh file-backed store: records inserted, labels, symbols, forward passes, states, the
            probes' fits and the scores written, all timed;
  early:M   ``measures=['corr']`` with ``max_error`` M (one run per ``--max-error`` value) and
            ``seed``, on its own fresh store: a progressive scan that stops once every
            correlation's batch-means bound is within M. Probes are left out of it (their own
            stop rule, a held-out loss plateau, ``plateau_tol``, is not measured here), so it is
            compared with the baseline's correlation part (everything but the sklearn probes).
            With ``--min-support N`` the classes seen fewer than N times do not hold it.
  fullcorr  ``measures=['corr']`` without early stopping, labels computed as the scan goes: the
            full scan the early runs are a fraction of;
  labelled  ``fullcorr`` with the labels stored before the clock starts (``dbd.annotate``), timed
            over ``inspect`` alone (symbols, alignment, forward passes, correlations, scores
            written): the full scan against the bare forward passes, as on labelled data;
  rank      the ranking query ``top_k`` (``--top-k``, 10) with ``seed`` and ``--min-support``;
  early:M~1, rank~1 (``--split-compare``)   the same progressive queries with the model's
            ``window_split`` set to 1 in the catalog (each window one forward batch, as before
            session 6) instead of the transformer adapter's 2 (two length-sorted batches);
  full/10, baseline/10 (``--rss``)   the same on a tenth of the sentences, for the peak-RSS growth.

spaCy is slow (a few ms per sentence). deepbase_duck caches the labels in its store per
(hypothesis version, record), but every run here starts from a fresh store, so both sides pay
for spaCy once, on every sentence they use; both call the same ``upos`` hypothesis, which tags
many sentences with one ``nlp.pipe`` call (the baseline: all of them; deepbase_duck: a block or
a chunk of records at a time; before session 6 both called ``nlp(text)`` per sentence). The split of each side (extract / labels / scoring) is printed
so that the share of spaCy and of the forward passes can be read off.

Checks printed: max |r_deepbase_duck - r_scipy| and NULL exactly where scipy is NaN; probe
accuracy per layer, ours vs sklearn (within about a point: both optima are iterative); for the
early-stopped query, the share of its intervals that contain the full-scan score (coverage), per
(layer, class) scored by both scans how many of its top-10 units by |r| are in the full scan's,
and the classes it leaves NULL because none of its sentences has them (INTJ: a handful of word
pieces in the whole sample).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from bench_baseline import (agreement_text, corr_check, early_check, early_kinds, engine_corr, kind_max_error, limit_threads,
                            measure_all, parse_with_common, peak_rss_mb, per_char_labels, print_runs, query_stats,
                            rss_growth, scipy_corr, spawn)

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # nothing is downloaded at run time

LAYERS = ["encoder.layer.1", "encoder.layer.3", "encoder.layer.5"]
WIDTH = 384
HYP = "upos"
L2 = 1e-3                                            # the engine's default probe penalty
PROBE = {"topk": [], "min_per_class": 0}             # one probe per layer, as sklearn fits


def upos_classes() -> list[str]:
    from deepbase_duck.hypotheses.spacy_pos import UPOS_TAGS
    return list(UPOS_TAGS)


def records_for(sentences: int, split: str, sample_seed: int):
    from deepbase_duck.corpora.ptb import ptb_records
    return ptb_records(split, sentences, seed=sample_seed)


def length_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """Record indices sorted by text length (then index), cut into batches: the engine's batching."""
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    return [sorted(order[lo:lo + batch_size]) for lo in range(0, len(order), batch_size)]


def majority_label(chars: np.ndarray) -> float:
    """The value held by most characters of a word piece (NaN, no label, counts as a value);
    a tie goes to the value of the earliest tied character."""
    if chars.size == 0:
        return np.nan
    codes = np.nan_to_num(chars, nan=-1.0)
    values, first, counts = np.unique(codes, return_index=True, return_counts=True)
    best = values[np.lexsort((first, -counts))[0]]
    return np.nan if best == -1.0 else float(best)


def wordpiece_labels(per_char: np.ndarray, starts, ends) -> np.ndarray:
    """Each word piece's label from the per-character labels of its sentence."""
    return np.array([majority_label(per_char[s:e]) for s, e in zip(starts, ends)], dtype=np.float64)


class Laps:
    """A stopwatch: ``lap(name)`` records the seconds since the previous lap (or the start)."""

    def __init__(self):
        self.seconds, self.last = {}, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self.last = now - self.last, now


def run_baseline(records, layers, batch_size: int, out: str) -> dict:
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from deepbase_duck.extraction.hooks import Retain
    from deepbase_duck.hypotheses.core import get_hypothesis
    from deepbase_duck.inspectors.probes import test_split_mask
    from deepbase_duck.models.zoo import minilm
    import deepbase_duck.hypotheses.spacy_pos  # noqa: F401  (registers upos)
    lap = Laps()                      # loading the model (and transformers) counts, as in register_model
    adapter = minilm()
    lap("t_load")
    texts = [r["text"] for r in records]
    # 1. every word piece's activations, one dense numpy matrix per layer (rows in record order)
    rows = {layer: [None] * len(texts) for layer in layers}
    spans = [None] * len(texts)
    with Retain(adapter.module, layers) as ret:
        for batch in length_batches(texts, batch_size):
            enc = adapter.encode([texts[i] for i in batch])
            adapter.forward(enc)
            for b, i in enumerate(batch):
                spans[i] = (enc.starts[b], enc.ends[b])
                for layer in layers:
                    rows[layer][i] = ret[layer][b, torch.as_tensor(enc.index[b])].float().numpy().copy()
    acts = {layer: np.concatenate(r) for layer, r in rows.items()}
    del rows
    record_of = np.concatenate([np.full(len(s), i) for i, (s, _) in enumerate(spans)])
    lap("t_extract")
    # 2. spaCy's tags for every sentence (nlp.pipe, 64 at a time), per character; then per word
    # piece by majority
    h = get_hypothesis(HYP)
    per_char = [per_char_labels(h, t, spans) for t, spans in zip(texts, h.spans_many(texts, range(len(texts))))]
    lap("t_spacy")
    upos = np.concatenate([wordpiece_labels(c, s, e) for c, (s, e) in zip(per_char, spans)])
    lap("t_align")
    # 3. the (unit, class) loop on one-vs-rest indicators
    classes = upos_classes()
    indicators = {f"{HYP}={c}": np.where(np.isnan(upos), np.nan, upos == k) for k, c in enumerate(classes)}
    r = scipy_corr(acts, indicators, layers, list(indicators))
    lap("t_corr")
    # 4. one POS probe per layer, split by record as deepbase_duck splits
    test = test_split_mask(record_of, 0, 0.2)
    labelled = ~np.isnan(upos)
    train, held = labelled & ~test, labelled & test
    y = np.nan_to_num(upos).astype(int)
    acc = np.full(len(layers), np.nan)
    for li, layer in enumerate(layers):
        x = acts[layer].astype(np.float64)
        scaler = StandardScaler().fit(x[train])
        clf = LogisticRegression(C=1.0 / (train.sum() * L2), max_iter=1000)
        clf.fit(scaler.transform(x[train]), y[train])
        acc[li] = clf.score(scaler.transform(x[held]), y[held])
    lap("t_probe")
    np.savez(out, corr=r, probe_acc=acc)
    return {"seconds": sum(lap.seconds.values()), **lap.seconds,
            "symbols": int(len(upos)), "labelled": int(labelled.sum())}


def run_engine(records, kind: str, layers, batch_size: int, max_error: float, seed: int, out: str,
               min_support: int = 0, top_k: int = 10, window_split: int | None = None) -> dict:
    import deepbase_duck as dbd
    import deepbase_duck.engine.inspect  # noqa: F401  (library imports before the clock, as the baseline's)
    with tempfile.TemporaryDirectory() as tmp:
        lap = Laps()
        con = dbd.connect(os.path.join(tmp, "bench.duckdb"), progress=False)
        dbd.register_model(con, "minilm", "deepbase_duck.models.zoo:minilm")
        if window_split is not None:  # override the adapter's choice (the catalog column the scan reads)
            con.execute("UPDATE models SET window_split = ? WHERE name = 'minilm'", [window_split])
        dbd.add_dataset(con, "ptb", records)
        lap("t_setup")
        if kind == "early":           # the labels of the records the scan reaches, computed as it goes
            rows = dbd.inspect(con, "minilm", layers, [HYP], "ptb", measures=["corr"], batch_size=batch_size,
                               max_error=max_error, seed=seed, min_support=min_support).to_pylist()
        elif kind == "rank":          # the ranking query: top_k, the same min_support
            rows = dbd.inspect(con, "minilm", layers, [HYP], "ptb", measures=["corr"], batch_size=batch_size,
                               top_k=top_k, seed=seed, min_support=min_support).to_pylist()
        elif kind == "labelled":      # labels stored beforehand; the clock covers inspect alone
            dbd.annotate(con, [HYP], "ptb")
            lap = Laps()
            rows = dbd.inspect(con, "minilm", layers, [HYP], "ptb", measures=["corr"], batch_size=batch_size).to_pylist()
        elif kind == "fullcorr":      # the same query without early stopping: labels computed as it goes
            rows = dbd.inspect(con, "minilm", layers, [HYP], "ptb", measures=["corr"], batch_size=batch_size).to_pylist()
        else:
            dbd.annotate(con, [HYP], "ptb")
            lap("t_labels")
            rows = dbd.inspect(con, "minilm", layers, [HYP], "ptb", measures=["corr", "probe"],
                               batch_size=batch_size, probe=PROBE).to_pylist()
        lap("t_inspect")
        used = query_stats(con)
        dbd.close(con)
    names = [f"{HYP}={c}" for c in upos_classes()]
    corr, lo, hi = engine_corr(rows, layers, names, WIDTH)
    acc = np.full(len(layers), np.nan)
    for row in rows:
        if row["measure"] == "probe" and row["hypothesis"] == HYP:
            acc[layers.index(row["layer"])] = row["score"]
    np.savez(out, corr=corr, ci_low=lo, ci_high=hi, probe_acc=acc)
    return {"seconds": sum(lap.seconds.values()), **lap.seconds, **used}


def run_forward(records, batch_size: int) -> dict:
    from deepbase_duck.models.zoo import minilm
    adapter = minilm()
    texts = [r["text"] for r in records]
    t0 = time.perf_counter()
    symbols = 0
    for batch in length_batches(texts, batch_size):
        enc = adapter.encode([texts[i] for i in batch])
        adapter.forward(enc)
        symbols += sum(len(s) for s in enc.starts)
    return {"seconds": time.perf_counter() - t0, "symbols": symbols}


def layer_list(text: str) -> list[str]:
    """``--layers`` as module paths; spaces after the commas dropped (the engine refuses a layer
    name with whitespace around it)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def child(a) -> dict:
    limit_threads(a.threads)
    records = records_for(a.sentences, a.split, a.sample_seed)
    layers = layer_list(a.layers)
    if a.child == "forward":
        r = run_forward(records, a.batch_size)
    elif a.child == "baseline":
        r = run_baseline(records, layers, a.batch_size, a.out)
    else:
        kind, _, split = a.child.partition("~")
        r = run_engine(records, kind.split(":")[0], layers, a.batch_size, a.max_error[0], a.seed, a.out,
                       a.min_support, a.top_k, int(split) if split else None)
    r.update(kind=a.child, records=len(records), peak_rss_mb=peak_rss_mb())
    return r


def run(kind: str, a, sentences: int, out: str) -> dict:
    return spawn(__file__, kind, ["--sentences", str(sentences), "--split", a.split,
                                  "--sample-seed", str(a.sample_seed), "--layers", a.layers,
                                  "--batch-size", str(a.batch_size), "--threads", str(a.threads),
                                  "--max-error", kind_max_error(kind.partition("~")[0], a.max_error),
                                  "--seed", str(a.seed),
                                  "--min-support", str(a.min_support), "--top-k", str(a.top_k), "--out", out])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=4000, help="PTB sentences (default 4000: ~106k word pieces)")
    ap.add_argument("--split", default="train", choices=["train", "valid", "test"], help="PTB split (default train)")
    ap.add_argument("--sample-seed", type=int, default=0, help="seed of the sentence sample (default 0)")
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated module paths")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rss", action="store_true", help="also run both sides on a tenth of the sentences")
    ap.add_argument("--min-support", type=int, default=0,
                    help="the early runs' min_support: classes seen fewer times do not hold the scan")
    ap.add_argument("--top-k", type=int, default=10, help="the ranking query's k (run 'rank')")
    ap.add_argument("--split-compare", action="store_true",
                    help="also run the progressive queries with window_split 1 (one forward batch per window)")
    a = parse_with_common(ap, max_error=[0.15, 0.1])
    if a.child:
        print(json.dumps(child(a)))
        return
    early = early_kinds(a.max_error)
    split_kinds = [f"{k}~1" for k in early] + ["rank~1"] if a.split_compare else []
    kinds = ["forward", "baseline", "full", "fullcorr", "labelled"] + early + ["rank"] + split_kinds
    res, arrays = measure_all(kinds, lambda kind, div, out: run(kind, a, a.sentences // div, out), a.rss,
                              small_kinds=("full", "fullcorr", "baseline"))
    f, b = arrays["full"], arrays["baseline"]
    bl, n = res["baseline"], res["full"]
    layers = layer_list(a.layers)
    corr_only = bl["seconds"] - bl["t_probe"]
    print(f"\ndeepbase_duck vs a standard Python implementation: all-MiniLM-L6-v2, layers {', '.join(layers)} "
          f"({len(layers)} x {WIDTH} units), spaCy UPOS ({len(upos_classes())} classes), {n['records']} PTB "
          f"{a.split} sentences, {bl['symbols']} word pieces ({bl['labelled']} labelled), threads={a.threads}")
    print_runs(res, kinds, reference={kind: corr_only for kind in early + ["fullcorr", "labelled", "rank"] + split_kinds})
    print(f"(baseline and full: corr + probes; fullcorr, labelled and early: corr only, their speed-up is over the baseline "
          f"without its probes, {corr_only:.2f} s)")
    print(f"baseline split: model load {bl['t_load']:.1f} s, extract {bl['t_extract']:.1f} s, spaCy "
          f"{bl['t_spacy']:.1f} s, alignment {bl['t_align']:.1f} s, scipy loop {bl['t_corr']:.1f} s, "
          f"sklearn probes {bl['t_probe']:.1f} s")
    print(f"deepbase_duck split: store, model and records {n['t_setup']:.1f} s, annotate (spaCy, labels stored) "
          f"{n['t_labels']:.1f} s, inspect (symbols, alignment, forward, corr, probes) {n['t_inspect']:.1f} s; "
          f"the bare forward passes take {res['forward']['seconds']:.1f} s")
    print(corr_check(f["corr"], b["corr"]))
    print(f"labelled: {corr_check(arrays['labelled']['corr'], b['corr'])}; full scan with stored labels over bare "
          f"forward passes {res['labelled']['seconds'] / res['forward']['seconds']:.2f}")
    print("probe accuracy (ours vs sklearn): " + ", ".join(
        f"{layer} {fa:.4f} vs {ba:.4f}" for layer, fa, ba in zip(layers, f["probe_acc"], b["probe_acc"]))
        + f"; max |diff| {np.max(np.abs(f['probe_acc'] - b['probe_acc'])):.4f}")
    for kind in [k for k in kinds if k.startswith(("early", "rank"))]:
        coverage, agree, missing, strong = early_check(arrays[kind], f["corr"])
        e = res[kind]
        base = kind.partition("~")[0]
        rule = f"top_k {a.top_k}" if base == "rank" else f"max_error {kind_max_error(base, a.max_error)}"
        print(f"{kind} ({rule}, min_support {a.min_support}, seed {a.seed}): "
              f"{e['records_used']} of {n['records']} sentences, bound {e['bound']:.3f}"
              + (f" (classes left out: {e['rare']})" if e.get("rare") else "")
              + f", time {e['seconds'] / res['fullcorr']['seconds']:.2f} of the full corr scan "
              f"({e['seconds'] / n['seconds']:.2f} of corr + probes); coverage {coverage:.3f}; top-10 agreement "
              f"per (layer, class) over the {len(agree)} pairs both scans score: {agreement_text(agree, strong)}")
        if missing:
            print("  NULL in this scan (no word piece of the class in its sentences), scored by the full scan: "
                  + ", ".join(f"{layers[li]} {HYP}={upos_classes()[j]}" for li, j in missing))
    if a.rss:
        print(rss_growth(res))


if __name__ == "__main__":
    main()

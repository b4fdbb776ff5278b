"""Probes benchmark: one merged ProbeState per layer vs one scikit-learn fit per (layer, hypothesis).

Side by side in one run, on the same activations, labels and train/test split:

  ours     : for each layer, one ``deepbase_duck.inspectors.probes.ProbeState`` over all the
             hypotheses, updated block by block (16 records a block, as the engine feeds it) and
             finalised: the sample (hashing, split, bounded merge), standardisation, one
             multi-output model for all hypotheses (L-BFGS), held-out accuracy, the probe-weight
             neuron ranking and the re-training on the top-k units (k = 1, 5, 10, 50), rows out.
  sklearn  : the standard Python implementation: for each layer the same split
             (``test_split_mask``), ``StandardScaler`` fitted on the train split, then a loop over
             the hypotheses fitting one ``LogisticRegression`` (lbfgs, C matched to ProbeState's
             l2: C = 2/(n_h l2) for a binary hypothesis, 1/(n_h l2) for a categorical one, see the
             probes module docstring), held-out accuracy, units ranked by NeuroX weight mass of
             ``coef_`` (|w| normalised per class, averaged over classes), and one fresh
             ``LogisticRegression`` per k on the top-k units.

Workload: the bundled char-LSTM (final checkpoint), layers lstm0 and lstm1 (256 units each), over
held-out standard-library code; hypotheses in_string, in_comment, python_keyword, digit (binary)
and char_kind (categorical: letter / digit / space / punct, registered here). Activations and
labels are read from the store once (not timed); both sides start from the same in-memory
float32 activations and float64 labels (NaN = no label).

Fairness: both sides run on the same number of threads (``--threads``: torch intra-op threads,
and BLAS + OpenMP through threadpoolctl for numpy/scipy/scikit-learn). The default is 1: on the
project's shared 2-core machine anything else running (a CI job) leaves 2-thread OpenMP/BLAS
code waiting on a descheduled thread, which slowed ours 2.6x and sklearn 12x in a trial run; pass
``--threads 2`` on an idle machine. scikit-learn is given the standardised features in the dtype
ProbeState trains in (float64 up to 2**23 train cells, float32 above); its tol is its default
(1e-4), its max_iter ProbeState's max_epochs (500). ProbeState runs with its defaults (l2 = 1e-3,
topk = (1, 5, 10, 50), L-BFGS tolerances as built in) except max_rows, raised to the number of
rows when needed so that the "sample" is the whole split and both sides train on the same rows.
Both timings start from the in-memory arrays: ours includes the updates (row hashing, split,
sample) and finalize (rows out); sklearn's the split, the scaler, the fits, the rankings. The two
sides alternate (ours first on even repeats, sklearn first on odd ones); the best time of each
side is reported, with every repeat's.

    .venv/bin/python benchmarks/bench_probes.py                       # 60k characters, 2 repeats, 1 thread
    .venv/bin/python benchmarks/bench_probes.py --chars 20000 --repeat 1 --threads 2

The held-out probe accuracies of the two sides must agree within 1 point (asserted).
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np

LAYERS = ["lstm0", "lstm1"]
HYPS = ["in_string", "in_comment", "python_keyword", "digit", "char_kind"]
CHAR_KINDS = ("letter", "digit", "space", "punct")
BLOCK_RECORDS = 16
SEED, TEST_FRACTION, L2, TOPK, MAX_EPOCHS = 0, 0.2, 1e-3, (1, 5, 10, 50), 500


def char_kind_fn(text: str) -> list[str]:
    return ["letter" if c.isalpha() else "digit" if c.isdigit() else "space" if c.isspace() else "punct"
            for c in text]


# ----------------------------------------------------------------------------------- data
def load(chars: int):
    import deepbase_duck as dbd
    from deepbase_duck.corpora.code import code_records
    from deepbase_duck.hypotheses.core import Hypothesis, register

    register(Hypothesis("char_kind", char_kind_fn, "categorical", "letter / digit / space / punct",
                        categories=CHAR_KINDS))
    con = dbd.connect(None, progress=False)
    dbd.register_model(con, "charlstm", "deepbase_duck.models.zoo:charlstm")
    records = code_records("heldout", limit_chars=chars)
    dbd.add_dataset(con, "code", records)
    res = dbd.extract(con, "charlstm", LAYERS, "code")
    dbd.annotate(con, HYPS, "code")
    tok = con.execute("SELECT tokenization FROM models WHERE name = 'charlstm'").fetchone()[0]
    hyps = []
    for name in HYPS:
        kind, cats = con.execute("SELECT kind, categories FROM hypotheses WHERE name = ?", [name]).fetchone()
        h = {"name": name, "kind": kind}
        if kind == "categorical":
            h["categories"] = list(cats)
        hyps.append(h)
    lab = con.execute("SELECT record_id, pos, hypothesis, value FROM symbol_labels('code', ?, ?) "
                      "ORDER BY record_id, pos", [tok, HYPS]).fetchnumpy()
    data = {}
    for r in res:
        layer = r["layer"]
        t = con.sql(f"SELECT record_id, pos, act FROM {r['view']} ORDER BY record_id, pos").to_arrow_table()
        rid = t.column("record_id").to_numpy().astype(np.int64)
        pos = t.column("pos").to_numpy().astype(np.int64)
        acts = t.column("act").combine_chunks()
        width = acts.type.list_size
        X = np.ascontiguousarray(acts.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
                                 .reshape(len(rid), width))
        # labels into an (n, H) matrix aligned with the activation rows
        row = {(a, b): i for i, (a, b) in enumerate(zip(rid.tolist(), pos.tolist()))}
        Y = np.full((len(rid), len(HYPS)), np.nan)
        col = {h: j for j, h in enumerate(HYPS)}
        vals = lab["value"]
        vals = np.where(np.ma.getmaskarray(vals), np.nan, np.ma.getdata(vals)).astype(np.float64) \
            if np.ma.isMaskedArray(vals) else np.asarray(vals, dtype=np.float64)
        for a, b, h, v in zip(lab["record_id"].tolist(), lab["pos"].tolist(), lab["hypothesis"].tolist(), vals):
            i = row.get((a, b))
            if i is not None:
                Y[i, col[h]] = v
        ids = np.unique(rid)
        starts = np.searchsorted(rid, ids[::BLOCK_RECORDS])
        bounds = list(zip(starts.tolist(), starts[1:].tolist() + [len(rid)]))
        data[layer] = (X, Y, rid, bounds)
    dbd.close(con)
    n_chars = sum(len(r["text"]) for r in records)
    return data, hyps, n_chars, len(records)


# ------------------------------------------------------------------------------ the sides
def train_dtype(n_train: int, width: int):
    from deepbase_duck.inspectors import probes
    return np.float64 if n_train * width <= probes._FLOAT64_CELLS else np.float32


def run_ours(data, hyps):
    import torch
    from deepbase_duck.inspectors.probes import ProbeState
    tables = {}
    t0 = time.perf_counter()
    for layer, (X, Y, rid, bounds) in data.items():
        st = ProbeState(X.shape[1], hyps, seed=SEED, test_fraction=TEST_FRACTION, l2=L2, topk=TOPK,
                        max_epochs=MAX_EPOCHS, max_rows=max(200_000, len(rid)))
        for lo, hi in bounds:
            st.update(torch.from_numpy(X[lo:hi]), torch.from_numpy(Y[lo:hi]), torch.from_numpy(rid[lo:hi]))
        tables[layer] = st.finalize()
    seconds = time.perf_counter() - t0
    out = {}
    for layer, t in tables.items():
        d = t.to_pydict()
        for i in range(t.num_rows):
            key = (layer, d["hypothesis"][i])
            r = out.setdefault(key, {"topk": {}, "rank": {}})
            m = d["measure"][i]
            if m == "probe":
                r.update(acc=d["score"][i], n_train=d["n_train"][i], n_test=d["n_test"][i], majority=d["majority"][i])
            elif m == "probe_topk":
                r["topk"][d["k"][i]] = d["score"][i]
            elif m == "probe_weight":
                r["rank"][d["unit"][i]] = d["rank"][i]
    for r in out.values():
        r["order"] = [u for u, _ in sorted(r.pop("rank").items(), key=lambda x: x[1])]
    return seconds, out


def run_sklearn(data, hyps, max_iter: int, tol: float):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from deepbase_duck.inspectors.probes import test_split_mask

    out, notes = {}, {"convergence_warnings": 0, "max_n_iter": 0, "sum_n_iter": 0, "fits": 0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        t0 = time.perf_counter()
        for layer, (X, Y, rid, _) in data.items():
            test = test_split_mask(rid, SEED, TEST_FRACTION)
            dt = train_dtype(int((~test).sum()), X.shape[1])
            scaler = StandardScaler()
            Ztr = scaler.fit_transform(X[~test].astype(dt, copy=False))
            Zte = scaler.transform(X[test].astype(dt, copy=False))
            for j, h in enumerate(hyps):
                ytr, yte = Y[~test, j], Y[test, j]
                mtr, mte = ~np.isnan(ytr), ~np.isnan(yte)
                Xh = Ztr if mtr.all() else Ztr[mtr]
                Th = Zte if mte.all() else Zte[mte]
                ytr_h, yte_h = ytr[mtr].astype(np.int64), yte[mte].astype(np.int64)
                n_h = int(mtr.sum())
                C = (2.0 if h["kind"] == "binary" else 1.0) / (n_h * L2)

                def fit(Xf):
                    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=tol).fit(Xf, ytr_h)
                    notes["fits"] += 1
                    notes["max_n_iter"] = max(notes["max_n_iter"], int(np.max(clf.n_iter_)))
                    notes["sum_n_iter"] += int(np.max(clf.n_iter_))
                    return clf

                clf = fit(Xh)
                acc = float((clf.predict(Th) == yte_h).mean())
                A = np.abs(clf.coef_.astype(np.float64))
                tot = A.sum(1, keepdims=True)
                mass = np.where(tot > 0, A / np.where(tot > 0, tot, 1), 0).mean(0)
                order = np.argsort(-mass, kind="stable")
                topk = {}
                for k in sorted({min(k, X.shape[1]) for k in TOPK}):
                    cols = order[:k]
                    ck = fit(Xh[:, cols])
                    topk[k] = float((ck.predict(Th[:, cols]) == yte_h).mean())
                out[(layer, h["name"])] = {"acc": acc, "topk": topk, "order": order.tolist(),
                                           "n_train": n_h, "n_test": int(mte.sum())}
        seconds = time.perf_counter() - t0
    notes["convergence_warnings"] = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return seconds, out, notes


# ----------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chars", type=int, default=60_000, help="characters of held-out code")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side (interleaved); best kept")
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and for BLAS/OpenMP (both sides)")
    ap.add_argument("--sk-max-iter", type=int, default=MAX_EPOCHS)
    ap.add_argument("--sk-tol", type=float, default=1e-4)
    args = ap.parse_args()

    import torch
    from threadpoolctl import threadpool_limits
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    data, hyps, n_chars, n_records = load(args.chars)
    setup = time.perf_counter() - t0
    n_rows = len(next(iter(data.values()))[2])
    print(f"workload: {n_records} records, {n_chars} characters = {n_rows} symbols; layers "
          f"{', '.join(LAYERS)} (width {next(iter(data.values()))[0].shape[1]}); hypotheses "
          f"{', '.join(h['name'] + ('' if h['kind'] == 'binary' else ' (' + h['kind'] + ')') for h in hyps)}; "
          f"threads {args.threads}; setup (extract + labels, not timed) {setup:.1f} s")

    t_ours, t_sk = [], []
    with threadpool_limits(limits=args.threads):
        for rep in range(args.repeat):
            order = ("ours", "sk") if rep % 2 == 0 else ("sk", "ours")
            for side in order:
                if side == "ours":
                    s, ours = run_ours(data, hyps)
                    t_ours.append(s)
                else:
                    s, sk, notes = run_sklearn(data, hyps, args.sk_max_iter, args.sk_tol)
                    t_sk.append(s)
            print(f"repeat {rep + 1}: ours {t_ours[-1]:.2f} s, sklearn {t_sk[-1]:.2f} s "
                  f"(order: {' then '.join(order)})")

    ks = sorted({min(k, next(iter(data.values()))[0].shape[1]) for k in TOPK})
    head = (f"{'layer':6} {'hypothesis':15} {'n_train':>7} {'n_test':>6} {'major.':>6} {'ours':>6} {'sklearn':>7} "
            f"{'diff':>6} {'top10 shared':>12}  " + "  ".join(f"{'top' + str(k) + ' ours/sk':>15}" for k in ks))
    print()
    print(head)
    max_diff, max_topk_diff = 0.0, 0.0
    for key in sk:
        a, b = ours[key], sk[key]
        assert a["n_train"] == b["n_train"] and a["n_test"] == b["n_test"], (key, a["n_train"], b["n_train"])
        d = a["acc"] - b["acc"]
        max_diff = max(max_diff, abs(d))
        shared = len(set(a["order"][:10]) & set(b["order"][:10]))
        cells = []
        for k in ks:
            max_topk_diff = max(max_topk_diff, abs(a["topk"][k] - b["topk"][k]))
            cells.append(f"{a['topk'][k]:>7.4f}/{b['topk'][k]:<7.4f}")
        print(f"{key[0]:6} {key[1]:15} {a['n_train']:>7} {a['n_test']:>6} {a['majority']:>6.4f} {a['acc']:>6.4f} {b['acc']:>7.4f} "
              f"{100 * d:>+6.2f} {shared:>9}/10  " + "  ".join(cells))
    bo, bs = min(t_ours), min(t_sk)
    print()
    print(f"probe accuracy: max |ours - sklearn| = {100 * max_diff:.2f} points (limit 1); "
          f"top-k accuracy: max |diff| = {100 * max_topk_diff:.2f} points")
    print(f"sklearn: {notes['fits']} fits per run, {notes['sum_n_iter']} L-BFGS iterations in all, max "
          f"n_iter {notes['max_n_iter']} (max_iter "
          f"{args.sk_max_iter}, tol {args.sk_tol:g}), {notes['convergence_warnings']} ConvergenceWarning(s) in the last run")
    print(f"time (best of {args.repeat}): ours {bo:.2f} s (median {statistics.median(t_ours):.2f}), "
          f"sklearn {bs:.2f} s (median {statistics.median(t_sk):.2f})")
    if bo <= bs:
        print(f"speed-up: ours is {bs / bo:.2f}x faster than one sklearn fit per (layer, hypothesis)")
    else:
        print(f"SLOWER: ours is {bo / bs:.2f}x slower than one sklearn fit per (layer, hypothesis)")
    assert max_diff <= 0.01, f"probe accuracies differ by {100 * max_diff:.2f} points (> 1)"


if __name__ == "__main__":
    main()

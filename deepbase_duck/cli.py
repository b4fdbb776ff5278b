"""The ``deepbase-duck`` command line: each command is a thin mirror of one library call.

    deepbase-duck demo                          # the bundled char-LSTM on held-out stdlib code
    deepbase-duck register-model STORE NAME LOADER [--params JSON]
    deepbase-duck add-stdlib STORE NAME [--split heldout] [--chars N]
    deepbase-duck add-dataset STORE NAME PATH [--format lines|jsonl|csv|tsv|parquet|files|paths] [--column text]
    deepbase-duck annotate STORE DATASET HYPOTHESIS...
    deepbase-duck extract STORE MODEL DATASET LAYER... [--dtype float16]
    deepbase-duck inspect STORE MODEL DATASET --layers L... --hypotheses H... [--measures corr] [--params JSON]
    deepbase-duck report STORE [--out report.html] [--query N] [--model M] [--top K] [--read-only]
    deepbase-duck export STORE OUT_DIR [--activations] [--text] [--read-only]
    deepbase-duck shell [STORE [SCRIPT]] [-c SQL] [--create | --read-only] [--traceback]
    deepbase-duck hypotheses [STORE] [--read-only]   # the hypotheses this installation (and the store) can compute
    deepbase-duck define-hypothesis STORE NAME PATTERN [--kind categorical] [--flags i] [--replace]
    deepbase-duck drop-hypothesis STORE NAME
    deepbase-duck --version

Bad input exits with status 2 and one line naming the problem (a flag that acts only with
another, given without it, included: --dtype without --keep-activations); Ctrl-C with status
130 and one line, also while the libraries are still importing. ``--help`` imports none of
them (the package's ``__init__`` loads torch and the engine on first use), so it answers at once.
The commands that only read a store (report, export, shell, hypotheses) take ``--read-only``: the
store is opened without writing (``dbd.connect(path, read_only=True)``), so that a read-only file
or a store other read-only processes hold opens.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

EXAMPLES = {
    "demo": "deepbase-duck demo --store out/demo.duckdb --chars 150000",
    "register-model": "deepbase-duck register-model study.duckdb charlstm deepbase_duck.models.zoo:charlstm "
                      "--params '{\"checkpoint\": \"final\"}'",
    "add-stdlib": "deepbase-duck add-stdlib study.duckdb heldout --split heldout --chars 100000",
    "add-dataset": "deepbase-duck add-dataset study.duckdb ptb sentences.txt        # one record per line\n"
                   "  deepbase-duck add-dataset study.duckdb reviews reviews.csv --column body --source-column id\n"
                   "  deepbase-duck add-dataset study.duckdb mycode src/ --glob '**/*.py' --max-chars 2000\n"
                   "  deepbase-duck add-dataset study.duckdb photos pictures/ --format paths --glob '*.jpg'",
    "annotate": "deepbase-duck annotate study.duckdb heldout in_string in_comment",
    "extract": "deepbase-duck extract study.duckdb charlstm heldout lstm0 lstm1 --dtype float16",
    "inspect": "deepbase-duck inspect study.duckdb charlstm heldout --layers lstm0 lstm1 "
               "--hypotheses in_string in_comment --top 5",
    "hypotheses": "deepbase-duck hypotheses study.duckdb",
    "define-hypothesis": "deepbase-duck define-hypothesis study.duckdb has_digit '[0-9]+'\n"
                         "  deepbase-duck define-hypothesis study.duckdb char_class '(?P<digit>[0-9])|(?P<upper>[A-Z])' "
                         "--kind categorical",
    "drop-hypothesis": "deepbase-duck drop-hypothesis study.duckdb has_digit",
    "export": "deepbase-duck export study.duckdb out/bi --activations",
    "shell": "deepbase-duck shell study.duckdb -c \"SELECT * FROM top_units(3);\"\n"
             "  deepbase-duck shell --create new.duckdb     # a new, empty store",
    "report": "deepbase-duck report deepbase_demo/demo.duckdb --out report.html --top 8 --records 4",
}


STORE_HELP = "the .duckdb store"
READ_ONLY_HELP = ("open the store without writing to it (a read-only file, or one other read-only processes hold; "
                  "what would write is refused)")
# the measures of deepbase_duck.inspectors.MEASURES, named here for --measures' help: importing
# the inspectors loads torch and scipy, seconds that `--help` should not wait for (a test keeps
# the two lists equal)
MEASURE_NAMES = ("ap", "corr", "f1", "iou", "mi", "pointbiserial", "precision", "probe", "probeless", "recall",
                 "spearman")


def _parser() -> argparse.ArgumentParser:
    from deepbase_duck import __version__
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    p = argparse.ArgumentParser(prog="deepbase-duck", description="Deep Neural Inspection inside DuckDB.",
                                parents=[common])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                              epilog=f"example:\n  {EXAMPLES[name]}", formatter_class=argparse.RawDescriptionHelpFormatter)

    d = add("demo", "Inspect the bundled char-LSTM on held-out standard-library code and print its top units.")
    d.add_argument("--store", default="deepbase_demo/demo.duckdb", help="store to write (default: %(default)s)")
    d.add_argument("--chars", type=int, default=150_000, help="characters of held-out code (default: %(default)s)")
    d.add_argument("--checkpoint", default="final",
                   help="char-LSTM checkpoint: step0, early, mid or final (default: %(default)s)")
    d.add_argument("--top", type=int, default=3, help="units shown per hypothesis, >= 1 (default: %(default)s)")
    d.add_argument("--no-keep", action="store_true",
                   help="do not store activations (faster, smaller; by default they are kept, as float16, for "
                        "reports and later queries)")

    r = add("register-model", "Register a model by loader spec 'package.module:function'.")
    r.add_argument("store", help=STORE_HELP + " (created when missing)")
    r.add_argument("name", help="the name queries call the model by")
    r.add_argument("loader", help="'package.module:function' returning a ModelAdapter, e.g. "
                                  "deepbase_duck.models.zoo:charlstm")
    r.add_argument("--params", default="{}", help="JSON keyword arguments of the loader (default: %(default)s)")

    a = add("add-stdlib", "Add Python standard-library source as a dataset.")
    a.add_argument("store", help=STORE_HELP + " (created when missing)")
    a.add_argument("name", help="the dataset's name")
    a.add_argument("--split", default="heldout", choices=["heldout", "train"],
                   help="heldout: files the bundled char-LSTM never saw in training (default: %(default)s)")
    a.add_argument("--chars", type=int, default=None,
                   help="about this many characters: whole records are added until their total reaches it, so the "
                        "last one may run past it (default: every file of the split)")
    a.add_argument("--max-chars", type=int, default=2000,
                   help="longest record: files are cut at statement boundaries into records of at most this many "
                        "characters (default: %(default)s)")

    ad = add("add-dataset", "Add your own texts as a dataset: a text file (one record per line), JSON Lines, "
                            "CSV/TSV, Parquet, a folder of files, or a folder of images (format 'paths').")
    ad.add_argument("store", help=STORE_HELP + " (created when missing)")
    ad.add_argument("name", help="the dataset's name")
    ad.add_argument("path", help="a file, or a folder (formats 'files' and 'paths')")
    ad.add_argument("--format", default=None, choices=["lines", "jsonl", "csv", "tsv", "parquet", "files", "paths"],
                    help="default: by the suffix (.txt lines, .jsonl, .csv, .tsv, .parquet; a folder: files); "
                         "paths: a folder's files as image records")
    ad.add_argument("--column", default=None, help="the text's column or key (jsonl, csv, tsv, parquet; "
                                                   "default: text)")
    ad.add_argument("--source-column", default=None, help="a column or key naming each record's source "
                                                          "(jsonl, csv, tsv, parquet)")
    ad.add_argument("--glob", default=None, help="with a folder: the files to read (default: **/*)")
    ad.add_argument("--max-chars", type=int, default=None, help="cut longer texts at line ends into records "
                                                                "of at most this many characters")
    ad.add_argument("--description", default="", help="stored with the dataset (default: 'from PATH')")
    ad.add_argument("--replace", action="store_true",
                    help="replace a dataset of this name with other texts (its labels, symbols and stored activations "
                         "are dropped); not needed to append records after the stored ones")

    n = add("annotate", "Compute and store hypothesis labels for a dataset.")
    n.add_argument("store", help=STORE_HELP)
    n.add_argument("dataset", help="a dataset of the store")
    n.add_argument("hypotheses", nargs="+", help="hypothesis names (`deepbase-duck hypotheses` lists them)")

    e = add("extract", "Store the activations of layers of a model over a dataset (cached, resumable).")
    e.add_argument("store", help=STORE_HELP)
    e.add_argument("model", help="a registered model")
    e.add_argument("dataset", help="a dataset of the store")
    e.add_argument("layers", nargs="+", help="layer names of the model")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="the stored activations' type; float16 halves the disk (default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=16,
                   help="records per forward pass (default: %(default)s)")

    i = add("inspect", "Score every unit of layers against hypotheses; prints the top units.")
    i.add_argument("store", help=STORE_HELP)
    i.add_argument("model", help="a registered model, or checkpoints scanned together, separated by commas: "
                                 "early,mid,final. A name registered as it is (commas included, 'lstm,v2') is "
                                 "one model; only a name that is not registered is split at its commas")
    i.add_argument("dataset", help="a dataset of the store")
    i.add_argument("--layers", nargs="+", required=True, metavar="LAYER",
                   help="layer names of the model (all units of each are scored)")
    i.add_argument("--hypotheses", nargs="+", required=True, metavar="HYPOTHESIS",
                   help="hypothesis names (`deepbase-duck hypotheses` lists them); labels are computed when missing")
    i.add_argument("--measures", nargs="+", default=["corr"], metavar="MEASURE",
                   help=f"one or more of: {', '.join(MEASURE_NAMES)} (probe adds per-unit probe_weight and "
                        f"layer-level probe_topk rows; default: corr)")
    i.add_argument("--max-records", type=int, default=None, metavar="N",
                   help="only the first N records by record id (not a sample: for a random sample use --max-error "
                        "or --top-k, which read records in the seeded order of --seed, or the sampling macros of "
                        "the shell) (default: every record)")
    i.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="records per forward pass (default: %(default)s)")
    i.add_argument("--keep-activations", action="store_true",
                   help="also store the activations (of type --dtype), for reports and later queries")
    i.add_argument("--dtype", default=None, choices=["float32", "float16"],
                   help="with --keep-activations: the stored activations' type (default: float32)")
    i.add_argument("--params", default=None, metavar="JSON",
                   help="per-measure parameters as a JSON object, e.g. '{\"corr\": {\"intervals\": \"symbols\"}}' "
                        "(the SQL macro's params)")
    i.add_argument("--permutations", type=int, default=0, metavar="N",
                   help="N > 0: a permutation-test p-value per unit score, in detail->>'perm_p_value' "
                        "(default: %(default)s)")
    i.add_argument("--baseline", action="store_true", help="also score an untrained (re-initialised) copy")
    i.add_argument("--control", action="store_true", help="with --measures probe: control tasks and selectivity")
    i.add_argument("--top", type=int, default=5, metavar="N",
                   help="units shown per hypothesis, >= 1 (default: %(default)s)")
    i.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="ray: run the model on the workers of a Ray cluster (see README, Scaling out) "
                        "(default: %(default)s)")
    i.add_argument("--ray-address", default=None,
                   help="with --engine ray: 'auto', 'host:port' or 'ray://host:port' (default: a local Ray)")
    i.add_argument("--max-error", type=float, default=None,
                   help="early stopping: stop once every score's error bound is at most this (probes: a plateau)")
    i.add_argument("--plateau-tol", type=float, default=None,
                   help="early stopping for probes: stop once their held-out loss improves by less than this")
    i.add_argument("--min-support", type=int, default=0, metavar="N",
                   help="with --max-error or --top-k: label columns seen fewer times than this do not hold the scan "
                        "(default: %(default)s)")
    i.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="early stopping for a ranking: stop once each hypothesis' top-k units are stable")
    i.add_argument("--stable-windows", type=int, default=None, metavar="N",
                   help="with --top-k only: windows of records over which the top-k sets must stay the same "
                        "(default: 3)")
    i.add_argument("--seed", type=int, default=None, metavar="N",
                   help="with --max-error, --top-k or --plateau-tol: the seed of the random record order of the "
                        "progressive scan (default: 0)")
    i.add_argument("--no-reuse", action="store_true", help="scan again even if an identical query is stored")
    i.add_argument("--device", default=None,
                   help="where the inspectors run: cpu, cuda, cuda:N (default: CUDA where available)")

    hy = add("hypotheses", "List the hypotheses this installation can compute (with a store: also those it defines).")
    hy.add_argument("store", nargs="?", default=None,
                    help="a .duckdb store whose regular-expression hypotheses (define-hypothesis) are listed too")
    hy.add_argument("--read-only", action="store_true", help=READ_ONLY_HELP)

    dh = add("define-hypothesis", "Define a hypothesis by a regular expression (Python re), stored in the store "
                                  "so that every process opening it computes its labels.")
    dh.add_argument("store", help=STORE_HELP)
    dh.add_argument("name", help="the hypothesis' name (not one of a built-in)")
    dh.add_argument("pattern", help="a Python re pattern; a pattern that can match the empty string is refused")
    dh.add_argument("--kind", default="binary", choices=["binary", "categorical"],
                    help="binary: the matches' characters hold 1; categorical: the pattern's named groups are the "
                         "categories (default: %(default)s)")
    dh.add_argument("--flags", default="", help="letters of a (ASCII), i (IGNORECASE), m (MULTILINE), s (DOTALL), "
                                                "x (VERBOSE) (default: none)")
    dh.add_argument("--description", default="", help="what the hypothesis stands for (default: none)")
    dh.add_argument("--replace", action="store_true",
                    help="redefine a hypothesis the store defines already (its labels are computed again)")

    dr = add("drop-hypothesis", "Drop a hypothesis that define-hypothesis stored: its definition, labels and "
                                "catalog row (query results stay).")
    dr.add_argument("store", help=STORE_HELP)
    dr.add_argument("name", help="a hypothesis defined in the store (not a built-in or Python one)")

    sh = add("shell", "Interactive SQL shell on a store, with deepbase_duck's Python UDFs and macros live.")
    sh.add_argument("store", nargs="?", default=None,
                    help="the .duckdb store, which must exist unless --create is given (default: in memory)")
    sh.add_argument("script", nargs="?", default=None, help="a SQL file to run instead of the prompt")
    sh.add_argument("-c", dest="sql", default=None, help="run these statements and exit")
    sh.add_argument("--create", action="store_true",
                    help="create the store when there is none at that path (a mistyped path is an error otherwise)")
    sh.add_argument("--read-only", action="store_true", help=READ_ONLY_HELP)
    sh.add_argument("--traceback", action="store_true",
                    help="in a script or with -c: follow the error of a deepbase_duck call refused for its input "
                         "by its Python traceback too (by default that error is one line; a call that failed "
                         "otherwise, a bug, always shows its traceback)")

    x = add("export", "Export scores, catalog and optionally activations as Parquet plus a DuckDB 1.5 file of views.")
    x.add_argument("store", help=STORE_HELP)
    x.add_argument("out_dir", help="the folder to write (Parquet files and study.duckdb)")
    x.add_argument("--activations", action="store_true", help="also export stored activations")
    x.add_argument("--text", action="store_true", help="also export records, symbols and labels")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    x.add_argument("--read-only", action="store_true", help=READ_ONLY_HELP)

    rp = add("report", "Write a self-contained HTML report (figures embedded as PNG) of an inspection query.")
    rp.add_argument("store", help=STORE_HELP)
    rp.add_argument("--out", default="report.html", help="HTML file to write (default: %(default)s)")
    rp.add_argument("--query", type=int, default=None, help="query id (default: the latest matching query)")
    rp.add_argument("--model", default=None, help="the latest query of this model")
    rp.add_argument("--dataset", default=None, help="the latest query over this dataset")
    rp.add_argument("--measure", default=None, help="measure that ranks units (default: corr if scored)")
    rp.add_argument("--top", type=int, default=5, help="units per hypothesis (default: %(default)s)")
    rp.add_argument("--text-units", type=int, default=1,
                    help="units per hypothesis shown with coloured records (default: %(default)s)")
    rp.add_argument("--records", type=int, default=3, help="top-activating records per unit (default: %(default)s)")
    rp.add_argument("--context", type=int, default=240,
                    help="characters shown either side of a record's peak (default: %(default)s)")
    rp.add_argument("--read-only", action="store_true", help=READ_ONLY_HELP)
    return p


def top_units_table(con, query_id: int, k: int) -> str:
    """The top ``k`` units per (model, hypothesis, measure) of a query as text, from the SQL macro
    top_units; 'sep' marks a unit whose interval lies above every outsider's (see the macro). A
    query of several models (checkpoints) gets a model column; a single model's untrained copy
    (baseline) is marked by '~u' after the layer. A query with --permutations gets a 'perm p'
    column: each score's permutation-test p-value (in the scores' detail, which the table did not
    show, so the flag's result never reached the terminal)."""
    rows = con.sql(f"""
        SELECT hypothesis || CASE WHEN measure <> 'corr' THEN ' [' || measure || ']' ELSE '' END, model,
               layer, unit, score, ci_low, ci_high, n, separated,
               (SELECT max(TRY_CAST(s.detail->>'perm_p_value' AS DOUBLE)) FROM scores s
                WHERE s.query_id = {int(query_id)} AND s.model = t.model AND s.layer = t.layer
                  AND s.unit = t.unit AND s.hypothesis = t.hypothesis AND s.measure = t.measure)
        FROM top_units(k := {int(k)}, qid := {int(query_id)}, measure_name := NULL) t
        ORDER BY 1, model, rank""").fetchall()
    several = len({m.removesuffix("~untrained") for _, m, *_ in rows}) > 1
    perm = any(r[-1] is not None for r in rows)
    mw = max([5] + [len(m) for _, m, *_ in rows]) if several else 0
    # every column as wide as its longest entry ('bracket_depth [probe_weight]' included): aligned
    hw = max([18] + [len(h) for h, *_ in rows])
    lw = max([8] + [len(_layer_label(layer, model, several)) for _, model, layer, *_ in rows])
    head = (f"{'hypothesis':<{hw}} " + (f"{'model':<{mw}} " if several else "") +
            f"{'layer':<{lw}} {'unit':>5} {'score':>8}  {'95% CI':<17} {'n':>8}  sep" + ("   perm p" if perm else ""))
    lines = [head, "-" * len(head)]
    last = None
    for h, model, layer, unit, score, lo, hi, n, sep, p in rows:
        ci = f"[{lo:6.3f}, {hi:6.3f}]" if lo is not None and hi is not None else " " * 16
        mark = {True: "yes", False: "no"}.get(sep, "")
        shown = (f"  {'-' if p is None else format(p, '.3g'):>7}" if perm else "")
        lines.append((f"{(h if h != last else ''):<{hw}} " + (f"{model:<{mw}} " if several else "") +
                      f"{_layer_label(layer, model, several):<{lw}} {unit:>5} {score:>8.3f}  {ci} {n:>8}  "
                      f"{mark:<3}{shown}").rstrip())
        last = h
    return "\n".join(lines)


def _layer_label(layer: str, model: str, several: bool) -> str:
    """A layer as the tables show it: a single model's untrained copy (baseline) marked '~u'."""
    return layer + "~u" if not several and model.endswith("~untrained") else layer


def unit_notes(con, query_id: int) -> list[str]:
    """What the unit table's n means for the measures of a query, as lines under it."""
    measures = {m for (m,) in con.execute("SELECT DISTINCT measure FROM scores WHERE query_id = ? AND unit IS NOT NULL",
                                          [int(query_id)]).fetchall()}
    out = []
    if measures - {"probe_weight", "probe_class_weight"}:
        out.append("n: the symbols (characters or tokens) each unit was scored over")
    models = {m for (m,) in con.execute("SELECT DISTINCT model FROM scores WHERE query_id = ?",
                                        [int(query_id)]).fetchall()}
    if len({m.removesuffix("~untrained") for m in models}) == 1 and any(m.endswith("~untrained") for m in models):
        # the table marks the baseline's layers '~u' (see _layer_label), which nothing else explains
        out.append("~u: the layer of the model's untrained (re-initialised) copy, the baseline (--baseline)")
    if measures & {"probe_weight", "probe_class_weight"}:
        out.append("[probe_weight]: the unit's share of its layer's probe weights, no interval;\n"
                   "  n: the probe's training symbols (its held-out accuracy is in the probe table below)")
    return out


def probe_table(con, query_id: int) -> str | None:
    """The layer-level rows of a query (unit NULL: measure probe, probe_topk, selectivity), one
    line each: the held-out score (accuracy, or r2 for a continuous hypothesis) with its 95% CI
    (Wilson, accuracy only), the majority rate (always predicting the most frequent class) and
    the probe's held-out test and training symbols. None when the query has none."""
    rows = con.execute("""
        SELECT hypothesis, model, layer, measure, TRY_CAST(detail->>'k' AS INTEGER), detail->>'metric', score,
               ci_low, ci_high, TRY_CAST(detail->>'majority' AS DOUBLE), n, TRY_CAST(detail->>'n_train' AS BIGINT)
        FROM scores WHERE query_id = ? AND unit IS NULL
        ORDER BY hypothesis, model LIKE '%~untrained', model, layer,
                 CASE measure WHEN 'probe' THEN 0 WHEN 'probe_topk' THEN 1 ELSE 2 END, 5, measure""",
                       [int(query_id)]).fetchall()
    if not rows:
        return None
    several = len({r[1].removesuffix("~untrained") for r in rows}) > 1
    mw = max([5] + [len(r[1]) for r in rows]) if several else 0
    what = [("all units" if m == "probe" else f"top {_n(k, 'unit')}" if m == "probe_topk" and k is not None
             else m) for _, _, _, m, k, *_ in rows]
    hw = max([18] + [len(r[0]) for r in rows])
    lw = max([8] + [len(_layer_label(r[2], r[1], several)) for r in rows])
    ww = max([12] + [len(w) for w in what])
    head = (f"{'hypothesis':<{hw}} " + (f"{'model':<{mw}} " if several else "") +
            f"{'layer':<{lw}} {'probe':<{ww}} {'metric':<8} {'score':>7}  {'95% CI':<16} {'majority':>8} "
            f"{'n test':>8} {'n train':>8}")
    lines = [head, "-" * len(head)]
    last = None

    def num(x, fmt):
        return format(x, fmt) if x is not None and x == x else "-"
    for (h, model, layer, m, k, metric, score, lo, hi, maj, n, ntr), w in zip(rows, what):
        ci = f"[{lo:5.3f}, {hi:5.3f}]" if lo is not None and hi is not None else ""
        lines.append((f"{(h if h != last else ''):<{hw}} " + (f"{model:<{mw}} " if several else "") +
                      f"{_layer_label(layer, model, several):<{lw}} {w:<{ww}} {metric or '':<8} "
                      f"{num(score, '7.3f'):>7}  {ci:<16} {num(maj, '8.3f'):>8} {num(n, 'd'):>8} "
                      f"{num(ntr, 'd'):>8}").rstrip())
        last = h
    return "\n".join(lines)


def cmd_demo(args) -> int:
    import deepbase_duck as dbd
    from deepbase_duck.corpora.code import code_records
    from deepbase_duck.errors import DeepBaseError
    from deepbase_duck.exports import _lit
    from deepbase_duck.hypotheses.library import CODE_HYPOTHESES
    from deepbase_duck.models.charlstm import CHECKPOINTS

    t0 = time.time()
    # every input is checked before the store is opened (or created)
    if args.checkpoint not in CHECKPOINTS:
        raise DeepBaseError(f"--checkpoint: unknown char-LSTM checkpoint {args.checkpoint!r}; valid names: "
                            f"{', '.join(CHECKPOINTS)}")
    _check_top(args.top)
    if args.chars < 1:
        raise DeepBaseError(f"--chars must be an integer >= 1 (characters of held-out code), got {args.chars}")
    try:
        records = code_records("heldout", max_chars=2000, limit_chars=args.chars)
    except ValueError as exc:
        raise DeepBaseError(str(exc)) from None
    store_path = Path(args.store)
    with _store(args, create=True) as con:      # a demo that fails leaves no store it created
        try:
            dbd.register_model(con, "charlstm", "deepbase_duck.models.zoo:charlstm", {"checkpoint": args.checkpoint})
        except ValueError as exc:
            raise DeepBaseError(str(exc)) from None
        dataset = f"stdlib_heldout_{args.chars}"
        n = dbd.add_dataset(con, dataset, records, "held-out Python standard-library files (not seen in training)",
                            replace=True)
        hyps = CODE_HYPOTHESES + ["python_keyword"]
        print(f"deepbase_duck demo: char-LSTM ({args.checkpoint}) over {_n(n, 'record')}, "
              f"{_n(sum(len(r['text']) for r in records), 'character', ',')} of held-out stdlib code "
              f"from {_n(len({r['source'] for r in records}), 'file')}")
        scores = dbd.inspect(con, "charlstm", ["lstm0", "lstm1"], hyps, dataset,
                             keep_activations=not args.no_keep,
                             dtype="float32" if args.no_keep else "float16")
        qid = scores.column("query_id")[0].as_py()
        print(f"\nTop units per hypothesis (score = Pearson r over every character; query {qid}).\n"
              f"95% CI: with the {_n(n, 'record')}, not the characters, as independent samples. sep: the\n"
              f"unit's interval lies above that of every unit outside the top {args.top}.\n")
        print(top_units_table(con, qid, args.top))
        out_dir = store_path.parent / "scores_parquet"
        out_dir.mkdir(parents=True, exist_ok=True)
        con.sql(f"COPY (SELECT * FROM scores WHERE query_id = {qid}) TO {_lit(out_dir)} "
                "(FORMAT parquet, PARTITION_BY (model, layer), OVERWRITE_OR_IGNORE)")
        con.execute("CHECKPOINT")
        # (--no-keep stores none: naming the folder then sent a user looking for what is not there)
        acts = "activations not stored: --no-keep" if args.no_keep else f"activations: {store_path}.acts"
        print(f"\nstore: {store_path}  ({acts})\nscores as Parquet: {out_dir}/"
              f"\nfinished in {time.time() - t0:.1f} s")
        print("\nNext: SELECT * FROM scores ... in that store, or `deepbase-duck inspect --help`. "
              "Affinity is not causation: verify a unit by ablating it.")
    return 0


def _n(count, word: str, fmt: str = "") -> str:
    """``count`` and ``word``, plural unless the count is 1 (errors.counted; imported here, when
    a command runs, so that --help does not load the library)."""
    from deepbase_duck.errors import counted
    return counted(count, word, fmt=fmt)


def _check_top(top: int) -> None:
    """--top of demo and inspect: the units shown per hypothesis, at least 1 (as report's --top)."""
    from deepbase_duck.errors import DeepBaseError
    if top < 1:
        raise DeepBaseError(f"--top must be an integer >= 1 (the units shown per hypothesis), got {top}")


@contextlib.contextmanager
def _store(args, create: bool = False):
    """The store named on the command line, closed however the command ends. Only the commands
    that fill a store (register-model, add-stdlib, add-dataset, demo) create a missing one: a mistyped
    path for the others is an error, not a new empty store; and a store such a command created
    is removed again when the command fails (an interrupted one keeps it, to resume)."""
    import deepbase_duck as dbd
    from deepbase_duck.errors import DeepBaseError
    from deepbase_duck.store import activation_root
    if not create and not Path(args.store).is_file():
        raise DeepBaseError(f"no store at {args.store!r} (register-model, add-stdlib or add-dataset create one; "
                            f"`deepbase-duck demo` writes deepbase_demo/demo.duckdb)")
    db, acts = Path(args.store), activation_root(args.store)
    created = [p for p in (db, Path(f"{db}.wal"), acts) if not p.exists()] if create else []
    con = dbd.connect(args.store, progress=not args.quiet, read_only=getattr(args, "read_only", False))
    failed = False
    try:
        yield con
    except BrokenPipeError:                      # the output's reader went away (`| head`): what is stored stays
        raise
    except Exception:
        failed = True
        raise
    finally:
        dbd.close(con)
        if failed and db in created:
            for p in created:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()


def cmd_register(args):
    import duckdb
    import deepbase_duck as dbd
    from deepbase_duck.errors import DeepBaseError
    from deepbase_duck.catalog import loader_params
    params = loader_params(args.params, "--params")   # before the store is opened (or created)
    with _store(args, create=True) as con:
        try:
            info = dbd.register_model(con, args.name, args.loader, params)
        except (DeepBaseError, duckdb.Error):
            raise
        except Exception as exc:                  # raised by the loader itself (a bad checkpoint name...)
            raise DeepBaseError(f"loader {args.loader!r} failed with --params {args.params}: "
                                f"{type(exc).__name__}: {exc}") from None
        print(json.dumps(info))
    return 0


def cmd_add_stdlib(args):
    import deepbase_duck as dbd
    from deepbase_duck.catalog import DatasetExistsError
    from deepbase_duck.corpora.code import code_records
    from deepbase_duck.errors import DeepBaseError
    try:                                          # the records of SQL's add_stdlib_dataset, before the store opens
        records = code_records(args.split, args.max_chars, args.chars)
    except ValueError as exc:
        raise DeepBaseError(str(exc)) from None
    with _store(args, create=True) as con:
        try:
            n = dbd.add_dataset(con, args.name, records, f"Python standard library, {args.split} split")
        except DatasetExistsError:                # the library says replace=True, which add-stdlib has not
            raise DeepBaseError(f"dataset {args.name!r} already exists with other records (add-stdlib appends only "
                                "to records it stored with the same --split and --max-chars, for a larger --chars); "
                                "give this one another name, or delete the stored one first (Python: "
                                f"dbd.drop_dataset(con, {args.name!r}))") from None
        print(f"{args.name}: {_n(n, 'record')}, {_n(sum(len(r['text']) for r in records), 'character', ',')}")
    return 0


def cmd_add_dataset(args):
    import deepbase_duck as dbd
    from deepbase_duck.catalog import DatasetExistsError
    from deepbase_duck.errors import DeepBaseError
    try:
        records = dbd.read_records(args.path, args.format, args.column or "text", args.source_column,
                                   args.glob or "**/*", args.max_chars)
    except DeepBaseError as exc:
        raise DeepBaseError(_column_hint(_read_flags_named(str(exc), args), args)) from None
    _check_read_flags(args, records.format)           # before the store is opened (or created)
    with _store(args, create=True) as con:
        before = con.sql("SELECT count(*) FROM records WHERE dataset = ?", params=[args.name]).fetchall()[0][0]
        try:
            n = dbd.add_dataset(con, args.name, records, args.description or f"from {args.path}", args.replace)
        except DatasetExistsError:
            raise DeepBaseError(f"dataset {args.name!r} already exists with different records; add --replace to "
                                "replace it (its labels, symbols and stored activations are then dropped)") from None
    skipped = f"; {_n(records.skipped, 'empty or missing text')} skipped" if records.skipped else ""
    kept = (f"; the first {before} as stored, {n - before} appended" if 0 < before < n and not args.replace
            else "; unchanged" if before == n and not args.replace else "")
    print(f"{args.name}: {_n(n, 'record')} ({records.format}, {_n(sum(len(r['text']) for r in records), 'character')})"
          f"{skipped}{kept}")
    return 0


def _read_flags_named(message: str, args) -> str:
    """read_records' refusals as add-dataset's: an argument its format has no use for named by
    its flag alone ("column 'body' (add-dataset --column body) ... leave column out" said
    both, and then told a CLI user to leave out a parameter), and the format to give as --format."""
    for arg, flag, value in (("column", "--column", args.column), ("source_column", "--source-column",
                                                                   args.source_column), ("pattern", "--glob", args.glob)):
        if value is not None and f"(add-dataset {flag} {value})" in message:
            message = message.replace(f"{arg} {value!r} (add-dataset {flag} {value})", f"{flag} {value}", 1)
            message = message.replace(f"leave {arg} out", f"leave {flag} out")
    return (message.replace("give the format the file is in", "give --format, the format the file is in")
            .replace("cannot tell the format from the suffix", "cannot tell the format (--format) from the suffix"))


def _column_hint(message: str, args) -> str:
    """A reader's message about a missing column or key, with the flag that names it: the text
    is read from column 'text' unless --column says otherwise, which the message alone (the
    library's 'column' parameter, or nothing at all for a table) did not tell a CLI user."""
    import re
    missing = re.search(r": no (column|key) '([^']*)'", message)
    if missing is None:
        return message
    what, name = missing.groups()
    message = message.removesuffix("; name the text's key with column")
    if name == args.source_column:
        return f"{message}; --source-column names the {what} holding each record's source"
    given = "" if args.column is not None else f" (without --column the text is read from the {what} 'text')"
    return f"{message}; --column names the {what} holding the text{given}"


def _check_read_flags(args, fmt: str) -> None:
    """add-dataset's flags that the format ``fmt`` read from PATH has no use for (--column of a
    text file, --glob of a file), refused by name instead of silently ignored."""
    from deepbase_duck.errors import DeepBaseError
    tables = ("jsonl", "csv", "tsv", "parquet")
    for flag, value in (("--column", args.column), ("--source-column", args.source_column)):
        if value is not None and fmt not in tables:
            raise DeepBaseError(f"{flag} {value} names a column or key of a {', '.join(tables)} file; {args.path!r} is "
                                f"read as {fmt!r}, which has none (--format picks another format)")
    if args.glob is not None and fmt not in ("files", "paths"):
        raise DeepBaseError(f"--glob {args.glob} picks the files of a folder; {args.path!r} is a file, read as {fmt!r}")


def cmd_annotate(args):
    import deepbase_duck as dbd
    with _store(args) as con:
        for s in dbd.annotate(con, args.hypotheses, args.dataset):
            print(f"{s['hypothesis']}: {_n(s['labeled'], 'record')} labelled, {s['reused']} reused")
    return 0


def cmd_extract(args):
    import deepbase_duck as dbd
    with _store(args) as con:
        for r in dbd.extract(con, args.model, args.layers, args.dataset, args.dtype, batch_size=args.batch_size):
            print(f"{r['layer']}: view {r['view']} ({r['dtype']}, width {r['width']}): "
                  f"{_n(r['extracted'], 'record')} extracted, {r['reused']} reused")
    return 0


def cmd_inspect(args):
    import shlex
    import deepbase_duck as dbd
    from deepbase_duck.errors import DeepBaseError, check_int
    _check_top(args.top)
    if args.stable_windows is not None and args.top_k is None:
        raise DeepBaseError(f"--stable-windows {args.stable_windows} sets how long the --top-k rule waits for the "
                            f"top-k sets to settle; give --top-k K with it (or leave --stable-windows out)")
    # flags that only act with another one: refused alone rather than silently ignored (the
    # library takes their defaults and cannot tell them from a value given on purpose)
    if args.seed is not None:
        check_int("--seed", args.seed, 0)             # a bad value is named as such first
    if args.seed is not None and args.max_error is None and args.top_k is None and args.plateau_tol is None:
        raise DeepBaseError(f"--seed {args.seed} orders the records of a progressive scan; give --max-error, --top-k "
                            f"or --plateau-tol with it (a full scan reads every record, in no seeded order; for "
                            f"a seeded sample of records use the shell's sample_records macro)")
    if args.max_records == 0:                     # the library's limit 0 selects nothing, refused as 'no records'
        raise DeepBaseError("--max-records 0 selects no record to scan; give N >= 1 (the first N records by record "
                            "id), or leave it out to scan every record")
    if args.dtype is not None and not args.keep_activations:
        raise DeepBaseError(f"--dtype {args.dtype} is the type of the activations --keep-activations stores; give "
                            f"--keep-activations with it (the scan itself always runs in float32)")
    measure_params = _measure_params(args.params)     # before the store is opened
    with _store(args) as con:
        model = _inspected_models(con, args.model)
        try:
            t = dbd.inspect(con, model, args.layers, args.hypotheses, args.dataset, args.measures,
                            limit=args.max_records, batch_size=args.batch_size,
                            keep_activations=args.keep_activations, dtype=args.dtype or "float32",
                            permutations=args.permutations,
                            baseline=args.baseline, control=args.control, engine=args.engine,
                            ray_address=args.ray_address, max_error=args.max_error, top_k=args.top_k,
                            seed=args.seed or 0, stable_windows=args.stable_windows,
                            plateau_tol=args.plateau_tol, min_support=args.min_support, reuse=not args.no_reuse,
                            device=args.device, **measure_params)
        except DeepBaseError as exc:                # the library's parameter names, as this command's flags
            message = cli_flags(without_own_name("inspect", str(exc)))
            if message == str(exc):
                raise
            raise DeepBaseError(message) from None
        qid = t.column("query_id")[0].as_py()
        print(top_units_table(con, qid, args.top))
        for line in unit_notes(con, qid):
            print(line)
        probes = probe_table(con, qid)
        if probes is not None:
            print("\nProbes (layer level): score = held-out accuracy (r2 for a continuous hypothesis) on the n test "
                  "symbols,\ntrained on the n train symbols; 95% CI: Wilson interval of the accuracy; majority: "
                  "the accuracy of\nalways predicting the most frequent class (the baseline to beat).\n")
            print(probes)
        params = json.loads(con.execute("SELECT params FROM queries WHERE query_id = ?", [qid]).fetchall()[0][0])
        for line in scan_summary(params):
            print(line)
        print(f"query {qid} (its report: deepbase-duck report {shlex.quote(args.store)} --query {qid})")
    return 0


# library parameters named in the library's messages, and the inspect flags that set them
CLI_FLAGS = {"top_k": "--top-k", "max_error": "--max-error", "min_support": "--min-support",
             "stable_windows": "--stable-windows", "batch_size": "--batch-size", "plateau_tol": "--plateau-tol",
             "max_records": "--max-records", "keep_activations": "--keep-activations",
             "control=True": "--control", "ray_address": "--ray-address", "engine='ray'": "--engine ray",
             "needs the 'probe' measure": "needs the 'probe' measure (--measures probe)"}
# plain words that name a parameter only as a message's subject ('seed must be ...')
CLI_SUBJECTS = {"seed": "--seed", "limit": "--max-records", "permutations": "--permutations", "dtype": "--dtype",
                "device": "--device"}
# the same for the other commands whose flags are named otherwise than the library's parameters,
# and the library calls that are commands here (define_hypothesis: define-hypothesis)
COMMAND_FLAGS = {"add-stdlib": {"limit_chars": "--chars", "max_chars": "--max-chars"},
                 "add-dataset": {"max_chars": "--max-chars", "read_records: pattern": "--glob"},
                 "define-hypothesis": {"replace := true (Python: replace=True)": "--replace", "flags:": "--flags:",
                                       "define_hypothesis": "define-hypothesis"},
                 "drop-hypothesis": {"drop_hypothesis": "drop-hypothesis", "define_hypothesis": "define-hypothesis"},
                 "export": {"overwrite=True (CLI: --overwrite)": "--overwrite",
                            "inspect with keep_activations=True": "inspect --keep-activations"},
                 "extract": {"batch_size": "--batch-size"},
                 "report": {"top_units": "--top", "text_units": "--text-units", "records_per_unit": "--records",
                            "context_chars": "--context"}}


def command_message(command: str, message: str) -> str:
    """A library message as ``command`` shows it: its parameters and calls spelled as the
    command's flags (COMMAND_FLAGS), and drop-hypothesis' hint to redefine a name by a pattern
    (SQL's define_hypothesis('name', pattern, replace := true)) as the command line that does it."""
    import re
    message = re.sub(r"define_hypothesis\(('(?:[^'\\]|\\.)*'), pattern, replace := true\)",
                     r"define-hypothesis STORE \1 PATTERN --replace", message)
    return cli_flags(message, COMMAND_FLAGS[command]) if command in COMMAND_FLAGS else message


# the library functions each command runs, whose name may start the library's messages
# ('report: --top must be ...'), beside the command's own name
COMMAND_CALLS = {"add-stdlib": ("code_records", "stdlib_records"), "add-dataset": ("read_records",)}


def without_own_name(command: str, message: str) -> str:
    """``message`` without a leading 'report: ' (or the name of the library function the command
    runs): the library names the function called, as Python and SQL callers need, but the error
    line names the command already ('deepbase-duck report: error: report: --top ...' said it
    twice)."""
    from deepbase_duck.errors import without_caller
    return without_caller(message, (command, command.replace("-", "_"), *COMMAND_CALLS.get(command, ())))


def cli_flags(message: str, flags: dict | None = None, subjects: dict | None = None) -> str:
    """A library message with the parameters it names (top_k, max_error, ...) spelled as the
    flags that set them (--top-k, --max-error, ...): inspect's by default, else ``flags`` (any
    occurrence outside quotes) and ``subjects`` (a message's first word only)."""
    import re
    flags, subjects = (CLI_FLAGS, CLI_SUBJECTS) if flags is None else (flags, subjects or {})
    names = "|".join(re.escape(k) for k in sorted(flags, key=len, reverse=True))
    message = re.sub(r"(?<![\w'\"-])(" + names + r")(?![\w'\"])", lambda m: flags[m.group(1)], message)
    first = re.match(r"(\w+)( must | \()", message)
    if first and first.group(1) in subjects:
        message = subjects[first.group(1)] + message[len(first.group(1)):]
    return message


def _measure_params(text: str | None) -> dict:
    """--params: a JSON object of per-measure objects (as the SQL macro's params), checked here
    so that a key that is no measure cannot reach inspect as one of its own settings."""
    from deepbase_duck.errors import DeepBaseError
    from deepbase_duck.inspectors import MEASURES
    if text is None:
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeepBaseError(f"--params is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise DeepBaseError("--params must be a JSON object of per-measure objects, e.g. "
                            "'{\"corr\": {\"intervals\": \"symbols\"}}'")
    for key in params:
        if key not in MEASURES:
            raise DeepBaseError(f"--params: key {key!r} is not a measure; valid measures: "
                                f"{', '.join(sorted(MEASURES))} "
                                f"(settings of the query itself are flags, e.g. --seed 1)")
    return params


def _inspected_models(con, text: str):
    """inspect's MODEL argument: a registered model's name as it is (any characters, commas
    included), else the checkpoints it lists separated by commas, else the name as given (for
    inspect to refuse by name)."""
    registered = {name for (name,) in con.sql("SELECT name FROM models").fetchall()}
    if text in registered or "," not in text:
        return text
    return [m.strip() for m in text.split(",")]


def scan_summary(params: dict) -> list[str]:
    """What a query reused and, for an early-stopping query, where it stopped and the bound it
    reached (from its ``queries.params``), as lines for the terminal."""
    out = []
    reused = (params.get("reused") or {}).get("scores_of_query")
    if reused is not None:
        out.append(f"scores of the identical query {reused} reused, nothing scanned (--no-reuse scans again)")
    rules = [r for r, on in (("max_error", params.get("max_error") is not None), ("top_k", params.get("top_k")),
                             ("plateau", params.get("plateau_tol") is not None)) if on]
    if rules and reused is None:
        used, total, bound = params.get("records_used"), params.get("record_count"), params.get("bound_reached")
        # an error bound is quoted for the max_error rule only: top_k's rule is the stability of the
        # top-k sets, the plateau's a held-out loss
        if params.get("max_error") is None:
            bound = None
        if params.get("stopped_early"):
            shown = "" if bound is None else ("; error bounds unbounded: fewer than 2 windows"
                                              if bound == float("inf") else f"; largest error bound {bound:.3f}")
            out.append(f"early stopping ({params.get('stop_rule')}): stopped after {used} of "
                       f"{_n(total, 'record')}{shown}")
        else:
            # read to the end: the scores and intervals are the full scan's, and the bound
            # reached is their largest half-width (engine/inspect.py), not a batch-means bound
            # (several rules: max_error and plateau must hold together, top_k is an alternative)
            held = "the rule held" if len(rules) == 1 else "the stop rules were not met"
            at = "at no earlier window" if len(rules) == 1 else "before the last window"
            shown = "" if bound is None else (", some of which have no finite interval" if bound == float("inf")
                                              else f", whose largest half-width is {bound:.3f}")
            out.append(f"early stopping ({', '.join(rules)}): every record was read ({used} of {total}; {held} {at}), "
                       f"so the scores and intervals are the full scan's{shown}")
    return out


def cmd_export(args):
    import deepbase_duck as dbd
    with _store(args) as con:
        written = dbd.export(con, args.out_dir, args.activations, args.text, args.overwrite)
    width = max([14] + [len(name) for name in written])      # hypothesis_definitions too: aligned
    for name, path in written.items():
        if name == "notes":                      # the library's calls, as the commands that make them
            path = command_message("export", path)
        print(f"{name:<{width}} {path}")
    return 0


def cmd_report(args):
    import deepbase_duck as dbd
    with _store(args) as con:
        _check_query_choice(con, args)
        r = dbd.report(con, args.out, query_id=args.query, model=args.model, dataset=args.dataset,
                       top_units=args.top, text_units=args.text_units, records_per_unit=args.records,
                       context_chars=args.context, measure=args.measure)
    print(f"{r['path']}: report of query {r['query_id']} ({r['bytes'] / 1e3:.0f} kB, {_n(r['figures'], 'figure')}, "
          f"{_n(r['units_with_text'], 'unit')} with coloured records; units ranked by {r['measure']})")
    if r["missing_activations"]:
        print(f"activations not stored for {', '.join(r['missing_activations'])}: the report says how to store them")
    return 0


def _check_query_choice(con, args) -> None:
    """report's --query with --model or --dataset: the query must be one of that model over that
    dataset. The library picks a query by its id alone, so the report of another model's query
    came out as asked for, --model and --dataset silently ignored. (An id with no query is left
    to the report, which names the queries there are.)"""
    from deepbase_duck.errors import DeepBaseError
    if args.query is None or (args.model is None and args.dataset is None):
        return
    rows = con.sql("SELECT dataset, (SELECT list(DISTINCT model ORDER BY model) FROM scores WHERE query_id = $q) "
                   "FROM queries WHERE query_id = $q", params={"q": args.query}).fetchall()
    if not rows or not rows[0][1]:               # no such query, or no scores: the report says which
        return
    dataset, models = rows[0]
    for flag, given, held, what in (("--model", args.model, models, "of model"),
                                    ("--dataset", args.dataset, [dataset], "over dataset")):
        if given is not None and given not in held:
            raise DeepBaseError(f"--query {args.query} is a query {what} {' and '.join(map(repr, held))}, not "
                                f"{flag} {given!r}; give --query alone for that query, or leave --query out for "
                                f"the latest query of {flag} {given!r}")


def cmd_shell(args):
    from deepbase_duck.shell import main as shell_main
    return shell_main(args.store, args.sql, args.script, args.quiet, create=args.create, read_only=args.read_only,
                      traceback=args.traceback)


def cmd_hypotheses(args):
    from deepbase_duck.hypotheses import RegexHypothesis, registry
    if args.store is None and args.read_only:
        from deepbase_duck.errors import DeepBaseError
        raise DeepBaseError("--read-only acts on a store: give the STORE to open read-only, or leave out --read-only")
    if args.store is None:
        hyps = registry()
    else:
        with _store(args):                       # registers the store's regex hypotheses in this process
            hyps = registry()
    width = max([18] + [len(h.name) for h in hyps.values()])         # a long defined name keeps the columns aligned
    for h in sorted(hyps.values(), key=lambda h: h.name):
        about = " ".join(filter(None, [h.description, f"({h.source})" if isinstance(h, RegexHypothesis) else ""]))
        print(f"{h.name:<{width}} {h.kind:<12} {about}".rstrip())
    return 0


def cmd_define_hypothesis(args):
    import deepbase_duck as dbd
    with _store(args) as con:
        d = dbd.define_hypothesis(con, args.name, args.pattern, args.kind, args.flags, args.description,
                                  replace=args.replace)
    cats = f", categories {', '.join(d['categories'])}" if d["categories"] else ""
    print(f"{d['name']}: {d['kind']} hypothesis, version {d['version']}{cats}")
    return 0


def cmd_drop_hypothesis(args):
    import deepbase_duck as dbd
    with _store(args) as con:
        d = dbd.drop_hypothesis(con, args.name)
    print(f"{d['name']}: dropped ({d['kind']} pattern {d['pattern']!r}"
          + (f" flags {d['flags']!r}" if d["flags"] else "")
          + f", version {d['version']}; labels of {_n(d['labeled_records'], 'record')} deleted)")
    return 0


COMMANDS = {"demo": cmd_demo, "register-model": cmd_register, "add-stdlib": cmd_add_stdlib, "add-dataset": cmd_add_dataset,
            "annotate": cmd_annotate, "extract": cmd_extract, "inspect": cmd_inspect,
            "hypotheses": cmd_hypotheses, "define-hypothesis": cmd_define_hypothesis,
            "drop-hypothesis": cmd_drop_hypothesis, "export": cmd_export, "shell": cmd_shell, "report": cmd_report}


def main(argv=None) -> int:
    """Run one command; returns its exit status. A Ctrl-C at any point ends it with one line and
    status 130, also one that comes before the command starts, while torch and the other
    libraries are still being imported (seconds), which used to print a long traceback."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        _print_error("deepbase-duck: interrupted")
        return 130


def _run(argv) -> int:
    args = _parser().parse_args(argv)
    args.quiet = getattr(args, "quiet", False)
    from deepbase_duck.errors import DeepBaseError
    import duckdb
    try:
        return COMMANDS[args.command](args)
    except (DeepBaseError, FileExistsError) as exc:   # the library's parameter names, as this command's flags
        # (FileExistsError: export's non-empty folder, whose message names overwrite=True)
        message = without_own_name(args.command, command_message(args.command, str(exc)))
        _print_error(f"deepbase-duck {args.command}: error: {message}")
        return 2
    except duckdb.Error as exc:
        _print_error(f"deepbase-duck {args.command}: error: {exc}")
        return 2
    except BrokenPipeError:                      # `deepbase-duck ... | head`
        if sys.stderr is not None:
            sys.stderr.close()
        return 0
    except OSError as exc:                       # a path that cannot be written or read: named by the OS
        _print_error(f"deepbase-duck {args.command}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _print_error(f"deepbase-duck {args.command}: interrupted; stored work is kept and a re-run resumes")
        return 130


def _print_error(line: str) -> None:
    """``line`` on stderr, or nowhere when there is no stderr (closed: ``2>&-``): print's
    fallback for a missing stream is stdout, which would mix the error into the command's
    output (a redirected listing, a report's path)."""
    if sys.stderr is not None:
        print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

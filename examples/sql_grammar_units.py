"""Study 2: DeepBase's SQL study: which units of a SQL autocompletion model track which grammar rules?

Run:  python examples/sql_grammar_units.py  [--queries 2000] [--seed 7] [--out deepbase_results/sql_grammar_units]

The model is the bundled character-level SQL autocompletion LSTM (2 x 128 units; trained by
``deepbase_duck/models/train_sqllstm.py`` on 30,000 queries from the grammar generator
``deepbase_duck/corpora/sqlgen.py``). It is inspected on fresh queries from the same grammar
(another seed, minus any query that also occurs in the training corpus). Every character is
labelled from sqlglot's parse tree with one hypothesis per clause or node type
(``deepbase_duck/hypotheses/sql.py``: SELECT list, FROM, JOIN ... ON, WHERE predicate, GROUP BY,
ORDER BY, table name, column, string literal, number literal, function call, subquery depth).

One SQL query scores every unit of both layers against every hypothesis (Pearson r per
character) and, per layer, a linear probe over all the layer's units (held-out accuracy for
binary hypotheses, R^2 for the depth); plain SQL then ranks them.

Writes ``sql_grammar_units.csv``, ``sql_grammar_units.png`` and ``sql_grammar_units.md`` to
``--out`` (default ``deepbase_results/sql_grammar_units`` under the current directory; the
committed results in ``examples/results/sql_grammar_units/`` come from ``--out
examples/results/sql_grammar_units`` run at the repository root).
"""
from __future__ import annotations

import csv
import pathlib
import sys
import time

import numpy as np

import deepbase_duck as dbd
from deepbase_duck.corpora.sqlgen import sql_queries
from deepbase_duck.hypotheses import get_hypothesis
from deepbase_duck.hypotheses.sql import SQL_HYPOTHESIS_NAMES
from deepbase_duck.models.sqllstm import config as sqllstm_config

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _text_figures import parser, seed, start, char_panel, plt, print_table, save  # noqa: E402

FIGURE_HYPOTHESES = ["sql_select_list", "sql_from", "sql_column", "sql_string"]


def fresh_queries(n: int, seed: int) -> list[str]:
    """``n`` queries of the grammar (seed ``seed``) that do not occur in the training corpus."""
    cfg = sqllstm_config()["corpus"]
    seen = set(sql_queries(cfg["n_train"], seed=cfg["train_seed"]))
    out = []
    for q in sql_queries(4 * n + 100, seed=seed):
        if q not in seen and q not in out:
            out.append(q)
            if len(out) == n:
                break
    return out


def figure_query(queries: list[str]) -> str:
    """The first query with a subquery, a string literal, a function call and a WHERE, 120-260 chars."""
    need = [get_hypothesis(h) for h in ("sql_subquery_depth", "sql_string", "sql_function", "sql_where")]
    for q in queries:
        if 120 <= len(q) <= 260 and all(len(h.spans(q)[0]) for h in need):
            return q
    return max(queries, key=len)


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--queries", type=int, default=2000, help="held-out queries to inspect")
    ap.add_argument("--seed", type=seed, default=7, help="generator seed of the inspected queries")
    ap.add_argument("--probe-rows", type=int, default=40_000,
                    help="rows per split the probes train / test on (a seeded sample of the characters)")
    a, out, t0 = start(ap, argv, "deepbase_results/sql_grammar_units")

    con = dbd.connect(None, progress=False)
    queries = fresh_queries(a.queries, a.seed)
    n_chars = sum(map(len, queries))
    dbd.add_dataset(con, "sql", queries, f"generated SQL queries, seed {a.seed}, not in the training corpus")
    con.sql("SELECT register_model('sqllstm', 'deepbase_duck.models.zoo:sqllstm')").fetchall()
    hyps = ", ".join(f"'{h}'" for h in SQL_HYPOTHESIS_NAMES)

    # one inspection query: every unit x hypothesis (corr) and every layer x hypothesis (probe)
    con.sql(f"""CREATE TEMP TABLE result AS
        SELECT * FROM inspect('sqllstm', ['lstm0', 'lstm1'], [{hyps}], 'sql', measures := ['corr', 'probe'],
                              params := '{{"probe": {{"max_rows": {a.probe_rows}}}}}')""")
    summary = con.sql("""
        WITH units AS (
            SELECT hypothesis, layer,
                   arg_max(unit, abs(score)) AS best_unit,
                   round(arg_max(score, abs(score)), 3) AS r,
                   count(*) FILTER (WHERE abs(score) > 0.5) AS units_r_over_half
            FROM result WHERE measure = 'corr' AND unit IS NOT NULL GROUP BY ALL),
        probes AS (   -- a probe's accuracy means little beside the majority class's share
            SELECT hypothesis, layer, round(score, 3) AS probe,
                   round(CAST(detail->>'majority' AS DOUBLE), 3) AS majority
            FROM result WHERE measure = 'probe' AND unit IS NULL)
        SELECT u.hypothesis, u.layer, u.best_unit, u.r, u.units_r_over_half, p.probe, p.majority
        FROM units u LEFT JOIN probes p USING (hypothesis, layer)
        ORDER BY u.hypothesis, u.layer""")
    cols, rows = summary.columns, summary.fetchall()
    t_inspect = time.time() - t0
    print(f"SQL LSTM over {len(queries)} held-out generated queries ({n_chars:,} characters)\n")
    print_table(cols, rows)

    # -- figure: best |r| per hypothesis and layer; one query coloured by best units ------------
    q = figure_query(queries)
    dbd.add_dataset(con, "figure_query", [q])
    views = dict(con.sql("SELECT layer, view FROM extract_activations('sqllstm', ['lstm0', 'lstm1'], "
                         "'figure_query')").fetchall())
    fig = plt.figure(figsize=(12, 4 + 1.0 * len(FIGURE_HYPOTHESES) * (len(q) // 110 + 1)), layout="constrained")
    gs = fig.add_gridspec(1 + len(FIGURE_HYPOTHESES), 1,
                          height_ratios=[3.2] + [0.35 * (len(q) // 110 + 1) + 0.2] * len(FIGURE_HYPOTHESES))
    ax = fig.add_subplot(gs[0])
    names = SQL_HYPOTHESIS_NAMES
    by = {(h, layer): (unit, r, probe) for h, layer, unit, r, _, probe, _ in rows}
    majority = {h: m for h, layer, _, _, _, _, m in rows if layer == "lstm0"}
    x = np.arange(len(names))
    for k, layer in enumerate(["lstm0", "lstm1"]):
        ax.bar(x + (k - 0.5) * 0.38, [abs(by[(h, layer)][1]) for h in names], 0.38, label=f"{layer}: best unit |r|")
        ax.plot(x + (k - 0.5) * 0.38, [by[(h, layer)][2] for h in names], ["k^", "kv"][k], ms=5,
                label=f"{layer}: probe (acc. / R2)")
    ax.plot(x, [majority[h] if majority[h] is not None else np.nan for h in names], "_", color="grey", ms=14,
            label="majority-class accuracy")
    ax.set_xticks(x, [n.replace("sql_", "") for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05); ax.set_ylabel("score"); ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.set_title(f"SQL autocompletion char-LSTM: grammar hypotheses ({len(queries)} held-out queries, "
                 f"{n_chars:,} chars)", fontsize=9)
    for i, h in enumerate(FIGURE_HYPOTHESES):
        layer, (unit, r, _) = max(((lay, by[(h, lay)]) for lay in ("lstm0", "lstm1")), key=lambda t: abs(t[1][1]))
        acts = [v for (v,) in con.sql(f"SELECT act[{unit + 1}] FROM {views[layer]} WHERE record_id = 0 "
                                      "ORDER BY pos").fetchall()]
        char_panel(fig.add_subplot(gs[1 + i]), q, acts, f"{h}: {layer} unit {unit} (r = {r:+.2f})",
                   width=110, vlim=1.0)
    save(fig, out / "sql_grammar_units.png")

    with open(out / "sql_grammar_units.csv", "w", newline="") as fh:
        w = csv.writer(fh); w.writerow(cols); w.writerows(rows)
    elapsed = time.time() - t0
    write_markdown(out / "sql_grammar_units.md", cols, rows, len(queries), n_chars, a, elapsed, t_inspect)
    print(f"\nwrote {out}/sql_grammar_units.png, .csv, .md  ({elapsed:.0f} s)")
    dbd.close(con)
    return 0



def write_markdown(path, cols, rows, n_q, n_chars, a, elapsed, t_inspect) -> None:
    cfg = sqllstm_config()
    best = {}
    for h, layer, unit, r, over, probe, _ in rows:
        if h not in best or abs(r) > abs(best[h][2]):
            best[h] = (layer, unit, r)
    strong = sorted((h for h in best if abs(best[h][2]) > 0.5), key=lambda h: -abs(best[h][2]))
    deeper = [h for h in best if abs(dict(((l, r) for hh, l, _, r, *_ in rows if hh == h))["lstm1"])
              > abs(dict(((l, r) for hh, l, _, r, *_ in rows if hh == h))["lstm0"])]
    ev = cfg["evaluation"]
    lines = [
        "# Study 2: units of a SQL autocompletion char-LSTM vs SQL grammar rules (DeepBase)",
        "",
        f"Command: `python examples/sql_grammar_units.py --queries {a.queries} --seed {a.seed} "
        f"--probe-rows {a.probe_rows} --out {a.out}` "
        f"({elapsed:.0f} s on this 2-core CPU; the inspect query {t_inspect:.0f} s).",
        f"Model: 2 x {cfg['architecture']['hidden']} char-LSTM, {cfg['training']['steps']} steps "
        f"({cfg['training']['wall_time_s']:.0f} s, 1 thread) on {cfg['corpus']['n_train']:,} generated queries; "
        f"held-out loss {ev['heldout_loss']:.3f} nats/char vs unigram entropy {ev['unigram_entropy_train']:.3f}.",
        f"Data: {n_q} generated queries not in the training corpus ({n_chars:,} characters), every character "
        "labelled from sqlglot's parse. r: Pearson correlation of the best unit; probe: held-out accuracy "
        "(binary) or R^2 (subquery depth) of a linear probe over the layer (trained on a seeded sample of "
        f"{a.probe_rows:,} characters, tested on up to as many held-out ones); majority: the test split's "
        "majority-class rate (a probe must beat it).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(str(v) for v in r) + " |" for r in rows),
        "",
        "| finding | published (DeepBase, Sellam et al. 2019) | here |",
        "|---|---|---|",
        "| units of a char-level SQL autocompletion model track grammar rules | reported: units whose "
        "behaviour matches hypotheses generated from the SQL grammar (one per rule), found with one "
        f"declarative query | {len(strong)} of {len(best)} rules have a unit with \\|r\\| > 0.5: "
        + ", ".join(f"{h} ({best[h][0]} u{best[h][1]}, {best[h][2]:+.2f})" for h in strong[:6]) + " |",
        "| which layer | not given in the sources we have | the best unit is in lstm1 for "
        f"{len(deeper)} of {len(best)} rules |",
        "",
        "The DeepBase paper's exact SQL model, corpus and scores are not available here (only its "
        "abstract and poster), so the comparison is qualitative. Affinity is not causation.",
        "",
        "![SQL grammar units](sql_grammar_units.png)",
        "",
    ]
    pathlib.Path(path).write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())

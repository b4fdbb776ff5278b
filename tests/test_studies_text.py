"""Tiny versions of the text studies in examples/ (Karpathy char-LSTM cells, DeepBase's SQL study,
detector units across training), each checking its structural result against an independent
reference: hand-worked character spans, numpy statistics, the bundled checkpoints."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.corpora.code import sampled_code_records
from deepbase_duck.corpora.sqlgen import SQLGenerator, sql_queries
from deepbase_duck.hypotheses import get_hypothesis
from deepbase_duck.hypotheses.sql import SQL_HYPOTHESIS_NAMES

sqlglot = pytest.importorskip("sqlglot")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def code_sample():
    """A handful of held-out standard-library records: the seeded sample the examples draw (seed 0),
    about 16k characters (9 records)."""
    return sampled_code_records(16_000, seed=0)


# -- study 1: the char-LSTM's string unit -------------------------------------------------------
def test_charlstm_has_a_string_unit(code_sample):
    con = dbd.connect(None, progress=False)
    try:
        dbd.add_dataset(con, "code", code_sample)
        con.sql("SELECT register_model('charlstm', 'deepbase_duck.models.zoo:charlstm')").fetchall()
        rows = con.sql("""SELECT layer, unit, hypothesis, score, n, ci_low, ci_high
                          FROM inspect('charlstm', ['lstm0', 'lstm1'], ['in_string'], 'code')""").fetchall()
        n_chars = sum(len(r["text"]) for r in code_sample)
        assert len(rows) == 2 * 256
        assert all(-1 <= s <= 1 and lo <= s <= hi and n == n_chars for _, _, _, s, n, lo, hi in rows)
        best = max((r for r in rows if r[2] == "in_string"), key=lambda r: abs(r[3]))
        assert abs(best[3]) > 0.5, best
        # the engine's r of that unit equals numpy's on the same characters
        from deepbase_duck.models.zoo import charlstm
        adapter = charlstm()
        module = adapter.module
        h = get_hypothesis("in_string")
        acts, labels = [], []
        for rec in code_sample:
            ids = torch.tensor([adapter_ids(rec["text"])], device=adapter.device)
            with torch.no_grad():
                x0, _ = module.lstm0(module.embed(ids))
                x = x0 if best[0] == "lstm0" else module.lstm1(x0)[0]
            acts.append(x[0, :, best[1]].cpu().numpy())
            lab = np.zeros(len(rec["text"]))
            for s, e, _ in zip(*h.spans(rec["text"])):
                lab[s:e] = 1
            labels.append(lab)
        r = np.corrcoef(np.concatenate(acts), np.concatenate(labels))[0, 1]
        assert r == pytest.approx(best[3], abs=1e-4)
    finally:
        dbd.close(con)


def adapter_ids(text):
    from deepbase_duck.models.charlstm import encode_chars
    return encode_chars(text)


# -- study 2: SQL grammar hypotheses, hand-worked spans -----------------------------------------
Q1 = ("SELECT u.name, COUNT(*) AS n FROM users u JOIN orders o ON u.id = o.user_id "
      "WHERE u.age > 30 AND u.city = 'Paris' GROUP BY u.name ORDER BY n DESC LIMIT 5")
Q2 = ("SELECT TRIM(p.name) FROM products p WHERE p.id NOT IN (SELECT oi.product_id FROM order_items oi "
      "WHERE oi.price IS NOT NULL) AND p.stock BETWEEN 1 AND 10")
Q3 = ("SELECT ROUND(AVG(sub.total), 2) AS avg_price FROM (SELECT * FROM orders o WHERE o.status LIKE 'sh%' "
      "OR o.status = 'pending') AS sub ORDER BY avg_price DESC, sub.id")
Q4 = ("SELECT d.city, MAX(e.salary) FROM departments d LEFT JOIN employees e ON d.id = e.dept_id "
      "WHERE d.name IN ('sales', 'research') AND e.salary > (SELECT AVG(salary) FROM employees WHERE "
      "age > (SELECT MIN(age) FROM users)) GROUP BY d.city HAVING COUNT(*) > 2")

HAND = {
    Q1: {
        "sql_select_list": ["u.name, COUNT(*) AS n"],
        "sql_from": ["FROM users u JOIN orders o ON u.id = o.user_id"],
        "sql_join_on": ["u.id = o.user_id"],
        "sql_where": ["u.age > 30 AND u.city = 'Paris'"],
        "sql_group_by": ["u.name"],
        "sql_order_by": ["n DESC"],
        "sql_table": ["users", "orders"],
        "sql_column": ["u.name", "u.id", "o.user_id", "u.age", "u.city", "u.name", "n"],
        "sql_string": ["'Paris'"],
        "sql_number": ["30", "5"],
        "sql_function": ["COUNT(*)"],
    },
    Q2: {
        "sql_select_list": ["TRIM(p.name)", "oi.product_id"],
        "sql_from": ["FROM products p", "FROM order_items oi"],
        "sql_join_on": [],
        # the inner WHERE lies inside the outer one: one span
        "sql_where": ["p.id NOT IN (SELECT oi.product_id FROM order_items oi WHERE oi.price IS NOT NULL) "
                      "AND p.stock BETWEEN 1 AND 10"],
        "sql_table": ["products", "order_items"],
        "sql_string": [],
        "sql_number": ["1", "10"],
        "sql_function": ["TRIM(p.name)"],
    },
    Q3: {
        "sql_select_list": ["ROUND(AVG(sub.total), 2) AS avg_price", "*"],
        "sql_from": ["FROM (SELECT * FROM orders o WHERE o.status LIKE 'sh%' OR o.status = 'pending') AS sub"],
        "sql_where": ["o.status LIKE 'sh%' OR o.status = 'pending'"],
        "sql_order_by": ["avg_price DESC, sub.id"],
        "sql_table": ["orders"],
        "sql_string": ["'sh%'", "'pending'"],
        "sql_number": ["2"],
        "sql_function": ["ROUND(AVG(sub.total), 2)"],
    },
    Q4: {
        "sql_select_list": ["d.city, MAX(e.salary)", "AVG(salary)", "MIN(age)"],
        "sql_from": ["FROM departments d LEFT JOIN employees e ON d.id = e.dept_id", "FROM employees",
                     "FROM users"],
        "sql_join_on": ["d.id = e.dept_id"],
        "sql_where": ["d.name IN ('sales', 'research') AND e.salary > (SELECT AVG(salary) FROM employees "
                      "WHERE age > (SELECT MIN(age) FROM users))"],
        "sql_group_by": ["d.city"],
        "sql_table": ["departments", "employees", "employees", "users"],
        "sql_string": ["'sales'", "'research'"],
        "sql_number": ["2"],
        "sql_function": ["MAX(e.salary)", "AVG(salary)", "MIN(age)", "COUNT(*)"],
    },
}


def pieces(query: str, name: str) -> list[str]:
    s, e, _ = get_hypothesis(name).spans(query)
    return [query[a:b] for a, b in zip(s, e)]


@pytest.mark.parametrize("query", list(HAND), ids=["join_where_group", "not_in_subquery", "derived_table",
                                                   "nested_scalar_subqueries"])
def test_sql_spans_match_hand_worked(query):
    for name, expected in HAND[query].items():
        assert pieces(query, name) == expected, name


def test_sql_spans_exact_offsets_and_subquery_depth():
    s, e, _ = get_hypothesis("sql_select_list").spans(Q1)
    assert list(zip(s.tolist(), e.tolist())) == [(7, 28)]          # "SELECT " is 7 characters
    s, e, _ = get_hypothesis("sql_string").spans(Q1)
    assert list(zip(s.tolist(), e.tolist())) == [(Q1.index("'Paris'"), Q1.index("'Paris'") + 7)]

    def depth(q):
        out = np.zeros(len(q))
        for a, b, v in zip(*get_hypothesis("sql_subquery_depth").spans(q)):
            out[a:b] = v
        return out
    assert not depth(Q1).any()
    expected = np.zeros(len(Q2))
    inner = "(SELECT oi.product_id FROM order_items oi WHERE oi.price IS NOT NULL)"
    expected[Q2.index(inner):Q2.index(inner) + len(inner)] = 1
    assert np.array_equal(depth(Q2), expected)
    expected = np.zeros(len(Q4))
    outer = "(SELECT AVG(salary) FROM employees WHERE age > (SELECT MIN(age) FROM users))"
    inner = "(SELECT MIN(age) FROM users)"
    expected[Q4.index(outer):Q4.index(outer) + len(outer)] += 1
    expected[Q4.index(inner):Q4.index(inner) + len(inner)] += 1
    assert np.array_equal(depth(Q4), expected)
    assert depth(Q4).max() == 2


def test_sql_generator_is_seeded_parses_and_spans_are_well_formed():
    a, b = sql_queries(150, seed=3), sql_queries(150, seed=3)
    assert a == b and a != sql_queries(150, seed=4)
    assert all("\n" not in q for q in a)
    gen_depth = SQLGenerator(seed=3, max_depth=1).queries(100)
    for q in a:
        sqlglot.parse_one(q)                         # every query parses
        for piece in pieces(q, "sql_string"):
            assert piece[0] == piece[-1] == "'" and len(piece) >= 2
        for piece in pieces(q, "sql_function"):
            assert piece[0].isalpha() and piece.endswith(")") and piece.count("(") == piece.count(")")
        for name in ("sql_where", "sql_select_list", "sql_from"):
            for piece in pieces(q, name):
                assert piece == piece.strip() and piece.count("(") == piece.count(")"), (name, piece, q)
        for piece in pieces(q, "sql_table"):
            assert piece in {"users", "orders", "products", "order_items", "employees", "departments"}
    for q in gen_depth:                              # max_depth bounds the nesting
        assert get_hypothesis("sql_subquery_depth").spans(q)[2].max(initial=0) <= 1


def test_sql_hypotheses_are_registered_for_sql():
    con = dbd.connect(None, progress=False)
    try:
        names = {n for (n,) in con.sql("SELECT name FROM available_hypotheses()").fetchall()}
        assert set(SQL_HYPOTHESIS_NAMES) <= names
    finally:
        dbd.close(con)


# -- study 2: the SQL autocompletion LSTM --------------------------------------------------------
def test_sqllstm_checkpoint_loads_and_beats_the_unigram_entropy():
    from deepbase_duck.models import sqllstm
    from deepbase_duck.models.charlstm import encode_chars
    from deepbase_duck.models.train_sqllstm import HELDOUT_SEED
    from deepbase_duck.models.zoo import sqllstm as sqllstm_loader

    cfg = sqllstm.config()
    assert sqllstm.weights_path().stat().st_size < 2_000_000
    adapter = sqllstm_loader()
    model = adapter.module
    assert {n for n, _ in model.named_modules()} >= {"lstm0", "lstm1"}
    train = sql_queries(cfg["corpus"]["n_train"], seed=cfg["corpus"]["train_seed"])
    text = "".join(q + "\n" for q in train)
    counts = np.unique(np.frombuffer(text.encode("utf-32-le"), np.uint32), return_counts=True)[1]
    p = counts / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    assert unigram == pytest.approx(cfg["evaluation"]["unigram_entropy_train"], abs=1e-4)
    seen = set(train)
    heldout = [q for q in sql_queries(cfg["corpus"]["n_heldout_drawn"], seed=HELDOUT_SEED) if q not in seen]
    assert len(heldout) == cfg["corpus"]["n_heldout"]
    nll, n = 0.0, 0
    for q in heldout[:150]:
        ids = torch.tensor([encode_chars(q + "\n")], device=adapter.device)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1]), -1)[0].cpu()
        ids = ids.cpu()
        nll -= float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum())
        n += ids.shape[1] - 1
    loss = nll / n
    assert loss < unigram - 1.0, (loss, unigram)
    assert loss == pytest.approx(cfg["evaluation"]["heldout_loss"], abs=0.1)


def test_train_sqllstm_script_runs(tmp_path):
    from deepbase_duck.models.train_sqllstm import main
    assert main(["--out", str(tmp_path), "--n-train", "300", "--n-heldout", "20", "--steps", "3",
                 "--eval-every", "2", "--batch", "4", "--seq-len", "32", "--hidden", "16", "--embed-dim", "8"]) == 0
    cfg = json.loads((tmp_path / "sqllstm.json").read_text())
    assert cfg["training"]["steps"] == 3 and cfg["architecture"]["hidden"] == 16
    assert math.isfinite(cfg["evaluation"]["heldout_loss"]) and (tmp_path / "sqllstm.safetensors").exists()


def test_sqllstm_units_track_sql_rules():
    con = dbd.connect(None, progress=False)
    try:
        dbd.add_dataset(con, "sql", sql_queries(40, seed=7))
        con.sql("SELECT register_model('sqllstm', 'deepbase_duck.models.zoo:sqllstm')").fetchall()
        rows = con.sql("""SELECT hypothesis, max(abs(score)) FROM inspect('sqllstm', ['lstm0', 'lstm1'],
                          ['sql_select_list', 'sql_column', 'sql_number'], 'sql') GROUP BY hypothesis""").fetchall()
        best = dict(rows)
        assert set(best) == {"sql_select_list", "sql_column", "sql_number"}
        assert best["sql_select_list"] > 0.5 and all(0 <= v <= 1 for v in best.values())
    finally:
        dbd.close(con)


# -- study 5: across training --------------------------------------------------------------------
def test_string_detector_grows_across_training(code_sample):
    con = dbd.connect(None, progress=False)
    try:
        dbd.add_dataset(con, "code", code_sample)
        for c in ("step0", "final"):
            con.sql(f"SELECT register_model('charlstm_{c}', 'deepbase_duck.models.zoo:charlstm', "
                    f"'{{\"checkpoint\": \"{c}\"}}')").fetchall()
        # one query over both checkpoints: LATERAL calls inspect once per model row
        rows = con.sql("""
            SELECT s.model, count(*) AS n, max(abs(s.score)) AS best
            FROM (SELECT name FROM models WHERE name LIKE 'charlstm_%') AS m,
                 LATERAL inspect(m.name, ['lstm0', 'lstm1'], ['in_string'], 'code') AS s
            GROUP BY s.model""").fetchall()
        best = {m: b for m, n, b in rows}
        assert {m: n for m, n, _ in rows} == {"charlstm_step0": 512, "charlstm_final": 512}
        assert best["charlstm_final"] > best["charlstm_step0"] + 0.05
        # the same scores are in the scores table, one query per model, and compare_scores sees both
        assert con.sql("SELECT count(DISTINCT query_id) FROM scores").fetchall()[0][0] == 2
        delta = con.sql("SELECT count(*) FROM compare_scores('charlstm_step0', 'charlstm_final')").fetchall()[0][0]
        assert delta == 512
    finally:
        dbd.close(con)

"""A seeded generator of SQL queries from a small grammar (the corpus of DeepBase's SQL study).

DeepBase inspected a character-level SQL autocompletion model against hypotheses generated from
the SQL grammar. No SQL query corpus installs from a package registry, so this module writes one:
queries over a fixed shop/HR schema, drawn from the grammar below with ``random.Random(seed)``
(the same seed gives the same queries on every machine and Python version >= 3.11)::

    query     := SELECT [DISTINCT] items FROM source {join} [WHERE cond]
                 [GROUP BY cols [HAVING agg op number]] [ORDER BY col [ASC|DESC], ...] [LIMIT n]
    items     := * | item {, item}          item := expr [AS name]
    expr      := column | number | func(expr, ...) | agg(column) | COUNT(*) | expr (+|-|*|/) expr
    source    := table alias | (query) AS alias                          (nested subquery)
    join      := [INNER|LEFT] JOIN table alias ON column = column
    cond      := pred {AND|OR pred} | (cond) | NOT (cond)
    pred      := column op (number | string) | column BETWEEN n AND n | column LIKE 'pattern'
               | column IN (literals) | column IN (query) | column op (query) | column IS [NOT] NULL

Every query is one line (no newline inside), with upper-case keywords. Subqueries nest at most
``max_depth`` levels deep.
"""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path

#: table -> columns (numeric columns first in NUMERIC, text columns in TEXT).
SCHEMA: dict[str, list[str]] = {
    "users": ["id", "name", "age", "city", "email", "score"],
    "orders": ["id", "user_id", "total", "status", "quantity"],
    "products": ["id", "name", "price", "category", "stock"],
    "order_items": ["id", "order_id", "product_id", "quantity", "price"],
    "employees": ["id", "name", "salary", "dept_id", "age"],
    "departments": ["id", "name", "budget", "city"],
}
ALIASES = {"users": "u", "orders": "o", "products": "p", "order_items": "oi", "employees": "e",
           "departments": "d"}
TEXT_COLUMNS = {"name", "city", "email", "status", "category"}
#: (table, column, table, column) join keys.
JOINS = [("users", "id", "orders", "user_id"), ("orders", "id", "order_items", "order_id"),
         ("products", "id", "order_items", "product_id"), ("departments", "id", "employees", "dept_id")]
WORDS = ["Paris", "London", "Berlin", "Tokyo", "Lima", "active", "shipped", "pending", "cancelled",
         "books", "games", "tools", "garden", "Alice", "Bob", "Carol", "Dave", "Eve", "sales", "research",
         "north", "south", "gold", "silver"]
AGGREGATES = ["COUNT", "SUM", "AVG", "MIN", "MAX"]
NUMERIC_FUNCS = ["ABS", "ROUND"]
TEXT_FUNCS = ["UPPER", "LOWER", "LENGTH", "TRIM"]
COMPARISONS = ["=", "<>", "<", ">", "<=", ">="]
RESULT_NAMES = ["total", "n", "avg_price", "best", "cnt", "amount", "label", "x", "revenue", "top"]


def check_seed(name: str, seed) -> int:
    """``seed`` as an int >= 0, else a DeepBaseError naming ``name``. ``random.Random`` seeds with
    the absolute value of an int (seed -1 draws what seed 1 draws, a "new" sample that is none) and
    hashes a float or a string: only whole numbers >= 0 name a draw of their own."""
    from ..errors import DeepBaseError, check_int
    try:
        return check_int(name, seed, 0)
    except DeepBaseError:
        negative = isinstance(seed, (int, float)) and not isinstance(seed, bool) and seed < 0
        raise DeepBaseError(f"{name} must be a whole number >= 0, got {seed!r}"
                            + (f" (random.Random draws seed {seed!r} as seed {-seed!r}: give a seed >= 0 that "
                               f"no other sample uses)" if negative else "")) from None


class SQLGenerator:
    """``SQLGenerator(seed).query()`` -> one SQL query string; ``queries(n)`` -> a list."""

    def __init__(self, seed: int = 0, max_depth: int = 2):
        self.rng = random.Random(check_seed("SQLGenerator: seed", seed))
        from ..errors import check_int
        self.max_depth = check_int("SQLGenerator: max_depth", max_depth, 0)

    # -- leaves ----------------------------------------------------------------------------
    def number(self) -> str:
        r = self.rng.random()
        if r < 0.6:
            return str(self.rng.randint(0, 100))
        if r < 0.85:
            return str(self.rng.randint(100, 99999))
        return f"{self.rng.randint(0, 999)}.{self.rng.randint(0, 99):02d}"

    def string(self, like: bool = False) -> str:
        w = self.rng.choice(WORDS)
        if like:
            w = self.rng.choice([w[:2] + "%", "%" + w[-3:], "%" + w[1:4] + "%"])
        return f"'{w}'"

    def column(self, tables: list[tuple[str, str]], kind: str | None = None) -> tuple[str, str]:
        """(sql text, column name) of a column of one of ``tables`` [(table, alias)]."""
        for _ in range(20):
            table, alias = self.rng.choice(tables)
            col = self.rng.choice(SCHEMA[table])
            if kind == "text" and col not in TEXT_COLUMNS or kind == "num" and col in TEXT_COLUMNS:
                continue
            break
        qualify = len(tables) > 1 or self.rng.random() < 0.3
        return (f"{alias}.{col}" if qualify else col), col

    # -- expressions -----------------------------------------------------------------------
    def expr(self, tables, depth: int = 0) -> str:
        r = self.rng.random()
        if r < 0.45 or depth > 1:
            return self.column(tables)[0]
        if r < 0.6:
            return f"{self.rng.choice(AGGREGATES[1:])}({self.column(tables, 'num')[0]})"
        if r < 0.68:
            arg = "*" if self.rng.random() < 0.7 else self.column(tables)[0]
            return f"COUNT({arg})"
        if r < 0.78:
            fn = self.rng.choice(TEXT_FUNCS)
            return f"{fn}({self.column(tables, 'text')[0]})"
        if r < 0.86:
            fn = self.rng.choice(NUMERIC_FUNCS)
            inner = self.column(tables, "num")[0] if self.rng.random() < 0.6 else self.expr(tables, depth + 1)
            return f"ROUND({inner}, {self.rng.randint(0, 3)})" if fn == "ROUND" else f"ABS({inner})"
        if r < 0.9:
            return f"COALESCE({self.column(tables, 'num')[0]}, {self.number()})"
        op = self.rng.choice(["+", "-", "*", "/"])
        right = self.number() if self.rng.random() < 0.6 else self.column(tables, "num")[0]
        left = self.column(tables, "num")[0]
        if self.rng.random() < 0.25:
            return f"({left} {op} {right}) * {self.number()}"
        return f"{left} {op} {right}"

    def select_items(self, tables, depth: int) -> str:
        if self.rng.random() < 0.1:
            return "*"
        items = []
        for _ in range(self.rng.choice([1, 1, 2, 2, 3, 4])):
            e = self.expr(tables)
            if self.rng.random() < 0.3 and not e.replace(".", "").replace("_", "").isalnum():
                e += f" AS {self.rng.choice(RESULT_NAMES)}"
            items.append(e)
        return ", ".join(items)

    # -- predicates ------------------------------------------------------------------------
    def predicate(self, tables, depth: int) -> str:
        r = self.rng.random()
        can_nest = depth < self.max_depth
        if r < 0.3:
            col = self.column(tables, "num")[0]
            return f"{col} {self.rng.choice(COMPARISONS)} {self.number()}"
        if r < 0.45:
            col = self.column(tables, "text")[0]
            return f"{col} {self.rng.choice(['=', '<>'])} {self.string()}"
        if r < 0.53:
            col = self.column(tables, "text")[0]
            return f"{col} {'NOT LIKE' if self.rng.random() < 0.2 else 'LIKE'} {self.string(like=True)}"
        if r < 0.61:
            col = self.column(tables, "num")[0]
            a = self.rng.randint(0, 50)
            return f"{col} BETWEEN {a} AND {a + self.rng.randint(1, 500)}"
        if r < 0.69:
            if self.rng.random() < 0.5:
                col = self.column(tables, "num")[0]
                vals = [self.number() for _ in range(self.rng.randint(2, 4))]
            else:
                col = self.column(tables, "text")[0]
                vals = [self.string() for _ in range(self.rng.randint(2, 4))]
            return f"{col} IN ({', '.join(vals)})"
        if r < 0.75:
            col = self.column(tables)[0]
            return f"{col} IS {'NOT ' if self.rng.random() < 0.4 else ''}NULL"
        if r < 0.88 and can_nest:
            col = self.column(tables, "num")[0]
            return f"{col} {'NOT IN' if self.rng.random() < 0.2 else 'IN'} ({self.id_subquery(depth + 1)})"
        if can_nest:
            col = self.column(tables, "num")[0]
            return f"{col} {self.rng.choice(COMPARISONS[2:])} ({self.scalar_subquery(depth + 1)})"
        col = self.column(tables, "num")[0]
        return f"{col} {self.rng.choice(COMPARISONS)} {self.number()}"

    def condition(self, tables, depth: int) -> str:
        parts = [self.predicate(tables, depth)]
        for _ in range(self.rng.choice([0, 0, 1, 1, 2])):
            conj = "AND" if self.rng.random() < 0.65 else "OR"
            nxt = self.predicate(tables, depth)
            if conj == "OR" and self.rng.random() < 0.5:
                nxt = f"({nxt} OR {self.predicate(tables, depth)})"
                conj = "AND"
            parts.append(conj)
            parts.append(nxt)
        cond = " ".join(parts)
        if self.rng.random() < 0.05:
            cond = f"NOT ({cond})"
        return cond

    # -- subqueries ------------------------------------------------------------------------
    def id_subquery(self, depth: int) -> str:
        table = self.rng.choice(list(SCHEMA))
        tables = [(table, ALIASES[table])]
        col = self.column(tables, "num")[0]
        q = f"SELECT {col} FROM {table} {ALIASES[table]}"
        if self.rng.random() < 0.8:
            q += f" WHERE {self.condition(tables, depth)}"
        return q

    def scalar_subquery(self, depth: int) -> str:
        table = self.rng.choice(list(SCHEMA))
        tables = [(table, ALIASES[table])]
        agg = self.rng.choice(["AVG", "MAX", "MIN", "SUM"])
        q = f"SELECT {agg}({self.column(tables, 'num')[0]}) FROM {table} {ALIASES[table]}"
        if self.rng.random() < 0.6:
            q += f" WHERE {self.condition(tables, depth)}"
        return q

    # -- FROM ------------------------------------------------------------------------------
    def source(self, depth: int) -> tuple[str, list[tuple[str, str]]]:
        if depth < self.max_depth and self.rng.random() < 0.08:
            inner_table = self.rng.choice(list(SCHEMA))
            inner = self.query(depth + 1, table=inner_table)
            return f"({inner}) AS sub", [(inner_table, "sub")]
        table = self.rng.choice(list(SCHEMA))
        tables = [(table, ALIASES[table])]
        text = f"{table} {ALIASES[table]}" if self.rng.random() < 0.5 else f"{table} AS {ALIASES[table]}"
        for _ in range(self.rng.choice([0, 0, 0, 1, 1, 2])):
            options = [j for j in JOINS if (j[0] in dict(tables)) != (j[2] in dict(tables))]
            if not options:
                break
            t1, c1, t2, c2 = self.rng.choice(options)
            new, old_c, new_c, old_t = (t2, c1, c2, t1) if t1 in dict(tables) else (t1, c2, c1, t2)
            kind = self.rng.choice(["JOIN", "JOIN", "INNER JOIN", "LEFT JOIN"])
            text += (f" {kind} {new} {ALIASES[new]} ON {ALIASES[old_t]}.{old_c} = {ALIASES[new]}.{new_c}")
            tables.append((new, ALIASES[new]))
        return text, tables

    # -- the query -------------------------------------------------------------------------
    def query(self, depth: int = 0, table: str | None = None) -> str:
        if table is not None:
            src, tables = f"{table} {ALIASES[table]}", [(table, ALIASES[table])]
        else:
            src, tables = self.source(depth)
        distinct = "DISTINCT " if self.rng.random() < 0.08 else ""
        q = f"SELECT {distinct}{self.select_items(tables, depth)} FROM {src}"
        if self.rng.random() < 0.7:
            q += f" WHERE {self.condition(tables, depth)}"
        if self.rng.random() < 0.25:
            cols = [self.column(tables)[0] for _ in range(self.rng.choice([1, 1, 2]))]
            q += f" GROUP BY {', '.join(dict.fromkeys(cols))}"
            if self.rng.random() < 0.4:
                q += f" HAVING COUNT(*) {self.rng.choice(COMPARISONS[1:])} {self.rng.randint(1, 20)}"
        if self.rng.random() < 0.35:
            keys = []
            for _ in range(self.rng.choice([1, 1, 2])):
                keys.append(self.column(tables)[0] + self.rng.choice(["", "", " ASC", " DESC"]))
            q += f" ORDER BY {', '.join(keys)}"
        if self.rng.random() < 0.25:
            q += f" LIMIT {self.rng.choice([1, 5, 10, 20, 50, 100])}"
        return q

    def queries(self, n: int, name: str = "SQLGenerator.queries") -> list[str]:
        """The next ``n`` queries (a whole number >= 0: int() drew 2 for 2.5 and none for -3)."""
        from ..errors import check_int
        return [self.query() for _ in range(check_int(f"{name}: n", n, 0))]


def sql_queries(n: int, seed: int = 0, max_depth: int = 2) -> list[str]:
    """``n`` queries from the grammar, seeded (a bad argument is named as this function's)."""
    from ..errors import check_int
    seed = check_seed("sql_queries: seed", seed)
    max_depth = check_int("sql_queries: max_depth", max_depth, 0)
    return SQLGenerator(seed, max_depth).queries(n, "sql_queries")


@functools.lru_cache(maxsize=1)
def training_queries() -> frozenset[str]:
    """The training corpus of the bundled SQL LSTM (``deepbase_duck/models/sqllstm.json``:
    ``sql_queries(n_train, seed=train_seed)``), as a set."""
    cfg = json.loads((Path(__file__).resolve().parent.parent / "models" / "sqllstm.json").read_text())["corpus"]
    return frozenset(sql_queries(cfg["n_train"], seed=cfg["train_seed"]))


def sql_records(n: int, seed: int = 1, max_depth: int = 2, exclude_training: bool = True) -> list[dict]:
    """Records for ``add_dataset``: one query each, drawn with ``seed`` (1 by default; the training
    corpus of the bundled SQL LSTM used seed 0). Short queries recur between seeds (about 1.6% of
    seed 1's draws are training queries), so by default every query of that training corpus
    (``training_queries``) is skipped and drawing goes on until there are ``n``: the records are
    queries the model never saw. ``offset`` is the query's index among the seed's draws."""
    from ..errors import check_int
    n = check_int("sql_records: n", n, 0)
    seed = check_seed("sql_records: seed", seed)        # the source names the draw: 'seed=1', never 1.0
    max_depth = check_int("sql_records: max_depth", max_depth, 0)
    gen = SQLGenerator(seed, max_depth)
    seen = training_queries() if exclude_training else frozenset()
    out, i = [], 0
    while len(out) < int(n):
        q = gen.query()
        if q not in seen:
            out.append({"text": q, "source": f"sqlgen:seed={seed}", "offset": i})
        i += 1
        if i > 100 * int(n) + 100_000:
            raise ValueError(f"sql_records: seed {seed} drew {i} queries and found only {len(out)} of the "
                             f"{n} outside the training corpus")
    return out

"""SQL grammar hypotheses: each character of a query labelled from sqlglot's parse tree.

DeepBase scored a SQL autocompletion model's units against hypotheses generated from the SQL
grammar, one per rule. Here one hypothesis per clause or node type, registered at import
(sqlglot is imported when a hypothesis first runs: ``pip install sqlglot``):

==================  ==========  ============================================================
name                kind        characters labelled
==================  ==========  ============================================================
sql_select_list     binary      the SELECT list: first to last projected expression
sql_from            binary      the FROM clause: ``FROM`` through the end of its last JOIN
sql_join_on         binary      a JOIN's ON condition (after ``ON``)
sql_where           binary      a WHERE predicate (the condition after ``WHERE``)
sql_group_by        binary      GROUP BY keys (after ``GROUP BY``)
sql_order_by        binary      ORDER BY keys with their ASC/DESC (after ``ORDER BY``)
sql_table           binary      a table name (not its alias)
sql_column          binary      a column reference, qualifier included (``u.name``)
sql_string          binary      a string literal, quotes included
sql_number          binary      a number literal
sql_function        binary      a function call, name through closing parenthesis
sql_subquery_depth  continuous  number of parenthesised subqueries around the character
==================  ==========  ============================================================

Nested queries label their own clauses too (a WHERE inside a subquery is a WHERE).

How spans are found: sqlglot's AST keeps character positions only on leaves (identifiers,
literals, ``*``, function names); its tokenizer gives every token's position. A node's span is
the token range from its first to its last positioned descendant, widened to (1) the name of a
function parsed without a position (``TRIM``), the keyword tokens that open its clause (``WHERE``, ``GROUP BY``, ``[LEFT] JOIN``, ...) or close it
(``IS [NOT] NULL``, ``DESC``), (2) a leading ``NOT``, and (3) until its parentheses balance, plus
the parentheses around a parenthesised expression or subquery. A query sqlglot cannot parse gets
no labels (characters hold the defaults).
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import importlib.metadata
import pathlib

import numpy as np

from ..errors import HypothesisError
from .core import Hypothesis, register


@functools.lru_cache(maxsize=2048)
def parse(text: str):
    """(tree, tokens) of one query, or (None, []) when sqlglot cannot parse it. Cached (as many
    queries as ``annotate`` labels per chunk): every SQL hypothesis parses the same record."""
    try:
        import sqlglot
        from sqlglot.tokens import Tokenizer
    except ImportError:  # pragma: no cover - depends on the environment
        raise HypothesisError("the SQL hypotheses need sqlglot: pip install sqlglot") from None
    try:
        tokens = Tokenizer().tokenize(text)
        tree = sqlglot.parse_one(text)
    except Exception:  # sqlglot raises ParseError / TokenError (and others on odd input)
        return None, []
    return tree, tokens


class _Spans:
    """Token-range spans of the nodes of one parsed query."""

    def __init__(self, tokens):
        from sqlglot import exp
        from sqlglot.tokens import TokenType as T

        self.T = T
        self.Func = exp.Func
        self.toks = tokens
        self.types = [t.token_type for t in tokens]
        self.starts = [t.start for t in tokens]
        self.memo: dict[int, tuple[int, int] | None] = {}
        self.lead = {"Where": {T.WHERE}, "Group": {T.GROUP_BY}, "Having": {T.HAVING}, "Order": {T.ORDER_BY},
                     "Limit": {T.LIMIT}, "From": {T.FROM}, "Select": {T.SELECT, T.DISTINCT},
                     "Join": {T.JOIN, T.LEFT, T.RIGHT, T.INNER, T.OUTER, T.CROSS, T.FULL}}
        self.trail = {"Is": {T.IS, T.NOT, T.NULL, T.TRUE, T.FALSE}, "Ordered": {T.ASC, T.DESC}}

    def tok(self, char: int) -> int:
        """Index of the token that holds character ``char``."""
        return bisect.bisect_right(self.starts, char) - 1

    def _balance(self, a: int, b: int) -> tuple[int, int]:
        L, R = self.T.L_PAREN, self.T.R_PAREN
        depth = low = 0
        for t in self.types[a:b + 1]:
            depth += (t == L) - (t == R)
            low = min(low, depth)
        need_left, need_right = -low, depth - low
        while need_left and a > 0:
            a -= 1
            need_left += (self.types[a] == R) - (self.types[a] == L)
        while need_right and b < len(self.types) - 1:
            b += 1
            need_right += (self.types[b] == L) - (self.types[b] == R)
        return a, b

    def span(self, node) -> tuple[int, int] | None:
        """(first, last) token index of ``node``, or None when nothing of it has a position."""
        key = id(node)
        if key in self.memo:
            return self.memo[key]
        parts = []
        if "start" in (node.meta or {}):
            parts += [self.tok(node.meta["start"]), self.tok(node.meta["end"])]
        for child in node.iter_expressions():
            s = self.span(child)
            if s is not None:
                parts += list(s)
        if not parts:
            self.memo[key] = None
            return None
        a, b = min(parts), max(parts)
        kind = type(node).__name__
        ty = self.types
        if "start" not in (node.meta or {}) and isinstance(node, self.Func) and a > 1 \
                and ty[a - 1] == self.T.L_PAREN:
            a -= 2                               # a function parsed without a position (TRIM): its name
        if kind in self.trail:
            while b + 1 < len(ty) and ty[b + 1] in self.trail[kind]:
                b += 1
        a, b = self._balance(a, b)
        if kind in ("Paren", "Subquery") and a > 0 and b + 1 < len(ty) \
                and ty[a - 1] == self.T.L_PAREN and ty[b + 1] == self.T.R_PAREN:
            a, b = a - 1, b + 1
        if kind in self.lead:
            while a > 0 and ty[a - 1] in self.lead[kind]:
                a -= 1
        if kind == "Not" and a > 0 and ty[a - 1] == self.T.NOT:
            a -= 1
        self.memo[key] = (a, b)
        return a, b

    def chars(self, node) -> tuple[int, int] | None:
        """Character span [start, end) of ``node``."""
        s = self.span(node)
        return None if s is None else (self.toks[s[0]].start, self.toks[s[1]].end + 1)

    def cover(self, nodes) -> tuple[int, int] | None:
        """Character span from the first to the last of ``nodes``."""
        spans = [c for c in (self.chars(n) for n in nodes if n is not None) if c is not None]
        return (min(s for s, _ in spans), max(e for _, e in spans)) if spans else None


def _walk(text: str, select):
    """Spans chosen by ``select(exp, tree, spans) -> iterable of (start, end)``."""
    tree, tokens = parse(text)
    if tree is None:
        return []
    from sqlglot import exp

    sp = _Spans(tokens)
    return [s for s in select(exp, tree, sp) if s is not None]


def _select_list(text):
    return _walk(text, lambda exp, t, sp: (sp.cover(s.expressions) for s in t.find_all(exp.Select)))


def _from(text):
    return _walk(text, lambda exp, t, sp: (sp.cover([s.args.get("from_") or s.args.get("from")]
                                                    + list(s.args.get("joins") or []))
                                           for s in t.find_all(exp.Select)))


def _clause_body(cls_name, attr, many=False):
    def fn(text):
        def sel(exp, t, sp):
            for node in t.find_all(getattr(exp, cls_name)):
                part = node.args.get(attr)
                if part is None:
                    continue
                yield sp.cover(part if many else [part])
        return _walk(text, sel)
    fn.__name__ = f"sql_{cls_name.lower()}_{attr}"
    return fn


def _nodes(cls_names, test=None, attr=None):
    def fn(text):
        def sel(exp, t, sp):
            for node in t.find_all(*(getattr(exp, c) for c in cls_names)):
                if test is None or test(node):
                    target = node.args.get(attr) if attr else node
                    if target is not None:
                        yield sp.chars(target)
        return _walk(text, sel)
    return fn


def _functions(text):
    return _walk(text, lambda exp, t, sp: (sp.chars(f) for f in t.find_all(exp.Func)
                                           if not isinstance(f, (exp.Predicate, exp.Connector))))


def subquery_depth_fn(text):
    """Per character: the number of parenthesised subqueries (``(SELECT ...)``) around it."""
    tree, tokens = parse(text)
    out = np.zeros(len(text))
    if tree is None:
        return out
    from sqlglot import exp

    sp = _Spans(tokens)
    for sub in tree.find_all(exp.Subquery):
        s = sp.chars(sub.this)
        if s is None:
            continue
        a, b = s
        # the parentheses of the subquery belong to it
        j = sp.tok(a)
        if j > 0 and sp.types[j - 1] == sp.T.L_PAREN:
            a = tokens[j - 1].start
        k = sp.tok(b - 1)
        if k + 1 < len(tokens) and sp.types[k + 1] == sp.T.R_PAREN:
            b = tokens[k + 1].end + 1
        out[a:b] += 1
    return out


_where = _clause_body("Where", "this")
_join_on = _clause_body("Join", "on")
_group_by = _clause_body("Group", "expressions", many=True)
_order_by = _clause_body("Order", "expressions", many=True)
_table = _nodes(["Table"], attr="this")
_column = _nodes(["Column"])
_string = _nodes(["Literal"], test=lambda n: n.is_string)
_number = _nodes(["Literal"], test=lambda n: not n.is_string)

SQL_HYPOTHESES = [
    ("sql_select_list", _select_list, "the SELECT list (first to last projected expression)"),
    ("sql_from", _from, "the FROM clause: FROM through the end of its last JOIN"),
    ("sql_join_on", _join_on, "a JOIN's ON condition"),
    ("sql_where", _where, "a WHERE predicate (after WHERE)"),
    ("sql_group_by", _group_by, "GROUP BY keys"),
    ("sql_order_by", _order_by, "ORDER BY keys with ASC/DESC"),
    ("sql_table", _table, "a table name (not its alias)"),
    ("sql_column", _column, "a column reference, qualifier included"),
    ("sql_string", _string, "a string literal, quotes included"),
    ("sql_number", _number, "a number literal"),
    ("sql_function", _functions, "a function call, name through closing parenthesis"),
]


def _labeler_version() -> dict:
    """What the labels depend on besides a function's own source: this module (the span rules)
    and the sqlglot release (its parse). Stored labels are recomputed when either changes."""
    try:
        sqlglot_version = importlib.metadata.version("sqlglot")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - depends on the environment
        sqlglot_version = None
    return {"module": hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()[:12],
            "sqlglot": sqlglot_version}


_VERSION = _labeler_version()
for _name, _fn, _desc in SQL_HYPOTHESES:
    _fn.__dbd_params__ = {**_VERSION, "name": _name}
    register(Hypothesis(_name, _fn, "binary", _desc + " (sqlglot parse)"))
subquery_depth_fn.__dbd_params__ = {**_VERSION, "name": "sql_subquery_depth"}
register(Hypothesis("sql_subquery_depth", subquery_depth_fn, "continuous",
                    "number of parenthesised subqueries around the character (sqlglot parse)"))

#: Every SQL hypothesis, by name, in table order.
SQL_HYPOTHESIS_NAMES = [n for n, _, _ in SQL_HYPOTHESES] + ["sql_subquery_depth"]

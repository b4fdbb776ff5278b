"""What a report shows, read from the store: the query, its scores, its best units, and the
top-activating records of a unit from stored behaviors.

Everything here is SQL over the catalog tables (``queries``, ``scores``, ``models``, ``layers``,
``hypotheses``, ``labels``, ``symbols``, ``behaviors``) and the behavior views; nothing runs a
model. A unit's top-activating records come from the behavior stored for the checksum and
tokenisation the query scored (``queries.params``; for a query from before they were recorded
there, the model's current ones) over the query's dataset (any dtype); when none is stored the
report says so and names the command that stores it. When the query's weights or texts are gone
(the model registered again with other weights, the dataset dropped, replaced or edited since:
``provenance``), the report says that instead of showing activations the query never saw.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .. import store
from ..errors import DeepBaseError, EmptyDatasetError, UnknownNameError

# Measures that do not rank units by affinity: probe_weight and probe_class_weight are shares of
# a probe's weight mass (not an affinity: no heatmap; a probe-only query ranks units by
# probe_weight, which every hypothesis has), probe_topk and selectivity score a group of units.
NOT_AFFINITY = {"probe_weight", "probe_class_weight", "probe_topk", "selectivity"}
# the order in which measures that are no affinity rank units when the query has no other
RANK_FALLBACK = ("probe_weight", "probe_class_weight")
PREFERRED = ("corr", "pointbiserial", "spearman", "iou", "f1", "ap", "mi", "probeless", "precision", "recall")


@dataclass
class Query:
    """One row of ``queries`` plus what the report derives from its scores."""
    query_id: int
    model: str
    dataset: str
    layers: list[str]
    hypotheses: list[str]
    measures: list[str]
    params: dict
    n_records: int | None
    n_symbols: int | None
    source: str | None
    started_at: object
    seconds: float | None
    models: list[str] = field(default_factory=list)           # models with scores (a baseline adds one)
    unit_measures: list[str] = field(default_factory=list)    # measures with per-unit scores
    scored_measures: list[str] = field(default_factory=list)  # ... with at least one non-NULL unit score
    group_measures: list[str] = field(default_factory=list)   # measures scored per unit group (probe, ...)
    scored_layers: list[str] = field(default_factory=list)    # layers in the query's order
    scored_hypotheses: list[str] = field(default_factory=list)


def _names(con, sql: str) -> list[str]:
    return [r[0] for r in store.q_all(con, sql)]


def select_query(con, query_id: int | None = None, model: str | None = None, dataset: str | None = None) -> Query:
    """The query a report is about: ``query_id``, or the latest query of ``model`` over
    ``dataset`` (either may be None). Raises a DeepBaseError naming what is missing."""
    if query_id is not None:
        try:
            query_id = int(query_id)
        except (TypeError, ValueError):
            raise DeepBaseError(f"report: query id must be an integer, got {query_id!r}") from None
    # a model or dataset named by a query with scores counts, whether the store holds it now or
    # not: a query of a dataset dropped since is still reported (provenance says so), so the name
    # that picks it is no unknown name
    if model is not None:
        known = _names(con, "SELECT name FROM models UNION SELECT DISTINCT model FROM scores ORDER BY 1")
        if model not in known:
            raise UnknownNameError("model", model, known)
    if dataset is not None:
        known = _names(con, "SELECT name FROM datasets UNION SELECT DISTINCT dataset FROM queries WHERE query_id IN "
                            "(SELECT DISTINCT query_id FROM scores) ORDER BY 1")
        if dataset not in known:
            raise UnknownNameError("dataset", dataset, known)
    have = _names(con, "SELECT DISTINCT query_id FROM scores ORDER BY 1")
    if query_id is not None and query_id not in have:
        _no_scores(con, query_id, have)            # no such query, or one with no scores: say which
    if not have:
        raise EmptyDatasetError("report: the store holds no scores yet; run an inspection first, e.g. "
                                "`deepbase-duck inspect STORE MODEL DATASET --layers L --hypotheses H "
                                "--measures corr probe --keep-activations`")
    if query_id is None:
        where, args = ["query_id IN (SELECT DISTINCT query_id FROM scores)"], []
        if model is not None:                      # queries.model lists every model of a multi-model query
            where.append("query_id IN (SELECT DISTINCT query_id FROM scores WHERE model = ?)"); args.append(model)
        if dataset is not None:
            where.append("dataset = ?"); args.append(dataset)
        query_id = store.q_scalar(con, f"SELECT max(query_id) FROM queries WHERE {' AND '.join(where)}", args)
        if query_id is None:
            what = " and ".join(f"{k} {v!r}" for k, v in (("model", model), ("dataset", dataset)) if v is not None)
            raise DeepBaseError(f"report: no inspection of {what} has scores in this store")
    row = store.q_one(con, "SELECT query_id, model, dataset, layers, hypotheses, measures, params, n_records, "
                           "n_symbols, source, started_at, seconds FROM queries WHERE query_id = ?", [query_id])
    if row is None:
        raise DeepBaseError(f"report: scores of query {query_id} have no row in the queries table")
    try:
        params = json.loads(row[6]) if row[6] else {}
    except ValueError:
        params = {"raw": row[6]}
    q = Query(row[0], row[1], row[2], list(row[3] or []), list(row[4] or []), list(row[5] or []), params,
              row[7], row[8], row[9], row[10], row[11])
    # in the query's order (checkpoints 'early', 'mid', 'final' stay so, not sorted by name), each
    # model's untrained baseline after the trained models
    named = {m: i for i, m in enumerate(params.get("models") or []) if isinstance(m, str)}
    q.models = sorted(_names(con, f"SELECT DISTINCT model FROM scores WHERE query_id = {q.query_id}"),
                      key=lambda m: (m.endswith("~untrained"), named.get(m.removesuffix("~untrained"), len(named)), m))
    per = store.q_all(con, f"SELECT measure, bool_or(unit IS NOT NULL), bool_or(unit IS NULL), "
                           f"bool_or(unit IS NOT NULL AND score IS NOT NULL) FROM scores "
                           f"WHERE query_id = {q.query_id} GROUP BY measure")
    unit_ms = {m for m, u, _, _ in per if u}
    group_ms = {m for m, _, g, _ in per if g}
    order = {m: i for i, m in enumerate(q.measures)}
    q.unit_measures = sorted(unit_ms, key=lambda m: (order.get(m, 99), m))
    q.scored_measures = [m for m in q.unit_measures if any(x == m and v for x, _, _, v in per)]
    q.group_measures = sorted(group_ms, key=lambda m: (order.get(m, 99), m))
    lorder = {name: i for i, name in enumerate(q.layers)}
    q.scored_layers = sorted(_names(con, f"SELECT DISTINCT layer FROM scores WHERE query_id = {q.query_id}"),
                             key=lambda x: (lorder.get(x, 10**6), x))
    horder = {name: i for i, name in enumerate(q.hypotheses)}
    q.scored_hypotheses = sorted(_names(con, f"SELECT DISTINCT hypothesis FROM scores WHERE query_id = {q.query_id}"),
                                 key=lambda h: (horder.get(source_hypothesis(h, q.hypotheses, controls=False), 10**6), h))
    return q


def source_hypothesis(scored: str, names, controls: bool = True) -> str:
    """The hypothesis of ``names`` (a query's) that the scored column ``scored`` comes from: itself,
    or the categorical hypothesis of an expanded column ('name=category') or, with ``controls``,
    of its control task ('name~control'). Matched whole first, then by the longest name it
    extends, not by cutting at the first '=' or '~': a name may hold them itself ('depth>=2',
    'x=1'), and cut there it was counted, ordered and underlined as another hypothesis. With no
    name matching (an old query without its list), the part before the first '=' or '~'."""
    names = [n for n in (names or []) if isinstance(n, str)]
    if scored in names:
        return scored
    made = [n for n in names if scored.startswith(n + "=") or (controls and scored == n + "~control")]
    if made:
        return max(made, key=len)
    cut = scored.split("=", 1)[0]
    return cut.split("~", 1)[0] if controls else cut


def _no_scores(con, query_id: int, have: list) -> None:
    """Raise the error for a ``query_id`` with no unit scores: a compare_layers query (its results
    are in ``similarities``), a query that stored none, or no query at all (UnknownNameError)."""
    shown = ", ".join(map(str, have)) or "none yet"
    row = store.q_one(con, "SELECT measures, layers, dataset FROM queries WHERE query_id = ?", [query_id])
    if row is None:
        raise UnknownNameError("query id", query_id, have)
    compare = (store.q_scalar(con, "SELECT count(*) FROM similarities WHERE query_id = ?", [query_id])
               or list(row[0] or []) == ["cka"])
    if compare:
        groups = ", ".join(row[1] or [])
        raise DeepBaseError(f"report: query {query_id} is a compare_layers query (linear CKA between unit groups "
                            f"{groups} over {row[2]!r}), with no unit scores to report; its results are in the "
                            f"similarities table (SELECT * FROM similarities WHERE query_id = {query_id}). "
                            f"Queries with unit scores: {shown}")
    raise DeepBaseError(f"report: query {query_id} stored no scores (the scores table has no row of it); "
                        f"queries with scores: {shown}")


def primary_measure(q: Query, measure: str | None = None) -> str | None:
    """The measure that ranks units: ``measure`` if given (it must have unit scores in the query),
    else corr, else the first affinity measure the query scored per unit, of those with at least
    one non-NULL score (a measure whose every score is NULL ranks nothing); with no affinity
    measure, probe_weight (every hypothesis of a probe has it)."""
    if measure is not None:
        if measure not in q.unit_measures:
            raise UnknownNameError("unit-level measure of this query", measure, q.unit_measures)
        return measure
    scored = q.scored_measures or q.unit_measures    # when every score is NULL: the same order over them
    affinity = [m for m in scored if m not in NOT_AFFINITY]
    for m in PREFERRED:
        if m in affinity:
            return m
    if affinity:
        return affinity[0]
    for m in RANK_FALLBACK:
        if m in scored:
            return m
    return scored[0] if scored else None


def best_per_cell(con, q: Query, measure: str) -> list[tuple]:
    """(model, layer, hypothesis, best signed score, unit): the unit with the largest |score| of
    each (model, layer, hypothesis) for ``measure``, of the finite scores (see top_units)."""
    return store.q_all(con, """
        SELECT model, layer, hypothesis, arg_max(score, abs(score)), arg_max(unit, abs(score))
        FROM scores WHERE query_id = ? AND measure = ? AND unit IS NOT NULL AND isfinite(score)
        GROUP BY ALL""", [q.query_id, measure])


def top_units(con, q: Query, measure: str, k: int) -> list[dict]:
    """The ``k`` units with the largest |score| per (model, hypothesis), best first. Only finite
    scores rank: DuckDB sorts NaN above every number, and an infinite score (inserted by hand or
    imported; no measure writes one) topped the ranking and then failed the report's bar chart
    ("Axis limits cannot be NaN or Inf")."""
    rows = store.q_all(con, """
        SELECT model, hypothesis, layer, unit, score, ci_low, ci_high, q_value, n,
               row_number() OVER (PARTITION BY model, hypothesis ORDER BY abs(score) DESC, layer, unit) AS rank
        FROM scores WHERE query_id = ? AND measure = ? AND unit IS NOT NULL AND isfinite(score)
        QUALIFY rank <= ? ORDER BY model, hypothesis, rank""", [q.query_id, measure, int(k)])
    keys = ("model", "hypothesis", "layer", "unit", "score", "ci_low", "ci_high", "q_value", "n", "rank")
    return [dict(zip(keys, r)) for r in rows]


def null_hypotheses(con, q: Query, measures: list[str]) -> list[tuple[str, str]]:
    """(model, hypothesis) pairs with unit scores of ``measures`` in the query, every one NULL
    (undefined: a hypothesis that never holds on the records read), or NaN or infinite (by hand:
    top_units ranks finite scores only): nothing of them can be ranked or mapped, and the report
    says so rather than leave them out unsaid."""
    hi = {h: i for i, h in enumerate(q.scored_hypotheses)}
    mi = {m: i for i, m in enumerate(q.models)}
    rows = store.q_all(con, """
        SELECT model, hypothesis FROM scores
        WHERE query_id = ? AND list_contains(?, measure) AND unit IS NOT NULL
        GROUP BY ALL HAVING count(score) FILTER (WHERE isfinite(score)) = 0""", [q.query_id, list(measures)])
    return sorted(((m, h) for m, h in rows), key=lambda r: (mi.get(r[0], 10**6), hi.get(r[1], 10**6), r))


def probe_rows(con, q: Query) -> list[dict]:
    """Held-out probe scores per (model, layer, hypothesis), with their interval and majority rate."""
    rows = store.q_all(con, """
        SELECT model, layer, hypothesis, score, ci_low, ci_high, n,
               detail->>'metric', TRY_CAST(detail->>'majority' AS DOUBLE), TRY_CAST(detail->>'macro_f1' AS DOUBLE)
        FROM scores WHERE query_id = ? AND measure = 'probe' AND unit IS NULL""", [q.query_id])
    keys = ("model", "layer", "hypothesis", "score", "ci_low", "ci_high", "n", "metric", "majority", "macro_f1")
    return [dict(zip(keys, r)) for r in rows]


# -- stored activations ----------------------------------------------------------------------
@dataclass
class Provenance:
    """What a query scored, and whether the store still holds it. ``weights``: {model: (checksum,
    tokenisation)} the query scored (current ones for a query from before they were recorded);
    ``gone``: {model: why} for models whose scored weights are no longer registered under their
    name; ``doubt``: {model: why} for a query without recorded checksums whose model was
    registered again since (its weights may differ); ``texts_gone``: why the dataset's records
    are not those the query scored (None when they are)."""
    weights: dict = field(default_factory=dict)
    gone: dict = field(default_factory=dict)
    doubt: dict = field(default_factory=dict)
    texts_gone: str | None = None


def _after(con, stamp, started) -> bool:
    """Whether timestamp ``stamp`` is more than a second after ``started`` (queries.started_at is
    written to the second)."""
    if stamp is None or started is None:
        return False
    return bool(store.q_scalar(con, "SELECT CAST(? AS TIMESTAMP) > CAST(? AS TIMESTAMP) + INTERVAL 1 SECOND",
                               [stamp, started]))


def provenance(con, q: Query) -> Provenance:
    """Check the query's recorded weights and texts (``Session.query_provenance``, in
    ``queries.params``) against the store."""
    out = Provenance()
    named = list(q.params.get("models") or [])
    checksums, toks = q.params.get("checksums"), q.params.get("tokenizations")
    recorded = {}
    if isinstance(checksums, list) and isinstance(toks, list) and len(checksums) == len(toks) == len(named):
        recorded = {m: (c, t) for m, c, t in zip(named, checksums, toks)}
    for m in q.models:
        row = store.q_one(con, "SELECT checksum, tokenization, registered_at FROM models WHERE name = ?", [m])
        if m in recorded:
            out.weights[m] = recorded[m]
            if row is None:
                out.gone[m] = f"model {m!r} is no longer registered"
            elif (row[0], row[1]) != recorded[m]:
                out.gone[m] = (f"model {m!r} was registered again since query {q.query_id}, with other weights "
                               f"(checksum {row[0][:12]}..., not {recorded[m][0][:12]}...)")
        elif row is not None:
            out.weights[m] = (row[0], row[1])
            if not m.endswith("~untrained") and _after(con, row[2], q.started_at):
                out.doubt[m] = (f"model {m!r} was registered again since query {q.query_id}, which did not record "
                                f"its weights' checksum: these may be other weights' activations")
    drow = store.q_one(con, "SELECT created_at FROM datasets WHERE name = ?", [q.dataset])
    if drow is None:
        out.texts_gone = f"dataset {q.dataset!r} was dropped since query {q.query_id}"
    elif q.params.get("dataset_md5") is not None and isinstance(q.params.get("dataset_records"), int):
        n = int(q.params["dataset_records"])
        have, digest = store.q_one(con, "SELECT count(*), md5(string_agg(md5(text), ',' ORDER BY record_id)) FROM "
                                        "(SELECT record_id, text FROM records WHERE dataset = ? ORDER BY record_id "
                                        "LIMIT ?)", [q.dataset, n])
        if have < n or digest != q.params["dataset_md5"]:
            out.texts_gone = (f"the records of dataset {q.dataset!r} were replaced or edited since query "
                              f"{q.query_id}")
    elif _after(con, drow[0], q.started_at):
        out.texts_gone = (f"dataset {q.dataset!r} was dropped and added again (or replaced) since query "
                          f"{q.query_id}")
    return out


def find_behavior(con, model: str, layer: str, dataset: str, checksum: str | None = None,
                  tokenization: str | None = None) -> dict | None:
    """The stored behavior of (``checksum`` and ``tokenization``, by default the model's current
    ones; layer, dataset) that can be read, float32 preferred; None when the model is unknown or
    nothing is stored. Activation files deleted or moved by hand are noticed first
    (engine/extract.py: ``forget_missing_parts``, which warns naming the model, layer and
    dataset): such a behavior counts as not stored."""
    from ..catalog import session_of
    from ..engine.extract import forget_missing_parts
    if checksum is None or tokenization is None:
        row = store.q_one(con, "SELECT checksum, tokenization FROM models WHERE name = ?", [model])
        if row is None:
            return None
        checksum, tokenization = row
    session = session_of(con)
    for bid, view, width, dtype, directory, owner in store.q_all(con, """
            SELECT behavior_id, view_name, width, dtype, directory, model FROM behaviors
            WHERE model_checksum = ? AND layer = ? AND dataset = ? AND tokenization = ?
            ORDER BY dtype = 'float32' DESC, behavior_id DESC""", [checksum, layer, dataset, tokenization]):
        forget_missing_parts(session, {"behavior_id": bid, "directory": directory, "view_name": view,
                                       "model": owner if owner == model else f"{model} (stored as {owner})",
                                       "layer": layer, "dataset": dataset})
        if not store.q_scalar(con, "SELECT count(*) FROM behavior_parts WHERE behavior_id = ?", [bid]):
            continue
        if store.q_one(con, "SELECT 1 FROM duckdb_views() WHERE NOT internal AND view_name = ?", [view]) is None:
            continue
        return {"behavior_id": bid, "view": view, "width": width, "dtype": dtype, "tokenization": tokenization}
    return None


def _finite(x) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else 0.0


def top_records(con, behavior: dict, units: list[tuple[int, bool]], n: int) -> dict[tuple[int, bool], tuple]:
    """For each (unit, negative) of one behavior, in one scan of its view: the ``n`` records whose
    peak activation of the unit is highest (lowest when ``negative``: a unit anti-correlated with
    its hypothesis fires by going down), with the position of each peak, and the unit's largest
    |activation| over every stored record (the colour scale). Returns {(unit, negative):
    ([{record_id, peak, peak_pos}], scale)}."""
    import numpy as np
    width = int(behavior["width"])
    for u, _ in units:
        if not 0 <= u < width:
            raise DeepBaseError(f"report: unit {u} is outside the layer's width {width}")
    cols = []
    for i, (u, neg) in enumerate(units):
        a = f"act[{int(u) + 1}]"
        agg, pick = ("min", "arg_min") if neg else ("max", "arg_max")
        cols.append(f"{agg}({a}) AS peak{i}, {pick}(pos, {a}) AS pos{i}, max(abs({a})) AS amax{i}")
    t = store.q_arrow(con, f"SELECT record_id, {', '.join(cols)} FROM {behavior['view']} GROUP BY record_id "
                           "ORDER BY record_id")
    rid = t.column("record_id").to_numpy()
    out = {}
    for i, (u, neg) in enumerate(units):
        peak = t.column(f"peak{i}").to_numpy(zero_copy_only=False).astype(np.float64)
        pos = t.column(f"pos{i}").to_pylist()
        amax = t.column(f"amax{i}").to_numpy(zero_copy_only=False).astype(np.float64)
        key = np.where(np.isfinite(peak), peak if neg else -peak, np.inf)
        order = np.lexsort((rid, key))[: int(n)]           # best peak first, ties by record id
        scale = float(np.nanmax(amax)) if amax.size and np.isfinite(amax).any() else 0.0
        out[(u, neg)] = ([{"record_id": int(rid[j]), "peak": _finite(peak[j]), "peak_pos": pos[j]} for j in order],
                         scale)
    return out


def record_activations(con, behavior: dict, dataset: str, record_id: int, unit: int) -> tuple[str, list[tuple]]:
    """The record's text and, for each of its symbols, (pos, start_char, end_char, activation)."""
    text = store.q_scalar(con, "SELECT text FROM records WHERE dataset = ? AND record_id = ?", [dataset, record_id])
    if text is None:
        raise DeepBaseError(f"report: record {record_id} of dataset {dataset!r} is missing from the records table")
    rows = store.q_all(con, f"""
        SELECT b.pos, s.start_char, s.end_char, b.act[{int(unit) + 1}]
        FROM {behavior['view']} AS b JOIN symbols AS s
          ON s.record_id = b.record_id AND s.pos = b.pos AND s.dataset = ? AND s.tokenization = ?
        WHERE b.record_id = ? ORDER BY b.pos""", [dataset, behavior["tokenization"], record_id])
    return text, [(int(p), int(s), int(e), _finite(v)) for p, s, e, v in rows]


def true_chars(con, hypothesis: str, dataset: str, record_id: int) -> list[tuple[int, int]]:
    """Character spans of a record where a binary hypothesis (or one category of an expanded
    categorical one, 'name=category') holds, from its current labels; [] when there are none."""
    def stored(name):
        return store.q_one(con, "SELECT kind, version, categories FROM hypotheses WHERE name = ?", [name])

    # the whole name first: a binary hypothesis may hold '=' itself ('depth>=2', 'x=1'), and cut
    # at its first '=' it was looked up as category '2' of a hypothesis 'depth>', so its record
    # showed no underline (or another hypothesis' where one of that name existed)
    name, row = hypothesis, stored(hypothesis)
    if row is not None:
        if row[0] != "binary":
            return []
        version, cond, args = row[1], "value <> 0", []
    else:
        # 'name=category' of a categorical hypothesis, where either part may hold '=' too
        for i in (i for i, c in enumerate(hypothesis) if c == "="):
            name, category = hypothesis[:i], hypothesis[i + 1:]
            row = stored(name)
            if row is not None and row[0] == "categorical" and row[2] and category in row[2]:
                break
        else:
            return []
        version, cond, args = row[1], "value = ?", [float(list(row[2]).index(category))]
    return [(int(s), int(e)) for s, e in store.q_all(
        con, f"SELECT start_char, end_char FROM labels WHERE hypothesis = ? AND version = ? AND dataset = ? "
             f"AND record_id = ? AND {cond} ORDER BY start_char", [name, version, dataset, record_id, *args])]

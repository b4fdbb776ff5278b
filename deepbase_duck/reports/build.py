"""Assemble the report of one query: read the store (data.py), draw (figures.py), write one
self-contained HTML file (html.py).

The store is read holding its writer lock (``store.one_reader``), as inspect, extract and export
run: reading it may write (activation files deleted by hand are taken out of the catalog,
``forget_missing_parts``; an image model loaded for the images section may bring its catalog row
up to date), and the report reads the query, its scores and stored activations one after another,
which a query committing on another cursor in between would leave out of step."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import time
from collections import Counter, defaultdict
from pathlib import Path

from .. import __version__, store
from ..catalog import session_of
from ..errors import DeepBaseError, UnknownNameError, check_int, counted as _n
from ..progress import progress_bar
from . import data
from . import html as H
from .vision import is_image_dataset, top_images_section

SECTIONS = ("summary", "heatmap", "hypotheses", "probes", "activations")
# queries.params entries the report checks (data.provenance) rather than shows among the settings
PROVENANCE_KEYS = {"checksums", "tokenizations", "dataset_records", "dataset_md5"}


def _label(model: str, layer: str, q: data.Query) -> str:
    return layer if len(q.models) == 1 else f"{model}:{layer}"


def _scan(q: data.Query) -> str | None:
    """How far a query with a stop rule (max_error, top_k, plateau_tol) read, as the CLI says it
    (cli.scan_summary): stopped early by which rule after how many of the selected records, or
    every record read; the error bound reached (max_error's rule only: top_k's is the stability
    of the top-k sets, the plateau's a held-out loss); the rule's settings and seed."""
    p = q.params
    asked = {k: p.get(k) for k in ("max_error", "top_k", "plateau_tol") if p.get(k) is not None}
    if not asked:
        return None
    used, total = p.get("records_used", q.n_records), p.get("record_count")
    bound = p.get("bound_reached") if p.get("max_error") is not None else None
    if not isinstance(bound, (int, float)):
        bound = None
    if p.get("stopped_early"):
        text = f"stopped early ({p.get('stop_rule')}) after {used} of {total} records"
        if bound is not None:
            text += ("; error bounds unbounded: fewer than 2 windows" if not math.isfinite(bound)
                     else f"; largest error bound {H.fmt(float(bound))}")
    else:
        text = (f"every record was read ({used} of {total}; the stop rule held at no earlier window), so the "
                "scores and intervals are the full scan's")
        if bound is not None:
            text += (", some of which have no finite interval" if not math.isfinite(bound)
                     else f", whose largest half-width is {H.fmt(float(bound))}")
    text += "; " + ", ".join(f"{k} {v}" for k, v in asked.items())
    if p.get("seed") is not None:
        text += f", seed {p['seed']}"
    return text


def _summary(con, q: data.Query, pm: str | None, tops: list[dict], store_path: str) -> str:
    # every setting, whole (a setting of 0, such as seed 0, is one); not those that are unset
    params = {k: v for k, v in q.params.items()
              if v is not None and v is not False and v != {} and v != [] and k not in PROVENANCE_KEYS}
    rows = [["store", store_path], ["query", q.query_id], ["model", ", ".join(q.models) or q.model],
            ["dataset", q.dataset], ["layers", ", ".join(q.scored_layers)],
            ["hypotheses", ", ".join(q.scored_hypotheses)], ["measures", ", ".join(q.measures)],
            ["records / symbols", f"{q.n_records} / {q.n_symbols}"],
            ["read from", {"model": "forward passes of the model", "stored": "stored activations",
                           "stored+model": "stored activations, and forward passes of the model for the records "
                                           "not stored",
                           "cache": "the stored scores of an identical earlier query"}.get(q.source, q.source)],
            ["started", q.started_at], ["seconds", None if q.seconds is None else round(q.seconds, 2)]]
    scan = _scan(q)
    if scan is not None:
        rows.append(["scan", scan])
    if params:
        rows.append(["settings", json.dumps(params, sort_keys=True, default=str)])
    body = H.table(None, rows, pairs=True)
    if pm is not None and tops:
        hi = {h: i for i, h in enumerate(q.scored_hypotheses)}
        best = sorted((u for u in tops if u["rank"] == 1), key=lambda u: (q.models.index(u["model"]),
                                                                         hi.get(u["hypothesis"], 10**6)))
        body = body + (
                f"<h3>Best unit per hypothesis (by |{H.esc(pm)}|)</h3>" +
                 H.table(["hypothesis", "layer", "unit", pm, "ci low", "ci high", "q-value", "n"],
                         [[u["hypothesis"], _label(u["model"], u["layer"], q), u["unit"], u["score"],
                           u["ci_low"], u["ci_high"], u["q_value"], u["n"]] for u in best], {2, 3, 4, 5, 6, 7})
                + _undefined(con, q, [pm], "ranked"))
    return H.section("summary", f"Query {q.query_id}", body)


def _heatmap(con, q: data.Query) -> tuple[str, int]:
    from . import figures
    measures = [m for m in q.unit_measures if m not in data.NOT_AFFINITY]
    if not measures:
        return H.section("heatmap", "Best score per layer and hypothesis", H.note(
            "This query scored no unit-level affinity measure (for example <code>corr</code>); "
            "only the probe section applies.")), 0
    measures_all = measures
    cells = [(m, *row[:4]) for m in measures for row in data.best_per_cell(con, q, m)]
    measures = [m for m in measures if any(c[0] == m for c in cells)]     # a measure whose scores are all NULL: none
    if not cells:
        return H.section("heatmap", "Best score per layer and hypothesis", H.note(
            f"Every score of this query's {H.esc(', '.join(m for m in q.unit_measures if m not in data.NOT_AFFINITY))} "
            "is NULL (undefined: for example a hypothesis that never holds, or never varies, on these "
            "records), so there is nothing to map.")), 0
    present = {(c[1], c[2]) for c in cells}
    rows = [(mo, la) for mo in q.models for la in q.scored_layers if (mo, la) in present]
    hyps = [h for h in q.scored_hypotheses if any(c[3] == h for c in cells)]
    png = figures.heatmap(cells, measures, rows, hyps, q.models)
    body = (_undefined(con, q, measures_all, "mapped") +
            H.img(png, "heatmap of the best score per layer and hypothesis") +
            '<p class="meta">Each cell: the score of the layer\'s unit with the largest |score| for that hypothesis '
            "(colour: |score|).</p>")
    return H.section("heatmap", "Best score per layer and hypothesis", body), 1


def _undefined(con, q: data.Query, measures: list[str], what: str) -> str:
    """A note naming the hypotheses whose every score of ``measures`` is NULL ('' when none)."""
    pairs = data.null_hypotheses(con, q, measures)
    if not pairs:
        return ""
    names = ", ".join(H.esc(h if len(q.models) == 1 else f"{m}: {h}") for m, h in pairs)
    listed = " and ".join(filter(None, [", ".join(measures[:-1]), measures[-1]]))
    return H.note(f"{names}: every {H.esc(listed)} score is NULL (undefined: for example a "
                  f"hypothesis that never holds, or never varies, on these records), so "
                  f"{'it is' if len(pairs) == 1 else 'they are'} not {what} here.")


def _hypotheses(con, q: data.Query, pm: str | None, tops: list[dict]) -> tuple[str, int]:
    from . import figures
    if pm is not None and not tops and pm in q.unit_measures:
        return H.section("hypotheses", "Top units per hypothesis", H.note(
            f"Every {H.esc(pm)} score of this query is NULL (undefined: for example a hypothesis that never "
            "holds, or never varies, on these records), so no unit can be ranked.")), 0
    if pm is None or not tops:
        return H.section("hypotheses", "Top units per hypothesis", H.note(
            "No unit-level scores in this query.")), 0
    by_h = defaultdict(list)
    for u in tops:
        by_h[u["hypothesis"]].append(u)
    figs = []
    for h in q.scored_hypotheses:
        if h in by_h:
            units = sorted(by_h[h], key=lambda u: (q.models.index(u["model"]), u["rank"]))
            png = figures.ranked_units(units, pm, h, q.models)
            # ranked per model: with several models the bars are each model's best, not the best overall
            per = Counter(u["model"] for u in units)
            most = max(per.values())
            best = (_n(len(units), "best unit") if len(per) == 1 else
                    f"{_n(most, 'best unit')} of each of {len(per)} models" if min(per.values()) == most else
                    f"best units (up to {most}) of each of {len(per)} models")
            figs.append(f"<figure>{H.img(png, f'top units of {h}')}<figcaption>{H.esc(h)}: the "
                        f"{best} by |{H.esc(pm)}|, with their confidence interval</figcaption></figure>")
    return H.section("hypotheses", "Top units per hypothesis", _undefined(con, q, [pm], "ranked") +
                     f'<div class="grid">{"".join(figs)}</div>'), len(figs)


def _probes(con, q: data.Query, store_arg: str) -> tuple[str, int]:
    from . import figures
    rows = data.probe_rows(con, q)
    if not rows:
        return H.section("probes", "Probe accuracy per layer", H.note(
            f"Query {q.query_id} trained no probes. Add them with <code>deepbase-duck inspect {H.esc(store_arg)} "
            f"{H.esc(shlex.quote(q.models[0]))} {H.esc(shlex.quote(q.dataset))} --layers ... --hypotheses ... "
            "--measures corr probe</code>.")), 0
    hyps = [h for h in q.scored_hypotheses if any(r["hypothesis"] == h for r in rows)]
    png = figures.probe_accuracy(rows, q.scored_layers, hyps, q.models)
    order = {(m, la): i for i, (m, la) in enumerate((m, la) for m in q.models for la in q.scored_layers)}
    rows = sorted(rows, key=lambda r: (hyps.index(r["hypothesis"]) if r["hypothesis"] in hyps else 99,
                                       order.get((r["model"], r["layer"]), 99)))
    tab = H.table(["hypothesis", "layer", "metric", "score", "ci low", "ci high", "majority", "macro F1", "n test"],
                  [[r["hypothesis"], _label(r["model"], r["layer"], q), r["metric"], r["score"], r["ci_low"],
                    r["ci_high"], r["majority"], r["macro_f1"], r["n"]] for r in rows], {3, 4, 5, 6, 7, 8})
    body = f'<div class="grid"><div>{H.img(png, "probe accuracy per layer")}</div><div>{tab}</div></div>'
    return H.section("probes", "Probe accuracy per layer", body), 1


def _activations(con, q: data.Query, pm: str | None, tops: list[dict], text_units: int, records_per_unit: int,
                 context_chars: int, store_arg: str, progress: bool,
                 prov: data.Provenance) -> tuple[str, int, list[tuple[str, str]]]:
    title = "Top-activating records"
    if pm is None or not tops or text_units == 0 or records_per_unit == 0:
        return H.section("activations", title, H.note("No units selected for this section.")), 0, []
    if is_image_dataset(con, q.dataset):
        # an image's symbols are its grid cells, not characters of its text (a descriptor such as
        # a scene's JSON): colouring that text cell by cell would show nothing of the image
        return H.section("activations", title, H.note(
            f"The records of dataset {H.esc(q.dataset)} are images: each top unit's top-activating images, "
            "with the unit's activation over them, are in the images section below.")), 0, []
    main = [m for m in q.models if not m.endswith("~untrained")] or q.models
    hi = {h: i for i, h in enumerate(q.scored_hypotheses)}
    chosen, seen = [], {}
    for u in sorted(tops, key=lambda u: (hi.get(u["hypothesis"], 10**6), u["rank"])):
        if u["model"] in main and u["rank"] <= text_units:
            key = (u["model"], u["layer"], u["unit"])
            if key in seen:
                seen[key]["also"].append(u["hypothesis"])
            else:
                seen[key] = dict(u, also=[])
                chosen.append(seen[key])
    if prov.texts_gone:            # whatever is stored now is of other texts than the query scored
        keys = list(dict.fromkeys((u["model"], u["layer"]) for u in chosen))
        return H.section("activations", title, H.note(
            f"{H.esc(prov.texts_gone)}, so the records query {q.query_id} scored are no longer in the store "
            "(activations stored now would be of other texts): its units' top-activating records are not "
            "shown. Run the query again over the dataset as it is now, and report that query.")), 0, keys
    behaviors, missing, gone, parts = {}, [], [], [H.legend()]
    for u in chosen:
        key = (u["model"], u["layer"])
        if key not in behaviors:
            checksum, tok = prov.weights.get(u["model"], (None, None))
            behaviors[key] = data.find_behavior(con, u["model"], u["layer"], q.dataset, checksum, tok)
            if behaviors[key] is None:
                (gone if u["model"] in prov.gone else missing).append(key)
    peaks, shown = {}, 0
    stored = {k: b for k, b in behaviors.items() if b is not None}
    bar = progress_bar(len(stored) + len(chosen), "report: top-activating records", "step", progress)
    try:
        for key, b in stored.items():                    # one scan of each behavior for all its units
            wanted = sorted({(int(u["unit"]), u["score"] < 0) for u in chosen if (u["model"], u["layer"]) == key})
            for k, v in data.top_records(con, b, wanted, records_per_unit).items():
                peaks[(*key, *k)] = v
            bar.update(1)
        for u in chosen:
            b = behaviors[(u["model"], u["layer"])]
            bar.update(1)
            if b is None:
                continue
            negative = u["score"] < 0
            recs, scale = peaks[(u["model"], u["layer"], int(u["unit"]), negative)]
            also = f" (also the best unit of {', '.join(map(H.esc, u['also']))})" if u["also"] else ""
            parts.append(f"<h3>{H.esc(u['hypothesis'])}: {H.esc(_label(u['model'], u['layer'], q))} unit "
                         f"{u['unit']} &mdash; {H.esc(pm)} {u['score']:.3f}{also}</h3>"
                         f'<p class="meta">the {_n(len(recs), "record")} with the {"lowest" if negative else "highest"} '
                         f"peak activation ({'the unit is anti-correlated: it fires by going down' if negative else 'it fires by going up'}); "
                         f"largest |activation| of the unit: {scale:.3f}</p>")
            for r in recs:
                text, syms = data.record_activations(con, b, q.dataset, r["record_id"], int(u["unit"]))
                peak = next((st for pos, st, _, _ in syms if pos == r["peak_pos"]), 0)
                start, end = H.window(text, peak, context_chars)
                spans = data.true_chars(con, u["hypothesis"], q.dataset, r["record_id"])
                parts.append(f'<div class="meta">record {r["record_id"]}, peak {r["peak"]:.3f} at character {peak}'
                             f' (characters {start}&ndash;{end} of {len(text)})</div>' +
                             H.coloured_text(text, [x[1:] for x in syms], scale, start, end, spans))
            shown += 1
    finally:
        bar.close()
    if missing:
        cmds = "<br>".join(f"<code>deepbase-duck extract {H.esc(store_arg)} {H.esc(shlex.quote(m))} "
                           f"{H.esc(shlex.quote(q.dataset))} {H.esc(shlex.quote(la))} --dtype float16</code>"
                           for m, la in missing)
        parts.insert(0, H.note(
            "Activations of " + ", ".join(H.esc(f"{m}:{la}") for m, la in missing) +
            f" over {H.esc(q.dataset)} are not stored, so their units' records cannot be coloured here. "
            f"Store them (or inspect with <code>--keep-activations</code>) and re-run the report:<br>{cmds}"))
    for m in dict.fromkeys(m for m, _ in gone):
        layers = ", ".join(H.esc(la) for mo, la in gone if mo == m)
        parts.insert(0, H.note(
            f"{H.esc(prov.gone[m])}. The activations of the weights query {q.query_id} scored ({layers}) are not "
            "stored, so its units' records are not coloured here (the current weights' would not be this "
            "query's). Register those weights again (under this or another name) and extract them, or "
            "report a query of the current weights."))
    for m in dict.fromkeys(u["model"] for u in chosen):
        if m in prov.doubt:
            parts.insert(0, H.note(H.esc(prov.doubt[m]) + "."))
    return H.section("activations", title, "\n".join(parts)), shown, missing + gone


def write_report(con, path, query_id=None, model: str | None = None, dataset: str | None = None,
                 top_units: int = 5, text_units: int = 1, records_per_unit: int = 3, context_chars: int = 240,
                 measure: str | None = None) -> dict:
    """Write the HTML report of one query to ``path``; see :func:`deepbase_duck.report`."""
    session = session_of(con)
    top_units = check_int("report: top_units", top_units, 1)
    text_units = check_int("report: text_units", text_units, 0)
    records_per_unit = check_int("report: records_per_unit", records_per_unit, 0)
    context_chars = check_int("report: context_chars", context_chars, 10)
    out = Path(path)
    if out.is_dir():
        raise DeepBaseError(f"report: {str(out)!r} is a folder; give the path of an .html file")
    if out.suffix.lower() not in (".html", ".htm"):
        raise DeepBaseError(f"report: {str(out)!r} should end in .html")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DeepBaseError(f"report: cannot write {str(out)!r}: {str(blocking)!r} is a file, not a folder")
    return _write_report(session, out, query_id, model, dataset, top_units, text_units, records_per_unit,
                         context_chars, measure)


@store.one_reader                    # reads: a store opened read-only is reported too
def _write_report(session, out: Path, query_id, model, dataset, top_units: int, text_units: int,
                  records_per_unit: int, context_chars: int, measure) -> dict:
    """write_report's work, its arguments checked, holding the store's writer lock."""
    con = session.con
    t0 = time.time()
    q = data.select_query(con, query_id, model, dataset)
    if measure is not None and measure not in q.unit_measures:      # the query's measures with unit scores
        raise UnknownNameError("unit-level measure", measure, q.unit_measures)
    pm = data.primary_measure(q, measure)
    tops = data.top_units(con, q, pm, top_units) if pm else []
    store_path = session.db_path or ":memory:"
    store_arg = shlex.quote(session.db_path) if session.db_path not in (None, ":memory:") else "STORE"
    parts, n_fig = [_summary(con, q, pm, tops, store_path)], 0
    s, k = _heatmap(con, q)
    parts.append(s); n_fig += k
    s, k = _hypotheses(con, q, pm, tops)
    parts.append(s); n_fig += k
    s, k = _probes(con, q, store_arg)
    parts.append(s); n_fig += k
    prov = data.provenance(con, q)                 # the weights and texts the query scored: still there?
    s, shown, missing = _activations(con, q, pm, tops, text_units, records_per_unit, context_chars, store_arg,
                                     session.progress, prov)
    parts.append(s)
    sections = list(SECTIONS)
    images = top_images_section(con, q, tops, records_per_unit, prov)
    if images is not None:
        parts.append(H.section("images", "Top-activating images", images))
        sections.append("images")
    title = f"deepbase_duck report: {q.model} on {q.dataset} (query {q.query_id})"
    # each query hypothesis once, not each 'h=category' or 'h~control' column of it
    n_hyps = len({data.source_hypothesis(h, q.hypotheses) for h in q.scored_hypotheses})
    sub = (f"{_n(len(q.scored_layers), 'layer')} &times; {_n(n_hyps, 'hypothesis', 'hypotheses')}, measures "
           f"{H.esc(', '.join(q.measures))}; units ranked by |{H.esc(pm or '-')}|. Affinity is not causation: "
           "verify a unit by ablating it.")
    footer = f"deepbase_duck {__version__}, written {time.strftime('%Y-%m-%d %H:%M:%S')} from {H.esc(store_path)}"
    doc = H.page(title, sub, parts, footer)
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(doc, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException as exc:    # no permission, a full disk, Ctrl-C: no half-written .tmp left
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise DeepBaseError(f"report: cannot write {str(out)!r}: {exc.strerror or exc}") from None
        raise
    return {"path": str(out), "query_id": q.query_id, "measure": pm, "sections": sections, "figures": n_fig,
            "units_with_text": shown, "missing_activations": [f"{m}:{la}" for m, la in missing],
            "bytes": len(doc.encode("utf-8")), "seconds": round(time.time() - t0, 3)}

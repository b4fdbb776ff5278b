"""Reports with pictures: one self-contained HTML file per inspection query.

    import deepbase_duck as dbd
    con = dbd.connect("study.duckdb")
    dbd.report(con, "report.html")                 # the latest query
    dbd.report(con, "q3.html", query_id=3, top_units=8)

Sections (each an ``<section id=...>``): ``summary`` (the query and its best units),
``heatmap`` (layer x hypothesis, best |score| per measure), ``hypotheses`` (per hypothesis its
ranked units with score bars and intervals), ``probes`` (held-out probe accuracy per layer),
``activations`` (Karpathy-style: each top unit's top-activating records as text coloured by
activation, from stored behaviors) and, for image datasets, ``images`` (see vision.py; there the
``activations`` section points to it, as an image's symbols are grid cells, not characters).

This package's ``__init__`` stays light (matplotlib is imported when a report is written), as
``deepbase_duck/__init__.py`` imports :func:`report` from it. (The package is ``reports``, not
``report``: a subpackage named like the function would make ``import deepbase_duck.report.x``
resolve ``report`` to the function and fail.)

Modules: data.py (what the report reads from the store), figures.py (matplotlib figures as PNG
bytes), html.py (the page, tables, coloured text), build.py (the assembly), vision.py (the hook
for image datasets).
"""
from __future__ import annotations


def report(con, path, query_id: int | None = None, model: str | None = None, dataset: str | None = None,
           top_units: int = 5, text_units: int = 1, records_per_unit: int = 3, context_chars: int = 240,
           measure: str | None = None) -> dict:
    """Write the HTML report of one inspection query to ``path`` (an .html file, replaced).

    The query is ``query_id``, or the latest query of ``model`` over ``dataset`` (either may be
    None: the latest query of the store). ``top_units`` units per hypothesis are ranked by
    ``measure`` (default: corr if the query has it, else its first per-unit affinity measure);
    the best ``text_units`` of them per hypothesis get their ``records_per_unit`` top-activating
    records coloured by activation, ``context_chars`` characters either side of the peak, when
    the layer's activations are stored (``extract``, or ``inspect(..., keep_activations=True)``);
    otherwise the report says how to store them.

    Every figure is a PNG embedded as a base64 data URI: the file is the whole report. Returns
    a summary dict (path, query_id, measure, sections, figures, units_with_text,
    missing_activations, bytes, seconds). Raises DeepBaseError subclasses naming the problem
    for an empty store, an unknown query id, model, dataset or measure, or a bad path.
    """
    from .build import write_report
    return write_report(con, path, query_id=query_id, model=model, dataset=dataset, top_units=top_units,
                        text_units=text_units, records_per_unit=records_per_unit, context_chars=context_chars,
                        measure=measure)


__all__ = ["report"]

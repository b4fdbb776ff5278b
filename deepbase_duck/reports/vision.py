"""The report's top-activating *images* section, for image datasets (records that are images,
read by an ImageAdapter on a grid of cells: extraction/image_adapter.py).

:func:`is_image_dataset` recognises such a dataset by its symbols: they are keyed by an image
tokenisation ('image-grid<G>:...'). :func:`top_images_section` then draws, for each top unit, its
top-activating images with the unit's activation over each image (reports/images.py,
``top_images_png``), embedded as PNGs; for a text dataset it returns None and the report has no
image section.
"""
from __future__ import annotations

from .. import store


def _columns(con, table: str) -> set[str]:
    return {r[0] for r in store.q_all(con, "SELECT column_name FROM duckdb_columns() WHERE table_name = ? "
                                           "AND NOT internal", [table])}


def is_image_dataset(con, dataset: str) -> bool:
    """Whether ``dataset``'s records are images: its symbols were made by an image adapter."""
    return store.q_one(con, "SELECT 1 FROM tokenized_records WHERE dataset = ? AND tokenization LIKE 'image-grid%' "
                            "LIMIT 1", [dataset]) is not None


def top_images_section(con, query, units: list[dict], records_per_unit: int, prov=None) -> str | None:
    """HTML of the top-activating images of each top unit, or None for a non-image dataset.

    The images are ranked by forward passes of the model as registered now, so a model that
    cannot be loaded in this session (registered from a live Python object in another one, or a
    loader whose weights changed), or whose weights or dataset are no longer those the query
    scored (``prov``: data.provenance), gets a note in place of its images; the rest of the report
    needs no model. Each figure is titled and outlined with the unit's Network Dissection result
    in this query (``query.query_id``), not another's. Images that can no longer be read (a file
    deleted or moved since the query) get a note in place of that layer's figures."""
    if not is_image_dataset(con, query.dataset) or records_per_unit == 0:
        return None                          # (no records asked for: no images, and no forward passes to rank them)
    import os
    import tempfile
    from ..catalog import session_of
    from ..errors import DeepBaseError
    from .html import esc, img, note
    from .images import _image_adapter, top_images_png
    session = session_of(con)
    parts, skip = [], {}
    if prov is not None and prov.texts_gone:
        return note(f"{esc(prov.texts_gone)}: the images now stored are not those query {query.query_id} scored, "
                    "so its units' top images are not shown.")
    for m in dict.fromkeys(u["model"] for u in units):
        if prov is not None and m in prov.gone:
            skip[m] = f"{prov.gone[m]}: its top images would be the current weights', not this query's"
            continue
        try:
            adapter = _image_adapter(session, m)
        except DeepBaseError as exc:
            skip[m] = f"{exc}; then re-run the report to see its top images"
            continue
        if prov is not None and m in prov.weights and adapter.checksum != prov.weights[m][0]:
            skip[m] = (f"model {m!r} now yields other weights than those query {query.query_id} scored: its top "
                       "images would be the current weights', not this query's")
    for m, why in skip.items():
        parts.append(note(f"Top images of {esc(m)}'s units are not shown: {esc(why)}."))
    failed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, u in enumerate(units):
            if u["model"] in skip or (u["model"], u["layer"]) in failed:
                continue
            path = os.path.join(tmp, f"unit{i}.png")
            try:
                top_images_png(con, u["model"], u["layer"], int(u["unit"]), query.dataset, path,
                               k=records_per_unit, query_id=query.query_id)
            except DeepBaseError as exc:
                # the images are read again to rank them: one deleted or moved since the query (or
                # unreadable now) costs this section its figures, not the whole report
                failed[(u["model"], u["layer"])] = True
                parts.append(note(f"Top images of {esc(u['model'])} {esc(u['layer'])}'s units are not shown: "
                                  f"{esc(str(exc))}."))
                continue
            with open(path, "rb") as f:
                png = f.read()
            title = f"{u['model']} {u['layer']} unit {u['unit']}: {u['hypothesis']} ({u.get('score', float('nan')):.3f})"
            parts.append(f"<h3>{esc(title)}</h3>" + img(png, f"top images of {title}"))
    return "".join(parts)

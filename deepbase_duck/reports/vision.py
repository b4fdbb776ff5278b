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


def top_images_section(con, query, units: list[dict], records_per_unit: int) -> str | None:
    """HTML of the top-activating images of each top unit, or None for a non-image dataset."""
    if not is_image_dataset(con, query.dataset):
        return None
    import os
    import tempfile
    from .html import esc, img
    from .images import top_images_png
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, u in enumerate(units):
            path = os.path.join(tmp, f"unit{i}.png")
            top_images_png(con, u["model"], u["layer"], int(u["unit"]), query.dataset, path, k=max(1, records_per_unit))
            with open(path, "rb") as f:
                png = f.read()
            title = f"{u['model']} {u['layer']} unit {u['unit']}: {u['hypothesis']} ({u.get('score', float('nan')):.3f})"
            parts.append(f"<h3>{esc(title)}</h3>" + img(png, f"top images of {title}"))
    return "".join(parts)

"""Hook for vision models: the report's top-activating *images* section.

Image datasets are being added on another branch; this module is the one place the report asks
about them, so that work only has to fill in :func:`top_images_section`. The report calls it for
every query and adds whatever HTML it returns as a section with id ``images``; for a text
dataset it returns None and the report has no image section.

Contract for the implementation:
  * :func:`is_image_dataset` decides whether a dataset holds images. Until the image catalog
    exists it recognises either a ``datasets.modality`` column equal to 'image' or a catalog
    table ``images`` with a ``dataset`` column listing the dataset; adjust it to the real schema.
  * :func:`top_images_section` gets the connection, the report's Query, and the top units (dicts
    with model, layer, unit, hypothesis, score) and returns the HTML body of the section: for
    each unit, its top-activating images (thumbnails as base64 PNGs, with ``html.img``) and,
    for spatial layers, the activation map over each image.
"""
from __future__ import annotations

from .. import store


def _columns(con, table: str) -> set[str]:
    return {r[0] for r in store.q_all(con, "SELECT column_name FROM duckdb_columns() WHERE table_name = ? "
                                           "AND NOT internal", [table])}


def is_image_dataset(con, dataset: str) -> bool:
    """Whether ``dataset`` holds images (see the module docstring for what is recognised)."""
    if "modality" in _columns(con, "datasets"):
        row = store.q_one(con, "SELECT modality FROM datasets WHERE name = ?", [dataset])
        if row is not None and str(row[0]).lower() in ("image", "images", "vision"):
            return True
    if "dataset" in _columns(con, "images"):
        return store.q_one(con, "SELECT 1 FROM images WHERE dataset = ? LIMIT 1", [dataset]) is not None
    return False


def top_images_section(con, query, units: list[dict], records_per_unit: int) -> str | None:
    """HTML of the top-activating images of each top unit, or None for a non-image dataset.

    Not built yet for image datasets: the section then says so, so a vision report never
    silently omits it.
    """
    if not is_image_dataset(con, query.dataset):
        return None
    from .html import esc, note
    return note(f"Dataset {esc(query.dataset)} holds images; rendering their top-activating images is not "
                "built yet (hook: <code>deepbase_duck.reports.vision.top_images_section</code>).")

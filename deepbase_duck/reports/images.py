"""Top-activating images of a unit of an image model, as numbers and as a PNG grid.

    from deepbase_duck.reports.images import top_images, top_images_png
    top_images(con, "mobilenet_v2", "features.6", 17, "scenes", k=8)
    top_images_png(con, "mobilenet_v2", "features.6", 17, "scenes", "unit17.png", k=8)

Images are ranked by the unit's largest activation over the image's grid cells (the maximum
of its map resampled to the adapter's grid), as Network Dissection ranks them. The maxima of
every unit of a layer come from one forward pass over the dataset, kept for the session, so
ranking many units of one layer costs one pass. The PNG shows each image as the model saw it,
with the unit's activation map (bilinearly upsampled to the image) as a heat overlay and, where a
threshold is known, the cells above it outlined: by default the threshold of the unit's latest
``iou`` score over the same dataset in the ``scores`` table (Network Dissection's top-quantile threshold), whose best
concept and IoU also title the figure (a report passes its own query: ``query_id``). The maxima
are remembered per model checksum, layer, records and their texts: a dataset replaced or edited
is run again. Needs matplotlib (``pip install -e '.[examples]'``).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from .. import store
from ..catalog import session_of
from ..errors import DeepBaseError, EmptyDatasetError, check_int
from ..extraction.hooks import Retain, run_until_retained
from ..extraction.image_adapter import ImageAdapter
from ..progress import progress_bar


def _image_adapter(session, model: str) -> ImageAdapter:
    adapter = session.adapter(model)
    if not isinstance(adapter, ImageAdapter):
        raise DeepBaseError(f"model {model!r} is not an image model (its adapter is {type(adapter).__name__}, "
                            "not an ImageAdapter)")
    return adapter


def _selected_ids(session, dataset, record_ids) -> np.ndarray:
    """The records' ids, sorted, each once (the session's rule: ids that are not records of
    ``dataset`` are named)."""
    session.check_dataset(dataset)
    ids = session.select_records(dataset, record_ids)
    if len(ids) == 0:
        raise EmptyDatasetError(f"no records selected from dataset {dataset!r}")
    return np.sort(np.asarray(ids, np.int64))


def grid_maps(con, model: str, layer: str, dataset: str, record_ids, batch_size: int = 16) -> np.ndarray:
    """(n, C, G, G) float32 maps of ``layer`` on the grid, for ``record_ids`` in the given order,
    ``batch_size`` images a forward pass (all k top images of a figure in one pass could exhaust
    the memory of a large model); ids that are not records of ``dataset`` are named."""
    session = session_of(con)
    adapter = _image_adapter(session, model)
    session.check_layers(model, [layer])
    batch_size = check_int("batch_size", batch_size, 1)
    ids = [check_int("record_ids: a record id", r, 0) for r in np.asarray(record_ids).ravel().tolist()]
    texts = session.texts(dataset, ids)
    missing = sorted(set(ids) - set(texts))
    if missing:
        raise DeepBaseError(f"record_ids: {len(missing)} id(s) are not records of dataset {dataset!r}: "
                            f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}")
    out = []
    with Retain(adapter.module, [layer]) as ret:
        for lo in range(0, len(ids), batch_size):
            enc = adapter.encode([texts[r] for r in ids[lo:lo + batch_size]])
            run_until_retained(adapter, enc, ret)    # the layer's own output, as extract stores it (settle())
            out.append(adapter.grid_maps(layer, ret[layer]).cpu().numpy())
    if not out:
        raise EmptyDatasetError(f"no records selected from dataset {dataset!r}")
    return np.concatenate(out, 0)


def unit_maxima(con, model: str, layer: str, dataset: str, record_ids=None, batch_size: int = 16):
    """(record ids, (n, C) maxima): each unit's largest grid activation on each image. One
    forward pass over the records, remembered by the session, keyed by the model's checksum and
    the records' ids and texts (a dataset replaced, or a record edited, is run again)."""
    session = session_of(con)
    adapter = _image_adapter(session, model)
    session.check_layers(model, [layer])
    batch_size = check_int("batch_size", batch_size, 1)
    ids = _selected_ids(session, dataset, record_ids)
    texts = store.q_scalar(con, "SELECT md5(string_agg(md5(text), ',' ORDER BY record_id)) FROM records "
                                "WHERE dataset = ? AND list_contains(?, record_id)", [dataset, ids.tolist()])
    key = (adapter.checksum, adapter.tokenization, layer, dataset, hashlib.sha256(ids.tobytes()).hexdigest(), texts)
    cache = session.__dict__.setdefault("_unit_maxima", {})
    if key in cache:
        return ids, cache[key]
    out = []
    bar = progress_bar(len(ids), f"rank images {layer}", "img", session.progress)
    with Retain(adapter.module, [layer]) as ret:
        for lo in range(0, len(ids), batch_size):
            chunk = [int(r) for r in ids[lo:lo + batch_size]]
            texts = session.texts(dataset, chunk)
            enc = adapter.encode([texts[r] for r in chunk])
            run_until_retained(adapter, enc, ret)   # not overwritten by a later in-place op (a ReLU6 after a BN)
            maps = adapter.grid_maps(layer, ret[layer])
            out.append(maps.amax(dim=(2, 3)).cpu().numpy())
            bar.update(len(chunk))
    bar.close()
    cache[key] = np.concatenate(out, 0)
    return ids, cache[key]


def top_images(con, model: str, layer: str, unit: int, dataset: str, k: int = 8, record_ids=None,
               batch_size: int = 16) -> list[dict]:
    """The ``k`` records on which ``unit`` reaches its largest activations: dicts with
    record_id, max_activation and the record's text, best first (ties: smaller record id)."""
    unit, k = check_int("unit", unit, 0), check_int("k", k, 1)
    ids, maxima = unit_maxima(con, model, layer, dataset, record_ids, batch_size)
    if not 0 <= int(unit) < maxima.shape[1]:
        raise DeepBaseError(f"unit {unit} is outside layer {layer!r} of model {model!r} "
                            f"(units 0..{maxima.shape[1] - 1})")
    col = maxima[:, int(unit)]
    order = np.lexsort((ids, -col))[: int(k)]
    texts = session_of(con).texts(dataset, ids[order])
    return [{"record_id": int(ids[i]), "max_activation": float(col[i]), "text": texts[int(ids[i])]} for i in order]


def unit_dissection(con, model: str, layer: str, unit: int, dataset: str | None = None,
                    query_id: int | None = None) -> dict | None:
    """The unit's Network Dissection result in ``scores``: best concept, IoU, threshold. From
    query ``query_id`` when given (None when that query scored no iou for the unit), else from
    the latest query with one (over ``dataset``, when given)."""
    row = store.q_one(con, """
        WITH mine AS (
            SELECT s.hypothesis, s.score, s.detail, s.query_id FROM scores s JOIN queries q USING (query_id)
            WHERE s.model = ? AND s.layer = ? AND s.unit = ? AND s.measure = 'iou'
              AND (CAST(? AS VARCHAR) IS NULL OR q.dataset = ?)
              AND (CAST(? AS INTEGER) IS NULL OR s.query_id = ?))
        SELECT hypothesis, score, detail FROM mine WHERE query_id = (SELECT max(query_id) FROM mine)
        ORDER BY score DESC NULLS LAST LIMIT 1""",
        [model, layer, int(unit), dataset, dataset, query_id, query_id])
    if row is None:
        return None
    detail = json.loads(row[2]) if row[2] else {}
    return {"concept": row[0], "iou": row[1], "threshold": detail.get("threshold")}


def cell_pixels(cells: np.ndarray, size: int) -> np.ndarray:
    """A (G, G) array of cell values spread over (size, size) pixels: each pixel takes the value of
    the cell its centre falls in (cell i covers pixels [i size/G, (i + 1) size/G))."""
    cells = np.asarray(cells)
    idx = np.minimum(((np.arange(size) + 0.5) * cells.shape[0] / size).astype(np.int64), cells.shape[0] - 1)
    idy = np.minimum(((np.arange(size) + 0.5) * cells.shape[1] / size).astype(np.int64), cells.shape[1] - 1)
    return cells[idx][:, idy]


def top_images_png(con, model: str, layer: str, unit: int, dataset: str, path: str, k: int = 8,
                   record_ids=None, threshold: float | None = None, columns: int | None = None,
                   batch_size: int = 16, query_id: int | None = None) -> dict:
    """Write a PNG grid of the ``k`` top-activating images of ``unit`` (see the module
    docstring) to ``path``; returns {'path', 'images': top_images(...), 'threshold', 'concept',
    'iou'}. The title and the outline come from the unit's iou score in query ``query_id`` when
    given (none when that query scored no iou), else from the latest query that has one."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DeepBaseError("top_images_png needs matplotlib: pip install -e '.[examples]' "
                            "(or pip install matplotlib)") from None
    # a Figure on its own Agg canvas, as figures.py draws: pyplot with matplotlib.use("Agg")
    # switched the caller's backend (a notebook's inline plots stopped showing) and kept the
    # figure in pyplot's global list when drawing it failed
    from .figures import _figure, plain  # names and descriptors drawn literally, never as mathtext
    if columns is not None:
        columns = check_int("columns", columns, 1)
    session = session_of(con)
    adapter = _image_adapter(session, model)
    top = top_images(con, model, layer, unit, dataset, k, record_ids, batch_size)
    found = unit_dissection(con, model, layer, unit, dataset, query_id)
    if threshold is None and found is not None:
        threshold = found["threshold"]
    ids = [t["record_id"] for t in top]
    maps = grid_maps(con, model, layer, dataset, ids, batch_size)[:, int(unit)]   # (k, G, G)
    texts = session.texts(dataset, ids)
    pixels = adapter.pixels([texts[r] for r in ids]).permute(0, 2, 3, 1).numpy()
    size = adapter.size
    heat = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(size, size), mode="bilinear",
                                           align_corners=False)[:, 0].numpy()
    lo, hi = float(maps.min()), float(maps.max())
    cols = columns or min(len(top), 4)
    rows = int(np.ceil(len(top) / cols))
    fig, axes = _figure((2.6 * cols, 2.8 * rows + 0.5), rows, cols)
    from ..corpora.images import describe
    for ax in axes.ravel():
        ax.axis("off")
    for i, t in enumerate(top):
        ax = axes.ravel()[i]
        ax.imshow(pixels[i])
        ax.imshow(heat[i], cmap="inferno", alpha=0.45, vmin=lo, vmax=hi if hi > lo else lo + 1)
        if threshold is not None and np.isfinite(threshold) and (maps[i] > threshold).any():
            # the cells the iou measure counts as firing (grid value above the threshold), each
            # drawn over its own pixels: the smooth heat's level set shrank a cell just above the
            # threshold to a dot, or to nothing, since bilinear never reaches a cell's value
            ax.contour(cell_pixels(maps[i] > threshold, size).astype(np.float64), levels=[0.5], colors="cyan",
                       linewidths=1.2)
        ax.set_title(plain(f"{describe(t['text'])}\nmax {t['max_activation']:.2f}"), fontsize=8)
    head = f"{model} {layer} unit {unit}"
    if found is not None and found["iou"] is not None:
        head += f": {found['concept']} (IoU {found['iou']:.3f})"
    fig.suptitle(plain(head), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return {"path": str(path), "images": top, "threshold": threshold,
            "concept": None if found is None else found["concept"], "iou": None if found is None else found["iou"]}

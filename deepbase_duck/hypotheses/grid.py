"""Hypotheses over image records: labels of the cells of a G x G grid laid on the image.

How images map onto the engine (text records label characters; image records label cells):

* an image record's text is a stable descriptor (a scene spec, a photo name, a path: see
  ``deepbase_duck.corpora.images``);
* its symbols are the G * G cells of a grid over the whole image, in row-major order: cell
  i = (row i // G, column i % G) is the symbol at ``pos`` i with the span [i, i + 1) (the
  ``ImageAdapter`` resamples every layer's feature map to G x G, so all layers share them);
* a ``GridHypothesis`` labels cells the way a text hypothesis labels characters: its labels are
  spans over cell indices, stored in the same ``labels`` table, and the unchanged alignment
  (``symbol_labels``) gives every symbol (cell) the label of its own cell.

A GridHypothesis function takes the record's text and returns one of:

* a 2-D array at any resolution (typically a mask at the image's own pixels): it is resampled to
  G x G by exact area averaging (each cell gets the mean of the pixels it covers, partial pixels
  weighted by their overlap; ``mask_to_grid``), and a binary hypothesis holds 1 in a cell whose
  coverage is at least ``coverage`` (default 0.5; its mask must hold 0/1 or booleans, as at the
  grid's own size: a 0/255 image mask is refused, not averaged); continuous values keep the mean;
* a (G, G) array or a flat (G * G,) array of cell values, taken as they are;
* spans ``(start, end[, value])`` over cell indices, as for text.

An array may be a numpy array, a torch tensor or a list of rows (of more than 3 values: rows of
2 or 3 read as spans, so return a mask at most 3 columns wide as a numpy array).

A grid is part of the positions' meaning, so it is part of the hypothesis' version (labels of
two grids never mix), and ``check_fit`` refuses to score grid hypotheses against a model whose
tokenisation lays a different grid (or none): tokenisations of image adapters read
``image-grid<G>:...`` (``grid_tokenization``).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from ..errors import DeepBaseError, HypothesisError
from .core import Hypothesis, _as_numpy, register

DEFAULT_GRID = 28
_GRID_TOK = re.compile(r"^image-grid(\d+):")


def grid_tokenization(grid: int, detail: str) -> str:
    """The tokenisation name of an image adapter laying a ``grid`` x ``grid`` grid."""
    return f"image-grid{int(grid)}:{detail}"


def grid_of(tokenization: str | None) -> int | None:
    """The grid size a tokenisation lays on images, or None for a text tokenisation."""
    m = _GRID_TOK.match(tokenization or "")
    return int(m.group(1)) if m else None


@functools.lru_cache(maxsize=64)
def _overlap(n: int, g: int) -> np.ndarray:
    """(g, n) integer matrix: g times the length of pixel j inside cell i, cells being
    [i n/g, (i + 1) n/g). In units of 1/g every edge is an integer (i n, j g), so the weights are
    exact, every row sums to n, and a 0/1 mask's covered area comes out as an exact integer
    (float edges i * (n / g) made a cell covered exactly half read 0.4999999999999997)."""
    i = np.arange(g, dtype=np.int64)[:, None]
    j = np.arange(n, dtype=np.int64)[None, :]
    w = np.minimum((i + 1) * n, (j + 1) * g) - np.maximum(i * n, j * g)
    out = np.clip(w, 0, None).astype(np.float64)
    out.setflags(write=False)
    return out


def area_resize(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resample a 2-D array (or (H, W, C)) to (height, width) by exact area averaging: each
    output cell is the mean of the input pixels it covers, partial pixels weighted by overlap.
    The weights are integers (``_overlap``) and the one division is by the cell area H * W (in
    the same units), so a 0/1 mask's coverage is its exact fraction correctly rounded: a cell
    covered exactly ``coverage`` reads ``coverage``, not a hair below it."""
    m = np.asarray(a, dtype=np.float64)
    if m.ndim not in (2, 3) or m.shape[0] == 0 or m.shape[1] == 0:
        raise HypothesisError(f"a mask must be a non-empty 2-D array, got shape {m.shape}")
    ry, rx = _overlap(m.shape[0], height), _overlap(m.shape[1], width)
    area = float(m.shape[0] * m.shape[1])
    if m.ndim == 2:
        return (ry @ m @ rx.T) / area
    return np.stack([ry @ m[:, :, c] @ rx.T for c in range(m.shape[2])], -1) / area


def mask_to_grid(mask: np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid) coverage of a 2-D mask (or mean of a 2-D array) over each cell."""
    return area_resize(mask, grid, grid)


@dataclass(eq=False)
class GridHypothesis(Hypothesis):
    """A hypothesis labelling the cells of a ``grid`` x ``grid`` grid (see the module docstring)."""

    grid: int = DEFAULT_GRID
    coverage: float = 0.5

    def __post_init__(self):
        import numbers
        g = self.grid
        if isinstance(g, bool) or not (isinstance(g, numbers.Integral) or (isinstance(g, float) and g.is_integer())) \
                or g < 1:
            # a grid of 2.5 was laid as 2 (and True as 1), labelling another grid than the model's
            raise HypothesisError(f"hypothesis {self.name!r}: grid must be a whole number >= 1, got {g!r}")
        c = self.coverage
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 < float(c) <= 1:
            raise HypothesisError(f"hypothesis {self.name!r}: coverage must be a number in (0, 1], got {c!r}")
        self.grid = int(g)
        # one text per coverage in version_settings: 1 and 1.0 (or a numpy float) label alike
        self.coverage = float(c)
        super().__post_init__()

    def version_settings(self) -> str:
        return f"grid={self.grid}|coverage={self.coverage}"

    def extent(self, text: str) -> int:
        return self.grid * self.grid

    def normalise(self, out, text: str, record):
        out = _as_numpy(out, f"hypothesis {self.name!r} on record {record}")     # a torch mask
        if isinstance(out, (list, tuple)) and out and all(isinstance(r, (list, tuple)) for r in out) \
                and len({len(r) for r in out}) == 1 and len(out[0]) > 3:
            out = np.asarray(out)            # a mask as a list of rows (rows of 2 or 3 values read as spans)
        if isinstance(out, np.ndarray) and out.ndim == 2:
            g = self.grid
            if out.shape != (g, g):
                if self.kind == "categorical":
                    raise HypothesisError(
                        f"hypothesis {self.name!r} on record {record}: a categorical map must be ({g}, {g}), "
                        f"got {out.shape}")
                if self.kind == "binary":
                    _check_binary_mask(out, f"hypothesis {self.name!r} on record {record}")
                cov = mask_to_grid(out, g)
                out = (cov >= self.coverage).astype(np.float64) if self.kind == "binary" else cov
            out = np.asarray(out).reshape(-1)
        return super().normalise(out, text, record)


def _check_binary_mask(mask: np.ndarray, where: str) -> None:
    """A binary mask to be resampled holds 0/1 or booleans only, as at the grid's own size: a
    0/255 image mask (PIL, OpenCV) averaged as it is would put every cell one pixel touches in
    the concept; NaN is no 0/1 either."""
    if mask.dtype == bool:
        return
    try:
        vals = np.unique(np.asarray(mask, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise HypothesisError(f"{where}: mask values are not numbers ({exc})") from None
    bad = vals[~np.isin(vals, (0.0, 1.0))]
    if len(bad):
        hint = " (a 0/255 image mask: pass mask > 0 or mask / 255)" if (bad == 255).any() else ""
        raise HypothesisError(
            f"{where}: a binary mask must hold 0/1 or booleans, got value {float(bad[0]):g} in a "
            f"{mask.shape[0]}x{mask.shape[1]} mask{hint}")


def check_fit(tokenization: str, hypotheses: list[dict], model: str = "?") -> None:
    """Refuse grid hypotheses on a model of another grid (or a text model), and text
    hypotheses on an image model. ``hypotheses``: resolved catalog descriptions with 'live'."""
    g_model = grid_of(tokenization)
    for h in hypotheses:
        live = h.get("live")
        if live is None:
            continue
        g_hyp = live.grid if isinstance(live, GridHypothesis) else None
        if g_hyp == g_model:
            continue
        if g_hyp is None:
            raise DeepBaseError(
                f"hypothesis {h['name']!r} labels characters of text, but model {model!r} reads images "
                f"(cells of a {g_model}x{g_model} grid); use a GridHypothesis")
        if g_model is None:
            raise DeepBaseError(
                f"hypothesis {h['name']!r} labels cells of a {g_hyp}x{g_hyp} image grid, but model {model!r} "
                f"has text symbols (tokenization {tokenization!r})")
        raise DeepBaseError(
            f"hypothesis {h['name']!r} labels a {g_hyp}x{g_hyp} grid, model {model!r} lays a "
            f"{g_model}x{g_model} grid; make the hypothesis with grid={g_model}")


# -- concept hypotheses over image records -------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def _concept_cells(text: str, grid: int, coverage: float) -> dict:
    """Packed cell bits of every concept annotated on a record (one render for all concepts)."""
    from ..corpora.images import all_concept_masks
    return {c: np.packbits(mask_to_grid(m, grid).reshape(-1) >= coverage)
            for c, m in all_concept_masks(text).items()}


def _concept_fn(text, concept, grid, coverage):
    from ..corpora.scenes import is_scene
    if not is_scene(text) and not concept.startswith("colour:"):
        from ..corpora.images import describe
        raise HypothesisError(f"concept {concept!r} is not annotated on {describe(text)!r}; "
                              "photos carry colour concepts only")
    cells = _concept_cells(text, grid, coverage)
    if concept not in cells:
        from ..corpora.images import describe
        raise HypothesisError(f"concept {concept!r} is not annotated on {describe(text)!r} (annotated there: "
                              f"{', '.join(cells)}); photos carry colour concepts only")
    return np.unpackbits(cells[concept])[:grid * grid].astype(np.float64)


def concept_hypothesis(concept: str, grid: int = DEFAULT_GRID, coverage: float = 0.5,
                       name: str | None = None, do_register: bool = True) -> GridHypothesis:
    """Binary GridHypothesis of a concept of ``deepbase_duck.corpora.images.concept_masks``
    ('colour:red', 'shape:disc', 'texture:dots'; exact on scenes, colour naming on photos),
    named after the concept and registered unless ``do_register`` is False."""
    from ..corpora.scenes import CONCEPTS
    if concept not in CONCEPTS:
        raise HypothesisError(f"unknown concept {concept!r}; concepts: {', '.join(CONCEPTS)}")
    fn = functools.partial(_concept_fn, concept=concept, grid=int(grid), coverage=float(coverage))
    h = GridHypothesis(name or concept, fn, "binary",
                       f"cells at least {coverage:.0%} covered by concept {concept} ({grid}x{grid} grid)",
                       grid=grid, coverage=coverage)
    return register(h) if do_register else h


def concept_hypotheses(concepts=None, grid: int = DEFAULT_GRID, coverage: float = 0.5) -> list[GridHypothesis]:
    """Register (and return) a concept hypothesis for each concept (None: every scene concept; a
    string: that one concept; an empty list: none, where it registered all 18)."""
    from ..corpora.scenes import CONCEPTS
    if concepts is None:
        concepts = CONCEPTS
    elif isinstance(concepts, str):              # not its characters, each an unknown concept
        concepts = [concepts]
    return [concept_hypothesis(c, grid, coverage) for c in concepts]

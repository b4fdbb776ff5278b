"""The inspector protocol and the registry of measures."""
from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import torch

from ..errors import DeepBaseError, HypothesisError, UnknownNameError

# Every finalize() returns at least these columns, in this order (extra columns may follow).
SCORE_SCHEMA = pa.schema([
    ("unit", pa.int32()),          # NULL for a score of the whole unit group
    ("hypothesis", pa.string()),
    ("measure", pa.string()),
    ("score", pa.float64()),
    ("n", pa.int64()),
    ("ci_low", pa.float64()),
    ("ci_high", pa.float64()),
    ("p_value", pa.float64()),
])

MEASURES: dict[str, type] = {}

_SCRATCH = threading.local()


def scratch(rows: int, cols: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """A (rows, cols) work buffer reused across calls in this thread (grow-only).

    Fresh multi-megabyte float64 tensors cost page faults on every batch; states that need a
    temporary copy of a batch write into this buffer instead. The contents are garbage on entry
    and must not be kept across calls."""
    key = (str(torch.device(device)), dtype)
    cache = getattr(_SCRATCH, "buffers", None)
    if cache is None:
        cache = _SCRATCH.buffers = {}
    buf = cache.get(key)
    need = rows * cols
    if buf is None or buf.numel() < need:
        buf = cache[key] = torch.empty(max(need, 1), dtype=dtype, device=device)
    return buf[:need].view(rows, cols)


def register_measure(cls):
    MEASURES[cls.measure] = cls
    return cls


def measure_class(name: str):
    try:
        return MEASURES[name]
    except KeyError:
        raise UnknownNameError("measure", name, MEASURES) from None


class InspectorState:
    """Base class. Subclasses set ``measure`` and ``accepts`` (hypothesis kinds they score) and
    implement update / combine / finalize. ``hypotheses`` is a list of dicts with at least
    'name' and 'kind' (and 'categories' for categorical ones)."""

    measure: str = "?"
    accepts: tuple[str, ...] = ("binary", "continuous")
    # True: finalize() scores every unit (one row per unit and hypothesis, what permutation
    # p-values permute); False: the scores are of the unit group as a whole (unit NULL: probe)
    unit_level: bool = True

    def __init__(self, width: int, hypotheses: list[dict], device: str | torch.device = "cpu", **params):
        if width <= 0:
            raise DeepBaseError(f"{self.measure}: a unit group needs at least one unit, got width {width}")
        for h in hypotheses:
            if h["kind"] not in self.accepts:
                raise DeepBaseError(
                    f"measure {self.measure!r} does not take {h['kind']} hypotheses (hypothesis "
                    f"{h['name']!r}); it takes: {', '.join(self.accepts)}")
        if params:
            import inspect as _inspect
            # the named keyword parameters of the class's __init__ chain: object's (*args,
            # **kwargs) and every *args / **params pass-through are not parameters of the measure
            valid = [p.name for c in type(self).__mro__ if c is not object and "__init__" in vars(c)
                     for p in _inspect.signature(c.__init__).parameters.values()
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                     and p.name not in ("self", "width", "hypotheses", "device")]
            raise DeepBaseError(f"measure {self.measure!r}: unknown parameter(s) {', '.join(sorted(params))}; "
                                f"valid: {', '.join(sorted(set(valid))) or '(none)'}")
        self.width = int(width)
        self.hypotheses = list(hypotheses)
        self.names = [h["name"] for h in hypotheses]
        self.device = torch.device(device)

    def update(self, acts: torch.Tensor, labels: torch.Tensor, record_ids: torch.Tensor | None = None) -> None:
        """Fold in a batch: ``acts`` (n, width) float, ``labels`` (n, H) float64 with NaN where a
        symbol has no label (categorical labels are codes 0..K-1), ``record_ids`` (n,) int64, the
        record of each row (measures that split train/test by record use it)."""
        raise NotImplementedError  # pragma: no cover

    def combine(self, other: "InspectorState") -> "InspectorState":  # pragma: no cover
        raise NotImplementedError

    def finalize(self) -> pa.Table:  # pragma: no cover
        raise NotImplementedError

    def max_error(self) -> float:
        """Largest half-width of the confidence intervals so far (inf when unknown)."""
        return float("inf")

    def unit_major_rows(self, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """score_rows() of a (width, H) score array laid out as score_table lays out finalize()
        (unit-major): for the states that override score_rows with their scores alone."""
        W, H = score.shape
        if getattr(self, "_row_layout", None) is None or len(self._row_layout[0]) != W * H:
            self._row_layout = (np.repeat(np.arange(W, dtype=np.int64), H),
                                np.array(list(self.names) * W, dtype=object))
        return (*self._row_layout, score.reshape(-1))

    def score_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit, hypothesis, score) of every finalize() row, in its order: unit int64 (-1 for a
        row without a unit), hypothesis names (object), score float64 (NaN for NULL). What the
        progressive scan's stop rules bound and rank after every window; a state whose finalize()
        does more (p-values, intervals, tables) may override it with the scores alone."""
        t = self.finalize()
        unit = np.array([-1 if u is None else u for u in t.column("unit").to_pylist()], dtype=np.int64)
        hyp = np.array(t.column("hypothesis").to_pylist(), dtype=object)
        score = np.array([np.nan if v is None else v for v in t.column("score").to_pylist()], dtype=np.float64)
        return unit, hyp, score

    def read_labels(self, labels: torch.Tensor, binary01: bool = True) -> torch.Tensor:
        """A batch's labels as the measures that take raw label values (corr, spearman) read them:
        float64 on the state's device (bool and integer labels converted); a binary hypothesis'
        labels as 0/1, any non-zero label 1 (as pointbiserial, mi, ap and the dissection measures
        read them, so corr's r on a binary hypothesis is pointbiserial's whatever the coding); an
        infinite label of a continuous hypothesis refused with a HypothesisError naming it (a
        hypothesis' labels are finite: one inf made every unit's r NULL). ``binary01=False``
        leaves binary labels as they are (the probe refuses one that is not 0 or 1)."""
        y = labels.to(self.device, torch.float64)
        kinds = getattr(self, "_label_kinds", None)
        if kinds is None or kinds[0].device != y.device:
            b = torch.tensor([h["kind"] == "binary" for h in self.hypotheses], dtype=torch.bool, device=y.device)
            c = torch.tensor([h["kind"] == "continuous" for h in self.hypotheses], dtype=torch.bool, device=y.device)
            kinds = self._label_kinds = (b, c, bool(b.any()), bool(c.any()))
        binary, continuous, any_b, any_c = kinds
        if y.ndim != 2 or y.shape[1] != len(self.names):
            return y                                  # the caller's shape check names the problem
        if any_c:
            bad = torch.isinf(y) & continuous[None, :]
            if bool(bad.any()):
                i, j = (int(v) for v in torch.nonzero(bad)[0])
                raise HypothesisError(f"measure {self.measure!r}: continuous hypothesis {self.names[j]!r} has an "
                                      f"infinite label ({float(y[i, j])!r}) at row {i}; labels must be finite "
                                      "(NaN: no label)")
        if any_b and binary01:
            y = torch.where(binary[None, :] & ~torch.isnan(y), (y != 0).to(torch.float64), y)
        return y

    def _check_combine(self, other):
        if type(other) is not type(self) or other.width != self.width or other.names != self.names:
            raise DeepBaseError(f"cannot combine {type(other).__name__} over {other.names} with "
                                f"{type(self).__name__} over {self.names}")


def check_batch(state: "InspectorState", acts, labels, record_ids=None):
    """The batch's labels as (n, hypotheses), after refusing a batch whose shapes do not fit
    ``state`` -- activations (n, width), labels (n, hypotheses) or (n, 1) (one column: the same
    labels for every hypothesis, as broadcasting reads it), record ids (n,) -- with a
    DeepBaseError naming the measure and the shapes, before any of the state changes (as the
    probe checks its batches): a mismatch used to surface as a torch RuntimeError half-way
    through an update, leaving part of the batch in the state, or to be taken silently
    (record ids of the wrong length, labels of the wrong width)."""
    W, H = state.width, len(state.names)
    if acts.ndim != 2 or acts.shape[1] != W:
        raise DeepBaseError(f"{state.measure}: activations of shape {tuple(acts.shape)}, expected (n, {W})")
    n = acts.shape[0]
    if labels.ndim != 2 or labels.shape[0] != n or labels.shape[1] not in (1, H):
        raise DeepBaseError(f"{state.measure}: labels of shape {tuple(labels.shape)}, expected ({n}, {H}) "
                            f"(one column per hypothesis: {', '.join(state.names)})")
    if record_ids is not None:
        k = int(torch.as_tensor(record_ids).numel())
        if k != n:
            raise DeepBaseError(f"{state.measure}: {k} record ids for {n} rows")
    return labels.expand(n, H) if labels.shape[1] != H else labels

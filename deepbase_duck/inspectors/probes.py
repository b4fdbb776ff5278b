"""Linear probes for a unit group: held-out accuracy / R2, probe-weight neuron rankings, top-k
re-training and control-task selectivity.

Split. A record is in the test split when ``u(record_id) < test_fraction``, where
``u = (mix(record_id, seed ^ SPLIT_SALT) >> 11) * 2**-53`` and ``mix(a, b) =
splitmix64(a ^ splitmix64(b))`` on uint64 (splitmix64: Steele, Lea & Flood 2014, the finaliser
of Vigna's reference code; see :func:`splitmix64`). All rows of a record land in the same split,
whatever the batching. :func:`test_split_mask` reproduces the split outside the state.

Sample. Per split the state keeps a bounded, mergeable sample of at most ``max_rows`` rows
(activations as float32, labels as float64): the rows with the smallest 64-bit keys, where
``key = splitmix64(mix(record_id, seed) ^ content)`` and ``content`` is a 62-bit hash of the row
itself (the float32 bit patterns of its activations and the float64 bit patterns of its labels,
NaN and -0.0 canonicalised, two modular polynomial hashes mod 2**31-1 with seeded coefficients
computed in exact int64 arithmetic on the state's device). The key identifies a row within its
record without needing a global row position, so it does not depend on how the rows were
batched: ``update`` over k batches + ``combine`` keeps the smallest keys of the union, which is
exactly the one-shot sample (kept sorted by key, so the training data are identical too).
Identical rows of the same record share a key and are kept or dropped together.

Model ("model merging", DeepBase). At finalize all hypotheses of the group are trained together:
features are standardised with the train-split mean and (population) standard deviation, one
weight matrix holds every head -- a softmax head (multinomial logistic regression) per categorical
hypothesis, over the classes that occur in its labels, and a single-logit head (binomial logistic
regression) per hypothesis with exactly two classes (every binary one) -- and every head's loss is
the mean over the rows where that hypothesis has a label (masked loss, computed for all heads at
once with per-row weights 1/n_h, 0 off the head's rows), so a NaN label removes a row from that
head only. The objective is

    sum_h [ mean_rows_h CE_h ] + sum_h l2_h/2 ||W_h||_2^2 + l1 ||W||_1   (intercepts not penalised)

with l2_h = l2 for a softmax head, i.e. sklearn's multinomial ``LogisticRegression(C=1/(n_h
l2))``, and l2_h = l2/2 for a single-logit head, i.e. sklearn's binomial ``LogisticRegression(C=
2/(n_h l2))``: this is exactly the two-class softmax with penalty l2 at its optimum, whose two
weight vectors are opposite, v1 = -v0 = w/2 (so l2/2 (|v0|^2 + |v1|^2) = l2/4 |w|^2 and l1 (|v0|_1
+ |v1|_1) = l1 |w|_1); a two-class head is reported in that two-column form, (-w/2, w/2) and
(-b/2, b/2). Gradients are analytic (no autograd graph); weights and logits are kept transposed
(heads x units, heads x rows), the faster layout for these products. Without ``l1`` the objective,
a sum of per-head terms, is minimised by L-BFGS run per head in lockstep (see ``_lbfgs``: own
curvature memory, Armijo backtracking line search and stopping rule per head, one shared pair of
matrix products per evaluation for all heads; at most ``max_epochs`` iterations), stopping a
head when its max |gradient| <= 1e-4 or its loss or max |step| changes by <= 1e-7 (in float64 and
float32 alike: the gradient tolerance of scikit-learn's lbfgs, tol = 1e-4); with ``l1``
by FISTA (proximal gradient with backtracking, soft-thresholding of W, adaptive restart), stopping
when the objective changes by less than ``tol`` (relative) for ``patience`` consecutive epochs or
after ``max_epochs`` epochs. Continuous
hypotheses get a ridge head solved in closed form (float64 normal equations on the standardised
features, centred over the head's rows: exactly sklearn's ``Ridge(alpha)``, with ``alpha =
ridge_alpha`` or ``l2 * n_h``; at ``alpha = 0`` the minimum-norm least-squares solution, sklearn's
``LinearRegression``, leaving out directions within rounding of a linear dependence of the units,
see ``_min_norm_solve``); with ``l1 > 0`` they join the FISTA loop as elastic-net heads (loss
``mean (y - xw - b)^2 / 2 + l1 |w|_1 + lam/2 |w|^2`` with ``lam = ridge_alpha / n_h`` or ``l2``:
sklearn's ``ElasticNet(alpha=l1 + lam, l1_ratio=l1 / (l1 + lam))``). Training runs in float64
unless the train sample has more than 2**23 cells, then in float32 (the ridge heads always solve
float64 normal equations).

Scores. ``probe`` rows (unit NULL): held-out accuracy with a Wilson interval and the one-sided
binomial p-value of beating the test-split majority-class rate (conservative, as that rate is at
least the accuracy of any constant predictor), or held-out R2 (sklearn's ``r2_score``; interval
and p-value NULL; NULL with fewer than 2 labelled test rows, as r2_score's NaN, or without a
labelled training row). Test labels all equal leave R2 undefined (0 / 0 or x / 0); it is then
r2_score's value under its default ``force_finite=True``: 1.0 when every prediction equals the
label (a probe trained on the same constant predicts it exactly: the ridge head's intercept is
the mean taken about the first label), 0.0 otherwise. "All equal" is exact equality of the
values: sklearn's own denominator there can be rounding (labels [0.1, 0.1, 0.1] have a float
mean of 0.10000000000000002, and r2_score gives -5.8 for predictions of exactly 0.1).
Extra columns: metric, macro_f1, majority, n_train, n_test.
``probe_weight`` rows (one per unit): NeuroX-style weight mass -- for each class, |w| of each
unit normalised over the units; the unit's score is its mass averaged over the classes with
training rows and some weight (a ridge head has one "class"), so the scores sum to 1; ``rank``
1 is the heaviest unit. A class seen only in the test split (possible with ``min_per_class=0``)
keeps its softmax column, so its test rows count as errors, but its weights are the optimiser's
residue about 0, not evidence: it is left out of the average (it took 1/C of the mass and
reordered the units by noise), and so is a class whose weights are all 0 (with ``l1``, one
class' column often is: averaged in, it took 1/C off every score). A probe without any weight
(every unit constant, or ``l1`` zeroed them all) has score and rank NULL on every unit.
``probe_class_weight`` rows (one per unit and class of a categorical head with 3+ classes,
hypothesis ``'<name>=<class>'``): the unit's weight mass for that class alone, ranked within the
class (NeuroX's top neurons per tag; score and rank NULL for a class without training rows or
without weight); control heads get none.
``probe_topk`` rows (unit NULL, column ``k``): the held-out score of the group's probes re-trained
(same penalties, warm-started from the full probe restricted to the units, so k = width
reproduces it) on each hypothesis' top-k units; the re-fit multiplies only the union of the
heads' top-k columns of the features, each head masked to its own k.
``selectivity`` rows (unit NULL): for ``control_of = {control: real}``, accuracy(real) -
accuracy(control) (Hewitt & Liang 2019); :func:`control_labels` makes the control labels.
Wilson ends are widened to include the score (rounding at accuracy 1 or 0 must not exclude it).

Non-finite activations (as in corr, where such a unit scores NULL): a unit with a NaN or infinite
activation anywhere in the stream so far (in float32, the sample's type: a float64 beyond its
range counts as infinite) is left out of every probe -- its standardised feature is 0, so its
weights stay 0 and the probes are those of the other units -- and its ``probe_weight`` and
``probe_class_weight`` rows have score and rank NULL (the other units are ranked 1.. among
themselves, and top-k re-fits take them first). With no finite unit left, the ``probe``,
``probe_topk`` and ``selectivity`` scores (and their intervals, p-values, macro_f1) are NULL.

Labels: a binary hypothesis' labels must be 0 or 1, a categorical one's codes 0..K-1 (others
are refused at finalize), a continuous one's finite (an infinite label is refused by update).

One class: a classification hypothesis whose labels hold a single class (a binary one all 0 or
all 1 included), or none, is refused with an error saying so, and so is one with fewer than two
classes among its training rows (possible with ``min_per_class=0``); no probe is trained on it.
The error says what to do; for a control task (``control_of``) it names the task as the control
of its hypothesis, whose class draws per word type can leave a rare class on few symbols or none.
Where the train sample holds max_rows of more train rows seen, a rare class' refusal says so and
points at max_rows: more records cannot add to the sample.
A continuous hypothesis with no labelled training row (NaN everywhere, say) trains no probe: its
``probe`` score is NULL and so are the score and rank of its ``probe_weight`` rows
(not weights of 0 ranked 1..width).

Held-out loss (the plateau rule of progressive scans, engine/inspect.py StopRule):
``probe_model()`` is the main fit above (no top-k re-fits) with its standardisation;
``heldout_loss(model)`` scores such a model, possibly fit earlier in the scan, on the current
test split (mean cross-entropy in nats, or squared error for a ridge head; NaN for a continuous
head that had no labelled training row, which trained no probe), and
``constant_loss()`` is the loss of the best constant prediction there (label entropy, variance).

Exact: the split, the sample, the merge, the ridge heads. Approximate: the logistic and
elastic-net optima (iterative, up to the stopping rule), hence accuracies may differ from
another solver by a few borderline test rows.
"""
from __future__ import annotations

import hashlib
import math
import numbers

import numpy as np
import pyarrow as pa
import torch
from scipy import stats

from ..errors import BadParameterError, DeepBaseError, check_float, check_integer
from .base import InspectorState, SCORE_SCHEMA, register_measure

F64 = torch.float64

_SPLIT_SALT = 0x5EED_0F_7E57_5EED
_CONTROL_SALT = 0xC0_47_20_1C_0A_B5_E1_ED
_HASH_P = (1 << 31) - 1                 # Mersenne prime for the content hash
_NAN_LABEL = -7.777e300                 # stands for NaN in the content hash
_FLOAT64_CELLS = 1 << 23                # train in float64 up to this many sample cells
_LBFGS_TOL_GRAD = 1e-4                  # L-BFGS stops when max |gradient| <= this
_LBFGS_TOL_CHANGE = 1e-7                # ... or when the loss or max |step| changes by <= this
_CHUNK = 1 << 16                        # rows per chunk of the float64 passes over a sample
_RIDGE_RCOND = 1e-10                    # unpenalised least squares: eigenvalues of G kept above this x the largest

EXTRA_SCHEMA = pa.schema([
    ("metric", pa.string()),
    ("macro_f1", pa.float64()),
    ("majority", pa.float64()),
    ("n_train", pa.int64()),
    ("n_test", pa.int64()),
    ("rank", pa.int32()),
    ("k", pa.int32()),
])
PROBE_SCHEMA = pa.schema(list(SCORE_SCHEMA) + list(EXTRA_SCHEMA))


# ------------------------------------------------------------------------------- hashing
def _as_u64(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == np.uint64:
        return a.copy()
    if a.dtype.kind not in "iub":
        raise DeepBaseError(f"expected integer ids, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64).view(np.uint64).copy()


def splitmix64(x) -> np.ndarray:
    """splitmix64 of every element (uint64, wrapping arithmetic)::

        z = x + 0x9E3779B97F4A7C15
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)
    """
    z = _as_u64(np.atleast_1d(x))
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def _mix(a, b) -> np.ndarray:
    """splitmix64(a ^ splitmix64(b)), b a scalar or an array broadcastable to a."""
    return splitmix64(_as_u64(np.atleast_1d(a)) ^ splitmix64(_u64(b) if np.isscalar(b) else b))


def _u64(v: int) -> np.ndarray:
    return np.array([int(v) & ((1 << 64) - 1)], dtype=np.uint64)


def _unit_float(h: np.ndarray) -> np.ndarray:
    """uint64 -> float64 uniform in [0, 1) (top 53 bits)."""
    return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def test_split_mask(record_ids, seed: int = 0, test_fraction: float = 0.2) -> np.ndarray:
    """Boolean array: True where the record is in the test split."""
    rid = np.asarray(record_ids, dtype=np.int64)
    if rid.size == 0:
        return np.zeros(0, dtype=bool)
    return _unit_float(_mix(rid, int(seed) ^ _SPLIT_SALT)) < test_fraction


test_split_mask.__test__ = False  # not a pytest test


# ------------------------------------------------------------------------- control tasks
def control_labels(word_type_ids: np.ndarray, n_classes: int, class_frequencies, seed: int = 0) -> np.ndarray:
    """Control-task labels (Hewitt & Liang 2019): every word type gets one class, drawn from the
    empirical class distribution ``class_frequencies`` (counts or rates, one per class), and each
    symbol gets its type's class. The draw for a type is ``u = mix(type_id, seed)`` mapped through
    the cumulative distribution, so it depends only on the type and the seed (not on which or how
    many other types are seen, nor on batching). Integer type ids are hashed directly; other ids
    (strings) through the first 8 bytes of their BLAKE2b digest. Returns int64 codes."""
    n_classes = int(n_classes)
    freq = np.asarray(class_frequencies, dtype=np.float64).reshape(-1)
    if freq.size != n_classes:
        raise DeepBaseError(f"control_labels: {freq.size} class frequencies for {n_classes} classes")
    if n_classes < 1 or np.any(freq < 0) or not np.isfinite(freq).all() or freq.sum() <= 0:
        raise DeepBaseError("control_labels: class frequencies must be finite, >= 0 and not all 0")
    cdf = np.cumsum(freq / freq.sum())
    cdf[-1] = 1.0
    ids = np.asarray(word_type_ids)
    if ids.size == 0:
        return np.zeros(ids.shape, dtype=np.int64)
    salt = int(seed) ^ _CONTROL_SALT
    if ids.dtype.kind in "iub":
        h = _mix(ids.reshape(-1), salt)
    else:
        uniq, inv = np.unique(ids.reshape(-1).astype(str), return_inverse=True)
        hu = np.array([int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")
                       for s in uniq], dtype=np.uint64)
        h = _mix(hu, salt)[inv.reshape(-1)]
    lab = np.searchsorted(cdf, _unit_float(h), side="right")
    return np.minimum(lab, n_classes - 1).astype(np.int64).reshape(ids.shape)


def selectivity(acc, control_acc):
    """Selectivity = accuracy on the real task - accuracy on its control task (NaN if either is
    missing). Works on scalars and arrays."""
    a = np.asarray(np.nan if acc is None else acc, dtype=np.float64)
    c = np.asarray(np.nan if control_acc is None else control_acc, dtype=np.float64)
    out = a - c
    return float(out) if out.ndim == 0 else out


def wilson_interval(k, n, confidence: float = 0.95):
    """Wilson score interval for k successes in n trials (NaN when n == 0). The ends are widened
    to include k / n: at k = n (or 0) the upper (lower) end is exactly 1 (0) in exact arithmetic,
    and rounding must not put it below (above) the score, as for dissection's and ap's."""
    if n <= 0:
        return math.nan, math.nan
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return min(max(0.0, centre - half), p), max(min(1.0, centre + half), p)


def probe_topk(topk) -> tuple[int, ...]:
    """The ``topk`` parameter as a tuple of unit counts >= 1: None or () for no top-k re-fits, one
    whole number for one k, or a list of them."""
    if topk is None:
        return ()
    if isinstance(topk, numbers.Real) and not isinstance(topk, bool):
        topk = [topk]
    if isinstance(topk, (str, bytes, dict)) or not hasattr(topk, "__iter__"):
        raise BadParameterError(f"probe: topk must be a whole number >= 1 or a list of them, got {topk!r}")
    return tuple(check_integer("probe: topk", k, 1) for k in topk)


# ----------------------------------------------------------------------------- the state
@register_measure
class ProbeState(InspectorState):
    measure = "probe"
    accepts = ("binary", "categorical", "continuous")
    unit_level = False      # the probe rows score the whole group (unit NULL)

    def __init__(self, width, hypotheses, device="cpu", *, test_fraction: float = 0.2,
                 max_rows: int = 200_000, seed: int = 0, l1: float = 0.0, l2: float = 1e-3,
                 ridge_alpha: float | None = None, min_per_class: int = 5,
                 topk=(1, 5, 10, 50), control_of: dict | None = None, max_epochs: int = 500,
                 tol: float = 1e-7, patience: int = 10, confidence: float = 0.95, **params):
        super().__init__(width, hypotheses, device, **params)
        # every parameter checked before use: a NaN penalty or no training epoch would give a
        # probe that looks trained; whole numbers may come as floats (2.0), nothing else
        self.test_fraction = check_float("probe: test_fraction", test_fraction, 0, 1, open_low=True,
                                         open_high=True)
        self.max_rows = check_integer("probe: max_rows", max_rows, 1)
        self.seed = check_integer("probe: seed", seed, 0)
        self.l1, self.l2 = check_float("probe: l1", l1, 0), check_float("probe: l2", l2, 0)
        self.ridge_alpha = None if ridge_alpha is None else check_float("probe: ridge_alpha", ridge_alpha, 0)
        self.min_per_class = check_integer("probe: min_per_class", min_per_class, 0)
        self.topk = probe_topk(topk)
        self.max_epochs = check_integer("probe: max_epochs", max_epochs, 1)
        self.tol = check_float("probe: tol", tol, 0)
        self.patience = check_integer("probe: patience", patience, 1)
        self.confidence = check_float("probe: confidence", confidence, 0, 1, open_low=True, open_high=True)
        self.control_of = dict(control_of or {})
        for c, r in self.control_of.items():
            for nm in (c, r):
                if nm not in self.names:
                    raise DeepBaseError(f"probe: control_of names hypothesis {nm!r}, which is not in "
                                        f"this group ({', '.join(self.names)})")
            for nm in (c, r):
                if self.hypotheses[self.names.index(nm)]["kind"] == "continuous":
                    raise DeepBaseError(f"probe: control task {c!r} -> {r!r}: hypothesis {nm!r} is "
                                        "continuous; selectivity needs classification hypotheses")
        H = len(self.names)
        rng = np.random.default_rng(int(splitmix64(self.seed ^ 0xC0FFEE)[0]))
        ncols = self.width + 2 * H
        self._c1 = torch.as_tensor(rng.integers(1, _HASH_P, ncols), dtype=torch.int64, device=self.device)
        self._c2 = torch.as_tensor(rng.integers(1, _HASH_P, ncols), dtype=torch.int64, device=self.device)
        self._buf = {"train": [], "test": []}
        self._pending = {"train": 0, "test": 0}
        self._seen = {"train": 0, "test": 0}      # rows of each split seen, sampled or not
        self._auto_id = 0
        self._fitted = None
        # units whose activations were all finite (as float32, the sample's type) so far
        self.finite = torch.ones(self.width, dtype=torch.bool, device=self.device)

    # -- sampling ------------------------------------------------------------------------
    def _content_hash(self, acts32: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        a = (acts32 + 0.0).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        lab = torch.nan_to_num(labels, nan=_NAN_LABEL) + 0.0
        lb = lab.contiguous().view(torch.int64)
        v = torch.cat([a, lb & 0xFFFFFFFF, (lb >> 32) & 0xFFFFFFFF], 1) % _HASH_P
        h1 = ((v * self._c1) % _HASH_P).sum(1) % _HASH_P
        h2 = ((v * self._c2) % _HASH_P).sum(1) % _HASH_P
        return (h1 * (1 << 31) + h2).cpu().numpy().view(np.uint64)

    def row_keys(self, acts: torch.Tensor, labels: torch.Tensor, record_ids) -> torch.Tensor:
        """The sample keys of a batch, as order-preserving signed int64 (on the state's device)."""
        acts32 = acts.to(self.device, torch.float32)
        lab = labels.to(self.device, F64)
        rid = np.asarray(torch.as_tensor(record_ids).cpu().numpy(), dtype=np.int64)
        key = splitmix64(_mix(rid, self.seed) ^ self._content_hash(acts32, lab))
        signed = (key ^ np.uint64(1 << 63)).view(np.int64)
        return torch.as_tensor(signed, device=self.device)

    def update(self, acts: torch.Tensor, labels: torch.Tensor, record_ids: torch.Tensor | None = None) -> None:
        n = acts.shape[0]
        if acts.ndim != 2 or acts.shape[1] != self.width:
            raise DeepBaseError(f"probe: activations of shape {tuple(acts.shape)}, expected (n, {self.width})")
        if labels.ndim != 2 or labels.shape != (n, len(self.names)):
            raise DeepBaseError(f"probe: labels of shape {tuple(labels.shape)}, expected ({n}, {len(self.names)})")
        if n == 0:
            return
        lab = self.read_labels(labels.detach(), binary01=False)   # an infinite continuous label refused
        if record_ids is None:   # every row its own record (not batching-invariant across states)
            record_ids = torch.arange(self._auto_id, self._auto_id + n, dtype=torch.int64)
            self._auto_id += n
        rid = np.asarray(torch.as_tensor(record_ids).cpu().numpy(), dtype=np.int64).reshape(-1)
        if rid.shape[0] != n:
            raise DeepBaseError(f"probe: {rid.shape[0]} record ids for {n} rows")
        acts32 = acts.detach().to(self.device, torch.float32)
        self.finite &= torch.isfinite(acts32).all(0)
        keys = self.row_keys(acts32, lab, rid)
        is_test = torch.as_tensor(test_split_mask(rid, self.seed, self.test_fraction), device=self.device)
        for split, sel in (("test", is_test), ("train", ~is_test)):
            idx = torch.nonzero(sel).reshape(-1)
            if idx.numel() == 0:
                continue
            self._buf[split].append((keys[idx], acts32[idx], lab[idx]))
            self._pending[split] += int(idx.numel())
            self._seen[split] += int(idx.numel())
            if self._pending[split] > 2 * self.max_rows:
                self._compact(split)
        self._fitted = None

    def _compact(self, split: str) -> None:
        chunks = self._buf[split]
        if not chunks:
            return
        keys = torch.cat([c[0] for c in chunks])
        acts = torch.cat([c[1] for c in chunks])
        lab = torch.cat([c[2] for c in chunks])
        order = torch.sort(keys, stable=True).indices[: self.max_rows]
        self._buf[split] = [(keys[order], acts[order], lab[order])]
        self._pending[split] = int(order.numel())

    def sample(self, split: str):
        """(keys, acts float32, labels float64) of the kept rows of ``split`` ('train' | 'test'),
        sorted by key."""
        self._compact(split)
        if not self._buf[split]:
            H = len(self.names)
            return (torch.zeros(0, dtype=torch.int64, device=self.device),
                    torch.zeros(0, self.width, dtype=torch.float32, device=self.device),
                    torch.zeros(0, H, dtype=F64, device=self.device))
        return self._buf[split][0]

    def combine(self, other: "ProbeState") -> "ProbeState":
        self._check_combine(other)
        for attr in ("seed", "test_fraction", "max_rows"):
            if getattr(other, attr) != getattr(self, attr):
                raise DeepBaseError(f"probe: cannot combine states with different {attr} "
                                    f"({getattr(other, attr)} vs {getattr(self, attr)})")
        for split in ("train", "test"):
            for k, a, l in other._buf[split]:
                self._buf[split].append((k.to(self.device), a.to(self.device), l.to(self.device)))
                self._pending[split] += int(k.numel())
            self._seen[split] += other._seen[split]
            if self._pending[split] > 2 * self.max_rows:
                self._compact(split)
        self.finite &= other.finite.to(self.device)
        self._fitted = None
        return self

    def max_error(self) -> float:
        """Half-width of the Wilson interval at p = 1/2 (the widest) for the classification
        hypothesis with the fewest labelled test rows; inf if the group has a continuous one."""
        if any(h["kind"] == "continuous" for h in self.hypotheses):
            return float("inf")
        _, _, lab = self.sample("test")
        worst = 0.0
        for j in range(len(self.names)):
            n = int((~torch.isnan(lab[:, j])).sum())
            if n == 0:
                return float("inf")
            lo, hi = wilson_interval(n / 2, n, self.confidence)
            worst = max(worst, (hi - lo) / 2)
        return worst

    # -- training ------------------------------------------------------------------------
    def _heads(self, ytr: torch.Tensor, yte: torch.Tensor) -> list[dict]:
        heads = []
        for j, h in enumerate(self.hypotheses):
            name, kind = h["name"], h["kind"]
            tr_rows = torch.nonzero(~torch.isnan(ytr[:, j])).reshape(-1)
            te_rows = torch.nonzero(~torch.isnan(yte[:, j])).reshape(-1)
            head = {"name": name, "kind": kind, "col": j, "tr_rows": tr_rows, "te_rows": te_rows,
                    "ytr": ytr[tr_rows, j], "yte": yte[te_rows, j]}
            if kind == "continuous":
                head["type"] = "ridge"
                heads.append(head)
                continue
            both = torch.cat([head["ytr"], head["yte"]])
            if kind == "binary":
                bad = (both != 0) & (both != 1)
                ncat, catnames = 2, [0, 1]
            else:
                cats = h.get("categories")
                if not cats:
                    raise DeepBaseError(f"probe: categorical hypothesis {name!r} has no categories")
                ncat, catnames = len(cats), list(cats)
                bad = (both != torch.round(both)) | (both < 0) | (both >= ncat)
            if bool(bad.any()):
                v = float(both[bad][0])
                raise DeepBaseError(f"probe: hypothesis {name!r} has label {v!r}, expected "
                                    f"{'0 or 1' if kind == 'binary' else f'a code in 0..{ncat - 1}'}")
            # the classes that occur in the labels (binary ones too: all 0 or all 1 is one class)
            present = sorted(int(c) for c in torch.unique(both).cpu().tolist())
            counts = torch.bincount(head["ytr"].to(torch.int64), minlength=ncat).cpu().numpy()
            # a control task (inspect's control=True) is no hypothesis the user named, and its
            # classes are drawn per word type: the refusals say so and give the ways on that work
            real = self.control_of.get(name)
            if real is not None:
                who = f"control task {name!r} of hypothesis {real!r}"
                why = (f" (its labels are drawn per word type, one class per type from {real!r}'s class "
                       "frequencies, so a rare class falls on the symbols of few types or of none)")
                way = "select more records (more word types), or run without control=True"
            else:
                who, why = f"hypothesis {name!r}", ""
                way = (f"select records where another class of it occurs too, or leave {name!r} out of the "
                       "probe query (a layer's probe trains all its hypotheses together)")
            if not present:
                if real is None:
                    way = f"select records where it has labels, or leave {name!r} out of the probe query"
                raise DeepBaseError(f"probe: {who} has no labelled rows; a probe needs two classes: {way}")
            if len(present) < 2:
                raise DeepBaseError(f"probe: {who} has a single class {catnames[present[0]]!r} in its labels; "
                                    f"a probe needs two{why}: {way}")
            seen = self._seen["train"]
            if seen > self.max_rows:
                # the sample keeps max_rows of the rows seen: more records do not add to it
                way = (f"raise max_rows (the train sample keeps max_rows={self.max_rows} of the {seen} train "
                       f"rows seen; inspect(..., probe={{'max_rows': {seen}}}) keeps them all)")
            for c in present:
                if counts[c] < self.min_per_class:
                    fix = (way if seen > self.max_rows
                           else "select more records, run without control=True" if real is not None
                           else "select more records, leave the class out of the hypothesis")
                    raise DeepBaseError(
                        f"probe: {who}: class {catnames[c]!r} (code {c}) has "
                        f"{int(counts[c])} training examples, fewer than min_per_class="
                        f"{self.min_per_class}{why}: {fix}, "
                        f"or lower min_per_class (inspect(..., probe={{'min_per_class': 0}}) trains on what "
                        f"there is)")
            trained = [c for c in present if counts[c] > 0]
            if len(trained) < 2:         # min_per_class=0 lets a class miss the train split
                what = f"a single class {catnames[trained[0]]!r}" if trained else "no labelled rows"
                raise DeepBaseError(
                    f"probe: {who} has {what} in its training rows (classes "
                    f"{', '.join(repr(catnames[c]) for c in present)} occur in its labels); a probe "
                    "needs two classes to train on: " + (way if seen > self.max_rows else
                                                         "select more records (the split into train and "
                                                         "test is by record)")
                    + (", or run without control=True" if real is not None else ""))
            classes = torch.as_tensor(present, dtype=torch.int64, device=self.device)
            head.update(type="softmax", classes=classes,
                        ttr=torch.searchsorted(classes, head["ytr"].to(torch.int64)),
                        tte=torch.searchsorted(classes, head["yte"].to(torch.int64)),
                        prior=torch.as_tensor(counts[present], dtype=F64, device=self.device))
            heads.append(head)
        return heads

    def _scaler(self, xtr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, standard deviation) of the train features, float64 (sd 1 for a constant unit;
        mean 0 and sd 1 for a unit with a NaN or infinite activation, left out by _scale)."""
        n = xtr.shape[0]
        mu = torch.zeros(self.width, dtype=F64, device=self.device)
        m2 = torch.zeros(self.width, dtype=F64, device=self.device)
        if n:
            shift = xtr[0].to(F64)
            s = torch.zeros_like(mu)
            for i in range(0, n, _CHUNK):
                c = xtr[i:i + _CHUNK].to(F64) - shift
                s += c.sum(0)
                m2 += (c * c).sum(0)
            mu = s / n
            m2 = (m2 / n - mu * mu).clamp(min=0)
            mu = mu + shift
        sd = m2.sqrt()
        spread = mu.abs().clamp(min=1e-30)
        sd = torch.where(sd <= 1e-12 * spread, torch.ones_like(sd), sd)
        return torch.where(self.finite, mu, 0.0), torch.where(self.finite, sd, 1.0)

    def _scale(self, x: torch.Tensor, scaler, dtype) -> torch.Tensor:
        """Standardised features; 0 (the train mean) for every unit with a NaN or infinite
        activation in the stream so far, which leaves it out of the probe (its weights stay 0)."""
        mu, sd = scaler
        out = torch.empty(x.shape, dtype=dtype, device=self.device)
        bad = None if bool(self.finite.all()) else ~self.finite
        for i in range(0, x.shape[0], _CHUNK):
            z = (x[i:i + _CHUNK].to(F64) - mu) / sd
            if bad is not None:
                z[:, bad] = 0.0
            out[i:i + _CHUNK] = z.to(dtype)
        return out

    def _train(self):
        """The group's probe trained on the train sample as it is now: (heads, standardised train
        features, scaler, per-head fits), the fit behind the ``probe`` rows."""
        _, xtr, ytr = self.sample("train")
        _, _, yte = self.sample("test")
        heads = self._heads(ytr, yte)
        scaler = self._scaler(xtr)
        dtype = F64 if xtr.shape[0] * self.width <= _FLOAT64_CELLS else torch.float32
        ztr = self._scale(xtr, scaler, dtype)
        return heads, ztr, scaler, self._fit(ztr, heads, self.l1, self.l2)

    def _fit(self, ztr: torch.Tensor, heads: list[dict], l1: float, l2: float, subsets=None,
             init: list[dict] | None = None) -> list[dict]:
        """Fit every head; ``subsets[i]`` (optional) the feature indices head i may use, ``init``
        (optional) fitted heads to start from (restricted to the subsets). Returns per head
        {'W': (F, C) float64, 'b': (C,) float64} (zeros outside its subset)."""
        Fdim, dtype, dev = ztr.shape[1], ztr.dtype, self.device
        fits: list[dict | None] = [None] * len(heads)
        loop = []
        for i, h in enumerate(heads):
            if h["type"] == "ridge" and l1 == 0:
                fits[i] = self._ridge(ztr, h, l2, None if subsets is None else subsets[i])
            else:
                loop.append(i)
        if not loop:
            return fits
        # column layout: two-class heads (one logit each) first, then softmax heads, then
        # elastic-net heads
        def kind(i):
            h = heads[i]
            if h["type"] != "softmax":
                return 2
            return 0 if int(h["classes"].numel()) == 2 else 1
        loop.sort(key=lambda i: (kind(i), i))
        offs, O = {}, 0
        for i in loop:
            w_i = int(heads[i]["classes"].numel()) if kind(i) == 1 else 1
            offs[i] = (O, O + w_i)
            O += w_i
        # features: all, or the union of the heads' subsets (each head masked to its own)
        if subsets is None:
            U, Z = None, ztr
        else:
            U = torch.unique(torch.cat([subsets[i].reshape(-1) for i in loop]))
            Z = ztr[:, U].contiguous()
        Fz = Z.shape[1]
        # parameters and logits are kept transposed -- W (O, F), logits (O, n) = W Z^T + b --
        # the faster layout for these very wide and very narrow matrix products
        W = torch.zeros(O, Fz, dtype=dtype, device=dev)
        b = torch.zeros(O, dtype=dtype, device=dev)
        lam = torch.full((O, 1), l2, dtype=dtype, device=dev)
        mask = None if U is None else torch.zeros(O, Fz, dtype=dtype, device=dev)
        # an elastic-net head is fit to its labels less their mean (taken about the first label:
        # exactly the label when all are equal), added back to its intercept after: labels far
        # from 0 (1e12 + N(0, 1)) left residuals out - y only the digits of 1e12 spared (1e-4 in
        # float64, nothing in float32), and the weights 1e-3 off sklearn's ElasticNet
        centre = {}
        for i in loop:
            h, (s, e), kd = heads[i], offs[i], kind(i)
            if kd == 2:
                yh = h["ytr"].to(F64)
                centre[i] = yh[0] + (yh - yh[0]).mean() if yh.numel() else torch.zeros((), dtype=F64, device=dev)
            if kd == 0:
                lam[s] = l2 / 2        # w = v1 - v0 of the two-class softmax, v1 = -v0 = w/2
            elif kd == 2 and self.ridge_alpha is not None and h["tr_rows"].numel():
                # elastic net: ridge_alpha as for the closed-form ridge head (alpha = l2 n_h)
                lam[s] = self.ridge_alpha / int(h["tr_rows"].numel())
            if init is not None:
                Wi, bi = init[i]["W"], init[i]["b"]
                if U is not None:
                    Wi = Wi[U]
                if kd == 0:
                    Wi, bi = Wi[:, 1:2] - Wi[:, 0:1], bi[1:2] - bi[0:1]
                W[s:e] = Wi.T.to(dtype)
                b[s:e] = (bi - centre[i] if kd == 2 else bi).to(dtype)
            elif kd == 0:
                p = h["prior"].clamp(min=1e-12)
                b[s] = torch.log(p[1] / p[0]).to(dtype)
            elif kd == 1:
                p = h["prior"] / h["prior"].sum()
                b[s:e] = torch.log(p.clamp(min=1e-12)).to(dtype)
            if mask is not None:
                mask[s:e, torch.searchsorted(U, subsets[i].reshape(-1))] = 1
        if mask is not None:
            W = W * mask
        n = ztr.shape[0]

        def row_weights(h):
            wt = torch.zeros(n, dtype=dtype, device=dev)
            nh = int(h["tr_rows"].numel())
            if nh:
                wt[h["tr_rows"]] = 1.0 / nh
            return wt
        # one-logit heads: targets and row weights (1/n_h on the head's rows, 0 elsewhere)
        bin_heads = [i for i in loop if kind(i) == 0]
        nB = len(bin_heads)
        if nB:
            wB = torch.stack([row_weights(heads[i]) for i in bin_heads])
            tB = torch.zeros(nB, n, dtype=dtype, device=dev)
            for c, i in enumerate(bin_heads):
                tB[c, heads[i]["tr_rows"]] = heads[i]["ttr"].to(dtype)
            twB = tB * wB
        soft = []
        for i in loop:
            if kind(i) == 1:
                h, (s, e) = heads[i], offs[i]
                wt = row_weights(h)
                yw = torch.zeros(e - s, n, dtype=dtype, device=dev)
                yw[h["ttr"], h["tr_rows"]] = wt[h["tr_rows"]]
                soft.append((s, e, wt[None, :], yw))
        enet = [i for i in loop if kind(i) == 2]
        if enet:
            e0 = offs[enet[0]][0]
            wE = torch.stack([row_weights(heads[i]) for i in enet])
            tE = torch.zeros(len(enet), n, dtype=dtype, device=dev)
            for c, i in enumerate(enet):
                tE[c, heads[i]["tr_rows"]] = (heads[i]["ytr"].to(F64) - centre[i]).to(dtype)

        def data_loss(out, grad):
            """Sum over heads of the masked mean losses at logits ``out`` (O, n), and the gradient
            with respect to ``out`` when asked (vectorised: row weights 1/n_h, 0 off the head's
            rows)."""
            f = torch.zeros(O, dtype=dtype, device=dev)     # per column (a head's: its first)
            G = torch.empty_like(out) if grad else None
            if nB:
                o = out[:nB]
                # log(1 + e^o) - t o, stably
                f[:nB] = (wB * (o.clamp(min=0) + torch.log1p(torch.exp(-o.abs()))) - twB * o).sum(1)
                if grad:
                    G[:nB] = wB * torch.sigmoid(o) - twB
            for s, e, wt, yw in soft:
                o = out[s:e]
                lse = torch.logsumexp(o, 0, keepdim=True)
                f[s] = (wt * lse).sum() - (yw * o).sum()
                if grad:
                    G[s:e] = torch.exp(o - lse) * wt - yw
            if enet:
                r = out[e0:] - tE
                f[e0:] = 0.5 * (wE * r * r).sum(1)
                if grad:
                    G[e0:] = wE * r
            return f, G

        def objective(Wp, bp, out=None, grad=True):
            """Smooth part (data + l2) at (Wp, bp) per column of W, its gradient, and the
            logits."""
            if out is None:
                out = torch.addmm(bp[:, None], Wp, Z.T)
            f, G = data_loss(out, grad)
            f = f + 0.5 * (lam * Wp * Wp).sum(1)
            if not grad:
                return f, None, None, out
            gW = torch.addmm(lam * Wp, G, Z)
            if mask is not None:
                gW *= mask
            return f, gW, G.sum(1), out

        with torch.no_grad():
            if l1 == 0:
                W, b = self._lbfgs(objective, W, b, [offs[i] for i in loop])
            else:
                def total(*a, **k):
                    f, *rest = objective(*a, **k)
                    return (f.sum(), *rest)
                W, b = self._fista(total, W, b, l1, mask)
        rows = slice(None) if U is None else U
        for i in loop:
            (s, e), kd = offs[i], kind(i)
            Wi = W[s:e].T.to(F64)
            bi = b[s:e].to(F64)
            if kd == 2:
                bi = bi + centre[i]
            if kd == 0:              # back to the two-class softmax parametrisation
                Wi, bi = torch.cat([-Wi / 2, Wi / 2], 1), torch.cat([-bi / 2, bi / 2])
            Wf = torch.zeros(Fdim, e - s + (1 if kd == 0 else 0), dtype=F64, device=dev)
            Wf[rows] = Wi
            fits[i] = {"W": Wf, "b": bi}
        return fits

    def _ridge(self, ztr, h, l2, subset):
        Fdim = ztr.shape[1]
        W = torch.zeros(Fdim, 1, dtype=F64, device=self.device)
        y = h["ytr"].to(F64)
        n = y.numel()
        if n == 0:
            return {"W": W, "b": torch.zeros(1, dtype=F64, device=self.device)}
        cols = torch.arange(Fdim, device=self.device) if subset is None else subset
        cols = cols[self.finite[cols]]   # non-finite units left out (their weight 0)
        alpha = self.ridge_alpha if self.ridge_alpha is not None else l2 * n
        rows = h["tr_rows"]
        k = cols.numel()
        # float64 normal equations about a shift, in chunks: exact centring for the intercept
        shift = ztr[rows[0], cols].to(F64)
        sx = torch.zeros(k, dtype=F64, device=self.device)
        sxx = torch.zeros(k, k, dtype=F64, device=self.device)
        sxy = torch.zeros(k, dtype=F64, device=self.device)
        ym = y[0] + (y - y[0]).mean()   # exactly the label when all are equal (R2 1.0 held out)
        yc = y - ym
        step = 1 << 16
        for i in range(0, n, step):
            X = ztr[rows[i:i + step]][:, cols].to(F64) - shift
            sx += X.sum(0)
            sxx += X.T @ X
            sxy += X.T @ yc[i:i + step]
        xm = sx / n
        G = sxx - n * torch.outer(xm, xm)
        G.diagonal().add_(alpha)
        # sum (x - shift - xm) yc: yc sums to 0 only up to the rounding of ym, which is not small
        # for labels far from 0 (1e15 + N(0, 1): ym to 0.125, and sum (x - shift) times that
        # moved the weights by 0.1); taking it out keeps the normal equations centred exactly
        rhs = sxy - xm * yc.sum()
        w = None
        if alpha > 0:
            try:
                w = torch.linalg.solve(G, rhs)
            except RuntimeError:        # numerically singular despite alpha > 0
                w = None
        if w is None:                   # alpha = 0: least squares, singular for collinear units
            w = self._min_norm_solve(G, rhs)
        W[cols, 0] = w
        return {"W": W, "b": (ym - (xm + shift) @ w).reshape(1)}

    @staticmethod
    def _min_norm_solve(G: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """The minimum-norm solution of G w = rhs for a symmetric positive semi-definite G (the
        unpenalised normal equations), as sklearn's LinearRegression (scipy's lstsq) gives it:
        through the eigendecomposition of G, leaving out the directions whose eigenvalue is at
        most _RIDGE_RCOND times the largest. The sample holds float32 activations (relative
        precision 2**-24), so a direction of the standardised features whose singular value is
        below 1e-5 of the largest (eigenvalue of G below 1e-10 of the largest) is a linear
        dependence up to rounding (a constant unit, a unit copying or combining others); solved
        for, it gave huge, opposite weights that changed with the rounding of the sums.
        Deterministic, unlike torch.linalg.lstsq's default driver on a singular matrix, which
        returned a different rank (and weights, all 0 included) from call to call."""
        w = torch.zeros_like(rhs)
        var = torch.nonzero(G.diagonal() > 0).reshape(-1)   # a unit constant on the rows: weight 0
        if var.numel() == 0:
            return w
        Gv = G[var][:, var]
        evals, evecs = torch.linalg.eigh((Gv + Gv.T) / 2)
        keep = evals > _RIDGE_RCOND * float(evals.max())
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
        w[var] = evecs @ (inv * (evecs.T @ rhs[var]))
        return w

    def _lbfgs(self, objective, W, b, blocks):
        """L-BFGS run separately for every head (``blocks``: its rows of W and entries of b) --
        the objective is a sum of per-head terms -- but in lockstep, so that one evaluation (one
        pair of matrix products) serves every head: each head has its own curvature memory (20
        pairs), its own backtracking line search (Armijo, c1 = 1e-4, first step 1 or
        min(1, 1/|g|_1) on the first iteration) and its own stopping rule (max |gradient| <=
        _LBFGS_TOL_GRAD, or the loss or max |step| changes by <= _LBFGS_TOL_CHANGE); a stopped
        head is frozen. At most ``max_epochs`` iterations and 2 ``max_epochs`` evaluations."""
        tol_g, tol_c, mem_size = _LBFGS_TOL_GRAD, _LBFGS_TOL_CHANGE, 20
        W, b = W.clone(), b.clone()
        fc, gW, gb, _ = objective(W, b)
        n_eval, max_eval = 1, 2 * self.max_epochs

        def part(fc, gW, gb, k):
            s, e = blocks[k]
            return float(fc[s:e].sum()), torch.cat([gW[s:e].reshape(-1), gb[s:e]])

        def put(Wt, bt, k, x):
            s, e = blocks[k]
            Wt[s:e] = x[: (e - s) * W.shape[1]].reshape(e - s, W.shape[1])
            bt[s:e] = x[(e - s) * W.shape[1]:]

        def flat(k):
            s, e = blocks[k]
            return torch.cat([W[s:e].reshape(-1), b[s:e]])

        H = len(blocks)
        f, g = zip(*(part(fc, gW, gb, k) for k in range(H)))
        f, g = list(f), list(g)
        mem = [[] for _ in range(H)]
        active = [float(g[k].abs().max()) > tol_g for k in range(H)]
        for _ in range(self.max_epochs):
            if not any(active) or n_eval >= max_eval:
                break
            d, t, gd, x0 = {}, {}, {}, {}
            for k in range(H):
                if not active[k]:
                    continue
                q = -g[k]
                if mem[k]:               # two-loop recursion
                    alphas = []
                    for s_, y_, rho in reversed(mem[k]):
                        a = rho * float(s_ @ q)
                        q = q - a * y_
                        alphas.append(a)
                    s_, y_, _ = mem[k][-1]
                    q = q * (float(s_ @ y_) / float(y_ @ y_))
                    for (s_, y_, rho), a in zip(mem[k], reversed(alphas)):
                        q = q + (a - rho * float(y_ @ q)) * s_
                    t[k] = 1.0
                else:
                    t[k] = min(1.0, 1.0 / float(g[k].abs().sum()))
                gd[k] = float(g[k] @ q)
                if gd[k] > -tol_c:       # no descent left
                    active[k] = False
                    continue
                d[k], x0[k] = q, flat(k)
            pending = set(d)
            while pending and n_eval < max_eval:
                Wt, bt = W.clone(), b.clone()
                for k in pending:
                    put(Wt, bt, k, x0[k] + t[k] * d[k])
                fc, gW, gb, _ = objective(Wt, bt)
                n_eval += 1
                for k in sorted(pending):
                    fk, gk = part(fc, gW, gb, k)
                    if fk <= f[k] + 1e-4 * t[k] * gd[k]:
                        step = t[k] * d[k]
                        put(W, b, k, x0[k] + step)
                        y_ = gk - g[k]
                        ys = float(y_ @ step)
                        if ys > 1e-10:
                            mem[k].append((step, y_, 1.0 / ys))
                            if len(mem[k]) > mem_size:
                                mem[k].pop(0)
                        if (float(gk.abs().max()) <= tol_g or abs(fk - f[k]) < tol_c
                                or float(step.abs().max()) <= tol_c):
                            active[k] = False
                        f[k], g[k] = fk, gk
                        pending.discard(k)
                    else:                # backtrack (safeguarded quadratic interpolation)
                        den = 2 * (fk - f[k] - gd[k] * t[k])
                        tn = -gd[k] * t[k] * t[k] / den if den > 0 else 0.5 * t[k]
                        t[k] = min(max(tn, 0.1 * t[k]), 0.5 * t[k])
                        if t[k] * float(d[k].abs().max()) <= tol_c:
                            active[k] = False
                            pending.discard(k)
        return W, b

    def _fista(self, objective, W, b, l1, mask):
        """FISTA with backtracking and function-value restart. Logits are linear in (W, b), so
        the logits of the extrapolated point are combined from the cached ones: one matrix
        product for each trial step and one for each gradient."""
        def prox(Wp, t):
            out = torch.sign(Wp) * (Wp.abs() - t * l1).clamp(min=0)
            return out if mask is None else out * mask

        tol = self.tol if W.dtype == F64 else max(self.tol, 1e-6)
        xW, xb = prox(W, 0.0), b.clone()
        f_x, _, _, out_x = objective(xW, xb, grad=False)
        F_old = float(f_x) + l1 * float(xW.abs().sum())
        yW, yb, out_y = xW, xb, out_x
        t, mom, stall = 1.0, 1.0, 0
        for _ in range(self.max_epochs):
            fy, gW, gb, _ = objective(yW, yb, out=out_y)
            fy = float(fy)
            t *= 1.25
            while True:
                zW, zb = prox(yW - t * gW, t), yb - t * gb
                fz, _, _, out_z = objective(zW, zb, grad=False)
                fz = float(fz)
                dW, db = zW - yW, zb - yb
                quad = fy + float((gW * dW).sum() + (gb * db).sum()) \
                    + float((dW * dW).sum() + (db * db).sum()) / (2 * t)
                if fz <= quad + 1e-12 * abs(fy) or t < 1e-12:
                    break
                t *= 0.5
            F_new = fz + l1 * float(zW.abs().sum())
            pW, pb, out_p = xW, xb, out_x
            xW, xb, out_x = zW, zb, out_z
            if F_new > F_old:                      # adaptive restart
                mom, yW, yb, out_y = 1.0, xW, xb, out_x
            else:
                mom_new = (1 + math.sqrt(1 + 4 * mom * mom)) / 2
                beta = (mom - 1) / mom_new
                yW, yb = xW + beta * (xW - pW), xb + beta * (xb - pb)
                out_y = out_x + beta * (out_x - out_p)
                mom = mom_new
            if abs(F_old - F_new) <= tol * max(1.0, abs(F_new)):
                stall += 1
                if stall >= self.patience:
                    break
            else:
                stall = 0
            F_old = F_new
        return xW, xb

    # -- evaluation ----------------------------------------------------------------------
    def _evaluate(self, zte: torch.Tensor, heads: list[dict], fits: list[dict]) -> list[dict]:
        res = []
        none_finite = not bool(self.finite.any())     # no unit left to probe: scores NULL
        zte = zte.to(F64)
        for h, fit in zip(heads, fits):
            n_train, n_test = int(h["tr_rows"].numel()), int(h["te_rows"].numel())
            r = {"n_train": n_train, "n_test": n_test, "score": math.nan, "macro_f1": math.nan,
                 "majority": math.nan, "correct": 0}
            X = (zte if n_test == zte.shape[0] else zte[h["te_rows"]]) if n_test else None
            if h["type"] == "softmax":
                r["metric"] = "accuracy"
                if n_test:
                    pred = torch.argmax(X @ fit["W"] + fit["b"], 1)
                    t = h["tte"]
                    correct = int((pred == t).sum())
                    r.update(score=correct / n_test, correct=correct)
                    C = int(h["classes"].numel())
                    cm = torch.bincount(t * C + pred, minlength=C * C).reshape(C, C).to(F64)
                    tp = cm.diagonal()
                    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
                    seen = (cm.sum(0) + cm.sum(1)) > 0
                    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
                    r["macro_f1"] = float(f1[seen].mean())
                    r["majority"] = float(cm.sum(1).max() / n_test)
            else:
                r["metric"] = "r2"
                if n_test >= 2 and n_train >= 1:
                    pred = (X @ fit["W"] + fit["b"])[:, 0]
                    y = h["yte"].to(F64)
                    ss_tot = float(((y - y.mean()) ** 2).sum())
                    ss_res = float(((y - pred) ** 2).sum())
                    if ss_tot > 0 and bool(y.max() > y.min()):
                        r["score"] = 1.0 - ss_res / ss_tot
                    else:                # labels all equal: r2_score's force_finite=True values
                        r["score"] = 1.0 if bool((pred == y).all()) else 0.0
            if none_finite:
                r.update(score=math.nan, macro_f1=math.nan, correct=0)
            res.append(r)
        return res

    @staticmethod
    def weight_mass(W: torch.Tensor, trained: torch.Tensor | None = None):
        """NeuroX-style weight mass of a (units, classes) weight matrix: (per-class mass
        (units, classes), each column summing to 1, global mass (units,) = the per-class masses
        averaged over the classes that have mass).

        A class has no mass (its column NaN, its per-class rows NULL, left out of the average)
        when its weights are all 0 or ``trained`` (classes,) bool says it had no training rows.
        A softmax head has a column for every class in its labels, test rows included, but a
        class without training rows has no evidence behind its weights: they are only the
        optimiser's residue around 0 (1e-12), which normalised to a unit mass of 1 would take
        1/C of every unit's global mass and reorder the units by noise. An all-zero column (with
        l1 the penalty fixes the softmax's redundant direction, often as one class' column of
        0) gave every unit a mass of 0 for that class: averaged in, it took 1/C off every score
        (a unit carrying the whole probe scored 2/3) and ranked the units by index for that
        class. With no class of mass (all weights 0: every unit constant, or l1 zeroed them)
        the global mass is NaN: there is nothing to rank."""
        A = W.abs().to(F64)
        tot = A.sum(0)
        has = tot > 0
        if trained is not None:
            has &= trained.to(has.device)
        per_class = torch.where(has[None, :], A / tot.clamp(min=1e-300)[None, :], math.nan)
        if not bool(has.any()):
            return per_class, torch.full((A.shape[0],), math.nan, dtype=F64, device=A.device)
        return per_class, per_class[:, has].mean(1)

    def fit(self) -> dict:
        """Train (once; cached until the next update/combine) and return the fitted model:
        heads, weights, standardisation and held-out results."""
        if self._fitted is not None:
            return self._fitted
        heads, ztr, scaler, fits = self._train()
        zte = self._scale(self.sample("test")[1], scaler, ztr.dtype).to(F64)
        results = self._evaluate(zte, heads, fits)
        masses = [self.weight_mass(f["W"], h["prior"] > 0 if h["type"] == "softmax" else None)
                  for h, f in zip(heads, fits)]
        bad = ~self.finite.cpu()         # non-finite units last (weight 0, rank NULL)
        # a probe without weight (mass NaN) ranks its units by index for the top-k re-fits, as before
        orders = [torch.sort(torch.where(bad, math.inf, -g.cpu().nan_to_num(0.0)), stable=True).indices
                  for _, g in masses]
        topk = {}
        ks = sorted({min(k, self.width) for k in self.topk})
        for k in ks:
            subsets = [o[:k].to(self.device) for o in orders]
            fk = self._fit(ztr, heads, self.l1, self.l2, subsets, init=fits)
            topk[k] = self._evaluate(zte, heads, fk)
        self._fitted = {"heads": heads, "fits": fits, "results": results, "masses": masses,
                        "orders": orders, "topk": topk}
        return self._fitted

    def probe_model(self) -> dict:
        """The probe trained on the train sample as it is now (the fit behind the ``probe`` rows,
        without the top-k re-fits): its standardisation and heads, for :meth:`heldout_loss`.
        Raises as ``finalize`` does when a head cannot be trained yet (a class with fewer than
        ``min_per_class`` train rows, a single class)."""
        heads, _, scaler, fits = self._train()
        keep = ("name", "col", "type", "classes")
        return {"scaler": scaler, "fits": fits,
                "heads": [{**{k: h[k] for k in keep if k in h}, "n_train": int(h["tr_rows"].numel())} for h in heads]}

    def heldout_loss(self, model: dict) -> dict[str, float]:
        """{hypothesis: mean loss of ``model``'s head on this state's test split as it is now}:
        cross-entropy in nats for a classification head (softmax over the head's classes; inf
        when a test label is a class the head was not trained on), mean squared error for a
        continuous head; NaN for a head without labelled test rows, and for a continuous head
        that had no labelled training row (no probe was trained: its ``probe`` score is NULL, and
        the constant 0 it would predict must not count as a loss that stopped improving).
        ``model`` comes from
        :meth:`probe_model`, of this state or of an earlier point of the same scan, so two probes
        can be compared on the same test rows."""
        _, xte, yte = self.sample("test")
        z = self._scale(xte, model["scaler"], F64)
        out = {}
        for h, fit in zip(model["heads"], model["fits"]):
            rows = ~torch.isnan(yte[:, h["col"]])
            y = yte[rows, h["col"]]
            if not y.numel() or h.get("n_train", 1) == 0:
                out[h["name"]] = math.nan
                continue
            logits = z[rows] @ fit["W"] + fit["b"]
            if h["type"] == "ridge":
                out[h["name"]] = float(((logits[:, 0] - y) ** 2).mean())
                continue
            classes = h["classes"]
            t = torch.searchsorted(classes, y.to(torch.int64)).clamp(max=classes.numel() - 1)
            if bool((classes[t] != y).any()):
                out[h["name"]] = math.inf
                continue
            ce = torch.logsumexp(logits, 1) - logits.gather(1, t[:, None])[:, 0]
            out[h["name"]] = float(ce.mean())
        return out

    def constant_loss(self) -> dict[str, float]:
        """{hypothesis: loss of the best constant prediction on this state's test split}, the
        scale of :meth:`heldout_loss`: the entropy (nats) of the test labels' class frequencies,
        or the (population) variance of a continuous hypothesis' test labels; NaN without
        labelled test rows."""
        _, _, yte = self.sample("test")
        out = {}
        for j, h in enumerate(self.hypotheses):
            y = yte[~torch.isnan(yte[:, j]), j]
            if not y.numel():
                out[h["name"]] = math.nan
            elif h["kind"] == "continuous":
                out[h["name"]] = float(((y - y.mean()) ** 2).mean())
            else:
                p = torch.unique(y, return_counts=True)[1].to(F64) / y.numel()
                out[h["name"]] = float(-(p * p.log()).sum())
        return out

    def finalize(self) -> pa.Table:
        m = self.fit()
        cols = {f.name: [] for f in PROBE_SCHEMA}
        finite = self.finite.cpu().numpy()   # a unit with a NaN or inf activation: weight rows NULL

        def row(unit, hyp, measure, score, n, lo=None, hi=None, p=None, metric=None, f1=None,
                maj=None, ntr=None, nte=None, rank=None, k=None):
            for key, v in (("unit", unit), ("hypothesis", hyp), ("measure", measure), ("score", score),
                           ("n", n), ("ci_low", lo), ("ci_high", hi), ("p_value", p),
                           ("metric", metric), ("macro_f1", f1), ("majority", maj),
                           ("n_train", ntr), ("n_test", nte), ("rank", rank), ("k", k)):
                if isinstance(v, float) and math.isnan(v):
                    v = None
                cols[key].append(v)

        def score_row(h, r, measure, k=None):
            lo = hi = p = None
            if r["metric"] == "accuracy" and r["n_test"] and not math.isnan(r["score"]):
                lo, hi = wilson_interval(r["correct"], r["n_test"], self.confidence)
                p = float(stats.binom.sf(r["correct"] - 1, r["n_test"], r["majority"]))
            row(None, h["name"], measure, r["score"], r["n_test"], lo, hi, p, r["metric"],
                r["macro_f1"], r["majority"], r["n_train"], r["n_test"], None, k)

        for h, r in zip(m["heads"], m["results"]):
            score_row(h, r, "probe")
        for h, r, (_, g), order in zip(m["heads"], m["results"], m["masses"], m["orders"]):
            rank = np.empty(self.width, dtype=np.int64)
            rank[order.numpy()] = np.arange(1, self.width + 1)
            gv = g.cpu().numpy()
            trained = r["n_train"] > 0          # no labelled training row: no weights to rank
            for u in range(self.width):
                ok = bool(finite[u]) and trained and not math.isnan(gv[u])    # NaN: no weight at all
                row(u, h["name"], "probe_weight", float(gv[u]) if ok else None, r["n_train"],
                    ntr=r["n_train"], nte=r["n_test"], rank=int(rank[u]) if ok else None, metric=r["metric"])
        for h, r, (per_class, _) in zip(m["heads"], m["results"], m["masses"]):
            # per-class rankings of a multi-class head (NeuroX's top neurons per tag), as
            # 'probe_class_weight' rows named '<hyp>=<class>'; control heads are left out
            if h.get("type") != "softmax" or h["kind"] != "categorical" or h["name"] in self.control_of \
                    or per_class.shape[1] < 3:
                continue
            cats = self.hypotheses[h["col"]]["categories"]
            pc = per_class.cpu().numpy()
            for c, code in enumerate(h["classes"].cpu().tolist()):
                has_mass = not np.isnan(pc[:, c]).all()     # a class without training rows: NULL
                order = np.argsort(np.where(finite, -pc[:, c], np.inf), kind="stable")
                rank = np.empty(self.width, dtype=np.int64)
                rank[order] = np.arange(1, self.width + 1)
                for u in range(self.width):
                    ok = bool(finite[u]) and has_mass
                    row(u, f"{h['name']}={cats[code]}", "probe_class_weight", float(pc[u, c]) if ok else None,
                        r["n_train"], ntr=r["n_train"], nte=r["n_test"], rank=int(rank[u]) if ok else None,
                        metric=r["metric"])
        for k, res in m["topk"].items():
            for h, r in zip(m["heads"], res):
                score_row(h, r, "probe_topk", k)
        by_name = {h["name"]: r for h, r in zip(m["heads"], m["results"])}
        for ctrl, real in self.control_of.items():
            rr, rc = by_name[real], by_name[ctrl]
            row(None, real, "selectivity", selectivity(rr["score"], rc["score"]), rr["n_test"],
                metric="accuracy", ntr=rr["n_train"], nte=rr["n_test"])
        return pa.table({f.name: pa.array(cols[f.name], f.type) for f in PROBE_SCHEMA}, schema=PROBE_SCHEMA)

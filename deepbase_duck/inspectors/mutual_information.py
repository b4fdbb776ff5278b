"""Mutual information (nats) between each unit, discretised into quantile bins, and each discrete
hypothesis (measure ``mi``; binary and categorical hypotheses).

Bins
----
Counts need bin edges fixed before counting. Unless ``edges`` (a (width, bins - 1) array) is
given, the state *buffers* the first ``calibration_rows`` rows of its stream (default 10_000, in
arrival order: deterministic, no randomness involved), then sets each unit's edges to the
j / bins quantiles (j = 1..bins-1, numpy's default 'linear' interpolation) of those rows, counts
the buffered rows and from then on counts every batch directly. With ``calibration_records``
(record ids) the calibration rows are instead every row of those records: the state buffers
until ``calibration_rows`` of their rows have come (the engines pass the records' symbol count),
so that the edges depend on which records, not on the order or batching of the stream (the
engines' full scans choose the records by a hash of their ids: engine/inspect.py
mi_calibration). ``edges_rule`` names where given ``edges`` came from (``bin_rule``). A stream
shorter than that is calibrated on what it has (the calibration records' rows, else all rows) at
finalize (without changing the state).
Bin b of a unit holds edges[b-1] <= x < edges[b] (``searchsorted(edges, x, side='right')``), so
tied edges (a unit with a point mass, e.g. a ReLU's zeros) leave empty bins; the last edge of
each run of ties at v is moved to the next float above v, so that the point mass has a bin of its
own instead of sharing one with the values above it (a sparse unit copying a binary label, 0 on
92% of the rows, would otherwise fall in one bin, its MI undefined). The column ``bins``
gives the number of distinct bins of the unit (distinct edges + 1), ``bin_rule`` how the edges
were made; ``bin_edges()`` returns them.

Counts
------
Exact contingency counts per (group, unit, bin, class) (groups: see ``intervals`` below; a
binary hypothesis has classes 0 = label 0 and 1 = other labels; a categorical one its codes
0..K-1), made with one matrix product of one-hot matrices per batch chunk and group, so merging two states with the same edges is exact (counts add) and
agrees with a one-shot run.
Merging rules: a calibrated and an uncalibrated state -> the buffered rows are counted with the
calibrated edges (exact); two uncalibrated states -> buffers concatenated (self's rows first)
and calibrated when long enough (this equals the one-shot result when self's rows precede
other's in the stream; refused unless both were given the same ``calibration_records``, or
none); two states calibrated on *different* edges (e.g. parallel workers that
each saw more than ``calibration_rows`` rows) -> other's counts are redistributed onto self's
bins in proportion to the overlap of the bins, taking the mass uniform inside each of other's
bins (its outer bins bounded by the unit's observed min / max): an approximation, flagged in
``bin_rule`` ("...; approximate merge of N rows") and the attribute ``approx_rows``. Use ``empty_like()``
(an empty state sharing the calibrated edges) or pass ``edges=`` to workers to keep merges exact.

Score and error
---------------
score = plug-in MI of the counts over the rows labelled for the hypothesis,
sum_{b,c} p(b,c) log(p(b,c) / (p(b) p(c))): equal to sklearn.metrics.mutual_info_score on the
same bins. NULL when the unit falls in fewer than two bins, or the label takes fewer than two
classes, over those rows. Extra column ``mi_miller_madow``: the score minus the Miller-Madow
bias bias_mm = (m_bc - B' - K' + 1) / (2n), from the Miller-Madow corrections of the three
entropies in MI = H(bin) + H(class) - H(bin, class), where B', K' and m_bc count the non-empty
bins, classes and cells (it is (B' - 1)(K' - 1) / (2n) when every cell is occupied).
The interval is [max(0, MI - bias_mm - q sd), MI + q sd] (its low end at most MI: bias_mm is
negative where bins hold a single class). Miller-Madow under-corrects a table of many sparse
cells (bins x classes of the order of the rows): the interval of a unit independent of the
label can then miss MI = 0 (simulated, 10 bins: 60 classes over 2,000 rows held 0 in 95% of
the runs, 300 classes over 20,000 rows in 90%, 300 over 2,000 rows never), while the p-value
keeps its level (X^2: 0-8% below 0.05 in the same runs): test independence with the p-value.
max_error() is the largest distance from a score to either end. The p-value tests
independence of bin and class with Pearson's X^2 = n sum_{b,c} r_bc^2, r_bc = (p_bc - p_b p_c)
/ sqrt(p_b p_c), over the non-empty bins and classes, with (B' - 1)(K' - 1) degrees of freedom: not the G-test (2 n MI), whose chi-square approximation
fails on sparse tables (10 bins x 60 classes over 1,000 rows: 89% of independent units below
0.05, X^2 5%). A unit with a NaN or infinite activation anywhere in the stream scores NULL (as
corr). How sd, q and the p-value's reference distribution are made, ``intervals``:

- 'records' (the default, when every batch came with record ids, as from the engines): records
  are the independent observations, since the symbols of one record are not. Each record falls
  in one of ``jackknife_groups`` groups (default 20) by a hash of its id, the same in any
  batching, order or engine, and the counts are kept per group (memory x groups, at most 200
  groups: 4,096 units x 10 bins x 100 classes x 20 groups is 655 MB; merging adds them, still
  exact). sd is the delete-a-group jackknife's: with G' groups holding labelled
  rows, MI_(g) the plug-in MI without group g, sd^2 = (G' - 1) / G' sum_g (MI_(g) - mean)^2,
  and q is Student's t at G' - 1 degrees of freedom (Kott 2001). The p-value takes X^2 with the
  second-order Rao-Scott correction (Rao & Scott 1984): A = n Cov(r) is estimated by S, the
  covariance of r's jackknife replicates (nu = G' - 1 degrees of freedom), and
  F = X^2 / tr(S) goes against the F distribution with d and d nu degrees of freedom,
  d = tr(A)^2 / tr(A^2) (Satterthwaite) from the estimates of tr(A)^2 and tr(A^2) unbiased for a
  Wishart S (S has rank at most nu: tr(S^2) itself overstates tr(A^2) for tables of more cells
  than groups), clipped to [1, (B' - 1)(K' - 1)]. On simulated records of clustered,
  independent units and labels it rejects at 4-7% at the 5% level where the 'symbols' test
  rejects at 17-52%, and on independent symbols it keeps the power of the plain test
  (tests/test_mi_intervals.py). NULL interval and p-value with fewer than 3 groups; the
  finalize table's ``jackknife_groups`` column holds G'.
- 'symbols' (or a batch without record ids): every symbol independent. sd is the delta
  method's, sd = sqrt((sum p(b,c) log^2(p(b,c)/(p(b)p(c))) - MI^2) / n), q the normal quantile
  of ``confidence``, and X^2 goes against the chi-square distribution.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch
from scipy import stats

from .base import InspectorState, check_batch, register_measure
from .pointbiserial import class_codes, class_layout
from .spearman import score_table, sort_rows
from ..errors import BadParameterError, DeepBaseError, check_float, check_intervals, check_integer

F64 = torch.float64
_CHUNK = 1 << 23          # elements of the (rows, units x bins) one-hot matrix per product
MAX_GROUPS = 200          # jackknife_groups: memory is units x bins x classes x groups float64


def quantile_edges(x: torch.Tensor, bins: int) -> torch.Tensor:
    """(W, bins - 1) float64 edges: the j / bins quantiles (j = 1..bins-1) of each column of an
    (n, W) tensor, with numpy's 'linear' interpolation."""
    n, W = x.shape
    s = sort_rows(x.to(F64).T.contiguous())                         # (W, n)
    q = np.arange(1, bins) / bins
    virt = (n - 1) * q                                              # numpy's 'linear' virtual index
    prev = np.floor(virt).astype(np.int64)
    nxt = np.minimum(prev + 1, n - 1)
    above = virt >= n - 1
    prev = np.where(above, n - 1, prev)
    nxt = np.where(above, n - 1, nxt)
    g = torch.as_tensor(virt - np.floor(virt), dtype=F64, device=x.device)[None, :]
    a = s[:, torch.as_tensor(prev, device=x.device)]                # (W, bins-1)
    b = s[:, torch.as_tensor(nxt, device=x.device)]
    diff = b - a
    e = torch.where(g >= 0.5, b - diff * (1 - g), a + diff * g)          # numpy _lerp
    # a point mass: tied edges at v would put v and everything above it up to the next edge in
    # one bin (a unit 0 on 92% of the rows and 1 elsewhere: one bin, MI undefined); the last of
    # a run of ties moves to the next float above v, so [v, v+) holds the mass alone
    if e.shape[1] > 1:
        tied = torch.zeros_like(e, dtype=torch.bool)
        tied[:, 1:] = e[:, 1:] == e[:, :-1]
        last = tied.clone()
        last[:, :-1] &= e[:, 1:] != e[:, :-1]
        e = torch.where(last, torch.nextafter(e, torch.full_like(e, math.inf)), e)
    return e.contiguous()


_HASH = 0x9E3779B1                    # 2^32 / golden ratio: Knuth's multiplicative hash


def record_groups(record_ids: torch.Tensor, groups: int) -> torch.Tensor:
    """(n,) int64 jackknife group 0..groups-1 of each row's record: the top bits of a
    multiplicative hash of the record id scaled to ``groups`` (every row of a record in one group,
    the same group in any batching, order or engine; consecutive ids spread over the groups)."""
    r = record_ids.to(torch.int64).reshape(-1)
    h = (r * _HASH) & 0xFFFFFFFF
    return (h * groups) >> 32


def log_ratios(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, log(p(b,c) / (p(b) p(c)))) of count tables c (..., B, K): each table's count and the
    log ratio of every cell (0 in empty cells)."""
    n = c.sum((-2, -1))
    pb = c.sum(-1)
    pc = c.sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = c * n[..., None, None] / (pb[..., :, None] * pc[..., None, :])
        return n, np.where(c > 0, np.log(np.where(c > 0, ratio, 1.0)), 0.0)


def plugin_mi(c: np.ndarray) -> np.ndarray:
    """Plug-in MI (nats) of count tables c (..., B, K) over their last two axes (NaN for none)."""
    n, lg = log_ratios(c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (c * lg).sum((-2, -1)) / n


def std_residuals(c: np.ndarray) -> np.ndarray:
    """Pearson residuals (p_bc - p_b p_c) / sqrt(p_b p_c) of count tables c (..., B, K); 0 in empty
    rows and columns."""
    N = c.sum((-2, -1))[..., None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = c / N
        o = p.sum(-1, keepdims=True) * p.sum(-2, keepdims=True)
        return np.where(o > 0, (p - o) / np.sqrt(np.where(o > 0, o, 1.0)), 0.0)


def jackknife_var(est: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Delete-a-group jackknife variance from leave-one-group-out estimates ``est`` (G, ...), over
    the groups where ``present`` (G, ...) holds: (G' - 1) / G' sum (est_g - mean)^2."""
    k = present.sum(0)
    w = np.where(present, est, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = w.sum(0) / k
        dev = np.where(present, est - mean, 0.0)
        return (k - 1) / k * (dev * dev).sum(0)


def _same_edges(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal edges, a NaN equal to a NaN: a unit with a NaN or infinite activation among the
    calibration rows has NaN edges (and scores NULL), and torch.equal's NaN != NaN made every merge
    of states sharing those edges (empty_like()) an "approximate merge" of all their rows."""
    return a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _same_records(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """The same calibration_records (both None, or the same sorted ids)."""
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a.cpu(), b.cpu())


def _some(ids: torch.Tensor, k: int = 5) -> str:
    v = ids[:k].tolist()
    return ", ".join(map(str, v)) + (", ..." if ids.numel() > k else "")


@register_measure
class MutualInformationState(InspectorState):
    measure = "mi"
    accepts = ("binary", "categorical")

    def __init__(self, width, hypotheses, device="cpu", bins: int = 10, calibration_rows: int = 10_000,
                 edges=None, confidence: float = 0.95, intervals: str = "records", jackknife_groups: int = 20,
                 calibration_records=None, edges_rule: str | None = None, **params):
        super().__init__(width, hypotheses, device, **params)
        self.bins = check_integer(f"{self.measure}: bins", bins, 2)            # 2.9 is refused, not cut to 2
        self.calibration_rows = check_integer(f"{self.measure}: calibration_rows", calibration_rows, 1)
        self.calibration_records = None
        if calibration_records is not None:
            if edges is not None:
                raise BadParameterError(f"{self.measure}: give edges or calibration_records, not both")
            ids = np.unique(np.asarray(calibration_records, dtype=np.int64).reshape(-1))
            if ids.size == 0:
                raise BadParameterError(f"{self.measure}: calibration_records is empty")
            self.calibration_records = torch.as_tensor(ids, device=self.device)
        self.calibration_seen = 0                       # buffered rows of the calibration records
        self.confidence = check_float(f"{self.measure}: confidence", confidence, 0, 1, open_low=True,
                                      open_high=True)
        self.intervals = check_intervals(self.measure, intervals,
                                         "every symbol independent: delta method and Pearson's X^2",
                                         "a jackknife over groups of records")
        self.jackknife_groups = check_integer(f"{self.measure}: jackknife_groups", jackknife_groups, 3)
        if self.jackknife_groups > MAX_GROUPS:
            raise BadParameterError(f"{self.measure}: jackknife_groups must be at most {MAX_GROUPS} (the counts "
                                    f"are kept per group), got {self.jackknife_groups}")
        self.clustered = intervals == "records"        # False once a batch comes without record ids
        self.G = self.jackknife_groups if self.clustered else 1        # count tables kept
        self.ks, self.offsets, self.C = class_layout(self.hypotheses)
        W = self.width
        self.xmin = torch.full((W,), math.inf, dtype=F64, device=self.device)
        self.xmax = torch.full((W,), -math.inf, dtype=F64, device=self.device)
        self.finite = torch.ones(W, dtype=torch.bool, device=self.device)   # NaN / inf seen: NULL
        self.buffer: list[tuple] = []           # (acts, labels, groups or None, calibration row mask)
        self.buffered = 0
        self.approx_rows = 0
        self.rows = 0
        self.edges = None
        self.counts = None                             # (G, W, bins, C) float64
        self.rule = None
        if edges is not None:
            e = torch.as_tensor(np.asarray(edges, dtype=np.float64), device=self.device)
            if e.shape != (W, self.bins - 1):
                # say what would fit: edges for another number of bins (bins= left at its
                # default 10), or one row of edges meant for every unit
                if e.ndim == 2 and e.shape[0] == W and e.shape[1] >= 1:
                    hint = f"; these are edges of {e.shape[1] + 1} bins: pass bins={e.shape[1] + 1} with them"
                elif e.ndim == 1:
                    hint = ("; one row of edges for every unit: np.tile(edges, (width, 1))"
                            + (f" and bins={e.shape[0] + 1}" if e.shape[0] + 1 != self.bins else ""))
                else:
                    hint = ""
                raise DeepBaseError(f"mi: edges must have shape (width, bins - 1) = ({W}, {self.bins - 1}) "
                                    f"for bins={self.bins}, got {tuple(e.shape)}{hint}")
            if not bool(torch.isfinite(e).all()):
                raise BadParameterError("mi: edges must be finite numbers (a NaN or inf edge found)")
            if bool((e[:, 1:] < e[:, :-1]).any()):
                u = int(torch.nonzero((e[:, 1:] < e[:, :-1]).any(1))[0])
                raise DeepBaseError(f"mi: the edges of each unit must be non-decreasing; unit {u} has "
                                    f"{e[u].tolist()} (sort each row of edges)")
            self._set_edges(e, edges_rule or f"fixed edges ({self.bins} bins)")

    # -- calibration and counting ----------------------------------------------------------
    def _new_counts(self):
        return torch.zeros(self.G, self.width, self.bins, self.C, dtype=F64, device=self.device)

    def _set_edges(self, e: torch.Tensor, rule: str):
        self.edges = e.to(self.device, F64).contiguous()
        self.rule = rule
        self.counts = self._new_counts()

    def _calibration_rule(self, n):
        return f"quantile ({self.bins} bins) of the first {n} rows"

    def _count(self, counts: torch.Tensor, edges: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
               groups: torch.Tensor | None):
        """counts[group, unit, bin, class] += rows: per group present, one-hot(bins) (rows x
        units*bins) transposed times one-hot(classes) (rows x C), a float32 matrix product (exact:
        integer sums < 2^24 per chunk), the rows sorted by group so that each group's product is
        a slice of one one-hot matrix. Rows without groups go to group 0."""
        n = x.shape[0]
        if n == 0:
            return
        W, B, C = self.width, self.bins, self.C
        dev = x.device
        g = class_codes(labels, self.hypotheses, self.ks, self.offsets, self.measure)    # (n, H)
        xb = torch.searchsorted(edges, x.to(F64).T.contiguous(), right=True).T           # (n, W)
        xb = xb + (torch.arange(W, device=dev, dtype=torch.int64) * B)[None, :]
        oh = torch.zeros(n, C, dtype=torch.float32, device=dev)
        ok = g >= 0
        rows = torch.arange(n, device=dev)[:, None].expand_as(g)
        oh.index_put_((rows[ok], g[ok]), torch.ones((), dtype=torch.float32, device=dev), accumulate=True)
        step = max(1, min(_CHUNK // max(W * B, 1), 1 << 23))
        flat = counts.view(counts.shape[0], W * B, C)
        if groups is None or counts.shape[0] == 1:
            grp = None
        else:                                      # rows sorted by group: each group a slice
            grp, order = torch.sort(groups, stable=True)
            xb, oh = xb[order], oh[order]
        for s in range(0, n, step):
            e = min(s + step, n)
            bh = torch.zeros(e - s, W * B, dtype=torch.float32, device=dev)
            bh.scatter_(1, xb[s:e], 1.0)
            if grp is None:
                flat[0] += (bh.T @ oh[s:e]).to(F64)
                continue
            ks, sizes = torch.unique_consecutive(grp[s:e], return_counts=True)
            a = 0
            for k, m in zip(ks.tolist(), sizes.tolist()):
                flat[k] += (bh[a:a + m].T @ oh[s + a:s + a + m]).to(F64)
                a += m

    def _count_buffer(self, counts, edges):
        for a, b, g, _ in self.buffer:
            self._count(counts, edges, a, b, g)

    def _calibration_rows_now(self):
        """(rows the edges come from now, rule): the calibration records' rows when some have
        come, else the first ``calibration_rows`` buffered rows."""
        if self.calibration_records is not None and self.calibration_seen:
            x = torch.cat([a[m] for a, _, _, m in self.buffer])
            return x, (f"quantile ({self.bins} bins) of the {x.shape[0]} rows of "
                       f"{self.calibration_records.numel()} calibration records")
        x = torch.cat([a for a, _, _, _ in self.buffer])
        k = min(self.calibration_rows, x.shape[0])
        return x[:k], self._calibration_rule(k)

    def _calibrated_enough(self):
        seen = self.buffered if self.calibration_records is None else self.calibration_seen
        return seen >= self.calibration_rows

    def _calibrate_from_buffer(self):
        x, rule = self._calibration_rows_now()
        self._set_edges(quantile_edges(x, self.bins), rule)
        self._count_buffer(self.counts, self.edges)
        self.buffer, self.buffered, self.calibration_seen = [], 0, 0

    def update(self, acts, labels, record_ids=None) -> None:
        labels = check_batch(self, acts, labels, record_ids)
        if acts.shape[0] == 0:
            return
        if self.calibration_records is not None and self.edges is None and record_ids is None:
            raise DeepBaseError(f"{self.measure}: calibration_records needs the record ids of every batch")
        x = acts.to(self.device, F64)
        y = labels.to(self.device, F64)
        # a categorical code out of range refused here, before the state changes: the counts read
        # the codes only when the bins are set, so a bad batch was buffered, and the error came at
        # the later batch that calibrated, leaving the bins set, the buffer uncounted and every
        # score's n 0 (with fixed edges, refused after the rows were taken into rows / min / max)
        class_codes(y, self.hypotheses, self.ks, self.offsets, self.measure)
        if self.clustered and record_ids is None:
            self.clustered = False                     # symbol intervals from here on
        grp = record_groups(record_ids.to(self.device), self.G) if self.clustered else None
        self.finite &= torch.isfinite(x).all(0)
        self.xmin = torch.minimum(self.xmin, x.min(0).values)
        self.xmax = torch.maximum(self.xmax, x.max(0).values)
        self.rows += int(x.shape[0])
        if self.edges is not None:
            self._count(self.counts, self.edges, x, y, grp)
            return
        if self.calibration_records is None:
            cal = None
        else:
            cal = torch.isin(record_ids.to(self.device, torch.int64).reshape(-1), self.calibration_records)
            self.calibration_seen += int(cal.sum())
        self.buffer.append((x, y, grp, cal))
        self.buffered += x.shape[0]
        if self._calibrated_enough():
            self._calibrate_from_buffer()

    def empty_like(self) -> "MutualInformationState":
        """An empty state sharing this state's calibrated edges: states built from it merge
        exactly (give one to each parallel worker)."""
        if self.edges is None:
            raise DeepBaseError("mi: empty_like() needs a calibrated state (edges fixed)")
        new = type(self)(self.width, self.hypotheses, self.device, bins=self.bins,
                         calibration_rows=self.calibration_rows, confidence=self.confidence,
                         intervals=self.intervals, jackknife_groups=self.jackknife_groups,
                         calibration_records=None if self.calibration_records is None
                         else self.calibration_records.cpu().numpy())
        new._set_edges(self.edges.clone(), self.rule)
        return new

    def combine(self, other: "MutualInformationState") -> "MutualInformationState":
        self._check_combine(other)
        if other.bins != self.bins:
            raise DeepBaseError(f"mi: cannot combine states of {other.bins} and {self.bins} bins")
        if (other.intervals, other.jackknife_groups) != (self.intervals, self.jackknife_groups):
            raise DeepBaseError(f"mi: cannot combine a state with intervals={other.intervals!r}, "
                                f"jackknife_groups={other.jackknife_groups} into one with "
                                f"intervals={self.intervals!r}, jackknife_groups={self.jackknife_groups}")
        if self.edges is None and other.edges is None and not _same_records(self.calibration_records,
                                                                            other.calibration_records):
            # both still buffering: the merged buffer is calibrated on one set of records, and the
            # other state's rows are marked against its own (a state without calibration_records
            # has no marks: finalize failed on a torch RuntimeError; two different sets calibrated
            # on rows of both, a set neither state asked for)
            def show(r):
                return "none" if r is None else f"{r.numel()} records ({_some(r)})"
            raise DeepBaseError(f"mi: cannot combine two states not yet calibrated on different "
                                f"calibration_records (this state: {show(self.calibration_records)}; the "
                                f"other: {show(other.calibration_records)}); give every state the same "
                                "calibration_records, or share calibrated edges (empty_like() or edges=)")
        self.clustered = self.clustered and other.clustered
        self.finite &= other.finite.to(self.device)
        self.xmin = torch.minimum(self.xmin, other.xmin.to(self.device))
        self.xmax = torch.maximum(self.xmax, other.xmax.to(self.device))
        self.rows += other.rows
        dev = self.device
        o_buffer = [(a.to(dev), b.to(dev), None if g is None else g.to(dev), None if m is None else m.to(dev))
                    for a, b, g, m in other.buffer]
        if self.edges is None and other.edges is None:
            self.buffer = self.buffer + o_buffer
            self.buffered += other.buffered
            self.calibration_seen += other.calibration_seen
            if self._calibrated_enough():
                self._calibrate_from_buffer()
            return self
        if self.edges is None:                      # adopt other's edges and counts
            self._set_edges(other.edges.clone(), other.rule)
            self.counts = other.counts.to(self.device).clone()
            self.approx_rows = other.approx_rows
            self._count_buffer(self.counts, self.edges)
            self.buffer, self.buffered, self.calibration_seen = [], 0, 0
        elif other.edges is None:
            pass
        elif _same_edges(other.edges.to(self.device), self.edges):
            self.counts += other.counts.to(self.device)
            self.approx_rows += other.approx_rows
        else:
            self.counts += self._redistribute(other)
            self.approx_rows += other.rows
        for a, b, g, _ in o_buffer:
            self._count(self.counts, self.edges, a, b, g)
        return self

    def _redistribute(self, other) -> torch.Tensor:
        """other's counts (every group) moved onto self's bins, mass uniform inside each of
        other's bins."""
        dev = self.device
        eo = other.edges.to(dev)
        lo_o = other.xmin.to(dev)[:, None]
        hi_o = other.xmax.to(dev)[:, None]
        L = torch.cat([lo_o, eo], 1).clamp(min=lo_o, max=hi_o)                   # (W, B)
        U = torch.cat([eo, hi_o], 1).clamp(min=lo_o, max=hi_o)
        inf = torch.full((self.width, 1), math.inf, dtype=F64, device=dev)
        Ls = torch.cat([-inf, self.edges], 1)                                        # (W, B)
        Us = torch.cat([self.edges, inf], 1)
        width = (U - L)[:, :, None]
        ov = (torch.minimum(U[:, :, None], Us[:, None, :])
              - torch.maximum(L[:, :, None], Ls[:, None, :])).clamp(min=0)
        frac = ov / torch.where(width > 0, width, torch.ones_like(width))
        # zero-width bins of other (a point mass): all their mass to self's bin holding the point
        point = torch.searchsorted(self.edges, L.contiguous(), right=True)          # (W, B)
        onehot = torch.nn.functional.one_hot(point, self.bins).to(F64)
        M = torch.where(width > 0, frac, onehot)
        M = M / M.sum(2, keepdim=True).clamp(min=1e-300)
        return torch.einsum("wjk,gwjc->gwkc", M, other.counts.to(dev))

    def _current(self):
        """(edges, counts, rule), calibrating on the buffer (without storing) if needed."""
        if self.edges is not None:
            return self.edges, self.counts, self.rule
        if self.buffered == 0:
            return None, None, None
        if self.calibration_records is not None and self.calibration_seen:
            x, rule = self._calibration_rows_now()
        else:
            x = torch.cat([a for a, _, _, _ in self.buffer])
            rule = self._calibration_rule(x.shape[0])
        edges = quantile_edges(x, self.bins)
        counts = self._new_counts()
        self._count_buffer(counts, edges)
        return edges, counts, rule

    def bin_edges(self) -> np.ndarray | None:
        """(width, bins - 1) edges in use (or that finalize would use now)."""
        e, _, _ = self._current()
        return None if e is None else e.cpu().numpy()

    # -- results -------------------------------------------------------------------------
    def _compute(self, scores_only: bool = False):
        W, H = self.width, len(self.names)
        out = {k: np.full((W, H), np.nan) for k in ("score", "mm", "lo", "hi", "p", "half", "groups")}
        out["n"] = np.zeros((W, H))
        edges, counts, rule = self._current()
        out["rule"] = rule
        if edges is None:
            out["bins"] = np.full((W,), np.nan)
            return out
        e = edges.cpu().numpy()
        out["bins"] = 2 + (np.diff(e, axis=1) > 0).sum(1)            # distinct edges + 1
        cnt_g = counts.cpu().numpy()                                   # (G, W, B, C)
        finite = self.finite.cpu().numpy()
        cnt = cnt_g.sum(0)
        clustered = self.clustered and cnt_g.shape[0] > 1
        z = stats.norm.ppf(0.5 + self.confidence / 2)
        for h in range(H):
            sl = slice(int(self.offsets[h]), int(self.offsets[h]) + self.ks[h])
            c = cnt[:, :, sl]                                                           # (W, B, K)
            n = c.sum((1, 2))                                                           # (W,)
            pb = c.sum(2)                                                               # (W, B)
            pc = c.sum(1)                                                               # (W, K)
            Bn = (pb > 0).sum(1)
            Kn = (pc > 0).sum(1)
            bad = (Bn < 2) | (Kn < 2) | (n <= 0) | ~finite
            mi = np.maximum(plugin_mi(c), 0.0)
            out["n"][:, h] = n
            out["score"][:, h] = np.where(bad, np.nan, mi)
            if scores_only:
                continue
            cells = (c > 0).sum((1, 2))
            with np.errstate(invalid="ignore", divide="ignore"):
                bias = (cells - Bn - Kn + 1) / (2 * n)
            df = (Bn - 1) * (Kn - 1)
            x2 = n * (std_residuals(c) ** 2).sum((1, 2))                                # Pearson's X^2
            if clustered:
                sd, q, pv, groups = self._jackknife(cnt_g[:, :, :, sl], c, n, x2, df)
                bad_iv = bad | (groups < 3)
                out["groups"][:, h] = groups
            else:
                _, lg = log_ratios(c)
                with np.errstate(invalid="ignore", divide="ignore"):
                    m2 = (c * lg * lg).sum((1, 2)) / n
                    sd = np.sqrt(np.maximum(m2 - mi * mi, 0.0) / n)
                q, bad_iv = z, bad
                with np.errstate(invalid="ignore", divide="ignore"):
                    pv = stats.chi2.sf(x2, np.maximum(df, 1))
            out["mm"][:, h] = np.where(bad, np.nan, mi - bias)
            # the interval holds the score (Miller-Madow's bias is negative where a bin holds one
            # class); max_error bounds the distance to either end
            lo = np.minimum(np.maximum(mi - bias - q * sd, 0.0), mi)
            hi = mi + q * sd
            out["lo"][:, h] = np.where(bad_iv, np.nan, lo)
            out["hi"][:, h] = np.where(bad_iv, np.nan, hi)
            out["half"][:, h] = np.where(bad_iv, np.nan, np.maximum(mi - lo, hi - mi))
            out["p"][:, h] = np.where(bad_iv, np.nan, pv)
        return out

    def _jackknife(self, cg, c, n, x2, df):
        """Records as clusters, from the per-group tables cg (G, W, B, K) of the full table c:
        (jackknife sd of MI, Student's t quantile, Rao-Scott p-value, groups G'), each (W,).
        Works through the units in blocks to bound the (G, units, B, K) temporaries."""
        W = c.shape[0]
        G, _, B, K = cg.shape
        sd = np.full(W, np.nan)
        pv = np.full(W, np.nan)
        groups = np.zeros(W, np.int64)
        step = max(1, (1 << 22) // max(G * B * K, 1))
        for a in range(0, W, step):
            b = min(a + step, W)
            g = cg[:, a:b]
            present = g.sum((2, 3)) > 0                                       # (G, w)
            loo = c[a:b][None] - g                                            # (G, w, B, K)
            sd[a:b] = np.sqrt(jackknife_var(plugin_mi(loo), present))
            k = present.sum(0)
            groups[a:b] = k
            # Rao-Scott: Pearson's X^2 = n |r|^2, r the residuals (p_bc - p_b p_c) / sqrt(p_b p_c);
            # A = n Cov(r), estimated by S from the jackknife replicates of r with nu = G' - 1
            # degrees of freedom. Second order (Satterthwaite): X^2 / (tr(A) / d) ~ chi-square(d),
            # d = tr(A)^2 / tr(A^2). S has rank <= nu, so
            # tr(S^2) overstates tr(A^2) where the table has more cells than groups; the
            # estimates unbiased for a Wishart S are used instead:
            # tr(A^2) ~ nu (nu tr(S^2) - tr(S)^2) / ((nu - 1)(nu + 2)),
            # tr(A)^2 ~ tr(S)^2 - 2 tr(A^2) / nu, d clipped to [1, (B' - 1)(K' - 1)];
            # F reference with d and d nu degrees of freedom (S's own noise).
            r = std_residuals(loo)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(present[:, :, None, None], r, 0.0).sum(0) / k[:, None, None]
                dev = np.where(present[:, :, None, None], r - mean, 0.0).reshape(G, b - a, B * K)
                f = n[a:b] * (k - 1) / k
                s1 = f * (dev * dev).sum((0, 2))                               # tr(S)
                gram = np.einsum("gwi,hwi->wgh", dev, dev)
                s2 = f * f * (gram * gram).sum((1, 2))                         # tr(S^2)
                nu = (k - 1).astype(np.float64)
                t2 = nu * (nu * s2 - s1 * s1) / ((nu - 1) * (nu + 2))
                t1sq = s1 * s1 - 2 * t2 / nu
                d = np.clip(np.where(t2 > 0, t1sq / t2, df[a:b]), 1, np.maximum(df[a:b], 1))
                F = x2[a:b] / s1
                ok = (s1 > 0) & (k >= 3)
                pv[a:b] = np.where(ok, stats.f.sf(F, np.where(ok, d, 1), np.where(ok, d * nu, 1)), np.nan)
        q = stats.t.ppf(0.5 + self.confidence / 2, np.maximum(groups - 1, 1))
        return sd, q, pv, groups

    def score_rows(self):
        """The scores alone (no jackknife or p-values): what the progressive stop rules read."""
        return self.unit_major_rows(self._compute(scores_only=True)["score"])

    def max_error(self) -> float:
        if self.edges is None:
            return float("inf")
        half = self._compute()["half"]
        half = half[~np.isnan(half)]
        return float(half.max()) if half.size else float("inf")

    def finalize(self) -> pa.Table:
        o = self._compute()
        W, H = o["score"].shape
        rule = o["rule"] or "no rows"
        if self.approx_rows:
            rule += f"; approximate merge of {self.approx_rows} rows"
        extra = {
            "bins": (np.broadcast_to(o["bins"][:, None], (W, H)), pa.int32()),
            "bin_rule": ([rule] * (W * H), pa.string()),
            "mi_miller_madow": (o["mm"], pa.float64()),
        }
        if self.clustered:
            extra["jackknife_groups"] = (np.nan_to_num(o["groups"]).astype(np.int64), pa.int64())
        return score_table(self.measure, self.names, o["score"], o["n"], o["lo"], o["hi"], o["p"], extra)

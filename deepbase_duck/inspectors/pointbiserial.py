"""Class-conditional moments of every unit: the point-biserial correlation and the probeless
ranking, streamed exactly.

State (shared by both measures)
-------------------------------
Each hypothesis contributes its classes to one list of C classes (a binary hypothesis: class 0
for label 0 and class 1 for any other non-NaN label; a categorical one: classes 0..K-1 for codes
0..K-1). Per class c: the count n_c and, per (unit, class), the mean and the centred sum of
squares M2. A batch is reduced with two matrix products against the (rows x C) one-hot matrix
in float64 and merged with Chan et al.'s pairwise update, so streaming, merging and one-shot
agree up to float64 rounding. Rows whose label is NaN belong to no class of that hypothesis.
A categorical code that is not an integer in 0..K-1 raises HypothesisError.

``pointbiserial`` (binary hypotheses)
-------------------------------------
score = point-biserial r = (mean_1 - mean_0) * sqrt(n_1 n_0 / n) / sqrt(M2), where
M2 = M2_0 + M2_1 + (mean_1 - mean_0)^2 n_0 n_1 / n is the unit's centred sum of squares over the
labelled rows; this equals Pearson's r with the 0/1 label (scipy.stats.pointbiserialr), and is
computed as that, from the Pearson state kept for the interval (its centred co-moment keeps the
digits a difference of class means loses to a unit's offset), NULL also where the class moments
say a class is empty or the unit constant. CI and
p_value are corr's for that r (a PearsonState on the 0/1 labels is kept beside the classes, which
doubles the update's cost): with records as clusters by default, or with ``intervals='symbols'``
(or batches without record ids) the two-sided t-test with n - 2 degrees of freedom (as scipy)
and the Fisher z interval tanh(atanh r +- z / sqrt(n - 3)). Extra columns mean_1, mean_0 and
mean_diff = mean_1 - mean_0 (and ``records``, the clusters). NULL when a class is empty or the
unit is constant over the labelled rows.

``probeless`` (binary and categorical hypotheses)
-------------------------------------------------
Antverg & Belinkov (2022), "On the Pitfalls of Analyzing Individual Neurons in Language
Models" (ICLR): with q_c the mean activation of the unit over the rows of class c, the unit's
probeless score for the hypothesis is

    score = sum over unordered pairs {c, c'} of non-empty classes of |q_c - q_c'|

computed as sum_k q_(k) (2k - K' - 1) over the K' non-empty class means sorted increasingly.
Empty classes (no row seen) are left out; fewer than two non-empty classes, or a unit constant
over the labelled rows, give NULL. Ranking units by this score (descending) is the paper's
ranking; the extra column ``rank`` gives it per hypothesis (1 = highest; NULL for NULL scores) and
``class_means`` the list of class means in the order of the hypothesis' categories
(binary: [mean for label 0, mean for label 1]; NULL for an empty class).
p_value: one-way ANOVA F-test of equal class means (scipy.stats.f_oneway on the same rows).
CI: a conservative simultaneous interval: each class mean is within z_{1 - a/(2K')} se_c of its
expectation with probability >= 1 - a (Bonferroni), and then the score is within
(K' - 1) * sum_c z se_c (triangle inequality), se_c = sqrt(M2_c / (n_c (n_c - 1))); the lower end
is clipped at 0. max_error() is the largest half-width of that interval.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch
from scipy import stats

from .base import InspectorState, check_batch, register_measure
from .correlation import PearsonState, exact_in_float64, fisher_interval, rounding_floor
from .spearman import score_table
from ..errors import HypothesisError, check_float, check_intervals

F64 = torch.float64


def class_layout(hypotheses: list[dict]):
    """(class counts per hypothesis K_h, offsets into the concatenated class list, total C)."""
    ks = []
    for h in hypotheses:
        if h["kind"] == "categorical":
            cats = h.get("categories")
            if not cats:
                raise HypothesisError(f"categorical hypothesis {h['name']!r} has no categories")
            ks.append(len(cats))
        else:
            ks.append(2)
    offsets = np.concatenate([[0], np.cumsum(ks)[:-1]]).astype(np.int64) if ks else np.zeros(0, np.int64)
    return ks, offsets, int(sum(ks))


def class_codes(labels: torch.Tensor, hypotheses: list[dict], ks, offsets, measure: str) -> torch.Tensor:
    """(n, H) int64: the global class index of each row for each hypothesis, -1 for NaN."""
    y = labels.to(F64)
    n, H = y.shape
    dev = y.device
    nan = torch.isnan(y)
    binary = torch.tensor([h["kind"] != "categorical" for h in hypotheses], device=dev, dtype=torch.bool)
    kt = torch.tensor(ks, device=dev, dtype=F64)
    y0 = torch.where(nan, torch.zeros((), dtype=F64, device=dev), y)
    code = torch.where(binary[None, :], (y0 != 0).to(F64), y0)
    bad = ~nan & ~binary[None, :] & ((code != torch.floor(code)) | (code < 0) | (code >= kt[None, :]))
    if bool(bad.any()):
        h = int(torch.nonzero(bad.any(0)).flatten()[0])
        v = float(y[:, h][bad[:, h]][0])
        raise HypothesisError(
            f"measure {measure!r}: categorical hypothesis {hypotheses[h]['name']!r} has label {v!r}; "
            f"codes must be integers 0..{ks[h] - 1}")
    off = torch.as_tensor(offsets, device=dev)
    g = code.to(torch.int64) + off[None, :]
    return torch.where(nan, torch.full_like(g, -1), g)


class ClassMomentsState(InspectorState):
    """Per (unit, class) count, mean and M2, merged exactly (see module docstring)."""

    def __init__(self, width, hypotheses, device="cpu", confidence: float = 0.95, **params):
        super().__init__(width, hypotheses, device, **params)
        self.confidence = check_float(f"{self.measure}: confidence", confidence, 0, 1, open_low=True,
                                      open_high=True)
        self.ks, self.offsets, self.C = class_layout(self.hypotheses)
        W, C, dev = self.width, self.C, self.device
        self.cnt = torch.zeros(C, dtype=F64, device=dev)
        # the class means as offsets from a reference per unit (a batch's mean): merged as
        # absolute values they were rounded at every merge to float64's spacing at their size
        # (1.5e-8 at 1e8), and for units 1e8 + 1e-3 N(0, 1) a streamed probeless score (a sum of
        # their differences) drifted up to 2e-4 from the one-shot one, its ANOVA p-value 1e-4
        # from scipy's; see _merge
        self.rx = torch.zeros(W, dtype=F64, device=dev)
        self.rx_set = False
        self.mean = torch.zeros(W, C, dtype=F64, device=dev)
        self.m2 = torch.zeros(W, C, dtype=F64, device=dev)
        self.xmin = torch.full((W,), math.inf, dtype=F64, device=dev)
        self.xmax = torch.full((W,), -math.inf, dtype=F64, device=dev)
        self.exact64 = True                      # every batch float64 or integer (exact_in_float64)

    def update(self, acts, labels, record_ids=None) -> None:
        labels = check_batch(self, acts, labels, record_ids)
        n = acts.shape[0]
        if n == 0:
            return
        x = acts.to(self.device, F64)
        g = class_codes(labels.to(self.device), self.hypotheses, self.ks, self.offsets, self.measure)
        # (after the codes are checked: a refused float32 batch set the float32 rounding rule for
        # good, and a float64 unit far from 0 scored NULL)
        self.exact64 = self.exact64 and exact_in_float64(acts.dtype)
        oh = torch.zeros(n, self.C, dtype=F64, device=self.device)
        rows = torch.arange(n, device=self.device)[:, None].expand_as(g)
        ok = g >= 0
        oh.index_put_((rows[ok], g[ok]), torch.ones((), dtype=F64, device=self.device), accumulate=True)
        nb = oh.sum(0)
        safe = nb.clamp(min=1)
        shift = x.mean(0)
        xc = x - shift
        s = xc.T @ oh
        ss = (xc * xc).T @ oh
        mb = s / safe                                          # about shift
        m2b = (ss - s * s / safe).clamp(min=0)
        self.xmin = torch.minimum(self.xmin, x.min(0).values)
        self.xmax = torch.maximum(self.xmax, x.max(0).values)
        self._merge(nb, shift, mb, m2b)

    def _merge(self, nb, rxb, mb, m2b):
        """Chan et al.'s update with another part's class moments, its means ``mb`` (W, C) as
        offsets from its reference ``rxb`` (W,): the references' difference is exact or nearly
        (values of the same unit), so the means' differences keep their digits."""
        if not self.rx_set and bool((nb > 0).any()):
            self.rx, self.rx_set = rxb.clone(), True
        mb = mb + (rxb - self.rx)[:, None]
        na = self.cnt
        n = na + nb
        safe = n.clamp(min=1)
        d = mb - self.mean
        self.mean = self.mean + d * (nb / safe)
        self.m2 = self.m2 + m2b + d * d * (na * nb / safe)
        self.cnt = n

    def combine(self, other):
        self._check_combine(other)
        self.xmin = torch.minimum(self.xmin, other.xmin.to(self.device))
        self.xmax = torch.maximum(self.xmax, other.xmax.to(self.device))
        self.exact64 = self.exact64 and other.exact64
        self._merge(other.cnt.to(self.device), other.rx.to(self.device), other.mean.to(self.device),
                    other.m2.to(self.device))
        return self

    def _arrays(self):
        """(counts, class means as offsets from ``rx``, M2, constant units, rounding floors)."""
        return (self.cnt.cpu().numpy(), self.mean.cpu().numpy(), self.m2.cpu().numpy(),
                (self.xmax <= self.xmin).cpu().numpy(),
                rounding_floor(self.xmin.cpu().numpy(), self.xmax.cpu().numpy(), self.exact64))

    @staticmethod
    def _tiny(m2_total, n, floor):
        """True where a unit's spread over the labelled rows is pure rounding (constant there):
        ``floor`` is correlation.rounding_floor's (a float64 unit far from 0 keeps its score)."""
        with np.errstate(invalid="ignore", over="ignore"):
            return m2_total <= n * np.maximum(floor, 1e-300) ** 2


@register_measure
class PointBiserialState(ClassMomentsState):
    measure = "pointbiserial"
    accepts = ("binary",)

    def __init__(self, width, hypotheses, device="cpu", confidence: float = 0.95, intervals: str = "records",
                 **params):
        super().__init__(width, hypotheses, device, confidence, **params)
        # checked here, to name this measure
        check_intervals(self.measure, intervals, "every symbol independent, as scipy.stats.pointbiserialr")
        # the interval: that of Pearson's r with the 0/1 label (the same r), records as clusters
        # unless intervals='symbols' (see correlation.py); its moments are kept beside the classes'
        self.pearson = PearsonState(width, hypotheses, device, self.confidence, intervals=intervals)

    def update(self, acts, labels, record_ids=None) -> None:
        labels = check_batch(self, acts, labels, record_ids)    # before either state changes
        super().update(acts, labels, record_ids)
        if acts.shape[0]:
            y = labels.to(self.device, F64)
            self.pearson.update(acts, torch.where(torch.isnan(y), y, (y != 0).to(F64)), record_ids)

    def combine(self, other):
        super().combine(other)
        self.pearson.combine(other.pearson)
        return self

    def _compute(self):
        cnt, mean, m2, constant, floor = self._arrays()
        i0 = self.offsets
        i1 = self.offsets + 1
        n0, n1 = cnt[i0][None, :], cnt[i1][None, :]
        m0, m1 = mean[:, i0], mean[:, i1]
        n = n0 + n1
        d = m1 - m0
        with np.errstate(invalid="ignore", divide="ignore"):
            m2t = m2[:, i0] + m2[:, i1] + d * d * (n0 * n1 / np.maximum(n, 1))
        bad = constant[:, None] | self._tiny(m2t, n, floor[:, None]) | (n0 == 0) | (n1 == 0)
        # the r of the Pearson state kept beside (the same r: corr's on the 0/1 labels), from its
        # centred co-moment, so that pointbiserial's r is corr's to the last digit
        r = np.where(bad, np.nan, self.pearson.correlations())
        rx = self.rx.cpu().numpy()[:, None]
        return (r, np.broadcast_to(n, r.shape), np.where(n0 == 0, np.nan, m0 + rx),
                np.where(n1 == 0, np.nan, m1 + rx), np.where((n0 == 0) | (n1 == 0), np.nan, d))

    def max_error(self) -> float:
        r, n = self._compute()[:2]
        lo, hi = fisher_interval(r, n, self.confidence)
        half = ((hi - lo) / 2)[~np.isnan(lo)]
        return float(half.max()) if half.size else float("inf")

    def finalize(self) -> pa.Table:
        r, n, m0, m1, d = self._compute()
        f = pa.float64()
        # (the difference of the offsets from rx: m1 - m0 of the means about 0 lost their digits)
        extra = {"mean_1": (m1, f), "mean_0": (m0, f), "mean_diff": (d, f)}
        lo, hi, p, records = self.pearson.intervals_of(r, n)
        if records is not None:
            extra["records"] = (records, pa.int64())
        return score_table(self.measure, self.names, r, n, lo, hi, p, extra)


@register_measure
class ProbelessState(ClassMomentsState):
    measure = "probeless"
    accepts = ("binary", "categorical")

    def _compute(self):
        cnt, mean, m2, constant, floor = self._arrays()
        W, H = self.width, len(self.names)
        score = np.full((W, H), np.nan)
        half = np.full((W, H), np.nan)
        p = np.full((W, H), np.nan)
        n_tot = np.zeros(H)
        means_out = []
        rx = self.rx.cpu().numpy()[:, None]
        z_a = 1 - self.confidence
        for h in range(H):
            sl = slice(int(self.offsets[h]), int(self.offsets[h]) + self.ks[h])
            c, mu, q2 = cnt[sl], mean[:, sl], m2[:, sl]
            nonempty = c > 0
            means_out.append(np.where(nonempty[None, :], mu + rx, np.nan))
            N = c.sum()
            n_tot[h] = N
            K = int(nonempty.sum())
            if K < 2:
                continue
            c, mu, q2 = c[nonempty], mu[:, nonempty], q2[:, nonempty]
            s = np.sort(mu, axis=1)         # (offsets from rx: their differences keep every digit)
            weights = 2 * np.arange(1, K + 1) - K - 1
            sc = s @ weights
            grand = (mu * c).sum(1, keepdims=True) / N
            ssb = (c * (mu - grand) ** 2).sum(1)
            ssw = q2.sum(1)
            bad = constant | self._tiny(ssb + ssw, N, floor)
            score[:, h] = np.where(bad, np.nan, sc)
            df1, df2 = K - 1, N - K
            with np.errstate(invalid="ignore", divide="ignore"):
                F = (ssb / df1) / (ssw / df2)
                ph = stats.f.sf(F, df1, df2)
                se = np.sqrt(q2 / (c * (c - 1)))
            ph = np.where(ssw <= 0, np.where(ssb > 0, 0.0, np.nan), ph)
            p[:, h] = np.where(bad | (df2 <= 0), np.nan, ph)
            zq = stats.norm.ppf(1 - z_a / (2 * K))
            hw = (K - 1) * zq * se.sum(1)
            half[:, h] = np.where(bad | (c < 2).any(), np.nan, hw)
        return score, n_tot, half, p, means_out

    def max_error(self) -> float:
        _, _, half, _, _ = self._compute()
        h = half[~np.isnan(half)]
        return float(h.max()) if h.size else float("inf")

    def finalize(self) -> pa.Table:
        score, n_tot, half, p, means = self._compute()
        W, H = score.shape
        lo = np.where(np.isnan(half), np.nan, np.maximum(score - half, 0.0))
        hi = score + half
        # rank within each hypothesis: 1 = largest score, NULL scores last
        key = np.where(np.isnan(score), -np.inf, score)
        order = np.argsort(-key, axis=0, kind="stable")
        rank = np.empty((W, H), dtype=np.int64)
        np.put_along_axis(rank, order, np.arange(1, W + 1)[:, None].repeat(H, 1), axis=0)
        # class_means: list<double> per row, in the order of the hypothesis' categories
        # (binary: [mean for label 0, mean for label 1]); NULL entries for empty classes
        ks = np.asarray(self.ks, dtype=np.int64)
        values = np.concatenate([means[h] for h in range(H)], axis=1).reshape(-1) if H else np.zeros(0)
        offsets = np.concatenate([[0], np.cumsum(np.tile(ks, W))]).astype(np.int32)
        lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float64(), from_pandas=True))
        return score_table(self.measure, self.names, score, n_tot[None, :], lo, hi, p,
                           {"rank": (np.where(np.isnan(score), np.nan, rank), pa.int64()),
                            "class_means": (lists, pa.list_(pa.float64()))})

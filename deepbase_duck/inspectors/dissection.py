"""Network Dissection (Bau et al. 2017) measures for binary hypotheses: ``iou``, ``precision``,
``recall``, ``f1`` at a per-unit top-quantile threshold, and the threshold-free ``ap``.

Threshold
---------
A unit's threshold T is the activation exceeded by a fraction ``quantile`` (default 0.005) of
all symbols: numpy.quantile(acts[:, unit], 1 - quantile) with numpy's default 'linear'
interpolation, over every row of the stream (labelled for some hypothesis or not). A symbol
"fires" when its activation is strictly above T, as in Network Dissection; so a unit whose
largest value is shared by more than that fraction of the symbols (a 0/1 unit, a clipped one)
never fires: its precision is NULL and its iou and recall 0, even when it equals a hypothesis
(score such units with ``corr`` or ``pointbiserial``, or with a larger ``quantile``).

Streaming state: exact top values with their label bits
-------------------------------------------------------
T depends on the whole stream, and so do the counts of firing symbols, so the state keeps, for
every unit, its ``m`` largest activations together with the row's label bits (positive /
negative / no label, per hypothesis) and the row's key; m = 2 K + 8 ceil(sqrt(K)), with
K = ceil(quantile * max_rows) + 2 the most values the threshold may need (default ``max_rows`` =
1_000_000; the 8 sqrt(K) is a margin for the sampling noise of the top counts, see Error).
Candidates are appended to a buffer of 1.5 m entries per unit (a batch only contributes values
above the unit's smallest kept value once m are kept) and the buffer is compacted to the m
largest by a partial sort when full: memory about width * 1.5 m * (16 + H) bytes (value, key,
record, label bits). The largest value dropped is remembered per (unit, key level) (the
"floor" of the rate-2^-j sample below is the largest over levels >= j): every row of the sample
above its floor is kept. Batches and states merge by the m largest of the union (the floors by
their maximum), which does not depend on batch order. The rows above T are all among the top
ceil(quantile (N - 1)) + 1 rows, so from the kept values finalize computes T exactly as
numpy.quantile does, and the exact counts per (unit, hypothesis): intersection
I = #(fires and label = 1), firing labelled symbols A = #(fires and labelled), positives
L = #(label = 1) (counted for the whole stream, not only the kept rows), union U = A + L - I.

Error
-----
* Exact (threshold equal to numpy.quantile, counts equal to the direct numpy formula; merge
  and one-shot equal) for streams of up to ``max_rows`` rows.
* Longer streams: to stay within m values per unit, the state keeps only the rows whose 63-bit
  content-hash key (spearman.row_keys: the same row always gets the same key, so merging is
  order-independent) is below 2^(63 - j), a Bernoulli row sample of rate 2^-j, with exact row
  counts per key level; j grows by one (and the kept values are thinned) whenever the sample's
  top quantile would need more than K values. T and the counts are then exact for that
  sample: T's exceedance fraction in the full stream has standard error about
  sqrt(quantile / N_sample), and the ratios are estimated from the sample's counts (their Wilson
  intervals use the sample counts, so they include this sampling error). Reported counts
  (intersection, union, n_above, n_label) are scaled by 2^j and rounded; ``sample_rate`` = 2^-j.
  finalize checks that the kept values still reach the threshold (the needed value is kept and
  not below the sample's floor); this fails only if, after the rate dropped, the rows seen
  earlier held most of the unit's largest values (e.g. a stream sorted by activation; in an
  unordered stream the kept values exceed the needed ones by about K + 8 sqrt(K), many standard
  deviations of the counts), and such a unit gets NULL scores and threshold, never a wrong value.

Scores: iou = I / U; precision = I / A; recall = I / L; f1 = 2 I / (A + L). NULL for a unit that
is constant over the stream or had a NaN or infinite activation (score and threshold, as corr),
and where the denominator is 0. Labels: 0 is negative, any other non-NaN value positive, NaN no
label. An interval always holds its score and lies in [0, 1] (Wilson's ends, which round to
1 - 1e-16 or 1e-17 at scores of 1 and 0, are widened to the score; ends rounded outside [0, 1]
are clipped).

Intervals and p-values, ``intervals`` = 'records' (the default, when every batch came with record
ids, as from the engines): the symbols of one record are not independent draws (a string's
characters come in runs), so the records are the clusters. Each score is a ratio R = num / den
of sums over records (num = I; den = U, A or L; f1 takes the IoU interval, mapped by
f1 = 2 t / (1 + t)); its linearised variance is var(R) = G/(G-1) sum_g (num_g - R den_g)^2 / den^2
over the G records with a labelled row. The state keeps, besides the top values, each kept row's
record and, per (record, key level), the record's positive and labelled rows, so that a record's
totals are known at finalize (records with no firing row contribute through their positives
alone: sum_g L_g^2 per hypothesis). The interval is Wilson's at the effective sample size
n_eff = R (1 - R) / var(R) (at most den; den where var is 0) with Student's t at G - 1 degrees of
freedom for z (Korn & Graubard 1998), so it stays in [0, 1]. p_value: a one-sided Wald test, t at
G - 1 degrees of freedom, of enrichment D = I / A - L / N_lab (the precision of firing over the
label's prevalence among labelled rows) with the same linearised variance; 1 where nothing
fires. NULL (interval and p) with fewer than 3 records. The threshold T is held fixed: its own
sampling error is not in the interval. In a sampled stream (below) the counts are the sample's,
so the interval covers the row sampling too. A record cut across batches or states is one
record (its rows are summed by record id).

``intervals`` = 'symbols' (or a batch without record ids): every symbol independent, the
Wilson score interval of I out of U (iou), A (precision), L (recall), and the one-sided
hypergeometric (Fisher exact) test, P(X >= I) for X ~ Hypergeom(labelled symbols, L, A).
max_error(): the largest half-width of the interval in use.

``ap``: average precision of the unit's activation as a detector of the label, computed on the
bounded, mergeable, uniform row sample of spearman.RowSample (``max_rows`` default 200_000, the
rows of smallest content-hash key): exactly sklearn.metrics.average_precision_score on the
sample's labelled rows (ties between activations handled as sklearn does, one threshold per
distinct value), hence exact whenever the stream has at most ``max_rows`` rows, otherwise the AP
of a uniform sample of rows. CI, ``intervals`` = 'records' (the default, when every batch came
with record ids): records as clusters, from AP's linearisation on the sample (the derivative of
AP in each row's weight, summed per record: var = G / (G - 1) sum_r z_r^2 over the sample's G
records; see AveragePrecisionState._compute), as Wilson's interval at the effective number of
positives AP (1 - AP) / se^2 with Student's t at G - 1 degrees of freedom (wilson_effective, as
iou's); NULL with fewer than 3 records; extra column ``records``. On simulated records it covers
a population AP 96% of the time, the binomial interval over symbols 61%
(tests/test_ap_intervals.py). 'symbols' (or a batch without record ids): the binomial interval
of Boyd, Eng & Page (2013), AP treated as a proportion over the n_pos positives of the sample,
in its Wilson form (so that it stays inside [0, 1] and is not degenerate at AP = 1). Both cover
the sampling error of the row sample too. max_error(): the largest distance from a score to an
end of its interval ('symbols': the largest half-width it can take at the current sample sizes,
AP = 1/2, no sorting needed). p_value NULL (use significance.permutation_p_values). Extra columns
n_sample, prevalence (the AP of a random detector). NULL for a unit constant over the sample, a
unit with a NaN or infinite activation anywhere in the stream (as corr) or a hypothesis without
positives.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch
from scipy import stats

from .base import InspectorState, check_batch, register_measure
from .spearman import (KEY_SENTINEL, SampledState, _unit_blocks, argsort_rows, row_keys, score_table,
                       sort_rows, store_dtype, top_rows)
from ..errors import DeepBaseError, check_float, check_intervals, check_integer

F64 = torch.float64
I64 = torch.int64


def quantile_positions(n: int, level: float):
    """numpy.quantile's 'linear' method on n sorted values: (previous index, next index, gamma)
    in ascending order."""
    virt = (n - 1) * level
    if virt >= n - 1:
        return n - 1, n - 1, virt - math.floor(virt)
    prev = max(int(math.floor(virt)), 0)
    return prev, prev + 1, virt - math.floor(virt)


def _lerp(a, b, g):
    diff = b - a
    return b - diff * (1 - g) if g >= 0.5 else a + diff * g


def _wilson_ends(k, n, q):
    """The Wilson score interval's ends for k successes out of n at quantile q (z or t), inside
    [0, 1]: in exact arithmetic they are, but at k = 0 or k = n they rounded to -1e-17 or
    1 + 2e-16 (a proportion's interval below 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        den = n + q * q
        center = (k + q * q / 2) / den
        half = q / den * np.sqrt(np.maximum(k * (n - k) / n, 0) + q * q / 4)
    return np.clip(center - half, 0.0, 1.0), np.clip(center + half, 0.0, 1.0)


def wilson(k: np.ndarray, n: np.ndarray, confidence: float):
    lo, hi = _wilson_ends(k, n, stats.norm.ppf(0.5 + confidence / 2))
    bad = ~(n > 0)
    return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)


def label_codes(labels: torch.Tensor) -> torch.Tensor:
    """int8 label bits: -1 no label, 0 negative, 1 positive (any non-zero label)."""
    nan = torch.isnan(labels)
    code = (labels != 0).to(torch.int8)
    return torch.where(nan, torch.full_like(code, -1), code)


class DissectionState(InspectorState):
    """Shared state of iou / precision / recall / f1 (see the module docstring)."""

    accepts = ("binary",)

    def __init__(self, width, hypotheses, device="cpu", quantile: float = 0.005, max_rows: int = 1_000_000,
                 seed: int = 0, confidence: float = 0.95, intervals: str = "records", **params):
        super().__init__(width, hypotheses, device, **params)
        check_intervals(self.measure, intervals,
                        "Wilson interval and hypergeometric test, every symbol independent")
        self.quantile = check_float(f"{self.measure}: quantile", quantile, 0, 0.5, open_low=True, open_high=True)
        self.max_rows = check_integer(f"{self.measure}: max_rows", max_rows, 1)
        self.seed = check_integer(f"{self.measure}: seed", seed, 0)
        self.confidence = check_float(f"{self.measure}: confidence", confidence, 0, 1, open_low=True,
                                      open_high=True)
        # the sample's rows that can exceed T are kept <= `limit` per unit (the rate falls beyond);
        # m values are kept: twice that, plus a margin for the sampling noise of the top counts,
        # so that rows seen before the rate fell rarely miss from the later sample's top
        self.limit = math.ceil(self.quantile * self.max_rows) + 2
        self.m = 2 * self.limit + 8 * math.ceil(math.sqrt(self.limit))
        self.capacity = self.m + self.m // 2                    # compact beyond this many entries
        W, H, dev = self.width, len(self.names), self.device
        self.j = 0                                              # sampling rate 2^-j
        # candidate entries per unit, unordered, in buffers of `capacity` columns of which the
        # first `size` are in use; padding: value -inf, key KEY_SENTINEL, labels -1
        self.size = 0
        self._set(torch.empty(W, 0, dtype=torch.float32, device=dev),
                  torch.empty(W, 0, dtype=I64, device=dev),
                  torch.empty(W, 0, H, dtype=torch.int8, device=dev),
                  torch.empty(W, 0, dtype=torch.int32, device=dev))
        # record-clustered intervals: the record of every kept entry (above), and per (record,
        # key level) the record's positive and labelled rows of that level, so that a record's
        # counts in the rate-2^-j sample are the sum over its levels >= j
        self.clustered = intervals == "records"          # False once a batch comes without record ids
        self.lv_rec = torch.empty(0, dtype=I64, device=dev)
        self.lv_lev = torch.empty(0, dtype=I64, device=dev)
        self.lv_cnt = torch.empty(0, 2, H, dtype=I64, device=dev)    # [positive, labelled] rows
        # the largest value evicted per (unit, key level): the floor of the rate-2^-j sample is
        # the max over levels >= j (an evicted row of a level the sample has since dropped is
        # no longer a row of the sample, so it must not hold the floor up)
        self.floor_level = torch.full((W, 64), -math.inf, dtype=F64, device=dev)
        self.cutoff = torch.full((W,), -math.inf, dtype=F64, device=dev)  # >= m kept values are >= it
        self.rows_level = torch.zeros(64, dtype=I64, device=dev)         # rows by key level
        self.lab_level = torch.zeros(64, H, dtype=I64, device=dev)       # labelled rows
        self.pos_level = torch.zeros(64, H, dtype=I64, device=dev)       # positive rows
        self.xmin = torch.full((W,), math.inf, dtype=F64, device=dev)
        self.xmax = torch.full((W,), -math.inf, dtype=F64, device=dev)
        self._pow2 = torch.tensor([1 << i for i in range(63)], dtype=I64, device=dev)

    # -- bookkeeping ----------------------------------------------------------------------
    def _levels(self, keys):
        """Key level: the largest j with key < 2^(63 - j) (0..63)."""
        return 63 - torch.searchsorted(self._pow2, keys.contiguous(), right=True)

    def floor(self, j=None):
        """(W,) the largest value evicted from the rate-2^-j sample: its rows above it are all kept."""
        j = self.j if j is None else j
        return self.floor_level[:, j:].amax(1)

    def _evict(self, v, lev):
        """Raise the per-level floors by evicted values ``v`` (W, P) of key levels ``lev`` (P,) or
        (W, P) (entries that are not evicted hold -inf)."""
        W, P = v.shape
        if P == 0:
            return
        if lev.dim() == 1:
            lev = lev[None, :].expand(W, P)
        top = torch.full((W, 64), -math.inf, dtype=v.dtype, device=self.device)
        top.scatter_reduce_(1, lev, v, "amax")
        torch.maximum(self.floor_level, top.to(F64), out=self.floor_level)

    def _sampled_rows(self, j=None):
        j = self.j if j is None else j
        return int(self.rows_level[j:].sum())

    def _needed_index(self, n):
        """Largest descending index of the kept values that the threshold needs."""
        prev, _, _ = quantile_positions(n, 1 - self.quantile)
        return n - 1 - prev

    @property
    def vals(self):
        return self._vals[:, :self.size]

    @property
    def keys(self):
        return self._keys[:, :self.size]

    @property
    def labs(self):
        return self._labs[:, :self.size]

    @property
    def recs(self):
        return self._recs[:, :self.size]

    def _set(self, v, k, lab, rec):
        """Make (W, s) entries the content (reusing the buffers when they are large enough)."""
        W, s = v.shape
        cur = getattr(self, "_vals", None)
        if cur is None or cur.shape[1] < s or cur.dtype != v.dtype:
            cap = max(self.capacity, s)
            self._vals = torch.empty((W, cap), dtype=v.dtype, device=self.device)
            self._keys = torch.empty((W, cap), dtype=I64, device=self.device)
            self._labs = torch.empty((W, cap, lab.shape[2]), dtype=torch.int8, device=self.device)
            self._recs = torch.empty((W, cap), dtype=torch.int32, device=self.device)   # record ids < 2^31
        self._vals[:, :s] = v
        self._keys[:, :s] = k
        self._labs[:, :s] = lab
        self._recs[:, :s] = rec
        self.size = s

    def _promote(self, dtype):
        store = store_dtype(dtype, self._vals.dtype)
        if self._vals.dtype != store:
            self._vals = self._vals.to(store)
        return store

    def _append(self, v, k, lab, rec):
        """Add (W, P) candidate values / keys / (W, P, H) label bits / (W, P) records; compact
        when over capacity."""
        s, P = self.size, v.shape[1]
        if s + P <= self._vals.shape[1]:
            self._vals[:, s:s + P] = v
            self._keys[:, s:s + P] = k
            self._labs[:, s:s + P] = lab
            self._recs[:, s:s + P] = rec
            self.size = s + P
        else:
            self._set(torch.cat([self.vals, v.to(self._vals.dtype)], 1), torch.cat([self.keys, k], 1),
                      torch.cat([self.labs, lab], 1), torch.cat([self.recs, rec], 1))
            self._compact()
            if self._vals.shape[1] > self.capacity:        # shrink an oversized buffer
                vals, keys, labs, recs = self.vals.clone(), self.keys.clone(), self.labs.clone(), self.recs.clone()
                del self._vals
                self._set(vals, keys, labs, recs)

    def _compact(self):
        """Keep each unit's m largest entries; the dropped ones raise the floors of their levels."""
        if self.size <= self.m:
            return
        vals, keys, labs = self.vals, self.keys, self.labs
        idx = top_rows(vals, self.m)[:, :self.m]
        self._evict(vals.scatter(1, idx, -math.inf), self._levels(keys))   # kept entries masked
        v = torch.gather(vals, 1, idx)
        self._set(v, torch.gather(keys, 1, idx),
                  torch.gather(labs, 1, idx[:, :, None].expand(-1, -1, labs.shape[2])),
                  torch.gather(self.recs, 1, idx))
        # at least m kept values are >= the smallest kept one (-inf if padding was kept)
        self.cutoff = v.min(1).values.to(F64)

    def _drop_above(self, j, v, k, lab, rec):
        """Invalidate entries whose key is not in the rate-2^-j sample."""
        if j == 0:
            return v, k, lab, rec
        gone = k >= (1 << (63 - j))
        v = torch.where(gone, torch.full_like(v, -math.inf), v)
        k = torch.where(gone, torch.full_like(k, KEY_SENTINEL), k)
        lab = torch.where(gone[:, :, None], torch.full_like(lab, -1), lab)
        rec = torch.where(gone, torch.full_like(rec, -1), rec)
        return v, k, lab, rec

    def _thin_to(self, j):
        if j <= self.j:
            return
        self.j = j
        keep = self.lv_lev >= j                          # the record counts of the sample's levels
        self.lv_rec, self.lv_lev, self.lv_cnt = self.lv_rec[keep], self.lv_lev[keep], self.lv_cnt[keep]
        v, k, lab, rec = self._drop_above(j, self.vals, self.keys, self.labs, self.recs)
        self._set(v, k, lab, rec)
        self.cutoff = torch.full_like(self.cutoff, -math.inf)   # fewer than m entries may remain
        self._compact()

    def _thin_if_needed(self):
        j = self.j
        while j < 62:
            n = self._sampled_rows(j)
            if n == 0 or self._needed_index(n) + 1 <= self.limit:
                break
            j += 1
        self._thin_to(j)

    # -- update / combine -------------------------------------------------------------------
    def update(self, acts, labels, record_ids=None) -> None:
        labels = check_batch(self, acts, labels, record_ids)     # before any of the state changes
        n = acts.shape[0]
        if n == 0:
            return
        x = acts.to(self.device)
        y = labels.to(self.device, F64)
        keys = row_keys(x, y, None if record_ids is None else record_ids.to(self.device), self.seed)
        lev = self._levels(keys)
        lab = label_codes(y)
        if self.clustered and record_ids is None:
            self.clustered = False                       # rows of unknown records: symbols independent
        rec = (record_ids.to(self.device, I64).reshape(-1) if record_ids is not None
               else torch.full((n,), -1, dtype=I64, device=self.device))
        if self.clustered:
            self._record_levels(rec, lev, lab)
        rec = rec.to(torch.int32)
        self.rows_level += torch.bincount(lev, minlength=64)
        self.lab_level.index_add_(0, lev, (lab >= 0).to(I64))
        self.pos_level.index_add_(0, lev, (lab == 1).to(I64))
        xf = x.to(F64)
        self.xmin = torch.minimum(self.xmin, xf.min(0).values)
        self.xmax = torch.maximum(self.xmax, xf.max(0).values)
        store = self._promote(x.dtype)
        self._thin_if_needed()            # the counts include this batch: fix the rate first
        sel = lev >= self.j
        if not bool(sel.any()):
            return
        xs = x[sel].to(store).T.contiguous()                           # (W, P)
        ks, ls, rs = keys[sel], lab[sel], rec[sel]
        P = xs.shape[1]
        # only values above a unit's cutoff can be among its m largest
        kb = int((xs.to(F64) > self.cutoff[:, None]).sum(1).max())
        if kb == 0:
            self._evict(xs, lev[sel])
            return
        if kb >= P:
            self._append(xs, ks[None, :].expand(self.width, P), ls[None].expand(self.width, P, ls.shape[1]),
                         rs[None, :].expand(self.width, P))
            return
        idx = top_rows(xs, kb)[:, :kb]
        self._evict(xs.scatter(1, idx, -math.inf), lev[sel])                 # the rest is evicted
        self._append(torch.gather(xs, 1, idx), ks[idx], ls[idx], rs[idx])

    def _record_levels(self, rec, lev, lab):
        """Add this batch's positive and labelled rows per (record, key level >= j)."""
        sel = lev >= self.j
        rec, lev, lab = rec[sel], lev[sel], lab[sel]
        if rec.numel() == 0:
            return
        if bool((rec < 0).any()) or bool((rec >= 1 << 31).any()):
            raise DeepBaseError(f"{self.measure}: record ids must be in [0, 2^31), got "
                                f"{int(rec.min())}..{int(rec.max())}")
        groups, inv = torch.unique(rec * 64 + lev, return_inverse=True)
        cnt = torch.zeros(groups.numel(), 2, lab.shape[1], dtype=I64, device=self.device)
        cnt[:, 0].index_add_(0, inv, (lab == 1).to(I64))
        cnt[:, 1].index_add_(0, inv, (lab >= 0).to(I64))
        self.lv_rec = torch.cat([self.lv_rec, groups // 64])
        self.lv_lev = torch.cat([self.lv_lev, groups % 64])
        self.lv_cnt = torch.cat([self.lv_cnt, cnt])

    def combine(self, other: "DissectionState") -> "DissectionState":
        self._check_combine(other)
        if (other.quantile, other.m, other.seed) != (self.quantile, self.m, self.seed):
            diff = ", ".join(f"{k} {getattr(self, k)} and {getattr(other, k)}" for k in ("quantile", "max_rows", "seed")
                             if getattr(self, k) != getattr(other, k))
            raise DeepBaseError(f"{self.measure}: cannot combine states of {diff}: their thresholds and "
                                "row samples differ; give every state the same quantile, max_rows and seed")
        dev = self.device
        self.rows_level += other.rows_level.to(dev)
        self.lab_level += other.lab_level.to(dev)
        self.pos_level += other.pos_level.to(dev)
        self.floor_level = torch.maximum(self.floor_level, other.floor_level.to(dev))
        self.xmin = torch.minimum(self.xmin, other.xmin.to(dev))
        self.xmax = torch.maximum(self.xmax, other.xmax.to(dev))
        self.clustered = self.clustered and other.clustered
        self.lv_rec = torch.cat([self.lv_rec, other.lv_rec.to(dev)])
        self.lv_lev = torch.cat([self.lv_lev, other.lv_lev.to(dev)])
        self.lv_cnt = torch.cat([self.lv_cnt, other.lv_cnt.to(dev)])
        keep = self.lv_lev >= max(self.j, other.j)
        self.lv_rec, self.lv_lev, self.lv_cnt = self.lv_rec[keep], self.lv_lev[keep], self.lv_cnt[keep]
        self._thin_to(other.j)
        self._thin_if_needed()            # the rate of the merged counts
        self._promote(other.vals.dtype)
        v, k, lab, rec = self._drop_above(self.j, other.vals.to(dev), other.keys.to(dev), other.labs.to(dev),
                                          other.recs.to(dev))
        self._append(v, k, lab, rec)
        return self

    # -- results ----------------------------------------------------------------------------
    def counts(self):
        """dict of numpy arrays: threshold (W,), ok (W,), I, A (W, H), L, N_lab (H,) in sample
        units, the scale 2^j, and n (H,) labelled rows of the whole stream."""
        W, H = self.width, len(self.names)
        j = self.j
        n_s = self._sampled_rows()
        out = {"scale": float(2 ** j), "n": self.lab_level.sum(0).cpu().numpy().astype(np.int64),
               "L": self.pos_level[j:].sum(0).cpu().numpy().astype(np.float64),
               "N_lab": self.lab_level[j:].sum(0).cpu().numpy().astype(np.float64)}
        none = dict(threshold=np.full(W, np.nan), ok=np.zeros(W, bool),
                    I=np.zeros((W, H)), A=np.zeros((W, H)))
        if n_s == 0:
            out.update(none)
            if self.clustered:
                out["groups"] = self._firing_groups(None, None, 0)
            return out
        prev, nxt, g = quantile_positions(n_s, 1 - self.quantile)
        d_prev, d_next = n_s - 1 - prev, n_s - 1 - nxt
        k = d_prev + 1                                   # only the k largest can exceed T
        if k > self.vals.shape[1]:
            out.update(none)
            if self.clustered:
                out["groups"] = self._firing_groups(None, None, 0)
            return out
        part = top_rows(self.vals, k - 1)[:, :k] if k < self.size else \
            torch.arange(self.size, device=self.device)[None, :].expand(W, -1)
        pv = torch.gather(self.vals, 1, part)
        order = torch.gather(part, 1, argsort_rows(pv, descending=True))
        vals = torch.gather(self.vals, 1, order).to(F64)                            # (W, k) sorted
        valid = torch.gather(self.keys, 1, order) != KEY_SENTINEL
        a, b = vals[:, d_prev], vals[:, d_next]
        T = _lerp(a, b, g)
        ok = valid[:, d_prev] & (a >= self.floor())
        fires = (vals > T[:, None]) & valid                                          # (W, k)
        A = torch.zeros(W, H, dtype=I64, device=self.device)
        I = torch.zeros(W, H, dtype=I64, device=self.device)
        for a0, b0 in _unit_blocks(k * max(H, 1), W):
            f = fires[a0:b0, :, None]
            lab = torch.gather(self.labs[a0:b0], 1, order[a0:b0, :, None].expand(-1, -1, H))
            A[a0:b0] = (f & (lab >= 0)).sum(1)
            I[a0:b0] = (f & (lab == 1)).sum(1)
        A, I = A.to(F64), I.to(F64)
        out.update(threshold=T.cpu().numpy(), ok=ok.cpu().numpy(), I=I.cpu().numpy(), A=A.cpu().numpy())
        if self.clustered:
            out["groups"] = self._firing_groups(fires, order, k)
        return out

    def _record_totals(self):
        """(record ids (G,) sorted, positive rows (G, H), labelled rows (G, H)) of the sample, a
        record's levels summed (and the level table compacted to one entry per (record, level))."""
        if self.lv_rec.numel():
            groups, inv = torch.unique(self.lv_rec * 64 + self.lv_lev, return_inverse=True)
            cnt = torch.zeros(groups.numel(), *self.lv_cnt.shape[1:], dtype=I64, device=self.device)
            cnt.index_add_(0, inv, self.lv_cnt)
            self.lv_rec, self.lv_lev, self.lv_cnt = groups // 64, groups % 64, cnt
        recs, inv = torch.unique(self.lv_rec, return_inverse=True)
        tot = torch.zeros(recs.numel(), *self.lv_cnt.shape[1:], dtype=I64, device=self.device)
        tot.index_add_(0, inv, self.lv_cnt)
        return recs, tot[:, 0].to(F64), tot[:, 1].to(F64)

    def _firing_groups(self, fires, order, k):
        """Per (unit, record) with a firing kept row: the record's I and A per hypothesis, and
        its L and N_lab; plus per hypothesis the sums over all records of L^2, L N_lab, N_lab^2
        and the number of records with a labelled row (the clusters of the intervals)."""
        H = len(self.names)
        recs, Lr, Nr = self._record_totals()
        G = max(recs.numel(), 1)
        us, rs, ls = [torch.empty(0, dtype=I64, device=self.device)], [torch.empty(0, dtype=torch.int32, device=self.device)], \
            [torch.empty(0, H, dtype=torch.int8, device=self.device)]
        for a0, b0 in ([] if fires is None else _unit_blocks(k * max(H, 1), self.width)):
            f = fires[a0:b0]
            u, col = torch.nonzero(f, as_tuple=True)
            o = order[a0:b0][u, col]
            us.append(u + a0)
            rs.append(self.recs[a0:b0][u, o])
            ls.append(self.labs[a0:b0][u, o])
        u, r, lab = torch.cat(us), torch.cat(rs).to(I64), torch.cat(ls)
        ri = torch.searchsorted(recs, r).clamp_(max=G - 1)
        grp, inv = torch.unique(u * G + ri, return_inverse=True)
        Ig = torch.zeros(grp.numel(), H, dtype=F64, device=self.device).index_add_(0, inv, (lab == 1).to(F64))
        Ag = torch.zeros(grp.numel(), H, dtype=F64, device=self.device).index_add_(0, inv, (lab >= 0).to(F64))
        if not recs.numel():                                     # nothing read: no records, no groups
            Lr = Nr = torch.zeros(1, H, dtype=F64, device=self.device)
        gr = grp % G

        def np_(t):
            return t.cpu().numpy()
        return {"unit": np_(grp // G), "I": np_(Ig), "A": np_(Ag), "L": np_(Lr[gr]), "N": np_(Nr[gr]),
                "LL": np_((Lr * Lr).sum(0)), "LN": np_((Lr * Nr).sum(0)), "NN": np_((Nr * Nr).sum(0)),
                "records": np_((Nr > 0).sum(0)).astype(np.int64)}

    # the ratio whose interval is computed: num = I, den = a A + b L - c I (in the sample's counts)
    den_coef = (1, 1, 1)

    def _score(self, I, A, L, U):  # pragma: no cover - abstract
        raise NotImplementedError

    def _map_interval(self, lo, hi):
        return lo, hi

    def _clustered(self, c, I, A, L, N):
        """(ci_low, ci_high, p_value) with records as clusters (see the module docstring)."""
        g = c["groups"]
        W, H = I.shape
        a, b, cc = self.den_coef
        den = a * A + b * L - cc * I
        R = _ratio(I, den)
        dg = a * g["A"] + b * g["L"] - cc * g["I"]                 # the firing records' den
        sums = np.zeros((4, W, H))
        for i, term in enumerate((g["I"] ** 2, g["I"] * dg, dg ** 2 - (b * g["L"]) ** 2)):
            np.add.at(sums[i], g["unit"], term)
        Sdd = b * b * g["LL"][None, :] + sums[2]
        S = sums[0] - 2 * R * sums[1] + R * R * Sdd
        G = np.broadcast_to(g["records"][None, :], (W, H))
        with np.errstate(invalid="ignore", divide="ignore"):
            se = np.sqrt(np.maximum(S, 0) * G / np.maximum(G - 1, 1)) / den
        lo, hi = wilson_effective(R, se, den, G, self.confidence)
        # enrichment: D = I/A - L/N_lab (precision over prevalence), a one-sided Wald test
        with np.errstate(invalid="ignore", divide="ignore"):
            P, B = I / A, L / N
            e = (g["I"] - P[g["unit"]] * g["A"]) / A[g["unit"]]
            f = (g["L"] - B[g["unit"]] * g["N"]) / N[g["unit"]]
            np.add.at(sums[3], g["unit"], e * e - 2 * e * f)
            b0, n0 = c["L"] / c["N_lab"], c["N_lab"]                  # per hypothesis
            ff = (g["LL"] - 2 * b0 * g["LN"] + b0 * b0 * g["NN"]) / (n0 * n0)
            sd = np.sqrt(np.maximum(sums[3] + ff[None, :], 0) * G / np.maximum(G - 1, 1))
            D = P - B
            p = stats.t.sf(D / sd, np.maximum(G - 1, 1))
        p = np.where(sd == 0, np.where(D > 0, 0.0, 1.0), p)
        p = np.where(A == 0, 1.0, p)                              # nothing fires: no evidence
        p = np.where(G < 3, np.nan, p)
        return lo, hi, p

    def _compute(self):
        c = self.counts()
        I, A = c["I"], c["A"]
        L = np.broadcast_to(c["L"][None, :], I.shape)
        U = A + L - I
        score = self._score(I, A, L, U)
        N = np.broadcast_to(c["N_lab"][None, :], I.shape)
        if self.clustered:
            lo, hi, p = self._clustered(c, I, A, L, N)
        else:
            a, b, cc = self.den_coef
            lo, hi = wilson(I, a * A + b * L - cc * I, self.confidence)
            with np.errstate(invalid="ignore", divide="ignore"):
                p = stats.hypergeom.sf(I - 1, N, L, A)
        lo, hi = self._map_interval(lo, hi)
        lo, hi = np.minimum(lo, score), np.maximum(hi, score)    # rounding at 0 or 1 must not exclude it
        constant = (self.xmax <= self.xmin).cpu().numpy()
        bad = (constant | ~self._finite() | ~c["ok"])[:, None] | np.isnan(score)
        nan = np.full(I.shape, np.nan)
        return c, np.where(bad, nan, score), np.where(bad, nan, lo), np.where(bad, nan, hi), \
            np.where(bad | ~(N > 0), nan, p), U

    def _finite(self):
        """(W,) bool: the unit had only finite activations (as in corr, a NaN or infinite one
        makes the unit NULL; xmin / xmax carry a NaN along)."""
        return (torch.isfinite(self.xmin) & torch.isfinite(self.xmax)).cpu().numpy()

    def max_error(self) -> float:
        _, score, lo, hi, _, _ = self._compute()
        half = ((hi - lo) / 2)[~np.isnan(score)]
        return float(np.nanmax(half)) if half.size and not np.isnan(half).all() else float("inf")

    def finalize(self) -> pa.Table:
        c, score, lo, hi, p, U = self._compute()
        W, H = score.shape
        s = c["scale"]
        constant = (self.xmax <= self.xmin).cpu().numpy()
        T = np.where(c["ok"] & self._finite() & ~constant, c["threshold"], np.nan)   # NULL as its scores
        L = np.broadcast_to(c["L"][None, :], (W, H))
        i64 = pa.int64()
        extra = {} if not self.clustered else {
            "records": (np.broadcast_to(c["groups"]["records"][None, :], (W, H)), i64)}
        return score_table(self.measure, self.names, score, c["n"][None, :], lo, hi, p, {**extra,
            "threshold": (np.broadcast_to(T[:, None], (W, H)), pa.float64()),
            "intersection": (np.round(c["I"] * s), i64),
            "union": (np.round(U * s), i64),
            "n_above": (np.round(c["A"] * s), i64),
            "n_label": (np.round(L * s), i64),
            "sample_rate": (np.full((W, H), 1.0 / s), pa.float64()),
        })


def _ratio(k, n):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, k / np.where(n > 0, n, 1), np.nan)


def sorted_ties(x: np.ndarray):
    """For each row of x (units, m): the argsort of its values and, at each sorted position, the
    first position of its tie group (what ap_se needs of the values alone); (order, None) when
    no row has a tie (each position is then its own group)."""
    Wb, m = x.shape
    order = np.argsort(x, axis=1)
    s = np.take_along_axis(x, order, 1)
    new = np.ones((Wb, m), bool)
    np.not_equal(s[:, 1:], s[:, :-1], out=new[:, 1:])
    if new.all():
        return order, None
    start = np.where(new, np.arange(m), 0)
    return order, np.maximum.accumulate(start, axis=1, out=start)


def ap_se(ties, y: np.ndarray, cells: np.ndarray, G: int):
    """(AP, its standard error) of each unit (``ties`` = sorted_ties of its values (units, m), y (m,)
    bool positives, ``cells`` (units * m,) the record code 0..G-1 of each sorted position plus
    G times its unit's row), records as clusters, from AP's linearisation (see
    AveragePrecisionState._compute). Everything but one term is a sum over the k positives,
    computed on (units, k) arrays from their sorted positions: a positive's threshold starts at
    b, the first position of its tie group, so N(v) = m - b, N+(v) = k - (positives before b),
    and c1, c2 (sums over positives at or below v) are cumulative sums up to the last positive of
    its tie group. The term every row carries, -c2(x_t), is a step function of the sorted
    position that rises at each b: written out with one np.repeat, summed per record with one
    bincount (two passes over the rows per hypothesis; the passes were 15 before, 10x slower)."""
    order, start = ties
    Wb, m = order.shape
    ys = y[order]                                                     # (Wb, m) bool, rows sorted
    k = int(y.sum())
    pos = np.nonzero(ys)[1].reshape(Wb, k)                            # each row's positives, ascending
    q = np.arange(k)
    if start is None:                                                 # no ties: each value its own group
        b = pos
        below = last = np.broadcast_to(q, (Wb, k))
    else:
        b = np.take_along_axis(start, pos, 1)
        new = np.ones((Wb, k), bool)
        np.not_equal(b[:, 1:], b[:, :-1], out=new[:, 1:])
        below = np.maximum.accumulate(np.where(new, q, 0), axis=1)    # positives before b
        ends = np.ones((Wb, k), bool)
        ends[:, :-1] = new[:, 1:]
        last = np.minimum.accumulate(np.where(ends, q, k - 1)[:, ::-1], axis=1)[:, ::-1]
    w = 1.0 / (m - b)                                                 # a positive's 1 / N
    prec = (k - below) * w                                            # N+ / N at its threshold
    ap = prec.mean(1, keepdims=True)
    c1 = np.take_along_axis(np.cumsum(w, 1), last, 1)
    c2 = np.zeros((Wb, k + 1))
    np.cumsum(w * prec, 1, out=c2[:, 1:])                             # c2[j]: the first j positives' N+ / N^2
    runs = np.diff(b, axis=1, prepend=0, append=m)                    # positions holding c2[0], c2[1], ...
    z = -np.bincount(cells, weights=np.repeat(c2.ravel(), runs.ravel()), minlength=Wb * G)
    at_pos = np.take_along_axis(cells.reshape(Wb, m), pos, 1).ravel()
    z += np.bincount(at_pos, weights=(prec + c1 - ap).ravel(), minlength=Wb * G)   # d_t k = ys (prec + c1 - AP) - c2
    z = z.reshape(Wb, G) / k
    return ap[:, 0], np.sqrt(G / (G - 1) * (z * z).sum(1))


def wilson_effective(R, se, n, records, confidence: float):
    """Wilson interval of a ratio R of counts over n, records as clusters: at the effective
    sample size n_eff = R (1 - R) / se^2 (at most n; n where se is 0) and with Student's t at
    G - 1 degrees of freedom in place of z (Korn & Graubard 1998). NaN with fewer than 3 records."""
    G = np.asarray(records)
    q = stats.t.ppf(0.5 + confidence / 2, np.maximum(G - 1, 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        n_eff = np.where(se > 0, np.fmin(n, R * (1 - R) / (se * se)), n)
        n_eff = np.where(n_eff > 0, n_eff, n)
    lo, hi = _wilson_ends(R * n_eff, n_eff, q)
    bad = ~(n > 0) | np.isnan(R) | (G < 3)
    return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)


@register_measure
class IoUState(DissectionState):
    measure = "iou"

    def _score(self, I, A, L, U):
        return _ratio(I, U)


@register_measure
class PrecisionState(DissectionState):
    measure = "precision"
    den_coef = (1, 0, 0)

    def _score(self, I, A, L, U):
        return _ratio(I, A)


@register_measure
class RecallState(DissectionState):
    measure = "recall"
    den_coef = (0, 1, 0)

    def _score(self, I, A, L, U):
        return _ratio(I, L)


@register_measure
class F1State(DissectionState):
    measure = "f1"                       # f1 = 2 IoU / (1 + IoU): the IoU interval, mapped

    def _score(self, I, A, L, U):
        return _ratio(2 * I, A + L)

    def _map_interval(self, lo, hi):
        return 2 * lo / (1 + lo), 2 * hi / (1 + hi)


@register_measure
class AveragePrecisionState(SampledState):
    measure = "ap"
    accepts = ("binary",)

    def __init__(self, width, hypotheses, device="cpu", intervals: str = "records", **params):
        check_intervals("ap", intervals, "Boyd et al.'s binomial interval over the positives",
                        "the linearised variance with records as clusters")
        super().__init__(width, hypotheses, device, **params)
        self.intervals = intervals

    @property
    def clustered(self) -> bool:
        return self.intervals == "records" and self.with_records

    def _compute(self, with_se: bool = False):
        """AP per (unit, hypothesis) on the sample. For the positives j of a hypothesis (over its
        labelled rows), precision at threshold v_j is N+(v_j) / N(v_j), N+(v) = #(positives >= v),
        N(v) = #(rows >= v), and AP = mean over positives of that precision (each positive adds
        1/n_pos of recall at its own threshold, ties sharing one threshold): both counts come
        from searchsorted in the sorted values, so the work per hypothesis is O(n_pos log m) per
        unit. ``with_se``: also the standard error with the sample's records as clusters (NaN
        where not defined) and the number of records, from AP's linearisation: the derivative
        of AP in the weight of row i (value x_i, label y_i, k positives) is
        d_i = (y_i prec(x_i) + y_i sum_{j: v_j <= x_i} 1 / N(v_j)
               - sum_{j: v_j <= x_i} N+(v_j) / N(v_j)^2 - AP y_i) / k
        (sum_i d_i = 0: AP does not change when every weight is scaled), the sums running over
        positives j (one cumulative sum over the sorted positives, gathered by searchsorted),
        and var(AP) = G / (G - 1) sum_r (sum_{i in r} d_i)^2 over the G records r."""
        acts = self.sample.acts
        labels = self.sample.labels
        m, W = acts.shape
        H = labels.shape[1]
        ap = np.full((W, H), np.nan)
        se = np.full((W, H), np.nan)
        recs_n = np.zeros(H, np.int64)
        valid = ~torch.isnan(labels)
        pos = valid & (labels != 0)
        npos = pos.sum(0).cpu().numpy().astype(np.float64)
        nval = valid.sum(0).cpu().numpy().astype(np.float64)
        if m == 0 or H == 0:
            return (ap, npos, nval, se, recs_n) if with_se else (ap, npos, nval)
        patterns, inverse = torch.unique(valid.T, dim=0, return_inverse=True)
        for g in range(patterns.shape[0]):
            rows = patterns[g]
            mg = int(rows.sum())
            hs = [h for h in torch.nonzero(inverse == g).flatten().tolist() if npos[h] > 0]
            if mg == 0 or not hs:
                continue
            pos_g = pos[rows]                                            # (mg, H)
            G = 0
            if with_se:
                _, rec_of = torch.unique(self.sample.recs[rows], return_inverse=True)
                G = int(rec_of.max()) + 1
                recs_n[hs] = G
            for a, b in _unit_blocks(mg, W):
                xt = acts[rows, a:b].T.contiguous()                      # (blk, mg)
                ties = sorted_ties(xt.cpu().numpy()) if G >= 3 else None
                if ties is None:
                    s_all = sort_rows(xt)
                    constant = (s_all[:, 0] == s_all[:, -1]).cpu().numpy()
                else:                                            # one tie group: constant
                    constant = (ties[1][:, -1] == 0) if ties[1] is not None else np.zeros(b - a, bool)
                if ties is not None:                             # record of each sorted position, per row
                    cells = (rec_of.cpu().numpy()[ties[0]] + G * np.arange(b - a)[:, None]).ravel()
                for h in hs:
                    if ties is not None:                         # AP and its se from the sorted rows
                        ap_h, se_h = ap_se(ties, pos_g[:, h].cpu().numpy(), cells, G)
                        ap[a:b, h] = np.where(constant, np.nan, ap_h)
                        se[a:b, h] = np.where(constant, np.nan, se_h)
                        continue
                    u = sort_rows(xt[:, pos_g[:, h]].contiguous())      # (blk, npos), sorted
                    k = u.shape[1]
                    n_plus = (k - torch.searchsorted(u, u, right=False)).to(F64)
                    n_all = (mg - torch.searchsorted(s_all, u, right=False)).to(F64)
                    ap[a:b, h] = np.where(constant, np.nan, (n_plus / n_all).mean(1).cpu().numpy())
        fin = self.finite.cpu().numpy()[:, None]
        ap = np.where(fin, ap, np.nan)                                   # a NaN or inf activation: NULL
        if with_se:
            return ap, npos, nval, np.where(fin, se, np.nan), recs_n
        return ap, npos, nval

    def _interval(self, ap, npos, se=None, records=None):
        n = np.broadcast_to(npos[None, :], ap.shape)
        if se is None:
            lo, hi = wilson(ap * n, n, self.confidence)
        else:
            lo, hi = wilson_effective(ap, se, n, np.broadcast_to(records[None, :], ap.shape), self.confidence)
        bad = np.isnan(ap) | np.isnan(lo)
        lo, hi = np.fmin(lo, ap), np.fmax(hi, ap)                # rounding at AP = 1 must not exclude it
        return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)

    def score_rows(self):
        """The scores alone (no intervals): what the progressive stop rules read."""
        return self.unit_major_rows(self._compute()[0])

    def max_error(self) -> float:
        """The largest distance from a score to an end of its interval. 'symbols': the largest
        half-width the interval can take at the current sample sizes (the Wilson half-width at
        AP = 1/2, for the hypothesis with fewest positives): no sorting needed. 'records': the
        intervals themselves."""
        if self.clustered:
            ap, npos, _, se, records = self._compute(with_se=True)
            lo, hi = self._interval(ap, npos, se, records)
            half = np.fmax(ap - lo, hi - ap)
            half = half[~np.isnan(half)]
            return float(half.max()) if half.size else float("inf")
        labels = self.sample.labels
        npos = ((~torch.isnan(labels)) & (labels != 0)).sum(0).cpu().numpy().astype(np.float64)
        npos = npos[npos > 0]
        if npos.size == 0:
            return float("inf")
        n = np.array([npos.min()])
        lo, hi = wilson(n / 2, n, self.confidence)
        return float((hi[0] - lo[0]) / 2)

    def finalize(self) -> pa.Table:
        extra = {}
        if self.clustered:
            ap, npos, nval, se, records = self._compute(with_se=True)
            lo, hi = self._interval(ap, npos, se, records)
        else:
            ap, npos, nval = self._compute()
            lo, hi = self._interval(ap, npos)
        W, H = ap.shape
        with np.errstate(invalid="ignore", divide="ignore"):
            prev = np.where(nval > 0, npos / np.maximum(nval, 1), np.nan)
        extra = {"n_sample": (np.broadcast_to(nval[None, :], (W, H)).astype(np.int64), pa.int64()),
                 "prevalence": (np.broadcast_to(prev[None, :], (W, H)), pa.float64())}
        if self.clustered:
            extra["records"] = (np.broadcast_to(records[None, :], (W, H)).astype(np.int64), pa.int64())
        return score_table(self.measure, self.names, ap, self.n.cpu().numpy()[None, :], lo, hi,
                           np.full((W, H), np.nan), extra)

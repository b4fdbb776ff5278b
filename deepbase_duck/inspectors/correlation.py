"""Pearson correlation of every unit with every hypothesis, streamed.

State per (unit, hypothesis) pair: the count n, the means of the unit and of the label, the
centred sums of squares M2x, M2y and the co-moment C, over the symbols where the hypothesis has a
label. A batch is reduced with three matrix products (units x hypotheses) in float64 and merged
with Chan et al.'s pairwise update, which is exact up to float64 rounding whatever the batch
order, so a streamed, a merged and a one-shot computation agree. The means are kept as offsets
from references (a batch's means), so that they keep their digits however far the units or
labels are from 0 (units 1e8 + 1e-3 N(0, 1): r within 1e-15 of exact arithmetic, streamed or not).

finalize(): r = C / sqrt(M2x M2y). Intervals and p-values, ``intervals``:

- 'records' (the default, when every batch came with record ids, as from the engines): records
  are the independent observations, since the symbols of one record are not. The state also
  keeps, per (unit, hypothesis), the sums over records of the products of each record's totals
  t = (n, Sx, Sy, Sxx, Syy, Sxy) (21 distinct products, in coordinates shifted by the state's
  first batch means; combine moves another state's sums to its own shift). At the end,
  var(r) = G/(G-1) sum_i z_i^2 / N^2, the sandwich (linearisation) variance with records as
  clusters: z_i, record i's sum of the influence function x~ y~ - r/2 (x~^2 + y~^2), is linear
  in t_i with coefficients from the final moments. The interval is taken on the Fisher z scale
  (se / (1 - r^2)) with Student's t at G - 1 degrees of freedom; the p-value is the Wald test
  of r = 0 at the same degrees of freedom; the finalize table's ``records`` column holds G.
  A record cut across two batches counts as two records. Cost: one product per record instead
  of one per batch (the same arithmetic) and the records' totals; memory 36 (W x H) float64.
  The rows of a batch need not come grouped by record: a batch whose records' rows are apart is
  taken in the stable order of its record ids (the engines' batches come grouped).
  Few symbols in all make the sandwich variance too small (it is the linearisation's, exact
  only as N grows): on bivariate normal data with rho = 0.5, one symbol per record, the 95%
  interval held rho 85-89% of the time over 3-10 records and 91% over 30; with 10 symbols per
  record, 95-96% from 3 records on.
- 'symbols' (or a batch without record ids): every symbol independent, as scipy.stats.pearsonr:
  the t-test with n-2 degrees of freedom and the Fisher z interval
  (tanh(atanh r +- z_{1-a/2} / sqrt(n-3))).

A unit or label that is constant over the scored symbols gives NULL score, interval and p-value:
a label whose values are all equal on them, and a unit whose spread there is rounding (its
variance over one hypothesis' symbols, where it is constant and varies elsewhere, is float64
rounding of the centring, at most about sqrt(eps) times its range; see ``rounding_floor``). A
NaN or infinite activation makes that unit's score NULL. Labels: a binary hypothesis' label is
0 or any other value (1), as pointbiserial reads it; an infinite label of a continuous
hypothesis is refused (HypothesisError).
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch
from scipy import stats

from ..errors import check_float, check_intervals
from .base import InspectorState, check_batch, register_measure, scratch

F64 = torch.float64
ROUNDING = float(np.finfo(np.float32).eps)    # relative spread below which a unit counts as constant
EPS64 = float(np.finfo(np.float64).eps)


def exact_in_float64(dtype: torch.dtype) -> bool:
    """True for activations that float64 holds as they came: float64 itself and integers (and
    bool), whose spread is data, not float32 rounding (the float32 rule of rounding_floor made
    int64 activations 2^26 + 0..7 NULL: a spread below float32 resolution of 2^26)."""
    return dtype == F64 or not (dtype.is_floating_point or dtype.is_complex)


def rounding_floor(xmin: np.ndarray, xmax: np.ndarray, exact64: bool) -> np.ndarray:
    """(W,) the standard deviation below which a unit's spread over some rows is rounding, not
    data: the centring's float64 rounding of a unit constant on those rows (and varying
    elsewhere) leaves a variance of about eps64 times its squared range, and merging batch
    means about eps64 times its magnitude. Activations that came as float32 (or coarser): a
    spread below float32 resolution of the unit's magnitude, ROUNDING * max(|xmin|, |xmax|).
    Every batch float64 or integer (``exact64``, see exact_in_float64):
    ROUNDING * (xmax - xmin) + 64 eps64 max(|xmin|, |xmax|),
    so that a float64 unit far from 0 (1e8 + N(0, 1)) keeps its score (the float32 rule made
    it NULL: its spread was below float32 resolution of 1e8, not below its own)."""
    magnitude = np.maximum(np.abs(xmax), np.abs(xmin))
    with np.errstate(invalid="ignore", over="ignore"):
        if exact64:
            return ROUNDING * (xmax - xmin) + 64 * EPS64 * magnitude
        return ROUNDING * magnitude


@register_measure
class PearsonState(InspectorState):
    measure = "corr"
    accepts = ("binary", "continuous")

    def __init__(self, width, hypotheses, device="cpu", confidence: float = 0.95, intervals: str = "records",
                 **params):
        super().__init__(width, hypotheses, device, **params)
        confidence = check_float(f"{self.measure}: confidence", confidence, 0, 1, open_low=True, open_high=True)
        check_intervals(self.measure, intervals, "every symbol independent, as scipy.stats.pearsonr")
        self.confidence = confidence
        self.intervals = intervals
        H, W, dev = len(self.names), self.width, self.device
        self.n = torch.zeros(H, dtype=F64, device=dev)
        # the means are kept as offsets from references rx (W,) and ry (H,), a batch's means:
        # means merged as absolute values are each rounded to float64's spacing at their size
        # (1.5e-8 at 1e8), which put a streamed r over units 1e8 + 1e-3 N(0, 1) 1e-6 off the
        # one-shot's 1e-11 (see _merge)
        self.rx = torch.zeros(W, dtype=F64, device=dev)
        self.ry = torch.zeros(H, dtype=F64, device=dev)
        self.rx_set = False                           # rx taken from a batch (else 0)
        self.mx = torch.zeros(W, H, dtype=F64, device=dev)
        self.my = torch.zeros(H, dtype=F64, device=dev)
        self.m2x = torch.zeros(W, H, dtype=F64, device=dev)
        self.m2y = torch.zeros(H, dtype=F64, device=dev)
        self.c = torch.zeros(W, H, dtype=F64, device=dev)
        self.xmin = torch.full((W,), math.inf, dtype=F64, device=dev)
        self.xmax = torch.full((W,), -math.inf, dtype=F64, device=dev)
        self.exact64 = True                           # every batch float64 or integer (exact_in_float64)
        # each label's least and largest value over its labelled symbols (a constant label: NULL)
        self.ymin = torch.full((H,), math.inf, dtype=F64, device=dev)
        self.ymax = torch.full((H,), -math.inf, dtype=F64, device=dev)
        # record-clustered intervals: the sums over records of the products of each record's
        # totals (n, Sx, Sy, Sxx, Syy, Sxy), in coordinates shifted by (ux, uy); see _cluster_sums
        self.clustered = intervals == "records"      # False once a batch comes without record ids
        self.cm = None                                # (6, 6, W, H) float64, allocated at first use
        self.ux = self.uy = None
        self.uy_set = None                            # (H,) bool: uy set from a batch with that label
        self.records = torch.zeros(H, dtype=F64, device=dev)   # records with a labelled symbol

    # -- update: reduce a batch to its own moments, then merge ----------------------------
    def update(self, acts: torch.Tensor, labels: torch.Tensor, record_ids=None) -> None:
        # shapes checked before any of the state changes (a torch RuntimeError half-way through
        # the update used to leave the batch's bounds in the state)
        labels = check_batch(self, acts, labels, record_ids)
        if acts.shape[0] == 0:
            return
        x = acts.to(self.device)
        y = self.read_labels(labels)
        mask = ~torch.isnan(y)
        self.exact64 = self.exact64 and exact_in_float64(x.dtype)
        self.ymin = torch.minimum(self.ymin, torch.where(mask, y, math.inf).amin(0))
        self.ymax = torch.maximum(self.ymax, torch.where(mask, y, -math.inf).amax(0))
        if self.clustered and record_ids is None:
            self.clustered, self.cm = False, None     # rows of unknown records: symbols independent
        if self.clustered:
            record_ids = torch.as_tensor(record_ids)
            order = grouping_order(record_ids)
            if order is not None:                     # a record's rows apart in the batch: brought together
                o = order.to(x.device)
                x, y, mask = x[o], y[o], mask[o]
                record_ids = record_ids.reshape(-1)[order.to(record_ids.device)]
        runs = record_runs(record_ids) if self.clustered else None
        self.xmin = torch.minimum(self.xmin, x.amin(0).to(F64))
        self.xmax = torch.maximum(self.xmax, x.amax(0).to(F64))
        xc = scratch(x.shape[0], x.shape[1], F64, self.device)
        xc.copy_(x)                                              # float64 copy, no allocation
        shift = xc.mean(0)
        xc.sub_(shift)                                           # centred on the batch mean
        H = y.shape[1]
        every = bool(mask.all())
        if every:                                                # every symbol labelled: the usual case
            nb = torch.full((H,), float(x.shape[0]), dtype=F64, device=self.device)
            myb = y.mean(0)
            yc = y - myb
            # the means about (shift, myb): what the rounded means left in the centred sums
            ey = yc.sum(0) / x.shape[0]
            if runs is None:
                ex = xc.sum(0) / x.shape[0]
                cb = (yc.T @ xc).T                               # (H x n) @ (n x W): the fast orientation
                m2xb = xc.square_().sum(0)[:, None].expand(-1, H)   # (xc is spent after this)
            else:                                                # the same sums, record by record
                seg, counts, R = runs
                sxy = record_products(yc, xc, counts)            # (R, H, W)
                cb = sxy.sum(0).T
                sx = _segment_sum(xc, seg, R)                    # (R, W)
                ex = sx.sum(0) / x.shape[0]                      # (from the records' sums: no pass over xc)
                sxx = _segment_sum(xc.square_(), seg, R)
                m2xb = sxx.sum(0)[:, None].expand(-1, H)
                nr = torch.as_tensor(counts, dtype=F64, device=self.device)
                self._cluster_sums(shift, myb, False, nr, sx, _segment_sum(yc, seg, R), sxx,
                                   _segment_sum(yc * yc, seg, R), sxy,
                                   torch.full((H,), float(R), dtype=F64, device=self.device))
            mxb = ex[:, None].expand(-1, H)
        else:
            m = mask.to(F64)
            nb = m.sum(0)
            safe = nb.clamp(min=1)
            y0 = torch.where(mask, y, torch.zeros((), dtype=F64, device=self.device))
            myb = y0.sum(0) / safe
            yc = (y0 - myb) * m                                  # 0 where no label
            if runs is None:
                both = (torch.cat([yc, m], 1).T @ xc).T          # one product for C and the sums of x
                cb, sx = both[:, :H], both[:, H:]
                sxx = (m.T @ xc.square_()).T
            else:                                                # per record: sums over its labelled symbols
                seg, counts, R = runs
                both = record_products(torch.cat([yc, m], 1), xc, counts)    # (R, 2H, W)
                sxx_r = record_products(m, xc.square_(), counts)               # (R, H, W)
                cb, sx, sxx = both[:, :H].sum(0).T, both[:, H:].sum(0).T, sxx_r.sum(0).T
                nr = _segment_sum(m, seg, R)                                    # (R, H)
                self._cluster_sums(shift, myb, True, nr, both[:, H:], _segment_sum(yc, seg, R), sxx_r,
                                   _segment_sum(yc * yc, seg, R), both[:, :H], (nr > 0).sum(0).to(F64))
            mxb = sx / safe                                      # about shift
            m2xb = (sxx - sx * sx / safe).clamp(min=0)
            ey = yc.sum(0) / safe
            cb = cb - sx * ey                                    # centre x on its masked mean
        if every:
            m2xb = (m2xb - nb * ex[:, None] * ex[:, None]).clamp(min=0)
            cb = cb - nb * ex[:, None] * ey
        m2yb = ((yc * yc).sum(0) - nb * ey * ey).clamp(min=0)
        self._merge(nb, shift, mxb, myb, ey, m2xb, m2yb, cb)

    def _cluster_sums(self, shift, myb, masked, n, sx, sy, sxx, syy, sxy, records) -> None:
        """Fold one batch's record totals into ``cm``: every product of two of each record's
        (n, Sx, Sy, Sxx, Syy, Sxy) per (unit, hypothesis), summed over the batch's records, in
        the state's coordinates (x - ux, y - uy: its first batch's means, so that the products
        stay small whatever the units' offsets). The totals come centred on the batch means
        (``shift``, ``myb``). Shapes: n (R,), Sx and Sxx (R, W), Sy and Syy (R, H), Sxy (R, H, W);
        with ``masked`` (labels missing on some symbols) n is (R, H) and Sx, Sxx (R, H, W)."""
        W, H = self.width, len(self.names)
        if self.cm is None:
            self.cm = torch.zeros(6, 6, W, H, dtype=F64, device=self.device)
            self.ux, self.uy = shift.clone(), myb.clone()
            self.uy_set = records > 0
        else:
            self._adopt_label_shift(myb, records > 0)
        self.records += records
        if masked:                                   # every product over (R, H, W), then moved
            t = (n[:, :, None], sx, sy[:, :, None], sxx, syy[:, :, None], sxy)
            cm = torch.empty(6, 6, W, H, dtype=F64, device=self.device)
            for a in range(6):
                for b in range(a, 6):
                    cm[a, b] = (t[a] * t[b]).sum(0).T
                    if a != b:
                        cm[b, a] = cm[a, b]
            self.cm += moved_sums(cm, shift, myb, self.ux, self.uy)
            return
        # the usual case: totals moved to the state's coordinates first (cheap at (R, ...)), then
        # the products grouped: units-only x units-only, hypotheses-only x hypotheses-only, the
        # mixed ones (one matrix product) and those with Sxy
        dx, dy = shift - self.ux, myb - self.uy
        nc = n[:, None]
        sxy = (sxy + dx * sy[:, :, None] + dy[:, None] * sx[:, None, :]
               + n[:, None, None] * (dy[:, None] * dx))                                   # (R, H, W)
        vw = torch.stack([sx + nc * dx, sxx + 2 * dx * sx + nc * dx * dx], 1)             # (R, 2, W): Sx, Sxx
        vh = torch.stack([nc.expand(-1, H), sy + nc * dy, syy + 2 * dy * sy + nc * dy * dy], 1)   # n, Sy, Syy
        R = len(n)
        ww = torch.einsum("raw,rbw->abw", vw, vw)[:, :, :, None]                           # (2, 2, W, 1)
        hh = torch.einsum("rah,rbh->abh", vh, vh)[:, :, None, :]                           # (3, 3, 1, H)
        wh = (vw.reshape(R, -1).T @ vh.reshape(R, -1)).reshape(2, W, 3, H).permute(0, 2, 1, 3)   # (2, 3, W, H)
        xw = torch.bmm(sxy.permute(2, 1, 0).contiguous(),                                  # per unit w:
                       vw.permute(2, 0, 1).contiguous()).permute(2, 0, 1)                  # (2, W, H)
        xh = torch.einsum("rhw,rbh->bwh", sxy, vh)                                          # (3, W, H)
        cm, iw, ih = self.cm, slice(1, 4, 2), slice(0, 5, 2)     # Sx, Sxx at 1, 3; n, Sy, Syy at 0, 2, 4
        cm[iw, iw] += ww
        cm[ih, ih] += hh
        cm[iw, ih] += wh
        cm[ih, iw] += wh.transpose(0, 1)
        cm[iw, 5] += xw
        cm[5, iw] += xw
        cm[ih, 5] += xh
        cm[5, ih] += xh
        cm[5, 5] += (sxy * sxy).sum(0).T

    def _merge(self, nb, rxb, mxb, ryb, myb, m2xb, m2yb, cb):
        """Chan et al.'s pairwise update with another part's moments: its means ``mxb`` (W, H)
        and ``myb`` (H,) as offsets from its references ``rxb`` (W,) and ``ryb`` (H,). The
        references' difference is exact or nearly (two values of the same unit or label), so the
        difference of the means keeps its digits whatever their offset from 0. A hypothesis
        without a symbol so far takes the incoming reference."""
        if not self.rx_set and bool((nb > 0).any()):
            self.rx, self.rx_set = rxb.clone(), True
        self.ry = torch.where((self.n == 0) & (nb > 0), ryb, self.ry)
        mxb = mxb + (rxb - self.rx)[:, None]
        myb = myb + (ryb - self.ry)
        na = self.n
        n = na + nb
        safe = n.clamp(min=1)
        dx = mxb - self.mx
        dy = myb - self.my
        w = na * nb / safe                                       # (H,)
        self.mx = self.mx + dx * (nb / safe)
        self.my = self.my + dy * (nb / safe)
        self.m2x = self.m2x + m2xb + dx * dx * w
        self.m2y = self.m2y + m2yb + dy * dy * w
        self.c = self.c + cb + dx * dy * w
        self.n = n

    def _adopt_label_shift(self, uy, has) -> None:
        """A hypothesis without a labelled record so far (its ``cm`` entries all 0) takes its
        label shift from the first batch or state that has one: a shift of 0 (a batch without
        that label) would leave the products as large as the labels' offset."""
        new = has & ~self.uy_set
        if bool(new.any()):
            self.uy = torch.where(new, uy, self.uy)
            self.uy_set = self.uy_set | new

    def combine(self, other: "PearsonState") -> "PearsonState":
        self._check_combine(other)
        o = other
        if self.clustered and o.clustered and o.cm is not None:
            cm, ux, uy = o.cm.to(self.device), o.ux.to(self.device), o.uy.to(self.device)
            if self.cm is None:
                self.cm, self.ux, self.uy = cm.clone(), ux.clone(), uy.clone()
                self.uy_set = o.uy_set.to(self.device).clone()
            else:
                self._adopt_label_shift(uy, o.uy_set.to(self.device))
                self.cm += moved_sums(cm, ux, uy, self.ux, self.uy)
            self.records = self.records + o.records.to(self.device)
        elif not o.clustered and bool(o.n.sum() > 0):
            self.clustered, self.cm = False, None
        self.xmin = torch.minimum(self.xmin, o.xmin.to(self.device))
        self.xmax = torch.maximum(self.xmax, o.xmax.to(self.device))
        self.ymin = torch.minimum(self.ymin, o.ymin.to(self.device))
        self.ymax = torch.maximum(self.ymax, o.ymax.to(self.device))
        self.exact64 = self.exact64 and o.exact64
        self._merge(o.n.to(self.device), o.rx.to(self.device), o.mx.to(self.device), o.ry.to(self.device),
                    o.my.to(self.device), o.m2x.to(self.device), o.m2y.to(self.device), o.c.to(self.device))
        return self

    # -- results -------------------------------------------------------------------------
    def correlations(self) -> np.ndarray:
        """(width, H) float64 array of r, NaN where undefined."""
        m2x = self.m2x.cpu().numpy()
        m2y = self.m2y.cpu().numpy()[None, :]
        c = self.c.cpu().numpy()
        n = self.n.cpu().numpy()[None, :]
        constant_unit = (self.xmax <= self.xmin).cpu().numpy()[:, None]
        # a unit that varies overall may still be constant on one hypothesis' labelled symbols:
        # its variance there is then pure rounding (see rounding_floor)
        floor = rounding_floor(self.xmin.cpu().numpy(), self.xmax.cpu().numpy(), self.exact64)[:, None]
        with np.errstate(invalid="ignore", over="ignore"):
            tiny_x = m2x <= n * np.maximum(floor, 1e-300) ** 2
        # a label equal on all its symbols: its m2y is rounding of the batch means' merges (r of
        # a constant 0.1 over several batches came out as +-0.05, its p-value below 0.05)
        tiny_y = (m2y <= 0) | (self.ymax <= self.ymin).cpu().numpy()[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            r = c / np.sqrt(m2x * m2y)
        bad = constant_unit | tiny_x | tiny_y | (n < 2)
        r = np.where(bad, np.nan, np.clip(r, -1.0, 1.0))
        return r

    def max_error(self) -> float:
        r = self.correlations()
        n = self.n.cpu().numpy()[None, :].repeat(r.shape[0], 0)
        lo, hi = fisher_interval(r, n, self.confidence)
        half = (hi - lo) / 2
        half = np.where(np.isnan(half), np.inf, half)[~np.isnan(r)]   # r over 3 symbols or fewer: no bound
        return float(half.max()) if half.size else float("inf")

    def score_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """finalize()'s (unit, hypothesis, score) columns without its intervals and p-values."""
        return self.unit_major_rows(self.correlations())

    def finalize(self) -> pa.Table:
        r = self.correlations()
        W, H = r.shape
        n = np.broadcast_to(self.n.cpu().numpy()[None, :], (W, H))
        lo, hi, p, records = self.intervals_of(r, n)
        extra = {} if records is None else {"records": pa.array(records.reshape(-1))}
        return pa.table({
            "unit": pa.array(np.repeat(np.arange(W, dtype=np.int32), H)),
            "hypothesis": pa.array(self.names * W, pa.string()),
            "measure": pa.array([self.measure] * (W * H), pa.string()),
            "score": pa.array(r.reshape(-1), pa.float64(), from_pandas=True),
            "n": pa.array(n.reshape(-1).astype(np.int64)),
            "ci_low": pa.array(lo.reshape(-1), pa.float64(), from_pandas=True),
            "ci_high": pa.array(hi.reshape(-1), pa.float64(), from_pandas=True),
            "p_value": pa.array(p.reshape(-1), pa.float64(), from_pandas=True),
            **extra,
        })

    def intervals_of(self, r: np.ndarray, n: np.ndarray):
        """(ci_low, ci_high, p_value, records) of correlations ``r`` (W, H) over ``n`` symbols:
        record-clustered when every batch came with record ids (records: int64 (W, H)), else
        Fisher's interval and the t-test over symbols (records: None). Also serves
        pointbiserial, whose r is this state's on 0/1 labels."""
        if self.clustered and self.cm is not None:
            se, records = self.clustered_se(r)
            lo, hi, p = clustered_interval(r, se, records, self.confidence)
            return lo, hi, p, np.broadcast_to(records[None, :], r.shape).astype(np.int64)
        lo, hi = fisher_interval(r, n, self.confidence)
        return lo, hi, pearson_p_value(r, n), None

    def clustered_se(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(standard error of each r with records as clusters, (W, H); records with a labelled
        symbol per hypothesis, (H,)). The linearisation (sandwich) estimator: r - rho is about
        the mean of the influence function x~ y~ - r/2 (x~^2 + y~^2) (x~, y~ standardised), so
        var(r) = G/(G-1) * sum_i z_i^2 / N^2 with z_i the sum of the influence function over
        record i's symbols, G records and N symbols. z_i is linear in the record's totals
        (n, Sx, Sy, Sxx, Syy, Sxy), with coefficients from the final means, variances and r, so
        sum_i z_i^2 = v' (sum_i t_i t_i') v comes from ``cm`` whatever the order of the records."""
        n = self.n.cpu().numpy()[None, :]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):   # NaN units stay NaN
            mux = self.mx.cpu().numpy() + (self.rx - self.ux).cpu().numpy()[:, None]
            muy = (self.my + (self.ry - self.uy)).cpu().numpy()[None, :]
            vx = self.m2x.cpu().numpy() / n
            vy = self.m2y.cpu().numpy()[None, :] / n
            a = 1.0 / np.sqrt(vx * vy)
            v = np.stack([mux * muy * a - r / 2 * (mux * mux / vx + muy * muy / vy),   # n
                          -muy * a + r * mux / vx,                                     # Sx
                          -mux * a + r * muy / vy,                                     # Sy
                          -r / (2 * vx),                                               # Sxx
                          np.broadcast_to(-r / (2 * vy), r.shape),                     # Syy
                          a])                                                          # Sxy
            s2 = np.einsum("awh,abwh,bwh->wh", v, self.cm.cpu().numpy(), v)
            g = self.records.cpu().numpy()
            var = np.clip(s2, 0, None) / (n * n) * (g / np.maximum(g - 1, 1))[None, :]
        return np.where(np.isnan(r), np.nan, np.sqrt(var)), g


def grouping_order(record_ids) -> torch.Tensor | None:
    """None when each record's rows in a batch come as one run (the engines' row order); else
    the stable order of the rows by record id, which makes them so: without it every run of a
    record in a shuffled batch counted as a record of its own (600 rows of 30 records in a
    random order made 576 'records' and an interval 3 times too narrow)."""
    ids = record_ids.cpu().numpy() if isinstance(record_ids, torch.Tensor) else np.asarray(record_ids)
    ids = ids.reshape(-1)
    if ids.size < 3:
        return None
    starts = np.concatenate([[0], np.flatnonzero(ids[1:] != ids[:-1]) + 1])
    if np.unique(ids[starts]).size == starts.size:
        return None
    return torch.from_numpy(np.argsort(ids, kind="stable"))


def record_runs(record_ids):
    """(row -> run index tensor, rows per run, number of runs) of a batch whose rows come in
    runs of one record each (the engines' row order)."""
    ids = record_ids.cpu().numpy() if isinstance(record_ids, torch.Tensor) else np.asarray(record_ids)
    cut = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    counts = np.diff(np.concatenate([[0], cut, [len(ids)]]))
    return torch.from_numpy(np.repeat(np.arange(len(counts)), counts)), counts, len(counts)


def record_products(a: torch.Tensor, b: torch.Tensor, counts) -> torch.Tensor:
    """(R, a.cols, b.cols): a_i' b_i for each run i of ``counts`` rows."""
    out = torch.empty(len(counts), a.shape[1], b.shape[1], dtype=b.dtype, device=b.device)
    start = 0
    for i, c in enumerate(counts.tolist()):
        torch.matmul(a[start:start + c].T, b[start:start + c], out=out[i])
        start += c
    return out


def _segment_sum(x: torch.Tensor, seg: torch.Tensor, runs: int) -> torch.Tensor:
    """(runs, cols): the sum of x's rows per run."""
    return torch.zeros(runs, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, seg.to(x.device), x)


def moved_sums(cm: torch.Tensor, ux, uy, to_x, to_y) -> torch.Tensor:
    """Cluster product sums ``cm`` (6, 6, W, H) of totals taken in coordinates shifted by
    (ux, uy), moved to coordinates shifted by (to_x, to_y): each record's totals t become L t
    (x + dx: Sx + dx n, Sxx + 2 dx Sx + dx^2 n, Sxy + dx Sy + dy Sx + dx dy n, ...), so the
    sums become L cm L', applied as row operations and then the same column operations."""
    dx = (ux - to_x)[:, None]                     # (W, 1)
    dy = (uy - to_y)[None, :]                     # (1, H)

    def rows(m):                                  # L m along the first axis
        out = m.clone()
        out[1] += dx * m[0]
        out[2] += dy * m[0]
        out[3] += 2 * dx * m[1] + dx * dx * m[0]
        out[4] += 2 * dy * m[2] + dy * dy * m[0]
        out[5] += dx * m[2] + dy * m[1] + dx * dy * m[0]
        return out

    return rows(rows(cm).transpose(0, 1)).transpose(0, 1)


def clustered_interval(r: np.ndarray, se: np.ndarray, records: np.ndarray, confidence: float):
    """(ci_low, ci_high, p_value) from r and its record-clustered standard error: the interval
    on the Fisher z scale (se_z = se / (1 - r^2), by the delta method, so it stays in [-1, 1]),
    Student's t with G - 1 degrees of freedom (G records); the Wald test of r = 0. NaN with
    fewer than 3 records."""
    g = np.broadcast_to(records[None, :], r.shape)
    df = np.maximum(g - 1, 1)
    q = stats.t.ppf(0.5 + confidence / 2, df)
    with np.errstate(invalid="ignore", divide="ignore"):
        rc = np.clip(r, -1 + 1e-15, 1 - 1e-15)
        sez = se / (1 - rc * rc)
        zr = np.arctanh(rc)
        lo = np.fmin(np.tanh(zr - q * sez), r)
        hi = np.fmax(np.tanh(zr + q * sez), r)
        p = 2 * stats.t.sf(np.abs(r) / se, df)
    p = np.where(se == 0, np.where(r == 0, 1.0, 0.0), p)
    perfect = np.abs(r) >= 1 - 1e-12          # exactly linear: se is rounding, the interval is r itself
    lo, hi, p = np.where(perfect, r, lo), np.where(perfect, r, hi), np.where(perfect, 0.0, p)
    bad = np.isnan(r) | np.isnan(se) | (g < 3)
    return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi), np.where(bad, np.nan, p)


def fisher_interval(r: np.ndarray, n: np.ndarray, confidence: float):
    z = stats.norm.ppf(0.5 + confidence / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = 1.0 / np.sqrt(n - 3)
        zr = np.arctanh(np.clip(r, -1 + 1e-15, 1 - 1e-15))
        lo = np.fmin(np.tanh(zr - z * se), r)   # |r| ~ 1: keep r inside its own interval
        hi = np.fmax(np.tanh(zr + z * se), r)
    undefined = np.isnan(r) | (n <= 3)
    return np.where(undefined, np.nan, lo), np.where(undefined, np.nan, hi)


def pearson_p_value(r: np.ndarray, n: np.ndarray) -> np.ndarray:
    df = n - 2
    with np.errstate(invalid="ignore", divide="ignore"):
        t = r * np.sqrt(df / np.maximum(1.0 - r * r, 1e-300))
        p = 2 * stats.t.sf(np.abs(t), df)
    p = np.where(np.abs(r) >= 1.0, 0.0, p)
    return np.where(np.isnan(r) | (df <= 0), np.nan, p)

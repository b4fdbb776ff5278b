"""Pearson correlation of every unit with every hypothesis, streamed.

State per (unit, hypothesis) pair: the count n, the means of the unit and of the label, the
centred sums of squares M2x, M2y and the co-moment C, over the symbols where the hypothesis has a
label. A batch is reduced with three matrix products (units x hypotheses) in float64 and merged
with Chan et al.'s pairwise update, which is exact up to float64 rounding whatever the batch
order, so a streamed, a merged and a one-shot computation agree.

finalize(): r = C / sqrt(M2x M2y); the p-value of the two-sided t-test with n-2 degrees of
freedom (as scipy.stats.pearsonr); the confidence interval by the Fisher z transform
(tanh(atanh r +- z_{1-a/2} / sqrt(n-3))). A unit or label that is constant over the scored
symbols gives NULL score, interval and p-value.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch
from scipy import stats

from .base import InspectorState, SCORE_SCHEMA, register_measure, scratch

F64 = torch.float64


@register_measure
class PearsonState(InspectorState):
    measure = "corr"
    accepts = ("binary", "continuous")

    def __init__(self, width, hypotheses, device="cpu", confidence: float = 0.95, **params):
        super().__init__(width, hypotheses, device, **params)
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        self.confidence = confidence
        H, W, dev = len(self.names), self.width, self.device
        self.n = torch.zeros(H, dtype=F64, device=dev)
        self.mx = torch.zeros(W, H, dtype=F64, device=dev)
        self.my = torch.zeros(H, dtype=F64, device=dev)
        self.m2x = torch.zeros(W, H, dtype=F64, device=dev)
        self.m2y = torch.zeros(H, dtype=F64, device=dev)
        self.c = torch.zeros(W, H, dtype=F64, device=dev)
        self.xmin = torch.full((W,), math.inf, dtype=F64, device=dev)
        self.xmax = torch.full((W,), -math.inf, dtype=F64, device=dev)

    # -- update: reduce a batch to its own moments, then merge ----------------------------
    def update(self, acts: torch.Tensor, labels: torch.Tensor, record_ids=None) -> None:
        if acts.shape[0] == 0:
            return
        x = acts.to(self.device)
        y = labels.to(self.device, F64)
        mask = ~torch.isnan(y)
        self.xmin = torch.minimum(self.xmin, x.amin(0).to(F64))
        self.xmax = torch.maximum(self.xmax, x.amax(0).to(F64))
        xc = scratch(x.shape[0], x.shape[1], F64, self.device)
        xc.copy_(x)                                              # float64 copy, no allocation
        shift = xc.mean(0)
        xc.sub_(shift)                                           # centred on the batch mean
        H = y.shape[1]
        if bool(mask.all()):                                     # every symbol labelled: the usual case
            nb = torch.full((H,), float(x.shape[0]), dtype=F64, device=self.device)
            myb = y.mean(0)
            yc = y - myb
            cb = (yc.T @ xc).T                                   # (H x n) @ (n x W): the fast orientation
            mxb = shift[:, None].expand(-1, H)                   # the sum of xc is 0 up to rounding
            m2xb = xc.square_().sum(0)[:, None].expand(-1, H)    # (xc is spent after this)
        else:
            m = mask.to(F64)
            nb = m.sum(0)
            safe = nb.clamp(min=1)
            y0 = torch.where(mask, y, torch.zeros((), dtype=F64, device=self.device))
            myb = y0.sum(0) / safe
            yc = (y0 - myb) * m                                  # 0 where no label
            both = (torch.cat([yc, m], 1).T @ xc).T              # one product for C and the sums of x
            cb, sx = both[:, :H], both[:, H:]
            sxx = (m.T @ xc.square_()).T
            mxb = sx / safe + shift[:, None]
            m2xb = (sxx - sx * sx / safe).clamp(min=0)
            cb = cb - sx * (yc.sum(0) / safe)                   # centre x on its masked mean
        m2yb = (yc * yc).sum(0)
        self._merge(nb, mxb, myb, m2xb, m2yb, cb)

    def _merge(self, nb, mxb, myb, m2xb, m2yb, cb):
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

    def combine(self, other: "PearsonState") -> "PearsonState":
        self._check_combine(other)
        o = other
        self.xmin = torch.minimum(self.xmin, o.xmin.to(self.device))
        self.xmax = torch.maximum(self.xmax, o.xmax.to(self.device))
        self._merge(o.n.to(self.device), o.mx.to(self.device), o.my.to(self.device),
                    o.m2x.to(self.device), o.m2y.to(self.device), o.c.to(self.device))
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
        # its variance there is then pure rounding, far below the unit's overall spread
        spread = np.maximum(np.abs(self.xmax.cpu().numpy()), np.abs(self.xmin.cpu().numpy()))[:, None]
        tiny_x = m2x <= n * (1e-12 * np.maximum(spread, 1e-300)) ** 2
        tiny_y = m2y <= 0
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
        half = half[~np.isnan(r)]
        return float(np.nanmax(half)) if half.size else float("inf")

    def score_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """finalize()'s (unit, hypothesis, score) columns without its intervals and p-values."""
        W, H = self.width, len(self.names)
        if getattr(self, "_row_layout", None) is None:
            self._row_layout = (np.repeat(np.arange(W, dtype=np.int64), H), np.array(self.names * W, dtype=object))
        return (*self._row_layout, self.correlations().reshape(-1))

    def finalize(self) -> pa.Table:
        r = self.correlations()
        W, H = r.shape
        n = np.broadcast_to(self.n.cpu().numpy()[None, :], (W, H))
        lo, hi = fisher_interval(r, n, self.confidence)
        p = pearson_p_value(r, n)
        return pa.table({
            "unit": pa.array(np.repeat(np.arange(W, dtype=np.int32), H)),
            "hypothesis": pa.array(self.names * W, pa.string()),
            "measure": pa.array([self.measure] * (W * H), pa.string()),
            "score": pa.array(r.reshape(-1), pa.float64(), from_pandas=True),
            "n": pa.array(n.reshape(-1).astype(np.int64)),
            "ci_low": pa.array(lo.reshape(-1), pa.float64(), from_pandas=True),
            "ci_high": pa.array(hi.reshape(-1), pa.float64(), from_pandas=True),
            "p_value": pa.array(p.reshape(-1), pa.float64(), from_pandas=True),
        }, schema=SCORE_SCHEMA)


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

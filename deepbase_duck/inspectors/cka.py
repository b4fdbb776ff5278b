"""Linear CKA between two unit groups (Kornblith et al. 2019), streamed.

For activation matrices X (n, p) and Y (n, q) over the same symbols, with column-centred Xc, Yc:

    CKA(X, Y) = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)

which equals HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for the linear kernels K = XX^T, L = YY^T.

State: n, the column means of X and Y and the centred cross-product matrices Sxx = Xc^T Xc,
Syy = Yc^T Yc, Sxy = Xc^T Yc, in float64 (the same information as X^T X, Y^T Y, X^T Y and the
column sums, kept centred so that large activation means do not cancel catastrophically). A
batch is reduced with three matrix products about its own means and merged with Chan et al.'s
pairwise update S = Sa + Sb + (na nb / n) da db^T, which is exact up to float64 rounding in any
batch order, so streamed, merged and one-shot results agree (the means are kept as offsets from
the first batch's, so they keep their digits however far the units are from 0). Not a
per-hypothesis measure, so not registered: it compares two groups.

Undefined (NaN, NULL in ``similarities``): fewer than 2 symbols, or a group whose units are all
constant. A unit constant over the symbols (its least and largest value equal, kept per unit)
has centred sums of exactly 0, whatever the rounding of the batch means left in them (a
constant group came out as 0.22 from two batches instead of undefined). A NaN or infinite
activation gives NaN here (the state); ``compare_layers`` refuses such activations first, with an
ActivationError naming the layer.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import DeepBaseError, check_int

F64 = torch.float64


class LinearCKAState:
    def __init__(self, width_x: int, width_y: int, device: str | torch.device = "cpu"):
        # whole numbers >= 1 (2.0 is taken as 2); 2.5, '2' or True are refused, not truncated
        self.width_x = check_int("cka: width_x (units of the first group)", width_x, 1)
        self.width_y = check_int("cka: width_y (units of the second group)", width_y, 1)
        self.device = torch.device(device)
        dev = self.device
        self.n = 0
        # the means as offsets from references rx, ry (the first batch's means): merged as
        # absolute values they were each rounded to float64's spacing at their size (1.5e-8 at
        # 1e8), which put a streamed CKA of units 1e8 + 1e-3 N(0, 1) 4e-7 off (see _merge)
        self.rx = torch.zeros(self.width_x, dtype=F64, device=dev)
        self.ry = torch.zeros(self.width_y, dtype=F64, device=dev)
        self.mx = torch.zeros(self.width_x, dtype=F64, device=dev)
        self.my = torch.zeros(self.width_y, dtype=F64, device=dev)
        self.sxx = torch.zeros(self.width_x, self.width_x, dtype=F64, device=dev)
        self.syy = torch.zeros(self.width_y, self.width_y, dtype=F64, device=dev)
        self.sxy = torch.zeros(self.width_x, self.width_y, dtype=F64, device=dev)
        # each unit's least and largest value: a constant unit's centred sums are exactly 0
        self.lo_x = torch.full((self.width_x,), math.inf, dtype=F64, device=dev)
        self.hi_x = torch.full((self.width_x,), -math.inf, dtype=F64, device=dev)
        self.lo_y = torch.full((self.width_y,), math.inf, dtype=F64, device=dev)
        self.hi_y = torch.full((self.width_y,), -math.inf, dtype=F64, device=dev)

    def update(self, x, y) -> None:
        """Fold in a batch: ``x`` (n, width_x) and ``y`` (n, width_y), row i of both the same symbol."""
        x = torch.as_tensor(x).to(self.device, F64)
        y = torch.as_tensor(y).to(self.device, F64)
        if x.ndim != 2 or x.shape[1] != self.width_x or y.ndim != 2 or y.shape[1] != self.width_y:
            raise DeepBaseError(f"cka: got shapes {tuple(x.shape)} and {tuple(y.shape)}, expected "
                                f"(n, {self.width_x}) and (n, {self.width_y})")
        if x.shape[0] != y.shape[0]:
            raise DeepBaseError(f"cka: {x.shape[0]} rows of x but {y.shape[0]} rows of y; both "
                                "groups must cover the same symbols")
        nb = x.shape[0]
        if nb == 0:
            return
        self.lo_x, self.hi_x = torch.minimum(self.lo_x, x.amin(0)), torch.maximum(self.hi_x, x.amax(0))
        self.lo_y, self.hi_y = torch.minimum(self.lo_y, y.amin(0)), torch.maximum(self.hi_y, y.amax(0))
        rxb, ryb = x.mean(0), y.mean(0)
        xc, yc = x - rxb, y - ryb
        ex, ey = xc.mean(0), yc.mean(0)                 # the means about the rounded ones
        self._merge(nb, rxb, ex, ryb, ey, xc.T @ xc - nb * torch.outer(ex, ex),
                    yc.T @ yc - nb * torch.outer(ey, ey), xc.T @ yc - nb * torch.outer(ex, ey))

    def _merge(self, nb, rxb, mxb, ryb, myb, sxxb, syyb, sxyb):
        """Chan et al.'s update with another part's moments, its means ``mxb``, ``myb`` given as
        offsets from its references ``rxb``, ``ryb``: the references' difference is exact or
        nearly (values of the same units), so the means' difference keeps its digits."""
        if self.n == 0:
            self.rx, self.ry = rxb.clone(), ryb.clone()
        mxb, myb = mxb + (rxb - self.rx), myb + (ryb - self.ry)
        na = self.n
        n = na + nb
        dx, dy = mxb - self.mx, myb - self.my
        w = na * nb / n
        self.sxx = self.sxx + sxxb + w * torch.outer(dx, dx)
        self.syy = self.syy + syyb + w * torch.outer(dy, dy)
        self.sxy = self.sxy + sxyb + w * torch.outer(dx, dy)
        self.mx = self.mx + dx * (nb / n)
        self.my = self.my + dy * (nb / n)
        self.n = n

    def combine(self, other: "LinearCKAState") -> "LinearCKAState":
        if not isinstance(other, LinearCKAState) or (other.width_x, other.width_y) != (self.width_x, self.width_y):
            raise DeepBaseError("cka: cannot combine states over unit groups of different widths")
        if other.n:
            d = self.device
            self.lo_x = torch.minimum(self.lo_x, other.lo_x.to(d))
            self.hi_x = torch.maximum(self.hi_x, other.hi_x.to(d))
            self.lo_y = torch.minimum(self.lo_y, other.lo_y.to(d))
            self.hi_y = torch.maximum(self.hi_y, other.hi_y.to(d))
            self._merge(other.n, other.rx.to(d), other.mx.to(d), other.ry.to(d), other.my.to(d),
                        other.sxx.to(d), other.syy.to(d), other.sxy.to(d))
        return self

    def finalize(self) -> float:
        """Linear CKA in [0, 1]; NaN with fewer than 2 symbols, a group of constant units only or
        a NaN or infinite activation."""
        if self.n < 2:
            return math.nan
        # a NaN or infinite activation anywhere: the bounds hold it (torch.minimum / maximum
        # propagate NaN). Checked here, not left to the sums: a unit at +inf on every symbol
        # has bounds inf == inf and would count as constant, dropped with a finite CKA
        if not all(bool(torch.isfinite(v).all()) for v in (self.lo_x, self.hi_x, self.lo_y, self.hi_y)):
            return math.nan
        vx = ~(self.hi_x <= self.lo_x)        # varying units
        vy = ~(self.hi_y <= self.lo_y)
        return _cka(torch.where(vx[:, None] & vx[None, :], self.sxx, 0.0),
                    torch.where(vy[:, None] & vy[None, :], self.syy, 0.0),
                    torch.where(vx[:, None] & vy[None, :], self.sxy, 0.0))


def _cka(sxx, syy, sxy) -> float:
    """CKA from centred cross-product matrices (torch or numpy), NaN where undefined."""
    sxx, syy, sxy = (torch.as_tensor(m) for m in (sxx, syy, sxy))
    num = float((sxy * sxy).sum())
    den = float(torch.linalg.matrix_norm(sxx) * torch.linalg.matrix_norm(syy))
    if not den > 0 or math.isnan(num):
        return math.nan
    return min(1.0, max(0.0, num / den))


def linear_cka(x, y) -> float:
    """Linear CKA of two in-memory activation matrices (n, p) and (n, q) (numpy or torch); NaN
    where undefined, as LinearCKAState's (constant columns have centred sums of exactly 0)."""
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise DeepBaseError(f"cka: need two matrices over the same rows, got {x.shape} and {y.shape}")
    if x.shape[0] < 2:
        return math.nan
    with np.errstate(invalid="ignore", over="ignore"):
        # centred twice: the second pass takes out what the rounded mean left (a unit
        # 1e8 + 1e-3 N(0, 1): the rounding of its mean is 1e-5 of its spread, CKA 1e-9 off)
        xc, yc = x - x.mean(0), y - y.mean(0)
        xc = np.where(np.ptp(x, 0) == 0, 0.0, xc - xc.mean(0))   # a constant column: exactly 0
        yc = np.where(np.ptp(y, 0) == 0, 0.0, yc - yc.mean(0))
        return _cka(xc.T @ xc, yc.T @ yc, xc.T @ yc)

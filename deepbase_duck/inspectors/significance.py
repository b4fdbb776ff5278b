"""Multiple-testing correction and permutation tests for unit x hypothesis scores.

``benjamini_hochberg(p_values)``
    Benjamini-Hochberg (1995) adjusted p-values ("q-values") controlling the false discovery
    rate: with the m non-NaN p-values sorted increasingly, q_(i) = min_{k >= i} p_(k) m / k,
    capped at 1, returned in the input's order and shape. NaN p-values (undefined scores) are
    left out of m and stay NaN. On input without NaN this is
    scipy.stats.false_discovery_control(p, method='bh').

``permutation_p_values(acts, labels, measure_fn, n_permutations, seed)``
    Monte-Carlo permutation test for in-memory samples (the engine calls it on a sample of
    rows). The null hypothesis is that the labels are exchangeable across rows, independent of
    the activations: the label rows (all hypotheses together, NaNs travelling with their row)
    are shuffled ``n_permutations`` times with a seeded numpy Generator and ``measure_fn`` is
    recomputed each time. p = (1 + #{permuted scores at least as extreme}) / (1 + #{defined
    permuted scores}) (Phipson & Smyth 2010: never 0, valid at any number of permutations), per
    score; 'two-sided' compares |score|, 'greater' / 'less' the signed score; a relative
    tolerance of 1e-12 counts ties as extreme. Undefined (NaN) observed scores give NaN.
    ``measure_fn(acts, labels) -> array`` of scores (any shape, e.g. (units, hypotheses)), or a
    registered measure name together with ``hypotheses`` (its scores laid out as (units, H));
    a measure of the unit group as a whole (``probe``: rows without a unit) is refused.
    ``n_permutations`` is a whole number >= 1 (2.0 is taken as 2; 1.7 or '3' are refused).
    ``seed`` is a whole number >= 0 (the same seed gives the same permutations, hence the same
    p-values; None is refused rather than drawing fresh, irreproducible permutations).
    The smallest attainable p-value is 1 / (n_permutations + 1); rows are assumed exchangeable
    (symbols of one record are not independent, so treat the p-values as approximate there).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import DeepBaseError, check_integer


def benjamini_hochberg(p_values) -> np.ndarray:
    p = np.asarray(p_values, dtype=np.float64)
    shape = p.shape
    flat = p.reshape(-1)
    ok = ~np.isnan(flat)
    ps = flat[ok]
    if ((ps < 0) | (ps > 1)).any():
        raise DeepBaseError("benjamini_hochberg: p-values must lie in [0, 1]")
    out = np.full(flat.shape, np.nan)
    m = ps.size
    if m:
        order = np.argsort(ps, kind="stable")
        scaled = ps[order] * m / np.arange(1, m + 1)
        q = np.minimum.accumulate(scaled[::-1])[::-1]
        q = np.minimum(q, 1.0)
        res = np.empty(m)
        res[order] = q
        out[ok] = res
    return out.reshape(shape)


def measure_score_fn(measure: str, hypotheses: list[dict], device="cpu", **params) -> Callable:
    """A ``measure_fn`` for permutation_p_values computing the registered ``measure``'s scores
    as a (units, H) array (one state per call: update with all rows, finalize). Only for
    unit-level measures: one that scores the unit group as a whole (``probe``, whose rows have
    no unit) is refused with a DeepBaseError. The rows carry no record ids, so mi's
    ``calibration_records`` is set aside (its bins come from the rows themselves)."""
    from .base import measure_class

    cls = measure_class(measure)

    def refuse():
        raise DeepBaseError(f"permutation_p_values: measure {measure!r} scores the unit group as a whole "
                            "(its rows have no unit); unit-level permutation p-values do not apply to it")

    if not getattr(cls, "unit_level", True):
        refuse()
    if params.get("calibration_records") is not None:
        # mi's bins from given records: the rows permuted here come without record ids (and
        # every update refused them). The bins only need to be the same for the observed and
        # every permuted score, which the activations alone fix (only the labels move): they
        # come from the rows' first calibration_rows instead
        params = {k: v for k, v in params.items() if k != "calibration_records"}

    def fn(acts, labels):
        a = torch.as_tensor(np.asarray(acts))
        y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
        if y.ndim == 1:
            y = y[:, None]
        st = cls(a.shape[1], hypotheses, device, **params)
        st.update(a, y)
        t = st.finalize()
        if t.column("unit").null_count:
            refuse()
        units = np.asarray(t.column("unit").to_numpy(zero_copy_only=False))
        score = t.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        out = np.full((a.shape[1], len(hypotheses)), np.nan)
        name_idx = {h["name"]: i for i, h in enumerate(hypotheses)}
        hyp = [name_idx[h] for h in t.column("hypothesis").to_pylist()]
        out[units, hyp] = score
        return out

    return fn


def permutation_p_values(acts, labels, measure_fn, n_permutations: int = 1000, seed: int = 0,
                         alternative: str = "two-sided", hypotheses: list[dict] | None = None,
                         **params) -> np.ndarray:
    if alternative not in ("two-sided", "greater", "less"):
        raise DeepBaseError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    n_permutations = check_integer("permutation_p_values: n_permutations", n_permutations, 1)
    # a whole number >= 0, as the measures' seeds: None (fresh OS entropy) made p-values that
    # changed from call to call, and -1 or 2.5 failed inside numpy with no name of the parameter
    seed = check_integer("permutation_p_values: seed", seed, 0)
    if isinstance(measure_fn, str):
        if hypotheses is None:
            raise DeepBaseError("permutation_p_values: a measure name needs hypotheses=[...]")
        measure_fn = measure_score_fn(measure_fn, hypotheses, **params)
    a = acts.cpu().numpy() if isinstance(acts, torch.Tensor) else np.asarray(acts)
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if a.shape[0] != y.shape[0]:
        raise DeepBaseError(f"acts have {a.shape[0]} rows but labels {y.shape[0]}")
    obs = np.asarray(measure_fn(a, y), dtype=np.float64)
    rng = np.random.default_rng(seed)
    extreme = np.zeros(obs.shape)
    defined = np.zeros(obs.shape)
    tol = 1e-12 * np.maximum(np.abs(obs), 1.0)
    for _ in range(n_permutations):
        perm = rng.permutation(y.shape[0])
        s = np.asarray(measure_fn(a, y[perm]), dtype=np.float64)
        ok = ~np.isnan(s)
        if alternative == "two-sided":
            hit = np.abs(s) >= np.abs(obs) - tol
        elif alternative == "greater":
            hit = s >= obs - tol
        else:
            hit = s <= obs + tol
        extreme += hit & ok
        defined += ok
    p = (1 + extreme) / (1 + defined)
    return np.where(np.isnan(obs), np.nan, p)

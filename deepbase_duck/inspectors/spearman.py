"""Spearman rank correlation of every unit with every hypothesis, on a mergeable row sample.

Ranks are global: one row's rank depends on every other row, so Spearman's rho has no exact
streaming state of bounded size. This measure therefore keeps a *bounded, mergeable, uniform
sample of rows* and computes the exact Spearman coefficient on it at finalize.

The sample (``RowSample``, shared with the ``ap`` measure of ``dissection.py``)
------------------------------------------------------------------------------
Every row gets a 63-bit key, a seeded hash of the row's content (the bits of its activations and
labels, and its record id): ``row_keys``. The state keeps the ``max_rows`` rows with the smallest
keys (a "bottom-k" sample, default ``max_rows=200_000``). Because the key is a function of the row
alone and not of its arrival order or of the state that saw it, the sample is the same set of rows
however the stream is split into batches and states: ``combine`` keeps the smallest keys of the
union, which is exactly the bottom-k sample of the concatenated stream (a one-shot sample). The
keys behave as independent uniform draws (different rows collide with probability ~k^2 / 2^64;
rows with equal keys are identical, so which copy is kept does not matter), so the sample is a
uniform sample without replacement of the rows. ``seed`` changes the hash and hence the sample
(every bit of it: seeds equal mod 2^32 give different samples).
Rows identical in activations, labels and record id share a key and so enter or leave the sample
together; pass ``record_ids`` to ``update`` (the engine does) so that identical rows of different
records (e.g. the first symbol of every record) are sampled independently.

Error
-----
* Exact (equal to ``scipy.stats.spearmanr`` on all labelled rows, average ranks for ties, to
  float64 rounding) whenever the stream has at most ``max_rows`` rows.
* Beyond that the score is the exact Spearman rho of a uniform random sample of ``n_sample``
  labelled rows: it estimates the full-stream rho with a standard error of about
  sqrt((1 + r^2/2) / (n_sample - 3)) on the Fisher z scale (Bonett & Wright 2000). The confidence
  interval is computed from ``n_sample``, so it covers this sampling error.

Output
------
score = rho on the sample; n = labelled rows in the whole stream (exact). Intervals, with
``intervals`` = 'records' (the default, when every batch came with record ids, as from the
engines): records as clusters, as corr's: rho is Pearson's r of the sample's average ranks, and
its standard error is the sandwich (linearisation) one of that r with the ranks taken as given,
var = G/(G-1) sum_g z_g^2 / n^2 (z_g: record g's sum of x~ y~ - rho/2 (x~^2 + y~^2) over the
standardised ranks of its sampled rows, G records with a labelled sampled row, column
``records``); ci on the Fisher z scale with t at G - 1 degrees of freedom and the Wald p-value
(correlation.clustered_interval); NULL with fewer than 3 records. With ``intervals`` = 'symbols'
(or a batch without record ids): ci by Fisher z with the Bonett-Wright variance
(1 + r^2/2) / (n_sample - 3); p_value by the t approximation with n_sample - 2 degrees of
freedom (as scipy.stats.spearmanr). Extra column ``n_sample``: labelled
rows in the sample. A unit or label that is constant over the scored rows gives NULL, and so
does a unit with a NaN or infinite activation anywhere in the stream (as corr). Labels as corr
reads them: a binary hypothesis' label is 0 or any other value (1); an infinite label of a
continuous hypothesis is refused (HypothesisError).
max_error() is the largest half-width that interval can have at the current sample sizes
(maximised over r, so it needs no ranking and is cheap to call after every batch).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from scipy import stats

from .base import InspectorState, SCORE_SCHEMA, check_batch, register_measure
from .correlation import pearson_p_value
from ..errors import DeepBaseError, check_float, check_intervals, check_integer

F64 = torch.float64
I64 = torch.int64

_MASK32 = 0xFFFFFFFF
_MUL = 0x45D9F3B                    # < 2^27: a 32-bit value times it fits an int64, no overflow
_CANON_NAN = 0x7FF8000000000000      # every NaN hashes as this one bit pattern
KEY_SENTINEL = (1 << 63) - 1         # larger than every real key (padding / "no row")
_KEY_MAX = (1 << 63) - 2
# Rows whose activations * labels exceed this many elements are hashed in chunks.
_HASH_CHUNK = 1 << 22


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in [0, 2^32)."""
    x = (((x >> 16) ^ x) * _MUL) & _MASK32
    x = (((x >> 16) ^ x) * _MUL) & _MASK32
    return (x >> 16) ^ x


def _xor_fold(t: torch.Tensor) -> torch.Tensor:
    """XOR of the columns of an (n, D) int64 tensor."""
    while t.shape[1] > 1:
        if t.shape[1] % 2:
            t = torch.cat([t, torch.zeros_like(t[:, :1])], 1)
        t = t[:, 0::2] ^ t[:, 1::2]
    return t[:, 0]


def _bits(x: torch.Tensor) -> torch.Tensor:
    x = x.to(F64)
    x = torch.where(x == 0, torch.zeros((), dtype=F64, device=x.device), x)   # -0.0 -> 0.0
    b = x.contiguous().view(I64)
    return torch.where(torch.isnan(x), torch.full((), _CANON_NAN, dtype=I64, device=x.device), b)


def row_keys(acts: torch.Tensor, labels: torch.Tensor, record_ids: torch.Tensor | None,
             seed: int = 0) -> torch.Tensor:
    """(n,) int64 keys in [0, 2^63 - 2]: a seeded hash of each row's activations, labels and
    record id. Equal rows get equal keys; otherwise the keys behave as independent uniforms.

    ``seed`` (a whole number >= 0) seeds the hash's salts through numpy's SeedSequence with the
    entropy [seed mod 2^32, D, 0x5EED] (D: words hashed per row), followed by seed // 2^32 when
    that is not 0: every bit of the seed counts (seeds equal mod 2^32 used to give the same
    keys), and a seed below 2^32 gives the keys it always did (stored samples keep them)."""
    seed = check_integer("row_keys: seed", seed, 0)
    n = acts.shape[0]
    dev = acts.device
    parts = [_bits(acts.reshape(n, -1)), _bits(labels.reshape(n, -1).to(dev))]
    if record_ids is not None:
        parts.append(record_ids.reshape(n, 1).to(dev, I64))
    b = torch.cat(parts, 1)
    D = b.shape[1]
    high = seed >> 32                # a trailing 0 would not change SeedSequence's state: left out
    rng = np.random.default_rng([seed & _MASK32, D, 0x5EED] + ([high] if high else []))
    salts = torch.as_tensor(rng.integers(0, 1 << 32, size=(2, D), dtype=np.int64), device=dev)
    fin = rng.integers(0, 1 << 32, size=2, dtype=np.int64)
    out = torch.empty(n, dtype=I64, device=dev)
    step = max(1, _HASH_CHUNK // max(D, 1))
    for s in range(0, n, step):
        c = b[s:s + step]
        h = _mix32(_mix32((c & _MASK32) ^ salts[0]) ^ ((c >> 32) & _MASK32))    # (m, D) 32-bit
        h1 = _mix32(_xor_fold(h) ^ int(fin[0]))
        h2 = ((h ^ salts[1]).sum(1) & _MASK32) ^ int(fin[1])      # sum < D 2^32: no overflow
        h2 = _mix32(_mix32(h2) ^ h1)
        out[s:s + step] = ((h1 << 31) | (h2 >> 1)).clamp(max=_KEY_MAX)
    return out


def store_dtype(dtype: torch.dtype, current: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a sample keeps activations of ``dtype`` in, next to ones kept in ``current``:
    float32 unless that would round them -- float64 and integers wider than 16 bits are kept
    in float64 (int64 activations 2^26 + 0..7 held as float32 fell on multiples of 8: ties
    that took spearman's rho from 0.71 to 0.65 and ap from 0.85 to 0.73)."""
    wide = dtype == F64 or (not (dtype.is_floating_point or dtype.is_complex) and dtype != torch.bool
                            and torch.iinfo(dtype).bits > 16)
    return F64 if (wide or current == F64) else torch.float32


class RowSample:
    """The ``max_rows`` rows of smallest key seen so far (activations, labels, keys).

    Mergeable and order-independent: see the module docstring."""

    def __init__(self, width: int, n_hyp: int, max_rows: int, device):
        if int(max_rows) < 4:
            raise DeepBaseError(f"max_rows must be at least 4, got {max_rows}")
        self.max_rows = int(max_rows)
        self.device = torch.device(device)
        self.keys = torch.empty(0, dtype=I64, device=self.device)
        self.acts = torch.empty(0, width, dtype=torch.float32, device=self.device)
        self.labels = torch.empty(0, n_hyp, dtype=F64, device=self.device)
        self.recs = torch.empty(0, dtype=I64, device=self.device)     # record ids (-1: not known)

    def __len__(self):
        return int(self.keys.numel())

    def add(self, keys: torch.Tensor, acts: torch.Tensor, labels: torch.Tensor, recs=None) -> None:
        keys = keys.to(self.device)
        acts = acts.to(self.device)
        labels = labels.to(self.device, F64)
        if keys.numel() == 0:
            return
        recs = (torch.full_like(keys, -1) if recs is None else recs.to(self.device, I64).reshape(-1))
        store = store_dtype(acts.dtype, self.acts.dtype)
        if self.acts.dtype != store:
            self.acts = self.acts.to(store)
        acts = acts.to(store)
        if len(self) >= self.max_rows:               # full: only smaller keys can enter
            keep = keys < self.keys.max()
            if not bool(keep.any()):
                return
            keys, acts, labels, recs = keys[keep], acts[keep], labels[keep], recs[keep]
        k = torch.cat([self.keys, keys])
        a = torch.cat([self.acts, acts])
        y = torch.cat([self.labels, labels])
        g = torch.cat([self.recs, recs])
        if k.numel() > self.max_rows:
            idx = torch.topk(k, self.max_rows, largest=False, sorted=False).indices
            k, a, y, g = k[idx], a[idx], y[idx], g[idx]
        self.keys, self.acts, self.labels, self.recs = k, a, y, g

    def merge(self, other: "RowSample") -> None:
        if other.max_rows != self.max_rows:
            raise DeepBaseError(f"cannot combine row samples of max_rows {other.max_rows} and "
                                f"{self.max_rows}")
        self.add(other.keys, other.acts, other.labels, other.recs)


def argsort_rows(t: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Indices sorting each row of a 2-D tensor (order among ties unspecified). On CPU this uses
    numpy's vectorised sort, several times faster than torch's."""
    if t.device.type == "cpu":
        a = t.detach().numpy()
        return torch.from_numpy(np.argsort(-a if descending else a, axis=1))
    return torch.sort(t, dim=1, descending=descending).indices


def top_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, k + 1) indices per row of a 2-D tensor with k + 1 <= its columns: the first k
    index the k largest values of the row (in no particular order), the last the (k+1)-th
    largest (a partial sort: numpy's argpartition on CPU, torch.topk elsewhere)."""
    if t.device.type == "cpu":
        a = t.detach().numpy()
        if k + 1 >= a.shape[1]:
            return torch.from_numpy(np.argsort(-a, axis=1)[:, :k + 1])
        return torch.from_numpy(np.argpartition(-a, k, axis=1)[:, :k + 1])
    return torch.topk(t, k + 1, dim=1, largest=True, sorted=True).indices


def sort_rows(t: torch.Tensor) -> torch.Tensor:
    """Each row of a 2-D tensor sorted increasingly (values only)."""
    if t.device.type == "cpu":
        return torch.from_numpy(np.sort(t.detach().numpy(), axis=1))
    return torch.sort(t, dim=1).values


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each column of an (m, k) tensor, ties given their average rank
    (scipy.stats.rankdata(method='average') per column), float64."""
    m, k = v.shape
    if m == 0:
        return torch.empty(0, k, dtype=F64, device=v.device)
    vt = v.T.contiguous()                                         # (k, m): rows are columns of v
    order = argsort_rows(vt)
    s = torch.gather(vt, 1, order)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    end = torch.ones_like(new)
    end[:, :-1] = new[:, 1:]
    pos = torch.arange(m, device=v.device, dtype=I64)[None, :].expand(k, m)
    first = torch.where(new, pos, torch.zeros_like(pos)).cummax(1).values
    last = torch.where(end, pos, torch.full_like(pos, m - 1)).flip(1).cummin(1).values.flip(1)
    r_sorted = (first + last).to(F64) / 2 + 1
    ranks = torch.empty_like(r_sorted)
    ranks.scatter_(1, order, r_sorted)
    return ranks.T


def _unit_blocks(m: int, width: int, budget: int = 1 << 22):
    step = max(1, budget // max(m, 1))
    return [(s, min(s + step, width)) for s in range(0, width, step)]


def spearman_matrix(acts: torch.Tensor, labels: torch.Tensor, records: torch.Tensor | None = None):
    """Exact Spearman rho of each column of ``acts`` (m, W) with each column of ``labels`` (m, H)
    over the rows where that label is not NaN. Returns (rho (W, H) with NaN where undefined,
    counts (H,)). Vectorised over units (in blocks bounding memory) and over hypotheses sharing
    the same NaN pattern. With ``records`` (m,) the row's record: also (se (W, H), clusters (H,)),
    the standard error of each rho with records as clusters, that of Pearson's r on the ranks
    (taken as given): var = G/(G-1) sum_g z_g^2 / n^2, z_g the record's sum of the influence
    x~ y~ - rho/2 (x~^2 + y~^2) of the standardised ranks, over the G records with a labelled row."""
    m, W = acts.shape
    H = labels.shape[1]
    rho = np.full((W, H), np.nan)
    se = np.full((W, H), np.nan) if records is not None else None
    clusters = np.zeros(H, np.int64)
    mask = ~torch.isnan(labels)
    counts = mask.sum(0).cpu().numpy().astype(np.int64)
    if H == 0 or m == 0:
        return (rho, counts) if records is None else (rho, counts, se, clusters)
    patterns, inverse = torch.unique(mask.T, dim=0, return_inverse=True)
    for g in range(patterns.shape[0]):
        hs = torch.nonzero(inverse == g).flatten()
        rows = patterns[g]
        mg = int(rows.sum())
        if mg < 2:
            continue
        y = labels[rows][:, hs]
        ry = average_ranks(y) - (mg + 1) / 2.0
        syy = (ry * ry).sum(0)                                    # (Hg,)
        hs_np = hs.cpu().numpy()
        if records is not None:
            _, inv = torch.unique(records[rows], return_inverse=True)
            G = int(inv.max()) + 1
            clusters[hs_np] = G
            yt = ry / torch.sqrt(syy / mg).clamp(min=1e-300)      # standardised ranks
            syy_g = torch.zeros(G, len(hs), dtype=F64, device=ry.device).index_add_(0, inv, yt * yt)
        for a, b in _unit_blocks(mg, W):
            rx = average_ranks(acts[rows, a:b]) - (mg + 1) / 2.0
            sxx = (rx * rx).sum(0)                                # (blk,)
            num = rx.T @ ry
            den = torch.sqrt(sxx[:, None] * syy[None, :])
            r = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                            torch.full_like(num, float("nan")))
            r = r.clamp(-1, 1)
            rho[a:b, hs_np] = r.cpu().numpy()
            if records is not None:
                xt = rx / torch.sqrt(sxx / mg).clamp(min=1e-300)
                sxx_g = torch.zeros(G, b - a, dtype=F64, device=rx.device).index_add_(0, inv, xt * xt)
                for j, h in enumerate(hs_np):
                    sxy_g = torch.zeros(G, b - a, dtype=F64, device=rx.device).index_add_(0, inv, xt * yt[:, j:j + 1])
                    z = sxy_g - r[:, j] / 2 * (sxx_g + syy_g[:, j:j + 1])
                    var = z.square().sum(0) * (G / max(G - 1, 1)) / (mg * mg)
                    se[a:b, h] = var.sqrt().cpu().numpy()
    return (rho, counts) if records is None else (rho, counts, se, clusters)


def fisher_interval_bw(r: np.ndarray, n: np.ndarray, confidence: float):
    """Fisher-z interval with the Bonett-Wright variance (1 + r^2/2) / (n - 3)."""
    z = stats.norm.ppf(0.5 + confidence / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt((1 + r * r / 2) / (n - 3))
        zr = np.arctanh(np.clip(r, -1 + 1e-15, 1 - 1e-15))
        lo = np.minimum(np.tanh(zr - z * se), r)            # rounding at |r| = 1 must not exclude r
        hi = np.maximum(np.tanh(zr + z * se), r)
    bad = np.isnan(r) | (n <= 3)
    return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)


def worst_half_width(n: int, confidence: float) -> float:
    """max over r of the half-width of fisher_interval_bw at sample size n (inf if n <= 3)."""
    if n <= 3:
        return float("inf")
    r = np.linspace(0, 0.999, 1000)
    lo, hi = fisher_interval_bw(r, np.full_like(r, n), confidence)
    return float(((hi - lo) / 2).max())


def score_table(measure: str, names: list[str], score: np.ndarray, n: np.ndarray, lo: np.ndarray,
                hi: np.ndarray, p: np.ndarray, extra: dict | None = None) -> pa.Table:
    """Lay out (W, H) arrays as a SCORE_SCHEMA table (unit-major), plus extra (W, H) columns
    given as {name: (array, arrow type)}."""
    W, H = score.shape
    shape = (W, H)

    def col(a, typ=pa.float64()):
        a = np.broadcast_to(np.asarray(a), shape).reshape(-1)
        return pa.array(a, typ, from_pandas=True)

    cols = {
        "unit": pa.array(np.repeat(np.arange(W, dtype=np.int32), H)),
        "hypothesis": pa.array(list(names) * W, pa.string()),
        "measure": pa.array([measure] * (W * H), pa.string()),
        "score": col(score),
        "n": col(np.rint(np.asarray(n, dtype=np.float64)).astype(np.int64), pa.int64()),
        "ci_low": col(lo),
        "ci_high": col(hi),
        "p_value": col(p),
    }
    fields = list(SCORE_SCHEMA)
    for name, (arr, typ) in (extra or {}).items():
        if isinstance(arr, pa.Array):
            cols[name] = arr
        elif isinstance(arr, list):
            cols[name] = pa.array(arr, typ)
        else:
            cols[name] = col(arr, typ)
        fields.append(pa.field(name, typ))
    return pa.table(cols, schema=pa.schema(fields))


class SampledState(InspectorState):
    """Base of measures computed at finalize on a RowSample of the stream (exact when the stream
    fits in ``max_rows``): keeps the sample, the labelled-row counts and the rows seen, and which
    units had only finite activations (a unit with a NaN or infinite one scores NULL, as in corr,
    whether or not that row is in the sample)."""

    def __init__(self, width, hypotheses, device="cpu", max_rows: int = 200_000, seed: int = 0,
                 confidence: float = 0.95, **params):
        super().__init__(width, hypotheses, device, **params)
        self.with_records = True                     # every batch came with record ids
        self.confidence = check_float(f"{self.measure}: confidence", confidence, 0, 1, open_low=True,
                                      open_high=True)
        self.seed = check_integer(f"{self.measure}: seed", seed, 0)
        max_rows = check_integer(f"{self.measure}: max_rows", max_rows, 4)
        self.sample = RowSample(self.width, len(self.names), max_rows, self.device)
        self.n = torch.zeros(len(self.names), dtype=I64, device=self.device)   # labelled rows
        self.rows = 0
        self.finite = torch.ones(self.width, dtype=torch.bool, device=self.device)

    def update(self, acts, labels, record_ids=None) -> None:
        labels = check_batch(self, acts, labels, record_ids)
        if acts.shape[0] == 0:
            return
        acts = acts.to(self.device)
        labels = self.read_labels(labels)         # binary as 0/1; an infinite continuous label refused
        keys = row_keys(acts, labels, None if record_ids is None else record_ids.to(self.device), self.seed)
        self.n += (~torch.isnan(labels)).sum(0)
        self.rows += int(acts.shape[0])
        self.finite &= torch.isfinite(acts).all(0)
        self.with_records = self.with_records and record_ids is not None
        self.sample.add(keys, acts, labels, record_ids)

    def combine(self, other: "SampledState") -> "SampledState":
        self._check_combine(other)
        if other.seed != self.seed:
            raise DeepBaseError(f"{self.measure}: cannot combine states of seeds {other.seed} and {self.seed}")
        # checked here, before the counts change: the sample's merge refused it after self.n and
        # self.rows had taken other's rows (a caller going on after the error had n doubled)
        if other.sample.max_rows != self.sample.max_rows:
            raise DeepBaseError(f"{self.measure}: cannot combine states of max_rows {other.sample.max_rows} and "
                                f"{self.sample.max_rows} (their row samples differ); give every state the same "
                                "max_rows")
        self.n += other.n.to(self.device)
        self.rows += other.rows
        self.finite &= other.finite.to(self.device)
        self.with_records = self.with_records and other.with_records
        self.sample.merge(other.sample)
        return self


@register_measure
class SpearmanState(SampledState):
    measure = "spearman"
    accepts = ("binary", "continuous")

    def __init__(self, width, hypotheses, device="cpu", intervals: str = "records", **params):
        check_intervals("spearman", intervals,
                        "every symbol independent: Fisher z with the Bonett-Wright variance")
        super().__init__(width, hypotheses, device, **params)
        self.intervals = intervals

    @property
    def exact(self) -> bool:
        """True while every row seen is in the sample (the score is then exact)."""
        return self.rows <= self.sample.max_rows

    @property
    def clustered(self) -> bool:
        return self.intervals == "records" and self.with_records

    def _scores(self):
        rho, counts = spearman_matrix(self.sample.acts, self.sample.labels)
        return np.where(self.finite.cpu().numpy()[:, None], rho, np.nan), counts

    def score_rows(self):
        """finalize()'s (unit, hypothesis, score) columns without its intervals (the stop rules
        read only the scores)."""
        return self.unit_major_rows(self._scores()[0])

    def max_error(self) -> float:
        """The largest half-width the interval can take at the current sample sizes (maximised
        over r on a grid, so no ranking is needed: cheap enough to call after every batch)."""
        m = (~torch.isnan(self.sample.labels)).sum(0).cpu().numpy()
        return worst_half_width(int(m.min()) if m.size else 0, self.confidence)

    def finalize(self) -> pa.Table:
        extra = {}
        if self.clustered:
            from .correlation import clustered_interval
            r, m, se, g = spearman_matrix(self.sample.acts, self.sample.labels, self.sample.recs)
            r = np.where(self.finite.cpu().numpy()[:, None], r, np.nan)
            lo, hi, p = clustered_interval(r, se, g, self.confidence)
            extra["records"] = (np.broadcast_to(g[None, :], r.shape), pa.int64())
        else:
            r, m = self._scores()
        W, H = r.shape
        ms = np.broadcast_to(m[None, :], (W, H))
        if not self.clustered:
            lo, hi = fisher_interval_bw(r, ms, self.confidence)
            p = pearson_p_value(r, ms)      # the t approximation, as scipy.stats.spearmanr
        n = np.broadcast_to(self.n.cpu().numpy()[None, :], (W, H))
        return score_table(self.measure, self.names, r, n, lo, hi, p,
                           {"n_sample": (ms.astype(np.int64), pa.int64()), **extra})

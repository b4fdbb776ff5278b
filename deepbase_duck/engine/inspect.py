"""inspect(): score every unit of every requested layer against every hypothesis, streaming.

The plan: validate every name first (nothing runs on a bad argument); materialise the labels
of the hypotheses (cached per dataset); then stream blocks of records. A block's activations
come from stored behaviors when every requested layer is stored for the selected records
(the model does not run), otherwise from one forward pass per batch that feeds all layers
(and, with ``keep_activations``, is stored on the way). A block's labels come from the
``symbol_labels`` macro (sql/10_alignment.sql), DuckDB joining symbols and label spans. Each
(layer, measure) has one inspector state; states are updated per block and finalised once.
Memory is bounded by one block; no tokens x units matrix is ever built.

Results are written to ``scores`` (with a ``queries`` row) in one transaction after the scan,
so a failed query leaves the stored tables as they were.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import store
from ..errors import DeepBaseError, EmptyDatasetError
from ..hypotheses.grid import check_fit
from ..hypotheses.store import annotate, resolve
from ..inspectors.base import SCORE_SCHEMA, measure_class
from ..progress import progress_bar
from .extract import (Batch, cleanup_orphans, done_records, ensure_symbols, find_behavior, forward_batches,
                      get_or_create_behavior, plan_batches, store_batch)

RESULT_SCHEMA = pa.schema([
    ("query_id", pa.int32()), ("model", pa.string()), ("layer", pa.string()), ("unit", pa.int32()),
    ("hypothesis", pa.string()), ("measure", pa.string()), ("score", pa.float64()), ("n", pa.int64()),
    ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("p_value", pa.float64()), ("q_value", pa.float64()),
    ("detail", pa.string()),
])


# Measures whose early-stopping bound is implemented: batch means over windows of records.
BOUNDED_MEASURES = ("corr", "pointbiserial")
MIN_WINDOWS = 5


@dataclass
class Plan:
    model: str
    layers: list[str]
    dataset: str
    record_ids: np.ndarray
    hypotheses: list[dict]                 # resolved catalog descriptions
    measures: list[str]
    columns: dict                          # measure -> list of label column descriptions
    label_columns: list[dict]              # every label column the block loader builds
    source: str = "model"                  # 'model' or 'stored'
    behaviors: dict = field(default_factory=dict)
    batch_size: int = 16
    keep_activations: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    measure_params: dict = field(default_factory=dict)
    control: bool = False
    control_freq: dict = field(default_factory=dict)   # real hypothesis -> class frequencies
    permutations: int = 0                              # permutation-test p-values on request
    permutation_rows: int = 20_000
    max_error: float | None = None                     # early stopping: stop once every bound is below
    seed: int = 0                                      # the seeded record order of progressive scans


def _label_columns(hyps: list[dict], measures: list[str], control: bool = False):
    """Per measure, the label columns it scores: categorical hypotheses are expanded into one
    binary indicator column per category ('pos=NOUN') for measures that do not take categorical
    hypotheses directly. With ``control``, the probe also gets a control task per binary or
    categorical hypothesis ('pos~control', Hewitt & Liang 2019): each word type (a symbol's token
    text) holds one class drawn from the hypothesis' class distribution."""
    all_cols, per_measure = {}, {}
    for m in measures:
        cls = measure_class(m)
        cols = []
        for h in hyps:
            if h["kind"] == "categorical" and "categorical" not in cls.accepts:
                for code, cat in enumerate(h["categories"]):
                    cols.append({"name": f"{h['name']}={cat}", "kind": "binary", "source": h["name"], "code": code})
            else:
                cols.append({"name": h["name"], "kind": h["kind"], "source": h["name"], "code": None,
                             "categories": h.get("categories")})
        if control and m == "probe":
            for h in hyps:
                if h["kind"] in ("binary", "categorical"):
                    cols.append({"name": f"{h['name']}~control", "kind": h["kind"], "source": h["name"],
                                 "code": None, "categories": h.get("categories"), "control_of": h["name"]})
        per_measure[m] = cols
        for c in cols:
            all_cols.setdefault(c["name"], c)
    return per_measure, list(all_cols.values())


def plan_inspect(session, model, layers, hypotheses, dataset, measures=("corr",), record_ids=None, limit=None,
                 batch_size=16, keep_activations=False, dtype="float32", device=None, control=False,
                 permutations=0, permutation_rows=20_000, max_error=None, seed=0, **measure_params) -> Plan:
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(hypotheses, str):
        hypotheses = [hypotheses]
    if isinstance(measures, str):
        measures = [measures]
    measures = list(measures or ["corr"])
    for m in measures:
        measure_class(m)
    for m, value in measure_params.items():
        if m not in measures:
            raise DeepBaseError(f"parameters given for measure {m!r}, which the query does not compute "
                                f"(measures: {', '.join(measures)})")
        if not isinstance(value, dict):
            raise DeepBaseError(f"parameters of measure {m!r} must be a dict, got {type(value).__name__}")
    if not hypotheses:
        raise DeepBaseError("no hypotheses given")
    session.check_dataset(dataset)
    mrow = session.model_row(model)
    layers = session.check_layers(model, list(layers or []))
    hyps = resolve(session.con, list(hypotheses))
    check_fit(mrow["tokenization"], hyps, model)   # image grids vs text characters
    if max_error is not None and not (0 < float(max_error) < 1):
        raise DeepBaseError(f"max_error must be in (0, 1), got {max_error}")
    if max_error is not None:
        unbounded = [m for m in measures if m not in BOUNDED_MEASURES]
        if unbounded:
            raise DeepBaseError(f"early stopping (max_error) has error bounds for {', '.join(BOUNDED_MEASURES)}; "
                                f"not for: {', '.join(unbounded)}")
    if control and "probe" not in measures:
        raise DeepBaseError("control=True needs the 'probe' measure (control tasks score probe selectivity)")
    per_measure, cols = _label_columns(hyps, measures, control)
    if control:
        controls = {c["name"]: c["control_of"] for c in per_measure["probe"] if c.get("control_of")}
        if not controls:
            raise DeepBaseError("control=True needs a binary or categorical hypothesis")
        measure_params = dict(measure_params)
        measure_params["probe"] = {**measure_params.get("probe", {}),
                                   "control_of": {**measure_params.get("probe", {}).get("control_of", {}), **controls}}
    for m in measures:
        cls = measure_class(m)
        for c in per_measure[m]:
            if c["kind"] not in cls.accepts:
                raise DeepBaseError(f"measure {m!r} does not take {c['kind']} hypotheses (hypothesis "
                                    f"{c['source']!r}); it takes: {', '.join(cls.accepts)}")
    ids = session.record_ids(dataset) if record_ids is None else np.asarray(record_ids, np.int64)
    if limit is not None:
        ids = ids[: int(limit)]
    if len(ids) == 0:
        raise EmptyDatasetError(f"no records selected from dataset {dataset!r}")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Plan(model, layers, dataset, ids, hyps, measures, per_measure, cols, batch_size=int(batch_size),
                keep_activations=bool(keep_activations), dtype=dtype, device=str(dev), measure_params=measure_params,
                control=bool(control), permutations=int(permutations or 0),
                permutation_rows=int(permutation_rows),
                max_error=None if max_error is None else float(max_error), seed=int(seed))


# -- blocks of labels ----------------------------------------------------------------------------
def block_labels(session, plan: Plan, tokenization: str, record_ids: np.ndarray, n_symbols: np.ndarray) -> torch.Tensor:
    """(rows, label columns) float64, rows in (record order of the block, pos) order; NaN = no label."""
    offsets = np.concatenate([[0], np.cumsum(n_symbols)])
    n = int(offsets[-1])
    y = np.full((n, len(plan.label_columns)), np.nan)
    hyp_names = [h["name"] for h in plan.hypotheses]
    t = store.q_arrow(
        session.con,
        "SELECT list_position(?, l.hypothesis)::INTEGER - 1 AS h, l.record_id, l.pos, l.value "
        "FROM symbol_labels(?, ?, ?, recs := ?) AS l",
        [hyp_names, plan.dataset, tokenization, hyp_names, [int(r) for r in record_ids]])
    order = np.argsort(record_ids, kind="stable")
    hyp = t.column(0).to_numpy()
    rec = t.column(1).to_numpy()
    row = offsets[order[np.searchsorted(record_ids[order], rec)]] + t.column(2).to_numpy()
    val = t.column(3).to_numpy(zero_copy_only=False).astype(np.float64)
    direct = [j for j, c in enumerate(plan.label_columns) if c["code"] is None and not c.get("control_of")]
    if direct:
        # columns that carry a hypothesis' values as they are: one scatter for all of them
        col_of_hyp = np.full(len(hyp_names), -1)
        for j in direct:
            col_of_hyp[hyp_names.index(plan.label_columns[j]["source"])] = j
        col = col_of_hyp[hyp]
        ok = col >= 0
        y[row[ok], col[ok]] = val[ok]
    controls = [(j, c) for j, c in enumerate(plan.label_columns) if c.get("control_of")]
    if controls:
        from ..inspectors.probes import control_labels
        sym = store.q_arrow(session.con, "SELECT record_id, pos, token FROM symbols WHERE dataset = ? AND "
                                         "tokenization = ? AND list_contains(?, record_id)",
                            [plan.dataset, tokenization, [int(r) for r in record_ids]])
        srow = offsets[order[np.searchsorted(record_ids[order], sym.column(0).to_numpy())]] + sym.column(1).to_numpy()
        types = np.array(sym.column(2).to_pylist(), dtype=object)
        types[types == None] = ""  # noqa: E711  (a symbol without token text is one type)
        for j, c in controls:
            real = y[:, [i for i, x in enumerate(plan.label_columns) if x["name"] == c["control_of"]][0]]
            freq = plan.control_freq[c["control_of"]]
            lab = np.full(n, np.nan)
            lab[srow] = control_labels(types, len(freq), freq, seed=0)
            y[:, j] = np.where(np.isnan(real), np.nan, lab)     # the same symbols as the real task
    for j, c in enumerate(plan.label_columns):
        if c["code"] is not None:                     # one indicator column per category
            sel = hyp == hyp_names.index(c["source"])
            v = val[sel]
            y[row[sel], j] = np.where(np.isnan(v), np.nan, (v == c["code"]).astype(np.float64))
    return torch.from_numpy(y)


# -- blocks of activations -----------------------------------------------------------------------
def stored_behaviors(session, plan: Plan, checksum, tokenization):
    """{layer: behavior} when every layer is stored (any dtype) for all selected records, else None."""
    out = {}
    for layer in plan.layers:
        found = None
        for dtype in ("float32", "float16"):
            b = find_behavior(session.con, checksum, layer, plan.dataset, tokenization, dtype)
            if b is not None and np.isin(plan.record_ids, done_records(session.con, b["behavior_id"])).all():
                found = b
                break
        if found is None:
            return None
        out[layer] = found
    return out


def stored_part_blocks(session, plan: Plan, behaviors: dict) -> list[tuple[list[int], dict]]:
    """Blocks for reading stored behaviors: (record ids, {layer: part file}) per part, keeping the
    selected records. Layers whose parts hold different records are read one layer at a time."""
    wanted = set(int(r) for r in plan.record_ids)
    per_layer = {}
    for layer, b in behaviors.items():
        rows = store.q_all(session.con, "SELECT p.part, p.file, list(r.record_id ORDER BY r.record_id) "
                                        "FROM behavior_parts p JOIN behavior_records r USING (behavior_id, part) "
                                        "WHERE p.behavior_id = ? GROUP BY p.part, p.file ORDER BY p.part",
                           [b["behavior_id"]])
        folder = session.act_root / b["directory"]
        per_layer[layer] = [(ids, folder / f) for _, f, ids in rows]
    layers = list(behaviors)
    shapes = {tuple(tuple(ids) for ids, _ in per_layer[l]) for l in layers}
    blocks = []
    if len(shapes) == 1:
        for i, (ids, _) in enumerate(per_layer[layers[0]]):
            keep = [r for r in ids if r in wanted]
            if keep:
                blocks.append((keep, {l: per_layer[l][i][1] for l in layers}))
    else:
        for l in layers:
            for ids, f in per_layer[l]:
                keep = [r for r in ids if r in wanted]
                if keep:
                    blocks.append((keep, {l: f}))
    return blocks


def read_part_block(ids: list[int], files: dict, counts: dict) -> Batch:
    """The rows of records ``ids`` (ascending, as parts store them) from each layer's part."""
    acts = {}
    want = np.asarray(ids, np.int64)
    for layer, f in files.items():
        t = pq.read_table(f)
        rec = t.column("record_id").to_numpy().astype(np.int64)
        act = t.column("act").combine_chunks()
        x = act.values.to_numpy(zero_copy_only=False).reshape(-1, act.type.list_size)
        if len(want) != len(np.unique(rec)):
            keep = np.isin(rec, want)
            x = x[keep]
        acts[layer] = torch.from_numpy(np.array(x, dtype=np.float32))   # Arrow buffers are read-only
    n = np.asarray([counts[r] for r in ids])
    return Batch(want, n, acts)


def _score_matrix(state) -> np.ndarray:
    """A state's scores as a flat float array in finalize() row order (NaN for NULL)."""
    return np.array(state.finalize().column("score").to_pylist(), dtype=np.float64)


def batch_means_half_width(window_scores: list, confidence: float) -> np.ndarray:
    """Half-width of the batch-means confidence interval of each score: t_{k-1} * sd / sqrt(k)
    over the k windows' own scores. Symbols of one record (and of neighbouring records) are
    dependent, so an interval that treats symbols as independent (Fisher z with n symbols) is far
    too narrow; windows of whole records in the seeded order are close to independent."""
    from scipy import stats
    k = len(window_scores)
    if k < 2:
        return np.full(len(window_scores[0]) if window_scores else 0, np.inf)
    w = np.vstack(window_scores)
    import warnings
    with warnings.catch_warnings():                  # undefined scores (constant units) are all NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        sd = np.nanstd(w, axis=0, ddof=1)
    half = stats.t.ppf(0.5 + confidence / 2, k - 1) * sd / np.sqrt(k)
    return np.where(np.isnan(half), 0.0, half)


def seeded_windows(session, plan: Plan, window_batches: int = 1) -> tuple[list[list[int]], list[int]]:
    """Forward batches for a progressive scan: the selected records in the seeded order of the
    ``seeded_order`` macro (sql/20_sampling.sql), cut into windows of ``window_batches`` batches;
    within a window records are batched by length (less padding). The stop rule is checked at
    window ends, so the records used are always a prefix of the seeded order: a uniform sample."""
    wanted = set(int(r) for r in plan.record_ids)
    order = [r for (r,) in store.q_all(session.con, "SELECT record_id FROM seeded_order(?, seed := ?)",
                                       [plan.dataset, plan.seed]) if r in wanted]
    lengths = dict(store.q_all(session.con, "SELECT record_id, length(text) FROM records WHERE dataset = ?",
                               [plan.dataset]))
    size = plan.batch_size * window_batches
    batches, windows = [], []
    for lo in range(0, len(order), size):
        window = sorted(order[lo:lo + size], key=lambda r: (lengths[r], r))
        cut = [sorted(window[j:j + plan.batch_size]) for j in range(0, len(window), plan.batch_size)]
        batches.extend(cut)
        windows.append(len(cut))
    return batches, windows


def class_frequencies(session, plan: Plan, tokenization: str) -> dict:
    """Class counts of each hypothesis that has a control task, over the selected records (their
    labels are materialised first)."""
    reals = sorted({c["control_of"] for c in plan.label_columns if c.get("control_of")})
    annotate(session, [h["live"] or h["name"] for h in plan.hypotheses if h["name"] in reals], plan.dataset,
             plan.record_ids, progress=False)
    out = {}
    for name in reals:
        h = next(x for x in plan.hypotheses if x["name"] == name)
        k = 2 if h["kind"] == "binary" else len(h["categories"])
        rows = store.q_all(session.con, "SELECT value::INTEGER, count(*) FROM symbol_labels(?, ?, [?], recs := ?) "
                                        "WHERE value IS NOT NULL GROUP BY ALL",
                           [plan.dataset, tokenization, name, [int(r) for r in plan.record_ids]])
        freq = np.zeros(k)
        for code, cnt in rows:
            freq[int(code)] = cnt
        out[name] = freq
    return out


class LabelStream:
    """The labels of each block, in block order: hypotheses evaluated for the block's records
    (stored once) and joined to the block's symbols by DuckDB (``symbol_labels``). Computed on
    demand: a background thread preparing the next blocks was measured slower on 2 cores, where
    the forward pass already uses both (benchmarks/RESULTS.md)."""

    def __init__(self, session, plan: Plan, tokenization: str, counts: dict):
        self.session, self.plan, self.tokenization, self.counts = session, plan, tokenization, counts
        self.hyps = [h["live"] or h["name"] for h in plan.hypotheses]

    def next(self, ids) -> torch.Tensor:
        ids = [int(r) for r in ids]
        annotate(self.session, self.hyps, self.plan.dataset, ids, progress=False)
        n = np.asarray([self.counts[r] for r in ids])
        return block_labels(self.session, self.plan, self.tokenization, np.asarray(ids, np.int64), n)


class KeepActivations:
    """Stores the activations an inspect run computes anyway (``keep_activations=True``)."""

    def __init__(self, session, plan: Plan, checksum: str, tokenization: str, widths: dict):
        self.session = session
        self.behaviors = {}
        for layer in plan.layers:
            b = get_or_create_behavior(session, plan.model, checksum, layer, plan.dataset, tokenization, plan.dtype,
                                       widths[layer])
            cleanup_orphans(session, b)
            self.behaviors[layer] = b
        self.missing = {l: np.setdiff1d(plan.record_ids, done_records(session.con, b["behavior_id"]))
                        for l, b in self.behaviors.items()}

    def write(self, batch: Batch) -> None:
        store_batch(self.session, self.behaviors, self.missing, batch)


class LocalEngine:
    """Runs a plan in this process: one loop over blocks, updating every state."""

    name = "local"

    def run(self, session, plan: Plan, progress=None) -> dict:
        mrow = session.model_row(plan.model)
        tokenization = mrow["tokenization"]
        stored = None if plan.keep_activations else stored_behaviors(session, plan, mrow["checksum"], tokenization)
        plan.source = "stored" if stored else "model"
        widths = dict(store.q_all(session.con, "SELECT layer, width FROM layers WHERE model = ?", [plan.model]))
        states = {(layer, m): measure_class(m)(widths[layer], plan.columns[m], device=plan.device,
                                              **plan.measure_params.get(m, {}))
                  for layer in plan.layers for m in plan.measures}
        col_index = {c["name"]: j for j, c in enumerate(plan.label_columns)}
        take = {m: torch.as_tensor([col_index[c["name"]] for c in plan.columns[m]]) for m in plan.measures}
        show = session.progress if progress is None else progress
        if stored:
            counts = dict(store.q_all(session.con, "SELECT record_id, n_symbols FROM tokenized_records WHERE dataset = ? "
                                                   "AND tokenization = ?", [plan.dataset, tokenization]))
            blocks = stored_part_blocks(session, plan, stored)
            if plan.max_error is not None:        # stored parts in a seeded order (a cluster sample)
                blocks = [blocks[i] for i in np.random.default_rng(plan.seed).permutation(len(blocks))]
            windows = [len(blocks)] if plan.max_error is None else [1] * len(blocks)
            source = (read_part_block(ids, files, counts) for ids, files in blocks)
            keep = None
        else:
            adapter = session.adapter(plan.model)
            counts = ensure_symbols(session, adapter, plan.dataset, plan.record_ids)
            if plan.max_error is None:
                block_ids = plan_batches(session, plan.dataset, plan.record_ids, plan.batch_size)
                windows = [len(block_ids)]
            else:
                block_ids, windows = seeded_windows(session, plan)
            source = forward_batches(session, adapter, plan.model, plan.layers, plan.dataset, block_ids, counts)
            keep = KeepActivations(session, plan, mrow["checksum"], tokenization, widths) if plan.keep_activations else None
        if plan.control:
            plan.control_freq = class_frequencies(session, plan, tokenization)
        labels = LabelStream(session, plan, tokenization, counts)
        samples = {}
        if plan.permutations:
            from ..inspectors.spearman import RowSample, row_keys
            samples = {l: RowSample(widths[l], len(plan.label_columns), plan.permutation_rows, plan.device)
                       for l in plan.layers}
        bar = progress_bar(len(plan.record_ids), f"inspect {plan.model} ({plan.source})", "rec", show)
        checkpoints = set(np.cumsum(windows).tolist())   # the stop rule is checked at window ends
        used, bound, stopped = [], float("inf"), False
        progressive = plan.max_error is not None
        make = lambda layer, m: measure_class(m)(widths[layer], plan.columns[m], device=plan.device,  # noqa: E731
                                                 **plan.measure_params.get(m, {}))
        # progressive scans feed a per-window state, finalised at the window's end (its scores
        # give the batch-means error bound) and then merged into the total
        feeding = {k: make(*k) for k in states} if progressive else states
        window_scores = {k: [] for k in states}
        try:
            for i, batch in enumerate(source, 1):
                if keep is not None:
                    keep.write(batch)
                y = labels.next(batch.record_ids)
                rec = torch.from_numpy(np.repeat(batch.record_ids, batch.n_symbols))
                for layer, x in batch.acts.items():
                    for m in plan.measures:
                        feeding[(layer, m)].update(x, y[:, take[m]], rec)
                    if samples:
                        samples[layer].add(row_keys(x, y, rec), x, y)
                bar.update(len(batch.record_ids) * len(batch.acts) / len(plan.layers))
                used.extend(int(r) for r in batch.record_ids)
                if progressive and i in checkpoints:
                    for k, st in feeding.items():
                        window_scores[k].append(_score_matrix(st))
                        states[k].combine(st)
                        feeding[k] = make(*k)
                    bound = max(batch_means_half_width(w, states[k].confidence).max(initial=0.0)
                                for k, w in window_scores.items())
                    if len(next(iter(window_scores.values()))) >= MIN_WINDOWS and bound <= plan.max_error:
                        stopped = True
                        break
        finally:
            bar.close()
        used = sorted(set(used))
        n_symbols = int(sum(counts[r] for r in used))
        if n_symbols == 0:
            raise EmptyDatasetError(f"the selected records of dataset {plan.dataset!r} hold no symbols")
        return {"states": states, "n_symbols": n_symbols, "samples": samples, "take": take, "records_used": len(used),
                "stopped_early": stopped, "bound": bound if progressive else None,
                "window_scores": window_scores if progressive else None}


def detail_column(t: pa.Table) -> pa.Array:
    """The measure's own columns (beyond SCORE_SCHEMA) as one JSON object per row."""
    extra = [c for c in t.column_names if c not in SCORE_SCHEMA.names]
    if not extra:
        return pa.nulls(t.num_rows, pa.string())
    cols = {c: t.column(c).to_pylist() for c in extra}
    return pa.array([json.dumps({c: _plain(cols[c][i]) for c in extra}) for i in range(t.num_rows)], pa.string())


def _plain(v):
    if isinstance(v, float) and v != v:
        return None
    return v


def untrained_copy(adapter, seed: int = 0):
    """The same architecture with freshly initialised weights (torch.manual_seed(seed), then every
    submodule's reset_parameters()): what the architecture alone produces."""
    import copy
    module = copy.deepcopy(adapter.module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    twin = copy.copy(adapter)
    twin.module = module.eval()
    twin._checksum = None
    return twin


def with_permutation_p_values(t: pa.Table, plan: Plan, measure: str, sample, cols) -> pa.Table:
    """Add perm_p_value (and perm_rows) to a unit-level score table: the measure recomputed on a
    seeded uniform sample of the scanned rows (at most plan.permutation_rows) with the labels
    permuted plan.permutations times; p = (1 + #|s| >= |obs|) / (1 + #permutations). Symbols are
    treated as exchangeable, which neighbouring symbols of a sequence are not: read it as a
    check of the parametric p-value, not as a stricter test."""
    from ..inspectors.significance import measure_score_fn, permutation_p_values
    columns = plan.columns[measure]
    fn = measure_score_fn(measure, columns, plan.device, **plan.measure_params.get(measure, {}))
    perm = permutation_p_values(sample.acts, sample.labels[:, cols], fn, plan.permutations, seed=0)
    name_idx = {c["name"]: i for i, c in enumerate(columns)}
    units = t.column("unit").to_pylist()
    hyps = t.column("hypothesis").to_pylist()
    vals = [None if u is None or h not in name_idx else float(perm[u, name_idx[h]]) for u, h in zip(units, hyps)]
    vals = [None if v is not None and v != v else v for v in vals]
    t = t.append_column("perm_p_value", pa.array(vals, pa.float64()))
    return t.append_column("perm_rows", pa.array([len(sample)] * t.num_rows, pa.int64()))


def with_batch_means_interval(t: pa.Table, window_scores: list, confidence: float) -> pa.Table:
    """For a progressive scan: the interval of each score becomes score +- the batch-means half
    width (clipped to [-1, 1]); detail gets the number of windows."""
    half = batch_means_half_width(window_scores, confidence)
    score = np.array(t.column("score").to_pylist(), dtype=np.float64)
    lo = np.clip(score - half, -1, 1)
    hi = np.clip(score + half, -1, 1)
    t = t.set_column(t.column_names.index("ci_low"), "ci_low", pa.array(lo, pa.float64(), from_pandas=True))
    t = t.set_column(t.column_names.index("ci_high"), "ci_high", pa.array(hi, pa.float64(), from_pandas=True))
    return t.append_column("interval", pa.array([f"batch means over {len(window_scores)} windows"] * t.num_rows))


def with_q_values(scores: pa.Table) -> pa.Table:
    """Benjamini-Hochberg q-values per measure over every row of the table."""
    from ..inspectors.significance import benjamini_hochberg
    p = np.array(scores.column("p_value").to_pylist(), dtype=np.float64)
    measures = np.array(scores.column("measure").to_pylist(), dtype=object)
    q = np.full(len(p), np.nan)
    for m in set(measures.tolist()):
        sel = measures == m
        q[sel] = benjamini_hochberg(p[sel])
    i = scores.column_names.index("p_value") + 1
    return scores.add_column(i, "q_value", pa.array(q, pa.float64(), from_pandas=True))


def inspect(session, model, layers, hypotheses, dataset, measures=("corr",), record_ids=None, limit=None,
            batch_size=16, keep_activations=False, dtype="float32", device=None, store_scores=True,
            progress=None, engine=None, baseline=False, baseline_seed=0, control=False, permutations=0,
            permutation_rows=20_000, max_error=None, seed=0, **measure_params) -> pa.Table:
    """Score ``layers`` of ``model`` against ``hypotheses`` over ``dataset``; returns (and stores)
    rows of (query_id, model, layer, unit, hypothesis, measure, score, n, ci_low, ci_high, p_value,
    q_value, detail). With ``baseline=True`` an untrained copy of the model ('<model>~untrained',
    seeded by ``baseline_seed``) is scored by the same query, in the same result. With
    ``control=True`` (probe measure) every binary or categorical hypothesis gets a control task
    and the result holds 'selectivity' rows (probe accuracy minus control accuracy). With
    ``permutations=N`` unit-level scores also carry a permutation-test p-value in
    ``detail->>'perm_p_value'`` (on a sample of ``permutation_rows`` rows). With ``max_error``
    the scan is progressive: records in the seeded order of ``seed``, stopping once every state's
    error bound (the largest confidence half-width: Fisher z for correlations) is at most
    ``max_error``; ``queries.params`` reports the records used and the bound reached, and each
    score's n and interval are those of the records used."""
    t0 = time.time()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    plan = plan_inspect(session, model, layers, hypotheses, dataset, measures, record_ids, limit, batch_size,
                        keep_activations, dtype, device, control, permutations, permutation_rows, max_error, seed,
                        **measure_params)
    runs = [(plan, (engine or LocalEngine()).run(session, plan, progress))]
    if baseline:
        twin_name = f"{model}~untrained"
        session.register_model(twin_name, untrained_copy(session.adapter(model), baseline_seed))
        twin = plan_inspect(session, twin_name, layers, hypotheses, dataset, measures, record_ids, limit,
                            batch_size, False, dtype, device, control, permutations, permutation_rows,
                            max_error, seed, **measure_params)
        runs.append((twin, (engine or LocalEngine()).run(session, twin, progress)))
    tables = []
    for p, result in runs:
        for (layer, m), state in result["states"].items():
            t = state.finalize()
            if result.get("window_scores") is not None:
                t = with_batch_means_interval(t, result["window_scores"][(layer, m)], state.confidence)
            if p.permutations and result["samples"] and m != "probe":
                t = with_permutation_p_values(t, p, m, result["samples"][layer], result["take"][m])
            n = t.num_rows
            tables.append(pa.table({
                "model": pa.array([p.model] * n, pa.string()), "layer": pa.array([layer] * n, pa.string()),
                **{name: t.column(name).cast(SCORE_SCHEMA.field(name).type) for name in SCORE_SCHEMA.names},
                "detail": detail_column(t)}))
    scores = with_q_values(pa.concat_tables(tables))
    con = session.con
    params = {"record_count": int(len(plan.record_ids)), "batch_size": plan.batch_size,
              "keep_activations": plan.keep_activations, "measure_params": plan.measure_params,
              "baseline": bool(baseline), "baseline_seed": baseline_seed,
              "max_error": plan.max_error, "seed": plan.seed, "records_used": runs[0][1]["records_used"],
              "stopped_early": runs[0][1]["stopped_early"], "bound_reached": runs[0][1]["bound"]}
    with store.Transaction(con):
        qid = int(store.q_scalar(con, "SELECT coalesce(max(query_id), 0) + 1 FROM queries"))
        con.execute("INSERT INTO queries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [qid, plan.model, plan.dataset, plan.layers, [h["name"] for h in plan.hypotheses],
                     plan.measures, json.dumps(params, default=str), int(runs[0][1]["records_used"]),
                     int(runs[0][1]["n_symbols"]), plan.source, started, round(time.time() - t0, 4)])
        scores = pa.table({"query_id": pa.array(np.full(scores.num_rows, qid, np.int32)),
                           **{c: scores.column(c) for c in scores.column_names}}).cast(RESULT_SCHEMA)
        if store_scores:
            store.insert_arrow(con, "scores", scores)
    return scores

"""inspect(): score every unit of every requested layer against every hypothesis, streaming.

The plan: validate every name first (nothing runs on a bad argument); materialise the labels
of the hypotheses (cached per dataset); then stream blocks of records. A block's activations
come from stored behaviors when every requested layer is stored for the selected records
(the model does not run), otherwise from one forward pass per batch that feeds all layers
(and, with ``keep_activations``, is stored on the way). A block's labels come from
engine/labels.py: hypotheses evaluated for the block's records not labelled yet (and stored),
stored spans read for the others, aligned to the symbols by the rule of sql/10_alignment.sql. Each
(layer, measure) has one inspector state; states are updated per block and finalised once.
Memory is bounded by one block; no tokens x units matrix is ever built.

Results are written to ``scores`` (with a ``queries`` row) in one transaction after the scan,
so a failed query leaves the stored tables as they were.
"""
from __future__ import annotations

import hashlib
import inspect as pyinspect
import itertools
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import store
from ..extraction.adapters import default_device, global_tf32
from ..errors import MAX_SEED, DeepBaseError, EmptyDatasetError, check_int
from ..hypotheses.grid import check_fit, grid_of
from ..hypotheses.store import annotate, missing_records, resolve
from ..inspectors.base import SCORE_SCHEMA, measure_class
from ..progress import progress_bar
from .memory import caps_store_memory, release_freed_memory
from .prefetch import batch_source, pipeline_by_default
from .labels import LabelStream, LabelSupport, block_labels  # noqa: F401  (block_labels: public here too)
from .extract import (DTYPES, Batch, SymbolWriter, cleanup_orphans, done_records, drop_unstored_behaviors,
                      ensure_symbols, forward_batches, get_or_create_behavior, plan_batches, store_batch,
                      stored_behavior, stored_symbol_counts)

# what a stored result was computed by: raised when the engine computes a query's scores or
# intervals differently, so that identical queries scored before are not served as cached
# (2: corr intervals with records as clusters; progressive scans over stored activations read
# the seeded windows, not the parts in a seeded order; 3: iou / precision / recall / f1 and
# spearman intervals and p-values with records as clusters, mi's point masses in bins of their
# own, outputs written in place later kept as their module gave them; 4: mi intervals and
# p-values with records as clusters, mi p-values from Pearson's X^2, ap intervals with records
# as clusters, probes leave out non-finite units; 5: corr NULL for a constant continuous label,
# a probe's R2 on constant test labels as sklearn's force_finite, float64 units far from 0 kept,
# corr/spearman read a binary label's non-zero values as 1, pointbiserial from corr's state)
SCORING_VERSION = 5
# ... and, where a change touched some queries only, their own revision, in their fingerprint
# alone (the others keep theirs, and the stored scores they are served): "probe" (1: elastic-net
# and ridge heads fit about the labels' mean, a class without training rows takes no weight
# mass), "progressive" (1: a binary hypothesis not met yet, a class no window has met, or a
# hypothesis constant over the stored labels no longer decides where a scan stops; label
# support counts a non-zero binary label as 1)
SCORING_REVISIONS = {"probe": 1, "progressive": 1}
PART_CACHE_BYTES = 1 << 30          # decoded stored parts a progressive scan keeps (StoredRows)

RESULT_SCHEMA = pa.schema([
    ("query_id", pa.int32()), ("model", pa.string()), ("layer", pa.string()), ("unit", pa.int32()),
    ("hypothesis", pa.string()), ("measure", pa.string()), ("score", pa.float64()), ("n", pa.int64()),
    ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("p_value", pa.float64()), ("q_value", pa.float64()),
    ("detail", pa.string()),
])


# Measures whose early-stopping bound is implemented: batch means over windows of records (any
# measure whose per-window score estimates the same quantity; probes are left out: each window's
# score would train a model). Scores are clipped to their measure's range.
BOUNDED_MEASURES = ("corr", "pointbiserial", "spearman", "probeless", "mi", "iou", "precision", "recall", "f1", "ap")
SCORE_RANGE = {"corr": (-1.0, 1.0), "pointbiserial": (-1.0, 1.0), "spearman": (-1.0, 1.0), "mi": (0.0, np.inf),
               "probeless": (0.0, np.inf),
               "iou": (0.0, 1.0), "precision": (0.0, 1.0), "recall": (0.0, 1.0), "f1": (0.0, 1.0), "ap": (0.0, 1.0)}
MIN_WINDOWS = 5
# Probes have no error bound; a progressive scan stops them on a held-out loss plateau (StopRule)
PLATEAU_TOL = 0.01                     # default improvement below which a probe's loss is flat
STABLE_WINDOWS = 3                     # default windows a ranking query's top-k sets must hold still (top_k)
PLATEAU_PATIENCE = 2                   # ... at this many consecutive checks (doublings of the data)


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
    top_k: int | None = None                           # ranking queries: stop once each top-k set is stable
    stable_windows: int = 3                            # ... over this many consecutive windows (STABLE_WINDOWS)
    plateau_tol: float | None = None                   # probes: stop once the held-out loss plateaus
    min_support: int = 0                               # max_error and top_k leave out rarer columns
    probe_checks: list = field(default_factory=list)   # filled by StopRule: the probes' loss checks
    min_windows: int = 0                               # no stop before this window (stop_together)
    constant_columns: list = field(default_factory=list)   # whole-hypothesis columns constant over the
    #                                                    selected records' stored labels (constant_label_columns)

    @property
    def progressive(self) -> bool:
        return self.max_error is not None or self.top_k is not None or self.plateau_tol is not None


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
                 permutations=0, permutation_rows=20_000, max_error=None, seed=0, top_k=None, stable_windows=None,
                 plateau_tol=None, min_support=0, **measure_params) -> Plan:
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(hypotheses, str):
        hypotheses = [hypotheses]
    if isinstance(measures, str):
        measures = [measures]
    measures = list(dict.fromkeys(measures or ["corr"]))      # a measure named twice: once (as layers)
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
    hyps, seen = resolve(session.con, list(hypotheses)), set()
    hyps = [h for h in hyps if not (h["name"] in seen or seen.add(h["name"]))]   # a name given twice: once
    check_fit(mrow["tokenization"], hyps, model)   # image grids vs text characters
    if max_error is not None and not (0 < float(max_error) < 1):
        raise DeepBaseError(f"max_error must be in (0, 1), got {max_error}")
    if max_error is not None:
        unbounded = [m for m in measures if m not in BOUNDED_MEASURES and m != "probe"]
        if unbounded:
            raise DeepBaseError(f"early stopping (max_error) has error bounds for {', '.join(BOUNDED_MEASURES)} "
                                f"and a held-out loss plateau for probe; not for: {', '.join(unbounded)}")
    if min_support:
        if isinstance(min_support, bool) or not isinstance(min_support, (int, np.integer)) or min_support < 0:
            raise DeepBaseError(f"min_support must be a non-negative integer, got {min_support!r}")
        if max_error is None and top_k is None:
            raise DeepBaseError("min_support leaves rare label columns out of the max_error and top_k rules; "
                                "the query has neither")
    if plateau_tol is not None:
        if isinstance(plateau_tol, bool) or not isinstance(plateau_tol, (int, float, np.number)) \
                or not 0 < plateau_tol < 1:
            raise DeepBaseError(f"plateau_tol must be a number in (0, 1), got {plateau_tol!r}")
        if "probe" not in measures:
            raise DeepBaseError(f"plateau_tol stops the probe measure on a held-out loss plateau; the query "
                                f"computes no probe (measures: {', '.join(measures)})")
    elif max_error is not None and "probe" in measures:
        plateau_tol = PLATEAU_TOL
    if top_k is None and stable_windows is not None:
        raise DeepBaseError(f"stable_windows ({stable_windows!r}) sets how long a ranking query's top-k sets must "
                            f"hold still; it needs top_k (the units ranked per hypothesis), which the query does "
                            f"not give")
    stable_windows = STABLE_WINDOWS if stable_windows is None else stable_windows
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise DeepBaseError(f"top_k must be a positive integer, got {top_k!r}")
        if isinstance(stable_windows, bool) or not isinstance(stable_windows, (int, np.integer)) or stable_windows < 1:
            raise DeepBaseError(f"stable_windows must be a positive integer, got {stable_windows!r}")
        slow = [m for m in measures if m in ("probe", "probe_weight", "probe_topk", "selectivity")]
        if slow:
            raise DeepBaseError(f"top_k (a ranking stop rule) re-scores after every window; the probe measures "
                                f"train a model per scoring and do not take it: {', '.join(slow)}")
        widths = session.stored_widths(model)
        narrow = {l: widths.get(l) for l in layers}
        if narrow and all(w is not None and w <= top_k for w in narrow.values()):
            raise DeepBaseError(
                f"top_k={top_k} is not below the width of any layer scanned "
                f"({', '.join(f'{l}: {w} units' for l, w in narrow.items())}): every top-k set holds all units "
                f"from the first window, so the ranking rule would stop at once; ask for fewer units, or bound "
                f"the scores with max_error")
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
        # the measure's parameters checked now, by a state of the first layer's width: before any
        # engine writes symbols, labels or activations, or starts workers
        cls(session.stored_widths(model)[layers[0]], per_measure[m], device="cpu", **measure_params.get(m, {}))
    ids = session.select_records(dataset, record_ids, limit)
    if len(ids) == 0:
        raise EmptyDatasetError(f"no records selected from dataset {dataset!r}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise DeepBaseError(f"dtype must be one of {', '.join(DTYPES)} (the dtype of stored activations), "
                            f"got {dtype!r}")
    dev = default_device(device)
    plan = Plan(model, layers, dataset, ids, hyps, measures, per_measure, cols, batch_size=int(batch_size),
                keep_activations=bool(keep_activations), dtype=dtype, device=str(dev), measure_params=measure_params,
                control=bool(control), permutations=check_int("permutations", permutations or 0, 0),
                permutation_rows=int(permutation_rows),
                max_error=None if max_error is None else float(max_error), seed=int(seed),
                top_k=None if top_k is None else int(top_k),
                stable_windows=int(stable_windows),
                plateau_tol=None if plateau_tol is None else float(plateau_tol),
                min_support=int(min_support or 0))
    if plan.progressive:
        plan.constant_columns = constant_label_columns(session, plan)
    return plan


def constant_label_columns(session, plan: Plan) -> list[str]:
    """The whole-hypothesis label columns (not a category's indicator, not a control task)
    whose labels are constant over every selected record, told by the stored labels of the
    hypothesis' current version when every selected record has them (``labeled_records``): a
    binary hypothesis without a non-zero span (a class the dataset never holds: every symbol 0
    or unlabelled) or whose non-zero spans cover every character (no symbol 0), another whose
    spans take at most one value. Their scores are undefined (or 0) for good, so they do not hold
    a progressive scan that waits for a class not met yet (StopRule). A hypothesis with labels
    still to compute is left out: the scan cannot know yet."""
    whole = [c for c in plan.label_columns if c.get("code") is None and not c.get("control_of")]
    if not whole:
        return []
    versions = {h["name"]: h["version"] for h in plan.hypotheses}
    keys = sorted({f"{c['source']}\x00{versions[c['source']]}" for c in whole})
    ids = [int(r) for r in np.unique(plan.record_ids)]
    con = session.con
    covered = dict(store.q_all(con, "SELECT hypothesis, count(*) FROM labeled_records WHERE dataset = ? "
                                    "AND list_contains(?, hypothesis || chr(0) || version) "
                                    "AND record_id IN (SELECT unnest(?::INTEGER[])) GROUP BY hypothesis",
                               [plan.dataset, keys, ids]))
    complete = [h for h, n in covered.items() if n >= len(ids)]
    if not complete:
        return []
    seen = {h: (int(n), bool(nz)) for h, n, nz in store.q_all(
        con, "SELECT hypothesis, count(DISTINCT value), coalesce(bool_or(value <> 0), false) FROM labels "
             "WHERE dataset = ? AND list_contains(?, hypothesis || chr(0) || version) "
             "AND value IS NOT NULL AND NOT isnan(value) AND record_id IN (SELECT unnest(?::INTEGER[])) "
             "GROUP BY hypothesis", [plan.dataset, keys, ids])}
    # a binary hypothesis whose non-zero spans cover every character of every selected record has
    # no symbol of value 0 (a symbol takes its characters' majority value): as constant as one
    # without a non-zero span ('is_ascii' over an ASCII corpus), and as unable to define a score.
    # An image record's positions are its grid's cells, not its text's characters (hypotheses/grid.py)
    grid = grid_of(session.model_row(plan.model)["tokenization"])
    cells = None if grid is None else grid * grid
    full = {h for (h,) in store.q_all(
        con, "WITH covered AS (SELECT l.hypothesis, l.record_id, sum(greatest(least(l.end_char, "
             "coalesce(?::BIGINT, length(r.text))) - greatest(l.start_char, 0), 0)) AS chars FROM labels l "
             "JOIN records r ON r.dataset = l.dataset "
             "AND r.record_id = l.record_id WHERE l.dataset = ? AND list_contains(?, l.hypothesis || chr(0) || "
             "l.version) AND l.value <> 0 AND NOT isnan(l.value) AND l.record_id IN (SELECT unnest(?::INTEGER[])) "
             "GROUP BY ALL) "
             "SELECT h.name FROM (SELECT unnest(?::VARCHAR[]) AS name) h CROSS JOIN records r LEFT JOIN covered c "
             "ON c.hypothesis = h.name AND c.record_id = r.record_id WHERE r.dataset = ? "
             "AND r.record_id IN (SELECT unnest(?::INTEGER[])) GROUP BY h.name "
             "HAVING bool_and(coalesce(c.chars, 0) >= coalesce(?::BIGINT, length(r.text)))",
        [cells, plan.dataset, keys, ids, sorted({c["source"] for c in whole if c["kind"] == "binary"} & set(complete)),
         plan.dataset, ids, cells])} if any(c["kind"] == "binary" for c in whole) else set()
    out = []
    for c in whole:
        if c["source"] not in complete:
            continue
        distinct, nonzero = seen.get(c["source"], (0, False))
        if (not nonzero or c["source"] in full) if c["kind"] == "binary" else distinct <= 1:
            out.append(c["name"])
    return out


# -- blocks of activations -----------------------------------------------------------------------
MI_CALIBRATION_HASH = (0x632BE5AB, 0x85EBCA6B)   # (offset, multiplier): the calibration records'
# order, another hash than the jackknife groups' (record_groups), so that the records setting the
# bins spread over the groups instead of filling the first one


def mi_calibration_records(session, plan: Plan, tokenization: str, encoder) -> tuple[list[int], int]:
    """The records whose rows set a full scan's ``mi`` bins: the first selected records in the
    order of a hash of their ids, ((id + 0x632BE5AB) * 0x85EBCA6B) mod 2^32 (ties by id), until
    ``calibration_rows`` rows (default 10_000),
    and their row count. ``encoder()`` gives what tokenises records not tokenised yet (their
    symbols are stored, as a scan would); it is not called when every record was."""
    need = int(effective_params("mi", plan.measure_params.get("mi", {}))["calibration_rows"])
    ids = np.unique(np.asarray(plan.record_ids, np.int64))
    off, mul = MI_CALIBRATION_HASH
    order = ids[np.lexsort((ids, ((ids + off) * mul) & 0xFFFFFFFF))]
    counts = stored_symbol_counts(session, plan.dataset, tokenization)
    chosen, total = [], 0
    for lo in range(0, len(order), 256):
        chunk = order[lo:lo + 256]
        if any(int(r) not in counts for r in chunk):
            counts.update(ensure_symbols(session, encoder(), plan.dataset, chunk))
        for r in chunk:
            chosen.append(int(r))
            total += int(counts[int(r)])
            if total >= need:
                return chosen, total
    return chosen, total


MI_CALIBRATION_HOLD_BYTES = 1 << 30   # most host memory the calibration batches of models scanned together hold


def engine_sets_mi_bins(plan: Plan) -> bool:
    """Whether the engine chooses the bins of ``plan``'s mi states before the scan (both
    engines' full scans with mi; not a progressive scan, whose first window sets them, nor a
    query giving its own ``edges`` or ``calibration_records``)."""
    prm = plan.measure_params.get("mi", {})
    return (not plan.progressive and "mi" in plan.measures and prm.get("edges") is None
            and prm.get("calibration_records") is None)


def self_calibrated_mi(plan: Plan) -> bool:
    """Whether ``plan``'s mi states set their bins from the rows they meet first (neither the
    query's ``edges`` nor the engine's calibration, engine_sets_mi_bins): the first
    ``calibration_rows`` rows of a progressive scan's first window, or of the given
    ``calibration_records`` met by a full scan. Those rows, and so the scores, depend on the
    order of the records: on ``batch_size`` and, within a window, the model's ``window_split``.
    So a progressive scan that reads every record is not scored on a full scan's bins (those of
    its calibration records, in another order) unless every row fits in ``calibration_rows``:
    with 10 bins over activations of few distinct values (a character model's units) the two
    differed by up to 15% of the score (tests/test_inspect18.py), not by rounding alone."""
    return ("mi" in plan.measures and plan.measure_params.get("mi", {}).get("edges") is None
            and not engine_sets_mi_bins(plan))


def mi_calibration(session, plan: Plan, behaviors: dict, covered, ran: list | None = None) -> dict:
    """The bins of a full scan's ``mi`` states, set before the scan from every row of
    mi_calibration_records (their activations read as the scan reads them: stored ones for
    ``covered`` records, the model's for the rest), so that they depend on the records
    selected, not on ``batch_size`` or on which records' activations are stored. ``ran``: a
    list that receives the batches the model ran here (checked), for the scan to feed to its
    states instead of running those records again. {layer: {"edges": (width,
    bins - 1) array, "edges_rule": text}} to pass to the states; {} for a progressive scan (its
    first window sets the bins), without ``mi``, or with ``edges`` given."""
    if not engine_sets_mi_bins(plan):
        return {}
    prm = plan.measure_params.get("mi", {})
    tokenization = session.model_row(plan.model)["tokenization"]
    loaded = [None]

    def model():                            # loaded only if a record is tokenised or run here
        if loaded[0] is None:
            loaded[0] = session.adapter(plan.model)
        return loaded[0]
    chosen, total = mi_calibration_records(session, plan, tokenization, model)
    if total == 0:
        return {}
    counts = stored_symbol_counts(session, plan.dataset, tokenization)
    is_stored = np.isin(np.asarray(chosen, np.int64), np.asarray(covered, np.int64))
    stored = [r for r, ok in zip(chosen, is_stored) if ok]
    run = [r for r, ok in zip(chosen, is_stored) if not ok]
    parts = {layer: [] for layer in plan.layers}
    if stored:
        rows = StoredRows(stored_part_blocks(session, plan, behaviors, np.asarray(stored, np.int64)))
        b = rows.batch(stored, counts)
        for layer in plan.layers:
            parts[layer].append(b.acts[layer])
    if run:
        stream = forward_batches(session, model(), plan.model, plan.layers, plan.dataset,
                                 plan_batches(session, plan.dataset, run, plan.batch_size), counts)
        try:
            for b in stream:
                b.verify()
                for layer in plan.layers:
                    parts[layer].append(b.acts[layer].cpu())
                if ran is not None:               # kept on the host (the states move what they read)
                    b.acts = {layer: parts[layer][-1] for layer in plan.layers}
                    ran.append(b)
        finally:
            stream.close()                      # its hooks and model lock, now (not at garbage collection)
    return calibrated_edges(parts, prm, total, len(chosen))


def calibrated_edges(parts: dict, prm: dict, total: int, records: int) -> dict:
    """{layer: {"edges", "edges_rule"}}: the quantile bin edges of each layer's calibration rows
    (``parts``: {layer: list of (rows, width) tensors}), as mi's states take them."""
    from ..inspectors.mutual_information import quantile_edges
    bins = int(effective_params("mi", prm)["bins"])         # the states' own default when not given
    rule = f"quantile ({bins} bins) of the {total} rows of {records} calibration records"
    return {layer: {"edges": quantile_edges(torch.cat(x).to(torch.float64), bins).numpy(), "edges_rule": rule}
            for layer, x in parts.items()}


def mi_calibration_stacked(session, plans: list, stacked, ran: list) -> dict:
    """mi_calibration for models scanned together (run_stacked): the calibration records are
    chosen once (the rule depends on the records, not on the model), each batch of them is
    encoded once and run through every model (``stacked``), and the batches, {model: Batch} with
    the activations on the host, go to ``ran`` for the scan to feed to its states instead of
    running those records again. {model: mi_calibration's {layer: {...}}}; {} per model where the
    engine does not set the bins. Where every model's calibration rows together would take more
    than MI_CALIBRATION_HOLD_BYTES (float32; ten checkpoints of a 13-layer, 768-wide transformer
    at 10k rows: 4 GB), each model's bins are set one model at a time and nothing is held."""
    from .stacking import stacked_batches
    p0 = plans[0]
    if not engine_sets_mi_bins(p0):
        return {p.model: {} for p in plans}
    tokenization = session.model_row(p0.model)["tokenization"]
    chosen, total = mi_calibration_records(session, p0, tokenization, lambda: stacked.adapters[p0.model])
    if total == 0:
        return {p.model: {} for p in plans}
    widths = session.stored_widths(p0.model)
    if len(plans) * total * sum(int(widths[layer]) for layer in p0.layers) * 4 > MI_CALIBRATION_HOLD_BYTES:
        # every model's calibration rows held at once would be too large: one model at a time, as
        # a single model's, and its batches dropped (the scan runs those records again)
        return {p.model: mi_calibration(session, p, {}, ()) for p in plans}
    counts = stored_symbol_counts(session, p0.dataset, tokenization)
    parts = {p.model: {layer: [] for layer in p0.layers} for p in plans}
    stream = stacked_batches(session, stacked, p0.layers, p0.dataset,
                             plan_batches(session, p0.dataset, chosen, p0.batch_size), counts)
    try:
        for batches in stream:
            for name, b in batches.items():
                b.verify()
                for layer in p0.layers:
                    parts[name][layer].append(b.acts[layer].cpu())
                b.acts = {layer: parts[name][layer][-1] for layer in p0.layers}   # kept on the host
            ran.append(batches)
    finally:
        stream.close()
    prm = p0.measure_params.get("mi", {})
    return {name: calibrated_edges(per_layer, prm, total, len(chosen)) for name, per_layer in parts.items()}


def stored_halves(ids, stored: set) -> tuple[list[int], list[int]]:
    """A seeded batch's (stored, not stored) records, each in the batch's order: a progressive
    scan over partly stored activations reads the first and runs the model on the second, in
    this order (``_mixed``; the Ray engine's blocks too), so that both engines read the same
    records in the same windows as a scan over the model alone."""
    return [r for r in ids if r in stored], [r for r in ids if r not in stored]


def _mixed(halves: list, rows, computed, counts):
    """The batches of a progressive scan over records partly stored: per seeded batch, its
    (stored, not stored) records (``halves``), a Batch of the stored ones read from ``rows``
    (StoredRows) and the next batch of ``computed`` (the model's, over the batches' other
    records, in order)."""
    for stored, run in halves:
        if stored:
            yield rows.batch(stored, counts)
        if run:
            yield next(computed)


def _drain(batches: list):
    """Yield and drop the batches of ``batches`` one by one (each freed once consumed)."""
    while batches:
        yield batches.pop(0)


def state_params(plan: Plan, m: str, layer: str, calibration: dict) -> dict:
    """The keyword arguments of the state of measure ``m`` on ``layer``: the query's parameters,
    plus the bins mi_calibration set for an ``mi`` state."""
    out = dict(plan.measure_params.get(m, {}))
    if m == "mi" and layer in calibration:
        out.update(calibration[layer])
    return out


def stored_behaviors(session, plan: Plan, checksum, tokenization):
    """{layer: behavior} when every layer is stored (any dtype) for all selected records, else None."""
    return stored_reads(session, plan, checksum, tokenization, partial=False)[0] or None


def stored_coverage(session, plan: Plan, checksum, tokenization) -> tuple[dict, np.ndarray]:
    """The stored behaviors to read and the selected records they cover: per layer the behavior
    (float32 preferred, then float16) holding most of the selected records; covered = the
    selected records stored for every layer. ({}, empty) when some layer has none stored."""
    out, covered = {}, np.unique(plan.record_ids)
    for layer in plan.layers:
        best, best_done = None, np.empty(0, np.int64)
        for dtype in ("float32", "float16"):
            b = stored_behavior(session, checksum, layer, plan.dataset, tokenization, dtype)
            if b is None:
                continue
            done = np.intersect1d(covered, done_records(session.con, b["behavior_id"]))
            if len(done) > len(best_done):
                best, best_done = b, done
        if best is None:
            return {}, np.empty(0, np.int64)
        out[layer] = best
        covered = best_done
    return (out, covered) if len(covered) else ({}, covered)


def stored_part_blocks(session, plan: Plan, behaviors: dict, record_ids=None) -> list[tuple[list[int], dict]]:
    """Blocks for reading stored behaviors: (record ids, {layer: part file}) per part, keeping the
    selected records (``record_ids``, default the plan's). Layers whose parts hold different
    records are read one layer at a time."""
    wanted = set(int(r) for r in (plan.record_ids if record_ids is None else record_ids))
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
        # the part's other records' rows out (a record without symbols has no row, so a count of
        # the part's records cannot tell whether it holds others)
        keep = np.isin(rec, want)
        if not keep.all():
            x = x[keep]
        acts[layer] = torch.from_numpy(np.array(x, dtype=np.float32))   # Arrow buffers are read-only
    n = np.asarray([counts[r] for r in ids])
    return Batch(want, n, acts)


def _score_matrix(state) -> np.ndarray:
    """A state's scores as a flat float array in finalize() row order (NaN for NULL); empty for
    a probe (no batch-means bound: each window would train a probe; StopRule's plateau instead)."""
    if state.measure == "probe":
        return np.empty(0)
    return state.score_rows()[2]


def window_state(total, make, key):
    """A progressive scan's state for its next window, one that merges into ``total`` exactly:
    for a state whose counts need calibrated bins (``mi``), once ``total`` is calibrated, an
    empty state on its edges (a fresh one would calibrate on its own window's rows, and states
    on other edges merge only approximately); otherwise ``make(*key)``."""
    if getattr(total, "edges", None) is not None and hasattr(total, "empty_like"):
        return total.empty_like()
    return make(*key)


def uncalibrated(states: dict) -> bool:
    """Whether some state still calibrates its bins on the rows it meets (``mi`` without edges):
    the Ray driver then runs blocks one at a time, so that the later ones are sent its edges."""
    return any(hasattr(st, "empty_like") and getattr(st, "edges", 0) is None for st in states.values())


def batch_means_half_width(window_scores: list, confidence: float) -> np.ndarray:
    """Half-width of the batch-means confidence interval of each score: t_{k-1} * sd / sqrt(k)
    over the k windows where the score is defined (a window without a rare class, or with a
    hypothesis constant over it, has no score of its own: it adds no evidence about the spread).
    Symbols of one record (and of neighbouring records) are dependent, so an interval that treats
    symbols as independent (Fisher z with n symbols) is far too narrow; windows of whole records
    in the seeded order are close to independent. A score defined in one window only is
    unbounded (inf); one defined in none (a constant unit, a class not met yet) is NULL and not
    bounded (0)."""
    from scipy import stats
    if len(window_scores) < 2:
        return np.full(len(window_scores[0]) if window_scores else 0, np.inf)
    w = np.vstack(window_scores)
    k = (~np.isnan(w)).sum(0)
    import warnings
    with warnings.catch_warnings():                  # scores undefined in (almost) every window
        warnings.simplefilter("ignore", RuntimeWarning)
        sd = np.nanstd(w, axis=0, ddof=1)
        half = stats.t.ppf(0.5 + confidence / 2, np.maximum(k - 1, 1)) * sd / np.sqrt(np.maximum(k, 1))
    return np.where(k == 0, 0.0, np.where(k == 1, np.inf, half))


class WindowMoments:
    """The per-score count, mean and sum of squared deviations over the windows added so far (a
    NaN, a score undefined in its window, is skipped): ``half_width`` equals
    ``batch_means_half_width`` of those windows, at O(scores) per window instead of O(windows x
    scores) per check (Welford's update). The stop rule checks after every window."""

    def __init__(self):
        self.windows, self.k, self.mean, self.m2 = 0, None, None, None

    def add(self, scores) -> None:
        w = np.asarray(scores, dtype=np.float64)
        if self.k is None:
            self.k, self.mean, self.m2 = np.zeros(w.shape, np.int64), np.zeros(w.shape), np.zeros(w.shape)
        ok = ~np.isnan(w)
        x = np.where(ok, w, 0.0)
        self.k += ok
        d = np.where(ok, x - self.mean, 0.0)
        self.mean += d / np.maximum(self.k, 1)
        self.m2 += np.where(ok, d * (x - self.mean), 0.0)
        self.windows += 1

    def half_width(self, confidence: float) -> np.ndarray:
        from scipy import stats
        if self.windows < 2:
            return np.full(0 if self.k is None else len(self.k), np.inf)
        k = self.k
        ks = np.unique(k)                                       # few distinct counts: one ppf each
        t = stats.t.ppf(0.5 + confidence / 2, np.maximum(ks - 1, 1))[np.searchsorted(ks, k)]
        with np.errstate(invalid="ignore", divide="ignore"):
            half = t * np.sqrt(self.m2 / np.maximum(k - 1, 1)) / np.sqrt(np.maximum(k, 1))
        return np.where(k == 0, 0.0, np.where(k == 1, np.inf, half))


class StoredRows:
    """Stored activations read record by record, for a progressive scan's seeded windows: the
    same records, in the same forward batches, as a scan that runs the model, so a cached and an
    uncached query read the same records and differ only by the stored dtype. A record's rows
    are read from the Parquet row groups whose record_id statistics hold it (parts are written
    in groups of PART_ROW_GROUP_ROWS rows; older parts are one group), decoded once and kept,
    least recently used first out, up to PART_CACHE_BYTES of float32; past that a group may be
    decoded again (correct, slower)."""

    def __init__(self, blocks: list[tuple[list[int], dict]]):
        self.where = {}                                   # layer -> {record: part file}
        for ids, files in blocks:
            for layer, f in files.items():
                self.where.setdefault(layer, {}).update(dict.fromkeys(ids, f))
        self.ranges = {}                                  # file -> [(first, last record) per row group]
        self.cache, self.bytes = {}, 0                    # (file, group) -> (record -> (start, stop), rows)

    def groups(self, f) -> list[tuple[float, float]]:
        found = self.ranges.get(f)
        if found is None:
            meta = pq.ParquetFile(f).metadata
            col = meta.schema.to_arrow_schema().get_field_index("record_id")
            found = []
            for i in range(meta.num_row_groups):
                st = meta.row_group(i).column(col).statistics
                found.append((st.min, st.max) if st is not None and st.has_min_max else (-np.inf, np.inf))
            self.ranges[f] = found
        return found

    def group(self, f, i: int):
        hit = self.cache.pop((f, i), None)
        if hit is None:
            t = pq.ParquetFile(f).read_row_group(i, columns=["record_id", "act"])
            rec = t.column("record_id").to_numpy()
            act = t.column("act").combine_chunks()
            x = act.values.to_numpy(zero_copy_only=False).reshape(-1, act.type.list_size)   # copied when batched
            cut = np.flatnonzero(rec[1:] != rec[:-1]) + 1            # rows come in runs, one per record
            starts = np.concatenate([[0], cut])
            ends = np.concatenate([cut, [len(rec)]])
            # (a part of records without symbols only, empty texts, has a group without rows)
            hit = ({int(rec[a]): (int(a), int(b)) for a, b in zip(starts, ends)} if len(rec) else {}, x)
            self.bytes += x.nbytes
            while self.cache and self.bytes > PART_CACHE_BYTES:
                _, old = self.cache.pop(next(iter(self.cache)))
                self.bytes -= old.nbytes
        self.cache[(f, i)] = hit                          # most recently used last
        return hit

    def rows(self, f, r: int) -> list[np.ndarray]:
        out = []
        for i, (lo, hi) in enumerate(self.groups(f)):
            if lo <= r <= hi:
                spans, x = self.group(f, i)
                if r in spans:
                    a, b = spans[r]
                    out.append(x[a:b])
        return out

    def batch(self, ids: list[int], counts: dict) -> Batch:
        acts = {}
        for layer, where in self.where.items():
            parts = [p for r in ids for p in self.rows(where[r], r)]
            if not parts:                   # records without symbols only (empty texts): no row, but the width
                parts = [np.zeros((0, self.width(where[ids[0]])), np.float32)]
            acts[layer] = torch.from_numpy(np.concatenate(parts).astype(np.float32, copy=False))
        return Batch(np.asarray(ids, np.int64), np.asarray([counts[r] for r in ids]), acts)

    def width(self, f) -> int:
        """The units of the layer stored in part ``f`` (its act column's list size)."""
        return int(pq.ParquetFile(f).schema_arrow.field("act").type.list_size)


def seeded_windows(session, plan: Plan) -> tuple[list[list[int]], list[int]]:
    """Forward batches for a progressive scan: the selected records in the seeded order of the
    ``seeded_order`` macro (sql/20_sampling.sql), cut into windows of ``batch_size`` records; the
    stop rule is checked at window ends, so the records used are always a prefix of the seeded
    order: a uniform sample. A window runs as the model's ``window_split`` forward batches (its
    catalog row; ``ModelAdapter.window_split``), its records sorted by length (less padding);
    returns the batches and the number of batches of each window."""
    wanted = set(int(r) for r in plan.record_ids)
    order = [r for (r,) in store.q_all(session.con, "SELECT record_id FROM seeded_order(?, seed := ?)",
                                       [plan.dataset, plan.seed]) if r in wanted]
    lengths = dict(store.q_all(session.con, "SELECT record_id, length(text) FROM records WHERE dataset = ?",
                               [plan.dataset]))
    split = store.q_one(session.con, "SELECT window_split FROM models WHERE name = ?", [plan.model])
    split = max(1, int(split[0])) if split and split[0] is not None else 1
    batches, windows = [], []
    for lo in range(0, len(order), plan.batch_size):
        window = sorted(order[lo:lo + plan.batch_size], key=lambda r: (lengths[r], r))
        step = -(-len(window) // min(split, len(window)))
        cut = [sorted(window[j:j + step]) for j in range(0, len(window), step)]
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


class KeepActivations:
    """Stores the activations an inspect run computes anyway (``keep_activations=True``): those
    of ``computed``, the records the model runs for. The records a scan reads from storage are
    not stored again: they may have been read from another dtype's behavior (float16), whose
    rounded values a float32 behavior would then hold as if the model had given them."""

    def __init__(self, session, plan: Plan, checksum: str, tokenization: str, widths: dict, symbols=None,
                 computed=None):
        self.session, self.symbols = session, symbols      # the scan's SymbolWriter: flushed before parts
        self.behaviors = {}
        for layer in plan.layers:
            b = get_or_create_behavior(session, plan.model, checksum, layer, plan.dataset, tokenization, plan.dtype,
                                       widths[layer])
            cleanup_orphans(session, b)
            self.behaviors[layer] = b
        computed = plan.record_ids if computed is None else computed
        self.missing = {l: np.setdiff1d(computed, done_records(session.con, b["behavior_id"]))
                        for l, b in self.behaviors.items()}

    def write(self, batch: Batch) -> None:
        store_batch(self.session, self.behaviors, self.missing, batch, self.symbols)


def device_report(session, models, device) -> dict:
    """Where a query ran, for its ``queries.params``: the inspectors' device, each loaded model's
    and, for a model on CUDA, whether its forward passes let torch round float32 to TF32
    (``ModelAdapter.tf32``: off unless asked for; None = torch's global switches, read now)."""
    where = {m: session.adapters[m] for m in models if m in session.adapters}
    out = {"device": str(device), "model_devices": {m: str(a.device) for m, a in where.items()}}
    cuda = {m: a for m, a in where.items() if a.device.type == "cuda"}
    if cuda:
        out["tf32"] = {m: global_tf32() if a.tf32 is None else bool(a.tf32) for m, a in cuda.items()}
    return out


def new_samples(plan: Plan, widths: dict, device) -> dict:
    """Per layer, the row sample of the permutation test (empty dict without ``permutations``)."""
    if not plan.permutations:
        return {}
    from ..inspectors.spearman import RowSample
    return {l: RowSample(widths[l], len(plan.label_columns), plan.permutation_rows, device) for l in plan.layers}


def update_states(states: dict, samples: dict, batch: Batch, y: torch.Tensor, take: dict) -> None:
    """Fold one block of activations and its labels into every (layer, measure) state (and the
    permutation samples): the step both engines run per block (the Ray engine on its workers)."""
    rec = torch.from_numpy(np.repeat(batch.record_ids, batch.n_symbols))
    for layer, x in batch.acts.items():
        for (lay, m), st in states.items():
            if lay == layer:
                st.update(x, y[:, take[m]], rec)
        if samples:
            from ..inspectors.spearman import row_keys
            samples[layer].add(row_keys(x, y, rec), x, y)
    release_freed_memory()                 # the block's temporaries: back to the OS (engine/memory.py)


def make_engine(engine=None, ray_address=None, **ray_options):
    """The engine of a query: None or 'local' (this process), 'ray' (a Ray cluster at
    ``ray_address``: None starts or reuses a local Ray, 'auto' the running cluster, 'local' a Ray of
    this process alone (reused by the next query), 'host:port' or 'ray://host:port' a remote
    one), or an engine object with ``run(session, plan, progress)``."""
    if engine is None or engine == "local":
        if ray_address is not None or ray_options:
            raise DeepBaseError("ray_address and Ray options need engine='ray'")
        return LocalEngine()
    if engine == "ray":
        from .ray_engine import RayEngine      # imports ray only here
        return RayEngine(address=ray_address, **ray_options)
    if isinstance(engine, str):
        raise DeepBaseError(f"unknown engine {engine!r}; engines: local, ray")
    if not callable(getattr(engine, "run", None)):
        raise DeepBaseError(f"engine {engine!r} has no run(session, plan, progress) method")
    return engine


class StopRule:
    """The stop rules of a progressive scan, checked after each window (both engines), never
    before MIN_WINDOWS windows nor before ``plan.min_windows`` (a query of several models, or with
    its untrained twin: the window the others need, ``stop_together``):

    - ``max_error``: every state but the probes has a batch-means half-width of at most
      ``max_error`` (``bound``: the largest half-width at the last check; None for probes alone);
    - plateau (the probes, with ``plateau_tol``): at the windows 2, 4, 8, 16, ... (each check sees
      twice the records of the one before) every probe state fits its probe on its train sample
      (``ProbeState.probe_model``), and both this probe and the previous check's are scored on
      the current test split (``heldout_loss``: mean cross-entropy in nats, or squared error for
      a continuous head). A head's improvement is (previous loss - current loss) / the loss of
      the best constant prediction on those rows (``constant_loss``: the test labels' entropy,
      or variance), i.e. the gain in held-out pseudo-R2 (R2 for a continuous head), so a loss
      near 0 does not inflate it. A check is flat when every head of every probe state improved
      by less than ``plateau_tol``; the probes have plateaued when the last PLATEAU_PATIENCE
      checks were flat, i.e. over the last PLATEAU_PATIENCE doublings of the data. A check where
      a probe cannot be fit yet (too few rows of a class), without a previous probe, or with a
      head without test rows or meeting a class its previous probe never saw is not flat.
      Between checks the last check's verdict holds. The checks are recorded in
      ``plan.probe_checks``. As the checks double, all their fits together cost about twice
      the last one (a fit's time grows with its rows);
    - ``top_k``: every (layer, measure, hypothesis) top-k set has stayed the same over
      ``stable_windows`` windows.

    With ``max_error`` or ``plateau_tol`` the scan stops once the bounded states meet
    ``max_error`` (when given) and the probes have plateaued (when the query has any): the rule
    is named 'max_error', 'plateau' or 'max_error+plateau' after what had to hold.

    With ``min_support``, the ``max_error`` rule (and ``bound``) and the ``top_k`` rule leave out
    the scores of label columns whose support in the records read so far (``LabelSupport``) is
    below it; ``rare`` holds those columns and their support at the last check."""

    def __init__(self, plan: Plan):
        self.plan, self.history = plan, []
        self.bound = float("inf") if any(m != "probe" for m in plan.measures) else None
        self.models, self.plateaued = {}, False     # the probes fitted at the last check
        self.row_columns, self.rare = {}, {}
        self.moments = {}                           # (layer, measure): WindowMoments of its window scores
        # label columns that are whole hypotheses (not one category of a categorical one, which a
        # dataset may never hold: 'upos=PUNCT' over text without punctuation), and the binary ones
        self.whole_hypotheses = {c["name"] for c in plan.label_columns if c.get("code") is None}
        self.binary_hypotheses = {c["name"] for c in plan.label_columns
                                  if c.get("code") is None and c["kind"] == "binary"}
        # ... less those whose stored labels are constant over every selected record: no record
        # read later can define their scores (constant_label_columns)
        constant = set(getattr(plan, "constant_columns", None) or ())
        self.whole_hypotheses -= constant
        self.binary_hypotheses -= constant
        plan.probe_checks = []

    def check(self, states: dict, window_scores: dict, support: dict | None = None) -> str | None:
        """The rule that stops the scan now ('max_error', 'plateau', 'max_error+plateau',
        'top_k'), or None. ``support``: {label column: support} of the records merged so far
        (needed with ``min_support``)."""
        plan = self.plan
        windows = len(next(iter(window_scores.values())))
        enough = windows >= max(MIN_WINDOWS, plan.min_windows)
        bounded = [k for k in window_scores if k[1] != "probe"]
        probes = [k for k in states if k[1] == "probe"]
        if plan.min_support:
            self.rare = {c: int(n) for c, n in (support or {}).items() if n < plan.min_support}
        # binary hypotheses whose records read so far hold one of their values only (support 0):
        # not settled, whatever their scores say (an iou of 0, a NULL corr)
        unmet = [c for c, n in (support or {}).items() if n == 0 and c in self.binary_hypotheses
                 and c not in self.rare]
        if bounded:
            for k in bounded:                       # fold in the windows added since the last check
                m = self.moments.setdefault(k, WindowMoments())
                for w in window_scores[k][m.windows:]:
                    m.add(w)
            halves = {k: self.moments[k].half_width(getattr(states[k], "confidence", 0.95)) for k in bounded}
            for k in bounded:
                if (plan.min_support or unmet) and k not in self.row_columns:   # each finalize() row's column
                    self.row_columns[k] = states[k].score_rows()[1]
                if unmet:
                    halves[k] = np.where(np.isin(self.row_columns[k], unmet), np.inf, halves[k])
                if plan.min_support:
                    halves[k] = halves[k][~np.isin(self.row_columns[k], list(self.rare))]
            self.bound = max(h.max(initial=0.0) for h in halves.values())
            if plan.min_support and all(h.size == 0 for h in halves.values()):
                self.bound = float("inf")           # every column still rare: nothing is bounded yet
            if plan.max_error is not None and self.bound <= plan.max_error:
                self.bound = self._unseen_scores(states, halves, bounded)
        if probes and windows >= 2 and windows & (windows - 1) == 0:
            self.plateaued = self.probe_check(states, probes, windows)
        rules = []                              # (rule, whether it holds now)
        if bounded and plan.max_error is not None:
            rules.append(("max_error", self.bound <= plan.max_error))
        if probes:
            rules.append(("plateau", self.plateaued))
        if plan.top_k is not None:              # every window's sets: the verdict at a window is the
            # same whether or not an earlier window stopped a scan that min_windows holds on; a
            # column whose unit scores are all NULL so far (a class not met yet) has no set: its
            # ties by unit number would look stable
            sets = {}
            for k, st in states.items():
                rows = st.score_rows()
                undefined = (set(undefined_columns(*rows)) & self.whole_hypotheses) | set(unmet)
                sets[k] = {c: (None if c in undefined else top) for c, top in rank_sets(*rows, plan.top_k).items()}
            self.history.append(sets)
        if enough and rules and all(ok for _, ok in rules):
            return "+".join(r for r, _ in rules)
        if plan.top_k is not None:
            recent = [{k: {c: top for c, top in sets.items() if c not in self.rare} for k, sets in h.items()}
                      for h in self.history[-(plan.stable_windows + 1):]]
            if (enough and len(recent) == plan.stable_windows + 1 and all(h == recent[-1] for h in recent)
                    and not any(top is None for sets in recent[-1].values() for top in sets.values())):
                return "top_k"
        return None

    def _unseen_scores(self, states: dict, halves: dict, bounded: list) -> float:
        """The bound once scores defined in no window count: the half-width of a score that no
        window defined is 0 when the score is NULL for a reason more records cannot change (a
        constant unit), but a score can be defined over the records merged while undefined in
        each window (a label constant within a record and windows of one record, one labelled
        symbol per window): such a score is unbounded (inf), not settled; and so is every score
        of a hypothesis whose unit scores are all NULL so far (``undefined_columns``: a class not
        met yet, a label that has not varied), which a later record may define (not a category of
        a categorical hypothesis, 'upos=PUNCT', which the dataset may never hold). Read when the
        bound would otherwise stop the scan (the merged scores cost a finalize)."""
        for k in bounded:
            unseen = self.moments[k].k == 0
            if unseen.any():
                units, columns, score = states[k].score_rows()
                undefined = [c for c in undefined_columns(units, columns, score) if c in self.whole_hypotheses]
                unbounded = unseen & (~np.isnan(score) | np.isin(columns, undefined))
                if self.plan.min_support:
                    unbounded = unbounded[~np.isin(self.row_columns[k], list(self.rare))]
                halves[k] = np.where(unbounded, np.inf, halves[k])
        return max(h.max(initial=0.0) for h in halves.values())

    def probe_check(self, states: dict, probes: list, windows: int) -> bool:
        """One plateau check of the probe states (see the class docstring); records it in
        ``plan.probe_checks`` as {windows, train_rows, test_rows, loss, improvement, unfitted}
        keyed by layer (then hypothesis) and says whether the probes have plateaued."""
        rec = {"windows": windows, "train_rows": {}, "test_rows": {}, "loss": {}, "improvement": {}}
        flat = True
        for key in probes:
            st, layer = states[key], key[0]
            rec["train_rows"][layer] = int(st.sample("train")[0].numel())
            rec["test_rows"][layer] = int(st.sample("test")[0].numel())
            previous = self.models.pop(key, None)
            try:
                model = st.probe_model()
            except DeepBaseError as exc:          # too few rows of some class so far
                rec.setdefault("unfitted", {})[layer] = str(exc)
                flat = False
                continue
            self.models[key] = model
            loss = st.heldout_loss(model)
            rec["loss"][layer] = {h: _finite(v) for h, v in loss.items()}
            if previous is None:
                flat = False
                continue
            before, scale = st.heldout_loss(previous), st.constant_loss()
            gain = {h: _gain(before[h], loss[h], scale[h]) for h in loss}
            rec["improvement"][layer] = {h: _finite(v) for h, v in gain.items()}
            flat = flat and all(v < self.plan.plateau_tol for v in gain.values())     # NaN: not flat
        rec["plateau"] = flat
        self.plan.probe_checks.append(rec)
        recent = self.plan.probe_checks[-PLATEAU_PATIENCE:]
        return len(recent) == PLATEAU_PATIENCE and all(r["plateau"] for r in recent)


def _gain(before: float, after: float, scale: float) -> float:
    """(before - after) / scale; NaN unless every term is finite and the scale positive (no test
    rows, a class the earlier probe never saw, test labels of one class)."""
    if not (np.isfinite(before) and np.isfinite(after) and np.isfinite(scale) and scale > 0):
        return float("nan")
    return (before - after) / scale


def _finite(v: float) -> float | None:
    """A number for queries.params (JSON): None for NaN and infinities."""
    return round(float(v), 6) if np.isfinite(v) else None


class LocalEngine:
    """Runs a plan in this process: one loop over blocks, updating every state.

    ``pipeline``: run the forward passes in a background thread, one batch ahead of the loop
    (engine/prefetch.py), so that a GPU computes batch k+1 while the host labels and scores
    batch k. None (the default) does so where the model runs on CUDA, unless the adapter opts in
    to TF32 (``tf32=True``): its forward pass switches torch's process-wide TF32 flags on, and a
    float32 product of the inspectors running meanwhile in this thread would take them too.
    True or False forces it. Several models scanned together (``run_stacked``) are pipelined when
    every one of them would be. The scores, records read and stored rows are the same either way
    (tests/test_prefetch.py)."""

    name = "local"

    def __init__(self, pipeline: bool | None = None):
        self.pipeline = pipeline

    def pipelined(self, adapter) -> bool:
        return pipeline_by_default(adapter) if self.pipeline is None else bool(self.pipeline)

    def run(self, session, plan: Plan, progress=None, resume: dict | None = None) -> dict:
        """Scan ``plan``. ``resume``: the result of an earlier run of this progressive plan,
        which stopped at a window end; the scan goes on from the next window with the states,
        window scores and stop rule of that run (``stop_together`` raises ``plan.min_windows``
        first), as if that run had not stopped there."""
        mrow = session.model_row(plan.model)
        tokenization = mrow["tokenization"]
        progressive = plan.progressive
        selected = np.unique(plan.record_ids)
        widths = session.stored_widths(plan.model)
        scan = resume["scan"] if resume is not None else None
        if scan is None:
            behaviors, covered = stored_reads(session, plan, mrow["checksum"], tokenization)
            missing = np.setdiff1d(selected, covered)
            plan.source = "stored" if not len(missing) else ("stored+model" if len(covered) else "model")
            ran = []                               # batches the calibration ran: fed to the states, not run again
            calibration = mi_calibration(session, plan, behaviors, covered, ran=ran)
            states = {(layer, m): measure_class(m)(widths[layer], plan.columns[m], device=plan.device,
                                                  **state_params(plan, m, layer, calibration))
                      for layer in plan.layers for m in plan.measures}
            done = 0                               # windows merged so far
        else:                                      # the same records read from the same source
            behaviors, covered, missing = scan["behaviors"], scan["covered"], scan["missing"]
            states, done, ran = resume["states"], scan["windows"], []
        col_index = {c["name"]: j for j, c in enumerate(plan.label_columns)}
        take = {m: torch.as_tensor([col_index[c["name"]] for c in plan.columns[m]]) for m in plan.measures}
        show = session.progress if progress is None else progress
        counts = stored_symbol_counts(session, plan.dataset, tokenization)
        # records met by a forward pass for the first time: their symbols come from its encoding
        symbols = SymbolWriter(session, tokenization, plan.dataset, counts)
        sources, windows, keep, order = [], [], None, []

        def remaining():
            """A progressive scan's seeded windows from the first one not merged yet."""
            block_ids, w = seeded_windows(session, plan)
            return block_ids[sum(w[:done]):], w[done:]
        closing = []                               # sources read through another (mixed), closed at the end too
        if progressive and len(covered) and len(missing):
            # some records stored, some not (a dataset grown since its extraction): each seeded
            # batch reads its stored records' activations and runs the model on the rest, so the
            # scan reads the same records in the same windows as one over the model alone
            block_ids, w = remaining()
            stored_set = set(int(r) for r in covered)
            halves = [stored_halves(ids, stored_set) for ids in block_ids]
            per_batch = iter([bool(a) + bool(b) for a, b in halves])
            windows += [sum(next(per_batch) for _ in range(n)) for n in w]
            order += [r for a, b in halves for r in a + b]
            rows = StoredRows(stored_part_blocks(session, plan, behaviors, covered))
            adapter = session.adapter(plan.model)
            run_ids = [b for _, b in halves if b]
            computed = batch_source(
                session, lambda reader: forward_batches(reader, adapter, plan.model, plan.layers, plan.dataset,
                                                        run_ids, counts, defer_check=True, keep_encoding=True),
                self.pipelined(adapter))
            closing.append(computed)
            sources.append(_mixed(halves, rows, computed, counts))
            covered_read, to_run = np.zeros(0, np.int64), np.zeros(0, np.int64)
        else:
            covered_read, to_run = covered, None
        if len(covered_read):                     # stored activations: the model does not run for them
            blocks = stored_part_blocks(session, plan, behaviors, covered)
            if not progressive:                   # part by part
                windows.append(len(blocks))
                order += [r for ids, _ in blocks for r in ids]
                sources.append(read_part_block(ids, files, counts) for ids, files in blocks)
            else:                                 # the seeded windows of a scan that runs the model
                block_ids, w = remaining()
                windows += w
                order += [r for ids in block_ids for r in ids]
                rows = StoredRows(blocks)
                sources.append(rows.batch(ids, counts) for ids in block_ids)
        if ran:                                   # the records mi's calibration ran, first
            windows.append(len(ran))
            order += [int(r) for b in ran for r in b.record_ids]
            sources.append(_drain(ran))
        if to_run is None:
            to_run = np.setdiff1d(missing, order) if ran else missing
        if len(to_run):                           # the rest: one forward pass per batch, all layers
            adapter = session.adapter(plan.model)
            if not progressive:
                block_ids = plan_batches(session, plan.dataset, to_run, plan.batch_size)
                windows.append(len(block_ids))
            else:                                 # tokenised as the scan reaches them: it may stop early
                block_ids, w = remaining()
                windows += w
            order += [r for ids in block_ids for r in ids]
            # the consumer stores each batch's symbols from its encoding (Batch.encoded)
            sources.append(batch_source(
                session, lambda reader: forward_batches(reader, adapter, plan.model, plan.layers, plan.dataset,
                                                        block_ids, counts, defer_check=True, keep_encoding=True),
                self.pipelined(adapter)))
        source = itertools.chain(*sources)
        if plan.control and scan is None:         # class counts over every selected record's symbols
            counts.update(ensure_symbols(session, session.adapter(plan.model), plan.dataset, plan.record_ids))
            plan.control_freq = class_frequencies(session, plan, tokenization)
        labels = LabelStream(session, plan, tokenization, counts, order)
        # (after the labels' checks: a query they refuse leaves no behaviors row behind)
        keep = (KeepActivations(session, plan, mrow["checksum"], tokenization, widths, symbols, computed=missing)
                if plan.keep_activations and len(missing) else None)
        if scan is None:
            # (a progressive scan counts its labels: min_support, and the hypotheses not met yet)
            support = LabelSupport(plan.label_columns) if plan.min_support or progressive else None
            samples = new_samples(plan, widths, plan.device)
            used, stop, window_scores = [], StopRule(plan), {k: [] for k in states}
        else:
            support, samples, used, stop, window_scores = (scan["support"], resume["samples"], list(scan["used"]),
                                                           scan["stop"], resume["window_scores"])
        bar = progress_bar(len(plan.record_ids), f"inspect {plan.model} ({plan.source})", "rec", show)
        bar.update(len(used))
        checkpoints = set(np.cumsum(windows).tolist())   # the stop rule is checked at window ends
        stopped, rule = False, None
        make = lambda layer, m: measure_class(m)(widths[layer], plan.columns[m], device=plan.device,  # noqa: E731
                                                 **plan.measure_params.get(m, {}))
        # progressive scans feed a per-window state, finalised at the window's end (its scores
        # give the batch-means error bound) and then merged into the total
        feeding = {k: window_state(states[k], make, k) for k in states} if progressive else states
        progressed, shown = 0.0, 0
        try:
            for i, batch in enumerate(source, 1):
                # symbols and labels first: on CUDA the batch's forward pass is still running meanwhile
                if batch.encoded is not None:
                    symbols.add(batch.record_ids, batch.encoded)
                    batch.encoded = None
                y = labels.next(batch.record_ids, batch.chars, batch.texts)
                batch.verify()
                if keep is not None:
                    keep.write(batch)
                update_states(feeding, samples, batch, y, take)
                if support is not None:
                    support.add(y, batch.record_ids, batch.n_symbols)
                # (a batch may hold some of the layers: records counted in whole numbers, '16/89' not '16.0/89')
                progressed += len(batch.record_ids) * len(batch.acts) / len(plan.layers)
                bar.update(int(progressed) - shown)
                shown = int(progressed)
                used.extend(int(r) for r in batch.record_ids)
                if progressive and i in checkpoints:
                    for k, st in feeding.items():
                        window_scores[k].append(_score_matrix(st))
                        states[k].combine(st)
                        feeding[k] = window_state(states[k], make, k)
                    done += 1
                    rule = stop.check(states, window_scores, support and support.support())
                    if rule:
                        stopped = True
                        break
        finally:
            bar.close()
            failed = sys.exc_info()[0] is not None
            for src in sources + closing:         # a prefetching producer stops (and its thread ends) here
                src.close()
            symbols.close(failed=failed)
            labels.close(failed=failed)
            if keep is not None:                  # as a failed extract: no behavior row without a stored part
                # (also after a success: a progressive scan may stop before it runs the model once)
                drop_unstored_behaviors(session, keep.behaviors.values())
        used = sorted(set(used))
        n_symbols = int(sum(counts[r] for r in used))
        if n_symbols == 0:
            raise EmptyDatasetError(f"the selected records of dataset {plan.dataset!r} hold no symbols")
        return {"states": states, "n_symbols": n_symbols, "samples": samples, "take": take, "records_used": len(used),
                "stopped_early": stopped, "stop_rule": rule, "bound": stop.bound if progressive else None,
                "rare": stop.rare if plan.min_support else None,
                "window_scores": window_scores if progressive else None, "used_ids": used,
                "windows": done if progressive else None,
                # what a resumed run (stop_together) goes on from
                "scan": {"engine": "local", "windows": done, "behaviors": behaviors, "covered": covered,
                         "missing": missing, "support": support, "used": used, "stop": stop} if progressive else None,
                "reused": {"activation_records_read": int(len(np.intersect1d(covered, used))),
                           "activation_records_computed": int(len(np.intersect1d(missing, used)))}}

    def run_stacked(self, session, plans: list, progress=None, fuse: bool = True) -> list[dict]:
        """Several models of one architecture over the same records in one scan (engine/stacking.py):
        each batch is encoded once, its labels built once, and every model's states updated;
        the forward passes are fused with torch.vmap where the modules allow it."""
        from .stacking import StackedForward, stacked_batches
        p0 = plans[0]
        tokenization = session.model_row(p0.model)["tokenization"]
        adapters = {p.model: session.adapter(p.model) for p in plans}
        stacked = StackedForward(adapters, p0.layers, fuse=fuse)
        # mi's bins: its calibration records run once through every model, and their batches feed
        # the scan first (before the symbol counts: it may tokenise and store their symbols)
        ran = []
        calibration = mi_calibration_stacked(session, plans, stacked, ran)
        counts = stored_symbol_counts(session, p0.dataset, tokenization)
        symbols = SymbolWriter(session, tokenization, p0.dataset, counts)    # from the batches' encodings
        widths = {p.model: session.stored_widths(p.model)
                  for p in plans}
        per_model = {p.model: {(layer, m): measure_class(m)(widths[p.model][layer], p.columns[m], device=p.device,
                                                            **state_params(p, m, layer, calibration[p.model]))
                               for layer in p.layers for m in p.measures} for p in plans}
        col_index = {c["name"]: j for j, c in enumerate(p0.label_columns)}
        take = {m: torch.as_tensor([col_index[c["name"]] for c in p0.columns[m]]) for m in p0.measures}
        if p0.control:                            # class counts over every selected record's symbols
            counts.update(ensure_symbols(session, adapters[p0.model], p0.dataset, p0.record_ids))
            p0.control_freq = class_frequencies(session, p0, tokenization)
        for p in plans:
            p.source, p.control_freq = "model", p0.control_freq
        first_ids = [int(r) for batches in ran for r in next(iter(batches.values())).record_ids]
        rest = np.setdiff1d(np.asarray(p0.record_ids, np.int64), first_ids) if ran else p0.record_ids
        block_ids = plan_batches(session, p0.dataset, rest, p0.batch_size) if len(rest) else []
        labels = LabelStream(session, p0, tokenization, counts, first_ids + [r for ids in block_ids for r in ids])
        show = session.progress if progress is None else progress
        bar = progress_bar(len(p0.record_ids), f"inspect {len(plans)} models ({p0.model}, ...)", "rec", show)
        used = []
        # the consumer stores each batch's symbols from its encoding (Batch.encoded), as in run()
        source = batch_source(
            session, lambda reader: stacked_batches(reader, stacked, p0.layers, p0.dataset, block_ids, counts,
                                                    keep_encoding=True, defer_check=True),
            all(self.pipelined(a) for a in adapters.values()))
        try:
            for batches in itertools.chain(_drain(ran), source):
                first = next(iter(batches.values()))
                if first.encoded is not None:
                    symbols.add(first.record_ids, first.encoded)
                    first.encoded = None
                y = labels.next(first.record_ids, first.chars, first.texts)
                for name, batch in batches.items():
                    update_states(per_model[name], {}, batch.verify(), y, take)
                used.extend(int(r) for r in first.record_ids)
                bar.update(len(first.record_ids))
        finally:
            bar.close()
            failed = sys.exc_info()[0] is not None
            source.close()                        # a prefetching producer stops (and its thread ends) here
            symbols.close(failed=failed)
            labels.close(failed=failed)
        n_symbols = int(sum(counts[r] for r in used))
        if n_symbols == 0:
            raise EmptyDatasetError(f"the selected records of dataset {p0.dataset!r} hold no symbols")
        return [{"states": per_model[p.model],
                 "n_symbols": n_symbols, "samples": {}, "take": take, "records_used": len(used),
                 "stopped_early": False, "stop_rule": None, "bound": None, "window_scores": None, "used_ids": used,
                 "stacked": stacked.mode, "stacked_reason": stacked.reason,
                 "reused": {"activation_records_read": 0, "activation_records_computed": len(used)}}
                for p in plans]


def undefined_columns(units, columns, score) -> list:
    """The label columns of a state's ``score_rows()`` whose unit scores are all NULL (NaN): in
    a progressive scan, a hypothesis whose class has not been met yet (or whose label has not
    varied) in the records read so far; more records may define them."""
    units, columns = np.asarray(units), np.asarray(columns, dtype=object)
    score = np.asarray(score, dtype=np.float64)
    per_unit = units >= 0
    defined = set(columns[per_unit & ~np.isnan(score)].tolist())
    return [c for c in dict.fromkeys(columns[per_unit].tolist()) if c not in defined]


def top_sets(t: pa.Table, k: int) -> dict:
    """{hypothesis column: frozenset of its k units of largest |score|} of a finalised unit-level
    score table (NULL scores rank last; ties broken by unit number; rows without a unit, scores
    of the whole group, are not ranked)."""
    import pyarrow.compute as pc
    units = pc.fill_null(t.column("unit"), -1).to_numpy().astype(np.int64)
    score = np.array(pc.fill_null(t.column("score"), np.nan).to_numpy(), dtype=np.float64)
    return rank_sets(units, np.array(t.column("hypothesis").to_pylist(), dtype=object), score, k)


def rank_sets(units: np.ndarray, hypotheses: np.ndarray, score: np.ndarray, k: int) -> dict:
    """top_sets over a state's ``score_rows()`` (unit -1: a row of the whole group; score NaN:
    NULL). Vectorised: the ranking rule calls it after every window, on every (layer, measure)
    state."""
    score = np.nan_to_num(np.abs(np.asarray(score, dtype=np.float64)), nan=-1.0)   # NULL below every |score|
    import pyarrow.compute as pc
    codes = pc.dictionary_encode(pa.array(np.asarray(hypotheses, dtype=object), pa.string()))
    names = codes.dictionary.to_pylist()
    hyp = codes.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    units = np.asarray(units, dtype=np.int64)
    keep = units >= 0
    units, score, hyp = units[keep], score[keep], hyp[keep]
    order = np.lexsort((units, -score, hyp))                  # by hypothesis, |score| down, unit
    hyp_sorted = hyp[order]
    first = np.searchsorted(hyp_sorted, hyp_sorted, side="left")
    top = order[np.arange(len(order)) - first < k]
    out = {name: frozenset() for j, name in enumerate(names) if np.any(hyp == j)}
    for j in np.unique(hyp[top]):
        out[names[j]] = frozenset(units[top][hyp[top] == j].tolist())
    return out


def stack_obstacle(session, plans: list, local: bool) -> str | None:
    """Why several models are scanned one at a time instead of together (None: together)."""
    if not local:
        return "the scan runs on another engine"
    p = plans[0]
    if p.progressive or p.keep_activations or p.permutations:
        return "progressive scans, keep_activations and permutations run one model at a time"
    for q in plans:
        mrow = session.model_row(q.model)
        _, covered = stored_coverage(session, q, mrow["checksum"], mrow["tokenization"])
        if len(covered):
            return f"model {q.model!r} has stored activations for these records (read, not recomputed)"
    toks = {session.model_row(q.model)["tokenization"] for q in plans}
    if len(toks) > 1:
        return f"the models use different tokenizations ({', '.join(sorted(toks))})"
    return None


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


def untrained_model(loader: str, params: dict | None = None, seed: int = 0):
    """Loader spec of an untrained twin ('deepbase_duck.engine.inspect:untrained_model'): the
    model of ``loader`` (+ ``params``) through ``untrained_copy(adapter, seed)``."""
    from ..catalog import load_adapter
    return untrained_copy(load_adapter(loader, params or {}), seed)


def with_permutation_p_values(t: pa.Table, plan: Plan, measure: str, sample, cols) -> pa.Table:
    """Add perm_p_value (and perm_rows) to a unit-level score table: the measure recomputed on a
    seeded uniform sample of the scanned rows (at most plan.permutation_rows) with the labels
    permuted plan.permutations times; p = (1 + #|s| >= |obs|) / (1 + #permutations). Symbols are
    treated as exchangeable, which neighbouring symbols of a sequence are not: read it as a
    check of the parametric p-value, not as a stricter test."""
    from ..inspectors.significance import measure_score_fn, permutation_p_values
    columns = plan.columns[measure]
    fn = measure_score_fn(measure, columns, plan.device, **plan.measure_params.get(measure, {}))
    order = torch.argsort(sample.keys)        # the sample's rows by key: the seeded permutations then
    acts, labels = sample.acts[order], sample.labels[order][:, cols]    # do not depend on the batching
    perm = permutation_p_values(acts, labels, fn, plan.permutations, seed=0)
    name_idx = {c["name"]: i for i, c in enumerate(columns)}
    units = t.column("unit").to_pylist()
    hyps = t.column("hypothesis").to_pylist()
    vals = [None if u is None or h not in name_idx else float(perm[u, name_idx[h]]) for u, h in zip(units, hyps)]
    vals = [None if v is not None and v != v else v for v in vals]
    t = t.append_column("perm_p_value", pa.array(vals, pa.float64()))
    return t.append_column("perm_rows", pa.array([len(sample)] * t.num_rows, pa.int64()))


def with_batch_means_interval(t: pa.Table, window_scores: list, confidence: float,
                              score_range=(-np.inf, np.inf)) -> pa.Table:
    """For a progressive scan: the interval of each score becomes score +- the batch-means half
    width (clipped to the measure's range); detail gets the number of windows."""
    half = batch_means_half_width(window_scores, confidence)
    score = np.array(t.column("score").to_pylist(), dtype=np.float64)
    k = (~np.isnan(np.vstack(window_scores))).sum(0) if window_scores else np.zeros(t.num_rows, int)
    if window_scores:                      # defined over the records read, in no single window: unbounded
        half = np.where(k == 0, np.inf, half)
    lo = np.clip(score - half, *score_range)
    hi = np.clip(score + half, *score_range)
    lo, hi = np.where(np.isinf(lo), np.nan, lo), np.where(np.isinf(hi), np.nan, hi)   # NULL, not inf
    t = t.set_column(t.column_names.index("ci_low"), "ci_low", pa.array(lo, pa.float64(), from_pandas=True))
    t = t.set_column(t.column_names.index("ci_high"), "ci_high", pa.array(hi, pa.float64(), from_pandas=True))
    return t.append_column("interval", pa.array([f"batch means over {int(x)} of {len(window_scores)} windows"
                                                  for x in k]))


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


# -- caching with provenance -----------------------------------------------------------------------
def control_draw(plan) -> str | None:
    """The fingerprint's mark of a control query whose probe seed is not 0: its control tasks are
    drawn with that seed (engine/labels.py label_matrix), where they were drawn with seed 0 whatever
    the probe's seed before, so a query stored then holds the seed-0 draw under the key the query
    has without the mark. None (no mark: the key of before) otherwise."""
    if plan.control and int((plan.measure_params or {}).get("probe", {}).get("seed", 0)) != 0:
        return "probe_seed"
    return None


def query_fingerprint(session, plans: list, baseline: bool, baseline_seed: int, partial: bool = True) -> str:
    """The fingerprint a query's scores are stored under: ``query_fingerprints``' first."""
    return query_fingerprints(session, plans, baseline, baseline_seed, partial)[0]


def query_fingerprints(session, plans: list, baseline: bool, baseline_seed: int,
                       partial: bool = True, checksums: list[str] | None = None) -> tuple[str, str]:
    """sha256 of everything a query's scores depend on: the models' checksums and tokenisations,
    the layers, each hypothesis' name and version (not its kind, categories or settings, which a
    version given by hand keeps over an edit: ``cached_scores`` serves a query only where they
    are those of now, ``same_meaning``; stores' keys stay as they were), the dataset, the
    selected records and a hash of their text, the layers whose stored float16 activations it
    would read (float32 stored activations equal the forward pass's; with the records they cover
    where that is not all), the measures with their parameters, every option that changes a
    score, and for a progressive scan the hypotheses its stored labels show constant
    (``constant_label_columns``: known once they are stored, and the scan then stops earlier).
    Not the models' names: a cache hit is relabelled (cached_scores).

    Two of them: with the layers, hypotheses and measures sorted (the order they are given in
    changes no score) and each measure's parameters with their defaults (``effective_params``),
    which a query's scores are stored under; and the key of earlier versions (the lists in the
    order given, the parameters as given), which their stores hold (a cache hit matches either:
    such stores keep their scores), the same as the first where a parameter is an array (that
    key held only its first and last values).

    ``checksums`` (one per model) stand in for the models' own in the key, and nothing else:
    the keys of this query under identities its models were adopted from (``earlier_fingerprints``)."""
    plan = plans[0]
    ids = [int(r) for r in np.unique(plan.record_ids)]
    text_hash = store.q_scalar(session.con, "SELECT md5(string_agg(md5(text), ',' ORDER BY record_id)) FROM records "
                                            "WHERE dataset = ? AND list_contains(?, record_id)", [plan.dataset, ids])
    rows = [session.model_row(p.model) for p in plans]
    half = [float16_layers(session, p, r, partial) for p, r in zip(plans, rows)]
    key = {"checksums": list(checksums) if checksums is not None else [r["checksum"] for r in rows],
           "tokenizations": [r["tokenization"] for r in rows], "layers": list(plan.layers),
           "hypotheses": [[h["name"], h["version"]] for h in plan.hypotheses], "dataset": plan.dataset,
           "records": hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest(), "texts": text_hash,
           "measures": list(plan.measures), "measure_params": plan.measure_params, "control": plan.control,
           "permutations": plan.permutations, "permutation_rows": plan.permutation_rows,
           "max_error": plan.max_error, "seed": plan.seed if plan.progressive else None,
           "top_k": plan.top_k, "stable_windows": plan.stable_windows if plan.top_k else None,
           "batch_size": plan.batch_size if plan.progressive else None, "float16_read": half,
           "baseline": bool(baseline), "baseline_seed": baseline_seed if baseline else None,
           "scoring": SCORING_VERSION}
    revisions = {k: v for k, v in SCORING_REVISIONS.items()
                 if (k == "probe" and "probe" in plan.measures) or (k == "progressive" and plan.progressive)}
    if revisions:                             # only then, as below
        key["revisions"] = revisions
    if plan.plateau_tol is not None:          # only then: the fingerprints of other queries stay as they were
        key["plateau_tol"] = plan.plateau_tol
    if plan.min_support:
        key["min_support"] = plan.min_support
    if (draw := control_draw(plan)) is not None:
        key["control_draw"] = draw
    if self_calibrated_mi(plan):              # mi's bins from the rows it meets first: their order counts
        key["batch_size"] = plan.batch_size
        if plan.progressive:
            key["window_split"] = [store.q_scalar(session.con, "SELECT window_split FROM models WHERE name = ?",
                                                  [p.model]) for p in plans]
    if plan.constant_columns:                 # known from stored labels: a scan stops earlier than without
        key["constant_columns"] = sorted(plan.constant_columns)
    canonical = dict(key, layers=sorted(key["layers"]), hypotheses=sorted(key["hypotheses"]),
                     measures=sorted(key["measures"]),
                     measure_params={m: effective_params(m, plan.measure_params.get(m, {})) for m in plan.measures})
    arrays = []

    def whole(o):                             # an array's every value (str() elides all but 6 of 1000+)
        if hasattr(o, "tolist"):
            arrays.append(o)
            return o.tolist()
        return str(o)
    first = hashlib.sha256(json.dumps(canonical, sort_keys=True, default=whole).encode()).hexdigest()
    if arrays:                                # the earlier key read arrays elided: not looked up
        return first, first
    return first, hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def earlier_fingerprints(session, plans: list, baseline: bool, baseline_seed: int, partial: bool = True) -> list[str]:
    """The fingerprints (both of ``query_fingerprints``) this query had under the identities its
    models were adopted from (a store written before identities covered module classes or
    settings: catalog's ``_adopt_legacy_checksum`` records the old checksum of each model name it
    adopts, ``earlier_checksums``), each model under its own or an earlier checksum, except all
    under their own. Their scores were cached under these keys, which no query computes any
    more; [] where no model of the query was adopted (nothing more is computed then)."""
    rows = [session.model_row(p.model) for p in plans]
    choices = [[r["checksum"], *session.earlier_checksums(r["name"], r["checksum"])] for r in rows]
    if all(len(c) == 1 for c in choices):
        return []
    out = []
    for checksums in itertools.islice(itertools.product(*choices), 1, None):    # the first: all their own
        out.extend(query_fingerprints(session, plans, baseline, baseline_seed, partial, list(checksums)))
    return list(dict.fromkeys(out))


def effective_params(measure: str, given: dict) -> dict:
    """The parameters a state of ``measure`` runs with: the query's (``given``) over the defaults
    of its constructor's named parameters, so that a default given explicitly is the same query
    and a default changed by a later version another. (Only plain defaults, which JSON writes:
    an object's text may hold its address, another in every process.)"""
    out = {}
    for name, prm in pyinspect.signature(measure_class(measure)).parameters.items():
        if prm.default is prm.empty or name == "device":
            continue
        try:
            json.dumps(prm.default)
        except (TypeError, ValueError):
            continue
        out[name] = prm.default
    out.update(given)
    return out


def stored_reads(session, plan: Plan, checksum, tokenization, partial: bool = True) -> tuple[dict, np.ndarray]:
    """``stored_coverage`` as a scan uses it: a scan of an engine that cannot mix stored and
    computed records (``partial=False``: Ray) reads stored activations only when they cover
    every selected record, else none ({}, empty). (A progressive scan mixes them batch by
    batch: LocalEngine.run.)"""
    behaviors, covered = stored_coverage(session, plan, checksum, tokenization)
    if not partial and len(covered) < len(np.unique(plan.record_ids)):
        return {}, np.empty(0, np.int64)
    return behaviors, covered


def float16_layers(session, plan: Plan, mrow, partial: bool = True) -> list[str]:
    """The layers whose stored float16 activations a scan of ``plan`` would read (stored_reads).
    Where those cover only some selected records (the model runs for the rest), each name is
    followed by '@' and a hash of the records read: a later extraction that stores more of them
    changes the scores, so it changes the fingerprint too."""
    behaviors, covered = stored_reads(session, plan, mrow["checksum"], mrow["tokenization"], partial)
    half = sorted(layer for layer, b in behaviors.items() if b["dtype"] == "float16")
    if half and len(covered) < len(np.unique(plan.record_ids)):
        read = hashlib.sha256(np.unique(np.asarray(covered, np.int64)).tobytes()).hexdigest()[:16]
        half = [f"{layer}@{read}" for layer in half]
    return half


def hypothesis_meanings(session, plan: Plan) -> dict:
    """{name: {"kind", "categories", "settings"}} of the query's hypotheses: what their labels mean
    besides their version, recorded in ``queries.params`` (``hypothesis_meanings``). A version
    given by hand (``version="1"``) stays the same when these are edited, and once the labels of
    that version are gone (another version labelled since) the store computes them again with the
    new meaning (hypotheses/store.py ``_check_stored_meaning`` refuses a change only while labels
    of the old one are stored): the fingerprint, keyed by name and version, stays the same, and
    the cache must not serve the old meaning's scores (``same_meaning``). Settings
    (``version_settings``, an image grid's size and coverage) of a hypothesis known only to the
    store are its recorded ones, None where unknown."""
    from ..hypotheses.store import stored_settings
    out = {}
    for h in plan.hypotheses:
        live = h.get("live")
        settings = live.version_settings() if live is not None else stored_settings(session.con, h["name"],
                                                                                     h["version"])
        out[h["name"]] = {"kind": h["kind"], "categories": list(h["categories"]) if h["categories"] else None,
                          "settings": settings}
    return out


def same_meaning(rows: list, meanings: dict):
    """The first of ``rows`` (stored queries, latest first: query_id, params, ...) whose hypotheses
    had ``meanings`` (``hypothesis_meanings``; a setting unknown on either side is not compared),
    or None. A query stored before the meanings were recorded is taken as of this meaning (its
    store's cache stays valid), unless a later query of the same fingerprint recorded another:
    the meaning changed since, and which one it had is not known."""
    changed = False
    for row in rows:
        recorded = json.loads(row[1]).get("hypothesis_meanings")
        if not isinstance(recorded, dict):
            if not changed:
                return row
            continue
        if all(_meaning_matches(recorded.get(name), m) for name, m in meanings.items()):
            return row
        changed = True
    return None


def _meaning_matches(was, now: dict) -> bool:
    if not isinstance(was, dict):
        return False
    if was.get("kind") != now["kind"] or (was.get("categories") or None) != now["categories"]:
        return False
    return was.get("settings") is None or now["settings"] is None or was.get("settings") == now["settings"]


def cached_scores(session, plan: Plan, fingerprint: str, started: str, t0: float, model_label: str,
                  models: list[str], meanings: dict, as_given: str | None = None, earlier=()) -> pa.Table | None:
    """The scores of the latest stored query with this fingerprint (or ``as_given``, the one
    earlier versions stored: ``query_fingerprints``), copied under a new query id
    (a ``queries`` row with source 'cache', params->'reused'->'scores_of_query' and this
    fingerprint, which later queries then find); None when there is none. The copies carry this
    query's model names (``models``, in the order of the fingerprint's checksums; an untrained
    twin '<model>~untrained' follows its model): the same weights registered under another name
    share the cache, never the name.

    Failing those, the latest scan with one of ``earlier`` (``earlier_fingerprints``: this query
    under identities its models were adopted from) of these very model names, in this order:
    only the model adopted under a name was that name's model then (another name of the same
    old checksum may have been a model that checksum could not tell apart), and a copy ('cache')
    may hold another name's scores.

    Either way, only a query whose hypotheses meant what they mean now (``meanings``:
    ``hypothesis_meanings``, ``same_meaning``)."""
    con = session.con
    rows = store.q_all(con, "SELECT q.query_id, q.params, q.n_records, q.n_symbols FROM queries q "
                            "WHERE json_extract_string(q.params, '$.fingerprint') IN (?, ?) "
                            "AND EXISTS (SELECT 1 FROM scores s WHERE s.query_id = q.query_id) "
                            "ORDER BY q.query_id DESC", [fingerprint, as_given or fingerprint])
    row = same_meaning(rows, meanings)
    if row is None and earlier:
        scans = store.q_all(con, "SELECT q.query_id, q.params, q.n_records, q.n_symbols FROM queries q "
                                 "WHERE list_contains(?::VARCHAR[], json_extract_string(q.params, '$.fingerprint')) "
                                 "AND q.source <> 'cache' "
                                 "AND EXISTS (SELECT 1 FROM scores s WHERE s.query_id = q.query_id) "
                                 "ORDER BY q.query_id DESC", [list(earlier)])
        row = same_meaning([r for r in scans if json.loads(r[1]).get("models") == list(models)], meanings)
    if row is None:
        return None
    old, params, n_records, n_symbols = row
    params = json.loads(params)
    params["fingerprint"] = fingerprint
    rename = dict(zip(params.get("models") or [], models))
    rename.update({f"{a}~untrained": f"{b}~untrained" for a, b in list(rename.items())})
    params["models"] = list(models)
    params["reused"] = {"scores_of_query": int(old), "activation_records_read": 0, "activation_records_computed": 0,
                        "label_pairs_found": 0, "label_pairs_computed": 0}
    params.update(session.query_provenance(models, plan.dataset))     # this query's, as for a scan
    with store.Transaction(con):
        qid = int(store.q_scalar(con, "SELECT coalesce(max(query_id), 0) + 1 FROM queries"))
        con.execute("INSERT INTO queries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [qid, model_label, plan.dataset, plan.layers, [h["name"] for h in plan.hypotheses],
                     plan.measures, json.dumps(params, default=str), n_records, n_symbols, "cache", started,
                     round(time.time() - t0, 4)])
        cols = ", ".join(c for c in RESULT_SCHEMA.names if c != "query_id")
        named = cols.replace("model", "coalesce(map_extract_value(MAP(?::VARCHAR[], ?::VARCHAR[]), model), model)", 1)
        con.execute(f"INSERT INTO scores (query_id, {cols}) SELECT ?, {named} FROM scores WHERE query_id = ?",
                    [qid, list(rename), list(rename.values()), old])
    return store.q_arrow(con, f"SELECT query_id, {cols} FROM scores WHERE query_id = ?", [qid]).cast(RESULT_SCHEMA)


def reuse_report(plan: Plan, runs: list, labels_missing: dict) -> dict:
    """What a scan reused: activation records read from storage vs computed by the model (summed
    over the runs: the model and, with a baseline, its untrained copy), and label pairs
    (hypothesis, record) of the records used (by any run) that were stored before the query vs
    computed."""
    out = {"scores_of_query": None, "activation_records_read": 0, "activation_records_computed": 0}
    for _, r in runs:
        for k in ("activation_records_read", "activation_records_computed"):
            out[k] += r["reused"][k]
    used = np.unique(np.concatenate([np.asarray(r["used_ids"], np.int64) for _, r in runs]))
    computed = sum(int(len(np.intersect1d(v, used))) for v in labels_missing.values())
    out["label_pairs_found"] = int(len(used) * len(labels_missing) - computed)
    out["label_pairs_computed"] = computed
    return out


def stop_together(engine, session, runs: list, progress=None) -> list:
    """The runs of one progressive query (several models, or a model and its untrained twin)
    brought to one window, so that every model is scored on the same records: while some run
    stopped before another (or read fewer windows), it goes on (``engine.run(..., resume=)``; an
    engine without it scans again from the start) with ``plan.min_windows`` at the furthest run's
    window, until its own rule holds at or after it (or the records run out). The end is the first
    window, from MIN_WINDOWS on, where every run's rule holds (each run's rule is checked at every
    window whatever the floor), or the last window; independent of the models' order. Returns
    ``runs`` with the runs brought up to it."""
    if len(runs) < 2 or not runs[0][0].progressive or any(r.get("windows") is None for _, r in runs):
        return runs
    runs = list(runs)
    resumes = "resume" in pyinspect.signature(engine.run).parameters
    while True:
        target = max(r["windows"] for _, r in runs)
        behind = [i for i, (_, r) in enumerate(runs) if r["windows"] < target]
        if not behind:
            return runs
        for i in behind:
            p, r = runs[i]
            p.min_windows = target
            runs[i] = (p, engine.run(session, p, progress, resume=r) if resumes else engine.run(session, p, progress))
            if (runs[i][1].get("windows") or 0) < target:     # an engine that does not keep min_windows
                return runs


def per_model(runs: list, key: str) -> dict | None:
    """{model: value} of one key of the runs' results where the runs differ in it, else None."""
    values = {p.model: r.get(key) for p, r in runs}
    return values if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1 else None


def largest_half_width(t: pa.Table) -> float | None:
    """The largest distance from a score to an end of its interval in a finalised score table
    (None where no row has an interval)."""
    score, lo, hi = (t.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                     for c in ("score", "ci_low", "ci_high"))
    with np.errstate(invalid="ignore"):
        half = np.fmax(score - lo, hi - score)
    half = half[~np.isnan(half)]
    return float(half.max()) if half.size else None


def engine_report(runs: list, engine) -> dict:
    """Where a query's runs ran, for ``queries.params``: {"engine": name} when every run (model,
    twin) ran on one engine, else the engine asked for and ``engine_per_model`` (the Ray engine
    reads a model's stored activations locally while another model runs on Ray)."""
    asked = getattr(engine, "name", type(engine).__name__)
    where = {p.model: r.get("engine", asked) for p, r in runs}
    if len(set(where.values())) == 1:
        return {"engine": next(iter(where.values()))}
    return {"engine": asked, "engine_per_model": where}


def stop_report(runs: list) -> dict:
    """The early-stopping entries of ``queries.params`` for a query's runs (the models, their
    untrained twin), which stop_together has brought to one window: records_used, stopped_early
    (every run's rule held), stop_rule (the rule that held, or 'model: rule; ...' where the rules
    differ), bound_reached (the largest bound of any run), rare (the columns rare in the records
    read: the same for every model), plateau_checks (one list; per model for several runs); and
    ``per_model`` values where the runs still differ (an engine that cannot resume, the symbols of
    models of other tokenizations)."""
    first = runs[0][1]
    rules = {p.model: r["stop_rule"] for p, r in runs}
    bounds = [r["bound"] for _, r in runs if r.get("bound") is not None]
    rare = {}
    for _, r in runs:
        for c, n in (r.get("rare") or {}).items():
            rare[c] = min(n, rare.get(c, n))
    # a rule that first held at the last window stopped nothing: every record was read, and the
    # query reports a full scan (its intervals, and no early stop)
    read_all = all(r["records_used"] >= len(np.unique(p.record_ids)) for p, r in runs)
    stopped = all(r["stopped_early"] for _, r in runs) and not read_all
    out = {"records_used": max(r["records_used"] for _, r in runs),
           "stopped_early": stopped,
           "stop_rule": (None if not stopped else first["stop_rule"] if len(set(rules.values())) == 1
                         else "; ".join(f"{m}: {rule}" for m, rule in rules.items())),
           "bound_reached": max(bounds) if bounds else None,
           "rare": rare if first.get("rare") is not None else None,
           "plateau_checks": runs[0][0].probe_checks if len(runs) == 1
           else {p.model: p.probe_checks for p, _ in runs}}
    differ = {k: v for k in ("records_used", "n_symbols") if (v := per_model(runs, k)) is not None}
    if differ:
        out["per_model"] = differ
    return out


def check_companions(seed: int, dtype, keep_activations, max_error, top_k, plateau_tol, baseline=False,
                     baseline_seed: int = 0) -> None:
    """Refuse a setting that the rest of the query would ignore: a ``seed`` other than 0 orders
    the records of a progressive scan only (``max_error``, ``top_k`` or ``plateau_tol``), a
    ``dtype`` other than 'float32' is the type of the activations ``keep_activations`` stores,
    and a ``baseline_seed`` other than 0 seeds the untrained copy of ``baseline=True``. The
    defaults (0, 'float32', 0) pass alone: the SQL macro always gives them."""
    if seed != 0 and max_error is None and top_k is None and plateau_tol is None:
        raise DeepBaseError(f"seed={seed} orders the records of a progressive scan; give max_error, top_k or "
                            f"plateau_tol with it (a full scan reads every record, in no seeded order; for a "
                            f"seeded sample of records use the sample_records macro)")
    if isinstance(dtype, str) and dtype in DTYPES and dtype != "float32" and not keep_activations:
        raise DeepBaseError(f"dtype={dtype!r} is the type of the activations keep_activations stores; give "
                            f"keep_activations=True with it (the scores of a scan do not depend on it; "
                            f"extract() stores activations of a dtype without a query)")
    if baseline_seed != 0 and not baseline:
        raise DeepBaseError(f"baseline_seed={baseline_seed} seeds the untrained copy of the model that "
                            f"baseline=True scores; give baseline=True with it")


@store.one_writer                 # outermost: a query waiting for the lock is not capped yet
@caps_store_memory
def inspect(session, model, layers, hypotheses, dataset, measures=("corr",), record_ids=None, limit=None,
            batch_size=16, keep_activations=False, dtype="float32", device=None, store_scores=True,
            progress=None, engine=None, baseline=False, baseline_seed=0, control=False, permutations=0,
            permutation_rows=20_000, max_error=None, seed=0, top_k=None, stable_windows=None, reuse=True,
            ray_address=None, ray_options=None, plateau_tol=None, min_support=0,
            **measure_params) -> pa.Table:
    """Score ``layers`` of ``model`` against ``hypotheses`` over ``dataset``; returns (and stores)
    rows of (query_id, model, layer, unit, hypothesis, measure, score, n, ci_low, ci_high, p_value,
    q_value, detail). With ``baseline=True`` an untrained copy of the model ('<model>~untrained',
    seeded by ``baseline_seed``) is scored by the same query, in the same result. With
    ``control=True`` (probe measure) every binary or categorical hypothesis gets a control task
    and the result holds 'selectivity' rows (probe accuracy minus control accuracy). With
    ``permutations=N`` unit-level scores also carry a permutation-test p-value in
    ``detail->>'perm_p_value'`` (on a sample of ``permutation_rows`` rows). With ``max_error``
    the scan is progressive: records in the seeded order of ``seed``, stopping once every state's
    error bound (the batch-means confidence half-width over windows of records) is at most
    ``max_error`` and, with the probe measure, the probes' held-out loss has plateaued;
    ``queries.params`` reports the records used and the bound reached, and each score's n and
    interval are those of the records used. The plateau (StopRule): each time the records seen
    double (windows 2, 4, 8, ...) the probes are fit on their train split, and the probe of the
    previous check and the new one are scored on the same current test split (mean
    cross-entropy; squared error for continuous hypotheses); a head's improvement is the loss
    drop as a fraction of the constant prediction's loss (test-label entropy or variance). The
    probes have plateaued once every head improved by less than ``plateau_tol`` (default 0.01)
    at PLATEAU_PATIENCE (2) checks in a row, after at least MIN_WINDOWS windows. ``plateau_tol``
    alone (no ``max_error``) makes the scan progressive too, stopping on the plateau only.
    ``queries.params`` holds ``stop_rule`` ('max_error', 'plateau' or 'max_error+plateau': what
    had to hold), ``plateau_tol`` and ``plateau_checks`` (per check: windows, the probes' train
    and test rows, each head's held-out loss and improvement, per layer). This is a heuristic,
    not a bound: the probe's accuracy keeps its Wilson interval. With ``min_support=N`` (and
    ``max_error`` or ``top_k``) the stop rules leave out the scores of label columns seen fewer
    than N times in the records read so far (a binary column's rarer value, a categorical
    column's rarest category, a continuous column's labelled symbols): a class met in a handful
    of records cannot be bounded (nor its ranking settle) without reading most of the data, and
    would otherwise hold the whole scan. Their scores are still returned, with their (wide)
    batch-means intervals, and ``queries.params->'rare'`` lists those columns with their
    support. A hypothesis constant over the selected records' stored labels (a class the dataset
    lacks: ``constant_label_columns``) does not hold a progressive scan either; they are listed in
    ``queries.params->'constant_columns'``. With ``top_k`` (a ranking query) the
    scan is progressive too and also stops once, for every (layer, measure, hypothesis), the set of
    its ``top_k`` units by |score| has stayed the same over ``stable_windows`` (default 3; given
    without ``top_k``, an error) consecutive windows
    (after at least MIN_WINDOWS windows); ``stop_rule`` in ``queries.params`` says which rule
    stopped it. This rule is a heuristic, not a bound: the batch-means intervals are still
    reported for every score.

    ``seed`` orders the records of a progressive scan only, ``dtype`` ('float32' or 'float16')
    is the type of the activations stored with ``keep_activations=True``, and ``baseline_seed``
    seeds the untrained copy of ``baseline=True``: a seed other than 0 without ``max_error``,
    ``top_k`` or ``plateau_tol``, a dtype other than 'float32' without ``keep_activations``, or
    a baseline_seed other than 0 without ``baseline``, would change nothing and is refused
    (DeepBaseError). Their defaults alone are accepted (the SQL ``inspect`` macro always passes
    ``seed := 0``, ``dtype := 'float32'`` and ``baseline_seed := 0``).

    Caching: stored activations are read instead of running the model (for the records they
    cover; the model runs only for the rest), stored labels are not recomputed, and a query equal
    to an earlier one (same model checksum, layers, hypothesis versions, records and their text,
    measures and options, each list in any order: ``query_fingerprints``) returns that query's
    scores under a new query id without scanning anything (``reuse=False`` recomputes).
    ``queries.params->'reused'`` says what was reused: the cached query, activation records read
    vs computed, label pairs (hypothesis, record) found vs computed.

    ``store_scores=False`` returns the scores without storing any part of the result: no
    ``scores`` rows and no ``queries`` row (the rows' query_id is NULL; what ``queries.params``
    would hold, the records used and where the scan stopped included, is the returned table's
    schema metadata ``b"queries.params"``, JSON). It scans (no cached scores are served), and
    keeps what any scan caches: symbols, labels, and activations with ``keep_activations``.

    ``model`` may be a list of models of one architecture (checkpoints): they are scanned
    together (engine/stacking.py). A progressive scan of several models, or with ``baseline``,
    stops every one of them at the same window, the first where each model's rule holds
    (``stop_together``), so that all are scored on the same records. ``engine``: 'local'
    (default) or 'ray' (workers of a Ray cluster at ``ray_address`` run the model;
    ``ray_options``: RayEngine's keyword arguments), see engine/ray_engine.py."""
    t0 = time.time()
    engine = make_engine(engine, ray_address, **(ray_options or {}))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    models = [model] if isinstance(model, str) else list(model or [])
    if not models or not all(isinstance(m, str) and m for m in models):
        raise DeepBaseError(f"model must be a model name or a non-empty list of names, got {model!r}")
    if len(set(models)) != len(models):
        raise DeepBaseError(f"model names repeat in {models}")
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_int("seed", seed, 0, MAX_SEED)                 # (as SQL's seeded_order takes it: a BIGINT)
    baseline_seed = check_int("baseline_seed", baseline_seed, 0, MAX_SEED)
    check_companions(seed, dtype, keep_activations, max_error, top_k, plateau_tol, baseline, baseline_seed)
    plans = [plan_inspect(session, m, layers, hypotheses, dataset, measures, record_ids, limit, batch_size,
                          keep_activations, dtype, device, control, permutations, permutation_rows, max_error, seed,
                          top_k, stable_windows, plateau_tol, min_support, **measure_params) for m in models]
    plan = plans[0]
    model_label = ", ".join(models)
    fingerprint, as_given = query_fingerprints(session, plans, baseline, baseline_seed,
                                               partial=getattr(engine, "mixes_stored", True))
    meanings = hypothesis_meanings(session, plan)            # (the cache's check, then the query's params)
    if reuse and store_scores and not keep_activations:      # keep_activations asks for a scan
        earlier = earlier_fingerprints(session, plans, baseline, baseline_seed,
                                       partial=getattr(engine, "mixes_stored", True))
        hit = cached_scores(session, plan, fingerprint, started, t0, model_label, models, meanings, as_given,
                            earlier)
        if hit is not None:
            return hit
    labels_missing = missing_records(session.con, plan.hypotheses, plan.dataset, np.unique(plan.record_ids))
    local = isinstance(engine, LocalEngine)
    why_not = None if len(plans) > 1 else "one model"
    if why_not is None:
        why_not = stack_obstacle(session, plans, local)
    if why_not is None:
        runs = list(zip(plans, engine.run_stacked(session, plans, progress)))      # a LocalEngine (local)
    else:
        runs = []
        for p in plans:           # a progressive scan: at least the windows the models before needed
            p.min_windows = max([r.get("windows") or 0 for _, r in runs], default=0)
            runs.append((p, engine.run(session, p, progress)))
    if baseline:
        twin_name = f"{models[0]}~untrained"
        base = store.q_one(session.con, "SELECT loader, params FROM models WHERE name = ?", [models[0]])
        if getattr(engine, "name", "") == "ray" and base[0]:
            # workers rebuild the twin from a loader spec, never from a pickled module
            session.register_model(twin_name, "deepbase_duck.engine.inspect:untrained_model",
                                   {"loader": base[0], "params": json.loads(base[1] or "{}"), "seed": baseline_seed})
        else:
            session.register_model(twin_name, untrained_copy(session.adapter(models[0]), baseline_seed))
        twin = plan_inspect(session, twin_name, layers, hypotheses, dataset, measures, record_ids, limit,
                            batch_size, False, dtype, device, control, permutations, permutation_rows,
                            max_error, seed, top_k, stable_windows, plateau_tol, min_support, **measure_params)
        twin.min_windows = max([r.get("windows") or 0 for _, r in runs], default=0)
        runs.append((twin, engine.run(session, twin, progress)))
    # every model (and the twin) scored on the same records: one window where every rule holds
    runs = stop_together(engine, session, runs, progress)
    if any((r.get("engine_info") or {}).get("ray_stored_unseen") for _, r in runs):
        # the engine could not read the stored activations it was to read (Ray workers that do not
        # see the store's folder) and ran the model instead: the scores are those of a query that
        # reads no float16 parts, and a later query must be served them under that fingerprint
        fingerprint = query_fingerprint(session, plans, baseline, baseline_seed, partial=False)
    stopping = stop_report(runs)
    tables, bounds = [], []
    # scoring the states: fast for sums (corr), long for probes (a fit per layer) and for the
    # row samples' intervals (ap, spearman): its own bar, after the scan's
    bar = progress_bar(sum(len(r["states"]) for _, r in runs), f"score {', '.join(plan.measures)}", "state",
                       session.progress if progress is None else progress)
    try:
        for p, result in runs:
            # a progressive scan that read every record is a full scan: the states' own intervals
            # (records as clusters), and its bound the largest half-width of those; one that stopped
            # early reports the batch means it stopped on, and their bound
            read_all = result["records_used"] >= len(np.unique(p.record_ids))
            # (a run none of whose scores is defined, every unit constant or no symbol labelled,
            # has nothing to bound: it adds no bound, neither its rule's 0 nor an Infinity)
            run_bounds, estimated = [None if read_all else result["bound"]], False
            for (layer, m), state in result["states"].items():
                t = state.finalize()
                if m != "probe":
                    estimated = estimated or bool(np.any(~np.isnan(
                        t.column("score").to_numpy(zero_copy_only=False).astype(np.float64))))
                if result.get("window_scores") is not None and m != "probe" and not read_all:
                    t = with_batch_means_interval(t, result["window_scores"][(layer, m)],
                                                  getattr(state, "confidence", 0.95),
                                                  SCORE_RANGE.get(m, (-np.inf, np.inf)))
                elif result.get("bound") is not None and m != "probe":
                    run_bounds.append(largest_half_width(t))
                if p.permutations and result["samples"] and m != "probe":
                    t = with_permutation_p_values(t, p, m, result["samples"][layer], result["take"][m])
                n = t.num_rows
                tables.append(pa.table({
                    "model": pa.array([p.model] * n, pa.string()), "layer": pa.array([layer] * n, pa.string()),
                    **{name: t.column(name).cast(SCORE_SCHEMA.field(name).type) for name in SCORE_SCHEMA.names},
                    "detail": detail_column(t)}))
                bar.update(1)
            if result.get("bound") is not None and estimated:
                bounds.extend(run_bounds)
    finally:
        bar.close()
    scores = with_q_values(pa.concat_tables(tables))
    if any(r.get("bound") is not None for _, r in runs):
        # Infinity: defined scores without a finite interval; NULL: no defined score to bound
        known = [b for b in bounds if b is not None]
        stopping["bound_reached"] = max(known) if known else (float("inf") if bounds else None)
    con = session.con
    together = len(models) > 1 and why_not is None
    params = {"models": models,
              "scan": None if len(models) == 1 else ("together" if together else "one model at a time"),
              "why_one_at_a_time": why_not if len(models) > 1 and not together else None,
              "forward": runs[0][1].get("stacked") if together else None,
              "why_sequential": runs[0][1].get("stacked_reason") if together else None,
              "record_count": int(len(plan.record_ids)), "batch_size": plan.batch_size,
              "keep_activations": plan.keep_activations, "measure_params": plan.measure_params,
              "baseline": bool(baseline), "baseline_seed": baseline_seed,
              "max_error": plan.max_error, "seed": plan.seed, "records_used": stopping["records_used"],
              "top_k": plan.top_k, "stable_windows": plan.stable_windows if plan.top_k else None,
              "stopped_early": stopping["stopped_early"], "stop_rule": stopping["stop_rule"],
              "bound_reached": stopping["bound_reached"],
              "plateau_tol": plan.plateau_tol,
              "plateau_checks": stopping["plateau_checks"] if plan.plateau_tol else None,
              "min_support": plan.min_support or None, "rare": stopping["rare"],
              "constant_columns": plan.constant_columns or None,
              "fingerprint": fingerprint, "hypothesis_meanings": meanings,
              "reused": reuse_report(plan, runs, labels_missing),
              **session.query_provenance(models, plan.dataset),     # what a report checks (reports/data.py)
              **engine_report(runs, engine),
              **device_report(session, models, plan.device)}
    if "per_model" in stopping:
        params["per_model"] = stopping["per_model"]
    params.update(next((r["engine_info"] for _, r in runs if r.get("engine_info")), {}))   # (the first run's on Ray)
    if not store_scores:          # nothing of the result stored: no scores, no queries row (no query id)
        scores = pa.table({"query_id": pa.nulls(scores.num_rows, pa.int32()),
                           **{c: scores.column(c) for c in scores.column_names}}).cast(RESULT_SCHEMA)
        return scores.replace_schema_metadata({"queries.params": json.dumps(params, default=str)})
    with store.Transaction(con):
        qid = int(store.q_scalar(con, "SELECT coalesce(max(query_id), 0) + 1 FROM queries"))
        con.execute("INSERT INTO queries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [qid, model_label, plan.dataset, plan.layers, [h["name"] for h in plan.hypotheses],
                     plan.measures, json.dumps(params, default=str), int(stopping["records_used"]),
                     int(runs[0][1]["n_symbols"]), plan.source, started, round(time.time() - t0, 4)])
        scores = pa.table({"query_id": pa.array(np.full(scores.num_rows, qid, np.int32)),
                           **{c: scores.column(c) for c in scores.column_names}}).cast(RESULT_SCHEMA)
        store.insert_arrow(con, "scores", scores)
    return scores

"""A full scan's mi bins come from every row of the records first in a hash order of their ids
(engine/inspect.py mi_calibration), so its scores do not depend on batch_size or on whether the
activations were stored: checked against bins and MI computed here from the planted layer's
activations (sklearn's mutual_info_score) and across batch sizes, stored activations and the
stacked-checkpoint path."""
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import mutual_info_score

import deepbase_duck as dbd
from conftest import TEXTS, planted_adapter, planted_per_record
from deepbase_duck.inspectors.mutual_information import quantile_edges

HYPS = ["digit", "in_string"]
ROWS = 120                                       # calibration_rows: a few records of TEXTS * 3


@pytest.fixture
def three(con):
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS * 3)
    return con


def scores(t):
    return {(r["unit"], r["hypothesis"]): (r["score"], r["p_value"], json.loads(r["detail"])["bin_rule"])
            for r in t.to_pylist()}


def chosen_records(n_records, lengths, rows):
    """The calibration records by the documented rule, in plain Python integers."""
    key = sorted(range(n_records), key=lambda r: (((r + 0x632BE5AB) * 0x85EBCA6B) % 2 ** 32, r))
    out, total = [], 0
    for r in key:
        out.append(r)
        total += lengths[r]
        if total >= rows:
            break
    return out, total


def test_bins_from_the_hash_chosen_records_and_mi_as_sklearn(three):
    t = dbd.inspect(three, "planted", ["planted"], HYPS, "snippets", measures=["mi"], batch_size=5,
                    mi={"calibration_rows": ROWS})
    got = scores(t)
    texts = TEXTS * 3
    x1, y1, _ = planted_per_record(HYPS)                  # one copy of TEXTS
    x = np.concatenate([x1] * 3)
    y = np.concatenate([y1] * 3)
    rec = np.concatenate([np.full(len(s), i) for i, s in enumerate(texts)])
    ids = [r[0] for r in three.sql("SELECT record_id FROM records WHERE dataset = 'snippets' "
                                   "ORDER BY record_id").fetchall()]
    assert ids == list(range(len(texts)))                  # record ids 0.. in TEXTS order
    chosen, total = chosen_records(len(texts), [len(s) for s in texts], ROWS)
    edges = quantile_edges(torch.as_tensor(x[np.isin(rec, chosen)]), 10).numpy()
    for (u, h), (score, p, rule) in got.items():
        assert rule == f"quantile (10 bins) of the {total} rows of {len(chosen)} calibration records"
        b = np.searchsorted(edges[u], x[:, u].astype(np.float64), side="right")
        lab = y[:, HYPS.index(h)]
        keep = ~np.isnan(lab)
        if len(np.unique(b[keep])) < 2:
            assert score is None
            continue
        assert score == pytest.approx(mutual_info_score(lab[keep] != 0, b[keep]), abs=1e-9)


def test_scores_do_not_depend_on_batch_size_or_stored_activations(three):
    kw = dict(measures=["mi"], mi={"calibration_rows": ROWS}, reuse=False)
    base = scores(dbd.inspect(three, "planted", ["planted"], HYPS, "snippets", batch_size=2, **kw))
    assert scores(dbd.inspect(three, "planted", ["planted"], HYPS, "snippets", batch_size=17, **kw)) == base
    dbd.extract(three, "planted", ["planted"], "snippets", batch_size=3)
    stored = dbd.inspect(three, "planted", ["planted"], HYPS, "snippets", batch_size=2, **kw)
    params = json.loads(three.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    assert params["reused"]["activation_records_read"] == len(TEXTS) * 3        # read, not run
    assert scores(stored) == base


def test_checkpoints_scanned_together_take_their_own_bins(three):
    other = planted_adapter()
    with torch.no_grad():
        for p in other.module.parameters():
            p.mul_(1.5)
    dbd.register_model(three, "planted2", other)
    kw = dict(measures=["mi"], mi={"calibration_rows": ROWS}, batch_size=4, reuse=False)
    together = dbd.inspect(three, ["planted", "planted2"], ["planted"], HYPS, "snippets", **kw)
    for name in ("planted", "planted2"):
        alone = dbd.inspect(three, name, ["planted"], HYPS, "snippets", **kw)
        mine = [r for r in together.to_pylist() if r["model"] == name]
        assert {(r["unit"], r["hypothesis"]): r["score"] for r in mine} == \
            {(r["unit"], r["hypothesis"]): r["score"] for r in alone.to_pylist()}


def test_the_users_calibration_records_are_kept_and_bad_combinations_refused(three):
    from deepbase_duck.errors import DeepBaseError
    from deepbase_duck.inspectors import measure_class
    from deepbase_duck.inspectors.mutual_information import record_groups
    n = len(TEXTS[4])
    t = dbd.inspect(three, "planted", ["planted"], HYPS, "snippets", measures=["mi"], batch_size=4,
                    mi={"calibration_records": [4], "calibration_rows": n})
    assert {rule for _, _, rule in scores(t).values()} == {f"quantile (10 bins) of the {n} rows of 1 calibration records"}
    hb = [{"name": "d", "kind": "binary"}]
    with pytest.raises(DeepBaseError, match="edges or calibration_records"):
        measure_class("mi")(2, hb, bins=3, edges=[[0, 1], [0, 1]], calibration_records=[1])
    with pytest.raises(DeepBaseError, match="jackknife_groups must be at most 200"):
        measure_class("mi")(2, hb, jackknife_groups=201)
    st = measure_class("mi")(2, hb, calibration_records=[1], calibration_rows=5)
    with pytest.raises(DeepBaseError, match="record ids"):
        st.update(torch.zeros(3, 2), torch.zeros(3, 1))
    assert st.rows == 0 and st.buffered == 0                      # refused before any change
    # the engine's calibration records spread over the jackknife groups
    chosen, _ = chosen_records(400, [1] * 400, 60)
    groups = record_groups(torch.as_tensor(chosen), 20).numpy()
    assert len(set(groups.tolist())) >= 10


def counted(con, name):
    """A registered planted model that counts the rows of every forward pass it starts."""
    adapter = planted_adapter()
    seen = []
    adapter.module.register_forward_pre_hook(lambda mod, inp: seen.append(int(inp[0].shape[0])))
    adapter.variant = name                                 # (the hook counts, changes nothing)
    dbd.register_model(con, name, adapter)
    return seen


def test_a_full_scan_runs_each_record_once_calibration_included(three):
    """The batches mi's calibration ran feed the scan's states: a scan with mi runs the model on
    as many rows as one without (no record twice), and its scores equal those of scans of corr
    alone and of mi alone at another batch size."""
    plain, with_mi = counted(three, "plain"), counted(three, "with_mi")
    dbd.inspect(three, "plain", ["planted"], HYPS, "snippets", measures=["corr"], batch_size=5)
    t = dbd.inspect(three, "with_mi", ["planted"], HYPS, "snippets", measures=["mi", "corr"], batch_size=5,
                    mi={"calibration_rows": ROWS})
    assert sum(plain) >= len(TEXTS) * 3                    # every record (and the early-exit check's example)
    assert sum(with_mi) == sum(plain)
    got = {(r["measure"], r["unit"], r["hypothesis"]): r["score"] for r in t.to_pylist()}
    corr = dbd.inspect(three, "planted", ["planted"], HYPS, "snippets", measures=["corr"], batch_size=7)
    for r in corr.to_pylist():
        assert got[("corr", r["unit"], r["hypothesis"])] == pytest.approx(r["score"], abs=1e-12)
    alone = dbd.inspect(three, "planted", ["planted"], HYPS, "snippets", measures=["mi"], batch_size=3,
                        mi={"calibration_rows": ROWS})
    assert alone.num_rows == sum(1 for k in got if k[0] == "mi")
    for r in alone.to_pylist():
        assert got[("mi", r["unit"], r["hypothesis"])] == pytest.approx(r["score"], abs=1e-12)


def test_checkpoints_scanned_together_run_each_record_once_calibration_included(three):
    """Models scanned together (run_stacked) run mi's calibration records once each, through every
    model, and feed those batches to the scan: each model runs on as many rows as in a scan
    without mi, and the scores equal those of each model scanned alone."""
    a, b = counted(three, "ca"), counted(three, "cb")
    dbd.inspect(three, ["ca", "cb"], ["planted"], HYPS, "snippets", measures=["corr"], batch_size=5, reuse=False)
    a.clear(), b.clear()                                   # (the first scan also runs the early-exit check)
    dbd.inspect(three, ["ca", "cb"], ["planted"], HYPS, "snippets", measures=["corr"], batch_size=5, reuse=False)
    plain = (sum(a), sum(b))
    a.clear(), b.clear()
    kw = dict(measures=["mi", "corr"], batch_size=5, mi={"calibration_rows": ROWS}, reuse=False)
    t = dbd.inspect(three, ["ca", "cb"], ["planted"], HYPS, "snippets", **kw)
    assert (sum(a), sum(b)) == plain == (len(TEXTS) * 3, len(TEXTS) * 3)
    params = json.loads(three.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    assert params["scan"] == "together"                    # one scan of both models, not one after another
    for name in ("ca", "cb"):
        alone = dbd.inspect(three, name, ["planted"], HYPS, "snippets", **kw)
        mine = {(r["measure"], r["unit"], r["hypothesis"]): r["score"] for r in t.to_pylist() if r["model"] == name}
        assert len(mine) == alone.num_rows
        for r in alone.to_pylist():
            assert mine[(r["measure"], r["unit"], r["hypothesis"])] == pytest.approx(r["score"], abs=1e-12)


def test_checkpoints_whose_calibration_rows_would_be_too_large_set_their_bins_one_at_a_time(three, monkeypatch):
    """Past MI_CALIBRATION_HOLD_BYTES, models scanned together set their bins one model at a time
    and hold no batch (the scan runs those records again): the same scores, more rows run."""
    import sys
    engine = sys.modules["deepbase_duck.engine.inspect"]          # (the package's name 'inspect' is the function)
    a, b = counted(three, "ha"), counted(three, "hb")
    kw = dict(measures=["mi", "corr"], batch_size=5, mi={"calibration_rows": ROWS}, reuse=False)
    held = dbd.inspect(three, ["ha", "hb"], ["planted"], HYPS, "snippets", **kw)
    a.clear(), b.clear()
    monkeypatch.setattr(engine, "MI_CALIBRATION_HOLD_BYTES", 0)
    apart = dbd.inspect(three, ["ha", "hb"], ["planted"], HYPS, "snippets", **kw)
    chosen, _ = chosen_records(len(TEXTS) * 3, [len(t) for t in TEXTS * 3], ROWS)
    assert (sum(a), sum(b)) == (len(TEXTS) * 3 + len(chosen),) * 2
    want = {(r["model"], r["measure"], r["unit"], r["hypothesis"]): r["score"] for r in held.to_pylist()}
    got = {(r["model"], r["measure"], r["unit"], r["hypothesis"]): r["score"] for r in apart.to_pylist()}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12)

"""inspect()'s results and progressive queries: the bound a query reports when no score could
be estimated, and what ``store_scores=False`` leaves in the store."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import deepbase_duck as dbd

from conftest import TEXTS, planted_adapter, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


@dbd.hypothesis("unlabelled18", kind="continuous", description="labels no character (every symbol NULL)")
def unlabelled18(text):
    return []


@pytest.fixture
def many(con):
    rng = np.random.default_rng(3)
    records = ["".join(TEXTS[int(i)] for i in rng.integers(0, len(TEXTS), 3)) for _ in range(60)]
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "many", records)
    return con


def last_params(con) -> dict:
    return json.loads(con.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])


def test_no_estimable_score_reports_no_bound(many):
    """Every score NULL (a hypothesis that labels no symbol): there is nothing to bound, so the
    bound reached is NULL, neither Infinity (every record read) nor 0 (stopped early)."""
    args = ("planted", ["planted"], ["unlabelled18"], "many")
    # labels not stored yet: the scan cannot know the hypothesis is constant, and reads every record
    t = dbd.inspect(many, *args, batch_size=8, max_error=0.2, seed=5)
    p = last_params(many)
    assert p["records_used"] == 60 and p["stopped_early"] is False
    assert all(r["score"] is None and r["ci_low"] is None and r["ci_high"] is None for r in t.to_pylist())
    assert p["bound_reached"] is None
    assert many.sql("SELECT params->>'bound_reached' FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() == [(None,)]
    # now stored: constant over every record, so it does not hold the scan, which stops early
    t = dbd.inspect(many, *args, batch_size=8, max_error=0.2, seed=5)
    p = last_params(many)
    assert p["stopped_early"] is True and p["stop_rule"] == "max_error" and p["records_used"] < 60
    assert p["constant_columns"] == ["unlabelled18"]
    assert all(r["score"] is None and r["ci_low"] is None for r in t.to_pylist())
    assert p["bound_reached"] is None


def test_a_constant_unit_is_left_out_of_the_bound_not_of_the_result(many):
    """Unit 2 of the planted layer is constant: its score is NULL with a NULL interval (returned
    and stored), it does not hold the scan, and the bound is that of the other units."""
    t = dbd.inspect(many, "planted", ["planted"], ["digit"], "many", batch_size=8, max_error=0.2, seed=5)
    p = last_params(many)
    assert p["stopped_early"] is True and p["records_used"] < 60
    rows = {r["unit"]: r for r in t.to_pylist()}
    assert rows[2]["score"] is None and rows[2]["ci_low"] is None and rows[2]["ci_high"] is None
    assert json.loads(rows[2]["detail"])["interval"].startswith("batch means over 0 of ")
    stored = many.sql("SELECT score, ci_low, ci_high FROM scores WHERE unit = 2").fetchall()
    assert stored == [(None, None, None)]
    # the bound: the batch-means half-width (t quantile x sd / sqrt(windows)) of the defined
    # scores, recomputed here from each window's own corr (numpy) over the seeded windows
    order = [r for (r,) in many.sql("SELECT record_id FROM seeded_order('many', seed := 5)").fetchall()]
    texts = dict(many.sql("SELECT record_id, text FROM records WHERE dataset = 'many'").fetchall())
    adapter = planted_adapter()
    windows = []
    for lo in range(0, p["records_used"], 8):
        xs, ys = [], []
        for r in order[lo:lo + 8]:
            with torch.no_grad():
                xs.append(adapter.module.planted(adapter.encode([texts[r]]).inputs)[0].numpy())
            ys.append(np.array([c.isdigit() for c in texts[r]], float))
        x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys)
        windows.append([np.corrcoef(x[:, u], y)[0, 1] for u in (0, 1, 3, 4)])
    from scipy import stats
    w = np.array(windows)
    half = stats.t.ppf(0.975, len(w) - 1) * w.std(0, ddof=1) / np.sqrt(len(w))
    assert p["bound_reached"] == pytest.approx(half.max(), rel=1e-4)
    assert p["bound_reached"] <= 0.2


def test_store_scores_false_stores_no_part_of_the_result(many):
    """store_scores=False returns the scores and writes neither them nor their queries row (the
    query's params come with the returned table instead)."""
    dbd.inspect(many, "planted", ["planted"], ["digit"], "many")          # labels and symbols cached
    before = snapshot(many)
    t = dbd.inspect(many, "planted", ["planted"], ["digit"], "many", store_scores=False, batch_size=8,
                    max_error=0.2, seed=5)
    assert snapshot(many) == before
    assert t.num_rows == 5 and t.column("query_id").null_count == 5
    assert t.column("score").null_count == 1                          # the constant unit
    p = json.loads(t.schema.metadata[b"queries.params"])
    assert p["stopped_early"] is True and 0 < p["records_used"] < 60 and p["max_error"] == 0.2
    # the same query stored afterwards: the same scores, under a query id of its own
    s = dbd.inspect(many, "planted", ["planted"], ["digit"], "many", batch_size=8, max_error=0.2, seed=5)
    assert s.column("score").to_pylist() == t.column("score").to_pylist()
    assert s.column("query_id").to_pylist() == [2] * 5
    assert last_params(many)["records_used"] == p["records_used"]


def mix_rows(adapter, text: str) -> np.ndarray:
    """The planted model's 'mix' layer over one record (one row per character), float64."""
    m = adapter.module
    with torch.no_grad():
        ids = adapter.encode([text]).inputs
        return m.mix(torch.cat([m.planted(ids), m.embed(ids)], -1))[0].numpy().astype(np.float64)


def reference_mi(x: np.ndarray, y: np.ndarray, calibration: np.ndarray, bins: int = 10) -> np.ndarray:
    """Plug-in MI (sklearn) of each unit's bin (numpy's linear quantiles of ``calibration``, a
    bin b holding edges[b-1] <= x < edges[b]; of a run of tied edges, a point mass, the last
    moves to the next float up, so that the mass has a bin of its own) with the binary label."""
    from sklearn.metrics import mutual_info_score
    out = []
    for u in range(x.shape[1]):
        edges = np.quantile(calibration[:, u], np.arange(1, bins) / bins)
        last = np.r_[False, edges[1:] == edges[:-1]] & np.r_[edges[1:] != edges[:-1], True]
        edges = np.where(last, np.nextafter(edges, np.inf), edges)
        out.append(mutual_info_score(np.searchsorted(edges, x[:, u], side="right"), y))
    return np.array(out)


def test_progressive_mi_reading_every_record_bins_on_its_first_rows(many):
    """A progressive mi scan that reads every record (max_error tiny) takes its bins from the
    first calibration_rows rows of its seeded order, a full scan from every row of its
    calibration records: each equals sklearn's MI on those bins, so the two differ (a few % of
    the score here: 4 continuous tanh units, 10 bins) unless every row fits in calibration_rows."""
    texts = dict(many.sql("SELECT record_id, text FROM records WHERE dataset = 'many'").fetchall())
    order = [r for (r,) in many.sql("SELECT record_id FROM seeded_order('many', seed := 5)").fetchall()]
    adapter = planted_adapter()
    rows = {r: mix_rows(adapter, t) for r, t in texts.items()}
    labels = {r: np.array([c.isdigit() for c in t], int) for r, t in texts.items()}
    # the scan's row order: windows of 8 records in the seeded order, each window's records by id
    seeded = [r for lo in range(0, len(order), 8) for r in sorted(order[lo:lo + 8])]
    x = np.concatenate([rows[r] for r in seeded])
    y = np.concatenate([labels[r] for r in seeded])
    args = ("planted", ["mix"], ["digit"], "many")
    for cal in (1500, 10_000):                          # fewer rows than the data's, and more
        assert (cal < len(x)) == (cal == 1500)
        prog = dbd.inspect(many, *args, measures=["mi"], batch_size=8, max_error=1e-6, seed=5,
                           mi={"calibration_rows": cal})
        p = last_params(many)
        assert p["records_used"] == 60 and p["stopped_early"] is False
        got = np.array(prog.column("score").to_pylist())
        np.testing.assert_allclose(got, reference_mi(x, y, x[:cal]), rtol=1e-3)
        full = np.array(dbd.inspect(many, *args, measures=["mi"], batch_size=8,
                                    mi={"calibration_rows": cal}).column("score").to_pylist())
        detail = json.loads(many.sql("SELECT detail FROM scores ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
        n_cal = int(detail["bin_rule"].split(" of the ")[1].split(" rows")[0])
        ids = np.array(sorted(texts), np.int64)            # the documented hash order of the ids
        chosen = ids[np.lexsort((ids, ((ids + 0x632BE5AB) * 0x85EBCA6B) % 2 ** 32))].tolist()
        calibration, total = [], 0
        for r in chosen:                                  # the first records of the hash order
            calibration.append(rows[r])                   # until calibration_rows rows
            total += len(rows[r])
            if total >= cal:
                break
        assert total == n_cal or cal >= len(x)
        np.testing.assert_allclose(full, reference_mi(x, y, np.concatenate(calibration)), rtol=1e-3)
        if cal < len(x):
            assert np.max(np.abs(full - got) / full) > 0.01
        else:
            np.testing.assert_allclose(full, got, rtol=1e-9)

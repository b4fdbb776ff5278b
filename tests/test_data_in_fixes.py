"""Fixes of the data-in hunt: the model fingerprint, image reports, ImageAdapter loaders,
annotate/extract arguments, add_dataset and register_model input checks, failed extractions,
repeated record ids and the SQL surface's traceback helper."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXTS, planted_adapter, snapshot

import deepbase_duck as dbd
from deepbase_duck.catalog import session_of
from deepbase_duck.errors import ActivationError, DeepBaseError
from deepbase_duck.extraction.adapters import ModelAdapter, state_fingerprint
from deepbase_duck.extraction.image_adapter import ImageAdapter

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


def acts(con, view):
    return np.array([a for (a,) in con.sql(f"SELECT act FROM {view} ORDER BY record_id, pos").fetchall()])


# -- 1. units swapped through .data ----------------------------------------------------------
def test_units_swapped_through_data_are_another_model(planted):
    """A permutation written through `.data` keeps the version counter, every tensor's sum and
    norm and (here) its sampled values; the position-weighted sum sees it, so the edited model
    gets a new checksum and its activations are computed, not served from the stored ones."""
    adapter = session_of(planted).adapters["planted"]
    before = dbd.extract(planted, "planted", ["mix"], "snippets")[0]
    checksum = adapter.checksum
    assert state_fingerprint(adapter.module) == state_fingerprint(adapter.module)    # stable when unchanged
    w = adapter.module.embed.weight.data                 # rows 20 and 21: between the sampled values
    w[[20, 21]] = w[[21, 20]].clone()
    assert adapter.checksum != checksum
    after = dbd.extract(planted, "planted", ["mix"], "snippets")[0]
    assert after["extracted"] == len(TEXTS) and after["behavior_id"] != before["behavior_id"]
    with torch.no_grad():
        want = torch.cat([adapter.module(adapter.encode([t]).inputs)[0] for t in TEXTS]).numpy()
    np.testing.assert_allclose(acts(planted, after["view"]), want, atol=1e-6)
    w[[20, 21]] = w[[21, 20]].clone()                    # restored: the first model again
    assert adapter.checksum == checksum


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64])
def test_any_permutation_changes_the_fingerprint(dtype):
    """Swaps (inside a row of the fingerprint's blocks, across blocks, in the partial last block)
    and a cyclic shift of one tensor, in every dtype the fingerprint reads."""
    g = torch.Generator().manual_seed(0)
    n = 3 * 1024 + 77
    m = torch.nn.Module()
    m.register_buffer("t", (torch.randperm(n, generator=g) - n // 2).to(dtype))   # distinct values
    base = state_fingerprint(m)
    for i, j in [(5, 6), (5, 1024 + 5), (3 * 1024 + 1, 3 * 1024 + 2), (0, n - 1)]:
        t = m.t.clone()
        m.t.data[[i, j]] = t[[j, i]]
        assert state_fingerprint(m) != base, (i, j)
        m.t.data.copy_(t)
        assert state_fingerprint(m) == base
    m.t.data.copy_(torch.roll(m.t.clone(), 1))
    assert state_fingerprint(m) != base


# -- 2. image reports read the layer's own output ---------------------------------------------
class ConvBNReLU6(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.act = torch.nn.ReLU6(inplace=True)           # writes into the BatchNorm's output
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))))


def test_report_maps_read_a_batchnorm_before_its_inplace_relu6(con):
    from deepbase_duck.corpora.scenes import scene_records
    from deepbase_duck.reports.images import grid_maps, unit_maxima
    dbd.register_model(con, "cbr", ImageAdapter(ConvBNReLU6(), grid=4, size=16, device="cpu"))
    dbd.add_dataset(con, "sc", scene_records(3, seed=0))
    view = dbd.extract(con, "cbr", ["bn"], "sc")[0]["view"]
    stored = acts(con, view).reshape(3, 16, 4)                 # (records, cells, units)
    assert stored.min() < 0                                    # the BatchNorm's values, before the ReLU6
    maps = grid_maps(con, "cbr", "bn", "sc", [0, 1, 2])        # (3, C, G, G)
    np.testing.assert_allclose(maps.reshape(3, 4, 16).transpose(0, 2, 1), stored, atol=1e-6)
    ids, maxima = unit_maxima(con, "cbr", "bn", "sc")
    np.testing.assert_allclose(maxima, stored.max(1), atol=1e-6)
    assert (maxima < 0).any()                                  # a unit negative everywhere on an image


# -- 3. an ImageAdapter with its own loader ---------------------------------------------------
def grey_loader(text: str) -> np.ndarray:
    """Records are grey levels, '0'..'255' (as a loader of file paths, it reads no scene spec)."""
    return np.full((20, 30, 3), int(text), np.uint8)


def test_an_image_adapter_with_its_own_loader_registers_and_extracts(con):
    adapter = ImageAdapter(ConvBNReLU6(), grid=4, size=16, load_image=grey_loader, device="cpu")
    info = dbd.register_model(con, "grey", adapter)
    assert info["layers"] == 4
    assert dict(con.sql("SELECT layer, width FROM layers WHERE model = 'grey'").fetchall()) == \
        {"conv": 4, "bn": 4, "act": 4, "head": 2}
    dbd.add_dataset(con, "levels", ["0", "128", "255"])
    res = dbd.extract(con, "grey", ["head"], "levels")
    assert res[0]["extracted"] == 3
    seen = []
    given = ImageAdapter(ConvBNReLU6(), grid=4, size=16, device="cpu", example_text="7",
                         load_image=lambda t: seen.append(t) or grey_loader(t))
    dbd.register_model(con, "grey7", given)
    assert seen and set(seen) == {"7"}                        # example_text= is what the loader gets


def test_an_example_the_encoder_cannot_read_is_named(con):
    class Picky(ModelAdapter):
        tokenization = "picky"

        def encode(self, texts):
            raise ValueError("not a record of mine")
    with pytest.raises(DeepBaseError, match="example_text"):
        dbd.register_model(con, "picky", Picky(torch.nn.Linear(2, 2), device="cpu"))
    assert con.sql("SELECT count(*) FROM models").fetchall() == [(0,)]


# -- 4. and 5. annotate's record ids, single strings ------------------------------------------
def test_annotate_checks_record_ids_and_counts_a_repeat_once(planted):
    before = snapshot(planted)
    with pytest.raises(DeepBaseError, match=r"not records of dataset 'snippets': 99"):
        dbd.annotate(planted, ["digit"], "snippets", record_ids=[0, 99])
    assert snapshot(planted) == before
    assert dbd.annotate(planted, ["uppercase"], "snippets", record_ids=[1, 1]) == \
        [{"hypothesis": "uppercase", "labeled": 1, "reused": 0}]
    assert dbd.annotate(planted, ["uppercase"], "snippets", record_ids=[1, 2, 1]) == \
        [{"hypothesis": "uppercase", "labeled": 1, "reused": 1}]


def test_extract_and_annotate_take_a_single_name(planted):
    res = dbd.extract(planted, "planted", "mix", "snippets")
    assert [r["layer"] for r in res] == ["mix"] and res[0]["extracted"] == len(TEXTS)
    assert dbd.annotate(planted, "digit", "snippets") == \
        [{"hypothesis": "digit", "labeled": len(TEXTS), "reused": 0}]


# -- 6. lone surrogates ---------------------------------------------------------------------
def test_add_dataset_names_a_lone_surrogate(con):
    dbd.add_dataset(con, "d", ["kept"])
    before = snapshot(con)
    with pytest.raises(DeepBaseError, match=r"dataset 'd': record 2's text holds '\\ud83e' at character 4"):
        dbd.add_dataset(con, "d", ["kept", "fine too", "bad \ud83e here"])
    with pytest.raises(DeepBaseError, match=r"dataset 'e': record 1's source holds"):
        dbd.add_dataset(con, "e", [{"text": "a"}, {"text": "b", "source": "x\udc80"}])
    assert snapshot(con) == before
    assert con.sql("SELECT text FROM records").fetchall() == [("kept",)]


# -- 7. a failed extraction leaves no behaviors row -------------------------------------------
def test_a_failed_extraction_leaves_no_behavior_without_parts(con):
    dbd.register_model(con, "nan", planted_adapter(nan_on_tilde=True))
    dbd.add_dataset(con, "d", ["x = ~1\n", "y = 2\n"])
    with pytest.raises(ActivationError, match="NaN"):
        dbd.extract(con, "nan", ["planted", "mix"], "d")
    assert con.sql("SELECT count(*) FROM behaviors").fetchall() == [(0,)]
    assert con.sql("SELECT count(*) FROM duckdb_views() WHERE view_name LIKE 'behavior_%'").fetchall() == [(0,)]
    acts_dir = session_of(con).act_root
    assert not acts_dir.is_dir() or list(acts_dir.iterdir()) == []
    dbd.add_dataset(con, "ok", ["y = 2\n"])
    assert dbd.extract(con, "nan", ["mix"], "ok")[0]["extracted"] == 1     # the ids are free again


def test_a_failed_extraction_keeps_committed_parts_to_resume(con):
    dbd.add_dataset(con, "snippets", TEXTS)
    crashing = planted_adapter(fail_after=2)
    dbd.register_model(con, "planted", crashing)
    crashing.exits_early(["planted"])
    crashing.module.calls = 0
    with pytest.raises(RuntimeError, match="simulated crash"):
        dbd.extract(con, "planted", ["planted"], "snippets", batch_size=4)
    assert con.sql("SELECT count(*) FROM behaviors").fetchall() == [(1,)]
    assert con.sql("SELECT count(*) FROM behavior_records").fetchall() == [(8,)]
    dbd.register_model(con, "planted", planted_adapter())
    res = dbd.extract(con, "planted", ["planted"], "snippets", batch_size=4)
    assert res[0]["reused"] == 8 and res[0]["extracted"] == len(TEXTS) - 8


# -- 8. register_model's name and params ------------------------------------------------------
@pytest.mark.parametrize("name", ["", "   ", None])
def test_register_model_refuses_a_blank_name(con, name):
    with pytest.raises(DeepBaseError, match="model name must be a non-empty string"):
        dbd.register_model(con, name, planted_adapter())
    assert con.sql("SELECT count(*) FROM models").fetchall() == [(0,)]


def test_register_model_params_errors_name_params(con):
    with pytest.raises(DeepBaseError, match="params must be a dict"):
        dbd.register_model(con, "m", "deepbase_duck.models.zoo:charlstm", [1, 2])
    for sql, pattern in [("SELECT register_model(NULL, 'deepbase_duck.models.zoo:charlstm')",
                          "model name must be a non-empty string, got None"),
                         ("SELECT register_model('', 'deepbase_duck.models.zoo:charlstm')",
                          "model name must be a non-empty string"),
                         ("SELECT register_model('m', 'deepbase_duck.models.zoo:charlstm', '{bad json')",
                          r"register_model\('m'\): params is not valid JSON"),
                         ("SELECT register_model('m', 'deepbase_duck.models.zoo:charlstm', '[1, 2]')",
                          r"register_model\('m'\): params must be a JSON object")]:
        with pytest.raises(Exception, match=pattern):
            con.sql(sql).fetchall()
    assert con.sql("SELECT count(*) FROM models").fetchall() == [(0,)]


# -- engine 1. repeated record ids --------------------------------------------------------------
def test_repeated_record_ids_are_read_once(con):
    a, b = planted_adapter(), planted_adapter()
    with torch.no_grad():
        b.module.embed.weight.mul_(3)
    dbd.register_model(con, "m1", a)
    dbd.register_model(con, "m2", b)
    dbd.add_dataset(con, "snippets", TEXTS)
    assert session_of(con).select_records("snippets", [3, 1, 3, 0, 1]).tolist() == [3, 1, 0]
    assert session_of(con).select_records("snippets", [3, 1, 3, 0], limit=2).tolist() == [3, 1]
    uniq = list(range(6))
    dup = uniq + uniq[:3]

    def scores(t):
        return {(r["model"], r["unit"], k): r[k] for r in t.to_pylist() for k in ("score", "n")}
    for models in ("m1", ["m1", "m2"]):
        one = dbd.inspect(con, models, ["mix"], ["digit"], "snippets", record_ids=uniq, reuse=False)
        two = dbd.inspect(con, models, ["mix"], ["digit"], "snippets", record_ids=dup, reuse=False)
        assert scores(two) == pytest.approx(scores(one), abs=1e-12)
        assert con.sql("SELECT n_records FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() == [(6,)]
    c1 = dbd.compare_layers(con, ["m1:planted", "m1:mix"], "snippets", record_ids=uniq).to_pylist()[0]
    c2 = dbd.compare_layers(con, ["m1:planted", "m1:mix"], "snippets", record_ids=dup).to_pylist()[0]
    assert (c2["score"], c2["n"]) == pytest.approx((c1["score"], c1["n"]), abs=1e-12)


# -- surface 9. the traceback helper --------------------------------------------------------------
def test_last_error_is_documented_as_it_works(con):
    from deepbase_duck.surface import udfs
    with pytest.raises(Exception, match="model name must be a non-empty string"):
        con.sql("SELECT register_model('', 'deepbase_duck.models.zoo:charlstm')").fetchall()
    trace = con.sql("SELECT last_error()").fetchall()[0][0]
    assert "Traceback" in trace and "model name must be a non-empty string" in trace
    assert "SELECT last_error()" in udfs.__doc__ and "FROM dbd_last_error()" not in udfs.__doc__
    assert "SELECT last_error()" in (ROOT / "README.md").read_text()

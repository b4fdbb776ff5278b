"""Bad input: one clear error naming the culprit, and the stored tables left as they were."""
from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.errors import (ActivationError, DeepBaseError, EmptyDatasetError, HypothesisError,
                                  UnknownNameError)
from deepbase_duck.hypotheses.core import Hypothesis, register

from conftest import TEXTS, planted_adapter, snapshot


@pytest.fixture
def primed(planted):
    dbd.extract(planted, "planted", ["planted"], "snippets")
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets")
    return planted


def test_unknown_model_lists_valid_ones(primed):
    before = snapshot(primed)
    with pytest.raises(UnknownNameError, match=r"unknown model 'nope'; valid models: planted"):
        dbd.inspect(primed, "nope", ["planted"], ["digit"], "snippets")
    assert snapshot(primed) == before


def test_unknown_layer_lists_valid_ones(primed):
    before = snapshot(primed)
    with pytest.raises(UnknownNameError) as e:
        dbd.inspect(primed, "planted", ["plantd"], ["digit"], "snippets")
    assert "unknown layer 'plantd'" in str(e.value) and "planted" in str(e.value) and "mix.0" in str(e.value)
    assert "did you mean 'planted'?" in str(e.value)            # the close name first, wherever it sorts
    with pytest.raises(UnknownNameError, match="unknown layer 'nope'"):
        dbd.extract(primed, "planted", ["nope"], "snippets")
    assert snapshot(primed) == before


def test_unknown_hypothesis_dataset_and_measure(primed):
    before = snapshot(primed)
    with pytest.raises(UnknownNameError, match="unknown hypothesis 'no_such_hyp'.*in_string"):
        dbd.inspect(primed, "planted", ["planted"], ["no_such_hyp"], "snippets")
    with pytest.raises(UnknownNameError, match="unknown dataset 'nodata'; valid datasets: snippets"):
        dbd.inspect(primed, "planted", ["planted"], ["digit"], "nodata")
    with pytest.raises(UnknownNameError, match="unknown measure 'corrr'; did you mean 'corr'.*valid measures: .*corr"):
        dbd.inspect(primed, "planted", ["planted"], ["digit"], "snippets", measures=["corrr"])
    assert snapshot(primed) == before


def test_hypothesis_of_wrong_length(primed):
    register(Hypothesis("too_short", lambda text: [0] * (len(text) - 1), "binary"))
    before = snapshot(primed)
    with pytest.raises(HypothesisError, match=r"hypothesis 'too_short' on record snippets:0 returned \d+ "
                                              r"per-character values for a text of \d+ characters"):
        dbd.inspect(primed, "planted", ["planted"], ["too_short"], "snippets")
    after = snapshot(primed)
    assert {k: v for k, v in after.items() if k != "hypotheses"} == {k: v for k, v in before.items() if k != "hypotheses"}


@pytest.mark.parametrize("fn,kind,message", [
    (lambda text: "abc", "binary", "returned a str"),
    (lambda text: None, "binary", "returned None"),
    (lambda text: [2] * len(text), "binary", "binary value 2 at character 0 is not 0/1"),
    (lambda text: ["x"] * len(text), "continuous", "values are not numbers"),
    (lambda text: [float("inf")] * len(text), "continuous", "infinite value at character 0"),
    (lambda text: [(0, len(text) + 5)], "binary", r"span \(0, \d+\) is outside the text"),
    (lambda text: [(0, 3, 1.0), (2, 5, 2.0)], "continuous", r"spans \(0, 3\) and \(2, 5\) overlap"),
    (lambda text: 42, "binary", "returned int"),
    (lambda text: 1 / 0, "binary", "raised ZeroDivisionError on record snippets:0"),
])
def test_hypothesis_of_wrong_type(primed, fn, kind, message):
    register(Hypothesis("bad_hyp", fn, kind))
    before = snapshot(primed)
    with pytest.raises(HypothesisError, match=message):
        dbd.annotate(primed, ["bad_hyp"], "snippets")
    assert snapshot(primed)["labels"] == before["labels"]


def test_categorical_value_outside_categories(primed):
    register(Hypothesis("cat_bad", lambda t: ["a"] * len(t), "categorical", categories=("b", "c")))
    with pytest.raises(HypothesisError, match=r"value 'a' at character 0 is not one of the declared categories"):
        dbd.annotate(primed, ["cat_bad"], "snippets")


def test_empty_dataset(con):
    with pytest.raises(EmptyDatasetError, match="dataset 'empty': no records given"):
        dbd.add_dataset(con, "empty", [])
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "blank", ["", ""])
    with pytest.raises(EmptyDatasetError, match="hold no symbols"):
        dbd.inspect(con, "planted", ["planted"], ["digit"], "blank")
    assert con.sql("SELECT count(*) FROM scores").fetchall() == [(0,)]


def test_nan_activations_name_the_record(con):
    dbd.register_model(con, "nanny", planted_adapter(nan_on_tilde=True))
    dbd.add_dataset(con, "tilde", ["abc 1\n", "x = 2\n", "ok ~ bad\n", "fine 3\n"])
    with pytest.raises(ActivationError, match=r"model 'nanny' layer 'planted' produced NaN or infinite "
                                              r"activations on record 2 of dataset 'tilde'"):
        dbd.extract(con, "nanny", ["planted"], "tilde", batch_size=1)
    # batches before the bad record are committed and intact; nothing of the bad batch is stored
    rows = con.sql("SELECT record_id FROM behavior_records ORDER BY record_id").fetchall()
    assert (2,) not in rows and len(rows) >= 1
    with pytest.raises(ActivationError):
        dbd.inspect(con, "nanny", ["planted"], ["digit"], "tilde")
    assert con.sql("SELECT count(*) FROM scores").fetchall() == [(0,)]


def test_a_bad_device_is_named_and_changes_nothing(primed):
    before = snapshot(primed)
    with pytest.raises(DeepBaseError, match="unknown device 'gpu'"):
        dbd.inspect(primed, "planted", ["planted"], ["digit"], "snippets", device="gpu")
    with pytest.raises(duckdb.Error, match="unknown device 'tpu:0'"):
        primed.sql("SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets', device := 'tpu:0')").fetchall()
    with pytest.raises(duckdb.Error, match="unknown device 'gpu'"):
        primed.sql("SELECT * FROM compare_layers(['planted:planted', 'planted:mix'], 'snippets', "
                   "device := 'gpu')").fetchall()
    if not torch.cuda.is_available():
        with pytest.raises(DeepBaseError, match="no CUDA device on this machine"):
            dbd.inspect(primed, "planted", ["planted"], ["digit"], "snippets", device="cuda")
    else:
        with pytest.raises(DeepBaseError, match="CUDA device"):
            dbd.inspect(primed, "planted", ["planted"], ["digit"], "snippets",
                        device=f"cuda:{torch.cuda.device_count()}")
    assert snapshot(primed) == before


def test_sql_errors_name_the_culprit(primed):
    before = snapshot(primed)
    with pytest.raises(duckdb.Error, match="unknown dataset 'missing_table'"):
        primed.sql("SELECT * FROM inspect('planted', ['planted'], ['digit'], 'missing_table')").fetchall()
    with pytest.raises(duckdb.Error, match="unknown layer 'nolayer'"):
        primed.sql("SELECT * FROM inspect('planted', ['nolayer'], ['digit'], 'snippets')").fetchall()
    with pytest.raises(duckdb.Error, match="unknown model 'ghost'"):
        primed.sql("SELECT * FROM extract_activations('ghost', ['x'], 'snippets')").fetchall()
    # the traceback of the last failed UDF is kept for the user
    tb = primed.sql("SELECT last_error()").fetchall()[0][0]
    assert "Traceback" in tb and "ghost" in tb
    assert snapshot(primed) == before


def test_measure_that_does_not_take_the_kind(primed):
    register(Hypothesis("cat_ok", lambda t: ["b"] * len(t), "categorical", categories=("b", "c")))
    # corr expands categorical hypotheses into indicators; a measure restricted to binary refuses
    from deepbase_duck.inspectors.base import InspectorState, MEASURES, register_measure

    @register_measure
    class BinaryOnly(InspectorState):
        measure = "binary_only_test"
        accepts = ("binary",)

    try:
        with pytest.raises(DeepBaseError, match="measure 'binary_only_test' does not take continuous hypotheses "
                                                "\\(hypothesis 'bracket_depth'\\)"):
            dbd.inspect(primed, "planted", ["planted"], ["bracket_depth"], "snippets", measures=["binary_only_test"])
    finally:
        MEASURES.pop("binary_only_test")


def test_failed_query_keeps_the_connection_usable(primed):
    with pytest.raises(UnknownNameError):
        dbd.inspect(primed, "planted", ["planted"], ["digit"], "nodata")
    assert primed.sql("SELECT count(*) FROM records").fetchall()[0][0] == len(TEXTS)
    assert np.isfinite(dbd.inspect(primed, "planted", ["planted"], ["digit"], "snippets").column("n").to_numpy()).all()


def test_a_hypothesis_failing_mid_scan_keeps_the_labels_already_computed(primed):
    longest = max(TEXTS, key=len)                          # its records come in the last batches
    bad = [i for i, t in enumerate(TEXTS) if t == longest]
    register(Hypothesis("fails_late", lambda text: 1 / 0 if text == longest else [0] * len(text), "binary"))
    before = snapshot(primed)
    with pytest.raises(HypothesisError, match=r"raised ZeroDivisionError on record snippets:(\d+)") as err:
        dbd.inspect(primed, "planted", ["planted"], ["in_string", "fails_late"], "snippets", batch_size=2)
    assert int(str(err.value).split("snippets:")[1].split(":")[0]) in bad
    after = snapshot(primed)
    assert (after["scores"], after["queries"]) == (before["scores"], before["queries"])
    # the records labelled before the failure are stored (the next query reuses them), the bad ones not
    kept = dict(primed.sql("SELECT hypothesis, count(*) FROM labeled_records WHERE hypothesis IN "
                           "('in_string', 'fails_late') GROUP BY ALL").fetchall())
    assert 0 < kept["fails_late"] <= len(TEXTS) - len(bad) and kept["in_string"] >= kept["fails_late"]
    assert primed.sql("SELECT count(*) FROM labeled_records WHERE hypothesis = 'fails_late' "
                      f"AND list_contains({bad}, record_id)").fetchall()[0][0] == 0


def test_a_store_open_in_another_process_is_named_with_its_pid(tmp_path):
    """DuckDB lets one process write a file: a second one gets one clear error naming the store
    and the process holding it, and the store is untouched."""
    import os
    import subprocess
    import sys
    db = str(tmp_path / "held.duckdb")
    con = dbd.connect(db, progress=False)
    try:
        dbd.add_dataset(con, "d", ["x = 1\n"])
        r = subprocess.run([sys.executable, "-c", "import deepbase_duck as dbd; dbd.connect(%r)" % db],
                           capture_output=True, text=True)
        assert r.returncode == 1
        assert f"DeepBaseError: the store {db} is open in another process (PID {os.getpid()})" in r.stderr
        assert con.sql("SELECT count(*) FROM records").fetchall() == [(1,)]
    finally:
        dbd.close(con)


@pytest.mark.parametrize("kw,message", [
    ({"limit": -1}, r"limit must be an integer >= 0, got -1"),
    ({"limit": 2.5}, r"limit must be an integer >= 0, got 2.5"),
    ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
    ({"batch_size": 2.9}, r"batch_size must be an integer >= 1, got 2.9"),
    ({"batch_size": 0, "max_error": 0.3}, r"batch_size must be an integer >= 1"),
    ({"seed": "x", "max_error": 0.3}, r"seed must be an integer >= 0, got 'x'"),
    ({"baseline": True, "baseline_seed": -2}, r"baseline_seed must be an integer >= 0, got -2"),
    ({"permutations": 1.5}, r"permutations must be an integer >= 0, got 1.5"),        # (was cut to 1)
    ({"record_ids": [0, 999, 1000]}, r"record_ids: 2 id\(s\) are not records of dataset 'snippets': 999, 1000"),
    ({"keep_activations": True, "dtype": "int8"}, r"dtype must be one of float32, float16.*got 'int8'"),
    ({"corr": {"confidence": 1.5}}, r"corr: confidence must be in \(0, 1\), got 1.5"),
])
def test_bad_query_settings_are_named_and_change_nothing(primed, kw, message):
    before = snapshot(primed)
    with pytest.raises(DeepBaseError, match=message):
        dbd.inspect(primed, "planted", ["planted"], ["digit"], "snippets", reuse=False, **kw)
    assert snapshot(primed) == before


def test_compare_layers_checks_batch_size_and_limit(primed):
    with pytest.raises(DeepBaseError, match="batch_size must be an integer >= 1, got 0"):
        dbd.compare_layers(primed, ["planted:planted", "planted:mix"], "snippets", batch_size=0)
    with pytest.raises(DeepBaseError, match="limit must be an integer >= 0, got -3"):
        dbd.compare_layers(primed, ["planted:planted", "planted:mix"], "snippets", limit=-3)


def test_a_hypothesis_named_twice_is_scored_once(planted):
    """On a fresh dataset (labels computed in the scan) and again once they are stored: one row
    per (unit, hypothesis), the same scores as naming it once."""
    t = dbd.inspect(planted, "planted", ["planted"], ["digit", "digit", "bracket_depth"], "snippets")
    once = dbd.inspect(planted, "planted", ["planted"], ["digit", "bracket_depth"], "snippets", reuse=False)
    again = dbd.inspect(planted, "planted", ["planted"], ["bracket_depth", "digit", "digit"], "snippets", reuse=False)
    key = lambda r: (r["unit"], r["hypothesis"])  # noqa: E731
    rows = {key(r): r["score"] for r in t.to_pylist()}
    assert len(rows) == t.num_rows == once.num_rows == again.num_rows
    for other in (once, again):
        got = {key(r): r["score"] for r in other.to_pylist()}
        assert got.keys() == rows.keys()
        assert all((rows[k] is None and got[k] is None) or got[k] == pytest.approx(rows[k], abs=1e-12) for k in rows)
    assert planted.sql("SELECT count(*) FROM labels WHERE hypothesis = 'digit'").fetchall()[0][0] > 0


def test_unknown_hypothesis_message_says_hypotheses(primed):
    with pytest.raises(UnknownNameError, match=r"unknown hypothesis 'nope'; valid hypotheses: "):
        dbd.inspect(primed, "planted", ["planted"], ["nope"], "snippets")


def test_cli_commands_refuse_a_missing_store_instead_of_creating_one(tmp_path, capsys):
    from deepbase_duck.cli import main
    for cmd in (["inspect", "typo.duckdb", "m", "code", "--layers", "l", "--hypotheses", "digit"],
                ["export", "typo.duckdb", str(tmp_path / "out")],
                ["annotate", "typo.duckdb", "code", "digit"],
                ["extract", "typo.duckdb", "m", "code", "l"]):
        cmd[1] = str(tmp_path / cmd[1])
        assert main(["--quiet", *cmd]) == 2, cmd
        err = capsys.readouterr().err
        assert "no store at" in err and err.strip().count("\n") == 0, err
        assert not (tmp_path / "typo.duckdb").exists()
    assert main(["--quiet", "register-model", str(tmp_path / "new.duckdb"), "lm",
                 "deepbase_duck.models.zoo:charlstm"]) == 0
    assert (tmp_path / "new.duckdb").exists()


def test_compare_layers_refuses_a_string_for_its_groups(primed):
    with pytest.raises(DeepBaseError, match="groups must be a list of unit groups.*'planted:planted'"):
        dbd.compare_layers(primed, "planted:planted", "snippets")


def test_extract_checks_batch_size_and_record_ids_like_inspect(primed):
    before = snapshot(primed)
    with pytest.raises(DeepBaseError, match="batch_size must be an integer >= 1, got 2.5"):
        dbd.extract(primed, "planted", ["mix"], "snippets", batch_size=2.5)
    with pytest.raises(DeepBaseError, match="record_ids: 1 id\\(s\\) are not records of dataset 'snippets': 999"):
        dbd.extract(primed, "planted", ["mix"], "snippets", record_ids=[0, 999])
    assert snapshot(primed) == before


def test_sql_batch_size_zero_is_refused_like_python(primed):
    """batch_size := 0 in SQL is the value 0 (refused as in Python and the CLI), not a missing
    argument; NULL is the default."""
    before = snapshot(primed)
    for sql in ("SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets', batch_size := 0, reuse := false)",
                "SELECT * FROM extract_activations('planted', ['mix'], 'snippets', batch_size := 0)",
                "SELECT * FROM compare_layers(['planted:planted', 'planted:mix'], 'snippets', batch_size := 0)"):
        with pytest.raises(duckdb.Error, match="batch_size must be an integer >= 1, got 0"):
            primed.sql(sql).fetchall()
    assert snapshot(primed) == before
    assert primed.sql("SELECT extracted FROM extract_activations('planted', ['mix'], 'snippets', "
                      "batch_size := NULL)").fetchall() == [(len(TEXTS),)]


def test_a_container_layer_is_refused_naming_its_submodules(con):
    """A ModuleList is registered with no width (it is never called itself): inspect and extract
    name it and its submodules instead of failing on a NULL width (a TypeError)."""
    import torch
    from deepbase_duck.errors import ActivationError
    from deepbase_duck.extraction.adapters import CharAdapter
    from deepbase_duck.models.charlstm import VOCAB, encode_chars

    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(len(VOCAB), 4)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

        def forward(self, ids):
            x = self.embed(ids)
            for b in self.blocks:
                x = torch.tanh(b(x))
            return x
    dbd.register_model(con, "blocks", CharAdapter(Blocks(), encode_chars, "chars-blocks"))
    dbd.add_dataset(con, "d", TEXTS[:4])
    before = snapshot(con)
    for call in (lambda: dbd.inspect(con, "blocks", ["embed", "blocks"], ["digit"], "d"),
                 lambda: dbd.extract(con, "blocks", ["blocks"], "d")):
        with pytest.raises(ActivationError, match=r"layer 'blocks' of model 'blocks' gives no tensor output.*"
                                                  r"its submodules with tensor outputs: blocks\.0, blocks\.1"):
            call()
    assert snapshot(con) == before


def test_a_layer_named_twice_is_taken_once_and_corpus_counts_are_checked(con):
    from deepbase_duck.corpora.scenes import scene_records
    from deepbase_duck.corpora.sqlgen import sql_records
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "d", TEXTS[:4])
    out = dbd.extract(con, "planted", ["mix", "mix"], "d")
    assert [o["layer"] for o in out] == ["mix"]
    t = dbd.inspect(con, "planted", ["mix", "mix"], ["digit"], "d")
    assert t.num_rows == 4 and set(t.column("layer").to_pylist()) == {"mix"}
    for make in (sql_records, scene_records):
        for bad in (-1, 2.5, "3"):
            with pytest.raises(DeepBaseError, match=rf"{make.__name__}: n must be an integer >= 0, got"):
                make(bad)
        assert make(0) == []

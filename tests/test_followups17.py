"""Follow-ups of session 17's changes: a read-only store's cursors have the current macros and
activation views; hypothesis names with whitespace around them; keyword hints regardless of
case."""
from __future__ import annotations

import numpy as np
import pytest

import deepbase_duck as dbd
from deepbase_duck.errors import HypothesisError, UnknownKeywordError
from deepbase_duck.hypotheses import core

from conftest import TEXTS, planted_adapter, planted_per_record

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def forget_names():
    yield
    for name in [n for n in core._REGISTRY if n.strip().startswith("fu_")]:
        core._REGISTRY.pop(name)


def test_a_cursor_of_a_read_only_store_reads_its_activations_and_current_macros(tmp_path):
    """A read-only store's macros and activation views are TEMP objects of its connection, which
    DuckDB keeps per connection: a dbd.cursor (another thread's) saw the file's stored ones, whose
    activation views point at the folder the store was written beside. Moved, the store's
    activations were unreadable from a cursor."""
    db = tmp_path / "a" / "s.duckdb"
    con = dbd.connect(str(db), progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", keep_activations=True)
    dbd.close(con)
    moved = tmp_path / "b"
    (tmp_path / "a").rename(moved)
    con = dbd.connect(str(moved / "s.duckdb"), progress=False, read_only=True)
    try:
        cur = dbd.cursor(con)
        view = cur.sql("SELECT view_name FROM behaviors").fetchall()[0][0]
        X, _, _ = planted_per_record(["digit"])
        acts = cur.sql(f"SELECT act FROM {view} ORDER BY record_id, pos").fetchnumpy()["act"]
        np.testing.assert_allclose(np.stack(acts), X, atol=1e-6)
        temp = cur.sql("SELECT count(*) FROM duckdb_functions() WHERE function_name = 'symbol_labels' "
                       "AND NOT internal AND database_name = 'temp'").fetchall()[0][0]
        assert temp >= 1
        dbd.close(cur)
    finally:
        dbd.close(con)


def test_hypothesis_names_with_whitespace_around_them_are_refused(tmp_path):
    with pytest.raises(HypothesisError, match=r"hypothesis name ' fu_a ' has whitespace around it.*give 'fu_a'"):
        dbd.hypothesis(" fu_a ")(lambda t: [])
    assert " fu_a " not in core.registry()
    con = dbd.connect(str(tmp_path / "s.duckdb"), progress=False)
    try:
        with pytest.raises(HypothesisError, match=r"' fu_b ' has whitespace around it"):
            dbd.define_hypothesis(con, " fu_b ", "[0-9]+")
        assert con.sql("SELECT count(*) FROM hypothesis_definitions").fetchall() == [(0,)]
        # a definition stored before names were checked still registers, and can be redefined
        con.execute("INSERT INTO hypothesis_definitions (name, kind, pattern, flags, categories, description, "
                    "version) VALUES (' fu_c ', 'binary', 'x', '', NULL, '', 'v0')")
    finally:
        dbd.close(con)
    con = dbd.connect(str(tmp_path / "s.duckdb"), progress=False)
    try:
        assert " fu_c " in core.registry()
        d = dbd.define_hypothesis(con, " fu_c ", "[0-9]+", replace=True)
        assert d["name"] == " fu_c "
    finally:
        dbd.close(con)


def test_keyword_hints_ignore_case(tmp_path):
    con = dbd.connect(None, progress=False)
    try:
        with pytest.raises(UnknownKeywordError, match=r"unknown keyword 'MAX_ERROR' \(did you mean max_error\?\)"):
            dbd.inspect(con, "m", ["l"], ["digit"], "d", MAX_ERROR=0.1)
    finally:
        dbd.close(con)


def test_sql_drop_hypothesis_is_a_macro_checking_its_argument(tmp_path):
    """drop_hypothesis in SQL goes through the surface's argument checks as define_hypothesis
    does (the UDF had been registered under the bare name: drop_hypothesis(3) bound 3 as text
    and said 'unknown hypothesis '3'')."""
    import duckdb
    con = dbd.connect(str(tmp_path / "s.duckdb"), progress=False)
    try:
        con.sql("SELECT define_hypothesis('fu_rx', '[0-9]+')").fetchall()
        with pytest.raises(duckdb.Error, match=r"drop_hypothesis: name must be .* got 3 of type INTEGER"):
            con.sql("SELECT drop_hypothesis(3)").fetchall()
        d = con.sql("SELECT drop_hypothesis('fu_rx')").fetchall()[0][0]
        assert d["name"] == "fu_rx" and d["pattern"] == "[0-9]+"
        assert con.sql("SELECT count(*) FROM hypothesis_definitions").fetchall() == [(0,)]
    finally:
        dbd.close(con)


def test_an_image_record_may_carry_the_whole_sha256(tmp_path):
    """A path record written by the user with the file's whole sha256 (64 digits, as sha256sum
    prints it) was refused as 'changed': only the first 16 digits were compared, to all 64. A
    prefix shorter than 16 digits, or another file's digest, is still refused."""
    import hashlib
    import json
    from PIL import Image
    from deepbase_duck.corpora.images import load_image
    from deepbase_duck.errors import DeepBaseError
    p = tmp_path / "a.png"
    pixels = (np.arange(8 * 8 * 3) % 251).astype(np.uint8).reshape(8, 8, 3)
    Image.fromarray(pixels).save(p)
    full = hashlib.sha256(p.read_bytes()).hexdigest()
    for digest in (full, full.upper(), full[:16], full[:40]):
        np.testing.assert_array_equal(load_image(json.dumps({"path": str(p), "sha256": digest})), pixels)
    for digest in (full[:8], hashlib.sha256(b"other").hexdigest(), 42):
        with pytest.raises(DeepBaseError, match="changed since its record was added"):
            load_image(json.dumps({"path": str(p), "sha256": digest}))


def test_seeds_beyond_bigint_are_refused_by_name_and_measures_named_twice_count_once(con_planted):
    con = con_planted
    for kw in ({"seed": 2 ** 63, "max_error": 0.5}, {"baseline_seed": 2 ** 64, "baseline": True}):
        name = next(iter(kw))
        with pytest.raises(dbd.DeepBaseError, match=rf"{name} must be an integer from 0 to 9223372036854775807"):
            dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", **kw)
    t = dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", measures=["corr", "corr"])
    assert set(t.column("measure").to_pylist()) == {"corr"}
    assert con.sql("SELECT measures FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0] == ["corr"]


@pytest.fixture
def con_planted(tmp_path):
    con = dbd.connect(str(tmp_path / "s.duckdb"), progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    yield con
    dbd.close(con)


def test_an_image_report_with_no_records_per_unit_draws_no_images(tmp_path):
    """records_per_unit=0 asks for no top records: the text section said 'No units selected',
    but the images section still ranked the images by forward passes and drew one per unit."""
    from deepbase_duck.corpora import scenes
    from deepbase_duck.extraction.image_adapter import ImageAdapter
    from deepbase_duck.hypotheses.grid import concept_hypotheses
    from test_vision import G, PlantedConv
    con = dbd.connect(str(tmp_path / "v.duckdb"), progress=False)
    try:
        dbd.register_model(con, "planted_conv", ImageAdapter(PlantedConv(), grid=G, name="planted", device="cpu"))
        dbd.add_dataset(con, "scenes", scenes.scene_records(8, seed=100))
        concept_hypotheses(["colour:red"], grid=G)
        dbd.inspect(con, "planted_conv", ["units"], ["colour:red"], "scenes", measures=["iou"],
                    iou={"quantile": 0.05})
        res = dbd.report(con, str(tmp_path / "none.html"), top_units=2, records_per_unit=0)
        doc = (tmp_path / "none.html").read_text()
        assert "images" not in res["sections"] and '<section id="images">' not in doc
        res = dbd.report(con, str(tmp_path / "two.html"), top_units=2, records_per_unit=2)
        assert res["sections"][-1] == "images"
    finally:
        dbd.close(con)


def test_a_hypothesis_whose_scores_are_all_nan_or_infinite_gets_the_note(con_planted, tmp_path):
    """top_units ranks finite scores only; null_hypotheses counted non-NULL scores, so a
    hypothesis whose every score is NaN or infinite (written by hand, imported) vanished from the
    report without the note that says why."""
    con = con_planted
    dbd.inspect(con, "planted", ["planted"], ["digit", "in_string"], "snippets")
    con.execute("UPDATE scores SET score = 'NaN'::DOUBLE WHERE hypothesis = 'in_string'")
    from deepbase_duck.reports import data
    q = data.select_query(con)
    assert data.null_hypotheses(con, q, ["corr"]) == [("planted", "in_string")]


def test_the_padding_warning_waits_for_a_batch_that_holds_padding(tmp_path):
    """A model that reads ahead was warned of at the first batch whatever the batch size, telling
    a user who already scanned with batch_size=1 (no padding) to 'scan with batch_size=1'. The
    check now waits for a batch that holds padding, and still comes with one."""
    import warnings
    from deepbase_duck.extraction.adapters import CharAdapter
    from test_newuser_hunt16 import TEXTS as T, ReadsAhead, ascii_ids
    con = dbd.connect(str(tmp_path / "p.duckdb"), progress=False)
    try:
        dbd.add_dataset(con, "txt", T)
        dbd.register_model(con, "ahead", CharAdapter(ReadsAhead(), ascii_ids, "ascii128"))
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*right-padded.*")
            dbd.inspect(con, "ahead", ["encoder.layers.0"], ["digit"], "txt", batch_size=1)
        with pytest.warns(UserWarning, match=r"'encoder.layers.0' \(by up to .*right-padded"):
            dbd.inspect(con, "ahead", ["encoder.layers.0"], ["digit"], "txt", batch_size=4, reuse=False)
    finally:
        dbd.close(con)

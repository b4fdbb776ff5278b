"""Extraction: stored activations, the cache, resuming after a crash or a kill, dtypes."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.extraction.adapters import CharAdapter
from deepbase_duck.models.charlstm import encode_chars

from conftest import TEXTS, planted_adapter


def stored(con, view):
    return con.sql(f"SELECT record_id, pos, act FROM {view} ORDER BY record_id, pos").fetchall()


def test_extract_stores_exact_activations(planted):
    res = dbd.extract(planted, "planted", ["planted", "mix"], "snippets")
    assert [r["extracted"] for r in res] == [len(TEXTS)] * 2
    rows = stored(planted, res[0]["view"])
    assert len(rows) == sum(len(t) for t in TEXTS)
    adapter = planted_adapter()
    first = dict()
    for rid, pos, act in rows:
        first.setdefault(rid, []).append(act)
    for rid, text in enumerate(TEXTS):
        with torch.no_grad():
            want = adapter.module.planted(adapter.encode([text]).inputs)[0].numpy()
        np.testing.assert_array_equal(np.asarray(first[rid], np.float32), want)
    # the view's type is FLOAT[width]
    assert planted.sql(f"SELECT typeof(act) FROM {res[0]['view']} LIMIT 1").fetchall() == [("FLOAT[5]",)]


def test_second_extraction_does_not_run_the_model(planted):
    dbd.extract(planted, "planted", ["planted"], "snippets")
    module = dbd.catalog.session_of(planted).adapters["planted"].module
    calls = module.calls
    res = dbd.extract(planted, "planted", ["planted"], "snippets")
    assert module.calls == calls
    assert res[0]["extracted"] == 0 and res[0]["reused"] == len(TEXTS)
    # inspect reads the stored behaviors instead of running the model, with equal scores
    a = dbd.inspect(planted, "planted", ["planted"], ["digit", "bracket_depth"], "snippets")
    assert module.calls == calls
    assert planted.sql("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() == [("stored",)]
    # keep_activations scans again (no score cache) but still reads what is stored
    b = dbd.inspect(planted, "planted", ["planted"], ["digit", "bracket_depth"], "snippets", keep_activations=True)
    assert module.calls == calls
    assert planted.sql("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() == [("stored",)]
    # without stored activations the model runs
    c = dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets")
    assert module.calls > calls and c.num_rows > 0
    for x, y in zip(a.to_pylist(), b.to_pylist()):
        assert (x["score"] is None and y["score"] is None) or x["score"] == pytest.approx(y["score"], abs=1e-12)


def test_cache_is_keyed_by_checksum_layer_and_dtype(planted):
    dbd.extract(planted, "planted", ["planted"], "snippets")
    module = dbd.catalog.session_of(planted).adapters["planted"].module
    calls = module.calls
    dbd.extract(planted, "planted", ["mix"], "snippets")               # another layer: runs
    assert module.calls > calls
    calls = module.calls
    dbd.extract(planted, "planted", ["planted"], "snippets", dtype="float16")   # another dtype: runs
    assert module.calls > calls
    # another checksum (changed weights) under the same name: runs again
    other = planted_adapter()
    with torch.no_grad():
        other.module.embed.weight.add_(1.0)
    dbd.register_model(planted, "planted", other)
    res = dbd.extract(planted, "planted", ["planted"], "snippets")
    assert res[0]["extracted"] == len(TEXTS)
    assert planted.sql("SELECT count(DISTINCT model_checksum) FROM behaviors").fetchall() == [(2,)]


def test_float16_storage(planted):
    r32 = dbd.extract(planted, "planted", ["mix"], "snippets")[0]
    r16 = dbd.extract(planted, "planted", ["mix"], "snippets", dtype="float16")[0]
    a = np.array([x[2] for x in stored(planted, r32["view"])], np.float32)
    b = np.array([x[2] for x in stored(planted, r16["view"])], np.float32)
    np.testing.assert_allclose(b, a.astype(np.float16).astype(np.float32), rtol=0, atol=0)
    size = lambda bid: sum(f.stat().st_size for f in (dbd.catalog.session_of(planted).act_root).glob(f"b{bid:05d}-*/*"))
    assert size(r16["behavior_id"]) < size(r32["behavior_id"])


def test_crash_mid_extraction_resumes_exactly(con):
    dbd.add_dataset(con, "snippets", TEXTS)
    crashing = planted_adapter(fail_after=2)
    dbd.register_model(con, "planted", crashing)
    crashing.exits_early(["planted"])                    # the early-exit check's forward pass, once
    crashing.module.calls = 0                            # registration and that check ran forward passes
    with pytest.raises(RuntimeError, match="simulated crash"):
        dbd.extract(con, "planted", ["planted"], "snippets", batch_size=4)
    done = con.sql("SELECT count(*) FROM behavior_records").fetchall()[0][0]
    assert done == 8                                   # two committed batches of 4 records
    assert con.sql("SELECT count(*) FROM behavior_records WHERE record_id NOT IN "
                   "(SELECT record_id FROM tokenized_records)").fetchall() == [(0,)]   # symbols first
    dbd.register_model(con, "planted", planted_adapter())    # same weights, no crash
    res = dbd.extract(con, "planted", ["planted"], "snippets", batch_size=4)
    assert res[0]["extracted"] == len(TEXTS) - 8 and res[0]["reused"] == 8
    rows = stored(con, res[0]["view"])
    keys = [(r[0], r[1]) for r in rows]
    assert len(keys) == len(set(keys)) == sum(len(t) for t in TEXTS)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    import deepbase_duck as dbd
    from conftest import TEXTS, planted_adapter
    adapter = planted_adapter()
    inner = adapter.module.forward
    def slow(ids):
        time.sleep(0.4)
        return inner(ids)
    adapter.module.forward = slow
    con = dbd.connect({db!r}, progress=False)
    dbd.register_model(con, "planted", adapter)
    dbd.add_dataset(con, "snippets", TEXTS)
    print("ready", flush=True)
    dbd.extract(con, "planted", ["planted", "mix"], "snippets", batch_size=2)
    print("finished", flush=True)
""")


def test_killed_extraction_resumes_without_duplicates(tmp_path):
    db = str(tmp_path / "kill.duckdb")
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), db=db))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    acts = Path(db + ".acts")
    deadline = time.time() + 60
    while time.time() < deadline:
        parts = list(acts.glob("*/part-*.parquet")) if acts.exists() else []
        if len(parts) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    con = dbd.connect(db, progress=False)
    try:
        committed = con.sql("SELECT count(*) FROM behavior_records").fetchall()[0][0]
        assert 0 < committed < 2 * len(TEXTS)               # killed part-way
        assert con.sql("SELECT count(*) FROM behavior_records WHERE record_id NOT IN "
                       "(SELECT record_id FROM tokenized_records)").fetchall() == [(0,)]
        dbd.register_model(con, "planted", planted_adapter())
        res = dbd.extract(con, "planted", ["planted", "mix"], "snippets", batch_size=2)
        for r in res:
            assert r["extracted"] + r["reused"] == len(TEXTS)
            keys = [(x[0], x[1]) for x in stored(con, r["view"])]
            assert len(keys) == len(set(keys)) == sum(len(t) for t in TEXTS)
        # the same rows as an extraction that never stopped
        ref = dbd.connect(None, progress=False)
        dbd.register_model(ref, "planted", planted_adapter())
        dbd.add_dataset(ref, "snippets", TEXTS)
        want = stored(ref, dbd.extract(ref, "planted", ["mix"], "snippets")[0]["view"])
        got = stored(con, res[1]["view"])
        assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in want]
        np.testing.assert_array_equal(np.array([x[2] for x in got]), np.array([x[2] for x in want]))
        dbd.close(ref)
    finally:
        dbd.close(con)


def test_store_reopens_with_views_and_cache(tmp_path):
    db = str(tmp_path / "s.duckdb")
    con = dbd.connect(db, progress=False)
    dbd.register_model(con, "charlstm", "deepbase_duck.models.zoo:charlstm", {"checkpoint": "step0"})
    dbd.add_dataset(con, "snippets", TEXTS[:4])
    res = dbd.extract(con, "charlstm", ["lstm0"], "snippets")
    dbd.close(con)
    con = dbd.connect(db, progress=False)
    try:
        # the model is rebuilt from its loader spec and its checksum verified; the cache holds
        res2 = dbd.extract(con, "charlstm", ["lstm0"], "snippets")
        assert res2[0]["extracted"] == 0
        n = con.sql(f"SELECT count(*) FROM {res[0]['view']}").fetchall()[0][0]
        assert n == sum(len(t) for t in TEXTS[:4])
    finally:
        dbd.close(con)


def test_store_from_an_earlier_version_is_migrated(tmp_path):
    """A store whose scores table predates q_value and detail (and models window_split) opens,
    gains them, keeps its rows."""
    import duckdb
    db = str(tmp_path / "old.duckdb")
    old = duckdb.connect(db, config={"storage_compatibility_version": "v1.5.0"})
    old.execute("CREATE TABLE scores (query_id INTEGER, model VARCHAR, layer VARCHAR, unit INTEGER, "
                "hypothesis VARCHAR, measure VARCHAR, score DOUBLE, n BIGINT, ci_low DOUBLE, ci_high DOUBLE, "
                "p_value DOUBLE)")
    old.execute("INSERT INTO scores VALUES (1, 'm', 'l', 0, 'h', 'corr', 0.5, 10, 0.1, 0.8, 0.01)")
    old.execute("CREATE TABLE models (name VARCHAR PRIMARY KEY, loader VARCHAR, params VARCHAR, checksum VARCHAR "
                "NOT NULL, tokenization VARCHAR NOT NULL, architecture VARCHAR, n_params BIGINT, registered_at "
                "TIMESTAMP DEFAULT current_timestamp)")
    old.close()
    con = dbd.connect(db, progress=False)
    try:
        cols = [r[0] for r in con.sql("DESCRIBE scores").fetchall()]
        assert {"q_value", "detail"} <= set(cols)
        assert con.sql("SELECT score FROM scores").fetchall() == [(0.5,)]
        assert "window_split" in [r[0] for r in con.sql("DESCRIBE models").fetchall()]
        dbd.register_model(con, "planted", planted_adapter())
        dbd.add_dataset(con, "snippets", TEXTS[:3])
        dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets")
        assert con.sql("SELECT count(*) FROM scores").fetchall() == [(6,)]
    finally:
        dbd.close(con)


def test_full_scan_reads_texts_in_chunks_with_the_same_scores(planted, monkeypatch):
    # 24 records in batches of 2: 12 batches. With 4 records per text query the scan makes 3
    # queries where a query per batch made 12; the scores are those of a chunk per batch.
    from deepbase_duck.catalog import Session
    extract = sys.modules["deepbase_duck.engine.extract"]
    calls = []
    real = Session.texts

    def counting(self, dataset, record_ids):
        calls.append(len(record_ids))
        return real(self, dataset, record_ids)

    monkeypatch.setattr(Session, "texts", counting)
    runs = {}
    for chunk in (4, 1):
        monkeypatch.setattr(extract, "SYMBOL_CHUNK", chunk)
        calls.clear()
        t = dbd.inspect(planted, "planted", ["planted"], ["in_string", "digit"], "snippets", batch_size=2, reuse=False)
        runs[chunk] = (sorted(zip(t.column("unit").to_pylist(), t.column("hypothesis").to_pylist(),
                                  t.column("score").to_pylist()), key=lambda x: (x[0], x[1])), list(calls))
    assert runs[4][1][-3:] == [4, 4, 4]          # after the symbols pass (chunks of 4 records too)
    assert runs[1][1][-12:] == [2] * 12          # a chunk smaller than a batch: one query per batch
    assert len(runs[4][0]) == 10 and runs[4][0] == runs[1][0]


class CountingAdapter(CharAdapter):
    """The planted model's adapter, counting the texts it tokenises."""
    encoded = 0

    def encode(self, texts):
        # records only: the early-exit check (ModelAdapter.exits_early) encodes the example text
        CountingAdapter.encoded += sum(t != self.example_text for t in texts)
        return super().encode(texts)


def symbol_rows(con):
    return con.sql("SELECT record_id, pos, start_char, end_char, token FROM symbols ORDER BY record_id, pos").fetchall()


def reference_symbols(records, ids=None):
    """The symbol rows written independently of the engine: each record encoded on its own by the
    adapter, (record_id, pos, start, end, token) per symbol."""
    adapter = planted_adapter()
    rows = []
    for rid in (range(len(records)) if ids is None else ids):
        enc = adapter.encode([records[rid]])
        rows += [(rid, pos, int(s), int(e), t) for pos, (s, e, t) in
                 enumerate(zip(enc.starts[0], enc.ends[0], enc.tokens[0]))]
    return rows


@pytest.mark.parametrize("how", ["inspect", "extract", "keep_activations"])
def test_a_scan_tokenises_each_record_once_and_stores_the_same_symbols(con, how):
    """The symbols table is filled from the forward passes' own encodings: every record is
    tokenised once per scan, and the rows equal those of a separate tokenisation pass."""
    torch.manual_seed(0)
    module = planted_adapter().module
    dbd.register_model(con, "planted", CountingAdapter(module, encode_chars, "chars-test", device="cpu"))
    dbd.add_dataset(con, "snippets", TEXTS)
    CountingAdapter.encoded = 0
    if how == "extract":
        dbd.extract(con, "planted", ["planted", "mix"], "snippets", batch_size=4)
    else:
        dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", batch_size=4,
                    keep_activations=how == "keep_activations")
    assert CountingAdapter.encoded == len(TEXTS)
    assert symbol_rows(con) == reference_symbols(TEXTS)
    assert con.sql("SELECT sum(n_symbols), count(*) FROM tokenized_records").fetchall() == [
        (sum(len(t) for t in TEXTS), len(TEXTS))]
    CountingAdapter.encoded = 0                   # a second scan reads the stored activations or symbols
    dbd.inspect(con, "planted", ["planted"], ["in_string"], "snippets", batch_size=4)
    assert CountingAdapter.encoded == (0 if how != "inspect" else len(TEXTS))
    assert con.sql("SELECT count(*) FROM tokenized_records").fetchall() == [(len(TEXTS),)]


def test_compare_layers_tokenises_each_record_once_per_model(con):
    """A layer comparison stores the symbols from its first model's forward batches: every record
    is encoded once per model (not once more for the symbols table), with the same rows as a
    separate tokenisation pass; a second comparison finds them stored."""
    torch.manual_seed(0)
    module = planted_adapter().module
    dbd.register_model(con, "a", CountingAdapter(module, encode_chars, "chars-test", device="cpu"))
    dbd.register_model(con, "b", CountingAdapter(module, encode_chars, "chars-test", device="cpu"))
    dbd.add_dataset(con, "snippets", TEXTS)
    CountingAdapter.encoded = 0
    dbd.compare_layers(con, ["a:planted", "b:mix"], "snippets", batch_size=4)
    assert CountingAdapter.encoded == 2 * len(TEXTS)
    assert symbol_rows(con) == reference_symbols(TEXTS)
    assert con.sql("SELECT count(*) FROM tokenized_records").fetchall() == [(len(TEXTS),)]
    dbd.compare_layers(con, ["a:planted", "a:mix"], "snippets", batch_size=4)
    assert con.sql("SELECT count(*) FROM tokenized_records").fetchall() == [(len(TEXTS),)]


def test_a_progressive_scan_stores_the_symbols_of_the_records_it_used(con):
    rng = np.random.default_rng(3)
    records = ["".join(TEXTS[int(i)] for i in rng.integers(0, len(TEXTS), 3)) for _ in range(240)]
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", records)
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", batch_size=8, max_error=0.3, seed=2)
    used = con.sql("SELECT n_records FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0]
    ids = [r for (r,) in con.sql("SELECT record_id FROM tokenized_records ORDER BY record_id").fetchall()]
    assert len(ids) == used < 240
    assert symbol_rows(con) == reference_symbols(records, ids)


def test_a_crash_leaves_no_activations_without_symbols(con):
    dbd.add_dataset(con, "snippets", TEXTS)
    crashing = planted_adapter(fail_after=3)
    dbd.register_model(con, "planted", crashing)
    crashing.exits_early(["planted"])                    # the early-exit check's forward pass, once
    crashing.module.calls = 0
    with pytest.raises(RuntimeError, match="simulated crash"):
        dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", batch_size=4, keep_activations=True)
    kept = {r for (r,) in con.sql("SELECT record_id FROM behavior_records").fetchall()}
    tokenised = {r for (r,) in con.sql("SELECT record_id FROM tokenized_records").fetchall()}
    assert len(kept) == 12 and kept <= tokenised
    dbd.register_model(con, "planted", planted_adapter())
    rows = dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", batch_size=4).to_pylist()
    assert symbol_rows(con) == reference_symbols(TEXTS)
    assert {r["n"] for r in rows} == {sum(len(t) for t in TEXTS)}


def test_symbol_rows_from_a_run_of_positions_are_a_view_equal_to_the_gather():
    """Symbols at positions 1..n (word pieces after [CLS]) are cut as a slice: the same rows as
    indexing with the positions, without copying an index to the device."""
    from deepbase_duck.extraction.adapters import Encoded, ModelAdapter
    out = torch.randn(2, 9, 4)
    index = [np.arange(1, 7), np.array([0, 2, 3])]
    enc = Encoded(None, [np.zeros(6), np.zeros(3)], [np.ones(6), np.ones(3)], None, index)
    adapter = ModelAdapter(torch.nn.Identity(), device="cpu")
    rows = adapter.symbol_activations("x", out, enc)
    assert rows[0].data_ptr() == out[0, 1].data_ptr()          # a view
    for b, idx in enumerate(index):
        assert torch.equal(rows[b], out[b, torch.as_tensor(idx)])


def test_a_deferred_finite_check_runs_at_verify(con):
    """inspect runs a batch's labels before reading its activations back (on CUDA the forward is
    still running): the NaN check then comes at Batch.verify(), and still names the record."""
    from deepbase_duck.engine.extract import Batch, ensure_symbols, forward_batches
    from deepbase_duck.errors import ActivationError
    dbd.register_model(con, "nanny", planted_adapter(nan_on_tilde=True))
    dbd.add_dataset(con, "tilde", ["abc 1\n", "ok ~ bad\n"])
    session = dbd.catalog.session_of(con)
    counts = ensure_symbols(session, session.adapter("nanny"), "tilde", [0, 1])
    batch = next(forward_batches(session, session.adapter("nanny"), "nanny", ["planted"], "tilde", [[0, 1]],
                                 counts, defer_check=True))
    assert isinstance(batch, Batch) and batch.pending is not None
    with pytest.raises(ActivationError, match="record 1 of dataset 'tilde'"):
        batch.verify()
    ok = next(forward_batches(session, session.adapter("nanny"), "nanny", ["planted"], "tilde", [[0]], counts,
                              defer_check=True))
    assert ok.verify() is ok and ok.pending is None


def _scores(table):
    return {(r["layer"], r["unit"], r["hypothesis"]): r["score"] for r in table.to_pylist()}


def test_part_files_deleted_by_hand_are_computed_again(tmp_path):
    """The catalog lists parts whose files were deleted (one part of one layer, then a layer's
    whole folder): the next scan warns, naming the model, layer and dataset, computes those
    records again (its scores equal a fresh store's) instead of failing on a missing file, and
    the next extraction stores them again (the view reads every record once more)."""
    import shutil
    db = str(tmp_path / "s.duckdb")
    con = dbd.connect(db, progress=False)
    dbd.register_model(con, "charlstm", "deepbase_duck.models.zoo:charlstm", {"checkpoint": "final"})
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    for ids in (range(0, 4), range(4, 8)):          # two parts per layer
        dbd.extract(con, "charlstm", ["lstm0", "lstm1"], "snippets", record_ids=list(ids))
    dbd.close(con)
    session_root = Path(db + ".acts")
    folders = {p.name.split("-")[2]: p for p in session_root.iterdir()}
    (folders["lstm0"] / "part-000002.parquet").unlink()            # records 4..7 of lstm0
    kw = {"measures": ["corr"], "reuse": False}
    con = dbd.connect(db, progress=False)
    try:
        with pytest.warns(UserWarning, match=r"model 'charlstm', layer 'lstm0' on dataset 'snippets': 1 of 2 part "
                                             r"files are missing .*their 4 records will be computed again"):
            got = dbd.inspect(con, "charlstm", ["lstm0", "lstm1"], ["digit", "in_string"], "snippets", **kw)
        source, reused = con.sql("SELECT source, params->'reused' FROM queries ORDER BY query_id DESC LIMIT 1"
                                 ).fetchall()[0]
        assert source == "stored+model" and '"activation_records_read":4' in reused.replace(" ", "")
        fresh = dbd.connect(None, progress=False)
        dbd.register_model(fresh, "charlstm", "deepbase_duck.models.zoo:charlstm", {"checkpoint": "final"})
        dbd.add_dataset(fresh, "snippets", TEXTS[:8])
        want = _scores(dbd.inspect(fresh, "charlstm", ["lstm0", "lstm1"], ["digit", "in_string"], "snippets", **kw))
        dbd.close(fresh)
        assert _scores(got).keys() == want.keys()
        assert all(abs(_scores(got)[k] - v) < 1e-9 for k, v in want.items() if v is not None)
        res = dbd.extract(con, "charlstm", ["lstm0", "lstm1"], "snippets")   # stores the forgotten records
        assert {r["layer"]: r["extracted"] for r in res} == {"lstm0": 4, "lstm1": 0}
        n_symbols = sum(len(t) for t in TEXTS[:8])
        assert con.sql(f"SELECT count(*) FROM {res[0]['view']}").fetchall() == [(n_symbols,)]
        shutil.rmtree(folders["lstm1"])                              # a whole folder
        with pytest.warns(UserWarning, match=r"layer 'lstm1' .* 2 of 2 part files are missing"):
            dbd.inspect(con, "charlstm", ["lstm1"], ["digit"], "snippets", **kw)
        res = dbd.extract(con, "charlstm", ["lstm1"], "snippets")
        assert res[0]["extracted"] == 8
        assert con.sql(f"SELECT count(*) FROM {res[0]['view']}").fetchall() == [(n_symbols,)]
    finally:
        dbd.close(con)


def _catalog_and_view_records(con, view):
    """(records the catalog lists as stored for the behavior of ``view``, records its view reads)"""
    listed = con.sql("SELECT count(*) FROM behavior_records JOIN behaviors USING (behavior_id) WHERE view_name = ?",
                     params=[view]).fetchall()[0][0]
    return listed, con.sql(f"SELECT count(DISTINCT record_id) FROM {view}").fetchall()[0][0]


def test_a_part_interrupted_before_its_commit_shows_nowhere(tmp_path, monkeypatch):
    """Ctrl-C between a part file's rename and its catalog commit: the file is deleted at once, so
    the view and an export read the committed records only; the extraction then resumes."""
    import duckdb
    extract = sys.modules["deepbase_duck.engine.extract"]
    db = str(tmp_path / "s.duckdb")
    con = dbd.connect(db, progress=False)
    try:
        dbd.register_model(con, "planted", planted_adapter())
        dbd.add_dataset(con, "snippets", TEXTS[:12])
        commit, calls = extract.commit_parts, []

        def interrupted(session, written):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return commit(session, written)
        monkeypatch.setattr(extract, "commit_parts", interrupted)
        with pytest.raises(KeyboardInterrupt):
            dbd.extract(con, "planted", ["planted", "mix"], "snippets", batch_size=4)
        monkeypatch.undo()
        views = [v for (v,) in con.sql("SELECT view_name FROM behaviors ORDER BY 1").fetchall()]
        assert len(views) == 2
        assert _catalog_and_view_records(con, views[0]) == (4, 4)        # the first batch committed
        listed = {f"{d}/{f}" for d, f in con.sql("SELECT directory, file FROM behavior_parts "
                                                  "JOIN behaviors USING (behavior_id)").fetchall()}
        on_disk = {f"{p.parent.name}/{p.name}" for p in Path(db + ".acts").glob("*/*")}
        assert on_disk == listed and len(listed) == 2
        out = dbd.export(con, str(tmp_path / "out"), activations=True)
        assert duckdb.sql(f"SELECT count(DISTINCT record_id) FROM read_parquet('{out['activations']}')"
                          ).fetchall() == [(4,)]
        res = dbd.extract(con, "planted", ["planted", "mix"], "snippets", batch_size=4)
        assert [(r["extracted"], r["reused"]) for r in res] == [(8, 4)] * 2
        assert _catalog_and_view_records(con, views[1]) == (12, 12)
    finally:
        dbd.close(con)


def test_a_part_file_the_catalog_never_listed_is_deleted_when_the_store_opens(tmp_path):
    """A process killed between a part's rename and its commit leaves a file the catalog does not
    list: opening the store deletes it, so the view and an export read the committed parts only."""
    import shutil
    db = str(tmp_path / "s.duckdb")
    con = dbd.connect(db, progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    view = dbd.extract(con, "planted", ["planted"], "snippets", record_ids=[0, 1, 2, 3])[0]["view"]
    dbd.close(con)
    folder = next(Path(db + ".acts").iterdir())
    shutil.copy(folder / "part-000001.parquet", folder / "part-000002.parquet")   # as if records 0..3 again
    (folder / ".part-000003.parquet.1.tmp").write_bytes(b"half")                  # killed mid-write
    con = dbd.connect(db, progress=False)
    try:
        assert sorted(p.name for p in folder.iterdir()) == ["part-000001.parquet"]
        assert con.sql(f"SELECT count(*) FROM {view}").fetchall() == [(sum(len(t) for t in TEXTS[:4]),)]
    finally:
        dbd.close(con)


def test_a_behavior_interrupted_before_its_first_commit_opens_clean(tmp_path, monkeypatch):
    """Interrupted (Ctrl-C) before any part of a behavior committed: no catalog row, file, folder
    or view is left (tests/test_store_robustness.py: such a row was listed and exported). A kill
    there leaves the row and its folder, with maybe a part file (or a staged one): when the store
    opens again they are gone."""
    extract = sys.modules["deepbase_duck.engine.extract"]
    db = str(tmp_path / "s.duckdb")
    con = dbd.connect(db, progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:4])

    def interrupted(session, written):
        raise KeyboardInterrupt
    monkeypatch.setattr(extract, "commit_parts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dbd.extract(con, "planted", ["planted"], "snippets")
    assert con.sql("SELECT count(*) FROM behaviors").fetchall() == [(0,)]
    assert list(Path(db + ".acts").iterdir()) == []
    assert con.sql("SELECT count(*) FROM duckdb_views() WHERE view_name LIKE 'behavior_%'").fetchall() == [(0,)]
    monkeypatch.setattr(extract, "drop_unstored_behaviors", lambda *a: [])    # as a kill leaves it: the row stays
    with pytest.raises(KeyboardInterrupt):
        dbd.extract(con, "planted", ["planted"], "snippets")
    monkeypatch.undo()
    folder = next(Path(db + ".acts").iterdir())
    assert list(folder.iterdir()) == []
    dbd.close(con)
    (folder / "part-000001.parquet").write_bytes(b"killed before its commit")
    (folder / ".part-000001.parquet.staged").write_bytes(b"killed before its commit")
    con = dbd.connect(db, progress=False)
    try:
        assert not folder.exists() and con.sql("SELECT count(*) FROM behaviors").fetchall() == [(0,)]
        dbd.register_model(con, "planted", planted_adapter())
        res = dbd.extract(con, "planted", ["planted"], "snippets")
        assert con.sql(f"SELECT count(DISTINCT record_id) FROM {res[0]['view']}").fetchall() == [(4,)]
    finally:
        dbd.close(con)


class _Scaled(torch.nn.Module):
    """embed -> fc, fc's weights scaled (activations beyond float16's range with scale 1e5)."""

    def __init__(self, scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(98, 4)
        self.fc = torch.nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.weight.mul_(scale)

    def forward(self, x):
        return self.fc(self.embed(x))


def test_float16_storage_refuses_values_it_would_store_as_inf(con):
    from deepbase_duck.errors import ActivationError
    from deepbase_duck.models.charlstm import encode_chars
    dbd.register_model(con, "big", dbd.CharAdapter(_Scaled(1e5), encode_chars, "chars-big", device="cpu"))
    dbd.add_dataset(con, "d", ["x = 'a'\n", "y = (1, 2)\n"])
    with pytest.raises(ActivationError, match="beyond float16's largest value"):
        dbd.extract(con, "big", ["fc"], "d", dtype="float16")
    assert con.sql("SELECT count(*) FROM behavior_records").fetchall() == [(0,)]
    dbd.extract(con, "big", ["fc"], "d", dtype="float32")             # float32 holds them
    assert con.sql("SELECT count(*) FROM behavior_records").fetchall() == [(2,)]


def test_a_bfloat16_model_is_stored_as_float32(con):
    from deepbase_duck.models.charlstm import encode_chars
    m = _Scaled().to(torch.bfloat16)
    adapter = dbd.CharAdapter(m, encode_chars, "chars-bf16", device="cpu")
    dbd.register_model(con, "bf", adapter)
    dbd.add_dataset(con, "d", ["x = 'a'\n", "y = (1, 2)\n"])
    view = dbd.extract(con, "bf", ["fc"], "d")[0]["view"]
    got = con.sql(f"SELECT act FROM {view} ORDER BY record_id, pos LIMIT 1").fetchall()[0][0]
    with torch.no_grad():
        want = m(torch.as_tensor([encode_chars("x = 'a'\n")]))[0, 0].float().tolist()
    assert got == pytest.approx(want, abs=0)


def test_a_store_in_a_folder_named_with_glob_characters_and_a_quote(tmp_path):
    """The behavior views read the store's own folder, not what its [ ] or ' would glob or break."""
    from conftest import TEXTS, planted_adapter
    (tmp_path / "runs1").mkdir()                                    # what 'runs[1]' would glob
    folder = tmp_path / "runs[1] it's"
    folder.mkdir()
    con = dbd.connect(str(folder / "s.duckdb"), progress=False)
    try:
        dbd.register_model(con, "planted", planted_adapter())
        dbd.add_dataset(con, "d", TEXTS[:3])
        view = dbd.extract(con, "planted", ["mix"], "d")[0]["view"]
        n = con.sql(f"SELECT count(*) FROM {view}").fetchall()[0][0]
        assert n == sum(len(t) for t in TEXTS[:3])
    finally:
        dbd.close(con)

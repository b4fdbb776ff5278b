"""Caching with provenance, end to end: one key component changed between two queries (an
adapter's tokenisation, a submodule's width, a model cast to bfloat16, a dataset's texts edited
by replace or by SQL, a growing limit), what each query re-extracts and reuses (model forward
passes counted), a process killed with SIGKILL mid-scan, a reader beside a writer, and a user's
unlimited DuckDB memory limit around a scan."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from conftest import TEXTS, planted_adapter

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = str(Path(__file__).parent)
HYPS = ["digit", "in_string"]


def last_query(con):
    source, params = con.sql("SELECT source, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    return source, json.loads(params)["reused"]


def by_key(t):
    return {(r["layer"], r["unit"], r["hypothesis"], r["measure"]): r["score"] for r in t.to_pylist()}


def assert_same_scores(got, want, tol=1e-12):
    got, want = by_key(got), by_key(want)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert (v is None and got[k] is None) or got[k] == pytest.approx(v, abs=tol), k


class Rows:
    """Records run through a model: a forward pre-hook on its root counts each batch's rows."""

    def __init__(self, adapter, layer_sets=(("planted",), ("mix",), ("planted", "mix"))):
        for layers in layer_sets:            # the early-exit checks' own passes over the example, first
            adapter.exits_early(list(layers))
        self.rows = []
        adapter.module.register_forward_pre_hook(lambda m, args: self.rows.append(int(args[0].shape[0])))

    @property
    def n(self) -> int:
        return sum(self.rows)


def counted_planted(con, name="planted"):
    adapter = planted_adapter()
    rows = Rows(adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # the counting hook changes nothing: no variant
        dbd.register_model(con, name, adapter)
    return adapter, rows


def fresh_scores(texts, layers, hyps, adapter=None, **kw):
    fresh = dbd.connect(None, progress=False)
    try:
        dbd.register_model(fresh, "planted", adapter or planted_adapter())
        dbd.add_dataset(fresh, "snippets", texts)
        return dbd.inspect(fresh, "planted", layers, hyps, "snippets", **kw)
    finally:
        dbd.close(fresh)


def listed_files(con, root: Path) -> tuple[set, set]:
    """(files under the activation folder, files the catalog lists)"""
    on_disk = {f"{p.parent.name}/{p.name}" for p in root.glob("*/*")} | {f"{p.parent.name}/{p.name}"
                                                                         for p in root.glob("*/.*")}
    listed = {f"{d}/{f}" for d, f in con.sql("SELECT directory, file FROM behavior_parts "
                                             "JOIN behaviors USING (behavior_id)").fetchall()}
    return on_disk, listed


# -- the adapter's encoder, edited in place --------------------------------------------------------

def test_a_live_adapter_given_a_new_tokenization_is_not_served_the_old_ones_activations(con):
    """The adapter's docs ask for a new ``tokenization`` whenever the encoder changes. Done on the
    registered live adapter between two queries, the second query ran under the old one's keys:
    it was served the first query's cached scores (and would have read its stored activations
    and symbols). Now the model's row follows the adapter, the model runs under the new keys,
    and the scores are those of a fresh store; the old tokenisation's data stay, and the old
    encoder back is served from them again."""
    adapter, rows = counted_planted(con)
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.extract(con, "planted", ["mix"], "snippets")
    first = dbd.inspect(con, "planted", ["mix"], HYPS, "snippets")
    assert last_query(con)[0] == "stored"
    plain = adapter.encode_chars
    adapter.encode_chars = lambda text: plain(text.upper())
    adapter.tokenization = "chars-upper"
    rows.rows.clear()
    second = dbd.inspect(con, "planted", ["mix"], HYPS, "snippets")
    source, reused = last_query(con)
    assert source == "model" and reused["scores_of_query"] is None and reused["activation_records_read"] == 0
    assert rows.n == len(TEXTS)
    assert con.sql("SELECT tokenization, loader FROM models WHERE name = 'planted'").fetchall() == [("chars-upper", None)]
    assert sorted(con.sql("SELECT DISTINCT tokenization FROM symbols").fetchall()) == [("chars-test",), ("chars-upper",)]
    other = planted_adapter()
    other.encode_chars, other.tokenization = (lambda text: plain(text.upper())), "chars-upper"
    assert_same_scores(second, fresh_scores(TEXTS, ["mix"], HYPS, other))
    assert by_key(first) != by_key(second)
    # the old encoder back: its stored activations are read again, nothing runs
    adapter.encode_chars, adapter.tokenization = plain, "chars-test"
    rows.rows.clear()
    again = dbd.inspect(con, "planted", ["mix"], HYPS, "snippets", reuse=False)
    assert last_query(con)[0] == "stored" and rows.n == 0
    assert_same_scores(again, first)


# -- a submodule swapped for one of its class with another width ------------------------------------

@pytest.mark.filterwarnings("ignore:register_model")
def test_a_submodule_swapped_for_one_of_another_width_is_measured_again(con):
    """nn.Linear(8, 4) swapped for nn.Linear(8, 6): no layer name or class changes, and the row's
    widths stayed 4; the next query failed in its inspectors (size 4 vs 6) and an extraction
    stored 6-wide parts under a 4-wide behavior whose view could not be read. Now the model is
    measured again; a write to the weights in place keeps their shapes and runs no forward
    pass for it."""
    adapter, rows = counted_planted(con)
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.inspect(con, "planted", ["mix"], ["digit"], "snippets")
    torch.manual_seed(1)
    adapter.module.mix[0] = torch.nn.Linear(8, 6).eval()
    got = dbd.inspect(con, "planted", ["mix"], ["digit"], "snippets")
    assert sorted({r["unit"] for r in got.to_pylist()}) == list(range(6))
    assert dict(con.sql("SELECT layer, width FROM layers WHERE model = 'planted' AND layer LIKE 'mix%'").fetchall()) == \
        {"mix": 6, "mix.0": 6, "mix.1": 6}
    out = dbd.extract(con, "planted", ["mix"], "snippets")
    assert out[0]["width"] == 6 and out[0]["extracted"] == len(TEXTS)
    acts = np.stack(con.sql(f"SELECT act FROM {out[0]['view']} ORDER BY record_id, pos").fetchnumpy()["act"])
    with torch.no_grad():
        want = np.concatenate([adapter.module(adapter.encode([t]).inputs)[0].numpy() for t in TEXTS])
    np.testing.assert_allclose(acts, want, rtol=1e-6, atol=1e-6)
    swapped = adapter.checksum
    rows.rows.clear()
    dbd.inspect(con, "planted", ["mix"], ["digit"], "snippets", reuse=False)
    assert last_query(con)[0] == "stored" and rows.n == 0          # the swapped model's own activations
    assert con.sql("SELECT checksum FROM models WHERE name = 'planted'").fetchall() == [(swapped,)]


def test_a_weight_edit_in_place_runs_no_forward_pass_to_measure_widths(con):
    adapter, rows = counted_planted(con)
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.extract(con, "planted", ["mix"], "snippets")
    with torch.no_grad():
        adapter.module.mix[0].bias.add_(1.0)
    rows.rows.clear()
    calls = adapter.module.calls
    dbd.inspect(con, "planted", ["mix"], ["digit"], "snippets")
    assert last_query(con)[0] == "model"
    assert rows.n == len(TEXTS) and adapter.module.calls - calls == len(rows.rows)   # records only
    # an extraction of the edited model stores its own activations, equal to its forward pass
    out = dbd.extract(con, "planted", ["mix"], "snippets")
    assert (out[0]["extracted"], out[0]["reused"]) == (len(TEXTS), 0) and out[0]["behavior_id"] == 2
    acts = np.stack(con.sql(f"SELECT act FROM {out[0]['view']} ORDER BY record_id, pos").fetchnumpy()["act"])
    with torch.no_grad():
        want = np.concatenate([adapter.module(adapter.encode([t]).inputs)[0].numpy() for t in TEXTS])
    np.testing.assert_allclose(acts, want, rtol=1e-6, atol=1e-6)



def test_a_sql_inspect_after_a_weight_edit_runs_no_forward_pass_to_measure_widths(con):
    """The session of a SQL call shares what the connection's session knows of its models (the
    tensor shapes their widths were measured with): as from Python, the records only."""
    adapter, rows = counted_planted(con)
    dbd.add_dataset(con, "snippets", TEXTS)
    with torch.no_grad():
        adapter.module.mix[0].bias.add_(1.0)
    rows.rows.clear()
    calls = adapter.module.calls
    con.execute("SELECT * FROM inspect('planted', ['mix'], ['digit'], 'snippets')").fetchall()
    assert rows.n == len(TEXTS) and adapter.module.calls - calls == len(rows.rows)   # records only


# -- a model cast to bfloat16 in place ---------------------------------------------------------------

class Tiny(torch.nn.Module):
    """Embedding -> Linear -> Tanh: a model that runs in bfloat16 too."""

    def __init__(self):
        super().__init__()
        from deepbase_duck.models.charlstm import VOCAB
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(len(VOCAB), 6)
        self.proj = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Tanh())

    def forward(self, ids):
        return self.proj(self.embed(ids))


def test_a_model_cast_to_bfloat16_in_place_is_another_model_stored_as_float32(con):
    """module.to(torch.bfloat16) between two extractions: another checksum, every record runs
    again; the stored float32 rows equal the bfloat16 forward pass exactly (a widening cast);
    the float32 model's behavior stays, and dtype='bfloat16' is refused by name."""
    from deepbase_duck.extraction.adapters import CharAdapter
    from deepbase_duck.models.charlstm import encode_chars
    adapter = CharAdapter(Tiny(), encode_chars, "chars-test", device="cpu")
    rows = Rows(adapter, (("proj",),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dbd.register_model(con, "tiny", adapter)
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    first = dbd.extract(con, "tiny", ["proj"], "snippets")
    adapter.module.to(torch.bfloat16)
    rows.rows.clear()
    out = dbd.extract(con, "tiny", ["proj"], "snippets")
    assert (out[0]["extracted"], out[0]["reused"]) == (8, 0) and rows.n == 8
    assert out[0]["behavior_id"] != first[0]["behavior_id"]
    acts = np.stack(con.sql(f"SELECT act FROM {out[0]['view']} ORDER BY record_id, pos").fetchnumpy()["act"])
    with torch.no_grad():
        want = np.concatenate([adapter.module(adapter.encode([t]).inputs)[0].float().numpy() for t in TEXTS[:8]])
    np.testing.assert_array_equal(acts, want)
    assert con.sql("SELECT count(DISTINCT model_checksum) FROM behaviors").fetchall() == [(2,)]
    with pytest.raises(dbd.DeepBaseError, match="dtype 'bfloat16' is not one of float32, float16"):
        dbd.extract(con, "tiny", ["proj"], "snippets", dtype="bfloat16")


# -- a dataset's texts edited ------------------------------------------------------------------------

def test_replace_keeps_what_was_stored_from_the_records_whose_text_stayed(tmp_path):
    """add_dataset(replace=True) with one record edited and the last four removed: only the parts
    holding those records go (the rest are read, not run), only the edited record's labels are
    computed again, and the scores equal a fresh store's; the files on disk are the ones the
    catalog lists. A replacement sharing no record's text drops everything, folders included."""
    db = str(tmp_path / "s.duckdb")
    con = dbd.connect(db, progress=False)
    try:
        adapter, rows = counted_planted(con)
        dbd.add_dataset(con, "snippets", TEXTS)
        dbd.extract(con, "planted", ["planted", "mix"], "snippets", batch_size=4)
        dbd.annotate(con, HYPS, "snippets")
        parts = dict(con.sql("SELECT r.record_id, r.part FROM behavior_records r WHERE behavior_id = 1").fetchall())
        new = list(TEXTS[:20])
        new[5] = "changed = 5 + 'x'\n"
        dbd.add_dataset(con, "snippets", new, replace=True)
        lost = {p for r, p in parts.items() if r == 5 or r >= 20}
        kept = sorted(r for r, p in parts.items() if p not in lost)
        assert kept and len(kept) < 20
        assert [r for (r,) in con.sql("SELECT record_id FROM behavior_records WHERE behavior_id = 2 "
                                      "ORDER BY 1").fetchall()] == kept
        on_disk, listed = listed_files(con, Path(db + ".acts"))
        assert on_disk == listed
        rows.rows.clear()
        got = dbd.inspect(con, "planted", ["planted", "mix"], HYPS, "snippets")
        source, reused = last_query(con)
        assert source == "stored+model" and rows.n == 20 - len(kept)
        assert (reused["activation_records_read"], reused["activation_records_computed"]) == (len(kept), 20 - len(kept))
        assert (reused["label_pairs_found"], reused["label_pairs_computed"]) == (19 * len(HYPS), len(HYPS))
        assert_same_scores(got, fresh_scores(new, ["planted", "mix"], HYPS))
        assert con.sql("SELECT count(*) FROM records WHERE dataset = 'snippets'").fetchall() == [(20,)]
        dbd.add_dataset(con, "snippets", ["a = 1\n", "b = 2\n"], replace=True)
        assert con.sql("SELECT count(*) FROM behaviors").fetchall() == [(0,)]
        assert not any(Path(db + ".acts").glob("*"))
    finally:
        dbd.close(con)


def test_a_record_edited_with_sql_then_added_again_with_new_sources_is_computed_again(planted):
    """UPDATE records SET text = ... and then add_dataset with the records as they now are and
    new sources: the rows were written again with the md5 of the edited text, so the edit went
    unnoticed and the old text's symbols, labels and activations were read for it. Now the edit
    is noticed first (the warning names the record); the scores equal a fresh store's."""
    dbd.extract(planted, "planted", ["mix"], "snippets", batch_size=8)
    dbd.annotate(planted, HYPS, "snippets")
    planted.execute("UPDATE records SET text = 'k = [9, 9]  # 99 and more text\\n' "
                    "WHERE dataset = 'snippets' AND record_id = 3")
    texts = [t for (t,) in planted.sql("SELECT text FROM records WHERE dataset = 'snippets' "
                                       "ORDER BY record_id").fetchall()]
    with pytest.warns(UserWarning, match=r"the text of 1 record\(s\) \(3\) changed"):
        dbd.add_dataset(planted, "snippets", [{"text": t, "source": f"f.py:{i}"} for i, t in enumerate(texts)])
    got = dbd.inspect(planted, "planted", ["mix"], HYPS, "snippets")
    source, reused = last_query(planted)
    assert source == "stored+model" and reused["activation_records_computed"] == 8
    assert reused["label_pairs_computed"] == len(HYPS)
    assert_same_scores(got, fresh_scores(texts, ["mix"], HYPS))


def test_a_growing_limit_runs_only_the_records_not_stored(con):
    adapter, rows = counted_planted(con)
    dbd.add_dataset(con, "snippets", TEXTS)
    seen = []
    for limit in (5, 10, 12, 10):
        rows.rows.clear()
        got = dbd.inspect(con, "planted", ["mix"], ["digit"], "snippets", limit=limit, keep_activations=True)
        source, reused = last_query(con)
        seen.append((source, reused["activation_records_read"], reused["activation_records_computed"], rows.n))
    assert seen == [("model", 0, 5, 5), ("stored+model", 5, 5, 5), ("stored+model", 10, 2, 2), ("stored", 10, 0, 0)]
    assert_same_scores(got, fresh_scores(TEXTS[:10], ["mix"], ["digit"]), tol=1e-9)
    view = con.sql("SELECT view_name FROM behaviors").fetchall()[0][0]
    assert con.sql(f"SELECT count(DISTINCT record_id), count(*), count(DISTINCT (record_id, pos)) FROM {view}"
                   ).fetchall() == [(12, sum(map(len, TEXTS[:12])), sum(map(len, TEXTS[:12])))]


# -- SIGKILL mid-scan --------------------------------------------------------------------------------

CHILD = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import deepbase_duck as dbd
from deepbase_duck.corpora.stdlib import stdlib_records
con = dbd.connect(sys.argv[1], progress=False)
dbd.register_model(con, "m", "deepbase_duck.models.zoo:charlstm", {{"checkpoint": "early"}})
dbd.add_dataset(con, "d", stdlib_records("heldout", max_chars=300, limit_chars=40000))
dbd.inspect(con, "m", ["lstm0", "lstm1"], ["in_string", "in_comment"], "d", measures=["corr", "mi"],
            keep_activations=True, batch_size=4)
dbd.close(con)
"""


def test_an_inspect_killed_with_sigkill_resumes_to_the_uninterrupted_scores(tmp_path):
    """A subprocess inspecting with keep_activations is killed (SIGKILL) once its first parts are
    published. The next connect leaves each view reading exactly the records the catalog lists,
    every file on disk listed; the next query reads those and runs the model for the rest
    only, and its scores equal an uninterrupted run's (mi's bins included)."""
    from deepbase_duck.corpora.stdlib import stdlib_records
    db = str(tmp_path / "k.duckdb")
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=TESTS), db], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not list(Path(db + ".acts").glob("*/part-*.parquet")) and proc.poll() is None:
            assert time.time() < deadline, "no part was published"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close(), proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    texts = [r["text"] for r in stdlib_records("heldout", max_chars=300, limit_chars=40000)]
    con = dbd.connect(db, progress=False)
    try:
        stored = {}
        for bid, view in con.sql("SELECT behavior_id, view_name FROM behaviors").fetchall():
            recs = {r for (r,) in con.sql("SELECT record_id FROM behavior_records WHERE behavior_id = ?",
                                          params=[bid]).fetchall()}
            seen = con.sql(f"SELECT count(DISTINCT record_id), count(*), count(DISTINCT (record_id, pos)) "
                           f"FROM {view}").fetchall()[0]
            n = sum(len(texts[r]) for r in recs)
            assert seen == (len(recs), n, n)
            stored[view] = recs
        assert len(stored) == 2 and len({frozenset(v) for v in stored.values()}) == 1
        done = len(next(iter(stored.values())))
        assert 0 < done < len(texts)
        on_disk, listed = listed_files(con, Path(db + ".acts"))
        assert on_disk == listed
        from deepbase_duck.models.zoo import charlstm
        adapter = charlstm("early")
        rows = Rows(adapter, (("lstm0", "lstm1"),))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dbd.register_model(con, "m", adapter)
        rows.rows.clear()                                   # (registration's pass over the example)
        kw = {"measures": ["corr", "mi"], "batch_size": 4}
        got = dbd.inspect(con, "m", ["lstm0", "lstm1"], ["in_string", "in_comment"], "d", keep_activations=True, **kw)
        source, reused = last_query(con)
        assert source == "stored+model" and rows.n == len(texts) - done
        assert (reused["activation_records_read"], reused["activation_records_computed"]) == (done, len(texts) - done)
    finally:
        dbd.close(con)
    ref = dbd.connect(None, progress=False)
    try:
        dbd.register_model(ref, "m", "deepbase_duck.models.zoo:charlstm", {"checkpoint": "early"})
        dbd.add_dataset(ref, "d", texts)
        want = dbd.inspect(ref, "m", ["lstm0", "lstm1"], ["in_string", "in_comment"], "d", **kw)
    finally:
        dbd.close(ref)
    assert_same_scores(got, want, tol=1e-9)


# -- a reader beside a writer ------------------------------------------------------------------------

def test_a_reader_cursor_beside_an_extraction_sees_only_whole_committed_parts(tmp_path):
    """A plain cursor in another thread reads every behavior's view while the connection extracts
    in batches of 2 records: no read fails, none sees a row twice, and each sees whole records."""
    db = str(tmp_path / "r.duckdb")
    con = dbd.connect(db, progress=False)
    try:
        dbd.register_model(con, "planted", planted_adapter())
        dbd.add_dataset(con, "snippets", TEXTS * 4)
        lengths = {i: len(t) for i, t in enumerate(TEXTS * 4)}
        errors, reads, stop = [], [], threading.Event()

        def reader():
            cur = con.cursor()
            while not stop.is_set():
                try:
                    for (view,) in cur.sql("SELECT view_name FROM behaviors").fetchall():
                        try:
                            per = cur.sql(f"SELECT record_id, count(*), count(DISTINCT pos) FROM {view} "
                                          f"GROUP BY ALL").fetchall()
                        except Exception as exc:       # not created yet (no part committed)
                            if "does not exist" in str(exc):
                                continue
                            raise
                        reads.append(len(per))
                        for rec, n, distinct in per:
                            assert n == distinct == lengths[rec], (view, rec, n, distinct)
                except Exception as exc:
                    errors.append(repr(exc))
            cur.close()
        t = threading.Thread(target=reader)
        t.start()
        try:
            for dtype in ("float32", "float16"):
                dbd.extract(con, "planted", ["planted", "mix"], "snippets", batch_size=2, dtype=dtype)
        finally:
            stop.set()
            t.join()
        assert errors == [] and reads
    finally:
        dbd.close(con)


# -- a user's unlimited DuckDB memory limit -----------------------------------------------------------

def test_a_scan_under_a_users_unlimited_memory_limit_runs_and_restores_it(tmp_path):
    """SET memory_limit = '-1' (no limit; DuckDB shows '16383.9 PiB'): every extraction, query and
    annotation of a file store failed with "scan_memory_limit: not a memory size: '16383.9
    PiB'". Now the scan runs capped and the user's limit comes back."""
    con = dbd.connect(str(tmp_path / "m.duckdb"), progress=False)
    try:
        dbd.register_model(con, "planted", planted_adapter())
        dbd.add_dataset(con, "snippets", TEXTS[:4])
        con.execute("SET memory_limit = '-1'")
        unlimited = con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0]
        dbd.extract(con, "planted", ["mix"], "snippets")
        dbd.inspect(con, "planted", ["mix"], ["digit"], "snippets")
        assert con.sql("SELECT current_setting('memory_limit')").fetchall() == [(unlimited,)]
    finally:
        dbd.close(con)


# -- a store opened through a symbolic link -----------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="symbolic links")
def test_a_store_opened_through_a_symbolic_link_keeps_its_stored_activations(tmp_path):
    """The activation folder was '<path given>.acts': opened through a link in another folder,
    the catalog found none of its part files, forgot them all (a warning) and ran the model; the
    next opening by the file's own path then deleted the folder as holding no committed part.
    Now the link and the file share the file's folder; a folder an earlier version made beside
    the link (and none beside the file) is still used."""
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    real, link = tmp_path / "real" / "s.duckdb", tmp_path / "links" / "s.duckdb"
    con = dbd.connect(str(real), progress=False)
    try:
        dbd.register_model(con, "planted", planted_adapter())
        dbd.add_dataset(con, "snippets", TEXTS)
        dbd.extract(con, "planted", ["mix"], "snippets")
        want = dbd.inspect(con, "planted", ["mix"], ["digit"], "snippets")
    finally:
        dbd.close(con)
    os.symlink(real, link)
    con = dbd.connect(str(link), progress=False)
    try:
        dbd.register_model(con, "planted", planted_adapter())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = dbd.inspect(con, "planted", ["mix"], ["digit"], "snippets", reuse=False)
        source, reused = last_query(con)
        assert source == "stored" and reused["activation_records_read"] == len(TEXTS)
        assert_same_scores(got, want)
    finally:
        dbd.close(con)
    assert not Path(str(link) + ".acts").exists()
    con = dbd.connect(str(real), progress=False)
    try:
        assert con.sql("SELECT count(*) FROM behavior_records").fetchall() == [(len(TEXTS),)]
        assert len(list(Path(str(real) + ".acts").glob("*/part-*.parquet"))) == 2
    finally:
        dbd.close(con)
    # an earlier version's folder beside the link (the file has none): still the store's
    os.rename(str(real) + ".acts", str(link) + ".acts")
    con = dbd.connect(str(link), progress=False)
    try:
        dbd.register_model(con, "planted", planted_adapter())
        dbd.inspect(con, "planted", ["mix"], ["digit"], "snippets", reuse=False)
        assert last_query(con)[0] == "stored"
    finally:
        dbd.close(con)

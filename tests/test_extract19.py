"""Bug hunt on extraction to disk: part files deleted or cut short while the store was closed
(views silently short, or failing at every read), float16 storage (rounding unlike torch's, a
refusal of values that round to 65504, an error naming a folder instead of the layer), and the
scan's memory cap left behind when a scan failed inside the caller's transaction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.errors import ActivationError
from deepbase_duck.extraction.adapters import CharAdapter
from deepbase_duck.models.charlstm import VOCAB, encode_chars

from conftest import TEXTS, planted_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


# -- part files damaged while the store was closed ------------------------------------------------
def _store_with_three_parts(tmp_path):
    db = str(tmp_path / "s.duckdb")
    con = dbd.connect(db, progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    view = dbd.extract(con, "planted", ["planted"], "snippets", batch_size=8)[0]["view"]
    want = con.sql(f"SELECT record_id, pos, act FROM {view} ORDER BY ALL").fetchall()
    dbd.close(con)
    folder = next((tmp_path / "s.duckdb.acts").iterdir())
    assert sorted(p.name for p in folder.glob("part-*.parquet")) == [f"part-00000{i}.parquet" for i in (1, 2, 3)]
    return db, view, want, folder / "part-000002.parquet"


def test_a_part_deleted_while_closed_is_named_when_the_store_opens(tmp_path):
    """One committed part deleted by hand: the view made at the opening read the other parts'
    rows with no word (612 rows became 436) until an extract or inspect of that layer noticed."""
    db, view, want, part = _store_with_three_parts(tmp_path)
    part.unlink()
    with pytest.warns(UserWarning, match=r"model 'planted', layer 'planted' on dataset 'snippets': of the 3 part "
                                         r"files .*missing \(deleted or moved\?\): 1, part-000002\.parquet\. View "
                                         rf"{view} lacks their records until the next extract"):
        con = dbd.connect(db, progress=False)
    try:
        dbd.register_model(con, "planted", planted_adapter())
        with pytest.warns(UserWarning, match="1 of 3 part files are missing"):
            assert dbd.extract(con, "planted", ["planted"], "snippets", batch_size=8)[0]["extracted"] == 8
        assert con.sql(f"SELECT record_id, pos, act FROM {view} ORDER BY ALL").fetchall() == want
    finally:
        dbd.close(con)


@pytest.mark.parametrize("damage", ["cut short", "empty"])
def test_a_part_cut_short_while_closed_is_computed_again(tmp_path, damage):
    """A committed part that is not a whole Parquet file (a copy of the store that ran out of
    disk; a crash before the renamed file's data reached the disk: empty) made every read of the
    view fail ("No magic bytes found"), while extract counted its records as stored (reused 24,
    extracted 0) and inspect failed on it. It is now deleted at the opening, with a warning, and
    its records stored again, equal to what was there."""
    db, view, want, part = _store_with_three_parts(tmp_path)
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2] if damage == "cut short" else b"")
    with pytest.warns(UserWarning, match=r"not whole Parquet files .*deleted: 1, part-000002\.parquet"):
        con = dbd.connect(db, progress=False)
    try:
        assert not part.exists()
        dbd.register_model(con, "planted", planted_adapter())
        with pytest.warns(UserWarning, match="1 of 3 part files are missing"):
            res = dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", reuse=False)
        assert len(res) == 5
        with _no_warning():
            got = dbd.extract(con, "planted", ["planted"], "snippets", batch_size=8)[0]
        assert (got["extracted"], got["reused"]) == (8, 16)
        assert con.sql(f"SELECT record_id, pos, act FROM {view} ORDER BY ALL").fetchall() == want
    finally:
        dbd.close(con)


class _no_warning:
    """A block that must raise no warning."""

    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings(record=True)
        self.seen = self._w.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
        assert not [str(w.message) for w in self.seen if issubclass(w.category, UserWarning)]
        return False


# -- float16 ------------------------------------------------------------------------------------
class _Table(torch.nn.Module):
    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.register_buffer("values", values)

    def forward(self, ids):
        return self.values[ids]


class _TableModel(torch.nn.Module):
    """Activations looked up per character from a fixed table (its dtype is the model's)."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.out = _Table(values)

    def forward(self, ids):
        return self.out(ids)


def _table_con(values, text: str):
    con = dbd.connect(None, progress=False)
    dbd.register_model(con, "tbl", CharAdapter(_TableModel(values), encode_chars, "chars-test", device="cpu"))
    dbd.add_dataset(con, "one", [text])
    return con


def _stored(con, dtype):
    view = dbd.extract(con, "tbl", ["out"], "one", dtype=dtype)[0]["view"]
    return np.asarray([r[0] for r in con.sql(f"SELECT act FROM {view} ORDER BY pos").fetchall()], np.float32)


def test_float16_of_a_float64_model_is_torchs_conversion():
    """numpy rounded float64 straight to float16, torch (and the float32 behavior, then halved)
    through float32: just above a float16 tie (0.28771973... = 1178.5 / 4096 + 2**-30) they differ
    by one unit, so the float16 behavior disagreed with ``x.half()`` and with the float32 one.
    Subnormal and ordinary values are checked too."""
    k = torch.arange(len(VOCAB), dtype=torch.float64)
    values = torch.stack([(2 * (k + 1024) + 1) / 8192 + 2.0 ** -30,     # float16 ties in [0.25, 0.5), nudged up
                          k * 1e-9 - 3e-8,                                # float16 subnormals (and zero, negatives)
                          torch.sin(k) * 300.0 + 2.0 ** -20], 1)
    text = "".join(VOCAB[1:])
    con = _table_con(values, text)
    try:
        half, single = _stored(con, "float16"), _stored(con, "float32")
    finally:
        dbd.close(con)
    expected = values[torch.as_tensor([VOCAB.index(c) for c in text])]
    torch_half = expected.to(torch.float16).float().numpy()
    assert (torch_half != expected.numpy().astype(np.float16).astype(np.float32)).any()   # the cases are there
    np.testing.assert_array_equal(half, torch_half)
    np.testing.assert_array_equal(half, single.astype(np.float16).astype(np.float32))


def test_float16_keeps_values_that_round_to_its_largest_and_refuses_overflow_naming_the_layer():
    """65504 < |x| < 65520 rounds to 65504 (torch's conversion too), yet was refused as beyond
    float16's range; a value that does overflow was refused naming the behavior's folder
    ('b00001-tbl-out-one-float16') rather than the model, layer and dataset."""
    near = torch.full((len(VOCAB), 2), 65519.0)
    near[:, 1] = -65510.0
    con = _table_con(near, "ab")
    try:
        np.testing.assert_array_equal(_stored(con, "float16"), [[65504.0, -65504.0]] * 2)
    finally:
        dbd.close(con)
    over = torch.full((len(VOCAB), 2), 1.0)
    over[VOCAB.index("b"), 1] = -70000.0
    con = _table_con(over, "ab")
    try:
        with pytest.raises(ActivationError, match=r"activations of model 'tbl' layer 'out' on dataset 'one' reach "
                                                  r"70000, beyond float16's largest value \(65504\).*"
                                                  r"dtype='float32'"):
            dbd.extract(con, "tbl", ["out"], "one", dtype="float16")
        assert con.sql("SELECT count(*) FROM behaviors").fetchall() == [(0,)]
        np.testing.assert_array_equal(_stored(con, "float32"), [[1.0, 1.0], [1.0, -70000.0]])
    finally:
        dbd.close(con)


# -- the scan's memory cap ------------------------------------------------------------------------
def test_a_scan_failing_inside_the_callers_transaction_restores_the_memory_limit(tmp_path):
    """A scan that failed inside the caller's BEGIN (its transaction then aborted) could not set
    the memory limit back (DuckDB refuses every statement until a ROLLBACK): the database kept the
    scan's 128 MB cap for good, and the refusal ("Current transaction is aborted") was raised
    instead of the scan's own error."""
    con = dbd.connect(str(tmp_path / "s.duckdb"), progress=False)
    try:
        dbd.register_model(con, "nan", planted_adapter(nan_on_tilde=True))
        dbd.add_dataset(con, "snippets", TEXTS[:4] + ["a ~ b"])
        limit = lambda: con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0]  # noqa: E731
        before = limit()
        con.execute("BEGIN")
        with pytest.raises(ActivationError, match="NaN or infinite activations on record 4"):
            dbd.extract(con, "nan", ["planted"], "snippets")
        con.execute("ROLLBACK")
        assert limit() == before != "122.0 MiB"
    finally:
        dbd.close(con)

"""What a failed query leaves behind: no catalog row naming activations that were never stored
(a behavior with no part and no view), and no stored data of earlier calls removed."""
import pytest

import deepbase_duck as dbd
from conftest import TEXTS, planted_adapter
from deepbase_duck.errors import HypothesisError
from deepbase_duck.hypotheses.core import Hypothesis, register


def crashing_model(con, after: int):
    """The planted model registered, failing at its forward pass number ``after`` + 1 from now."""
    crashing = planted_adapter()
    dbd.register_model(con, "planted", crashing)
    crashing.exits_early(["planted"])                    # the early-exit checks' forward passes, once
    crashing.exits_early(["planted", "mix"])
    crashing.module.calls, crashing.module.fail_after = 0, after
    return crashing


def behaviors(con):
    return con.sql("SELECT behavior_id, view_name FROM behaviors ORDER BY behavior_id").fetchall()


def test_a_failed_inspect_keeping_activations_leaves_no_empty_behavior(con):
    dbd.add_dataset(con, "snippets", TEXTS)
    crashing_model(con, 0)                               # the first batch fails
    with pytest.raises(RuntimeError, match="simulated crash"):
        dbd.inspect(con, "planted", ["planted", "mix"], ["digit"], "snippets", keep_activations=True, batch_size=4)
    assert behaviors(con) == []
    # a failure after two batches keeps what was committed, and a re-run resumes after it
    crashing_model(con, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", keep_activations=True, batch_size=4)
    (bid, view), = behaviors(con)
    assert con.sql(f"SELECT count(DISTINCT record_id) FROM {view}").fetchall() == [(8,)]
    dbd.register_model(con, "planted", planted_adapter())
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", keep_activations=True, batch_size=4)
    assert con.sql(f"SELECT count(DISTINCT record_id) FROM {view}").fetchall() == [(len(TEXTS),)]


def test_a_hypothesis_error_in_inspect_keeping_activations_leaves_no_empty_behavior(con):
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.register_model(con, "planted", planted_adapter())

    def bad(text):
        raise ValueError("broken hypothesis")
    register(Hypothesis("broken_for_cleanup", bad, "binary"))
    with pytest.raises(HypothesisError, match="broken hypothesis"):
        dbd.inspect(con, "planted", ["planted"], ["broken_for_cleanup"], "snippets", keep_activations=True)
    assert behaviors(con) == []


def test_an_edited_hypothesis_failing_at_once_removes_no_stored_labels(con):
    """The labels of a hypothesis' earlier version stay until the first labels of the new one are
    stored: a new version raising on its first record (on another dataset) leaves dataset A's
    labels, and restoring the old code reuses them (nothing computed, the catalog row, which the
    SQL macros read, back at the old version); a new version that stores labels replaces them."""
    dbd.add_dataset(con, "A", TEXTS[:6])
    dbd.add_dataset(con, "B", TEXTS[6:12])
    old = Hypothesis("vowel_edit", lambda t: [c in "aeiou" for c in t], "binary")
    register(old)
    dbd.annotate(con, ["vowel_edit"], "A")
    stored = lambda: con.sql("SELECT version, dataset, count(*) FROM labeled_records WHERE hypothesis = 'vowel_edit' "  # noqa: E731
                             "GROUP BY ALL ORDER BY ALL").fetchall()
    before = stored()
    assert before == [(old.version, "A", 6)]

    def broken(text):
        raise ValueError("bug in the edited hypothesis")
    register(Hypothesis("vowel_edit", broken, "binary"))
    with pytest.raises(HypothesisError, match="bug in the edited hypothesis"):
        dbd.annotate(con, ["vowel_edit"], "B")
    assert stored() == before
    register(old)
    assert dbd.annotate(con, ["vowel_edit"], "A")[0]["reused"] == 6
    assert con.sql("SELECT version FROM hypotheses WHERE name = 'vowel_edit'").fetchall() == [(old.version,)]
    new = Hypothesis("vowel_edit", lambda t: [c in "aeiouy" for c in t], "binary")
    register(new)
    dbd.annotate(con, ["vowel_edit"], "B")
    assert stored() == [(new.version, "B", 6)]            # one version per hypothesis: the new one


def test_last_error_shows_an_interruption_not_an_older_error(con):
    dbd.add_dataset(con, "snippets", TEXTS)
    with pytest.raises(Exception, match="unknown dataset"):
        con.sql("SELECT * FROM extract_activations('planted', ['planted'], 'no_such_dataset')").fetchall()
    adapter = planted_adapter()
    dbd.register_model(con, "planted", adapter)

    def interrupted(ids):
        raise KeyboardInterrupt
    adapter.module.forward = interrupted
    with pytest.raises(BaseException):
        con.sql("SELECT * FROM extract_activations('planted', ['planted'], 'snippets')").fetchall()
    last = con.sql("SELECT last_error()").fetchall()[0][0].strip().splitlines()[-1]
    assert last == "KeyboardInterrupt"


@pytest.mark.parametrize("make_fault", [lambda: OSError(28, "No space left on device"), KeyboardInterrupt],
                         ids=["disk-full", "ctrl-c"])
def test_a_report_that_fails_to_write_leaves_no_temporary_file(tmp_path, con, monkeypatch, make_fault):
    import pathlib
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets")
    out = tmp_path / "report.html"
    dbd.report(con, str(out))
    earlier = out.read_text()
    real = pathlib.Path.write_text
    fault = make_fault()         # (made here: an exception kept past the test would hold the store by its traceback)

    def half(self, data, *a, **k):                        # the disk fills up half way
        real(self, data[:len(data) // 2], *a, **k)
        raise fault
    monkeypatch.setattr(pathlib.Path, "write_text", half)
    with pytest.raises(BaseException) as err:
        dbd.report(con, str(out))
    assert ("No space left" in str(err.value)) if isinstance(fault, OSError) else err.type is KeyboardInterrupt
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    assert out.read_text() == earlier                     # the earlier report intact

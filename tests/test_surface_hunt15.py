"""Bug hunt of the user surfaces (CLI, shell, SQL functions): what a researcher typed, what it
printed, and what it should have."""
from __future__ import annotations

import io

import pytest

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError

from conftest import TEXTS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A file store the CLI can open: the planted model (by its loader spec) over TEXTS, one query."""
    db = str(tmp_path_factory.mktemp("hunt15") / "study.duckdb")
    con = dbd.connect(db, progress=False)
    try:
        dbd.register_model(con, "planted", "ray_models:planted")
        dbd.add_dataset(con, "snippets", TEXTS)
        dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets")
    finally:
        dbd.close(con)
    return db


from test_cli_usability import cli  # noqa: E402  (a CLI command run in-process: rc, stdout, stderr)


# -- shell: .read of a file whose name has a space; -c and a script together -------------------

def test_shell_reads_a_quoted_file_name_with_spaces(store, tmp_path):
    """`.read "my script.sql"` read the file '"my' (and `.read my script.sql` the file 'my'): a
    script in a folder or under a name with spaces could not be read at all."""
    from deepbase_duck.shell import Shell
    folder = tmp_path / "my scripts ü"
    folder.mkdir()
    script = folder / "first query.sql"
    script.write_text("SELECT 40 + 2 AS answer;\n", encoding="utf-8")
    con = dbd.connect(store, progress=False)
    try:
        out, err = io.StringIO(), io.StringIO()
        sh = Shell(con, out, err)
        assert sh.feed([f'.read "{script}"'], interactive=False) == 0, err.getvalue()
        assert "42" in out.getvalue()
        assert sh.feed([f".read '{script}'"], interactive=False) == 0, err.getvalue()
        # unquoted, the name is two words: refused by name, with how to quote it
        err.truncate(0), err.seek(0)
        assert sh.feed([f".read {script}"], interactive=False) == 1
        assert "one file name" in err.getvalue() and "quote" in err.getvalue()
        err.truncate(0), err.seek(0)
        assert sh.feed([f".read '{script}"], interactive=False) == 1       # a quote left open: no such file
        assert err.getvalue().startswith("Error: ") and "first query.sql" in err.getvalue()
        assert err.getvalue().count("\n") == 1
        apostrophe = tmp_path / "don't.sql"                                # unquoted, as before shlex
        apostrophe.write_text("SELECT 6 * 7 AS answer;\n", encoding="utf-8")
        out.truncate(0), out.seek(0)
        assert sh.feed([f".read {apostrophe}"], interactive=False) == 0, err.getvalue()
        assert "42" in out.getvalue()
    finally:
        dbd.close(con)


def test_shell_refuses_c_and_a_script_together(tmp_path):
    """`deepbase-duck shell STORE script.sql -c SQL` ran the -c statements and silently skipped
    the script; it is refused before any store is opened or created."""
    from deepbase_duck.shell import main
    script = tmp_path / "q.sql"
    script.write_text("SELECT 1;\n")
    db = tmp_path / "new.duckdb"
    with pytest.raises(DeepBaseError, match=r"either -c SQL or a script file .*q\.sql.*not both"):
        main(str(db), "SELECT 2;", str(script), quiet=True, create=True)
    assert not db.exists()


# -- add-stdlib / add_stdlib_dataset / add_ptb_dataset: no replace=True to pass -------------------

def test_cli_add_stdlib_over_other_records_says_what_it_can_do(tmp_path, capsys):
    """The CLI said 'pass replace=True to replace it', which add-stdlib has no flag for."""
    db = str(tmp_path / "s.duckdb")
    rc, out, err = cli(capsys, "add-stdlib", db, "code", "--chars", "3000")
    assert rc == 0, err
    rc, out, err = cli(capsys, "add-stdlib", db, "code", "--chars", "3000", "--max-chars", "500")
    assert rc == 2 and out == ""
    assert "replace=True" not in err and "dataset 'code' already exists" in err
    assert "another name" in err and "drop_dataset" in err and err.strip().count("\n") == 0


def test_sql_dataset_builders_over_other_records_say_what_they_can_do():
    """add_stdlib_dataset and add_ptb_dataset said 'pass replace=True', an argument neither has."""
    import duckdb
    con = dbd.connect(None, progress=False)
    try:
        con.sql("SELECT add_stdlib_dataset('code', limit_chars := 3000)").fetchall()
        with pytest.raises(duckdb.Error) as e:
            con.sql("SELECT add_stdlib_dataset('code', limit_chars := 3000, max_chars := 500)").fetchall()
        assert "replace=True" not in str(e.value) and "add_stdlib_dataset: dataset 'code' already exists" in str(e.value)
        con.sql("SELECT add_ptb_dataset('ptb', n := 3, seed := 1)").fetchall()
        with pytest.raises(duckdb.Error) as e:
            con.sql("SELECT add_ptb_dataset('ptb', n := 3, seed := 2)").fetchall()
        assert "replace=True" not in str(e.value) and "add_ptb_dataset: dataset 'ptb' already exists" in str(e.value)
    finally:
        dbd.close(con)


# -- the library's parameter names, as each command's flags ----------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["add-stdlib", "{db}", "more", "--chars", "0"], "add-stdlib: error: --chars must be an integer >= 1, got 0"),
    (["extract", "{db}", "planted", "snippets", "planted", "--batch-size", "0"],
     "extract: error: --batch-size must be an integer >= 1, got 0"),
    (["report", "{db}", "--out", "{html}", "--top", "0"], "report: error: --top must be an integer >= 1"),
    (["report", "{db}", "--out", "{html}", "--records", "-1"], "report: error: --records must be an integer >= 0"),
    (["report", "{db}", "--out", "{html}", "--context", "5"], "report: error: --context must be an integer >= 10"),
    (["report", "{db}", "--out", "{html}", "--text-units", "-1"], "report: error: --text-units must be an integer"),
    (["inspect", "{db}", "planted", "snippets", "--layers", "planted", "--hypotheses", "digit", "--control"],
     "inspect: error: --control needs the 'probe' measure"),
    (["inspect", "{db}", "planted", "snippets", "--layers", "planted", "--hypotheses", "digit",
      "--ray-address", "auto"], "inspect: error: --ray-address and Ray options need --engine ray"),
])
def test_errors_name_the_commands_flags(store, tmp_path, capsys, argv, message):
    """Each of these named the library's parameter (limit_chars, batch_size, top_units,
    control=True, engine='ray'...), which is no flag of the command the user typed. (Round 19:
    report's lines said the command twice, 'report: error: report: --top ...'; the library's
    'report: ' is left out, the line names the command once.)"""
    argv = [a.format(db=store, html=tmp_path / "r.html") for a in argv]
    rc, out, err = cli(capsys, *argv)
    assert rc == 2 and message in err, err
    assert err.strip().count("\n") == 0


def test_cli_flags_translates_only_names_outside_quotes():
    from deepbase_duck.cli import COMMAND_FLAGS, cli_flags
    assert cli_flags("unknown dataset 'limit_chars'; valid datasets: a", COMMAND_FLAGS["add-stdlib"]) == \
        "unknown dataset 'limit_chars'; valid datasets: a"
    assert cli_flags("limit_chars must be an integer >= 1, got 0", COMMAND_FLAGS["add-stdlib"]) == \
        "--chars must be an integer >= 1, got 0"


# -- a closed pipe is no failure: the store a command created stays --------------------------------

def test_a_closed_output_pipe_keeps_the_store_the_command_created(tmp_path):
    """`deepbase-duck demo | head -1` (or add-stdlib / register-model into a new store piped to a
    reader that has gone) exited 0 and deleted the store it had just filled: the BrokenPipeError
    of a print inside the command counted as its failure, whose new store is removed."""
    import os
    import subprocess
    import sys
    db = tmp_path / "new store.duckdb"
    env = dict(os.environ, PYTHONUNBUFFERED="1")          # each print is written at once, as in many containers
    read, write = os.pipe()
    os.close(read)                                        # the reader has gone before the first line
    try:
        r = subprocess.run([sys.executable, "-m", "deepbase_duck", "--quiet", "add-stdlib", str(db), "code",
                            "--chars", "3000"], stdout=write, stderr=subprocess.PIPE, text=True, env=env,
                           timeout=300)
    finally:
        os.close(write)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert db.is_file()
    con = dbd.connect(str(db), progress=False)
    try:
        assert con.sql("SELECT count(*) FROM records WHERE dataset = 'code'").fetchall()[0][0] > 0
    finally:
        dbd.close(con)


# -- Ctrl-C in the shell stops a Python macro's scan -----------------------------------------------

def _slow_store(tmp_path, name):
    """A store with a slow model (0.25 s a forward pass) and a hypothesis that says when the scan
    has begun labelling; returns (connection, that event)."""
    import threading
    labelling = threading.Event()

    @dbd.hypothesis(name, kind="binary")
    def digits(text):
        labelling.set()
        return [(i, i + 1) for i, c in enumerate(text) if c.isdigit()]

    con = dbd.connect(str(tmp_path / "slow.duckdb"), progress=False)
    dbd.register_model(con, "slow", "ray_models:slow_planted", {"delay": 0.25})
    dbd.add_dataset(con, "snippets", TEXTS)
    return con, labelling


def _scan_on_a_thread(con, labelling, hypothesis):
    """Start a SQL inspect of the slow model on a thread of the test's own (as on a DuckDB
    worker) and return (thread, the exceptions it raised) once the scan is a few forward passes
    in."""
    import threading
    import time
    failed = []

    def query():
        cur = dbd.cursor(con)
        try:
            cur.sql(f"SELECT count(*) FROM inspect('slow', ['planted'], ['{hypothesis}'], 'snippets', "
                    "batch_size := 1)").fetchall()
        except BaseException as exc:
            failed.append(exc)
    t = threading.Thread(target=query)
    t.start()
    assert labelling.wait(120)
    time.sleep(0.5)                                              # a few forward passes into the scan
    return t, failed


def test_ctrl_c_in_the_shell_stops_an_inspect_on_another_thread(tmp_path):
    """DuckDB may run the inspect UDF on one of its worker threads, where Python never raises a
    Ctrl-C: the shell's main thread only interrupted the DuckDB query, which waited for the UDF,
    so the scan ran to its last record and stored its scores before the shell said 'Query
    interrupted' (a 30 s scan of 1.7M characters, Ctrl-C after 6 s). While the shell runs a
    statement, Ctrl-C now raises KeyboardInterrupt in the threads running deepbase_duck UDFs.
    Here the query runs on a thread of the test's own, as on a DuckDB worker."""
    import signal
    from deepbase_duck import shell
    con, labelling = _slow_store(tmp_path, "hunt15_digit_a")
    try:
        t, failed = _scan_on_a_thread(con, labelling, "hunt15_digit_a")
        with pytest.raises(KeyboardInterrupt):
            with shell._ctrl_c_stops_udfs():
                signal.raise_signal(signal.SIGINT)               # Ctrl-C, in the main thread
        t.join(120)
        assert not t.is_alive() and failed and "KeyboardInterrupt" in str(failed[0])
        assert con.sql("SELECT count(*) FROM queries").fetchall() == [(0,)]     # the scan did not run on
        assert con.sql("SELECT count(*) FROM inspect('slow', ['planted'], ['hunt15_digit_a'], 'snippets', "
                       "max_records := 2)").fetchall()[0][0] > 0                # the store is still usable
    finally:
        dbd.close(con)


def test_ctrl_c_at_the_shell_prompt_session_goes_on_without_a_traceback(tmp_path):
    """The interactive shell, Ctrl-C during an inspect (on whichever thread DuckDB runs it): one
    error line, no stored query, and the session goes on."""
    import os
    import signal
    import threading
    import time
    from deepbase_duck.shell import Shell
    con, labelling = _slow_store(tmp_path, "hunt15_digit_b")
    try:
        out, err = io.StringIO(), io.StringIO()
        sh = Shell(con, out, err)

        def ctrl_c_once_the_scan_runs():
            if labelling.wait(120):
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=ctrl_c_once_the_scan_runs, daemon=True).start()
        rc = sh.feed(["SELECT count(*) FROM inspect('slow', ['planted'], ['hunt15_digit_b'], 'snippets', "
                      "batch_size := 1);"], interactive=True)
        assert rc == 0 and "interrupt" in err.getvalue().lower()
        assert "Traceback" not in err.getvalue() and "last_error" not in err.getvalue()
        assert con.sql("SELECT count(*) FROM queries").fetchall() == [(0,)]
        assert sh.feed(["SELECT 6 * 7 AS answer;"], interactive=True) == 0 and "42" in out.getvalue()
    finally:
        dbd.close(con)


def test_ctrl_c_in_a_python_program_stops_a_sql_inspect_on_another_thread(tmp_path):
    """A script's con.sql("... inspect(...)") interrupted: dbd.connect chains Python's own
    Ctrl-C handler (from the main thread) so that the UDF running on another thread stops too,
    instead of scanning to its end and storing its scores."""
    import signal
    from deepbase_duck.surface import udfs
    con, labelling = _slow_store(tmp_path, "hunt15_digit_c")
    try:
        assert udfs._CTRL_C_CHAINED and signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        t, failed = _scan_on_a_thread(con, labelling, "hunt15_digit_c")
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)                   # Ctrl-C, in the main thread
        t.join(120)
        assert not t.is_alive() and failed and "KeyboardInterrupt" in str(failed[0])
        assert con.sql("SELECT count(*) FROM queries").fetchall() == [(0,)]
    finally:
        dbd.close(con)


def test_the_shell_interrupts_udfs_once_per_ctrl_c_and_its_prompt_survives_one_in_python(store):
    """Under dbd.connect's chained handler the shell adds no second one (each Ctrl-C raised
    KeyboardInterrupt in the UDF threads twice); a Ctrl-C landing while Python (not DuckDB) runs
    a statement is an error line at the prompt, not the end of the shell."""
    import signal
    from deepbase_duck import shell
    from deepbase_duck.surface.udfs import chained_ctrl_c
    con = dbd.connect(store, progress=False)
    try:
        assert chained_ctrl_c() is not None
        with shell._ctrl_c_stops_udfs():
            assert signal.getsignal(signal.SIGINT) is chained_ctrl_c()

        class Interrupted(shell.Shell):
            def run_sql(self, sql):
                raise KeyboardInterrupt
        out, err = io.StringIO(), io.StringIO()
        sh = Interrupted(con, out, err)
        assert sh.feed(["SELECT 1;", ".quit"], interactive=True) == 0
        assert err.getvalue() == "Error: interrupted\n"
        with pytest.raises(KeyboardInterrupt):                 # a script stops there
            sh.feed(["SELECT 1;"], interactive=False)
    finally:
        dbd.close(con)

"""The shell outside the prompt (round 18): a script's error names the statement that failed and
its line; Ctrl-C ends a script as it ends the other commands (KeyboardInterrupt, which the CLI
turns into status 130 and one line), not as a failed statement; Ctrl-C in a .read file at the
prompt leaves the prompt running."""
from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import deepbase_duck as dbd

from test_surface_hunt15 import _slow_store

pytestmark = pytest.mark.usefixtures("one_thread")


def feed(con, lines, interactive=False, source=None):
    from deepbase_duck.shell import Shell
    out, err = io.StringIO(), io.StringIO()
    rc = Shell(con, out, err).feed(lines, interactive=interactive, source=source)
    return rc, out.getvalue(), err.getvalue()


def test_a_scripts_error_names_the_statement_and_its_line(planted, tmp_path, monkeypatch):
    """'Error: Catalog Error: ...' did not say which statement of a script failed; now the line
    (of the code, not of a comment above it) and the statement's start come first, still one
    line. Since round 19 a deepbase_duck call refused for its input (a DeepBaseError) is that one
    line too: the Python traceback this test required after it read as a crash for a typo."""
    lines = ["SELECT 1 AS one;", "", "-- the next one fails", "SELECT *", "  FROM no_such_table;", "SELECT 3;"]
    rc, out, err = feed(planted, lines, source="q.sql")
    assert rc == 1 and "one" in out
    assert err.startswith("Error: line 4 of q.sql (SELECT * FROM no_such_table;): ") and err.count("\n") == 1, err
    assert "Catalog Error" in err
    # several statements on one line: the second is named; a long one is cut
    long = "SELECT * FROM nope WHERE a_rather_long_condition = '" + "x" * 80 + "';"
    rc, out, err = feed(planted, ["SELECT 2 AS two; " + long], source="-c")
    assert rc == 1 and "two" in out
    assert err.startswith("Error: line 1 of -c (SELECT * FROM nope WHERE a_rather_long_condition = 'xxxxx...): "), err
    # a deepbase_duck call refused for its input: the line alone (round 19: its Python traceback,
    # shown after it before, read as a crash; a call that fails otherwise still shows it, test_cli19)
    rc, out, err = feed(planted, ["SELECT 1;", "SELECT * FROM inspect('planted', ['nope'], ['digit'], 'snippets');"],
                        source="standard input")
    first = err.splitlines()[0]
    assert rc == 1 and first.startswith("Error: line 2 of standard input (SELECT * FROM inspect('planted', ")
    assert "unknown layer 'nope'" in first and err.count("\n") == 1 and "Traceback" not in err, err
    # a statement with no ';' at the end of the script
    rc, out, err = feed(planted, ["SELECT 1;", "SELECT * FROM", "no_such_table"], source="q.sql")
    assert rc == 1 and err.startswith("Error: line 2 of q.sql (SELECT * FROM no_such_table): "), err
    # a .read file's statement is named in that file
    monkeypatch.chdir(tmp_path)
    Path("inner.sql").write_text("SELECT 1;\nSELECT * FROM no_such_table;\n")
    rc, out, err = feed(planted, ["SELECT 5;", ".read inner.sql"], source="outer.sql")
    assert rc == 1 and err.splitlines()[0].startswith("Error: line 2 of inner.sql (SELECT * FROM no_such_table;)")
    # at the prompt the statement was just typed: the message alone, as before
    rc, out, err = feed(planted, ["SELECT * FROM no_such_table;"], interactive=True)
    assert rc == 0 and err.startswith("Error: Catalog Error"), err


def test_the_shell_command_names_its_scripts_failed_statement(planted, tmp_path, monkeypatch):
    """Through deepbase_duck.shell.main, as `deepbase-duck shell STORE q.sql` and `-c` run it."""
    from deepbase_duck.shell import main
    db = str(tmp_path / "s.duckdb")
    dbd.close(dbd.connect(db, progress=False))
    script = tmp_path / "q.sql"
    script.write_text("SELECT 1 AS one;\nSELECT 2 AS two;\n\nSELECT nope FROM range(3);\n")
    for args, where in (((None, str(script)), f"line 4 of {script}"), (("SELECT 1; SELECT nope;", None), "line 1 of -c")):
        errs = io.StringIO()
        monkeypatch.setattr(sys, "stderr", errs)
        monkeypatch.setattr(sys, "stdout", io.StringIO())
        assert main(db, *args, quiet=True) == 1
        assert errs.getvalue().startswith(f"Error: {where} (SELECT nope"), errs.getvalue()


def test_ctrl_c_ends_a_script_as_an_interruption_not_a_failed_statement(tmp_path):
    """A script's inspect stopped by Ctrl-C: the shell printed 'Error: Query interrupted' and
    returned 1, the status of a failed statement; now KeyboardInterrupt goes on to its caller (the
    CLI: status 130, one line), nothing of the scan is stored, and the store stays usable."""
    from deepbase_duck.shell import Shell
    con, labelling = _slow_store(tmp_path, "shell18_digit")
    try:
        out, err = io.StringIO(), io.StringIO()

        def ctrl_c_once_the_scan_runs():
            if labelling.wait(120):
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=ctrl_c_once_the_scan_runs, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            Shell(con, out, err).feed(["SELECT count(*) FROM inspect('slow', ['planted'], ['shell18_digit'], "
                                       "'snippets', batch_size := 1);", "SELECT 2;"], interactive=False)
        assert "Error" not in err.getvalue(), err.getvalue()
        assert con.sql("SELECT count(*) FROM queries").fetchall() == [(0,)]
        assert con.sql("SELECT count(*) FROM inspect('slow', ['planted'], ['shell18_digit'], 'snippets', "
                       "max_records := 2)").fetchall()[0][0] > 0
    finally:
        dbd.close(con)


def test_ctrl_c_in_a_read_file_at_the_prompt_keeps_the_prompt(planted, tmp_path, monkeypatch):
    """`.read long.sql` at the prompt, then Ctrl-C: the file's (non-interactive) feed passes the
    interruption on, and it ended the whole interactive shell; now it is one error line and the
    session goes on, as for a statement typed at the prompt."""
    from deepbase_duck.shell import Shell
    monkeypatch.chdir(tmp_path)
    Path("long.sql").write_text("SELECT 1;\n")

    class CtrlCInPython(Shell):
        """Ctrl-C landing while Python (not DuckDB) runs a statement of the file."""
        def run_sql(self, sql):
            if self.nested:
                raise KeyboardInterrupt
            return super().run_sql(sql)

    out, err = io.StringIO(), io.StringIO()
    try:
        rc = CtrlCInPython(planted, out, err).feed([".read long.sql", "SELECT 6 * 7 AS answer;"], interactive=True)
    except KeyboardInterrupt:                    # (not let through: pytest would take it for its own Ctrl-C)
        pytest.fail("Ctrl-C in a .read file ended the interactive shell")
    assert rc == 0
    assert err.getvalue() == "Error: interrupted\n" and "42" in out.getvalue()


def test_sql_given_where_the_store_or_script_goes_points_at_minus_c(tmp_path, monkeypatch):
    """`deepbase-duck shell STORE 'SELECT ...'` (as the DuckDB CLI takes SQL) said 'no script file',
    and `shell --create 'SELECT ...'` made a store file named after the SQL; both now say to give
    the SQL with -c, and nothing is created."""
    from deepbase_duck.errors import DeepBaseError
    from deepbase_duck.shell import main
    monkeypatch.chdir(tmp_path)
    db = str(tmp_path / "s.duckdb")
    dbd.close(dbd.connect(db, progress=False))
    with pytest.raises(DeepBaseError, match=r"no script file 'SELECT 1;': that reads as SQL, .* "
                                            r"deepbase-duck shell STORE -c 'SELECT 1;'"):
        main(db, None, "SELECT 1;", quiet=True)
    with pytest.raises(DeepBaseError, match=r"no store 'select \* from range\(3\)': that reads as SQL, .* -c "):
        main("select * from range(3)", None, None, quiet=True, create=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.duckdb"]
    # a script whose name starts with a keyword is still read, and a missing one named as before
    Path("select.sql").write_text("SELECT 1;\n")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert main(db, None, "select.sql", quiet=True) == 0
    with pytest.raises(DeepBaseError, match=r"^no script file 'show.sql'$"):
        main(db, None, "show.sql", quiet=True)

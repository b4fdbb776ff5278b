"""deepbase-duck shell: -c, script and stdin modes, dot-commands, errors, and a real terminal."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

import deepbase_duck as dbd

from conftest import TEXTS, planted_adapter


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("shell") / "s.duckdb")
    con = dbd.connect(path, progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:4])
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets")
    dbd.close(con)
    return path


def shell(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "deepbase_duck", "shell", "--quiet", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_command_mode_runs_python_macros(db):
    r = shell(db, "-c", "SELECT unit, round(score, 3) AS r FROM top_units(1) WHERE hypothesis = 'digit';")
    assert r.returncode == 0, r.stderr
    assert "│" in r.stdout and "1.0" in r.stdout
    # a Python UDF macro works here (it does not in the DuckDB CLI)
    r = shell(db, "-c", "SELECT count(*) AS n FROM available_hypotheses();")
    assert r.returncode == 0 and "n" in r.stdout


def test_script_and_dot_commands(db, tmp_path):
    script = tmp_path / "q.sql"
    script.write_text("SELECT 41 + 1 AS answer;\n")
    driver = tmp_path / "drive.sql"
    driver.write_text(f".tables\n.schema models\n.read {script}\n.timer on\nSELECT\n  2 AS two;\n")
    r = shell(db, str(driver))
    assert r.returncode == 0, r.stderr
    assert "scores" in r.stdout and "CREATE TABLE models" in r.stdout
    assert "42" in r.stdout and "two" in r.stdout and "Run Time:" in r.stdout


def test_errors_are_one_line_and_end_scripts(db):
    r = shell(db, stdin="SELECT 1 AS first;\nSELECT * FROM no_such_table;\nSELECT 3 AS third;\n")
    assert r.returncode == 1
    assert r.stderr.startswith("Error: ") and r.stderr.strip().count("\n") == 0
    assert "no_such_table" in r.stderr
    assert "first" in r.stdout and "third" not in r.stdout       # the script stopped at the error
    r = shell(db, "-c", ".nope")
    assert r.returncode == 1 and "unknown command .nope" in r.stderr


def test_interactive_terminal_session(db, tmp_path):
    """A real pseudo-terminal: the prompt, a statement over two lines, a dot-command, .quit."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["HOME"] = str(tmp_path)
        os.execv(sys.executable, [sys.executable, "-m", "deepbase_duck", "shell", "--quiet", db])
    out = b""

    def read_until(token: bytes, timeout=120):
        nonlocal out
        end = time.time() + timeout
        while token not in out and time.time() < end:
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        return token in out

    try:
        assert read_until(b"D "), out
        os.write(fd, b"SELECT 6 *\n")
        assert read_until("· ".encode()), out
        os.write(fd, b"7 AS product;\n")
        assert read_until(b"42"), out
        os.write(fd, b".tables\n")
        assert read_until(b"scores"), out
        os.write(fd, b".quit\n")
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    finally:
        os.close(fd)
    assert (tmp_path / ".deepbase_duck_history").exists()


def test_statements_across_lines_parse_errors_and_read_with_dot_commands(db, tmp_path, capsys):
    """In-process: a ';' inside a string continues the statement; a statement that does not
    parse is reported and an interactive session goes on; .read runs dot-commands too; a missing
    or non-UTF-8 script is one clear error."""
    import io
    from deepbase_duck.errors import DeepBaseError
    from deepbase_duck.shell import Shell, read_script
    con = dbd.connect(db, progress=False)
    try:
        out, err = io.StringIO(), io.StringIO()
        sh = Shell(con, out, err)
        assert sh.feed(["SELECT 'a;", "b' AS x;"], interactive=False) == 0
        assert "a;" in out.getvalue() and err.getvalue() == ""
        assert sh.feed(["SELECT ) ;", "SELECT 2 AS two;"], interactive=True) == 0
        assert "Error: " in err.getvalue() and "two" in out.getvalue()
        assert sh.feed(["SELECT ) ;", "SELECT 3 AS three;"], interactive=False) == 1
        assert "three" not in out.getvalue()
        script = tmp_path / "dots.sql"
        script.write_text(".timer on\nSELECT 5 AS five;\n.timer off\n", encoding="utf-8")
        assert sh.feed([f".read {script}"], interactive=False) == 0
        assert "five" in out.getvalue() and "Run Time:" in out.getvalue()
    finally:
        dbd.close(con)
    with pytest.raises(DeepBaseError, match="no script file"):
        read_script(str(tmp_path / "nope.sql"))
    bad = tmp_path / "latin.sql"
    bad.write_bytes(b"SELECT '\xe9';\n")
    with pytest.raises(DeepBaseError, match="not UTF-8 text"):
        read_script(str(bad))
    r = shell(db, str(tmp_path / "nope.sql"))
    assert r.returncode == 2 and "no script file" in r.stderr and r.stderr.strip().count("\n") == 0


def test_statements_end_only_at_a_semicolon_outside_comments_and_quotes(db):
    """A ';' in a -- comment, a /* */ comment, a dollar-quoted string over lines or a quoted
    identifier does not end the statement (as in the DuckDB CLI); after 'SELECT ...; -- remark'
    the next line is a new statement or dot-command."""
    script = ("SELECT 1 -- note;\n+ 1 AS x;\n"
              "SELECT $$a;\nb$$ AS d, $t$ c; $t$ AS e, /* f; */ 'g;''h' AS \"i;j\";\n"
              "SELECT 42 AS answer; -- the answer\n"
              ".timer on\n"
              "SELECT 43 AS next;\n")
    r = shell(db, stdin=script)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    out = r.stdout
    assert "│     2 │" in out                               # 1 + 1, not 1 then a parser error
    assert "a;\\nb" in out and " c; " in out and "g;'h" in out and "i;j" in out
    assert "42" in out and "43" in out and "Run Time:" in out
    assert out.index("42") < out.index("43") < out.index("Run Time:")


def test_split_statements():
    from deepbase_duck.shell import split_statements
    assert split_statements("SELECT 1; -- done") == (["SELECT 1;"], False)
    assert split_statements("SELECT 1 -- no end;") == (["SELECT 1 -- no end;"], True)
    assert split_statements("SELECT 'a;\n") == (["SELECT 'a;\n"], True)
    assert split_statements("SELECT $x$ ; $x$;") == (["SELECT $x$ ; $x$;"], False)
    assert split_statements("SELECT E'it\\'s;';") == (["SELECT E'it\\'s;';"], False)
    assert split_statements("SELECT 1; /* only */ ;\n-- c\n") == (["SELECT 1;"], False)
    assert split_statements("/* open; ") == (["/* open; "], True)
    assert split_statements("-- only a comment") == ([], False)

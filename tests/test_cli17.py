"""A new user's walk through the CLI and the shell (round 17): what surprised, and what it should do.

The shell: Ctrl-C at a continuation prompt drops the statement typed so far (it was kept, and the
next statement failed as its continuation); a .read that reads itself is one line naming the loop
(it recursed until Python's limit and printed hundreds of lines); .timer times each statement;
.tables takes a LIKE pattern (an argument was silently ignored); output piped to `head` ends
quietly. The CLI: listings stay aligned with long names, export's non-empty folder names
--overwrite, add-dataset's missing text column names --column, inspect's '~u' rows of --baseline
are explained and --max-records 0 is named, and demo --no-keep points at no activation folder."""
from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli_usability import INSPECT, cli, store  # noqa: F401  (a file store: the planted model over TEXTS)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def shell(con, lines, interactive=False):
    from deepbase_duck.shell import Shell
    out, err = io.StringIO(), io.StringIO()
    rc = Shell(con, out, err).feed(lines, interactive=interactive)
    return rc, out.getvalue(), err.getvalue()


# -- the shell ------------------------------------------------------------------------------------

def test_a_read_that_reads_itself_is_one_line_naming_the_loop(con, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("loop.sql").write_text("SELECT 1 AS one;\n.read loop.sql\n")
    rc, out, err = shell(con, [".read loop.sql"])
    assert rc == 1
    lines = err.splitlines()
    assert "maximum recursion" not in err and len(lines) == 2, err[:500]
    assert "loop.sql -> loop.sql" in lines[0] and "being read already" in lines[0]
    assert lines[1] == "Error: .read loop.sql: stopped at the error above"
    # through another file, and from a script file given on the command line
    Path("a.sql").write_text(".read b.sql\n")
    Path("b.sql").write_text(".read a.sql\n")
    rc, out, err = shell(con, [".read a.sql"])
    assert rc == 1 and "(a.sql -> b.sql -> a.sql)" in err and len(err.splitlines()) == 2, err[:500]
    from deepbase_duck.shell import main
    errs = io.StringIO()
    monkeypatch.setattr(sys, "stderr", errs)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert main(None, None, "loop.sql", quiet=True) == 1
    assert "(loop.sql -> loop.sql)" in errs.getvalue() and len(errs.getvalue().splitlines()) == 1, errs.getvalue()


def test_a_nested_read_that_stops_says_so_once(con, tmp_path, monkeypatch):
    """The failing statement's error, then one 'stopped' line (for the .read typed), not one per
    level of nesting."""
    monkeypatch.chdir(tmp_path)
    Path("inner.sql").write_text("SELECT 1 AS one;\nSELECT no_such_column;\nSELECT 2 AS never;\n")
    Path("outer.sql").write_text(".read inner.sql\nSELECT 3 AS never;\n")
    rc, out, err = shell(con, [".read outer.sql"])
    assert rc == 1 and "one" in out and "never" not in out
    lines = err.splitlines()
    assert len(lines) == 2 and "no_such_column" in lines[0], err
    assert lines[1] == "Error: .read outer.sql: stopped at the error above"
    # a script given on the command line that .reads the failing file: it says which .read stopped
    from deepbase_duck.shell import main
    errs = io.StringIO()
    monkeypatch.setattr(sys, "stderr", errs)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert main(None, None, "outer.sql", quiet=True) == 1
    lines = errs.getvalue().splitlines()
    assert len(lines) == 2 and lines[1] == "Error: .read inner.sql: stopped at the error above", lines


def test_timer_prints_each_statements_time(con):
    rc, out, err = shell(con, [".timer on", "SELECT 1 AS a; SELECT 2 AS b;"])
    assert rc == 0, err
    assert out.count("Run Time:") == 2, out
    assert out.index("Run Time:") < out.index(" b ")        # the first one's time comes before the second's table


def test_tables_takes_a_like_pattern(con):
    con.sql("CREATE TABLE my_notes (x INTEGER)")
    rc, out, err = shell(con, [".tables my_%"])
    assert rc == 0, err
    assert out.split() == ["my_notes"]
    rc, out, err = shell(con, [".tables"])
    assert "my_notes" in out.split() and "scores" in out.split()
    rc, out, err = shell(con, [".tables a b"])
    assert rc == 1 and "at most one LIKE pattern" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal as the controlling terminal")
def test_ctrl_c_at_a_continuation_prompt_drops_the_unfinished_statement(tmp_path):
    """As in the DuckDB CLI: 'SELECT 1' then Ctrl-C at the '· ' prompt, then a whole statement:
    that statement runs on its own (it was appended to 'SELECT 1' and failed to parse)."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))

    def controlling_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    env = dict(os.environ, HOME=str(tmp_path))          # the shell's history file goes there
    p = subprocess.Popen([sys.executable, "-m", "deepbase_duck", "--quiet", "shell"], stdin=slave, stdout=slave,
                         stderr=slave, cwd=ROOT, env=env, preexec_fn=controlling_terminal)
    os.close(slave)
    seen = b""

    def until(text: bytes, timeout=120):
        nonlocal seen
        end = time.time() + timeout
        while text not in seen and time.time() < end:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        assert text in seen, seen.decode(errors="replace")

    try:
        until(b"D ")
        os.write(master, b"SELECT 1\n")
        until("· ".encode())
        os.write(master, b"\x03")
        until(b"^C\r\nD ")
        os.write(master, b"SELECT 2 AS two;\n")
        until("│     2 │".encode(), timeout=30)     # its result (the echo of the line holds 'two' too)
        os.write(master, b".quit\n")
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert "Error" not in text, text


def test_shell_output_piped_to_a_reader_that_went_away_ends_quietly(tmp_path):
    """`deepbase-duck shell STORE -c '...' | head -1`: the statements' output going nowhere is no
    error of theirs (it printed 'Error: [Errno 32] Broken pipe' and exited 1), as for the other
    commands, which end with status 0 and nothing on stderr."""
    p = subprocess.Popen([sys.executable, "-m", "deepbase_duck", "--quiet", "shell", "-c",
                          "SELECT * FROM range(5); SELECT 2 AS two;"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.close()                              # the reader is gone before the shell prints anything
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0, err
    assert "Broken pipe" not in err and "Error" not in err, err


# -- the command line -----------------------------------------------------------------------------

def test_listings_stay_aligned_with_long_names(store, capsys, tmp_path):
    long_name = "a_rather_long_hypothesis_name"
    rc, out, err = cli(capsys, "define-hypothesis", store, long_name, "zz+")
    assert rc == 0, err
    try:
        rc, out, err = cli(capsys, "hypotheses", store)
        assert rc == 0, err
        kinds = {line.split()[0]: line.index(line.split()[1]) for line in out.splitlines()}
        assert long_name in kinds and len(set(kinds.values())) == 1, out     # every kind in one column
        rc, out, err = cli(capsys, "export", store, str(tmp_path / "bi"))
        assert rc == 0, err
        starts = {line.split()[0]: line.index(line.split()[1]) for line in out.splitlines()}
        assert "hypothesis_definitions" in starts and len(set(starts.values())) == 1, out
    finally:
        assert cli(capsys, "drop-hypothesis", store, long_name)[0] == 0


def test_export_into_a_non_empty_folder_names_the_flag(store, capsys, tmp_path):
    (tmp_path / "bi").mkdir()
    (tmp_path / "bi" / "old.txt").write_text("x")
    rc, out, err = cli(capsys, "export", store, str(tmp_path / "bi"))
    assert rc == 2 and "pass --overwrite" in err and "overwrite=True" not in err, err


@pytest.mark.parametrize("name,text,flags,hint", [
    ("t.csv", "id,body\n1,x = 1\n", [], "--column names the column holding the text (without --column the text is "
                                        "read from the column 'text')"),
    ("t.jsonl", '{"body": "x = 1"}\n', [], "--column names the key holding the text"),
    ("t.csv", "id,body\n1,x = 1\n", ["--column", "body", "--source-column", "file"],
     "--source-column names the column holding each record's source"),
])
def test_add_dataset_without_the_text_column_names_the_flag(tmp_path, capsys, name, text, flags, hint):
    path = tmp_path / name
    path.write_text(text)
    rc, out, err = cli(capsys, "add-dataset", str(tmp_path / "d.duckdb"), "mine", str(path), *flags)
    assert rc == 2 and hint in err and "with column" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d.duckdb").exists()                 # refused before a store was made


def test_inspect_baseline_explains_its_u_rows(store, capsys):
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", "--baseline", "--top", "1")
    assert rc == 0, err
    assert "planted~u" in out
    assert "~u: the layer of the model's untrained (re-initialised) copy" in out
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", "--top", "1")
    assert rc == 0 and "~u" not in out, out



def test_demo_with_no_keep_does_not_point_at_an_activation_folder(tmp_path, capsys):
    db = tmp_path / "demo.duckdb"
    rc, out, err = cli(capsys, "demo", "--store", str(db), "--chars", "2000", "--no-keep", "--top", "1")
    assert rc == 0, err
    assert not Path(f"{db}.acts").exists() or not any(Path(f"{db}.acts").rglob("*.parquet"))
    assert f"{db}.acts" not in out and "activations not stored: --no-keep" in out, out
    assert any((tmp_path / "scores_parquet").rglob("*.parquet"))


def test_inspect_max_records_zero_names_the_flag(store, capsys):
    """It said 'no records selected from dataset ...', which named no flag."""
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", "--max-records", "0")
    assert rc == 2 and "--max-records 0 selects no record" in err and "leave it out" in err, err


def test_inspect_control_without_the_probe_says_which_flag_adds_it(store, capsys):
    """'--control needs the 'probe' measure' named no flag that adds it."""
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", "--control")
    assert rc == 2 and "--control needs the 'probe' measure (--measures probe)" in err, err

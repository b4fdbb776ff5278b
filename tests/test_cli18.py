"""The command line (round 18): messages name what the user typed (define-hypothesis'
--flags, the commands define-hypothesis and drop-hypothesis, export's inspect --keep-activations);
report --query with a --model or --dataset it is not of is refused (both were silently ignored);
Ctrl-C during a shell script ends it with status 130 and one line, as during the other commands."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import deepbase_duck as dbd

from conftest import TEXTS
from test_cli_usability import cli, store  # noqa: F401  (a file store: the planted model over TEXTS)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def test_define_and_drop_hypothesis_errors_name_the_commands_and_flags(tmp_path, capsys):
    """Their messages named the library's calls and parameter (define_hypothesis, drop_hypothesis,
    'flags:', SQL's define_hypothesis('x', pattern, replace := true)), none of which a CLI user
    typed or can type."""
    db = str(tmp_path / "s.duckdb")
    # the labels of a Python hypothesis, stored by another process (this one does not know it)
    subprocess.run([sys.executable, "-c", f"""
import deepbase_duck as dbd
@dbd.hypothesis("cli18_python_h", kind="binary")
def first_char(text):
    return [(0, 1)]
con = dbd.connect({db!r}, progress=False)
dbd.add_dataset(con, "d", ["x = 1", "y = 2"])
dbd.annotate(con, ["cli18_python_h"], "d")
dbd.close(con)
"""], check=True, cwd=ROOT, timeout=300)
    rc, out, err = cli(capsys, "define-hypothesis", db, "cli18_rx", "[0-9]+", "--flags", "q")
    assert rc == 2 and "--flags: unknown flag(s) 'q'" in err, err
    rc, out, err = cli(capsys, "drop-hypothesis", db, "digit")
    assert rc == 2 and "drop-hypothesis drops what define-hypothesis stored" in err, err
    rc, out, err = cli(capsys, "drop-hypothesis", db, "cli18_python_h")
    assert rc == 2 and "(define-hypothesis STORE 'cli18_python_h' PATTERN --replace defines the name" in err, err
    rc, out, err = cli(capsys, "define-hypothesis", db, "digit", "x")
    # (the command named once, round 19: 'define-hypothesis: error: define-hypothesis: the name ...')
    assert rc == 2 and "define-hypothesis: error: the name 'digit' is a built-in" in err, err
    for rc, out, err in (cli(capsys, "drop-hypothesis", db, "cli18_python_h"), cli(capsys, "drop-hypothesis", db, "digit"),
                         cli(capsys, "define-hypothesis", db, "digit", "x")):
        assert "_hypothesis" not in err and "replace :=" not in err and err.count("\n") == 1, err
    # what the message says to do works
    rc, out, err = cli(capsys, "define-hypothesis", db, "cli18_python_h", "[0-9]+", "--replace")
    assert rc == 0 and "cli18_python_h: binary hypothesis" in out, err


def test_export_without_activations_names_the_inspect_flag(store, tmp_path, capsys):
    """The export's note said 'inspect with keep_activations=True', the Python keyword."""
    rc, out, err = cli(capsys, "export", store, str(tmp_path / "bi"), "--activations")
    note = [line for line in out.splitlines() if line.startswith("notes")]
    assert rc == 0 and note, out
    assert "inspect --keep-activations" in note[0] and "keep_activations=True" not in note[0]


def test_report_query_of_another_model_or_dataset_is_refused(tmp_path, capsys):
    """`report --query 1 --model other` wrote the report of query 1 (of model planted) as if
    --model were not there; a --query that is of the model and dataset named still reports."""
    db = str(tmp_path / "s.duckdb")
    con = dbd.connect(db, progress=False)
    try:
        dbd.register_model(con, "planted", "ray_models:planted")
        dbd.register_model(con, "other", "ray_models:planted")
        dbd.add_dataset(con, "snippets", TEXTS)
        dbd.add_dataset(con, "more", TEXTS[:3])
        dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", device="cpu")                # query 1
        dbd.inspect(con, "other", ["planted"], ["digit"], "more", device="cpu")                      # query 2
    finally:
        dbd.close(con)
    html = tmp_path / "r.html"
    rc, out, err = cli(capsys, "report", db, "--query", "1", "--model", "other", "--out", str(html))
    assert rc == 2 and not html.exists(), out
    assert "--query 1 is a query of model 'planted', not --model 'other'" in err and err.count("\n") == 1, err
    rc, out, err = cli(capsys, "report", db, "--query", "1", "--dataset", "more", "--out", str(html))
    assert rc == 2 and "--query 1 is a query over dataset 'snippets', not --dataset 'more'" in err, err
    rc, out, err = cli(capsys, "report", db, "--query", "1", "--model", "planted", "--dataset", "snippets",
                       "--out", str(html))
    assert rc == 0 and "report of query 1" in out, err
    rc, out, err = cli(capsys, "report", db, "--model", "other", "--out", str(html))     # without --query: as before
    assert rc == 0 and "report of query 2" in out, err


def test_ctrl_c_during_a_shell_script_exits_130_with_one_line(tmp_path):
    """`deepbase-duck shell STORE -c "...inspect(...)"` and Ctrl-C: it printed 'Error: ... Query
    interrupted' and exited 1, as if a statement had failed; now one line and status 130, as the
    other commands, and the interrupted scan stored nothing."""
    db = str(tmp_path / "slow.duckdb")
    con = dbd.connect(db, progress=False)
    try:
        dbd.register_model(con, "slow", "ray_models:slow_planted", {"delay": 0.3})
        dbd.add_dataset(con, "snippets", TEXTS)
    finally:
        dbd.close(con)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-u", "-m", "deepbase_duck", "--quiet", "shell", db, "-c",
                          "SELECT 'started' AS s; SELECT count(*) FROM inspect('slow', ['planted'], ['digit'], "
                          "'snippets', batch_size := 1);"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        seen, deadline = "", time.time() + 120
        while "started" not in seen.split("│ s ")[-1]:           # the first statement's result is out
            line = p.stdout.readline()
            assert line and time.time() < deadline, "the shell ended before its first result"
            seen += line
        time.sleep(1.5)                                           # the scan is under way (24 passes of 0.3 s)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert err.strip() == "deepbase-duck shell: interrupted; stored work is kept and a re-run resumes", err
    con = dbd.connect(db, progress=False)
    try:
        assert con.sql("SELECT count(*) FROM queries").fetchall() == [(0,)]
    finally:
        dbd.close(con)


def test_inspect_with_permutations_shows_their_p_values(store, capsys):
    """--permutations N computed a p-value per unit score that the printed table left out (it is
    in scores.detail only): the flag's result never reached the terminal. The table now has a
    'perm p' column, each value the stored one; without the flag the table is as before."""
    import json
    import re
    from test_cli_usability import INSPECT
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", "--permutations", "19",
                       "--top", "3", "--no-reuse")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].endswith("sep   perm p"), lines[0]
    qid = int(re.search(r"^query (\d+)", out, re.M).group(1))
    con = dbd.connect(store, progress=False)
    try:
        stored = {unit: json.loads(detail)["perm_p_value"] for unit, detail in con.sql(
            "SELECT unit, detail FROM scores WHERE query_id = ? AND hypothesis = 'digit' AND measure = 'corr'",
            params=[qid]).fetchall()}
    finally:
        dbd.close(con)
    rows = [line for line in lines[2:] if re.match(r"^(digit)?\s+planted\s", line)]
    assert len(rows) == 3
    for line in rows:
        words = line.split()
        unit, p = int(words[words.index("planted") + 1]), float(words[-1])
        assert p == pytest.approx(stored[unit], rel=1e-2) and 1 / 20 <= p <= 1, line
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", "--top", "3")
    assert rc == 0 and "perm p" not in out and out.splitlines()[0].endswith("  sep"), out


@pytest.mark.parametrize("name,flags,named,leave", [
    ("lines.txt", ["--column", "body"], "error: --column body names a column or key",
     "leave --column out, or give --format, the format the file is in"),
    ("lines.txt", ["--source-column", "my id"], "error: --source-column my id names a column",
     "leave --source-column out, or give --format, the format the file is in"),
    ("lines.txt", ["--glob", "*.py"], "error: --glob *.py picks the files of a folder", "leave --glob out"),
    ("notes.xyz", [], "cannot tell the format (--format) from the suffix '.xyz'", None),
])
def test_add_dataset_refusals_name_its_flags(tmp_path, capsys, name, flags, named, leave):
    """The reader's refusal of a flag the file's format has no use for said "column 'body'
    (add-dataset --column body) ... leave column out": a parameter name beside the flag, and an
    instruction to leave out what the user cannot type; a suffix it cannot read said 'give one
    of lines, ...' without naming --format."""
    f = tmp_path / name
    f.write_text("a b\nc d\n")
    db = tmp_path / "new.duckdb"
    rc, out, err = cli(capsys, "add-dataset", str(db), "d", str(f), *flags)
    assert rc == 2 and named in err and err.count("\n") == 1, err
    if leave:
        assert leave in err, err
        assert "(add-dataset" not in err and "leave column" not in err and "leave pattern" not in err, err
    assert not db.exists()

"""The command line's start-up and flags: Ctrl-C while the libraries are still importing,
--help without torch, and flags that only act with another one, refused instead of ignored."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import deepbase_duck as dbd

from test_cli_usability import store  # noqa: F401  (a file store: the planted model over TEXTS)

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def cli(capsys, *argv):
    from deepbase_duck.cli import main
    capsys.readouterr()
    rc = main(["--quiet", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err




# -- start-up ---------------------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_ctrl_c_while_torch_imports_exits_130_with_one_line(tmp_path):
    """A Ctrl-C that lands while torch is being imported (the first seconds of any command) ends
    the command with one line and status 130, not a KeyboardInterrupt traceback."""
    p = subprocess.Popen([sys.executable, "-m", "deepbase_duck", "--quiet", "register-model",
                          str(tmp_path / "s.duckdb"), "m", "deepbase_duck.models.zoo:charlstm"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 60
        while "libtorch" not in Path(f"/proc/{p.pid}/maps").read_text():   # torch's import has begun
            assert p.poll() is None and time.time() < deadline, "the command ended before torch was imported"
            time.sleep(0.002)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "interrupted" in err, err


def test_help_and_the_package_import_do_not_load_torch():
    """`deepbase-duck --help`, `COMMAND --help` and `import deepbase_duck` load neither torch nor
    duckdb (before: 1.6-2.2 s of imports for --help); the library loads them on first use."""
    r = run_python("import sys, contextlib, io\n"
                   "import deepbase_duck\n"
                   "from deepbase_duck.cli import main\n"
                   "for argv in (['--help'], ['inspect', '--help'], ['--version']):\n"
                   "    with contextlib.redirect_stdout(io.StringIO()):\n"
                   "        try:\n"
                   "            main(argv)\n"
                   "        except SystemExit as e:\n"
                   "            assert e.code == 0, argv\n"
                   "print(sorted(m for m in ('torch', 'duckdb', 'pyarrow', 'scipy') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_library_api_loads_on_first_use():
    """The lazy package keeps its API: every name of __all__ (and the former module-level names)
    resolves, and dbd.inspect runs after dbd.connect."""
    r = run_python("import deepbase_duck as dbd\n"
                   "assert all(getattr(dbd, n) is not None for n in dbd.__all__)\n"
                   "assert dbd.store.__name__ == 'deepbase_duck.store' and callable(dbd.session_of)\n"
                   "assert set(dbd.__all__) <= set(dir(dbd))\n"
                   "from deepbase_duck import CharAdapter, hypothesis, report\n"
                   "con = dbd.connect(None, progress=False)\n"
                   "dbd.add_dataset(con, 'd', ['x = 1  # c', 'y = \\'s\\''])\n"
                   "print(dbd.annotate(con, ['in_string'], 'd')[0]['labeled'], dbd.get_hypothesis('in_string').kind)\n"
                   "try:\n"
                   "    dbd.nope\n"
                   "except AttributeError as e:\n"
                   "    print(e)\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["2 binary", "module 'deepbase_duck' has no attribute 'nope'"]


def test_constants_spelled_out_for_a_light_import_match_the_engine():
    import inspect
    from deepbase_duck.cli import MEASURE_NAMES
    from deepbase_duck.engine.memory import ONEDNN_CACHE_CAPACITY, SCAN_MEMORY_LIMIT
    from deepbase_duck.inspectors import MEASURES
    assert list(MEASURE_NAMES) == sorted(MEASURES)
    assert inspect.signature(dbd.connect).parameters["scan_memory_limit"].default == SCAN_MEMORY_LIMIT
    r = subprocess.run([sys.executable, "-c", "import deepbase_duck, os; "
                        "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"], capture_output=True, text=True,
                       cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"},
                       timeout=120)
    assert r.stdout.strip() == ONEDNN_CACHE_CAPACITY


# -- flags accepted but ignored ---------------------------------------------------------------

INSPECT = ["planted", "snippets", "--layers", "planted", "--hypotheses", "digit", "--device", "cpu", "--top", "1"]


def test_inspect_refuses_dtype_without_keep_activations(store, capsys):
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--dtype", "float16")
    assert rc == 2 and "--dtype float16" in err and "--keep-activations" in err, err
    assert len(err.strip().splitlines()) == 1 and out == ""


def test_inspect_refuses_seed_without_a_progressive_rule(store, capsys):
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--seed", "3")
    assert rc == 2 and "--seed 3" in err and "--max-error, --top-k or --plateau-tol" in err, err
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--seed", "3", "--top-k", "1", "--max-records", "3")
    assert rc == 0, err
    con = dbd.connect(store, progress=False)
    try:
        params = con.sql("SELECT params->>'seed' FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0]
    finally:
        dbd.close(con)
    assert params == "3"


@pytest.mark.parametrize("name,text,flags,culprit", [
    ("lines.txt", "a b\nc d\n", ["--column", "body"], "--column body"),
    ("lines.txt", "a b\nc d\n", ["--source-column", "id"], "--source-column id"),
    ("lines.txt", "a b\nc d\n", ["--glob", "*.py"], "--glob *.py"),
])
def test_add_dataset_refuses_flags_its_format_has_no_use_for(tmp_path, capsys, name, text, flags, culprit):
    f = tmp_path / name
    f.write_text(text)
    db = tmp_path / "new.duckdb"
    rc, out, err = cli(capsys, "add-dataset", str(db), "d", str(f), *flags)
    assert rc == 2 and culprit in err and "'lines'" in err, err
    assert not db.exists()                        # refused before a store was created


def test_add_dataset_takes_column_flags_of_a_table(tmp_path, capsys):
    f = tmp_path / "r.csv"
    f.write_text("id,body\n1,great film\n2,bad plot\n")
    db = tmp_path / "new.duckdb"
    rc, out, err = cli(capsys, "add-dataset", str(db), "d", str(f), "--column", "body", "--source-column", "id")
    assert rc == 0 and "d: 2 records (csv" in out, err


# -- closed streams -----------------------------------------------------------------------------

def run_closed(fd: int, *argv) -> subprocess.CompletedProcess:
    """The command run with file descriptor ``fd`` (1: stdout, 2: stderr) closed, as `>&-` or
    `2>&-` leave it; the other stream captured."""
    keep = {1: "stderr", 2: "stdout"}[fd]
    return subprocess.run([sys.executable, "-m", "deepbase_duck", "--quiet", *argv], cwd=ROOT, timeout=120,
                          preexec_fn=lambda: os.close(fd), text=True,
                          **{keep: subprocess.PIPE})


def test_an_error_with_stderr_closed_does_not_go_to_stdout(tmp_path):
    r = run_closed(2, "annotate", str(tmp_path / "none.duckdb"), "d", "in_string")
    assert r.returncode == 2 and r.stdout == ""


def test_shell_with_stdout_closed_runs_its_statements(tmp_path):
    db = tmp_path / "s.duckdb"
    r = run_closed(1, "shell", "--create", str(db), "-c", "CREATE TABLE t AS SELECT 42 AS x; SELECT * FROM t;")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    con = dbd.connect(str(db), progress=False)
    try:
        assert con.sql("SELECT x FROM t").fetchall() == [(42,)]
    finally:
        dbd.close(con)

"""The README's SQL session and the command line, run for real (small sizes)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


import deepbase_duck as dbd
from deepbase_duck.corpora.code import statement_chunks

ROOT = Path(__file__).resolve().parent.parent


def test_readme_sql_session_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## A query in SQL\s+```python\n(.*?)```", text, re.S).group(1)
    block = block.replace('"study.duckdb"', repr(str(tmp_path / "study.duckdb")))
    block = block.replace("limit_chars := 50000", "limit_chars := 3000")
    out = {}
    exec(compile(block, "README", "exec"), out)
    con = out["con"]
    assert con.sql("SELECT count(*) FROM scores").fetchall()[0][0] > 0
    dbd.close(con)


def test_statement_chunks_concatenate_and_tokenize():
    src = ("import os\n\n\nclass A:\n    '''doc\n    string'''\n\n    def f(self):\n        return (1,\n"
           "                2)\n\n    def g(self):\n        # c\n        return 3\n\n\nx = [\n    1,\n]\n") * 20
    chunks = statement_chunks(src, 120)
    assert "".join(c for _, c in chunks) == src
    assert all(len(c) <= 120 for _, c in chunks)
    assert [o for o, _ in chunks] == sorted(o for o, _ in chunks)
    # no chunk starts inside the docstring or the bracketed expressions
    for _, c in chunks:
        assert not c.lstrip(" ").startswith(("string'''", "2)", "1,\n]"))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "deepbase_duck", "--quiet", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_cli_commands_mirror_the_library(tmp_path):
    db = str(tmp_path / "cli.duckdb")
    r = run_cli("register-model", db, "lm", "deepbase_duck.models.zoo:charlstm", "--params", '{"checkpoint": "step0"}')
    assert r.returncode == 0, r.stderr
    assert run_cli("add-stdlib", db, "code", "--chars", "4000").returncode == 0
    r = run_cli("annotate", db, "code", "in_string", "in_comment")
    assert r.returncode == 0 and "in_string:" in r.stdout
    r = run_cli("extract", db, "lm", "code", "lstm0", "--dtype", "float16")
    assert r.returncode == 0 and "records extracted" in r.stdout, r.stderr
    r = run_cli("inspect", db, "lm", "code", "--layers", "lstm0", "--hypotheses", "in_string", "--top", "2",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "in_string" in r.stdout and "lstm0" in r.stdout
    r = run_cli("inspect", db, "lm", "code", "--layers", "lstm0", "--hypotheses", "in_string", "--max-error", "0.01",
                "--device", "cpu")                     # a few records: the bound cannot be met
    assert r.returncode == 0, r.stderr
    n = dbd_records(db, "code")
    assert f"early stopping (max_error): every record was read ({n} of {n}; the rule held at no earlier window)" \
        in r.stdout
    assert "so the scores and intervals are the full scan's, whose largest half-width is " in r.stdout
    r = run_cli("inspect", db, "lm", "code", "--layers", "lstm0", "--hypotheses", "in_string", "--max-error", "0.01",
                "--device", "cpu")
    assert r.returncode == 0 and "reused, nothing scanned" in r.stdout, r.stdout
    r = run_cli("inspect", db, "lm", "code", "--layers", "lstm0", "--hypotheses", "in_string", "--top-k", "2",
                "--stable-windows", "7", "--batch-size", "1", "--device", "cpu")
    assert r.returncode == 0 and "early stopping (top_k)" in r.stdout, r.stderr
    con = dbd.connect(db, progress=False)
    try:
        assert con.execute("SELECT params->>'stable_windows' FROM queries ORDER BY query_id DESC LIMIT 1"
                           ).fetchall() == [("7",)]
    finally:
        dbd.close(con)
    r = run_cli("inspect", db, "lm", "code", "--layers", "lstm0", "--hypotheses", "in_string", "--device", "gpu")
    assert r.returncode == 2 and "unknown device 'gpu'" in r.stderr


def dbd_records(db: str, dataset: str) -> int:
    con = dbd.connect(db, progress=False)
    try:
        return con.execute("SELECT count(*) FROM records WHERE dataset = ?", [dataset]).fetchall()[0][0]
    finally:
        dbd.close(con)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    db = str(tmp_path / "bad.duckdb")
    r = run_cli("inspect", db, "nomodel", "nodata", "--layers", "x", "--hypotheses", "in_string")
    assert r.returncode == 2 and "no store at" in r.stderr and not (tmp_path / "bad.duckdb").exists()
    dbd.close(dbd.connect(db, progress=False))
    r = run_cli("inspect", db, "nomodel", "nodata", "--layers", "x", "--hypotheses", "in_string")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "unknown dataset 'nodata'" in r.stderr or "unknown model 'nomodel'" in r.stderr
    r = run_cli("hypotheses")
    assert r.returncode == 0 and "in_comment" in r.stdout


def test_readme_report_session_runs(tmp_path, monkeypatch):
    """The five lines of README's Reports section, run as written in a folder holding a small
    stand-in for the demo's store (same model, dataset name and stored activations, 3k chars)."""
    import torch
    from deepbase_duck.corpora.code import code_records
    torch.set_num_threads(1)
    block = re.search(r"## Reports.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) == 5
    monkeypatch.chdir(tmp_path)
    con = dbd.connect("deepbase_demo/demo.duckdb", progress=False)
    dbd.register_model(con, "charlstm", "deepbase_duck.models.zoo:charlstm", {"checkpoint": "final"})
    dbd.add_dataset(con, "stdlib_heldout_150000", code_records("heldout", max_chars=2000, limit_chars=3000))
    dbd.inspect(con, "charlstm", ["lstm0", "lstm1"], ["in_string", "in_comment"], "stdlib_heldout_150000",
                keep_activations=True, dtype="float16")
    dbd.close(con)
    out = {}
    exec(compile(block, "README", "exec"), out)
    con = out["con"]
    assert con.sql("SELECT count(*) FROM scores WHERE measure = 'probe' AND query_id = 2").fetchall() == [(6,)]
    doc = (tmp_path / "report.html").read_text()
    for sid in ("summary", "heatmap", "hypotheses", "probes", "activations"):
        assert f'<section id="{sid}">' in doc
    assert "query 2" in doc and '<pre class="acts">' in doc and "are not stored" not in doc
    dbd.close(con)


def test_ci_runs_the_readme_test_command():
    """.ci/run runs exactly README's test command (pip's -q aside), so CI checks what users run."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    setup = [b.strip() for b in blocks if "pytest" in b]
    assert len(setup) == 1, setup
    ci = (ROOT / ".ci" / "run").read_text().replace(" -q -e", " -e").replace("install -q ", "install ")
    assert setup[0] in ci


def test_scan_summary_lines():
    from deepbase_duck.cli import scan_summary
    assert scan_summary({"max_error": None, "top_k": None, "plateau_tol": None, "reused": {}}) == []
    assert scan_summary({"max_error": 0.1, "stopped_early": True, "stop_rule": "max_error", "records_used": 176,
                         "record_count": 7730, "bound_reached": 0.0987, "reused": {"scores_of_query": None}}) == \
        ["early stopping (max_error): stopped after 176 of 7730 records; largest error bound 0.099"]
    assert scan_summary({"top_k": 10, "plateau_tol": 0.01, "stopped_early": False, "records_used": 50,
                         "record_count": 50, "bound_reached": None, "reused": {}}) == \
        ["early stopping (top_k, plateau): every record was read (50 of 50; the stop rules were not met before the last window), "
         "so the scores and intervals are the full scan's"]
    assert scan_summary({"max_error": 0.1, "reused": {"scores_of_query": 4}}) == \
        ["scores of the identical query 4 reused, nothing scanned (--no-reuse scans again)"]


def test_cli_add_dataset_names_its_replace_flag(tmp_path, capsys):
    """Other texts under a stored dataset's name: the CLI says --replace (its flag), not the
    library's replace=True, and --replace then replaces them."""
    from deepbase_duck.cli import main
    db = str(tmp_path / "s.duckdb")
    first, other = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("x = 1\ny = 2\n")
    other.write_text("z = 3\n")
    assert main(["--quiet", "add-dataset", db, "d", str(first)]) == 0
    capsys.readouterr()
    assert main(["--quiet", "add-dataset", db, "d", str(other)]) == 2
    err = capsys.readouterr().err
    assert "dataset 'd' already exists with different records; add --replace" in err
    assert "replace=True" not in err and err.strip().count("\n") == 0
    assert main(["--quiet", "add-dataset", db, "d", str(other), "--replace"]) == 0
    assert dbd_records(db, "d") == 1


def test_cli_register_model_bad_params_are_one_line_and_create_no_store(tmp_path, capsys):
    """Bad JSON, JSON that is not an object, and an error of the loader itself (an unknown
    checkpoint, an unknown keyword): exit 2, one line naming it, no store file left behind; an
    existing store keeps its models."""
    from deepbase_duck.cli import main
    db = tmp_path / "s.duckdb"
    loader = "deepbase_duck.models.zoo:charlstm"
    for params, message in [("{bad", "--params is not valid JSON"), ("[1]", "--params must be a JSON object"),
                            ('{"checkpoint": "nope"}', "ValueError: unknown CharLSTM checkpoint 'nope'"),
                            ('{"nope": 1}', "TypeError:")]:
        assert main(["--quiet", "register-model", str(db), "lm", loader, "--params", params]) == 2
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, err
        assert list(tmp_path.iterdir()) == []
    assert main(["--quiet", "register-model", str(db), "lm", loader, "--params", '{"checkpoint": "step0"}']) == 0
    assert main(["--quiet", "register-model", str(db), "lm2", loader, "--params", '{"checkpoint": "nope"}']) == 2
    con = dbd.connect(str(db), progress=False)
    try:
        assert con.sql("SELECT name FROM models").fetchall() == [("lm",)]
    finally:
        dbd.close(con)


def test_demo_writes_into_a_folder_with_a_quote(tmp_path):
    store = tmp_path / "it's here" / "demo.duckdb"
    r = run_cli("demo", "--store", str(store), "--chars", "3000", "--no-keep")
    assert r.returncode == 0, r.stderr
    out = store.parent / "scores_parquet"
    assert f"scores as Parquet: {out}/" in r.stdout
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet")) == [
        "model=charlstm/layer=lstm0/data_0.parquet", "model=charlstm/layer=lstm1/data_0.parquet"]


def test_readme_own_model_section_runs_as_written(tmp_path, monkeypatch):
    """'Your own model': mymodel.py as written, the session as written (in a folder holding
    both), and the loader-spec route of its comment: the same model (checksum) by either."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"## Your own model\n(.*?)\n## ", text, re.S).group(1)
    module, session = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    assert module.startswith("# mymodel.py\n")
    (tmp_path / "mymodel.py").write_text(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mymodel", raising=False)
    out = {}
    exec(compile(session, "README", "exec"), out)
    con = out["con"]
    rows = con.sql("SELECT hypothesis, rank, layer FROM top_units(k := 2)").fetchall()
    assert sorted((h, k) for h, k, _ in rows) == [(h, k) for h in ("in_comment", "in_string") for k in (1, 2)]
    spec = re.search(r'# (dbd\.register_model\(con, "gru", "mymodel:load".*?\))', session).group(1)
    exec(compile(spec.replace('"gru"', '"gru_by_spec"'), "README", "exec"), out)
    checksums = dict(con.sql("SELECT name, checksum FROM models").fetchall())
    assert checksums["gru_by_spec"] == checksums["gru"]
    dbd.close(con)

"""A new user's walkthrough of the CLI, the Python API's keywords, the report's query choice and
the shell's batch errors: what each printed, and what it should."""
from __future__ import annotations

import argparse
import io
import json

import pytest

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError, UnknownNameError

from conftest import TEXTS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A file store the CLI can open: the planted model (by its loader spec) over TEXTS."""
    db = str(tmp_path_factory.mktemp("cli") / "study.duckdb")
    con = dbd.connect(db, progress=False)
    try:
        dbd.register_model(con, "planted", "ray_models:planted")
        dbd.add_dataset(con, "snippets", TEXTS)
    finally:
        dbd.close(con)
    return db


def cli(capsys, *argv):
    from deepbase_duck.cli import main
    capsys.readouterr()
    rc = main(["--quiet", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def last_params(db) -> dict:
    con = dbd.connect(db, progress=False)
    try:
        return json.loads(con.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    finally:
        dbd.close(con)


INSPECT = ["planted", "snippets", "--layers", "planted", "--device", "cpu"]


# -- 1. the probe's layer-level results ---------------------------------------------------------

def test_inspect_prints_the_probes_held_out_accuracy_in_a_table_of_its_own(store, capsys):
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", "bracket_depth",
                       "--measures", "corr", "probe", "--top", "2")
    assert rc == 0, err
    units, probes = out.split("Probes (layer level)")
    # the unit table: every row's columns line up under the header's, probe_weight rows included
    lines = units.strip().splitlines()
    head = lines[0]
    rows = lines[2:next(i for i, ln in enumerate(lines) if ln.startswith("n: "))]
    assert any("[probe_weight]" in ln for ln in rows) and len(rows) == 8
    at = head.index("layer")
    assert all(ln[at:].split()[0] == "planted" for ln in rows), units
    unit_at = head.index("unit") + len("unit")
    assert all(ln[:unit_at].split()[-1].isdigit() for ln in rows)
    assert "n: the probe's training symbols" in units          # what n is for probe_weight
    # the layer-level table: accuracy with its interval, the majority rate and n
    assert "majority" in probes and "n test" in probes and "n train" in probes
    digit = [ln for ln in probes.splitlines() if "all units" in ln and "accuracy" in ln]
    assert len(digit) == 1 and digit[0].startswith("digit")
    fields = digit[0].split()
    acc, lo, hi = float(fields[5]), float(fields[6].strip("[,")), float(fields[7].strip("]"))
    majority = float(fields[8])
    assert lo <= acc <= hi and 0.5 <= majority < 1
    assert any("top 1 unit " in ln for ln in probes.splitlines())     # probe_topk rows, singular for k = 1
    assert any(ln.startswith("bracket_depth") and "r2" in ln for ln in probes.splitlines())


def test_probe_table_holds_selectivity_with_control(store, capsys):
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", "--measures", "probe",
                       "--control", "--top", "1")
    assert rc == 0, err
    rows = [ln.split() for ln in out.split("Probes (layer level)")[1].splitlines()]
    assert ["digit", "planted", "all", "units", "accuracy"] in [r[:5] for r in rows]
    assert any(r[:2] == ["planted", "selectivity"] for r in rows)


# -- 2. keyword typos in Python ------------------------------------------------------------------

def test_python_keyword_typos_name_the_closest_option(planted):
    for kw, want in [({"max_eror": 0.1}, "max_error"), ({"keep_activation": True}, "keep_activations"),
                     ({"batchsize": 4}, "batch_size"), ({"cor": {}}, "corr")]:
        with pytest.raises(DeepBaseError, match=rf"unknown keyword '{list(kw)[0]}' \(did you mean {want}\?\)") as exc:
            dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", **kw)
        assert isinstance(exc.value, TypeError)                 # as Python's own unknown keyword
    with pytest.raises(TypeError, match=r"unknown keyword 'zzz'; options: .*max_records.*measure name"):
        dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", zzz=1)
    assert planted.sql("SELECT count(*) FROM queries").fetchall() == [(0,)]


def test_max_records_is_limit_by_its_sql_and_cli_name(planted):
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", max_records=3)
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", limit=3)
    assert planted.sql("SELECT n_records FROM queries ORDER BY query_id").fetchall() == [(3,), (3,)]
    with pytest.raises(DeepBaseError, match="give limit or max_records, not both"):
        dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", limit=3, max_records=4)
    # measure parameter dicts still reach the measure
    t = dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", corr={"intervals": "symbols"},
                    max_records=4)
    assert t.num_rows > 0
    # compare_layers takes max_records too, and names a typo
    sims = dbd.compare_layers(planted, ["planted:planted", "planted:mix"], "snippets", max_records=2)
    assert sims.num_rows == 1
    with pytest.raises(DeepBaseError, match=r"unknown keyword 'max_record' \(did you mean max_records\?\)"):
        dbd.compare_layers(planted, ["planted:planted", "planted:mix"], "snippets", max_record=2)


# -- 3. the early-stopping line of a scan that read every record ---------------------------------

def test_scan_summary_of_a_full_read_does_not_contradict_itself():
    from deepbase_duck.cli import scan_summary
    line, = scan_summary({"max_error": 0.15, "stopped_early": False, "records_used": 89, "record_count": 89,
                          "bound_reached": 0.121, "reused": {}})
    assert line == ("early stopping (max_error): every record was read (89 of 89; the rule held at no earlier "
                    "window), so the scores and intervals are the full scan's, whose largest half-width is 0.121")
    assert "not met" not in line
    # a ranking rule quotes no error bound, stopped early or not
    line, = scan_summary({"top_k": 3, "stopped_early": False, "records_used": 89, "record_count": 89,
                          "bound_reached": 0.082, "reused": {}})
    assert "0.082" not in line and "bound" not in line and "every record was read (89 of 89" in line
    line, = scan_summary({"top_k": 3, "stopped_early": True, "stop_rule": "top_k", "records_used": 20,
                          "record_count": 89, "bound_reached": 0.3, "reused": {}})
    assert line == "early stopping (top_k): stopped after 20 of 89 records"


def test_cli_full_read_line(store, capsys):
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", "--max-error", "0.01",
                       "--top", "1")
    assert rc == 0, err
    n = len(TEXTS)
    assert f"early stopping (max_error): every record was read ({n} of {n}; the rule held at no earlier window)" \
        in out and "whose largest half-width is" in out


# -- 4. help pages, --version, the inspect options the SQL macro has -----------------------------

def _subparsers():
    from deepbase_duck.cli import _parser
    p = _parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return p, sub.choices


def test_every_argument_has_help_and_every_default_is_shown():
    _, commands = _subparsers()
    missing, hidden = [], []
    for name, sp in commands.items():
        for a in sp._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction)) or a.help == argparse.SUPPRESS:
                continue
            if not a.help:
                missing.append(f"{name} {a.dest}")
            elif (a.option_strings and a.default not in (None, False, argparse.SUPPRESS)
                  and "default" not in a.help):
                hidden.append(f"{name} {a.option_strings[0]}")
    assert missing == [] and hidden == []
    inspect = commands["inspect"].format_help()
    assert "not a sample" in inspect and "--seed" in inspect and "sampling macros" in inspect
    assert "probeless" in inspect and "spearman" in inspect                # --measures lists the measures
    assert "stop after this many characters" not in commands["add-stdlib"].format_help()
    assert "float16" in commands["demo"].format_help()


def test_version(capsys):
    from deepbase_duck.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"deepbase-duck {dbd.__version__}"


def test_inspect_passes_params_permutations_and_dtype_and_prints_the_query_id(store, capsys):
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", "--params",
                       '{"corr": {"intervals": "symbols"}}', "--permutations", "5", "--keep-activations",
                       "--dtype", "float16", "--max-records", "4", "--top", "1")
    assert rc == 0, err
    p = last_params(store)
    assert p["measure_params"] == {"corr": {"intervals": "symbols"}} and p["keep_activations"]
    con = dbd.connect(store, progress=False)
    try:
        qid = con.sql("SELECT max(query_id) FROM queries").fetchall()[0][0]
        assert con.sql(f"SELECT bool_and(detail->>'perm_p_value' IS NOT NULL) FROM scores WHERE query_id = {qid} "
                       "AND unit IS NOT NULL AND score IS NOT NULL").fetchall() == [(True,)]
        assert con.sql("SELECT dtype FROM behaviors WHERE layer = 'planted'").fetchall() == [("float16",)]
    finally:
        dbd.close(con)
    assert f"query {qid} (its report: deepbase-duck report {store} --query {qid})" in out
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", "--params", '{"seed": {}}')
    assert rc == 2 and "--params: key 'seed' is not a measure" in err
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", "--params", '[1]')
    assert rc == 2 and "--params must be a JSON object" in err


def test_add_stdlib_says_how_many_characters_it_added(tmp_path, capsys):
    rc, out, err = cli(capsys, "add-stdlib", str(tmp_path / "s.duckdb"), "code", "--chars", "3000",
                       "--max-chars", "500")
    assert rc == 0, err
    name, rest = out.strip().split(": ")
    records, chars = rest.split(", ")
    assert records.endswith(" records") and chars.endswith(" characters")
    assert int(chars.split()[0].replace(",", "")) >= 3000        # whole records: it may run past --chars


# -- 5. --stable-windows without --top-k; library names as flags ---------------------------------

def test_stable_windows_without_top_k_is_refused(store, capsys):
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", "--stable-windows", "5")
    assert rc == 2 and out == ""
    assert "--stable-windows" in err and "--top-k" in err and err.strip().count("\n") == 0
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", "--top-k", "1",
                       "--stable-windows", "4", "--top", "1")
    assert rc == 0, err
    assert last_params(store)["stable_windows"] == 4


@pytest.mark.parametrize("argv,message", [
    (["--top-k", "0"], "error: --top-k must be a positive integer, got 0"),
    (["--min-support", "50"], "error: --min-support leaves rare label columns out of the --max-error and --top-k "
                              "rules"),
    (["--seed", "-1"], "error: --seed must be an integer >= 0, got -1"),
    (["--max-records", "-1"], "error: --max-records must be an integer >= 0, got -1"),
    (["--batch-size", "0"], "error: --batch-size must be an integer >= 1, got 0"),
])
def test_library_errors_name_the_cli_flags(store, capsys, argv, message):
    rc, out, err = cli(capsys, "inspect", store, *INSPECT, "--hypotheses", "digit", *argv)
    assert rc == 2 and message in err, err


def test_cli_flags_leaves_quoted_names_alone():
    from deepbase_duck.cli import cli_flags
    assert cli_flags("unknown hypothesis 'top_k'; valid hypotheses: a") == \
        "unknown hypothesis 'top_k'; valid hypotheses: a"


# -- 6. report of a compare_layers query ---------------------------------------------------------

def test_report_of_a_compare_layers_query_says_what_it_is(store, capsys, tmp_path):
    con = dbd.connect(store, progress=False)
    try:
        dbd.compare_layers(con, ["planted:planted", "planted:mix"], "snippets", max_records=2)
        qid = con.sql("SELECT max(query_id) FROM queries").fetchall()[0][0]
        with pytest.raises(DeepBaseError, match=rf"query {qid} is a compare_layers query .* similarities"):
            dbd.report(con, str(tmp_path / "r.html"), query_id=qid)
        with pytest.raises(UnknownNameError, match="unknown query id 999"):
            dbd.report(con, str(tmp_path / "r.html"), query_id=999)
    finally:
        dbd.close(con)
    rc, out, err = cli(capsys, "report", store, "--query", str(qid), "--out", str(tmp_path / "r.html"))
    assert rc == 2 and "unknown query id" not in err
    assert f"query {qid} is a compare_layers query" in err and "no unit scores" in err
    assert f"SELECT * FROM similarities WHERE query_id = {qid}" in err


# -- 7. the shell's batch errors -----------------------------------------------------------------

def test_shell_batch_mode_prints_the_udf_traceback(planted):
    """A call refused for its input (unknown layer 'nope': a DeepBaseError) is one line outside the
    prompt since round 19: the traceback that followed it, a page of the library's own frames,
    read as a crash for what is a typo. It is shown with --traceback (tracebacks=True), and
    always for a call that failed otherwise (test_cli19)."""
    from deepbase_duck.shell import Shell
    out, err = io.StringIO(), io.StringIO()
    sh = Shell(planted, out, err)
    rc = sh.feed(["SELECT * FROM inspect('planted', ['nope'], ['digit'], 'snippets');", "SELECT 1;"],
                 interactive=False)
    assert rc == 1
    text = err.getvalue()
    assert text.startswith("Error: ") and "unknown layer 'nope'" in text.splitlines()[0]
    assert text.count("\n") == 1 and "Traceback" not in text, text
    err.truncate(0), err.seek(0)
    rc = Shell(planted, out, err, tracebacks=True).feed(
        ["SELECT * FROM inspect('planted', ['nope'], ['digit'], 'snippets');"], interactive=False)
    text = err.getvalue()
    assert rc == 1 and "Traceback (most recent call last):" in text and "check_layers" in text
    assert text.rstrip().endswith(planted.sql("SELECT last_error()").fetchall()[0][0].rstrip().splitlines()[-1])
    # an error of plain SQL stays one line; an older UDF traceback is not shown again
    err.truncate(0), err.seek(0)
    assert sh.feed(["SELECT * FROM no_such_table;"], interactive=False) == 1
    assert err.getvalue().count("\n") == 1 and "Traceback" not in err.getvalue()
    # at the prompt the shell goes on: it points at last_error() instead
    err.truncate(0), err.seek(0)
    assert sh.feed(["SELECT * FROM inspect('planted', ['nope'], ['digit'], 'snippets');", "SELECT 1;"],
                   interactive=True) == 0
    assert "SELECT last_error()" in err.getvalue() and "Traceback" not in err.getvalue()


# -- 8. plurals ----------------------------------------------------------------------------------

def test_counts_of_one_are_singular(store, tmp_path, capsys, monkeypatch):
    one = tmp_path / "one.txt"
    one.write_text("x\n")
    rc, out, err = cli(capsys, "add-dataset", str(tmp_path / "p.duckdb"), "mine", str(one))
    assert rc == 0 and "mine: 1 record (lines, 1 character)" in out, (out, err)
    monkeypatch.setattr(dbd, "report", lambda *a, **k: {"path": "r.html", "query_id": 1, "bytes": 2000, "figures": 1,
                                                         "units_with_text": 1, "measure": "corr",
                                                         "missing_activations": []})
    rc, out, err = cli(capsys, "report", store)
    assert rc == 0 and "1 figure, 1 unit with coloured records" in out, (out, err)

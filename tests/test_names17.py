"""Names and reading records: close-name hints regardless of case and whitespace, names with
whitespace around them refused (a stored one stays usable), read_records refusing arguments its
format has no use for, and the error helpers' own edge cases."""
from __future__ import annotations

import pickle

import pytest

import deepbase_duck as dbd
from deepbase_duck.corpora import cut_text
from deepbase_duck.errors import (BadParameterError, DeepBaseError, UnknownNameError, check_float,
                                  check_int)

from conftest import TEXTS, planted_adapter, snapshot


def cli(capsys, *argv):
    from deepbase_duck.cli import main
    capsys.readouterr()
    rc = main(["--quiet", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- close-name hints -------------------------------------------------------------------------

@pytest.mark.parametrize("asked,meant", [("PTB", "ptb"), (" ptb ", "ptb"), ("IN_STRING", "in_string"),
                                         ("In String", "in_string"), ("Digit", "digit")])
def test_hint_ignores_case_and_whitespace_and_names_the_real_spelling(asked, meant):
    e = UnknownNameError("dataset", asked, ["code", "digit", "in_string", "ptb"])
    assert f"did you mean {meant!r}?" in str(e), str(e)
    assert str(e).endswith("valid datasets: code, digit, in_string, ptb")


def test_hint_names_every_spelling_that_differs_only_in_case():
    e = UnknownNameError("model", "LSTM", ["Lstm", "lstm", "gru"])
    assert "did you mean 'Lstm', 'lstm'?" in str(e), str(e)
    assert "'gru'" not in str(e).split("valid")[0]


def test_unknown_model_and_dataset_hint_from_a_real_lookup(planted):
    with pytest.raises(UnknownNameError, match=r"unknown model 'PLANTED'; did you mean 'planted'\?"):
        dbd.inspect(planted, "PLANTED", ["planted"], ["digit"], "snippets")
    with pytest.raises(UnknownNameError, match=r"unknown dataset ' snippets'; did you mean 'snippets'\?"):
        dbd.inspect(planted, "planted", ["planted"], ["digit"], " snippets")


def test_unknown_name_error_survives_pickling():
    """A Ray worker's error reaches the driver pickled: it must come back whole, of its type."""
    e = UnknownNameError("layer", "lstm2", ["lstm0", "lstm1"])
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is UnknownNameError and isinstance(back, KeyError)
    assert str(back) == str(e) and (back.what, back.name, back.valid) == ("layer", "lstm2", ["lstm0", "lstm1"])


# -- the error helpers ------------------------------------------------------------------------

@pytest.mark.parametrize("value", [10 ** 400, -10 ** 400], ids=["1e400", "-1e400"])
def test_check_float_refuses_an_int_beyond_the_floats_by_name(value):
    with pytest.raises(BadParameterError, match=r"corr: confidence must be in \(0, 1\), got -?1000"):
        check_float("corr: confidence", value, 0, 1, open_low=True, open_high=True)
    with pytest.raises(BadParameterError, match="mi: eps must be a finite number"):
        check_float("mi: eps", value)


def test_check_int_names_an_int_too_long_to_write_out():
    with pytest.raises(DeepBaseError, match=r"bins must be an integer >= 2, got an integer of more than \d+ digits"):
        check_int("bins", -10 ** 5000, 2)
    assert check_int("bins", 10 ** 5000, 2) == 10 ** 5000


# -- names with whitespace around them --------------------------------------------------------

@pytest.mark.parametrize("name", [" ptb", "ptb ", " ptb ", "ptb\n", "\tptb", "ptb\u00a0"])
def test_dataset_name_with_whitespace_around_it_is_refused(con, name):
    before = snapshot(con)
    with pytest.raises(DeepBaseError) as e:
        dbd.add_dataset(con, name, ["a b c"])
    assert f"dataset name {name!r} has whitespace around it" in str(e.value) and "give 'ptb'" in str(e.value)
    assert snapshot(con) == before
    assert dbd.add_dataset(con, "ptb", ["a b c"]) == 1


@pytest.mark.parametrize("name", [" planted", "planted ", "planted\r\n"])
def test_model_name_with_whitespace_around_it_is_refused(con, name):
    before = snapshot(con)
    with pytest.raises(DeepBaseError) as e:
        dbd.register_model(con, name, planted_adapter())
    assert f"model name {name!r} has whitespace around it" in str(e.value) and "give 'planted'" in str(e.value)
    assert snapshot(con) == before


def test_a_stored_name_with_whitespace_stays_usable(planted):
    """A store written before the check may hold ' snippets ': it is read, appended to, queried,
    registered again and dropped under that name."""
    planted.execute("UPDATE records SET dataset = ' snippets ' WHERE dataset = 'snippets'")
    planted.execute("UPDATE datasets SET name = ' snippets ' WHERE name = 'snippets'")
    planted.execute("UPDATE layers SET model = ' planted ' WHERE model = 'planted'")
    planted.execute("UPDATE models SET name = ' planted ' WHERE name = 'planted'")
    assert dbd.add_dataset(planted, " snippets ", TEXTS + ["more 1\n"]) == len(TEXTS) + 1   # appends
    dbd.register_model(planted, " planted ", planted_adapter())
    scores = dbd.inspect(planted, " planted ", ["planted"], ["digit"], " snippets ")
    assert scores.num_rows > 0
    assert dbd.drop_dataset(planted, " snippets ")["records"] == len(TEXTS) + 1


def test_sql_register_model_reaches_the_name_check(con):
    with pytest.raises(Exception, match=r"model name ' charlstm' has whitespace around it"):
        con.sql("SELECT register_model(' charlstm', 'deepbase_duck.models.zoo:charlstm')").fetchall()
    with pytest.raises(Exception, match=r"dataset name 'code ' has whitespace around it"):
        con.sql("SELECT add_stdlib_dataset('code ', limit_chars := 2000)").fetchall()
    assert con.sql("SELECT count(*) FROM models").fetchall()[0][0] == 0
    assert con.sql("SELECT count(*) FROM datasets").fetchall()[0][0] == 0


def test_cli_reaches_the_name_checks_and_leaves_no_store(tmp_path, capsys):
    f = tmp_path / "lines.txt"
    f.write_text("a b\nc d\n")
    db = tmp_path / "new.duckdb"
    rc, out, err = cli(capsys, "add-dataset", str(db), " d", str(f))
    assert rc == 2 and "dataset name ' d' has whitespace around it" in err, err
    assert not db.exists()
    rc, out, err = cli(capsys, "register-model", str(db), "m ", "deepbase_duck.models.zoo:charlstm")
    assert rc == 2 and "model name 'm ' has whitespace around it" in err, err
    assert not db.exists()


# -- read_records: arguments the format has no use for ---------------------------------------

@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "a.txt").write_text("one line\nanother\n")
    (tmp_path / "r.jsonl").write_text('{"text": "x y"}\n')
    (tmp_path / "r.csv").write_text("text\nx y\n")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "d.txt").write_text("a doc\n")
    return tmp_path


@pytest.mark.parametrize("path,fmt,kwargs,culprit,read_as", [
    ("a.txt", None, {"column": "body"}, "column 'body'", "lines"),
    ("a.txt", None, {"source_column": "id"}, "source_column 'id'", "lines"),
    ("a.txt", None, {"pattern": "*.txt"}, "pattern '*.txt'", "lines"),
    ("r.jsonl", None, {"pattern": "*.jsonl"}, "pattern '*.jsonl'", "jsonl"),
    ("r.csv", None, {"pattern": "**/*.csv"}, "pattern '**/*.csv'", "csv"),
    ("docs", None, {"column": "body"}, "column 'body'", "files"),
    ("docs", "files", {"source_column": "id"}, "source_column 'id'", "files"),
    ("docs", "paths", {"column": "path"}, "column 'path'", "paths"),
])
def test_read_records_refuses_what_its_format_ignores(inputs, path, fmt, kwargs, culprit, read_as):
    with pytest.raises(DeepBaseError) as e:
        dbd.read_records(inputs / path, fmt, **kwargs)
    assert culprit in str(e.value) and f"read as {read_as!r}" in str(e.value), str(e.value)


def test_read_records_takes_the_defaults_for_every_format(inputs):
    got = dbd.read_records(inputs / "a.txt", column="text", pattern="**/*")
    assert [r["text"] for r in got] == ["one line", "another"]
    assert [r["text"] for r in dbd.read_records(inputs / "docs", column="text", source_column=None)] == ["a doc\n"]
    assert [r["text"] for r in dbd.read_records(inputs / "r.csv", pattern="**/*")] == ["x y"]


def test_read_records_pattern_cannot_leave_the_folder(tmp_path):
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "a.txt").write_text("mine\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("not in the folder\n")
    with pytest.raises(DeepBaseError, match=r"pattern must be a non-empty glob relative to the folder .*'\.\.' leads out"):
        dbd.read_records(tmp_path / "inside", pattern="../outside/*")


# -- cut_text: a zero-width joiner binds both sides --------------------------------------------

def test_cut_text_keeps_a_joined_emoji_in_one_record():
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467"          # man ZWJ woman ZWJ girl: one emoji
    text = "ab" + family + "cd"
    pieces = [p for _, p in cut_text(text, 6)]
    assert "".join(pieces) == text and all(len(p) <= 6 for p in pieces)
    assert pieces == ["ab", family + "c", "d"]
    assert not any(p.startswith(("\u200d", "\U0001F469", "\U0001F467")) for p in pieces)
    # a joined sequence longer than the limit is cut after a joiner, never before a mark
    pieces = [p for _, p in cut_text(family, 3)]
    assert "".join(pieces) == family and all(len(p) <= 3 for p in pieces)
    assert not any(p.startswith("\u200d") for p in pieces)

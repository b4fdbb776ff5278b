"""Regular-expression hypotheses defined from SQL (``define_hypothesis``), stored in the store and
registered by every process that opens it: labels against ``re.finditer``, the alignment rule,
a planted unit, a second process, versions, the replace/refuse rules and the README example."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import deepbase_duck as dbd
from deepbase_duck import store
from deepbase_duck.errors import DeepBaseError, HypothesisError
from deepbase_duck.hypotheses import core

ROOT = Path(__file__).resolve().parent.parent
CATS = "(?P<digit>[0-9])|(?P<upper>[A-Z])"


@pytest.fixture(autouse=True)
def forget_names():
    """The names these tests define leave the process registry afterwards."""
    yield
    for name in [n for n in core._REGISTRY if n.startswith("rx_")]:
        core._REGISTRY.pop(name)


def planted_texts(seed=0, n=12):
    """Random lower-case texts with digits, upper-case letters and 'ab'/'AB' runs planted in them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        chars = list(rng.choice(list("abcdefgh xyz"), size=int(rng.integers(15, 40))))
        for _ in range(int(rng.integers(0, 5))):
            at = int(rng.integers(0, len(chars)))
            chars[at:at] = list(rng.choice(["7", "42", "Q", "Zz9", "AbB", "abab", "31337"]))
        out.append("".join(chars))
    out.append("no planted here")
    return out


def reference(pattern, text, flags=0, categories=None):
    """Per-character labels straight from re.finditer: binary 0/1; categorical the code of the
    first named group that took part (NaN outside matches)."""
    if categories is None:
        out = np.zeros(len(text))
        for m in re.finditer(pattern, text, flags):
            out[m.start():m.end()] = 1
        return out
    out = np.full(len(text), np.nan)
    for m in re.finditer(pattern, text, flags):
        g = next(i for i, c in enumerate(categories) if m.group(c) is not None)
        out[m.start():m.end()] = g
    return out


def stored_per_char(con, name, dataset, texts):
    kind = con.sql("SELECT kind FROM hypotheses WHERE name = ?", params=[name]).fetchall()[0][0]
    out = [np.zeros(len(t)) if kind == "binary" else np.full(len(t), np.nan) for t in texts]
    for r, s, e, v in con.sql("SELECT l.record_id, start_char, end_char, value FROM labels l JOIN hypotheses h "
                              "ON h.name = l.hypothesis AND h.version = l.version WHERE l.hypothesis = ? AND "
                              "l.dataset = ?", params=[name, dataset]).fetchall():
        out[r][s:e] = v
    return out


def test_labels_equal_re_finditer_and_align_by_majority():
    texts = planted_texts()
    con = dbd.connect(None, progress=False)
    try:
        dbd.add_dataset(con, "t", texts)
        con.sql("SELECT define_hypothesis('rx_digits', '[0-9]+')").fetchall()
        got = con.sql("SELECT define_hypothesis('rx_kind', '(?P<digit>[0-9])|(?P<upper>[A-Z])', "
                      "kind := 'categorical', description := 'digit or upper')").fetchall()[0][0]
        assert got["categories"] == ["digit", "upper"] and got["kind"] == "categorical"
        con.sql("SELECT define_hypothesis('rx_ab', 'ab+', flags := 'i')").fetchall()
        con.sql("SELECT * FROM annotate(['rx_digits', 'rx_kind', 'rx_ab'], 't')").fetchall()
        for name, pattern, flags, cats in [("rx_digits", "[0-9]+", 0, None), ("rx_kind", CATS, 0, ["digit", "upper"]),
                                           ("rx_ab", "ab+", re.I, None)]:
            stored = stored_per_char(con, name, "t", texts)
            for text, s in zip(texts, stored):
                np.testing.assert_array_equal(s, reference(pattern, text, flags, cats))
        assert any(reference("[0-9]+", t).any() for t in texts) and not reference("[0-9]+", texts[-1]).any()
        # word symbols (runs of 3 characters, crossing match edges): the majority of their characters
        rows = []
        for r, t in enumerate(texts):
            rows += [(r, p, s, min(s + 3, len(t))) for p, s in enumerate(range(0, len(t), 3))]
        r, p, s, e = (np.array([x[i] for x in rows], np.int32) for i in range(4))
        store.insert_arrow(con, "symbols", pa.table({
            "dataset": ["t"] * len(r), "tokenization": ["tri"] * len(r), "record_id": r, "pos": p,
            "start_char": s, "end_char": e, "token": [None] * len(r)}))
        for name, pattern, cats in [("rx_digits", "[0-9]+", None), ("rx_kind", CATS, ["digit", "upper"])]:
            got = {(a, b): v for a, b, v in con.sql(
                f"SELECT record_id, pos, value FROM symbol_labels('t', 'tri', ['{name}'])").fetchall()}
            for a, b, lo, hi in rows:
                chars = reference(pattern, texts[a], 0, cats)[lo:hi]
                keys = ["nan" if np.isnan(c) else c for c in chars]
                best = max(keys, key=lambda k: (keys.count(k), -keys.index(k)))   # most, then earliest
                want = None if best == "nan" else best
                assert got[(a, b)] == want, (name, a, b, texts[a][lo:hi])
    finally:
        dbd.close(con)


def test_planted_unit_ranked_first_with_a_hypothesis_defined_in_sql(planted):
    con = planted
    con.sql("SELECT define_hypothesis('rx_digit', '[0-9]')").fetchall()
    top = con.sql("SELECT layer, unit, score FROM inspect('planted', ['planted'], ['rx_digit'], 'snippets') "
                  "ORDER BY abs(score) DESC LIMIT 1").fetchall()[0]
    assert top[:2] == ("planted", 0) and top[2] == pytest.approx(1.0, abs=1e-9)


def test_a_second_process_computes_the_labels_without_any_definition(tmp_path):
    db = str(tmp_path / "s.duckdb")
    texts = planted_texts(seed=3)
    con = dbd.connect(db, progress=False)
    dbd.add_dataset(con, "t", texts)
    d = dbd.define_hypothesis(con, "rx_num", "[0-9]+", description="numbers")
    k = dbd.define_hypothesis(con, "rx_kind2", CATS, kind="categorical")
    dbd.close(con)
    code = ("import json, sys\nimport deepbase_duck as dbd\nfrom deepbase_duck.hypotheses import registry\n"
            "assert 'rx_num' not in registry()\n"
            "con = dbd.connect(sys.argv[1], progress=False)\n"
            "con.sql(\"SELECT * FROM annotate(['rx_num', 'rx_kind2'], 't')\").fetchall()\n"
            "print(json.dumps(con.sql('SELECT hypothesis, version, record_id, start_char, end_char, value FROM labels "
            "ORDER BY ALL').fetchall()))\n")
    r = subprocess.run([sys.executable, "-c", code, db], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert {(h, v) for h, v, *_ in rows} == {("rx_num", d["version"]), ("rx_kind2", k["version"])}
    for name, pattern, cats in [("rx_num", "[0-9]+", None), ("rx_kind2", CATS, ["digit", "upper"])]:
        for rid, text in enumerate(texts):
            got = np.zeros(len(text)) if cats is None else np.full(len(text), np.nan)
            for h, _, rr, s, e, v in rows:
                if h == name and rr == rid:
                    got[s:e] = v
            np.testing.assert_array_equal(got, reference(pattern, text, 0, cats))


def test_versions_follow_the_definition_and_replace_rules():
    texts = planted_texts(seed=5)
    con = dbd.connect(None, progress=False)
    try:
        dbd.add_dataset(con, "t", texts)
        v1 = con.sql("SELECT define_hypothesis('rx_v', '[0-9]+')").fetchall()[0][0]["version"]
        assert dbd.annotate(con, ["rx_v"], "t")[0]["labeled"] == len(texts)
        # the same definition again: accepted, same version, labels kept
        assert con.sql("SELECT define_hypothesis('rx_v', '[0-9]+')").fetchall()[0][0]["version"] == v1
        assert dbd.annotate(con, ["rx_v"], "t")[0]["reused"] == len(texts)
        before = con.sql("SELECT * FROM labels ORDER BY ALL").fetchall()
        with pytest.raises(Exception, match=r"already defined in this store.*replace := true"):
            con.sql("SELECT define_hypothesis('rx_v', '[A-Z]')").fetchall()
        with pytest.raises(HypothesisError, match="replace=True"):
            dbd.define_hypothesis(con, "rx_v", "[0-9]+", flags="i")
        assert con.sql("SELECT * FROM labels ORDER BY ALL").fetchall() == before
        assert con.sql("SELECT pattern, flags, version FROM hypothesis_definitions").fetchall() == [("[0-9]+", "", v1)]
        # replaced: another version, labels computed again from the new pattern, the old ones gone
        v2 = con.sql("SELECT define_hypothesis('rx_v', '[A-Z]', replace := true)").fetchall()[0][0]["version"]
        assert v2 != v1
        assert dbd.annotate(con, ["rx_v"], "t")[0]["labeled"] == len(texts)
        assert {v for (v,) in con.sql("SELECT DISTINCT version FROM labels").fetchall()} == {v2}
        for text, s in zip(texts, stored_per_char(con, "rx_v", "t", texts)):
            np.testing.assert_array_equal(s, reference("[A-Z]", text))
        # flags and kind change the version too; a description alone does not
        v3 = dbd.define_hypothesis(con, "rx_v", "[A-Z]", flags="i", replace=True)["version"]
        v4 = dbd.define_hypothesis(con, "rx_v", "(?P<up>[A-Z])", kind="categorical", replace=True)["version"]
        v5 = dbd.define_hypothesis(con, "rx_v", "(?P<up>[A-Z])", kind="categorical", description="capitals",
                                   replace=True)["version"]
        assert len({v1, v2, v3, v4}) == 4 and v5 == v4
        assert dbd.annotate(con, ["rx_v"], "t")[0]["labeled"] == len(texts)
        dbd.define_hypothesis(con, "rx_v", "(?P<up>[A-Z])", kind="categorical", description="upper", replace=True)
        assert dbd.annotate(con, ["rx_v"], "t")[0]["reused"] == len(texts)
        assert con.sql("SELECT description FROM hypotheses WHERE name = 'rx_v'").fetchall()[0][0] == "upper"
    finally:
        dbd.close(con)


def test_bad_definitions_are_refused_by_name_and_write_nothing():
    con = dbd.connect(None, progress=False)
    try:
        dbd.add_dataset(con, "t", ["a1"])

        def refused(sql, pattern):
            with pytest.raises(Exception, match=pattern):
                con.sql(sql).fetchall()
        try:
            re.compile("[a-")
        except re.error as exc:
            re_message = str(exc)
        refused("SELECT define_hypothesis('rx_b', '[a-')", r"pattern '\[a-' is not a valid regular expression: "
                + re.escape(re_message))
        for empty in ["a*", r"\b", "(?=a)", "a|", "^", "(?:x?)+"]:
            with pytest.raises(HypothesisError, match="can match the empty string"):
                dbd.define_hypothesis(con, "rx_b", empty)
        refused("SELECT define_hypothesis('rx_b', '[0-9]', kind := 'categorical')", "named groups")
        refused("SELECT define_hypothesis('rx_b', '[0-9]', kind := 'continuous')", "kind 'continuous'")
        refused("SELECT define_hypothesis('rx_b', '[0-9]', flags := 'iq')", "unknown flag.*'q'")
        for arg, sql in [("name", "NULL, '[0-9]'"), ("pattern", "'rx_b', NULL"), ("kind", "'rx_b', 'a', kind := NULL"),
                         ("flags", "'rx_b', 'a', flags := NULL"), ("replace", "'rx_b', 'a', replace := NULL")]:
            refused(f"SELECT define_hypothesis({sql})", f"define_hypothesis: {arg} is NULL")
        refused("SELECT define_hypothesis('in_string', 'x')", "'in_string' is a built-in hypothesis")
        refused("SELECT define_hypothesis('in_string', 'x', replace := true)", "built-in")

        @dbd.hypothesis("rx_python")
        def rx_python(text):
            return [(0, 1)]
        with pytest.raises(HypothesisError, match="'rx_python' is a Python hypothesis of this process"):
            dbd.define_hypothesis(con, "rx_python", "x", replace=True)
        # labels of a Python hypothesis stored, its code not in this process: replace only
        dbd.annotate(con, ["rx_python"], "t")
        core._REGISTRY.pop("rx_python")
        assert con.sql("SELECT count(*) FROM hypothesis_definitions").fetchall()[0][0] == 0
        with pytest.raises(HypothesisError, match="labels of a hypothesis named 'rx_python' computed by Python"):
            dbd.define_hypothesis(con, "rx_python", "[0-9]")
        dbd.define_hypothesis(con, "rx_python", "[0-9]", replace=True)
        dbd.annotate(con, ["rx_python"], "t")
        assert con.sql("SELECT start_char, end_char FROM labels WHERE hypothesis = 'rx_python'").fetchall() == [(1, 2)]
        with pytest.raises(DeepBaseError):
            dbd.define_hypothesis(con, "rx_c", "(?P<d>[0-9])", kind="categorical", flags="z")
    finally:
        dbd.close(con)


def test_readme_sql_example_runs_in_the_shell_as_written(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"### A regular expression, defined in SQL.*?```sql\n(.*?)```", text, re.S).group(1)
    (tmp_path / "example.sql").write_text(block)
    db = str(tmp_path / "study.duckdb")
    r = subprocess.run([sys.executable, "-m", "deepbase_duck", "shell", "--quiet", "--create", db,
                        str(tmp_path / "example.sql")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "has_digit" in r.stdout and "char_kind" in r.stdout and "[digit, upper]" in r.stdout
    # the CLI lists the store's definitions and refuses another pattern without --replace
    r = subprocess.run([sys.executable, "-m", "deepbase_duck", "define-hypothesis", db, "has_digit", "[0-9]"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "give --replace to redefine it" in r.stderr
    r = subprocess.run([sys.executable, "-m", "deepbase_duck", "hypotheses", db], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and re.search(r"has_digit\s+binary\s+a run of digits \(regex '\[0-9\]\+'\)", r.stdout)


def test_an_export_carries_the_stored_definitions(tmp_path):
    """A BI export lists the catalog's tables as Parquet: the regex definitions are part of the
    catalog (without them an exported store's hypotheses name patterns nobody can read)."""
    import polars as pl
    con = dbd.connect(None, progress=False)
    try:
        con.sql("SELECT define_hypothesis('exp_digit', '[0-9]+', description := 'digits')").fetchall()
        dbd.export(con, str(tmp_path / "bi"))
    finally:
        dbd.close(con)
    got = pl.read_parquet(tmp_path / "bi" / "hypothesis_definitions.parquet")
    assert got.select("name", "kind", "pattern").rows() == [("exp_digit", "binary", "[0-9]+")]


def test_a_python_hypothesis_registered_over_a_stored_regex_is_warned_of():
    """A Python hypothesis registered after connecting, under the name of a regex the store
    defines, took its place in queries without a word: now a warning names both, once."""
    import warnings
    con = dbd.connect(None, progress=False)
    try:
        dbd.add_dataset(con, "d", ["a1 b22", "c333"])
        con.sql("SELECT define_hypothesis('shadowed_digits', '[0-9]+')").fetchall()

        @dbd.hypothesis("shadowed_digits", kind="binary")
        def shadow(text):
            return [(0, 1)]
        with pytest.warns(UserWarning, match=r"'shadowed_digits'.*regular expression '\[0-9\]\+'.*Python one is used"):
            dbd.annotate(con, ["shadowed_digits"], "d")
        with warnings.catch_warnings():
            warnings.simplefilter("error")                 # once per name
            dbd.annotate(con, ["shadowed_digits"], "d")
        spans = con.sql("SELECT record_id, start_char, end_char FROM labels WHERE hypothesis = 'shadowed_digits' "
                        "ORDER BY record_id").fetchall()
        assert spans == [(0, 0, 1), (1, 0, 1)]              # the Python one's labels
    finally:
        dbd.close(con)
        from deepbase_duck.hypotheses.core import registry
        registry().pop("shadowed_digits", None)

"""The bundled corpora, hunt 18: cutters that give a text back whole for every small limit and
refuse a limit that cuts nothing (0 cut empty pieces for ever), a standard-library corpus that
is the same on every machine with the same Python (no file the build wrote for this machine),
and sizes that are refused rather than drawn as something else (a sample larger than its split,
2.5 queries drawn as 2)."""
from __future__ import annotations

import random
import signal
import sys

import pytest

from deepbase_duck.corpora import stdlib
from deepbase_duck.corpora.code import sampled_code_records, statement_chunks
from deepbase_duck.corpora.files import cut_text
from deepbase_duck.errors import DeepBaseError


def _within(seconds: float, fn):
    """``fn()``, or TimeoutError after ``seconds`` (the old cutters looped for ever on a limit of 0,
    growing a list of empty pieces: stopped early, before it eats the machine's memory)."""
    def stop(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------- the cutters
CUTTERS = {"cut_text": cut_text, "cut_text(words=False)": lambda t, m: cut_text(t, m, False),
           "chunk_text": stdlib.chunk_text, "statement_chunks": statement_chunks}


@pytest.mark.parametrize("name", sorted(CUTTERS))
@pytest.mark.parametrize("bad", [0, -1])
def test_a_limit_below_one_is_refused_not_cut_for_ever(name, bad):
    fn = CUTTERS[name]
    with pytest.raises(DeepBaseError, match=rf"max_chars must be an integer >= 1, got {bad}") as exc:
        _within(0.5, lambda: fn("some text\nand more", bad))
    assert isinstance(exc.value, ValueError)            # callers catching ValueError still do
    assert name.split("(")[0] in str(exc.value)          # the function called, by name


@pytest.mark.parametrize("name", sorted(CUTTERS))
def test_a_limit_that_is_no_whole_number_is_refused_by_the_function_called(name):
    fn = CUTTERS[name]
    for bad in (2.5, "5", None, True):
        with pytest.raises(DeepBaseError, match=rf"^{name.split('(')[0]}: max_chars must be an integer >= 1"):
            _within(0.5, lambda: fn("some text\nand more", bad))
    assert fn("abc def", 3.0) == fn("abc def", 3)       # a whole float is its int


_ALPHABET = ["a", "b", "word", " ", "  ", "\t", "\n", "\n\n", "e\u0301", "\u0301", "\u200d", "\ufe0f",
             "\U0001f468", "\U0001f3fd", "x" * 9, "def f(x):\n", "    ", "'''doc\n'''", "(1,\n 2)"]


def test_every_cut_gives_its_text_back_for_every_small_limit():
    """The pieces concatenate to the text, at their offsets, none empty or over the limit; with
    ``words`` a word is split only when no whitespace lies within the limit before it."""
    rng = random.Random(18)
    texts = ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 25))) for _ in range(400)]
    texts += [stdlib.read_source("json/decoder.py")[:3000], " " * 30, "\n" * 30, "a" * 30]
    for text in texts:
        for m in range(1, 14):
            for name, fn in CUTTERS.items():
                pieces = _within(5, lambda: fn(text, m))
                assert "".join(p for _, p in pieces) == text, (name, m, text)
                at = 0
                for offset, piece in pieces:
                    assert offset == at and 0 < len(piece) <= m, (name, m, text, pieces)
                    at += len(piece)
            pieces = cut_text(text, m)
            for (_, p), (_, q) in zip(pieces, pieces[1:]):
                if not p[-1].isspace() and not q[0].isspace():          # a word split between them
                    assert not any(c in p for c in " \t\n"), (m, text, pieces)


# ----------------------------------------------------------------- the standard-library corpus
def test_files_the_build_wrote_for_this_machine_are_no_part_of_the_corpus(tmp_path, monkeypatch):
    """_sysconfigdata_*.py (the build's paths and flags) and config-*/python-config.py (a script
    naming the install prefix) differ between machines of one Python version, by text and by
    name; on Python 3.12 for x86-64 Linux the latter fell in the held-out split."""
    generated = ["_sysconfigdata__linux_x86_64-linux-gnu.py", "_sysconfigdata__darwin_darwin.py",
                 "config-3.12-x86_64-linux-gnu/python-config.py", "sitecustomize.py", "usercustomize.py",
                 "dist-packages/six.py"]
    kept = ["os.py", "sysconfig.py", "distutils/command/config.py", "configparser.py", "json/decoder.py",
            "site.py", "_sysconfig.py", "calendar.py", "bz2.py"]
    for rel in generated + kept:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\nprefix = '/home/someone/python'\n")
    monkeypatch.setattr(stdlib, "stdlib_root", lambda: tmp_path)
    assert stdlib.stdlib_files() == sorted(kept)
    assert stdlib.is_heldout("config-3.12-x86_64-linux-gnu/python-config.py")     # why it mattered
    heldout = {r["source"] for r in stdlib.stdlib_records("heldout")}
    assert heldout == {"calendar.py", "bz2.py"} == {f for f in kept if stdlib.is_heldout(f)}


def test_no_corpus_file_names_this_machines_install_prefix():
    """A file whose text holds the interpreter's install prefix was written for this machine: the
    same Python installed elsewhere would give other records."""
    prefix = sys.base_prefix
    if len(prefix) < 8 or prefix in ("/usr/local", "/opt/local"):     # too common a text to tell
        pytest.skip(f"install prefix {prefix!r} is too common a string to look for")
    named = [rel for rel in stdlib.stdlib_files() if prefix in stdlib.read_source(rel)]
    assert named == []


# -------------------------------------------------------------------------------------- sizes
def test_a_code_sample_larger_than_its_split_is_refused_not_the_whole_split():
    """sampled_code_records(10**9) gave the whole held-out split for every seed (1.7 million
    characters, not 10**9): replicates that were one sample."""
    whole = sum(len(r["text"]) for r in stdlib.stdlib_records("heldout", 2000, chunker=statement_chunks))
    with pytest.raises(DeepBaseError, match=rf"chars {whole + 1:,} is more than the heldout split holds "
                                            rf"\({whole:,} characters"):
        sampled_code_records(whole + 1, seed=0)
    every = sampled_code_records(whole, seed=1)                          # the whole split: allowed
    assert sum(len(r["text"]) for r in every) == whole
    small = sampled_code_records(5000, seed=2)
    assert 5000 <= sum(len(r["text"]) for r in small) < 5000 + 2000


@pytest.mark.parametrize("bad", [0, -5, 2.5, "1000", None])
def test_a_code_sample_size_that_is_no_whole_number_of_characters_is_refused(bad):
    """0 and -5 gave no records, 2.5 one record, None and '1000' a TypeError from a comparison."""
    with pytest.raises(DeepBaseError, match=r"^sampled_code_records: chars must be an integer >= 1"):
        sampled_code_records(bad)


def test_sql_queries_are_as_many_as_asked_and_refusals_name_sql_queries():
    from deepbase_duck.corpora.sqlgen import SQLGenerator, sql_queries, sql_records
    assert len(sql_queries(3, seed=5)) == 3 and sql_queries(0) == []
    assert sql_queries(3.0, seed=5) == sql_queries(3, seed=5) == SQLGenerator(5).queries(3)
    for bad in (2.5, -3, "5", True):                    # 2.5 drew 2 queries, -3 none, '5' five
        with pytest.raises(DeepBaseError, match=r"^sql_queries: n must be an integer >= 0"):
            sql_queries(bad)
        with pytest.raises(DeepBaseError, match=r"^SQLGenerator.queries: n must be an integer >= 0"):
            SQLGenerator(0).queries(bad)
    with pytest.raises(DeepBaseError, match=r"^sql_queries: seed must be a whole number >= 0"):
        sql_queries(2, seed=-1)
    with pytest.raises(DeepBaseError, match=r"^sql_queries: max_depth must be an integer >= 0"):
        sql_queries(2, max_depth=-1)
    with pytest.raises(DeepBaseError, match=r"^sql_records: max_depth must be an integer >= 0"):
        sql_records(2, max_depth=1.5)


@pytest.mark.parametrize("split", ["test", "valid", "held-out", "Heldout", "", None])
def test_a_misspelt_split_is_refused_as_every_refusal_is(split):
    """A ValueError alone escaped callers that catch DeepBaseError (the library's refusals)."""
    from deepbase_duck.corpora.code import code_records
    for call in (lambda: stdlib.stdlib_records(split), lambda: code_records(split),
                 lambda: sampled_code_records(1000, split=split)):
        with pytest.raises(DeepBaseError, match=rf"unknown standard-library split {split!r}; valid splits: "
                                                rf"train, heldout") as exc:
            call()
        assert isinstance(exc.value, ValueError)

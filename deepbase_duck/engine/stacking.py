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
batching rule (``torch.lstm``, the CPU's fused attention of transformers) run one after another
on the same encoded batch (mode ``"sequential"``): torch's per-model fallback loop for such an
operator is turned off inside the fused call, so the first fused call fails and switches the
scan to that mode, and the reason is kept. The fused pass runs the first model's code and settings with every model's weights, so
models whose submodules differ in a setting outside their weights (a flag, a size, a tensor or
list kept as a plain attribute, the training flag) or in another attribute (a function such as
``self.act = torch.relu``, a config object: ``_other_attribute_differs``), models with a submodule in training mode,
that carry forward hooks, or whose adapters name different variants run sequentially too
(``_same_structure``, ``_training``, ``_outside_weights`` name the reason), as do models whose
fused pass fails in any way (an adapter reaching into ``self.module``'s submodules). Either way the scores equal the
one-model-at-a-time scores (vmap computes the same operations per model; the tests compare
them), and the query records which mode ran.
"""
from __future__ import annotations

import copy
import functools
import types
import weakref

import torch

from ..errors import DeepBaseError
from ..extraction.hooks import Retain, run_until_retained, user_hooks
from ..extraction.settings import (BOOKKEEPING, LIBRARY, UNSET, comparable, same, settings, show as show_setting,
                                   weight_ids)
from .extract import batch_from_outputs, naming_records


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


def _weights_of(module) -> dict:
    """name -> (shape, dtype) of every parameter and buffer the fused pass stacks (the names
    ``torch.func.stack_module_state`` uses: non-persistent buffers included, tied weights once)."""
    return {**{f"param {k}": (tuple(v.shape), v.dtype) for k, v in module.named_parameters()},
            **{f"buffer {k}": (tuple(v.shape), v.dtype) for k, v in module.named_buffers()}}


def _same_structure(modules) -> str | None:
    """Why one fused pass cannot stand for these modules (None when it can). The fused pass runs
    the FIRST module's code and settings with every module's weights, so besides the classes and
    the names, shapes and dtypes of the parameters and buffers (non-persistent ones included),
    every submodule's settings (``extraction.settings``, shared with the model's identity: a
    flag, a size, a plain tensor attribute; parameters and buffers are stacked) must
    match, and so must each submodule's training flag: two models that differ only in a flag, a
    size, a mask kept outside their weights or a submodule left in training mode would otherwise
    be computed as the first."""
    first = modules[0]
    shapes = _weights_of(first)
    subs = list(first.named_modules())
    for m in modules[1:]:
        if type(m) is not type(first):
            return f"module classes differ ({type(first).__name__} vs {type(m).__name__})"
        theirs_w = _weights_of(m)
        if theirs_w != shapes:
            for k in list(shapes) + [k for k in theirs_w if k not in shapes]:
                a, b = shapes.get(k), theirs_w.get(k)
                if a != b:
                    show = lambda w: "absent" if w is None else f"{w[0]}, {str(w[1]).replace('torch.', '')}"
                    return f"parameter names or shapes differ ({k}: {show(a)} vs {show(b)})"
        theirs = list(m.named_modules())
        if [n for n, _ in theirs] != [n for n, _ in subs]:
            return "submodules differ"
        wa, wb = weight_ids(first), weight_ids(m)
        paths = ({id(x): n for n, x in subs}, {id(x): n for n, x in theirs})
        for (name, a), (_, b) in zip(subs, theirs):
            if type(a) is not type(b):
                return f"submodule {name or '(root)'!r} classes differ ({type(a).__name__} vs {type(b).__name__})"
            if a.training != b.training:
                return (f"submodule {name or '(root)'!r} is in {'training' if a.training else 'eval'} mode in one "
                        f"model, {'training' if b.training else 'eval'} mode in another")
            sa, sb = settings(a, wa), settings(b, wb)
            for k in sorted(set(sa) | set(sb)):
                va, vb = sa.get(k, UNSET), sb.get(k, UNSET)
                if not same(va, vb):
                    how = (f"({show_setting(va)} vs {show_setting(vb)})" if show_setting(va) != show_setting(vb)
                           else f"(two {show_setting(va).replace('tensor', 'tensors').replace('array', 'arrays')}, "
                                f"other values)")
                    return f"submodule {name or '(root)'!r} setting {k!r} differs {how}"
            k = _other_attribute_differs(a, b, wa, wb, paths)
            if k is not None:
                ka, kb = _kind(vars(a).get(k, UNSET)), _kind(vars(b).get(k, UNSET))
                how = f"{ka} vs {kb}" if ka != kb else f"two {ka.removeprefix('a ')} objects, other values"
                return f"submodule {name or '(root)'!r} attribute {k!r} differs ({how}): its forward may read it"
    return None


# kept on configuration objects (transformers' PretrainedConfig) about where and by what the weights
# were saved, not about what the model computes: two checkpoints of one run differ in them
_SAVED_FROM = frozenset({"_commit_hash", "transformers_version"})


def _other_attribute_differs(a, b, wa: set, wb: set, paths: tuple) -> str | None:
    """The first attribute of submodules ``a`` and ``b`` that is no setting (``settings`` leaves
    out functions and objects such as a config) and differs (None: none). The fused pass runs
    the first model's attributes with every model's weights, so an activation kept as a plain
    function (``self.act = torch.relu`` in one checkpoint, ``torch.tanh`` in another) or a
    config object whose values the forward reads would score every model as the first."""
    va_, vb_ = vars(a), vars(b)
    for k in sorted(set(va_) | set(vb_), key=str):
        if k in BOOKKEEPING:
            continue
        x, y = va_.get(k, UNSET), vb_.get(k, UNSET)
        if comparable(x, wa) and comparable(y, wb):
            continue                                  # a setting: compared by the caller
        try:
            alike = _alike(x, y, wa, wb, paths, 0)
        except Exception:                             # (an object that cannot be compared: not alike)
            alike = False
        if not alike:
            return k
    return None


def _alike(x, y, wa: set, wb: set, paths: tuple, depth: int) -> bool:
    """Whether two values of the same attribute of two models stand for the same computation:
    the weights they hold (stacked, compared on their own) aside. Functions by their code and
    what they close over, methods by their function and their module's place in its model,
    other objects by their class and attributes; what cannot be told alike is not (the models
    then run one after another: the same scores, only slower)."""
    if x is y:
        return True
    if x is UNSET or y is UNSET or type(x) is not type(y) or depth > 6:
        return False
    if isinstance(x, torch.Tensor):
        return (id(x) in wa) == (id(y) in wb) and (id(x) in wa or same(x, y))
    if isinstance(x, torch.nn.Module):            # one of the models' own submodules, at the same place
        px, py = paths[0].get(id(x)), paths[1].get(id(y))
        return px is not None and px == py
    if comparable(x, wa) and comparable(y, wb):
        return same(x, y)
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(_alike(p, q, wa, wb, paths, depth + 1) for p, q in zip(x, y))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_alike(x[k], y[k], wa, wb, paths, depth + 1) for k in x)
    if isinstance(x, types.MethodType):
        return x.__func__ is y.__func__ and _alike(x.__self__, y.__self__, wa, wb, paths, depth + 1)
    if isinstance(x, types.FunctionType):         # (a lambda made per model: the same code)
        cells = lambda f: [c.cell_contents for c in f.__closure__ or ()]   # noqa: E731
        return (x.__code__ is y.__code__ and _alike(x.__defaults__, y.__defaults__, wa, wb, paths, depth + 1)
                and _alike(cells(x), cells(y), wa, wb, paths, depth + 1))
    if isinstance(x, functools.partial):
        return (_alike(x.func, y.func, wa, wb, paths, depth + 1) and _alike(x.args, y.args, wa, wb, paths, depth + 1)
                and _alike(x.keywords, y.keywords, wa, wb, paths, depth + 1))
    if isinstance(x, weakref.ref):
        return _alike(x(), y(), wa, wb, paths, depth + 1)
    if hasattr(x, "__dict__") and not callable(x) or isinstance(x, types.SimpleNamespace):
        dx, dy = vars(x), vars(y)
        keys = (set(dx) | set(dy)) - LIBRARY - _SAVED_FROM
        return all(_alike(dx.get(k, UNSET), dy.get(k, UNSET), wa, wb, paths, depth + 1) for k in keys)
    try:
        return bool(x == y)
    except Exception:
        return False


def _kind(v) -> str:
    """A short description of an attribute's value for the reason a fused pass was not run."""
    if v is UNSET:
        return "absent"
    name = getattr(v, "__name__", None)
    return name if callable(v) and isinstance(name, str) else f"a {type(v).__name__}"


def _training(adapters: dict) -> str | None:
    """Why models in training mode are not fused (None: every submodule is in eval mode, as
    ModelAdapter leaves it): a module in training mode may use the batch's statistics (BatchNorm,
    which the fused pass computes in another order: scores that differ from the model's own in
    the 9th digit) or randomness, and may update its buffers (running statistics), which the
    fused pass would do only to its stacked copies, not to the model."""
    for model, a in adapters.items():
        for name, sub in a.module.named_modules():
            if sub.training:
                return f"model {model!r}: submodule {name or '(root)'!r} is in training mode"
    return None


def _outside_weights(adapters: dict) -> str | None:
    """Why the fused pass would miss what a model does outside its weights and classes (None:
    nothing): its forward hooks (the fused pass runs a copy of the first model, and only that
    model's hooks), another adapter class (the fused pass runs the first adapter's ``forward``)
    or a different ``variant`` (ModelAdapter.variant: a hook or flag by name)."""
    for name, a in adapters.items():
        if user_hooks(a.module):
            return f"model {name!r} has forward hooks (they act outside its weights)"
    kinds = {name: type(a).__qualname__ for name, a in adapters.items()}
    if len({type(a) for a in adapters.values()}) > 1:      # the fused pass runs the first's forward()
        return f"the models' adapter classes differ ({', '.join(f'{n}: {k}' for n, k in kinds.items())})"
    variants = {name: getattr(a, "variant", "") for name, a in adapters.items()}
    if len(set(variants.values())) > 1:
        return f"the models' variants differ ({', '.join(f'{n}: {v!r}' for n, v in variants.items())})"
    return None


class _no_vmap_fallback:
    """torch.vmap runs an operator without a batching rule through a fallback that loops over the
    K models one at a time inside the fused call (PyTorch warns of "a performance drop"): on a
    CPU, MiniLM's attention (aten::_scaled_dot_product_flash_attention_for_cpu) made three fused
    models 2.4x slower than their three forward passes. Within the fused pass the fallback is
    off, so such an operator raises and the scan runs the models one after another instead
    (StackedForward records why), at their own speed."""

    def __enter__(self):
        functorch = getattr(torch._C, "_functorch", None)
        self.set = getattr(functorch, "_set_vmap_fallback_enabled", None)     # private: may go away
        if self.set is not None:
            self.was = functorch._is_vmap_fallback_enabled()
            self.set(False)
        return self

    def __exit__(self, *exc):
        if self.set is not None:
            self.set(self.was)
        return False


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
            self.reason = _same_structure(modules) or _training(self.adapters) or _outside_weights(self.adapters) or (
                None if len(devices) == 1 else f"the models sit on different devices ({', '.join(sorted(devices))})")
        self.mode = "vmap" if self.reason is None else "sequential"
        if self.mode == "vmap":
            first = next(iter(self.adapters.values()))
            try:
                self.params, self.buffers = torch.func.stack_module_state(modules)
            except (RuntimeError, ValueError) as exc:     # (_same_structure compares what it stacks)
                self.mode, self.reason = "sequential", f"torch.func.stack_module_state: {str(exc).splitlines()[0][:200]}"
                return
            self.params = {k: v.detach() for k, v in self.params.items()}
            self.base = copy.deepcopy(first.module).to("meta")
            self.twin = copy.copy(first)                  # the first adapter's forward(), on stacked weights
            check = getattr(first, "check_padding", None)
            if check is not None:       # CharAdapter: whether the models (one architecture) see the padding;
                check(self.layers)      # models run one after another are checked by their exits_early

    def __call__(self, enc) -> dict:
        if self.mode == "vmap":
            warn = getattr(next(iter(self.adapters.values())), "warn_padding", None)
            if warn is not None:        # (CharAdapter: checked in __init__, warned of at a padded batch)
                warn(self.layers, enc)
            try:
                return self._fused(enc)
            except Exception as exc:
                # any failure of the fused pass (an operator without a batching rule; an adapter
                # whose forward() reaches into ``self.module.<submodule>``, which the fused
                # pass's stand-in module does not have) runs the models one after another: a
                # real error of the model or its inputs is then raised there, by the model itself
                text = (str(exc).splitlines() or [""])[0][:200]
                kind = "" if isinstance(exc, (RuntimeError, NotImplementedError, ValueError)) else f"{type(exc).__name__}: "
                self.mode, self.reason = "sequential", f"torch.vmap: {kind}{text}"
        return self._sequential(enc)

    def _fused(self, enc) -> dict:
        layers = self.layers

        def one(params, buffers):
            self.twin.module = _Functional(self.base, params, buffers)
            with Retain(self.base, layers, copy=True) as ret:        # (no in-place check under vmap)
                self.twin.forward(enc)
                return tuple(ret.outputs.get(layer) for layer in layers)

        with torch.inference_mode(), _no_vmap_fallback():
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


def stacked_batches(session, stacked: StackedForward, layers, dataset: str, batches, symbol_counts,
                    keep_encoding: bool = False, defer_check: bool = False):
    """Yield ``{model: Batch}`` per batch of records: encoded once, run through every model.
    With ``keep_encoding`` the first model's Batch carries the encoding (``Batch.encoded``) for
    the consumer to store new records' symbols from (in its own thread when this runs in a
    prefetch thread, engine/prefetch.py). ``defer_check``: each Batch's finite check waits for
    ``Batch.verify()`` (batch_from_outputs)."""
    first = next(iter(stacked.adapters.values()))
    for ids in batches:
        texts = session.texts(dataset, ids)
        with naming_records(",".join(stacked.adapters), dataset, ids):
            enc = first.encode([texts[r] for r in ids])
            outputs = stacked(enc)
        out = {name: batch_from_outputs(stacked.adapters[name], outputs[name], enc, name, layers, dataset, ids,
                                        symbol_counts, [texts[r] for r in ids], defer_check=defer_check)
               for name in stacked.adapters}
        if keep_encoding:
            next(iter(out.values())).encoded = enc
        yield out

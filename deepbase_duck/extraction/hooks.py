"""A small context manager that retains the outputs of named modules during forward passes.

    with Retain(model, ["lstm0", "encoder.layer.3"]) as ret:
        model(x)
    ret["lstm0"]          # the module's output tensor (the first element when it returns a tuple)

Layers are addressed by the dotted paths of ``model.named_modules()``, as in PyTorch itself.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import weakref

import torch

from ..errors import UnknownNameError


def resolve_modules(model: torch.nn.Module, names) -> dict[str, torch.nn.Module]:
    table = dict(model.named_modules())
    out = {}
    for name in names:
        if name not in table or name == "":
            raise UnknownNameError("layer", name, [n for n in table if n])
        out[name] = table[name]
    return out


def first_tensor(output):
    """The activation tensor of a module output: the tensor itself, or the first tensor of a
    tuple/list (nn.LSTM returns (output, (h, c)); HF layers may return tuples)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            t = first_tensor(item)
            if t is not None:
                return t
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return None


class StopForward(Exception):
    """Raised by an armed Retain's hook once every named module has given its output: the rest of
    the forward pass (later layers, a decoder head) is not needed. ``run_until_retained`` arms
    the Retain and catches it."""


class ModelLock:
    """One model's forward passes for one Retain at a time: the hooks of two Retains on one model
    (two threads' queries, e.g. over ``dbd.cursor``s) would each see the other's passes. Held
    from a Retain's ``__enter__`` to its ``close``; re-entrant in the thread that holds it (a
    Retain inside another on the same model), and released by whichever thread closes the
    Retain (a prefetching generator may be closed by the thread that consumed it).

    Code that holds several models' locks at once takes them through ``hold_model_locks``, in one
    order for every thread (``rank``, the order the locks were made in): two threads taking the
    locks of models A and B in the orders A, B and B, A would each hold one and wait for the other
    for ever."""

    _locks = weakref.WeakKeyDictionary()      # root module -> its ModelLock
    _guard = threading.Lock()
    _ranks = itertools.count()

    def __init__(self):
        self.lock = threading.Lock()
        self.owner, self.depth = None, 0
        self.rank = next(ModelLock._ranks)     # (made under _guard) the global order of acquisition

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelLock":
        with cls._guard:
            lock = cls._locks.get(model)
            if lock is None:
                lock = cls._locks[model] = cls()
            return lock

    def acquire(self):
        me = threading.get_ident()
        if self.owner == me:
            self.depth += 1
            return
        self.lock.acquire()
        self.owner, self.depth = me, 1

    def release(self):
        self.depth -= 1
        if self.depth == 0:
            self.owner = None
            self.lock.release()


@contextlib.contextmanager
def hold_model_locks(models):
    """Hold the ModelLocks of ``models`` (root modules; repeats and shared locks count once) for
    the block, taken in ``ModelLock.rank`` order whatever the order of ``models``, and released in
    reverse. Retains opened inside on these models then re-enter locks this thread holds, so no
    lock is taken out of order while another is held."""
    locks = sorted({id(lock): lock for lock in map(ModelLock.of, models)}.values(), key=lambda lock: lock.rank)
    taken = []
    try:
        for lock in locks:
            lock.acquire()
            taken.append(lock)
        yield
    finally:
        for lock in reversed(taken):
            lock.release()


class Retain:
    """Keep the latest output of each named module; ``detach`` by default. While ``armed`` (a
    forward pass run through ``run_until_retained`` for a model whose named modules each run once
    per pass) the pass is cut short (``StopForward``) as soon as every named module has given an
    output.

    A kept output is the module's own tensor, not a copy, unless a later step of the forward pass
    writes into it (``nn.ReLU(inplace=True)`` after a BatchNorm, a residual ``out += x``): what was
    kept would then be the later value, and one that depends on how far the pass ran. So the first
    pass also keeps a copy of each output, and ``settle()`` (run_until_retained calls it) compares
    the two: a module whose output changed is copied from then on (``copy``), and that pass's
    outputs become the copies. ``copy=True`` copies every output from the start (inside
    ``torch.vmap``, where the check cannot run)."""

    def __init__(self, model: torch.nn.Module, layers, detach: bool = True, copy: bool = False):
        self.modules = resolve_modules(model, layers)
        self.model_lock = ModelLock.of(model)
        self._locked = False
        self.detach = detach
        self.armed = False            # stops only the forward pass run for it (run_until_retained)
        self.outputs: dict[str, torch.Tensor | None] = {}
        self.copy = set(self.modules) if copy else set()      # outputs kept as copies
        self.checked = set(self.copy)                          # outputs known to stay as given
        self._copies: dict[str, torch.Tensor] = {}             # this pass's copies, to check
        self._handles = []

    def _hook(self, name):
        def hook(module, inputs, output):
            t = first_tensor(output)
            if t is not None and self.detach:
                t = t.detach()
            if t is not None and name in self.copy:
                t = t.clone()
            elif t is not None and name not in self.checked:
                self._copies[name] = t.clone()
            self.outputs[name] = t
            if self.armed and len(self.outputs) == len(self.modules):
                raise StopForward
        return hook

    def settle(self) -> None:
        """After a forward pass: outputs written into after their module returned are replaced by
        the copies taken then, and copied in every later pass."""
        for name, kept in self._copies.items():
            t = self.outputs.get(name)
            if t is None:
                continue
            same = t.shape == kept.shape and bool(((t == kept) | (t.isnan() & kept.isnan())).all())
            if not same:
                self.copy.add(name)
                self.outputs[name] = kept
            self.checked.add(name)
        self._copies.clear()

    def __enter__(self):
        self.model_lock.acquire()              # another thread's Retain on this model: wait for it
        self._locked = True
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._locked:
            self._locked = False
            self.model_lock.release()

    def __getitem__(self, name):
        return self.outputs[name]

    def clear(self):
        self.outputs.clear()
        self._copies.clear()


def run_until_retained(adapter, encoded, ret: Retain) -> None:
    """``adapter.forward(encoded)`` for ``ret`` (its outputs cleared first), ended without error
    once ``ret`` holds every output where the adapter allows early exit for those modules
    (``ModelAdapter.exits_early``, checked once per set of layers). Other Retains on the same
    modules (another model sharing them, or one whose stream is paused) record but never stop
    this pass."""
    exits = adapter.exits_early(list(ret.modules))     # (its first check runs a forward pass of its own)
    ret.clear()
    ret.armed = exits
    try:
        adapter.forward(encoded)
    except StopForward:
        pass
    finally:
        ret.armed = False
    ret.settle()


# Hooks that libraries keep on a model without changing what it computes: transformers (5.x)
# installs output-capturing hooks on first use of output_hidden_states / output_attentions.
BENIGN_HOOK_MODULES = ("transformers.utils.output_capturing",)


def user_hooks(model: torch.nn.Module) -> list[str]:
    """The dotted paths of ``model``'s modules that carry forward hooks or pre-hooks other than
    the benign ones above: code acting outside the weights ('' for the root)."""
    def benign(fn) -> bool:
        fn = getattr(fn, "func", fn)
        return getattr(fn, "__module__", "").startswith(BENIGN_HOOK_MODULES)
    return [name for name, m in model.named_modules()
            if any(not benign(f) for f in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values()))]

"""A small context manager that retains the outputs of named modules during forward passes.

    with Retain(model, ["lstm0", "encoder.layer.3"]) as ret:
        model(x)
    ret["lstm0"]          # the module's output tensor (the first element when it returns a tuple)

Layers are addressed by the dotted paths of ``model.named_modules()``, as in PyTorch itself.

What is kept of a module's output (``first_tensor``): a tensor as it is; of a tuple, list or
namedtuple its first tensor, depth first (``nn.LSTM``'s ``(output, (h, c))`` gives ``output``,
``nn.MultiheadAttention``'s ``(attn_output, weights)`` gives ``attn_output``); of a dict its
first tensor value, in the dict's order; of a ``PackedSequence`` (an RNN run on packed input)
the padded batch-first tensor ``(batch, longest, width)`` in the batch's own order (padding
holds zeros), and so of a nested tensor (the layers of an ``nn.TransformerEncoder`` run with a
padding mask in eval mode, on torch's fast path); of a transformers output its
``last_hidden_state``; of a dataclass its first tensor field, in field order; anything else
(None, an object) keeps None, which a scan reports as a
layer with no tensor output. A module that is never called as a module (a container, an
``nn.MultiheadAttention``'s ``out_proj``: ``never_called``) is refused by ``run_until_retained``
at the first pass, naming the layer to ask for instead. A module that runs
more than once in one forward pass (weights shared across depths, a cell called in a Python
loop) keeps its last call's output, and ``run_until_retained`` warns that it did. A kept 3-D
output of one of torch's sequence-first modules (an RNN or attention without ``batch_first=True``,
not run on packed input) is marked (``SEQUENCE_FIRST``), so that the default reader refuses it
even where its shape looks batch first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
import warnings
import weakref

import torch

from ..errors import ActivationError, UnknownNameError


def resolve_modules(model: torch.nn.Module, names) -> dict[str, torch.nn.Module]:
    table = dict(model.named_modules())
    out = {}
    for name in names:
        if not isinstance(name, str) or name not in table or name == "":
            raise UnknownNameError("layer", name, [n for n in table if n])   # (close names first)
        out[name] = table[name]
    return out


def first_tensor(output):
    """The activation tensor of a module output (the module docstring says which): the tensor
    itself; the first tensor of a tuple, list or namedtuple, of a dict's values or of a
    dataclass's fields; a
    PackedSequence or a nested tensor padded, batch first; a transformers output's
    ``last_hidden_state``; else None."""
    if isinstance(output, torch.Tensor):
        # (a nested tensor: what layers inside an nn.TransformerEncoder give on its fast path, run
        # with a padding mask in eval mode; no reader can take its shape, so padded with zeros)
        return torch.nested.to_padded_tensor(output, 0.0) if output.is_nested else output
    if isinstance(output, torch.nn.utils.rnn.PackedSequence):
        # (a namedtuple, whose first field is the packed (sum of lengths, width) data: rows of
        # all records interleaved by time step, which no reader of (batch, sequence, width) could use)
        return torch.nn.utils.rnn.pad_packed_sequence(output, batch_first=True)[0]
    if isinstance(output, (tuple, list)):
        for item in output:
            t = first_tensor(item)
            if t is not None:
                return t
    if getattr(output, "last_hidden_state", None) is not None:
        return output.last_hidden_state
    if isinstance(output, dict):
        for item in output.values():
            t = first_tensor(item)
            if t is not None:
                return t
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        # (a block of one's own returning a dataclass: its fields in their order, as a
        # namedtuple's; its output was read as holding no tensor)
        for f in dataclasses.fields(output):
            t = first_tensor(getattr(output, f.name, None))
            if t is not None:
                return t
    return None


SEQUENCE_FIRST = "_deepbase_sequence_first"     # the attribute Retain marks a sequence-first output with


def sequence_first(module: torch.nn.Module) -> str | None:
    """What makes ``module``'s 3-D outputs sequence first, (sequence, batch, width), or None: one
    of torch's recurrent or attention modules built without ``batch_first=True`` (nn.RNN, nn.LSTM,
    nn.GRU, nn.MultiheadAttention, nn.Transformer, an nn.TransformerEncoderLayer or
    DecoderLayer, or an nn.TransformerEncoder or Decoder of such layers). Their output's shape
    alone cannot say so when the longest record of a batch has as many symbols as the batch has
    records: (L, B, width) then reads as (B, L, width)."""
    nn = torch.nn
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        inner = next(iter(module.layers), None)
        return None if inner is None or sequence_first(inner) is None else \
            f"an nn.{type(module).__name__} of layers without batch_first=True"
    base = next((c for c in (nn.RNN, nn.LSTM, nn.GRU, nn.RNNBase, nn.MultiheadAttention, nn.Transformer,
                             nn.TransformerEncoderLayer, nn.TransformerDecoderLayer) if isinstance(module, c)), None)
    if base is None:
        return None
    if base in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
        first = getattr(getattr(module, "self_attn", None), "batch_first", True) is False
    else:
        first = getattr(module, "batch_first", True) is False
    return f"{type(module).__name__}, a subclass of torch's {base.__name__}, without batch_first=True" \
        if first and type(module) is not base else f"an nn.{base.__name__} without batch_first=True" if first else None


def _packed(output) -> bool:
    """Whether the tensor ``first_tensor`` reads from ``output`` came from a PackedSequence or a
    nested tensor (then padded batch first, whatever the module's own layout)."""
    while isinstance(output, (tuple, list)) and not isinstance(output, torch.nn.utils.rnn.PackedSequence) and output:
        output = output[0]
    return isinstance(output, torch.nn.utils.rnn.PackedSequence) or (isinstance(output, torch.Tensor)
                                                                     and output.is_nested)


def never_called(model: torch.nn.Module, name: str) -> str | None:
    """Why the module at ``name`` is never called as a module in a forward pass of ``model``, so
    that a hook on it never fires and it has no output to retain, with the layer to ask for
    instead; None where its structure does not say so (it may still be skipped by a branch of
    the forward pass). Two cases: a module with no forward of its own (nn.ModuleList,
    nn.ModuleDict: containers, only their members are called), and the ``out_proj`` of an
    nn.MultiheadAttention, whose forward reads out_proj's weight and bias in
    F.multi_head_attention_forward and never calls it (the attention module's own output is
    out_proj's: the attention output after the output projection)."""
    try:
        module = model.get_submodule(name)
    except (AttributeError, TypeError):
        return None
    if getattr(type(module), "forward", None) is torch.nn.Module.forward:
        members = [f"{name}.{n}" for n, _ in module.named_children()][:3]
        return (f"{type(module).__name__} has no forward of its own (a container: only its members are called, "
                f"never the container itself); ask for one of its members"
                + (f", e.g. {', '.join(map(repr, members))}" if members else ""))
    parent_name, _, leaf = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except (AttributeError, TypeError):
        return None
    if isinstance(parent, torch.nn.MultiheadAttention) and leaf == "out_proj" and parent.out_proj is module:
        instead = (f"ask for the attention module {parent_name!r} instead" if parent_name else
                   "wrap the attention in a module of your own and ask for that")
        return (f"the forward of {type(parent).__name__} {parent_name or '(the model itself)'!r} uses out_proj's "
                f"weight and bias directly (F.multi_head_attention_forward) and never calls out_proj as a module, "
                f"so it has no output to retain; {instead}: its output (the first of its (attn_output, weights)) is "
                f"the attention output after out_proj's projection")
    return None


def _marked(t, mark):
    """``t``, marked as a sequence-first output (``SEQUENCE_FIRST``) when ``mark`` says why. The
    mark is on the tensor object: ModelAdapter's default reader refuses it, while an adapter's
    own reader that transposes the output passes on a new, unmarked tensor."""
    if mark:
        setattr(t, SEQUENCE_FIRST, mark)
    return t


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
    for ever.

    A wait has no time limit (another thread's scan of the model may rightly take hours), but a
    thread that has waited ``warn_after`` seconds (None: never) gets a RuntimeWarning naming the
    holder: its thread, whether that thread is still alive, what it holds the model for and since
    when; so a hang (a Retain left open, a scan's generator never closed) can be told from a wait."""

    _locks = weakref.WeakKeyDictionary()      # root module -> its ModelLock
    _guard = threading.Lock()
    _ranks = itertools.count()
    warn_after: float | None = 60.0

    def __init__(self, what: str = "model"):
        self.lock = threading.Lock()
        self.owner, self.depth = None, 0
        self.rank = next(ModelLock._ranks)     # (made under _guard) the global order of acquisition
        self.what = what                       # the model, as the wait's warning names it
        self.holder = None                     # (thread name, thread id, time.monotonic() taken, purpose)

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelLock":
        with cls._guard:
            lock = cls._locks.get(model)
            if lock is None:
                lock = cls._locks[model] = cls(f"{type(model).__name__} (object id {id(model):#x})")
            return lock

    def acquire(self):
        me = threading.get_ident()
        if self.owner == me:
            self.depth += 1
            return
        start = time.monotonic()
        wait = self.warn_after
        if wait is None or not self.lock.acquire(timeout=max(float(wait), 1e-3)):
            if wait is not None:
                self._report_wait(time.monotonic() - start)
            self.lock.acquire()
        self.owner, self.depth = me, 1
        self.holder = (threading.current_thread().name, me, time.monotonic(), "")

    def _report_wait(self, waited: float) -> None:
        """Warn that this thread has waited ``waited`` seconds for the lock, naming its holder."""
        holder = self.holder                   # (one read: the holder may release meanwhile)
        if holder is None:
            who = "a holder that has not said who it is (being released or taken now)"
        else:
            name, ident, since, why = holder
            alive = any(t.ident == ident for t in threading.enumerate())
            who = (f"thread {name!r} (id {ident}, {'still running' if alive else 'ended'}) for "
                   f"{why or 'its forward passes'}, since {time.monotonic() - since:.0f} s ago")
        warnings.warn(
            f"thread {threading.current_thread().name!r} has waited {waited:.0f} s for model {self.what}: "
            f"another Retain holds its forward hooks, {who}; this thread goes on "
            f"waiting until that one is closed. If no other query or scan of this model is running, a Retain "
            f"was left open (a `with Retain(...)` never left, a scan's generator never closed, or a thread "
            f"stuck in its forward pass): close it, or find that thread in faulthandler.dump_traceback()",
            RuntimeWarning, stacklevel=3)

    def release(self):
        self.depth -= 1
        if self.depth == 0:
            self.owner = None
            self.holder = None
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
    ``torch.vmap``, where the check cannot run). (A write that leaves the first pass's values as
    they were, such as a clamp that no value of that batch reaches, is not seen.)

    ``calls`` counts each module's calls since the last ``clear()``: a module that ran more than
    once in a pass kept its last call's output (``run_until_retained`` warns of it)."""

    def __init__(self, model: torch.nn.Module, layers, detach: bool = True, copy: bool = False):
        self.modules = resolve_modules(model, layers)
        self.model = model
        self.model_lock = ModelLock.of(model)
        self.calls: dict[str, int] = {}
        self._warned: set = set()        # what run_until_retained has warned of (once per Retain)
        self._locked = False
        self.detach = detach
        self.armed = False            # stops only the forward pass run for it (run_until_retained)
        self.outputs: dict[str, torch.Tensor | None] = {}
        self.copy = set(self.modules) if copy else set()      # outputs kept as copies
        self.checked = set(self.copy)                          # outputs known to stay as given
        self._copies: dict[str, torch.Tensor] = {}             # this pass's copies, to check
        self._handles = []

    def _hook(self, name):
        seq_first = sequence_first(self.modules[name])

        def hook(module, inputs, output):
            t = first_tensor(output)
            if t is not None and self.detach:
                t = t.detach()
            mark = seq_first if seq_first and t is not None and t.dim() == 3 and not _packed(output) else None
            if t is not None and name in self.copy:
                t = t.clone()
            elif t is not None and name not in self.checked:
                self._copies[name] = _marked(t.clone(), mark)
            self.outputs[name] = _marked(t, mark)
            self.calls[name] = self.calls.get(name, 0) + 1
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
        lock = self.model_lock
        lock.acquire()              # another thread's Retain on this model: wait for it
        self._locked = True
        holder = lock.holder
        if lock.depth == 1 and holder is not None and not holder[3]:      # what the wait's warning names
            names = list(self.modules)
            lock.holder = holder[:3] + (f"a Retain of layers {names[:5]}{' ...' if len(names) > 5 else ''}",)
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
        self.calls.clear()
        self._copies.clear()


def mode_dependent(module: torch.nn.Module) -> bool:
    """Whether ``module``'s own computation may follow its training flag: torch's dropout,
    batch and instance norms, RNNs (dropout between layers) and attention, and every module of
    other code (which may read ``self.training``); not torch's Linear, Embedding, activations."""
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.dropout import _DropoutNd
    return (not type(module).__module__.startswith("torch.nn.")
            or isinstance(module, (_DropoutNd, _NormBase, torch.nn.RNNBase, torch.nn.MultiheadAttention)))


def run_until_retained(adapter, encoded, ret: Retain) -> None:
    """``adapter.forward(encoded)`` for ``ret`` (its outputs cleared first), ended without error
    once ``ret`` holds every output where the adapter allows early exit for those modules
    (``ModelAdapter.exits_early``, checked once per set of layers). Other Retains on the same
    modules (another model sharing them, or one whose stream is paused) record but never stop
    this pass.

    Warns (once per Retain) when the model has submodules in training mode whose computation may
    depend on it (``mode_dependent``: dropout then makes the activations random, BatchNorm reads
    the batch's statistics) and when a named module ran more than once in the pass (its last
    call's output is kept). A named module that did not run at all and never can (``never_called``:
    a container, the out_proj of an nn.MultiheadAttention) is an ActivationError naming it and
    the layer to ask for instead, at the first pass; one skipped by a branch of the forward pass
    gives no output, which the adapter's reader reports."""
    exits = adapter.exits_early(list(ret.modules))     # (its first check runs a forward pass of its own)
    warn = getattr(adapter, "warn_padding", None)
    if warn is not None:                               # CharAdapter: a model that sees this batch's padding
        warn(list(ret.modules), encoded)
    ret.clear()
    if ("training",) not in ret._warned:
        ret._warned.add(("training",))
        training = [n or "(root)" for n, m in ret.model.named_modules() if m.training and mode_dependent(m)]
        if training:
            warnings.warn(
                f"model {type(ret.model).__name__} runs with {len(training)} submodule(s) in training mode "
                f"({', '.join(training[:5])}{' ...' if len(training) > 5 else ''}): dropout makes its activations "
                f"random and BatchNorm normalises by each batch's statistics; call .eval() on the model before "
                f"the scan unless this is meant", UserWarning, stacklevel=2)
    ret.armed = exits
    try:
        adapter.forward(encoded)
    except StopForward:
        pass
    finally:
        ret.armed = False
    ret.settle()
    for name in ret.modules:
        why = None if name in ret.calls else never_called(ret.model, name)
        if why:
            raise ActivationError(f"layer {name!r} never ran in the forward pass: {why}")
    for name, n in ret.calls.items():
        if n > 1 and ("calls", name) not in ret._warned:
            ret._warned.add(("calls", name))
            warnings.warn(
                f"layer {name!r} ran {n} times in one forward pass (a module shared across depths, or called "
                f"in a loop); its activations are those of its last call. To read another call, retain a module "
                f"that runs once per pass (wrap that call in a module of its own)", UserWarning, stacklevel=2)


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

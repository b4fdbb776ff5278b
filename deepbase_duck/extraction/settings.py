"""A module's settings: the plain values it keeps outside its weights, which its forward reads.

``nn.LeakyReLU(negative_slope)``, ``nn.LayerNorm(eps)``, a custom module's ``self.scale = 2.0``
or ``self.ablate = [3, 7]``: two models with the same weights and classes that differ in one of
these compute different things. Two users read them: the model's identity (``model_checksum``,
``state_fingerprint`` in adapters.py), so that what is stored from one model is never served as
the other's, and the fused multi-model pass (engine/stacking.py), which runs the first model's
settings with every model's weights and must refuse models whose settings differ.

What is not a setting: torch's own bookkeeping (hooks, the ``_parameters`` dict, the training
flag, which the identity covers by its own rule), the weights themselves, submodules (walked one
by one), values of other kinds (a config object, a function, a weakref: not comparable across
processes), and the bookkeeping that transformers keeps on its modules (``name_or_path`` is where
the weights were read from on this machine, not what they compute). The identity alone also
covers a submodule's functions (``self.act = torch.tanh``, a lambda, a functools.partial, a
bound method: ``function_text``), by what they name and their code, not by value: the same
weights with ``torch.relu`` instead compute another thing. Config objects (a SimpleNamespace, a
dataclass, transformers' PretrainedConfig) stay out of it: they hold machine-dependent fields
(paths, device maps, kernel choices), and what they change is the adapter's ``variant``'s to say.
The identity also leaves out what a forward pass itself changes (``volatile``: a call counter,
a lazily grown cache), which is the module's state, not its configuration; and a device
(``self.device``) only counts as present: the same model on another machine is the same model,
as its weights, hashed on the CPU, are.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import types
import weakref

import numpy as np
import torch

PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
# transformers' bookkeeping on its modules: where the weights came from, parallelism plans,
# initialisation and kernel flags (none changes what a loaded model in eval mode computes)
LIBRARY = frozenset({"name_or_path", "_name_or_path", "_is_hf_initialized", "_tp_plan", "_ep_plan", "_pp_plan",
                     "_fsdp_plan", "_tp_size", "_device_mesh", "all_tied_weights_keys", "_weight_conversions",
                     "_use_kernels", "kernel_config", "gradient_checkpointing", "_keep_in_fp32_modules",
                     "_keep_in_fp32_modules_strict", "_skip_keys_device_placement"})
BOOKKEEPING = frozenset(vars(torch.nn.Module())) | LIBRARY   # torch's own (hooks, _parameters, training, ...)
# the bookkeeping of identities before session 19: _skip_keys_device_placement (accelerate's
# placement hint, set{} in transformers 5.23, {'cache'} in 5.24) was read as a setting, so an
# upgrade of transformers changed MiniLM's identity; legacy_checksums computes the earlier one
EARLIER_BOOKKEEPING = BOOKKEEPING - {"_skip_keys_device_placement"}
UNSET = object()
# attributes accelerate sets on a module it places on devices (device_map loading: a forward
# wrapped in a partial, the original kept as _old_forward, the hook): which modules get them
# follows the machine's devices, not what the model computes
HOOKED = frozenset({"forward", "_old_forward", "_hf_hook"})


def comparable(v, weights: set) -> bool:
    """Whether ``v`` is a value a setting can hold and be compared by (``same``): a number
    (numpy's included), string, dtype, device or None; a tensor or numpy array that is no
    parameter or buffer (those are the weights); a tuple, list, set or dict of such. Anything
    else (a config object, a function, a weakref, a list holding the weights, as nn.LSTM keeps
    them) is not compared."""
    if isinstance(v, PLAIN) or isinstance(v, (np.ndarray, np.generic)):
        return True
    if isinstance(v, torch.Tensor):
        return not isinstance(v, torch.nn.Parameter) and id(v) not in weights
    if isinstance(v, (tuple, list)):
        return all(comparable(x, weights) for x in v)
    if isinstance(v, (set, frozenset)):
        return all(isinstance(x, PLAIN) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, PLAIN) and comparable(x, weights) for k, x in v.items())
    return False


def same(a, b) -> bool:
    """Equality of two settings (``comparable`` values); tensors and arrays by dtype, shape,
    device and every value (NaN equal to NaN)."""
    if isinstance(a, (torch.Tensor, np.ndarray)) or isinstance(b, (torch.Tensor, np.ndarray)):
        if type(a) is not type(b):
            return False
        if isinstance(a, np.ndarray):
            return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device or a.layout != b.layout:
            return False
        a, b = a.detach(), b.detach()
        if a.is_sparse:
            a, b = a.to_dense(), b.to_dense()
        return bool(((a == b) | (a != a) & (b != b)).all())
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if a is UNSET or b is UNSET:
        return a is b
    try:
        return bool(a == b)
    except Exception:
        return False


def show(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor of shape {tuple(v.shape)}, {v.dtype}"
    if isinstance(v, np.ndarray):
        return f"array of shape {v.shape}, {v.dtype}"
    if v is UNSET:
        return "'<unset>'"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def weight_ids(module: torch.nn.Module) -> set:
    """The ids of every parameter and buffer of ``module`` (a plain attribute aliasing one of them
    is a weight, not a setting)."""
    return {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}


def settings(module: torch.nn.Module, weights: set | None = None) -> dict:
    """A module's settings: its attributes outside torch's (and transformers') bookkeeping and its
    weights, holding numbers, strings, booleans, None, dtypes, devices, tensors or arrays (a mask
    or scale kept as a plain attribute, not registered as a buffer), or tuples, lists, sets and
    dicts of them (``hidden_size``, ``p``, a flag, ``[3, 1]``). Parameters, buffers and
    submodules are not settings (they are compared, or hashed, on their own)."""
    if weights is None:
        weights = weight_ids(module)
    return {k: v for k, v in vars(module).items() if k not in BOOKKEEPING and comparable(v, weights)}


# -- the identity's view of the settings ---------------------------------------------------------

# submodule -> names of its settings that a forward pass changes (``find_volatile``); weakly held,
# so that ``model_checksum(module)`` called without the adapter leaves them out as well
_VOLATILE: "weakref.WeakKeyDictionary[torch.nn.Module, frozenset]" = weakref.WeakKeyDictionary()


def _encode(v, tensors: list) -> str:
    """``v`` (a ``comparable`` value) as text that is the same for equal values in any process:
    by type and value, dict and set entries sorted, arrays by dtype, shape and a digest of their
    bytes. A tensor is written as a reference to its place in ``tensors`` (its values are
    hashed, or fingerprinted, by the caller); a device only as present."""
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, torch.device):
        return "device"
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, torch.Tensor):
        tensors.append(v)
        return f"tensor#{len(tensors) - 1}"
    if isinstance(v, (np.ndarray, np.generic)):
        a = np.asarray(v)
        if a.dtype.hasobject:
            return f"ndarray{a.shape}[{_encode(a.tolist(), tensors)}]"
        return f"ndarray:{a.dtype.str}:{a.shape}:{hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()}"
    if isinstance(v, PLAIN):
        return f"{type(v).__name__}:{v!r}"
    if isinstance(v, (tuple, list)):
        return f"{type(v).__name__}[{','.join(_encode(x, tensors) for x in v)}]"
    if isinstance(v, (set, frozenset)):
        return f"{type(v).__name__}{{{','.join(sorted(_encode(x, tensors) for x in v))}}}"
    if isinstance(v, dict):
        items = sorted((_encode(k, tensors), x) for k, x in v.items())       # (keys are unique)
        return f"{type(v).__name__}{{{','.join(f'{k}:{_encode(x, tensors)}' for k, x in items)}}}"
    return f"<{type(v).__qualname__}>"              # (not reached: comparable() says which values come here)


def identity_text(module: torch.nn.Module, functions: bool = True) -> tuple[str, list]:
    """Every submodule's settings (``settings``, less those a forward pass changes) as one text,
    submodules in ``named_modules`` order and each one's settings by name (not by the order they
    were set in), and the tensors it refers to
    (``tensor#i``), for ``model_checksum`` (which hashes their values) and ``state_fingerprint``
    (which summarises them). One walk over the submodules' attributes: no tensor is read.
    With ``functions``, an attribute holding a function (``function_text``) adds its line too;
    a model without one (nor transformers' ``_skip_keys_device_placement``, left out since) has
    the text it had before functions were covered, and so its checksum; ``functions=False`` gives
    that earlier text for any model (``legacy_checksums``): no function lines, and
    ``EARLIER_BOOKKEEPING``."""
    lines, tensors, weights, places = [], [], None, {}
    bookkeeping = BOOKKEEPING if functions else EARLIER_BOOKKEEPING
    for name, m in module.named_modules():
        skip, attrs = _VOLATILE.get(m, ()), vars(m)
        if "_hf_hook" in attrs:
            skip = frozenset(skip) | HOOKED      # (accelerate's device placement: not the model's)
        for k in sorted(attrs, key=str):
            if k in bookkeeping or k in skip:
                continue
            v = attrs[k]
            if isinstance(v, (bool, int, float, str, type(None))):      # the common case, first
                lines.append(f"{name}:{k}={_encode(v, tensors)}")
                continue
            if weights is None and _holds_tensor(v):
                weights = weight_ids(module)
            if comparable(v, weights or ()):
                lines.append(f"{name}:{k}={_encode(v, tensors)}")
            elif functions and _function_like(v):
                if not places:
                    places.update((id(sub), n) for n, sub in module.named_modules())
                if weights is None:
                    weights = weight_ids(module)
                text = function_text(v, tensors, weights, places)
                if text is not None:
                    lines.append(f"{name}:{k}={text}")
    return "\n".join(lines), tensors


_BUILTINS = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
             types.MethodWrapperType, types.ClassMethodDescriptorType)
_OPS = tuple(c for c in (getattr(getattr(torch, "_ops", None), n, None) for n in ("OpOverloadPacket", "OpOverload"))
             if isinstance(c, type))


def _function_like(v) -> bool:
    """Whether ``v`` is, or is a tuple, list or dict holding, a function ``function_text`` covers
    (a cheap test before the encoding)."""
    if isinstance(v, (types.FunctionType, types.MethodType, functools.partial, type) + _BUILTINS + _OPS):
        return True
    if isinstance(v, (tuple, list)):
        return any(_function_like(x) for x in v)
    if isinstance(v, dict):
        return any(_function_like(x) for x in v.values())
    return False


def function_text(v, tensors: list, weights, places: dict, depth: int = 0) -> str | None:
    """A function kept as an attribute as text that is the same for the same function in any
    process, or None for a value that is no function (nor a tuple, list or dict of functions and
    settings): a Python function of a module's top level by its module and qualname (as a class
    is: another Python's bytecode for it is the same function), a lambda or a function defined
    in another one (``<locals>``) also by a digest of its code (constants and names included,
    line numbers not), each with its defaults and closure (``_part_text``), so that two lambdas
    made per model with the same code are one function and lambdas of other code differ;
    a builtin or torch op by its module and name; a class by its module and qualname; a
    functools.partial by its function, arguments and keywords; a bound method by its function
    and what it is bound to (a module of this model by its place in ``named_modules``, from
    ``places``: {id(submodule): name}). What a function reads from its module's globals is not
    covered (as a class's code is not): that is the ``variant``'s to say."""
    if depth > 6:
        return "<deep>"
    if isinstance(v, types.FunctionType):
        cells = []
        for c in v.__closure__ or ():
            try:
                cells.append(_part_text(c.cell_contents, tensors, weights, places, depth))
            except ValueError:                                  # (an empty cell)
                cells.append("<empty>")
        parts = [_part_text(v.__defaults__, tensors, weights, places, depth),
                 _part_text(v.__kwdefaults__, tensors, weights, places, depth), f"[{','.join(cells)}]"]
        if "<" not in v.__qualname__:
            # a function of a module's top level (torch.nn.functional.gelu, a user's def act(x)):
            # by its name, as a class is, so that an upgrade of Python or of its library (another
            # bytecode for the same function) keeps the identity, and the stored data with it
            return f"function:{v.__module__}.{v.__qualname__}:{':'.join(parts)}"
        return f"function:{v.__module__}.{v.__qualname__}:{_code_digest(v.__code__)}:{':'.join(parts)}"
    if isinstance(v, types.MethodType):
        func = function_text(v.__func__, tensors, weights, places, depth + 1)
        return f"method:{func}@{_part_text(v.__self__, tensors, weights, places, depth)}"
    if isinstance(v, functools.partial):
        func = function_text(v.func, tensors, weights, places, depth + 1)
        return (f"partial:{func if func is not None else _part_text(v.func, tensors, weights, places, depth)}"
                f":{_part_text(v.args, tensors, weights, places, depth)}"
                f":{_part_text(v.keywords, tensors, weights, places, depth)}")
    if isinstance(v, _BUILTINS):
        owner = getattr(v, "__self__", None)
        if owner is None or isinstance(owner, types.ModuleType):        # torch.tanh, math.sin
            cls = getattr(v, "__objclass__", None)                        # torch.Tensor.relu
            where = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else v.__module__
            return f"builtin:{where}.{v.__name__}"
        if isinstance(owner, type):                                       # dict.fromkeys
            return f"builtin:{owner.__module__}.{owner.__qualname__}.{v.__name__}"
        cls = type(owner)                                                 # a tensor's bound method
        return (f"builtin:{cls.__module__}.{cls.__qualname__}.{v.__name__}"
                f"@{_part_text(owner, tensors, weights, places, depth)}")
    if _OPS and isinstance(v, _OPS):
        return f"op:{v}"
    if isinstance(v, type):
        return f"class:{v.__module__}.{v.__qualname__}"
    if isinstance(v, (tuple, list, dict)) and _function_like(v):
        return _part_text(v, tensors, weights, places, depth)
    return None


def _part_text(v, tensors: list, weights, places: dict, depth: int) -> str:
    """A value a function holds (a default, a closure cell, a partial's argument, what a method
    is bound to): a setting by value (``_encode``), a function by ``function_text``, a tuple,
    list or dict of these item by item, a module of this model by its place, anything else (a
    config object, a parameter) by its type only."""
    if comparable(v, weights):
        return _encode(v, tensors)
    if isinstance(v, torch.nn.Module) and id(v) in places:
        return f"module@{places[id(v)]}"
    if isinstance(v, (tuple, list)) and depth <= 6:
        return f"{type(v).__name__}[{','.join(_part_text(x, tensors, weights, places, depth + 1) for x in v)}]"
    if isinstance(v, dict) and depth <= 6 and all(isinstance(k, PLAIN) for k in v):
        items = sorted(((_encode(k, tensors), x) for k, x in v.items()), key=lambda kx: kx[0])  # (not by value)
        return f"dict{{{','.join(f'{k}:{_part_text(x, tensors, weights, places, depth + 1)}' for k, x in items)}}}"
    text = function_text(v, tensors, weights, places, depth + 1) if _function_like(v) else None
    return text if text is not None else f"<{type(v).__module__}.{type(v).__qualname__}>"


def _code_digest(code: types.CodeType) -> str:
    """sha256 of what a code object computes: its bytecode, names, argument counts, flags and
    constants (nested code objects by their digest, sets sorted); not its file or line numbers,
    so that a lambda moved down a file is the same function."""
    def const(c):
        if isinstance(c, types.CodeType):
            return f"code:{_code_digest(c)}"
        if isinstance(c, tuple):
            return f"({','.join(const(x) for x in c)})"
        if isinstance(c, frozenset):
            return f"frozenset{{{','.join(sorted(const(x) for x in c))}}}"
        return f"{type(c).__name__}:{c!r}"
    head = (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags, code.co_names,
            code.co_varnames, code.co_freevars, code.co_cellvars)
    text = f"{head!r}\n{code.co_code.hex()}\n{','.join(const(c) for c in code.co_consts)}"
    return hashlib.sha256(text.encode()).hexdigest()


def _holds_tensor(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (tuple, list)):
        return any(_holds_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_holds_tensor(x) for x in v.values())
    return False


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A setting tensor's dtype, shape and values as bytes (read on the CPU: its device is not
    part of it); sparse and quantized tensors by their dense values."""
    t = t.detach()
    head = f"{t.dtype}{tuple(t.shape)}".encode()
    if t.is_meta:
        return head + b"meta"
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch.strided:
        t = t.to_dense()
    flat = t.to("cpu").contiguous().reshape(-1)
    return head + (flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def _snapshot(module: torch.nn.Module) -> dict:
    """{(submodule, name): (text, value)} of every setting and function attribute (as the
    identity writes it: ``function_text``), tensors by their bytes."""
    weights, out = weight_ids(module), {}
    places = {id(sub): n for n, sub in module.named_modules()}
    for m in module.modules():
        for k, v in vars(m).items():
            if k in BOOKKEEPING:
                continue
            tensors = []
            if comparable(v, weights):
                text = _encode(v, tensors)
            elif _function_like(v):
                text = function_text(v, tensors, weights, places)
                if text is None:
                    continue
            else:
                continue
            out[(m, k)] = (text + "".join(tensor_bytes(t).hex() for t in tensors), v)
    return out


def find_volatile(module: torch.nn.Module, run) -> None:
    """Which settings ``run()`` (one forward pass over an example) changes: those are the module's
    state (a call counter, a cache grown on first use), not its configuration, and would change
    the model's identity at every query. They are recorded (``_VOLATILE``) and left out of it, and
    their values from before the pass are put back, so that this pass changes nothing the model
    keeps. A pass that fails still counts what it changed; one that cannot run changes nothing.
    A function the pass stores (the partial or lambda it last used) is state too; functions are
    put back as they were, not copied (a bound method's copy would copy its module)."""
    before = _snapshot(module)
    saved = {key: v if isinstance(v, (bool, int, float, str, bytes, type(None))) or _function_like(v)
             else copy.deepcopy(v) for key, (_, v) in before.items()}
    try:
        run()
    except Exception:             # (the scan itself reports a failing model)
        pass
    finally:
        after = _snapshot(module)
        changed: dict = {}
        for key in set(before) | set(after):
            if (before.get(key) or (None,))[0] != (after.get(key) or (None,))[0]:
                changed.setdefault(key[0], set()).add(key[1])
        for m, names in changed.items():
            _VOLATILE[m] = frozenset(names) | _VOLATILE.get(m, frozenset())
            for k in names:
                if (m, k) in saved:
                    try:
                        setattr(m, k, saved[(m, k)])
                    except Exception:          # (a read-only attribute: left as the pass made it)
                        pass

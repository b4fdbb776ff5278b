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
the weights were read from on this machine, not what they compute). The identity also leaves
out what a forward pass itself changes (``volatile``: a call counter, a lazily grown cache),
which is the module's state, not its configuration; and a device (``self.device``) only counts
as present: the same model on another machine is the same model, as its weights, hashed on the
CPU, are.
"""
from __future__ import annotations

import copy
import hashlib
import weakref

import numpy as np
import torch

PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
# transformers' bookkeeping on its modules: where the weights came from, parallelism plans,
# initialisation and kernel flags (none changes what a loaded model in eval mode computes)
LIBRARY = frozenset({"name_or_path", "_name_or_path", "_is_hf_initialized", "_tp_plan", "_ep_plan", "_pp_plan",
                     "_fsdp_plan", "_tp_size", "_device_mesh", "all_tied_weights_keys", "_weight_conversions",
                     "_use_kernels", "kernel_config", "gradient_checkpointing", "_keep_in_fp32_modules",
                     "_keep_in_fp32_modules_strict"})
BOOKKEEPING = frozenset(vars(torch.nn.Module())) | LIBRARY   # torch's own (hooks, _parameters, training, ...)
UNSET = object()


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


def identity_text(module: torch.nn.Module) -> tuple[str, list]:
    """Every submodule's settings (``settings``, less those a forward pass changes) as one text,
    submodules in ``named_modules`` order and each one's settings by name (not by the order they
    were set in), and the tensors it refers to
    (``tensor#i``), for ``model_checksum`` (which hashes their values) and ``state_fingerprint``
    (which summarises them). One walk over the submodules' attributes: no tensor is read."""
    lines, tensors, weights = [], [], None
    for name, m in module.named_modules():
        skip, attrs = _VOLATILE.get(m, ()), vars(m)
        for k in sorted(attrs, key=str):
            if k in BOOKKEEPING or k in skip:
                continue
            v = attrs[k]
            if isinstance(v, (bool, int, float, str, type(None))):      # the common case, first
                lines.append(f"{name}:{k}={_encode(v, tensors)}")
                continue
            if weights is None and _holds_tensor(v):
                weights = weight_ids(module)
            if comparable(v, weights or ()):
                lines.append(f"{name}:{k}={_encode(v, tensors)}")
    return "\n".join(lines), tensors


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
    """{(submodule, name): (text, value)} of every setting, tensors by their bytes."""
    weights, out = weight_ids(module), {}
    for m in module.modules():
        for k, v in settings(m, weights).items():
            tensors = []
            text = _encode(v, tensors)
            out[(m, k)] = (text + "".join(tensor_bytes(t).hex() for t in tensors), v)
    return out


def find_volatile(module: torch.nn.Module, run) -> None:
    """Which settings ``run()`` (one forward pass over an example) changes: those are the module's
    state (a call counter, a cache grown on first use), not its configuration, and would change
    the model's identity at every query. They are recorded (``_VOLATILE``) and left out of it, and
    their values from before the pass are put back, so that this pass changes nothing the model
    keeps. A pass that fails still counts what it changed; one that cannot run changes nothing."""
    before = _snapshot(module)
    saved = {key: copy.deepcopy(v) if not isinstance(v, (bool, int, float, str, bytes, type(None))) else v
             for key, (_, v) in before.items()}
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

"""Model adapters: a torch module together with the encoder that turns records into inputs.

An adapter answers three questions for the engine:
- ``encode(texts)``: the model inputs for a batch of records and, per record, the symbols: the
  character span [start, end) of each symbol, its token text, and the index of the symbol along
  the sequence axis of layer outputs;
- ``forward(encoded)``: run the module (hooks see every layer);
- ``symbol_activations(output, encoded)``: one (n_symbols, width) matrix per record from a layer
  output (default: outputs shaped (batch, sequence, width), indexed by the symbols' indices).

``tokenization`` names the encoder; symbols and cached activations are keyed by it, so change it
whenever the encoder changes.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ActivationError, DeepBaseError
from .hooks import SEQUENCE_FIRST, mode_dependent, never_called
from .settings import find_volatile, identity_text, tensor_bytes


@dataclass
class Encoded:
    inputs: object                      # a tensor (or PackedSequence), a tuple of them (the module's positional
                                        # arguments) or a dict (its keyword arguments)
    starts: list[np.ndarray]            # per record: int32 character starts of its symbols
    ends: list[np.ndarray]              # per record: int32 character ends (exclusive)
    tokens: list[list[str]] | None      # per record: token text of each symbol (optional)
    index: list[np.ndarray] = field(default_factory=list)  # per record: sequence index of each symbol

    def __post_init__(self):
        if not self.index:
            self.index = [np.arange(len(s), dtype=np.int64) for s in self.starts]


def to_device(inputs, device):
    """``inputs`` with every tensor in it on ``device``: a tensor, a PackedSequence, or a dict,
    list, tuple or namedtuple of them (nested), of the same type."""
    if isinstance(inputs, (torch.Tensor, torch.nn.utils.rnn.PackedSequence)):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, tuple) and hasattr(inputs, "_fields"):          # a namedtuple: fields by position
        return type(inputs)(*(to_device(v, device) for v in inputs))
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


@contextlib.contextmanager
def tf32_mode(allowed: bool | None):
    """torch's TF32 switches for CUDA matrix products and cuDNN set to ``allowed`` inside the
    block and restored after; None leaves them as they are. Through the switches the user set
    them with: torch 2.9 added ``fp32_precision`` settings, and once they are set, reading the
    older ``allow_tf32`` raises (a RuntimeError on "mix of the legacy and new APIs"), which
    failed every forward pass of a model on CUDA."""
    if allowed is None:
        yield
        return
    try:
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    except RuntimeError:
        with _fp32_precision("tf32" if allowed else "ieee"):
            yield
        return
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(allowed)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def global_tf32() -> bool:
    """Whether torch's global switches let CUDA matrix products or cuDNN round float32 to TF32,
    read through the API they were set with: the older ``allow_tf32`` raises once the newer
    ``fp32_precision`` settings were set (see tf32_mode). A newer setting of 'none' takes its
    parent's (cuDNN's, then torch.backends' own)."""
    try:
        return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        b = torch.backends

        def resolved(*chain):
            return next((s.fp32_precision for s in chain if s.fp32_precision != "none"), "ieee")
        return "tf32" in (resolved(b.cuda.matmul, b), resolved(b.cudnn.conv, b.cudnn, b),
                          resolved(b.cudnn.rnn, b.cudnn, b))


@contextlib.contextmanager
def _fp32_precision(value: str):
    """tf32_mode through torch's ``fp32_precision`` settings of CUDA matrix products, cuDNN
    convolutions and cuDNN RNNs: set to ``value`` inside the block, each restored after."""
    b = torch.backends
    switches = [b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn]
    old = [s.fp32_precision for s in switches]
    try:
        for s in switches:
            s.fp32_precision = value
        yield
    finally:
        for s, v in zip(switches, old):
            s.fp32_precision = v


def default_device(device=None) -> torch.device:
    """``device`` as a torch.device; None: CUDA where it is available, else the CPU (chosen at run
    time, for models, inspectors and layer comparisons alike). A device torch does not know, or
    CUDA where there is none, is refused with its name."""
    if not device:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeepBaseError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N' (or leave it out: CUDA "
                            f"where available, else the CPU)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeepBaseError(f"device {device!r} asked for, but torch sees no CUDA device on this machine "
                            f"(torch {torch.__version__}); use 'cpu' or leave the device out")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeepBaseError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s)")
    return dev


def model_checksum(module: torch.nn.Module, variant: str = "") -> str:
    """The model's identity, the key of everything stored from it (activations, cached scores):
    sha256 over its weights (``weights_checksum``), the class of every submodule (by its dotted
    path), every submodule's settings (``settings.identity_text``: the plain values it keeps
    outside its weights, ``LeakyReLU.negative_slope``, ``LayerNorm.eps``, a custom module's
    ``self.scale`` or list of units to ablate, small tensors and arrays by value; not what a
    forward pass itself changes, as a call counter; and the functions it keeps as attributes,
    ``self.act = torch.tanh``, a lambda, a partial or a bound method, by what they name and their
    code: ``settings.function_text``), the submodules in training mode whose
    computation may follow it (``hooks.mode_dependent``; none for a model in eval mode, as
    ModelAdapter leaves it: dropout and BatchNorm's batch statistics change what it computes, so
    the same weights put back in ``train()`` mode are another model, never served the eval
    model's stored activations or scores, nor the reverse) and the adapter's ``variant``. The
    classes and settings matter because a model's code and configuration are part of what it
    computes: the same weights in a subclass whose forward ablates a unit, or with another
    slope, are another model. What none of these show (a hook, a setting kept in an object of
    its own: a config object, which holds machine-dependent fields) is the ``variant``'s to say.
    Stores written before settings were covered hold ``model_checksum_v2``, and those written
    before functions were covered ``model_checksum_v3_no_functions`` (see ``legacy_checksums``)."""
    return _identity(module, variant, settings=True)


def model_checksum_v2(module: torch.nn.Module, variant: str = "") -> str:
    """The identity stores written before settings were covered hold ('deepbase-duck model v2':
    weights, submodule classes, training mode, variant), computed as then."""
    return _identity(module, variant, settings=False)


def model_checksum_v3_no_functions(module: torch.nn.Module, variant: str = "") -> str:
    """The identity stores written before function attributes were covered hold: v3 without
    their lines (``identity_text(functions=False)``). For a model without such attributes it is
    ``model_checksum`` itself; for one with them (``torch.tanh`` or ``torch.relu`` kept as
    ``self.act``) it is the checksum two such models shared then."""
    return _identity(module, variant, settings=True, functions=False)


def _identity(module: torch.nn.Module, variant: str, settings: bool, functions: bool = True,
              weights: str | None = None) -> str:
    """model_checksum (v3, ``settings``; the function attributes' lines with ``functions``: for
    a model without them the same text, so the same checksum, as before they were covered) or
    model_checksum_v2; ``weights``: ``weights_checksum(module)`` if already computed."""
    h = hashlib.sha256(b"deepbase-duck model v3\n" if settings else b"deepbase-duck model v2\n")
    h.update((weights or weights_checksum(module)).encode())
    training = []
    for name, m in module.named_modules():
        h.update(f"\n{name}={type(m).__module__}.{type(m).__qualname__}".encode())
        if m.training and mode_dependent(m):
            training.append(name)
    if settings:
        text, tensors = identity_text(module, functions=functions)
        h.update(b"\nsettings\n" + text.encode())
        for t in tensors:
            h.update(b"\n" + tensor_bytes(t))
    if training:
        h.update(("\ntraining=" + "\n".join(training)).encode())
    h.update(f"\nvariant={variant}".encode())
    return h.hexdigest()


def legacy_checksums(module: torch.nn.Module, variant: str = "") -> tuple[str, ...]:
    """The checksums earlier stores may hold for this model as it is now: its weights' alone
    (stores before identities covered module classes), ``model_checksum_v2`` (before they
    covered settings) and ``model_checksum_v3_no_functions`` (before they covered function
    attributes). A row holding one of them is this model's, to adopt (Session's
    ``_adopt_legacy_checksum``, on register_model and on loading the model); where another model
    shared that identity in the store, its cached scores are not reused
    (``_shared_earlier_identity``)."""
    weights = weights_checksum(module)          # (read once: every tensor of the model)
    return (weights, _identity(module, variant, settings=False, weights=weights),
            _identity(module, variant, settings=True, functions=False, weights=weights))


_BLOCK = 1024        # state_fingerprint's position weights: a tensor is read as rows of this many values


@functools.lru_cache(maxsize=256)
def _position_weights(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``n`` fixed pseudo-random weights in [0.5, 1.5) (seeded by ``n``), on ``device``."""
    g = torch.Generator().manual_seed(0x5EED + n)
    return (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)


def _positional_sum(flat: torch.Tensor) -> torch.Tensor:
    """A sum of the values of a 1-D tensor, each weighted by a fixed pseudo-random weight of its
    position (float64): moving values around (units swapped or permuted, a row shifted) changes
    it, which the plain sum and the norm do not see. The tensor is read as rows of ``_BLOCK``
    values, value (r, c) weighing column weight c times row weight r: one matrix-vector product
    (no copy of a float32 or float64 tensor) and O(n / _BLOCK + _BLOCK) weights."""
    x = flat if flat.dtype in (torch.float32, torch.float64) else flat.to(torch.float32 if flat.is_floating_point()
                                                                          else torch.float64)
    n = x.numel()
    cols = min(n, _BLOCK)
    rows, tail = divmod(n, cols)
    wc = _position_weights(cols, x.device, x.dtype)
    per_row = torch.mv(x[:rows * cols].view(rows, cols), wc).to(torch.float64)
    total = torch.dot(per_row, _position_weights(rows, x.device, torch.float64))
    if tail:                       # the last, partial row: row weight 2 (outside the others' range)
        total = total + 2.0 * torch.dot(x[rows * cols:], wc[:tail]).to(torch.float64)
    return total


def _probe(t: torch.Tensor, probes: dict) -> None:
    """A few of ``t``'s values, its sum, norm and positional sum, appended to ``probes`` by device."""
    if t.numel() and not (t.is_quantized or t.is_complex() or t.is_meta) and t.layout == torch.strided:
        flat = t.detach().reshape(-1)
        if flat.is_floating_point() and flat.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            flat = flat.float()          # (float8 types have no float64 sum or norm)
        step = max(1, flat.numel() // 7)
        whole = torch.stack([flat.sum(dtype=torch.float64),
                             torch.linalg.vector_norm(flat, dtype=torch.float64)]) \
            if flat.is_floating_point() else flat.sum()[None].to(torch.float64)
        probes.setdefault(t.device, []).append(torch.cat([flat[::step][:8].to(torch.float64), whole,
                                                          _positional_sum(flat)[None]]))


def state_fingerprint(module: torch.nn.Module, variant: str = "") -> tuple:
    """A cheap summary that changes when the module's identity may have: each parameter and
    buffer's object, storage, shape, dtype and PyTorch version counter (bumped by every in-place
    write: an optimiser step, ``load_state_dict``, ``weight[:, 3] = 0`` under ``no_grad``), a few
    of its values, its sum, its norm and a sum weighted by position (for writes through
    ``.data``, which leave the counter alone: a unit's row zeroed changes the sums, two units
    swapped or permuted the weighted one; one read of every tensor), every submodule's class and
    training flag, its settings (``settings.identity_text``: one walk over their attributes; a
    tensor among them as a weight is), and the variant. Not a checksum: it only says when
    ``model_checksum`` must be computed again."""
    items, probes = [], {}
    try:
        for name, t in module.state_dict(keep_vars=True).items():
            items.append((name, id(t), t.data_ptr() if t.numel() else 0, t._version, t.dtype, tuple(t.shape)))
            _probe(t, probes)
        text, tensors = identity_text(module)
        for t in tensors:
            items.append((id(t), t.data_ptr() if t.numel() and t.layout == torch.strided else 0, t._version,
                          t.dtype, tuple(t.shape), t.device))
            _probe(t, probes)
        values = tuple(torch.cat(v).cpu().numpy().tobytes()
                       for _, v in sorted(probes.items(), key=lambda kv: str(kv[0])))
    except Exception:              # a tensor type without storage or version (a wrapper subclass):
        return (object(),)         # equal to no other fingerprint, so the checksum is always computed
    classes = tuple((n, type(m), m.training) for n, m in module.named_modules())
    return tuple(items), values, classes, text, variant


def _raw_bytes(t: torch.Tensor) -> bytes:
    """A contiguous CPU tensor's memory, as numpy's ``tobytes`` gives it for the dtypes numpy has
    (the bytes checksums were always taken over), read as bytes for every dtype, including those
    numpy has not: bfloat16, the float8 types of FP8-quantised weights, complex32."""
    try:
        return t.reshape(-1).view(torch.uint8).numpy().tobytes()
    except (RuntimeError, TypeError):         # (a tensor type without a byte view: quantised)
        return t.numpy().tobytes()


def weights_checksum(module: torch.nn.Module) -> str:
    """sha256 over the state_dict: every tensor's name, dtype, shape and bytes, in name order
    (the model's whole identity in stores written before session 9: see Session.adapter)."""
    h = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(_raw_bytes(t))
    return h.hexdigest()


def no_output_message(module: torch.nn.Module, layer: str, advice: str) -> str:
    """The error for a layer whose retained output is None: why, where its structure says so
    (``hooks.never_called``: a container, an nn.MultiheadAttention's out_proj), else the causes
    a reader cannot tell apart (a branch of the forward pass skipped it for this batch, or it
    returned None or no tensor), then ``advice``."""
    why = never_called(module, layer)
    if why:
        return f"layer {layer!r} gave no tensor output: it never runs in the forward pass: {why}"
    return (f"layer {layer!r} gave no tensor output: it did not run in the forward pass of this batch (a branch "
            f"of the model's forward skipped it, for these inputs), or returned None or a value holding no tensor "
            f"(see deepbase_duck.extraction.hooks for what is read of tuples, dicts and PackedSequences); {advice}")


def _holds_padding(encoded: Encoded) -> bool:
    """Whether a CharAdapter batch holds right padding after a record with symbols: one with fewer
    symbols than the batch has positions (an empty record's symbols, none, are changed by
    nothing); True where that cannot be told: inputs that are not one (batch, length) tensor."""
    inputs = encoded.inputs
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2:
        return True
    lengths = [len(s) for s in encoded.starts if len(s)]
    return bool(lengths) and min(lengths) < inputs.shape[1]


class ModelAdapter:
    """Base adapter. Subclass and implement ``encode``; override the rest when needed.

    Making the adapter puts its module in eval mode (``module.eval()``, left so: a model being
    trained needs ``.train()`` again after it is wrapped). A module put back in training mode
    later runs so in scans, which warn of it (dropout makes activations random), and is another
    model to the stores (``model_checksum``)."""

    tokenization: str = "undefined"
    example_text: str = "def f(x):\n    return x  # 'hi'\n"
    # A progressive scan (max_error, top_k) reads records in a seeded random order, one window of
    # ``batch_size`` records between two stop checks; the window runs as this many forward
    # batches, its records sorted by length. Worth more than 1 where the forward's cost follows
    # the padded length (transformers: benchmarks/study_window_split.py), not where each batch
    # pays a per-step cost (recurrent models). Stored with the model at registration, so a Ray
    # driver that does not load the model plans the same batches.
    window_split: int = 1
    # On CUDA, PyTorch lets cuDNN (LSTMs, convolutions) and, where a user turns it on, matrix
    # products round float32 inputs to TF32 (a 10-bit mantissa): activations then differ from the
    # CPU's at about 1e-3 relative, which moves correlations by about 1e-4 and mutual information
    # by up to 1e-2 (units cross histogram bin edges; tests/test_devices.py). Inspection wants the
    # model's own float32 activations, so forward() runs with TF32 off unless this is True (faster
    # matrix products on Ampere and later GPUs); None leaves torch's global switches alone. The
    # query's ``params`` record it ("tf32").
    tf32: bool | None = False
    # A scan needs a forward pass only up to the last layer it reads: with early exit it stops
    # there (a char-LSTM's decoder head, a transformer's upper layers are not run). That is right
    # when each read layer runs once per forward pass; None checks this with one forward pass over
    # ``example_text`` (``example_encoding``) per set of layers (a module shared across depths, or
    # called per time step, runs more often and turns early exit off); False never exits early,
    # True always does.
    early_exit: bool | None = None
    # Part of the model's identity (``checksum``), for what its weights and module classes do not
    # show: a forward hook that ablates or patches a unit, a flag that changes the forward pass.
    # Two models that differ only so must have different variants ("ablate lstm1.44"), or a query
    # of one would reuse the activations and scores stored from the other. Set it before
    # register_model, which stores the checksum.
    variant: str = ""

    def __init__(self, module: torch.nn.Module, device: str | torch.device | None = None):
        meta = next((n for n, t in itertools.chain(module.named_parameters(), module.named_buffers()) if t.is_meta),
                    None)
        if meta is not None:
            raise DeepBaseError(
                f"{type(self).__name__}: the model's tensor {meta!r} is on the 'meta' device, which holds no values "
                f"(a model built under torch.device('meta') or an empty-weights context): load its weights first "
                f"(module.load_state_dict(state, assign=True)), then wrap it")
        self.module = module.eval()
        self.device = default_device(device)
        self.module.to(self.device)
        self._checksum = None

    # -- identity ---------------------------------------------------------------------------
    @property
    def checksum(self) -> str:
        """``model_checksum`` of the module as it is now. It is computed once and recomputed when
        ``state_fingerprint`` says the module changed since (weights written in place, a tensor or
        submodule swapped, another variant): a live model edited between two queries (a unit
        zeroed, a fine-tuning step) is then another model, never served the earlier one's stored
        activations or scores."""
        if self.__dict__.get("_settled") is not self.module:
            self._settle()
        fingerprint = state_fingerprint(self.module, self.variant)
        if self._checksum is None or fingerprint != self.__dict__.get("_fingerprint"):
            self._checksum = model_checksum(self.module, self.variant)
            self._fingerprint = fingerprint
        return self._checksum

    def _settle(self) -> None:
        """Find, once per module, the settings a forward pass changes (``settings.find_volatile``:
        a call counter, a cache grown on first use), which the identity leaves out, by one forward
        pass over the example (``example_encoding``) whose changes to them are undone. Without it,
        a model counting its calls would be another model after every query, and its checksum at
        registration (after the pass measuring its widths) would differ from the one its loader's
        model has in another process. Skipped for a model with a submodule in training mode (its
        pass could update buffers, such as BatchNorm's running statistics)."""
        self._settled = self.module
        if any(m.training for m in self.module.modules()):
            return
        find_volatile(self.module, lambda: self.forward(self.example_encoding()))

    @property
    def architecture(self) -> str:
        return type(self.module).__name__

    def exits_early(self, layers) -> bool:
        """Whether a scan reading ``layers`` may stop the forward pass once they have all given
        their outputs (``early_exit``; None: each of them ran exactly once in a forward pass over
        two copies of the example (``example_encoding``), cached per set of layers)."""
        if self.early_exit is not None:
            return bool(self.early_exit)
        from .hooks import resolve_modules
        key = tuple(sorted(layers))
        cache = self.__dict__.setdefault("_exit_checks", {})
        if key not in cache:
            calls = dict.fromkeys(key, 0)
            handles = [m.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
                       for n, m in resolve_modules(self.module, key).items()]
            try:
                self.forward(self.example_encoding(2))
                cache[key] = all(c == 1 for c in calls.values())
            except Exception:                 # the scan itself will report a failing model
                cache[key] = False
            finally:
                for h in handles:
                    h.remove()
        return cache[key]

    def example_encoding(self, n: int = 1) -> Encoded:
        """The inputs of ``n`` example records, for the forward passes run before any dataset is
        read (the layer widths measured by ``register_model``, the early-exit check): by default
        ``example_text`` encoded. Override it (or set ``example_text``) where that text is not a
        record the encoder can read."""
        return self.encode([self.example_text] * n)

    # -- the three questions ----------------------------------------------------------------
    def encode(self, texts: list[str]) -> Encoded:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, encoded: Encoded):
        inputs = to_device(encoded.inputs, self.device)
        with torch.inference_mode(), tf32_mode(self.tf32 if self.device.type == "cuda" else None):
            if isinstance(inputs, dict):
                return self.module(**inputs)
            if isinstance(inputs, tuple) and not isinstance(inputs, torch.nn.utils.rnn.PackedSequence):
                return self.module(*inputs)
            return self.module(inputs)

    def symbol_activations(self, layer: str, output: torch.Tensor, encoded: Encoded) -> list[torch.Tensor]:
        if output is None:
            raise ActivationError(no_output_message(self.module, layer,
                                                    "pick a module that returns (batch, sequence, width), or "
                                                    "override symbol_activations()"))
        if output.dim() != 3:
            raise ActivationError(
                f"layer {layer!r} produced an output of shape {tuple(output.shape)}; the default adapter expects "
                "(batch, sequence, width). Override symbol_activations() in the adapter for this layer.")
        seq_first = getattr(output, SEQUENCE_FIRST, None)
        if seq_first:
            # (its shape may pass the check below: a batch whose longest record has as many
            # symbols as the batch has records would be read with records and positions swapped)
            raise ActivationError(
                f"layer {layer!r} ({seq_first}) gives its output of shape {tuple(output.shape)} as (sequence, "
                f"batch, width), where the default adapter reads (batch, sequence, width); build it with "
                f"batch_first=True, retain a module after a transpose, or override symbol_activations() to read "
                f"output.transpose(0, 1)")
        batch = len(encoded.index)
        longest = max((int(idx.max()) + 1 for idx in encoded.index if len(idx)), default=0)
        if output.shape[0] != batch or output.shape[1] < longest:
            raise ActivationError(
                f"layer {layer!r} produced an output of shape {tuple(output.shape)} for {batch} record(s) whose "
                f"symbols reach sequence position {longest - 1}; the default adapter reads (batch, sequence, width), "
                f"batch first. A sequence-first output (nn.LSTM, nn.GRU or nn.TransformerEncoderLayer without "
                f"batch_first=True: (sequence, batch, width)) or a channels-first one (nn.Conv1d: (batch, width, "
                f"sequence)) needs batch_first=True, a module after the transpose, or symbol_activations() "
                f"overridden in the adapter")
        out = []
        for b, idx in enumerate(encoded.index):
            n = len(idx)
            if n and idx[-1] - idx[0] == n - 1 and (n < 3 or bool((np.diff(idx) == 1).all())):
                # a run of positions (characters from 0, word pieces after [CLS]): a view, no copy,
                # and on CUDA no index copied to the device (which would wait for the forward)
                out.append(output[b, int(idx[0]):int(idx[0]) + n])
            else:
                out.append(output[b, torch.as_tensor(idx, device=output.device)])
        return out


class CharAdapter(ModelAdapter):
    """Character-level sequence models: one symbol per character, ids from ``encode_chars``.

    Records of a batch are right-padded with ``pad_id`` and the model gets no mask or lengths:
    right for causal models (each position sees only the characters before it, as the bundled
    char-LSTMs), but a model that reads ahead (a bidirectional LSTM, a non-causal convolution)
    would see the padding, and its activations would depend on the batch. Wrap such a model in a
    ModelAdapter of your own that passes lengths or a mask, or scan with ``batch_size=1``."""

    def __init__(self, module, encode_chars, tokenization: str, device=None, pad_id: int = 0):
        super().__init__(module, device)
        self.encode_chars = encode_chars
        self.tokenization = tokenization
        self.pad_id = pad_id

    def encode(self, texts: list[str]) -> Encoded:
        return self._encode_ids(texts)

    def _encode_ids(self, texts: list[str]) -> Encoded:
        longest = max((len(t) for t in texts), default=0)
        ids = torch.full((len(texts), max(longest, 1)), self.pad_id, dtype=torch.long)
        starts, ends, tokens = [], [], []
        for b, text in enumerate(texts):
            if text:
                ids[b, : len(text)] = self._char_ids(text)
            s = np.arange(len(text), dtype=np.int32)
            starts.append(s)
            ends.append(s + 1)
            tokens.append(list(text))
        return Encoded(inputs=ids, starts=starts, ends=ends, tokens=tokens)

    def exits_early(self, layers) -> bool:
        """ModelAdapter's, after ``check_padding`` (both once per set of layers, before a scan's
        first forward pass)."""
        self.check_padding(layers)
        return super().exits_early(layers)

    def warn_padding(self, layers, encoded: Encoded) -> None:
        """The warning of ``check_padding`` for ``layers``, once, at the first batch that holds
        right padding (``_holds_padding``): a scan whose batches hold none (batch_size=1, records
        of one length) gets none, where the warning would be a false alarm, as it told a user who
        scanned with batch_size=1 to scan with batch_size=1."""
        pending = self.__dict__.get("_padding_leaks")
        key = tuple(sorted(layers))
        if not pending or key not in pending or not _holds_padding(encoded):
            return
        leaks = pending.pop(key)
        import warnings
        shown = ", ".join(f"{n!r} (by up to {d:.3g})" for n, d in leaks[:5])
        warnings.warn(
            f"{type(self).__name__} ({self.tokenization}): the activations of layer(s) {shown} for a record "
            f"change when it is right-padded, as a longer record in its batch does: the model reads ahead "
            f"(bidirectional, non-causal attention or convolution) and sees the padding, so activations and "
            f"scores depend on batch_size and on which records share a batch. Pass lengths or a padding mask "
            f"in a ModelAdapter of your own (encode/forward), or scan with batch_size=1",
            UserWarning, stacklevel=4)

    def check_padding(self, layers) -> None:
        """Warn, once per set of layers, when right padding changes what ``layers`` give for a
        record: the example record's activations alone and with ``len(example_text)`` pad ids
        after it (as a longer record in its batch would add) must agree on its characters. A model
        that reads ahead (a bidirectional RNN, non-causal attention or convolution) sees the
        padding, so its activations, and every score from them, would change with ``batch_size``
        and with which records share a batch, silently. Two small forward passes (before a scan's
        first: here, not amid the scan's); skipped where ``encode`` gives other inputs than one
        (batch, length) tensor of ids (an adapter of one's own that passes lengths or a mask).
        The warning waits for a batch that holds padding (``warn_padding``)."""
        from .hooks import Retain
        key = tuple(sorted(layers))
        done = self.__dict__.setdefault("_padding_checks", set())
        if key in done:
            return
        done.add(key)
        if any(m.training and mode_dependent(m) for m in self.module.modules()):
            return                  # (dropout or batch statistics change every pass: warned of as such)
        leaks = []
        try:
            # (this class's own encoding, not a call of encode(): it encodes the records of a scan)
            own = any("encode" in vars(c) for c in type(self).__mro__[:type(self).__mro__.index(CharAdapter)])
            enc = None if not self.example_text else self.encode([self.example_text]) if own \
                else self._encode_ids([self.example_text])
            if enc is None or not isinstance(enc.inputs, torch.Tensor) or enc.inputs.dim() != 2:
                return
            pad = torch.full((1, max(1, enc.inputs.shape[1])), self.pad_id, dtype=enc.inputs.dtype)
            padded = Encoded(torch.cat([enc.inputs, pad], 1), enc.starts, enc.ends, enc.tokens, enc.index)
            with Retain(self.module, key) as ret:
                self.forward(enc)
                ret.settle()                  # (an output written into later in the pass: its copy)
                alone = {n: self.symbol_activations(n, ret.outputs.get(n), enc)[0] for n in key}
                ret.clear()
                self.forward(padded)
                ret.settle()
                for n in key:
                    a = alone[n].float()
                    b = self.symbol_activations(n, ret.outputs.get(n), padded)[0].float()
                    if a.shape != b.shape or not bool(torch.isfinite(a).all()):
                        continue
                    diff = float((a - b).abs().max()) if a.numel() else 0.0
                    if diff > 1e-4 * (1.0 + float(a.abs().max())):
                        leaks.append((n, diff))
        except Exception:                     # (a layer this reader cannot cut, a failing model: the scan says so)
            return
        if leaks:                             # warned of at the first batch that holds padding
            self.__dict__.setdefault("_padding_leaks", {})[key] = leaks

    def _char_ids(self, text: str) -> torch.Tensor:
        """``encode_chars(text)`` as a tensor of integer ids, one per character: the symbol of
        character i is position i of the sequence, so an encoder that drops, merges or adds
        characters (or gives no integers) would shift every later symbol onto another
        character's activations; it is refused, naming the text."""
        raw = self.encode_chars(text)
        try:
            got = raw.detach().cpu() if isinstance(raw, torch.Tensor) else torch.as_tensor(np.asarray(raw))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DeepBaseError(f"{type(self).__name__}: encode_chars({text[:40]!r}) returned {type(raw).__name__}, "
                                f"not a sequence of integer ids ({exc})") from None
        if got.dim() != 1 or got.shape[0] != len(text):
            raise DeepBaseError(
                f"{type(self).__name__}: encode_chars({text[:40]!r}{'...' if len(text) > 40 else ''}) returned "
                f"{'ids of shape ' + str(tuple(got.shape)) if got.dim() != 1 else str(got.shape[0]) + ' ids'} for a "
                f"text of {len(text)} characters; a CharAdapter needs exactly one id per character (map characters "
                f"outside the vocabulary to an unknown id rather than dropping them), or use a ModelAdapter of "
                f"your own whose encode() gives each symbol's character span")
        if got.dtype == torch.bool or got.is_floating_point() or got.is_complex():
            raise DeepBaseError(f"{type(self).__name__}: encode_chars({text[:40]!r}) returned {got.dtype} values; "
                                f"it must return integer ids")
        return got.to(torch.long)

    def symbol_activations(self, layer: str, output: torch.Tensor, encoded: Encoded) -> list[torch.Tensor]:
        """As ModelAdapter's, refusing a channels-first output (nn.Conv1d's (batch, width,
        sequence)): its last axis, not its second, has the inputs' length, and reading it as
        (batch, sequence, width) would take channels for characters."""
        ids = encoded.inputs
        if (isinstance(output, torch.Tensor) and output.dim() == 3 and isinstance(ids, torch.Tensor)
                and ids.dim() == 2 and output.shape[0] == ids.shape[0]
                and output.shape[2] == ids.shape[1] != output.shape[1]):
            raise ActivationError(
                f"layer {layer!r} produced an output of shape {tuple(output.shape)} for inputs of "
                f"{ids.shape[1]} characters: channels first (as nn.Conv1d's (batch, width, sequence)), where "
                f"the default adapter reads (batch, sequence, width); retain a module after the transpose, or "
                f"override symbol_activations() to read output.transpose(1, 2)")
        return super().symbol_activations(layer, output, encoded)

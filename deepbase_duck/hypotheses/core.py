"""The Hypothesis type, the registry, and the normalisation of what a hypothesis returns.

A hypothesis function takes the text of one record and returns either

* one value per character (a sequence or array as long as the text: a list, a numpy array, a
  torch tensor), or
* spans: an iterable of ``(start, end)`` (binary hypotheses: those characters hold 1) or
  ``(start, end, value)`` tuples over character offsets, end exclusive (a generator's errors
  are the function's).

Kinds: ``binary`` (values 0/1 or bools; characters outside spans hold 0), ``categorical``
(values from the declared ``categories``; stored as codes 0..K-1; outside spans: no label) and
``continuous`` (finite floats; NaN or outside spans: no label).

A hypothesis may also carry a ``batch`` function: texts -> the same outputs, one per text, computed
together (spaCy's ``nlp.pipe`` tags a list of sentences about 1.9x faster than one call each);
``spans_many`` uses it where a block has several records to label.

Labels are normalised to sorted, non-overlapping spans (numpy arrays ``starts, ends, values``);
runs of equal per-character values become one span. Anything else raises HypothesisError naming
the hypothesis and the record.

A hypothesis' ``version`` keys its stored labels. Unless one is given, it is computed each time it
is read (``default_version``), so that it follows the function and the values it reads as they
are now, not as they were when it was registered; within ``held_versions()`` (a query) it is
computed once per hypothesis, so that one query labels with one version throughout.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import HypothesisError, UnknownNameError, check_name

KINDS = ("binary", "categorical", "continuous")


@dataclass
class Hypothesis:
    name: str
    fn: Callable[[str], object]
    kind: str = "binary"
    description: str = ""
    version: str | None = None               # None: follows the function (see the module docstring)
    categories: tuple[str, ...] | None = None
    batch: Callable[[list[str]], list] | None = field(default=None, repr=False)   # fn over many texts at once
    _code: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise HypothesisError(f"a hypothesis needs a non-empty string name, got {self.name!r}")
        if self.kind not in KINDS:
            raise HypothesisError(
                f"hypothesis {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "categorical":
            if isinstance(self.categories, (str, bytes)):
                # a string is no list of names: categories="NOUN" were the categories N, O, U, N
                raise HypothesisError(f"hypothesis {self.name!r}: categories must be a list of category names, "
                                      f"got the string {self.categories!r} (write [{self.categories!r}, ...])")
            if not self.categories:
                raise HypothesisError(
                    f"categorical hypothesis {self.name!r} must declare its categories")
            self.categories = tuple(str(c) for c in self.categories)
            if len(set(self.categories)) != len(self.categories):
                twice = sorted({c for c in self.categories if self.categories.count(c) > 1})
                raise HypothesisError(f"hypothesis {self.name!r}: categories repeat ({', '.join(map(repr, twice))}); "
                                      "name each category once")
            self._code = {c: i for i, c in enumerate(self.categories)}
        elif self.categories:
            raise HypothesisError(f"hypothesis {self.name!r}: only categorical hypotheses take categories")
        self.__dict__["_versioned"] = True       # from now on an unset version is computed when read

    def version_settings(self) -> str:
        """Settings of a subclass that change its labels, for ``default_version`` ('' here)."""
        return ""

    @property
    def source(self) -> str:
        fn = getattr(self.fn, "func", self.fn)
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"

    # ------------------------------------------------------------------------------------
    def spans(self, text: str, record: object = "?") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run the function on ``text`` and return validated (starts, ends, values)."""
        try:
            out = self.fn(text)
        except HypothesisError:
            raise
        except Exception as exc:
            raise HypothesisError(
                f"hypothesis {self.name!r} raised {type(exc).__name__} on record {record}: {exc}") from exc
        return self.normalise(out, text, record)

    def spans_many(self, texts: list[str], records: list) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``spans`` of several texts (``records`` name them in errors): one call of ``batch``
        where the hypothesis has one, else one call of the function per text."""
        texts = list(texts)
        if self.batch is None or len(texts) < 2:
            return [self.spans(t, r) for t, r in zip(texts, records)]
        try:
            outs = list(self.batch(texts))
        except HypothesisError:
            raise
        except Exception as exc:
            raise HypothesisError(f"hypothesis {self.name!r} raised {type(exc).__name__} on one of the records "
                                  f"{records[0]} ... {records[-1]}: {exc}") from exc
        if len(outs) != len(texts):
            raise HypothesisError(f"hypothesis {self.name!r}: its batch function returned {len(outs)} results "
                                  f"for {len(texts)} texts")
        return [self.normalise(o, t, r) for o, t, r in zip(outs, texts, records)]

    def extent(self, text: str) -> int:
        """How many positions the labels of a record cover: its characters (a GridHypothesis
        labels the cells of an image grid instead)."""
        return len(text)

    def normalise(self, out, text: str, record) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.extent(text)
        where = f"hypothesis {self.name!r} on record {record}"
        if out is None:
            raise HypothesisError(f"{where} returned None; return spans or one value per character")
        if isinstance(out, (str, bytes)):
            raise HypothesisError(f"{where} returned a {type(out).__name__}; return spans or one value per character")
        out = _as_numpy(out, where)
        if isinstance(out, np.ndarray):
            if out.ndim != 1:
                raise HypothesisError(f"{where} returned an array of shape {out.shape}; expected ({n},), one value "
                                      "per character (spans go in a list of (start, end[, value]) tuples)")
            return self._from_per_char(out, n, where)
        try:
            it = iter(out)
        except TypeError:
            raise HypothesisError(
                f"{where} returned {type(out).__name__}; return spans or one value per character") from None
        try:
            items = list(it)                 # a generator runs here: its errors are the function's
        except HypothesisError:
            raise
        except Exception as exc:
            raise HypothesisError(f"hypothesis {self.name!r} raised {type(exc).__name__} on record {record}: "
                                  f"{exc}") from exc
        if items and all(isinstance(x, (tuple, list)) for x in items):
            return self._from_spans(items, n, where)
        if items and any(isinstance(x, (tuple, list)) for x in items):
            raise HypothesisError(f"{where} mixed spans (tuples) with per-character values")
        if not items and n > 0:
            # an empty list is "no spans", the natural answer of a span finder that found nothing
            return _empty()
        return self._from_per_char(items, n, where)

    # -- per-character values --------------------------------------------------------------
    def _from_per_char(self, values, n: int, where: str):
        if len(values) != n:
            raise HypothesisError(
                f"{where} returned {len(values)} per-character values for a text of {n} characters")
        if n == 0:
            return _empty()
        codes = self._encode_values(values, where, lambda i: f"character {i}")
        # run-length encode
        change = np.flatnonzero(~_equal_nan(codes[1:], codes[:-1])) + 1
        starts = np.concatenate([[0], change]).astype(np.int32)
        ends = np.concatenate([change, [n]]).astype(np.int32)
        vals = codes[starts]
        keep = ~np.isnan(vals)
        if self.kind == "binary":
            keep &= vals != 0
        return starts[keep], ends[keep], vals[keep]

    def _encode_values(self, values, where, at) -> np.ndarray:
        """Values as float64 (categories as codes); ``at(i)`` names value i in errors (a
        character, or a span)."""
        if self.kind == "categorical":
            arr = np.full(len(values), np.nan)
            for i, v in enumerate(values):
                if v is None:
                    continue
                code = self._code.get(str(v))
                if code is None:
                    raise HypothesisError(
                        f"{where}: value {v!r} at {at(i)} is not one of the declared "
                        f"categories {list(self.categories)}")
                arr[i] = code
            return arr
        try:
            arr = np.asarray(values)
            if arr.dtype.kind in "USO":
                # text is no number, though numpy reads "1" or "0.5" as one: a function returning
                # the characters it was given (list(text)) would pass on a text of digits
                # (looked for in the values given: a list of numbers and text is all text to numpy)
                given = arr.reshape(-1) if isinstance(values, np.ndarray) else values
                i = next((i for i, v in enumerate(given) if isinstance(v, (str, bytes))), None)
                if i is not None:
                    raise HypothesisError(f"{where}: values are not numbers: {self.kind} value {str(given[i])!r} "
                                          f"at {at(i)} is text; return numbers")
            arr = arr.astype(np.float64, copy=False)
        except HypothesisError:
            raise
        except Exception as exc:            # TypeError, ValueError; a torch tensor's RuntimeError
            raise HypothesisError(f"{where}: values are not numbers ({exc})") from None
        if self.kind == "binary":
            bad = ~np.isin(arr, (0.0, 1.0))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise HypothesisError(f"{where}: binary value {values[i]!r} at {at(i)} is not 0/1")
        else:
            if np.isinf(arr).any():
                i = int(np.flatnonzero(np.isinf(arr))[0])
                raise HypothesisError(f"{where}: infinite value at {at(i)}")
        return arr

    # -- spans -----------------------------------------------------------------------------
    def _from_spans(self, items, n: int, where: str):
        starts, ends, raw = [], [], []
        for item in items:
            if len(item) == 2:
                if self.kind != "binary":
                    raise HypothesisError(
                        f"{where}: span {tuple(item)} has no value; {self.kind} hypotheses return "
                        "(start, end, value)")
                s, e, v = item[0], item[1], 1
            elif len(item) == 3:
                s, e, v = item
            else:
                raise HypothesisError(f"{where}: span {tuple(item)!r} is not (start, end) or (start, end, value)")
            if not (_is_index(s) and _is_index(e)):
                raise HypothesisError(f"{where}: span bounds must be integers, got {(s, e)!r}")
            if s > e:
                raise HypothesisError(f"{where}: span ({s}, {e}) ends before it starts; spans are (start, end), "
                                      "end exclusive")
            if not (0 <= s <= e <= n):
                raise HypothesisError(f"{where}: span ({s}, {e}) is outside the text [0, {n})")
            if s == e:
                continue
            starts.append(int(s)); ends.append(int(e)); raw.append(v)
        if not starts:
            return _empty()
        vals = self._encode_values(raw, where, lambda i: f"span ({starts[i]}, {ends[i]})")
        order = np.lexsort((np.asarray(ends), np.asarray(starts)))
        s = np.asarray(starts, dtype=np.int32)[order]
        e = np.asarray(ends, dtype=np.int32)[order]
        v = vals[order]
        keep = ~np.isnan(v)
        if self.kind == "binary":
            keep &= v != 0
        s, e, v = s[keep], e[keep], v[keep]
        if len(s) > 1 and (s[1:] < e[:-1]).any():
            if self.kind != "binary":
                i = int(np.flatnonzero(s[1:] < e[:-1])[0])
                raise HypothesisError(
                    f"{where}: spans ({s[i]}, {e[i]}) and ({s[i + 1]}, {e[i + 1]}) overlap; "
                    f"{self.kind} hypotheses need disjoint spans")
            s, e = _union(s, e)
            v = np.ones(len(s))
        return s, e, v


def _as_numpy(out, where: str):
    """``out`` as a numpy array where it is another array type: a torch tensor (detached, on the
    CPU), or anything with ``__array__`` holding numbers (pandas, jax...); lists, tuples and other
    iterables (a pandas Series of span tuples) as they are."""
    if out is None or isinstance(out, (np.ndarray, list, tuple)):
        return out
    try:
        if type(out).__module__.split(".")[0] == "torch" and hasattr(out, "detach"):
            return out.detach().cpu().numpy()
        if hasattr(out, "__array__"):
            arr = np.asarray(out)
            return out if arr.dtype.hasobject else arr
    except Exception as exc:
        raise HypothesisError(f"{where} returned a {type(out).__name__} that cannot be read as a numpy array "
                              f"({type(exc).__name__}: {exc})") from None
    return out


def _is_index(v) -> bool:
    """An integer span bound: a Python or numpy integer, not a bool (a bool is an int to
    isinstance: ``(text.startswith("x"), 3)`` passed as the span (1, 3))."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _empty():
    return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float64)


def _equal_nan(a, b):
    return (a == b) | (np.isnan(a) & np.isnan(b))


def _union(s, e):
    out_s, out_e = [int(s[0])], [int(e[0])]
    for a, b in zip(s[1:], e[1:]):
        if a <= out_e[-1]:
            out_e[-1] = max(out_e[-1], int(b))
        else:
            out_s.append(int(a)); out_e.append(int(b))
    return np.asarray(out_s, np.int32), np.asarray(out_e, np.int32)


def _read_version(h: Hypothesis) -> str | None:
    """``Hypothesis.version``: the version given, else ``default_version`` of the function and the
    values it reads now (once per query within ``held_versions``); None while the hypothesis is
    being constructed without one. (``dataclasses.replace(h, ...)`` passes the version read to
    the copy, which then keeps it: pass ``version=None`` for a copy that follows its function.)"""
    given = h.__dict__.get("_given_version")
    if given is not None or not h.__dict__.get("_versioned"):
        return given
    held = getattr(_HELD, "versions", None)
    if held is not None:
        got = held.get(id(h))
        if got is not None and got[0] is h:
            return got[1]
    version = default_version(h)
    if held is not None:
        held[id(h)] = (h, version)
    return version


def _give_version(h: Hypothesis, version: str | None) -> None:
    # versions are stored as text: a number given (version=2) is kept as its text ('2')
    h.__dict__["_given_version"] = None if version is None else str(version)


# a property over the dataclass field: __init__ stores the version given (None: computed when read)
Hypothesis.version = property(_read_version, _give_version, doc=_read_version.__doc__)

_HELD = threading.local()


@contextlib.contextmanager
def held_versions():
    """Within (in this thread): each hypothesis' version is computed at its first read and then
    kept, so a query labels and keys with one version throughout, and its per-record reads cost a
    lookup. Outside, every read computes it afresh (``default_version``). Nests."""
    outer = getattr(_HELD, "versions", None)
    if outer is None:
        _HELD.versions = {}
    try:
        yield
    finally:
        if outer is None:
            _HELD.versions = None


def default_version(h: Hypothesis) -> str:
    """A version derived from the function's source code (its compiled code where the source
    cannot be read: a function made by ``exec``, ``python -c`` or a plain REPL), the values it
    reads besides its text (``function_inputs``; a ``functools.partial``'s arguments, user
    functions among them by their source), the hypothesis' settings and, where it is the user's
    own code, the ``batch`` function the same way, so that editing the function, or a constant
    it reads, invalidates stored labels."""
    fn = getattr(h.fn, "func", h.fn)
    extra = _stable(getattr(h.fn, "keywords", None)) + _stable(getattr(h.fn, "args", None))
    parts = [function_text(fn), extra, function_inputs(fn), h.kind, repr(h.categories),
             repr(getattr(h.fn, "__dbd_params__", None))]
    settings = h.version_settings()
    if settings:                                   # a subclass's own settings (an image grid's size)
        parts.append(settings)
    helpers = _partial_helpers(h.fn)
    if helpers:                                    # user functions a functools.partial passes in
        parts.append(helpers)
    if h.batch is not None and _user_callable(getattr(h.batch, "func", h.batch)):
        # the batch function computes the labels of blocks of records: editing it changes them too
        b = getattr(h.batch, "func", h.batch)
        parts.append("batch=" + function_text(b) + _stable(getattr(h.batch, "keywords", None))
                     + _stable(getattr(h.batch, "args", None)) + function_inputs(b) + _partial_helpers(h.batch))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _partial_helpers(p) -> str:
    """The user functions (``_helper_text``) among the arguments a ``functools.partial`` passes
    (``partial(apply, rule=my_rule)``); '' for anything else."""
    import functools
    if not isinstance(p, functools.partial):
        return ""
    values = list(p.args) + [v for _, v in sorted(p.keywords.items())]
    return "|".join(_helper_text(v, 0, set()) for v in values if _user_function(v))


def _user_callable(v) -> bool:
    """Whether ``v`` runs code of the user's (``_user_function``): a function, a bound method of
    one, or an object whose class's ``__call__`` is one."""
    if inspect.ismethod(v):
        v = v.__func__
    elif not inspect.isfunction(v):
        v = getattr(v, "__wrapped__", None) or getattr(type(v), "__call__", None)
    return _user_function(v)


_TEXTS: dict[int, tuple[object, str]] = {}   # id(code object) -> (the code object, function_text)


def function_text(fn) -> str:
    """The source of ``fn``; where it cannot be read, its qualified name and ``code_text`` of its
    compiled code (or the name alone: a builtin). Kept per code object, which a function's source
    cannot change without (reading a source file costs about 0.2 ms)."""
    code = _code_of(fn)
    if code is not None:
        known = _TEXTS.get(id(code))
        if known is not None and known[0] is code:
            return known[1]
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        text = getattr(fn, "__qualname__", None) or f"{type(fn).__module__}.{type(fn).__qualname__}"
        if code is not None:
            text += "\n" + code_text(code)
    if code is not None:
        _TEXTS[id(code)] = (code, text)
    return text


def _code_of(fn):
    """The code object a callable runs: a function's, or its ``__call__``'s (None: a builtin)."""
    code = getattr(fn, "__code__", None)
    if code is None and not inspect.isroutine(fn):
        code = getattr(getattr(fn, "__call__", None), "__code__", None)
    return code if inspect.iscode(code) else None


def code_text(code, depth: int = 0) -> str:
    """A stable text of compiled code: its bytecode, constants (nested functions' and
    comprehensions' code the same way), the names it reads and its variables. Changes with the
    function's body where no source can be read; the same in every process of one Python."""
    consts = [code_text(c, depth + 1) if inspect.iscode(c) and depth < 8 else _stable(c) for c in code.co_consts]
    return "|".join([code.co_name, hashlib.sha256(code.co_code).hexdigest(), "(" + ",".join(consts) + ")",
                     ",".join(code.co_names), ",".join(code.co_varnames), ",".join(code.co_freevars),
                     f"{code.co_argcount},{code.co_kwonlyargcount},{code.co_flags}"])


_PLAIN = (bool, int, float, complex, str, bytes, type(None))
#: Values a version follows besides the plain ones (as globals, closures, defaults alike): compiled
#: regular expressions (pattern and flags) and numpy arrays and scalars.
_VALUES = (re.Pattern, np.ndarray, np.generic)
#: Bytes of a numpy array hashed whole; a larger array is hashed by ARRAY_SAMPLES evenly spaced
#: pieces of ARRAY_PIECE bytes (with its dtype, shape and size), so an edit between them is not
#: seen: give such a hypothesis an explicit version.
ARRAY_HASH_BYTES = 64 << 20
ARRAY_SAMPLES, ARRAY_PIECE = 64, 64 << 10


def _array_text(v: np.ndarray, depth: int) -> str:
    if v.dtype.hasobject:                   # object arrays: their elements (bytes would be addresses)
        if v.size > 10_000:
            return f"ndarray(object,{v.shape})"
        return f"ndarray(object,{v.shape},{_stable(v.ravel().tolist(), depth + 1)})"
    h = hashlib.sha256()
    if v.nbytes <= ARRAY_HASH_BYTES:
        h.update(np.ascontiguousarray(v).tobytes())
    else:                                   # elements of evenly spaced pieces, read in place
        per = max(1, ARRAY_PIECE // max(v.itemsize, 1))
        first = (v.size - per) * np.arange(ARRAY_SAMPLES) // (ARRAY_SAMPLES - 1)
        h.update(np.ascontiguousarray(v.flat[(first[:, None] + np.arange(per)).reshape(-1)]).tobytes())
    return f"ndarray({v.dtype},{v.shape},{h.hexdigest()[:16]})"


def _stable(v, depth: int = 0) -> str:
    """A text that is the same for equal plain values in every process: numbers, strings,
    None, and lists, tuples, sets and dicts of them; a compiled regular expression by its pattern
    and flags; numpy arrays by dtype, shape and a hash of their bytes (ARRAY_HASH_BYTES at most;
    object arrays by their elements), numpy scalars by dtype and value; anything else by its
    type's name alone (an object's repr may hold its memory address)."""
    if isinstance(v, _PLAIN):
        return repr(v)
    if isinstance(v, re.Pattern):
        return f"re({v.pattern!r},{int(v.flags)})"
    if isinstance(v, np.ndarray):
        return _array_text(v, depth)
    if isinstance(v, np.generic):
        return f"{v.dtype.str}({v.item()!r})" if not v.dtype.hasobject else f"<{type(v).__qualname__}>"
    if depth < 4 and isinstance(v, (list, tuple)):
        return type(v).__name__ + "(" + ",".join(_stable(x, depth + 1) for x in v) + ")"
    if depth < 4 and isinstance(v, (set, frozenset)):
        return type(v).__name__ + "(" + ",".join(sorted(_stable(x, depth + 1) for x in v)) + ")"
    if depth < 4 and isinstance(v, dict):
        return "dict(" + ",".join(sorted(f"{_stable(k, depth + 1)}:{_stable(x, depth + 1)}" for k, x in v.items())) + ")"
    return f"<{type(v).__module__}.{type(v).__qualname__}>"


HELPER_DEPTH = 6          # how deep function_inputs follows the user functions a hypothesis calls


def function_inputs(fn, depth: int = 0, seen: set | None = None) -> str:
    """What a hypothesis function reads besides its argument, as a stable text: its default
    argument values, the values of the variables it closes over, the module-level names its code
    reads whose values are plain (a threshold, a word list) or a compiled regular expression or
    numpy array (``_stable``; closures and defaults the same way), and the user-defined Python functions
    it calls through a module-level name, a closed-over variable or a default (a helper): each
    one's source (``function_text``) and, in turn, what it reads, HELPER_DEPTH levels deep, each
    function once (recursion and cycles end there). The same holds for what it reads as an
    attribute of a module of the user's own (``mod.helper(x)``, ``pkg.sub.THRESHOLD``, after
    ``import mod`` or ``from pkg import sub`` at module level or in a closure:
    ``module_attributes``). Functions and modules of the standard library, of installed packages
    and of deepbase_duck itself are not followed (their code changes with the installed version,
    not between queries: a numpy upgrade keeps the versions, as for a library function called by
    name); classes and other objects count by their type alone. A callable object, or the object
    of a bound method (``Hypothesis("h", tagger.label)``), counts by its attributes (``_stable``),
    a ``functools.lru_cache`` of a function by what that function reads."""
    seen = set() if seen is None else seen
    if inspect.ismethod(fn):
        # a bound method (tagger.label): the state of its object, as a callable object's, and
        # what its function reads
        return f"self={_stable(_object_state(fn.__self__))}|" + function_inputs(fn.__func__, depth, seen)
    code = getattr(fn, "__code__", None)
    if code is None:
        # a callable object: its state (a dataclass's fields, ...) and what its __call__ reads
        call = getattr(type(fn), "__call__", None)
        out = f"state={_stable(_object_state(fn))}|" + (function_inputs(call, depth, seen)
                                                       if inspect.isfunction(call) else "")
        wrapped = getattr(fn, "__wrapped__", None)
        if inspect.isfunction(wrapped):      # functools.lru_cache(fn) and other C wrappers: fn's inputs
            out += "|wrapped=" + function_inputs(wrapped, depth, seen)
        return out
    seen.add(code)
    parts = [_stable(getattr(fn, "__defaults__", None)), _stable(getattr(fn, "__kwdefaults__", None))]
    for i, v in enumerate(getattr(fn, "__defaults__", None) or ()):
        if _user_function(v):
            parts.append(f"default{i}={_helper_text(v, depth, seen)}")
    for k, v in sorted((getattr(fn, "__kwdefaults__", None) or {}).items()):
        if _user_function(v):
            parts.append(f"{k}={_helper_text(v, depth, seen)}")
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
        try:
            value = cell.cell_contents
        except ValueError:                   # an empty cell
            parts.append(f"{name}=<empty>")
            continue
        parts.append(f"{name}={_helper_text(value, depth, seen) if _user_function(value) else _stable(value)}")
    g = getattr(fn, "__globals__", {})
    for name in sorted(_names_read(code)):
        if name not in g:
            continue
        value = g[name]
        if isinstance(value, _PLAIN + _VALUES + (list, tuple, set, frozenset, dict)):
            parts.append(f"{name}={_stable(value)}")
        elif _user_function(value):
            parts.append(f"{name}={_helper_text(value, depth, seen)}")
    for path, value in module_attributes(fn):
        if _user_function(value):
            parts.append(f"{path}={_helper_text(value, depth, seen)}")
        elif isinstance(value, _PLAIN + _VALUES + (list, tuple, set, frozenset, dict)):
            parts.append(f"{path}={_stable(value)}")
    return "|".join(parts)


def _object_state(obj) -> dict:
    """What a callable object or a method's object holds: its instance attributes (``__dict__``
    and ``__slots__``); a class (a classmethod's) by its own attributes bar the dunder ones."""
    if isinstance(obj, type):
        return {k: v for k, v in vars(obj).items() if not k.startswith("__")}
    slots = getattr(type(obj), "__slots__", ())
    slots = (slots,) if isinstance(slots, str) else slots
    return {**getattr(obj, "__dict__", {}), **{k: getattr(obj, k, None) for k in slots}}


_LOADS = {"LOAD_GLOBAL": "global", "LOAD_NAME": "global", "LOAD_DEREF": "closure"}
_ATTRS = ("LOAD_ATTR", "LOAD_METHOD")
_CHAINS: dict[int, tuple[object, tuple]] = {}   # id(code object) -> (the code object, its attribute chains)


def _attribute_chains(code) -> tuple:
    """The ``(where, name, (attr, ...))`` chains of a code object and the code nested in it: a
    global or closed-over name followed by attribute reads (``mod.helper``: ('global', 'mod',
    ('helper',))), read from its bytecode once per code object."""
    known = _CHAINS.get(id(code))
    if known is not None and known[0] is code:
        return known[1]
    import dis
    chains, stack = [], [(code, 0)]
    while stack:
        c, depth = stack.pop()
        current = None
        for ins in dis.get_instructions(c):
            if ins.opname in _ATTRS and current is not None:
                current[2].append(ins.argval)
                continue
            if current is not None and current[2]:
                chains.append((current[0], current[1], tuple(current[2])))
            current = [_LOADS[ins.opname], ins.argval, []] if ins.opname in _LOADS else None
        if current is not None and current[2]:
            chains.append((current[0], current[1], tuple(current[2])))
        if depth < 8:
            stack += [(k, depth + 1) for k in c.co_consts if inspect.iscode(k)]
    chains = tuple(sorted(set(chains)))
    _CHAINS[id(code)] = (code, chains)
    return chains


def module_attributes(fn) -> list[tuple[str, object]]:
    """``(dotted path, value)`` of what ``fn``'s code reads as an attribute of a module of the
    user's own (``_user_module``), through a module-level name or a closed-over variable:
    ``mod.helper`` -> ('mod.helper', the function), ``pkg.sub.LIMIT`` -> ('pkg.sub.LIMIT', its
    value), as they are now. A chain stops at the first value that is not a user module (a
    library module re-exported by the user's one, a class, an object); attributes a module does
    not hold yet (its ``__getattr__`` is not called) are left out."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return []
    closure = {}
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
        try:
            closure[name] = cell.cell_contents
        except ValueError:                   # an empty cell
            pass
    g = getattr(fn, "__globals__", {})
    out = {}
    for where, name, attrs in _attribute_chains(code):
        scope = g if where == "global" else closure
        if name not in scope:
            continue
        value, path = scope[name], name
        for attr in attrs:
            if not _user_module(value) or attr not in vars(value):
                break
            value, path = vars(value)[attr], f"{path}.{attr}"
            out[path] = value
    return sorted(out.items())


def _names_read(code, depth: int = 0) -> set:
    """The global names a code object reads, with those of the functions, lambdas and
    comprehensions nested in it."""
    names = set(code.co_names)
    if depth < 8:
        for const in code.co_consts:
            if inspect.iscode(const):
                names |= _names_read(const, depth + 1)
    return names


def _helper_text(fn, depth: int, seen: set) -> str:
    """A user function that a hypothesis function reads: its source and what it reads in turn
    (``function_inputs``); a function met before (recursion, a helper called twice) or one beyond
    HELPER_DEPTH by its name alone."""
    name = getattr(fn, "__qualname__", "?")
    if fn.__code__ in seen or depth >= HELPER_DEPTH:
        return f"<function {name}>"
    return "<function " + name + ">{" + function_text(fn) + "|" + function_inputs(fn, depth + 1, seen) + "}"


def _package_dirs() -> tuple[str, ...]:
    """Folders whose functions a version does not follow: the standard library, installed
    packages (site-packages) and deepbase_duck itself."""
    import os
    import sysconfig
    paths = sysconfig.get_paths()
    dirs = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    import site
    try:
        dirs |= set(site.getsitepackages()) | {site.getusersitepackages()}
    except AttributeError:                   # pragma: no cover - a virtualenv's old site module
        pass
    dirs.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))    # .../deepbase_duck
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)


_PACKAGE_DIRS: tuple[str, ...] | None = None
_USER_FILES: dict[str, bool] = {}          # code file -> whether its functions are followed


def _user_function(v) -> bool:
    """Whether ``v`` is a Python function of the user's code (a script, a notebook cell, a module of
    the user's project, ``exec``): not a builtin, nor from the standard library, an installed
    package or deepbase_duck."""
    if not inspect.isfunction(v):
        return False
    module = getattr(v, "__module__", None) or ""
    if module == "deepbase_duck" or module.startswith("deepbase_duck."):
        return False
    return _user_file(v.__code__.co_filename)


def _user_module(v) -> bool:
    """Whether ``v`` is a module of the user's code: one made from a file outside the standard
    library, the installed packages and deepbase_duck (a namespace package by its folders), or one
    made in memory (``types.ModuleType``); not a built-in or frozen module."""
    if not inspect.ismodule(v):
        return False
    name = v.__name__ or ""
    if name == "deepbase_duck" or name.startswith("deepbase_duck.") or name in sys.builtin_module_names:
        return False
    spec = getattr(v, "__spec__", None)
    files = [getattr(v, "__file__", None)] if getattr(v, "__file__", None) else list(getattr(v, "__path__", None) or ())
    if not files:                            # no file: built in, frozen, or made in memory by the user
        return getattr(spec, "origin", None) not in ("built-in", "frozen")
    return all(isinstance(f, str) and _user_file(f) for f in files)


def _user_file(f: str) -> bool:
    """Whether code from file ``f`` is the user's (see _user_function); kept per file."""
    global _PACKAGE_DIRS
    known = _USER_FILES.get(f)
    if known is None:
        if f.startswith("<"):                # <stdin>, <string> (exec), a notebook's cell name
            known = not f.startswith("<frozen")
        else:
            import os
            if _PACKAGE_DIRS is None:
                _PACKAGE_DIRS = _package_dirs()
            real = os.path.realpath(f)
            known = not any(real.startswith(d) for d in _PACKAGE_DIRS)
        _USER_FILES[f] = known
    return known


# -- registry -------------------------------------------------------------------------------
_REGISTRY: dict[str, Hypothesis] = {}


def register(h: Hypothesis, replace: bool = True, stored_name: bool = False) -> Hypothesis:
    """Register ``h`` under its name. A name with whitespace around it is refused (it would be
    part of the name, and 'digit' would never find ' digit '), except ``stored_name``: a name a
    store already holds (a definition stored before names were checked), which stays usable."""
    if not stored_name:
        check_name("hypothesis", h.name, error=HypothesisError)
    if not replace and h.name in _REGISTRY:
        raise HypothesisError(f"a hypothesis named {h.name!r} is already registered")
    _REGISTRY[h.name] = h
    return h


def registry() -> dict[str, Hypothesis]:
    return dict(_REGISTRY)


_BUILTINS: dict[str, Hypothesis] = {}


def mark_builtins() -> None:
    """Note the hypotheses registered now as deepbase_duck's built-ins (hypotheses/__init__.py
    calls it once its modules have registered theirs): ``is_builtin`` tells them from the user's."""
    _BUILTINS.update(_REGISTRY)


def is_builtin(h: Hypothesis) -> bool:
    """Whether ``h`` is one of the built-in hypotheses registered by deepbase_duck itself."""
    return _BUILTINS.get(h.name) is h


def get_hypothesis(name: str) -> Hypothesis:
    if isinstance(name, Hypothesis):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError("hypothesis", name, _REGISTRY) from None


def hypothesis(name: str | None = None, kind: str = "binary", description: str = "",
               version: str | None = None, categories=None, batch=None):
    """Decorator: ``@hypothesis('has_digit')`` registers ``fn(text) -> labels``. ``batch``: an
    optional ``texts -> [labels, ...]`` giving the same labels for many texts at once (a tagger's
    batched call), used where a block of records is labelled together."""
    def wrap(fn):
        cats = categories if categories is None or isinstance(categories, (str, bytes)) else tuple(categories)
        h = Hypothesis(name or fn.__name__, fn, kind, description or (fn.__doc__ or "").strip(),
                       version, cats or None, batch=batch)
        register(h)
        return fn
    return wrap

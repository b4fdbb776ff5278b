"""The exceptions deepbase_duck raises. Every message names the culprit."""
import sys


class DeepBaseError(Exception):
    """Base class of every error deepbase_duck raises on bad input."""


class UnknownNameError(DeepBaseError, KeyError):
    """A model, layer, hypothesis, dataset or measure name that does not exist."""

    def __init__(self, what: str, name: str, valid):
        valid = sorted(valid)
        shown = ", ".join(map(str, valid[:40])) + (" ..." if len(valid) > 40 else "")
        plural = {"hypothesis": "hypotheses", "query id": "query ids",
                  "unit-level measure of this query": "unit-level measures of this query"}.get(what, what + "s")
        close = _close_names(name, valid)
        # (the list shown stops at 40 names: the close ones are named first, wherever they sort)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        super().__init__(f"unknown {what} {name!r}; {hint}valid {plural}: {shown or '(none registered)'}")
        self.what, self.name, self.valid = what, name, valid

    def __str__(self):  # KeyError would quote the message
        return self.args[0]

    def __reduce__(self):
        """Pickled with its own arguments (a Ray worker's error comes back to the driver pickled:
        rebuilt from the message alone, ``__init__`` would fail and the error be lost)."""
        return type(self), (self.what, self.name, self.valid), self.__dict__


def refused_for_input(exc: BaseException) -> bool:
    """Whether ``exc`` is a refusal of a call's input: it and every exception it was raised from
    or while handling (``__cause__``, ``__context__``) are DeepBaseErrors. A DeepBaseError raised
    from another exception (a hypothesis function that raised, a loader that failed) is not: that
    cause's traceback is where its bug is. (The shell shows a refusal as one line, anything else
    with its traceback.)"""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if not isinstance(exc, DeepBaseError):
            return False
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)
    return True


def without_caller(message: str, names) -> str:
    """``message`` without a leading 'name: ' of one of ``names`` (the first that starts it): the
    library names the function called, which the CLI's error line (naming its command) and a SQL
    function (naming itself) put otherwise."""
    for name in names:
        if message.startswith(name + ": "):
            return message[len(name) + 2:]
    return message


def _close_names(name, valid, n: int = 5) -> list[str]:
    """Up to ``n`` names of ``valid`` close to ``name``, the closest first, as they are spelt,
    compared regardless of case and whitespace: 'PTB' or ' ptb ' is most likely 'ptb' (difflib
    alone finds nothing alike in 'PTB' and 'ptb')."""
    import difflib

    def key(v) -> str:
        return "".join(str(v).casefold().split())

    spelt: dict[str, list[str]] = {}
    for v in valid:
        spelt.setdefault(key(v), []).append(str(v))
    close = difflib.get_close_matches(key(name), list(spelt), n=n, cutoff=0.6)
    return [v for k in close for v in spelt[k]][:n]


class UnknownKeywordError(DeepBaseError, TypeError):
    """A keyword argument a function does not take (also a TypeError, as Python's own)."""


class BadParameterError(DeepBaseError, ValueError):
    """A measure or query parameter out of its range (also a ValueError)."""


class HypothesisError(DeepBaseError, ValueError):
    """A hypothesis function returned labels of the wrong length, type or range."""


class ActivationError(DeepBaseError, ValueError):
    """A model produced NaN or infinite activations, or an output of an unusable shape."""


class EmptyDatasetError(DeepBaseError, ValueError):
    """A dataset (or the selected part of it) has no records or no symbols."""


def counted(count, one: str, many: str | None = None, fmt: str = "") -> str:
    """``count`` and the noun for it, as messages and reports write counts: '1 record', '3 records'
    (``many``: an irregular plural; ``fmt``: the count's format spec, ',' for thousands)."""
    return f"{format(count, fmt)} {one if count == 1 else (many or one + 's')}"


def check_name(what: str, name, stored=lambda name: False, error=DeepBaseError) -> str:
    """``name`` when it can name a new ``what`` ('model', 'dataset'): a non-empty string with no
    whitespace around it. ' ptb ' is refused, not stripped: stored as given it would never match
    'ptb', and stripped it would make two spellings one name. ``stored(name)`` says whether the
    store already holds the name (a store written before this check): such a name stays usable.
    Refusals raise ``error``."""
    if not isinstance(name, str) or not name.strip():
        raise error(f"a {what} name must be a non-empty string, got {name!r}")
    if name != name.strip() and not stored(name):
        raise error(f"{what} name {name!r} has whitespace around it, which would be part of the name "
                    f"({name.strip()!r} would not find it); give {name.strip()!r}")
    return name


def _shown(value, limit: int = 80) -> str:
    """``value``'s repr for a message, cut to ``limit`` characters: a value refused for its size
    (10**400) is not written out whole, and an int past Python's limit on digits converted to
    text, whose repr raises ValueError, still gets its message."""
    try:
        text = repr(value)
    except ValueError:
        return f"an integer of more than {sys.get_int_max_str_digits()} digits"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int when it is a whole number >= ``minimum`` (and <= ``maximum``, where
    given; a bool, a float with a fraction or a string is refused, naming ``name``)."""
    import numbers
    ok = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not ok or value < minimum:
        raise DeepBaseError(f"{name} must be an integer >= {minimum}, got {_shown(value)}")
    if maximum is not None and value > maximum:
        raise DeepBaseError(f"{name} must be an integer from {minimum} to {maximum}, got {_shown(value)}")
    return int(value)


#: The largest seed: seeds reach SQL (seeded_order, the sampling macros) as BIGINT.
MAX_SEED = 2 ** 63 - 1


def check_integer(name: str, value, minimum: int) -> int:
    """check_int for a measure parameter: the same rule (a whole number >= ``minimum``; 2.0 is
    taken as 2), refusals raised as BadParameterError. ``name`` should hold the measure, e.g.
    'mi: bins'."""
    try:
        return check_int(name, value, minimum)
    except DeepBaseError as e:
        raise BadParameterError(str(e)) from None


def check_float(name: str, value, low: float = -float("inf"), high: float = float("inf"), *,
                open_low: bool = False, open_high: bool = False) -> float:
    """``value`` as a float when it is a finite real number between ``low`` and ``high`` (each end
    included unless ``open_low`` / ``open_high``); a bool, a string, None, NaN, an infinity or an
    int beyond the floats is refused with a BadParameterError naming ``name`` (e.g. 'corr:
    confidence') and the value."""
    import math
    import numbers
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    try:
        ok = ok and math.isfinite(value)
    except OverflowError:             # an int too large for a float (10**400): no float stands for it
        ok = False
    if ok:
        ok = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        if math.isfinite(low) and math.isfinite(high):
            what = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        elif math.isfinite(low):
            what = f"a finite number {'>' if open_low else '>='} {low:g}"
        elif math.isfinite(high):
            what = f"a finite number {'<' if open_high else '<='} {high:g}"
        else:
            what = "a finite number"
        raise BadParameterError(f"{name} must be {what}, got {_shown(value)}")
    return float(value)


def check_intervals(measure: str, value, symbols: str,
                    records: str = "the record is the unit of sampling") -> str:
    """A measure's ``intervals`` parameter: 'records' (the symbols of a record are dependent;
    ``records`` says how the measure then takes them as clusters) or 'symbols' (every symbol
    independent; ``symbols`` names that interval); anything else is a BadParameterError."""
    if value not in ("records", "symbols"):
        raise BadParameterError(f"{measure}: intervals must be 'records' (symbols of a record are dependent: "
                                f"{records}) or 'symbols' ({symbols}), got {value!r}")
    return value

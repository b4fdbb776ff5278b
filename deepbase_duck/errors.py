"""The exceptions deepbase_duck raises. Every message names the culprit."""


class DeepBaseError(Exception):
    """Base class of every error deepbase_duck raises on bad input."""


class UnknownNameError(DeepBaseError, KeyError):
    """A model, layer, hypothesis, dataset or measure name that does not exist."""

    def __init__(self, what: str, name: str, valid):
        valid = sorted(valid)
        shown = ", ".join(map(str, valid[:40])) + (" ..." if len(valid) > 40 else "")
        plural = {"hypothesis": "hypotheses", "query id": "query ids",
                  "unit-level measure of this query": "unit-level measures of this query"}.get(what, what + "s")
        import difflib
        close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=5, cutoff=0.6)
        # (the list shown stops at 40 names: the close ones are named first, wherever they sort)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        super().__init__(f"unknown {what} {name!r}; {hint}valid {plural}: {shown or '(none registered)'}")
        self.what, self.name, self.valid = what, name, valid

    def __str__(self):  # KeyError would quote the message
        return self.args[0]


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


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int when it is a whole number >= ``minimum`` (a bool, a float with a
    fraction or a string is refused, naming ``name``)."""
    import numbers
    ok = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not ok or value < minimum:
        raise DeepBaseError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


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
    included unless ``open_low`` / ``open_high``); a bool, a string, None, NaN or an infinity is
    refused with a BadParameterError naming ``name`` (e.g. 'corr: confidence') and the value."""
    import math
    import numbers
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
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
        raise BadParameterError(f"{name} must be {what}, got {value!r}")
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

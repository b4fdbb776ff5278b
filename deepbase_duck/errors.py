"""The exceptions deepbase_duck raises. Every message names the culprit."""


class DeepBaseError(Exception):
    """Base class of every error deepbase_duck raises on bad input."""


class UnknownNameError(DeepBaseError, KeyError):
    """A model, layer, hypothesis, dataset or measure name that does not exist."""

    def __init__(self, what: str, name: str, valid):
        valid = sorted(valid)
        shown = ", ".join(map(str, valid[:40])) + (" ..." if len(valid) > 40 else "")
        plural = {"hypothesis": "hypotheses"}.get(what, what + "s")
        super().__init__(f"unknown {what} {name!r}; valid {plural}: {shown or '(none registered)'}")
        self.what, self.name, self.valid = what, name, valid

    def __str__(self):  # KeyError would quote the message
        return self.args[0]


class BadParameterError(DeepBaseError, ValueError):
    """A measure or query parameter out of its range (also a ValueError)."""


class HypothesisError(DeepBaseError, ValueError):
    """A hypothesis function returned labels of the wrong length, type or range."""


class ActivationError(DeepBaseError, ValueError):
    """A model produced NaN or infinite activations, or an output of an unusable shape."""


class EmptyDatasetError(DeepBaseError, ValueError):
    """A dataset (or the selected part of it) has no records or no symbols."""


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int when it is a whole number >= ``minimum`` (a bool, a float with a
    fraction or a string is refused, naming ``name``)."""
    import numbers
    ok = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not ok or value < minimum:
        raise DeepBaseError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)

"""The exceptions deepbase_duck raises. Every message names the culprit."""


class DeepBaseError(Exception):
    """Base class of every error deepbase_duck raises on bad input."""


class UnknownNameError(DeepBaseError, KeyError):
    """A model, layer, hypothesis, dataset or measure name that does not exist."""

    def __init__(self, what: str, name: str, valid):
        valid = sorted(valid)
        shown = ", ".join(map(str, valid[:40])) + (" ..." if len(valid) > 40 else "")
        super().__init__(f"unknown {what} {name!r}; valid {what}s: {shown or '(none registered)'}")
        self.what, self.name, self.valid = what, name, valid

    def __str__(self):  # KeyError would quote the message
        return self.args[0]


class HypothesisError(DeepBaseError, ValueError):
    """A hypothesis function returned labels of the wrong length, type or range."""


class ActivationError(DeepBaseError, ValueError):
    """A model produced NaN or infinite activations, or an output of an unusable shape."""


class EmptyDatasetError(DeepBaseError, ValueError):
    """A dataset (or the selected part of it) has no records or no symbols."""

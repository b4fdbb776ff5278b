"""Hypotheses: functions from a record's text to labels over character spans.

Knows nothing of models. ``core`` defines the Hypothesis type and how labels are normalised and
validated; ``library`` holds the built-ins (text and Python source code); ``grid`` holds the
GridHypothesis, which labels the cells of an image grid instead (image records); ``regex`` the
hypotheses defined by a regular expression from SQL (``define_hypothesis``), kept in the store; ``store``
materialises labels in the DuckDB store, once per dataset, for every model to reuse.
"""
from .core import Hypothesis, hypothesis, registry, get_hypothesis, register
from . import library  # noqa: F401  (registers the built-ins)
from . import sql  # noqa: F401  (registers the SQL grammar hypotheses; sqlglot is needed only to run them)
from . import spacy_pos  # noqa: F401  (registers upos, ptb_tag; spaCy loads on first use)
from .core import mark_builtins as _mark_builtins
from .regex import RegexHypothesis, regex_hypothesis

_mark_builtins()

__all__ = ["Hypothesis", "hypothesis", "registry", "get_hypothesis", "register", "RegexHypothesis",
           "regex_hypothesis"]

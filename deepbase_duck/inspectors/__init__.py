"""Inspectors: mergeable scoring states, in the shape of an aggregate function.

    state = Measure(width, hypotheses, device=...)   # init
    state.update(acts, labels)                        # acts (n, width), labels (n, H), NaN = no label
    state.combine(other_state)                        # merge a state built on other rows
    table = state.finalize()                          # pyarrow.Table of scores

States hold torch tensors on any device and know nothing of DuckDB or of the engine that feeds
them, so streaming, early stopping and parallel workers all use the same code.
"""
from .base import InspectorState, MEASURES, measure_class, register_measure, SCORE_SCHEMA
from .correlation import PearsonState
from . import spearman, pointbiserial, mutual_information, dissection, significance  # noqa: F401
from . import probes, cka  # noqa: F401

__all__ = ["InspectorState", "MEASURES", "measure_class", "register_measure", "SCORE_SCHEMA", "PearsonState"]

"""The planner and the engines: what is cached, which blocks of records to run, and the loop
that feeds inspector states. ``extract`` stores activations; ``inspect`` scores them."""
from .extract import extract, ensure_symbols
from .inspect import LocalEngine, inspect

__all__ = ["extract", "ensure_symbols", "inspect", "LocalEngine"]

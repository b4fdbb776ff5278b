"""Text corpora used by deepbase_duck (currently: Python's standard library)."""

from .stdlib import (
    chunk_text,
    is_heldout,
    read_source,
    stdlib_files,
    stdlib_records,
    stdlib_root,
)

__all__ = [
    "chunk_text",
    "is_heldout",
    "read_source",
    "stdlib_files",
    "stdlib_records",
    "stdlib_root",
]

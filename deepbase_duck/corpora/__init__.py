"""Text corpora: Python's standard library (bundled with Python), the Penn Treebank sample, generated
SQL, scenes, and a user's own files (``read_records``)."""

from .files import FORMATS, RecordsRead, cut_text, read_records
from .stdlib import (
    chunk_text,
    is_heldout,
    read_source,
    stdlib_files,
    stdlib_records,
    stdlib_root,
)

__all__ = [
    "FORMATS",
    "RecordsRead",
    "read_records",
    "cut_text",
    "chunk_text",
    "is_heldout",
    "read_source",
    "stdlib_files",
    "stdlib_records",
    "stdlib_root",
]

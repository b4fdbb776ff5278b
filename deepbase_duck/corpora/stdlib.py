"""Python standard-library source as a text corpus.

The corpus is the set of non-test ``.py`` files of the running interpreter's
standard library (``sysconfig.get_paths()["stdlib"]``), less the files its build or
installation wrote for this machine: ``_sysconfigdata_*.py`` (the build's configuration: its
paths and compiler flags), ``config-<version>-<platform>/python-config.py`` (a script naming the
install prefix) and the site hooks ``sitecustomize.py`` / ``usercustomize.py`` that a
distribution (Debian, Ubuntu) or a user adds. Their text and even their names differ between machines running the same
Python version (``config-3.12-x86_64-linux-gnu/python-config.py`` falls in the held-out split),
so records cached by their text would differ too.

Train / held-out split
----------------------
The split is a pure function of a file's *relative POSIX path* (e.g.
``"json/decoder.py"``), so it is deterministic across runs and machines and
does not depend on which other files exist: a file is **held out** when the
first byte of ``sha256(relpath.encode("utf-8"))`` is below 26, i.e. with
probability 26/256 (about 10%). All other files are training files.
"""

from __future__ import annotations

import hashlib
import io
import pathlib
import sysconfig
import tokenize

__all__ = [
    "EXCLUDED_PREFIXES",
    "HELDOUT_THRESHOLD",
    "stdlib_root",
    "stdlib_files",
    "is_heldout",
    "read_source",
    "chunk_text",
    "stdlib_records",
]

#: A path is excluded when any of its components starts with one of these.
EXCLUDED_PREFIXES = (
    "test",  # also covers "tests"
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "__pycache__",
    "ensurepip",
    "turtledemo",
    "dist-packages",  # Debian's site-packages
    # written by the build or the installation for this machine (see the module docstring)
    "_sysconfigdata",
    "config-",
    "sitecustomize",
    "usercustomize",
)

#: A file is held out when the first byte of sha256(relpath) is below this.
HELDOUT_THRESHOLD = 26

SPLITS = ("train", "heldout")


def stdlib_root() -> pathlib.Path:
    """Directory holding the running interpreter's standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _excluded(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(EXCLUDED_PREFIXES) for part in parts)


def stdlib_files() -> list[str]:
    """Sorted relative POSIX paths of the non-test ``.py`` files of the stdlib."""
    root = stdlib_root()
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _excluded(rel.parts):
            continue
        if not path.is_file():
            continue
        out.append(rel.as_posix())
    out.sort()
    return out


def is_heldout(relpath: str) -> bool:
    """True when ``relpath`` belongs to the held-out split (about 10% of files).

    Deterministic: held out iff ``sha256(relpath.encode("utf-8")).digest()[0] < 26``.
    """
    return hashlib.sha256(relpath.encode("utf-8")).digest()[0] < HELDOUT_THRESHOLD


def read_source(relpath: str) -> str:
    """Read a stdlib file as Python reads source: in the encoding its coding cookie names (PEP 263:
    ``# -*- coding: latin-1 -*-``), else UTF-8, a leading byte-order mark dropped, undecodable
    bytes replaced, with "\\n" newlines (a "\\r\\n" or a lone "\\r" line end read as one).

    Decoded as UTF-8 whatever the cookie said, a Latin-1 file's accented letters became
    replacement characters, and a BOM became a character of the first record. A cookie Python
    itself would refuse (an unknown or non-text codec) falls back to UTF-8."""
    data = (stdlib_root() / relpath).read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        text = data.decode(encoding, errors="replace")
    except (SyntaxError, LookupError):     # unknown codec, or no UTF-8 in the first lines
        text = data.decode("utf-8-sig", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def chunk_text(text: str, max_chars: int = 2000) -> list[tuple[int, str]]:
    """Split ``text`` into chunks of at most ``max_chars`` characters.

    Chunks end at line boundaries (after a "\\n") whenever possible; a single
    line longer than ``max_chars`` is split hard. Returns a list of
    ``(char_offset_in_text, chunk)``; ``"".join(c for _, c in result) == text``.
    """
    from ..errors import check_integer
    max_chars = check_integer("chunk_text: max_chars", max_chars, 1)
    from .files import cut_text
    return cut_text(text, max_chars, words=False)


def _split_files(split: str) -> list[str]:
    if split not in SPLITS:             # a DeepBaseError as every refusal, and a ValueError as before
        from ..errors import BadParameterError
        raise BadParameterError(f"unknown standard-library split {split!r}; valid splits: {', '.join(SPLITS)}")
    want_heldout = split == "heldout"
    return [f for f in stdlib_files() if is_heldout(f) == want_heldout]


def stdlib_records(
    split: str = "heldout",
    max_chars: int = 2000,
    limit_chars: int | None = None,
    chunker=None,
    *,
    caller: str = "stdlib_records",
) -> list[dict]:
    """Chunked records ``{"source", "offset", "text"}`` of one split.

    Files are visited in sorted order and each is cut with ``chunker(text, max_chars)``
    (default :func:`chunk_text`).
    When ``limit_chars`` is given, records are emitted (whole chunks only) until
    their total length reaches ``limit_chars``. ``caller``: the function named in a refusal of
    ``max_chars`` or ``limit_chars`` (code_records passes its own name: a bare 'max_chars must
    be ...' did not say which call was wrong).
    """
    from ..errors import check_int
    max_chars = check_int(f"{caller}: max_chars", max_chars, 1)
    limit_chars = None if limit_chars is None else check_int(f"{caller}: limit_chars", limit_chars, 1)
    files = _split_files(split)
    records: list[dict] = []
    total = 0
    for rel in files:
        if limit_chars is not None and total >= limit_chars:
            break
        for offset, chunk in (chunker or chunk_text)(read_source(rel), max_chars):
            if limit_chars is not None and total >= limit_chars:
                break
            records.append({"source": rel, "offset": offset, "text": chunk})
            total += len(chunk)
    return records

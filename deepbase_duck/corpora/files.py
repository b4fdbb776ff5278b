"""Records from a user's own files: the corpus of a study that is not bundled.

``read_records(path)`` returns the records ``add_dataset`` stores (dicts with 'text' and
'source'), from

- ``lines``: a text file, one record per non-empty line (a sentence per line, as in the Penn
  Treebank); the line's end is not part of the record;
- ``jsonl``: JSON Lines, one object per line, the record's text in ``column``;
- ``csv`` / ``tsv``: a header row, the text in ``column``;
- ``parquet``: the text in ``column``;
- ``files``: a folder, every file matching ``pattern`` one record (hidden files and folders,
  '.*', left out unless the pattern names them; for source code: a file per record), cut into
  records of at most ``max_chars`` characters when given (at line ends, else at whitespace:
  ``cut_text``);
- ``paths``: a folder, every file matching ``pattern`` one record whose text is the file's
  descriptor ``{"path": "/absolute/path", "sha256": "<first 16 hex digits>"}`` (images for an
  ImageAdapter, corpora/images.py). The digest of the file's bytes ties the record to the
  image it was made from: stored activations and labels are keyed by the record's text, so a
  file replaced under the same path would otherwise be scored with the old image's; loading it
  checks the digest (``images.load_image``).

The format follows the file's suffix unless given. Each record's source says where it came
from (``file:line``, ``file:row``, or the file's path in the folder with the character offset of
the chunk), or comes from ``source_column`` (where its value is null, or an empty CSV field: the
line's or row's). Empty and missing texts are skipped and counted (``RecordsRead.skipped``), so
a record's position in the dataset may differ from its row: its source keeps the way back.
Unreadable input raises DeepBaseError naming the file and the place; so does an argument the
format has no use for (``column`` or ``source_column`` for lines, files or paths, ``pattern`` for
a file), which would otherwise be ignored with no sign.

Text files (lines, jsonl, files) are read as Python reads text: a leading byte-order mark is
dropped and every line end, "\\r\\n" or a lone "\\r" (classic Mac OS), is "\\n". CSV and TSV
values may be quoted (a quoted value may hold line ends and, doubled, quotes); a quote that opens a
value without enclosing it whole (``"Hello," she said``) is refused, naming its line, since a
lenient reading would drop it from the text.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import DeepBaseError

FORMATS = ("lines", "jsonl", "csv", "tsv", "parquet", "files", "paths")
_SUFFIX = {".txt": "lines", ".text": "lines", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
           ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}


class RecordsRead(list):
    """The records read (a list of {'text', 'source'} dicts), with ``skipped``: how many empty
    or missing texts were left out, and ``format``: the format read."""

    def __init__(self, records, skipped: int, fmt: str):
        super().__init__(records)
        self.skipped, self.format = skipped, fmt


def read_records(path, format: str | None = None, column: str = "text", source_column: str | None = None,
                 pattern: str = "**/*", max_chars: int | None = None) -> RecordsRead:
    """The records of the file or folder at ``path`` (see the module docstring); ``format``:
    one of FORMATS, or None to choose by the suffix (a folder: 'files')."""
    p = Path(path)
    if not p.exists():
        raise DeepBaseError(f"no file or folder at {str(p)!r}")
    fmt = format or ("files" if p.is_dir() else _SUFFIX.get(p.suffix.lower()))
    if fmt is None:
        raise DeepBaseError(f"{p.name}: cannot tell the format from the suffix {p.suffix!r}; "
                            f"give one of {', '.join(FORMATS)}")
    if fmt not in FORMATS:
        raise DeepBaseError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    folders = ("files", "paths")
    if p.is_dir() and fmt not in folders:
        raise DeepBaseError(f"{str(p)!r} is a folder: read it with the format 'files' (each file's text a "
                            f"record) or 'paths' (each file's path, for images)")
    if fmt in folders and not p.is_dir():
        raise DeepBaseError(f"{str(p)!r} is a file: the format {fmt!r} reads a folder")
    if max_chars is not None and fmt == "paths":
        raise DeepBaseError("read_records: max_chars cuts texts; the format 'paths' makes one record per file")
    if max_chars is not None:
        from ..errors import check_int
        if isinstance(max_chars, str):
            raise DeepBaseError(f"read_records: max_chars must be a positive number of characters, got {max_chars!r}")
        max_chars = check_int("read_records: max_chars", max_chars, 1)
    up = isinstance(pattern, str) and ".." in Path(pattern).parts       # '../x/*' would read another folder
    if not isinstance(pattern, str) or not pattern or Path(pattern).is_absolute() or up:
        raise DeepBaseError(f"read_records: pattern must be a non-empty glob relative to the folder (like '**/*.txt'), "
                            f"got {pattern!r}" + (" ('..' leads out of the folder: read that folder instead)"
                                                  if up else ""))
    _refuse_unused(p, fmt, column, source_column, pattern)
    if fmt == "files":
        rows = ((name, _text(f)) for name, f in _folder(p, pattern))
    elif fmt == "paths":
        from .images import path_record
        rows = ((name, path_record(f)) for name, f in _folder(p, pattern))
    elif fmt == "lines":
        rows = ((f"{p.name}:{i}", line) for i, line in enumerate(_lines(_text(p)), 1))
    elif fmt == "jsonl":
        rows = _jsonl(p, column, source_column)
    else:
        rows = _table(p, fmt, column, source_column)
    out, skipped = [], 0
    for source, text in rows:
        if text is None or text == "" or (fmt == "lines" and not text.strip()):
            skipped += 1
            continue
        if not isinstance(text, str):
            raise DeepBaseError(f"{source}: the text is a {type(text).__name__}, not a string")
        if max_chars is None:
            out.append({"text": text, "source": source})
        else:
            out += [{"text": chunk, "source": f"{source}@{offset}" if offset else source}
                    for offset, chunk in cut_text(text, max_chars)]
    if not out:
        raise DeepBaseError(f"{str(p)!r} holds no non-empty text ({skipped} empty or missing)")
    return RecordsRead(out, skipped, fmt)


_TABLES = ("jsonl", "csv", "tsv", "parquet")


def _refuse_unused(p: Path, fmt: str, column, source_column, pattern: str) -> None:
    """Refuse, naming it and the format, an argument that ``fmt`` has no use for: ``column`` or
    ``source_column`` for a format without columns (lines, files, paths), ``pattern`` for a
    file. Ignored, a ``column='body'`` meant for a CSV file would read a text file's lines with
    no sign. The defaults (column 'text', pattern '**/*') are no request: they pass."""
    if fmt not in _TABLES:
        for arg, flag, value, default in (("column", "--column", column, "text"),
                                          ("source_column", "--source-column", source_column, None)):
            if value is not None and value != default:
                raise DeepBaseError(f"{arg} {value!r} (add-dataset {flag} {value}) names a column or key of a "
                                    f"{', '.join(_TABLES[:-1])} or {_TABLES[-1]} file; {str(p)!r} is read as {fmt!r}, which has none: "
                                    f"leave {arg} out, or give the format the file is in")
    elif not isinstance(column, str) or not column:
        raise DeepBaseError(f"read_records: column must name the {fmt} file's text column or key, got {column!r}")
    if fmt not in ("files", "paths") and pattern != "**/*":
        raise DeepBaseError(f"pattern {pattern!r} (add-dataset --glob {pattern}) picks the files of a folder; "
                            f"{str(p)!r} is a file, read as {fmt!r}: leave pattern out, or give the folder")


def _text(p: Path) -> str:
    """The file's text with every line end ("\\r\\n", or a lone "\\r" as written by classic Mac
    OS and some exporters) read as "\\n", as Python's own text files read them; a leading
    byte-order mark is not text."""
    data = p.read_bytes()
    bom = len(_BOM) if data.startswith(_BOM) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = bom + exc.start                                     # the byte's place in the file
        line = _line_of(data[:at])
        raise DeepBaseError(f"{p}: not UTF-8 text (byte {at}, line {line}); convert it to UTF-8 first") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


_BOM = b"\xef\xbb\xbf"


def _line_of(prefix: bytes) -> int:
    """The line (1-based) that follows the bytes ``prefix``, line ends read as in ``_text``."""
    return prefix.count(b"\n") + prefix.count(b"\r") - prefix.count(b"\r\n") + 1


def cut_text(text: str, max_chars: int, words: bool = True) -> list[tuple[int, str]]:
    """(offset, piece) of ``text`` cut into pieces of at most ``max_chars`` characters that
    concatenate back to it: after the last line end within the limit; in a line longer than the
    limit (a paragraph on one line), after its last whitespace within it, so that no word is split
    (a cut anywhere would end a record in 'lingu' and begin the next with 'istics', each tokenised
    and labelled as a word of its own); a word longer than the limit is cut where it must be, but
    never between a character and the combining marks, joiners or variation selectors that follow
    it (an 'e' and its U+0301 accent stay in one record), nor after a zero-width joiner unless the
    joined sequence is longer than the limit. ``words=False`` cuts a line longer than the limit
    anywhere (``stdlib.chunk_text``: the records the bundled models were trained on).

    Nothing is dropped, whitespace included: a piece may hold only whitespace (the line end after
    a line that fills the limit, a run of blank lines or spaces longer than it, the indentation
    before a word too long for the rest of the limit). ``max_chars`` below 1 is refused (0 cut
    empty pieces for ever)."""
    from ..errors import check_integer
    max_chars = check_integer("cut_text: max_chars", max_chars, 1)
    out, start, n = [], 0, len(text)
    while start < n:
        end = start + max_chars
        if end < n:
            cut = text.rfind("\n", start, end)
            if cut < 0 and words:
                cut = max(text.rfind(c, start, end) for c in (" ", "\t"))
            if cut >= 0:
                end = cut + 1
            elif words:
                # the last place within the limit the character sequence allows, else the last
                # not before a mark (a joined sequence longer than the limit: cut after a joiner),
                # else the hard cut (all marks: nothing better)
                for joined in (_joined, lambda text, i: _joins_previous(text[i])):
                    end = start + max_chars
                    while end > start + 1 and joined(text, end):
                        end -= 1
                    if not joined(text, end):
                        break
                else:
                    end = start + max_chars
        else:
            end = n
        out.append((start, text[start:end]))
        start = end
    return out


def _joined(text: str, i: int) -> bool:
    """Whether ``text`` cannot be cut before ``text[i]``: it belongs to the character before it
    (``_joins_previous``), or follows a zero-width joiner, which binds the characters on both of
    its sides (the family emoji man, ZWJ, woman: cut after the joiner, one record would end in a
    dangling joiner and the next begin with half of the emoji)."""
    return _joins_previous(text[i]) or (i > 0 and text[i - 1] == "\u200d")


def _joins_previous(c: str) -> bool:
    """Whether ``c`` belongs to the character before it: a combining mark, a zero-width joiner,
    a variation selector or an emoji skin-tone modifier."""
    import unicodedata
    return (unicodedata.category(c) in ("Mn", "Mc", "Me") or c == "\u200d" or "\ufe00" <= c <= "\ufe0f"
            or "\U0001f3fb" <= c <= "\U0001f3ff")


def _lines(text: str) -> list[str]:
    """The lines of ``text`` without their ends (a final line end opens no empty line)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _folder(p: Path, pattern: str):
    """(path in the folder, file) of the files of ``p`` matching ``pattern``, sorted; hidden ones
    (a name or a folder on the way starting with '.': .DS_Store, .git/) are left out unless the
    pattern itself names a hidden file or folder."""
    hidden_asked = any(part.startswith(".") for part in Path(pattern).parts)
    files = sorted(f for f in p.glob(pattern) if f.is_file()
                   and (hidden_asked or not any(part.startswith(".") for part in f.relative_to(p).parts)))
    if not files:
        raise DeepBaseError(f"no file in {str(p)!r} matches {pattern!r}"
                            + ("" if hidden_asked else " (hidden files, named '.*', are left out)"))
    for f in files:
        yield f.relative_to(p).as_posix(), f


def _jsonl(p: Path, column: str, source_column: str | None):
    for i, line in enumerate(_lines(_text(p)), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DeepBaseError(f"{p.name}:{i}: not a JSON object ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DeepBaseError(f"{p.name}:{i}: a JSON {type(obj).__name__}, not an object")
        if column not in obj:
            raise DeepBaseError(f"{p.name}:{i}: no key {column!r} (keys: {', '.join(map(str, obj)) or 'none'}); "
                                f"name the text's key with column")
        source = f"{p.name}:{i}"
        if source_column is not None:
            if source_column not in obj:
                raise DeepBaseError(f"{p.name}:{i}: no key {source_column!r} for the source")
            if obj[source_column] is not None:                  # null: the line, as without a source key
                source = str(obj[source_column])
        text = obj[column]
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:                   # a lone surrogate escape (\ud800)
                raise DeepBaseError(f"{source}: the text holds {text[exc.start]!r}, not a character "
                                    f"(a lone surrogate in a JSON escape)") from None
        yield source, text


def _table(p: Path, fmt: str, column: str, source_column: str | None):
    import pyarrow as pa
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq
            t = pq.read_table(p)
        else:
            from pyarrow import csv
            # a quoted value may hold line ends: without newlines_in_values, a file of more than
            # one read block (about 1 MB) whose block boundary falls inside such a value is cut
            # there, and a record silently loses its first lines
            t = csv.read_csv(p, parse_options=csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",",
                                                               newlines_in_values=True),
                             convert_options=csv.ConvertOptions(
                                 strings_can_be_null=True, null_values=[""],   # only an empty field is missing
                                 column_types={c: pa.string() for c in (column, source_column) if c}))
    except (pa.ArrowInvalid, OSError) as exc:
        if "invalid UTF8" in str(exc):                          # Latin-1 and the like
            _text(p)                                            # names the byte and its line
            raise DeepBaseError(f"{p.name}: not UTF-8 text ({exc}); convert it to UTF-8 first") from None
        raise DeepBaseError(f"{p.name}: cannot read it as {fmt}: {exc}") from None
    if fmt != "parquet":
        _check_quoting(p, fmt)
    repeated = sorted({c for c in t.column_names if t.column_names.count(c) > 1})
    if repeated:
        raise DeepBaseError(f"{p.name}: column name(s) {', '.join(map(repr, repeated))} appear more than once")
    for c in [column] + ([source_column] if source_column else []):
        if c not in t.column_names:
            raise DeepBaseError(f"{p.name}: no column {c!r} (columns: {', '.join(t.column_names)})")
    texts = t.column(column)
    kind = texts.type.value_type if pa.types.is_dictionary(texts.type) else texts.type
    view = getattr(pa.types, "is_string_view", lambda t: False)(kind)       # pyarrow >= 16
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or view):
        raise DeepBaseError(f"{p.name}: column {column!r} holds {texts.type}, not text")
    if kind != texts.type or view:       # a pandas category (dictionary), a string view: as plain text
        texts = texts.cast(pa.large_string())
    rows = [f"{p.name}:row {i}" for i in range(1, t.num_rows + 1)]
    # a missing source is the row's, as in JSON Lines (null): the way back to the record is kept
    sources = ([s if s is not None else row for s, row in zip(t.column(source_column).cast(pa.string()).to_pylist(),
                                                             rows)] if source_column else rows)
    yield from zip(sources, texts.to_pylist())


def _check_quoting(p: Path, fmt: str) -> None:
    """Refuse a CSV or TSV file whose quotes are not CSV quoting: a value that starts with a quote
    must be quoted whole, quotes inside it doubled (``"Hello," she said`` is no quoted value).
    Arrow reads such a value leniently, dropping its quotes (``Hello, she said``): the text would
    change with no sign. Checked with Python's csv module in strict mode, only for files holding a
    quote."""
    import csv
    import io
    data = p.read_bytes()
    if b'"' not in data:
        return
    delimiter = "\t" if fmt == "tsv" else ","
    text = data.decode("utf-8-sig", errors="replace")
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))              # a long text is one long field
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        for _ in reader:
            pass
    except csv.Error as exc:
        line = reader.line_num
        lines = re.split(r"\r\n|\r|\n", text, maxsplit=line)
        shown = lines[line - 1][:80] if 0 < line <= len(lines) else ""
        raise DeepBaseError(
            f"{p.name}:{line}: a quote that does not enclose a whole value ({exc}) in {shown!r}; read as "
            f"{fmt}, its quotes would be dropped from the text. Quote the whole value and double the quotes "
            f"inside it (as csv writers do), or store the records as JSON Lines") from None
    finally:
        csv.field_size_limit(limit)

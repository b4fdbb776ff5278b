"""Python source cut into records at logical-line boundaries.

A record that starts inside a triple-quoted string or a bracketed expression cannot be
tokenized on its own, and the code hypotheses (in_string, in_comment) would mislabel it.
``statement_chunks`` therefore cuts only before lines that start a new logical line
(tokenize's view: no open bracket, no open string), packing whole logical lines into chunks of
at most ``max_chars``; a single logical line longer than that is cut at line boundaries (as
``chunk_text`` does) and may then tokenize only in part.
"""
from __future__ import annotations

import io
import tokenize

from .stdlib import chunk_text, stdlib_records


def _boundaries(text: str) -> list[int]:
    """Character offsets where a logical line starts (after each tokenize NEWLINE)."""
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]     # tokenize's rows: "\n" only
    if starts[-1] != len(text):
        starts.append(len(text))
    out = {0}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NEWLINE and tok.end[0] < len(starts):
                out.add(starts[tok.end[0]])
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return sorted(b for b in out if b < len(text))


def statement_chunks(text: str, max_chars: int = 2000) -> list[tuple[int, str]]:
    """(offset, chunk) pieces of ``text`` cut at logical-line starts; they concatenate back to
    ``text``."""
    from ..errors import check_integer
    max_chars = check_integer("statement_chunks: max_chars", max_chars, 1)
    bounds = _boundaries(text) + [len(text)]
    chunks, start = [], 0
    i = 1
    while start < len(text):
        # the furthest boundary within max_chars
        end = start
        while i < len(bounds) and bounds[i] - start <= max_chars:
            end = bounds[i]
            i += 1
        if end == start:                         # one statement longer than max_chars
            nxt = bounds[i] if i < len(bounds) else len(text)
            for off, piece in chunk_text(text[start:nxt], max_chars):
                chunks.append((start + off, piece))
            start = nxt
            i += 1
            continue
        chunks.append((start, text[start:end]))
        start = end
    return chunks


def code_records(split: str = "heldout", max_chars: int = 2000, limit_chars: int | None = None) -> list[dict]:
    """Like ``stdlib_records`` but cut with ``statement_chunks``."""
    return stdlib_records(split, max_chars, limit_chars, chunker=statement_chunks, caller="code_records")


def sampled_code_records(chars: int, seed: int = 0, split: str = "heldout", max_chars: int = 2000) -> list[dict]:
    """A seeded random sample of whole ``code_records`` (no record cut), about ``chars`` characters
    in all: records are drawn in the order of ``random.Random(seed).shuffle`` until the total
    reaches ``chars``. ``chars`` beyond the split's characters is refused: every seed would give
    the whole split, replicates that are none, with fewer characters than asked."""
    import random

    from ..errors import DeepBaseError, check_int
    from .sqlgen import check_seed
    chars = check_int("sampled_code_records: chars", chars, 1)
    seed = check_seed("sampled_code_records: seed", seed)
    max_chars = check_int("sampled_code_records: max_chars", max_chars, 1)    # named as the call it is
    records = code_records(split, max_chars)
    available = sum(len(r["text"]) for r in records)
    if chars > available:
        raise DeepBaseError(f"sampled_code_records: chars {chars:,} is more than the {split} split holds "
                            f"({available:,} characters in {len(records):,} records): ask for fewer, or take "
                            f"the whole split with code_records({split!r})")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    out, total = [], 0
    for i in order:
        if total >= chars:
            break
        out.append(records[i])
        total += len(records[i]["text"])
    return out

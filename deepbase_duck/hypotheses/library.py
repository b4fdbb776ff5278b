"""Built-in hypotheses.

Factories (make a hypothesis with your parameters, registered under the name you give):
``regex_span``, ``keyword_set``, ``char_class``, ``bracket_depth``.

Registered at import, ready to use by name:

=================  ==========  ===============================================================
name               kind        labels
=================  ==========  ===============================================================
in_string          binary      characters of a Python string literal, quotes and prefix included
in_comment         binary      characters of a ``#`` comment
indent_level       continuous  indentation of the character's logical line, in levels of 4 columns
position_in_line   continuous  0-based column of the character
bracket_depth      continuous  nesting depth of (), [] and {} outside string literals and comments
                               (an opening bracket holds the new depth, a closing one the depth it
                               closes)
python_keyword     binary      Python keywords as whole words
digit              binary      decimal digits (``str.isdecimal``: 0-9 and the decimal digits of other
                               scripts such as Arabic-Indic; not superscripts or circled numbers)
whitespace         binary      spaces, tabs and newlines
uppercase          binary      upper-case letters
=================  ==========  ===============================================================

The code hypotheses (in_string, in_comment, indent_level, bracket_depth) use Python's own
``tokenize``. A record that is a fragment of a file may start inside an indented block: the
indentation of its first code line (blank and comment-only lines skipped) decides whether virtual
lines opening the outer levels are put before it (``_ladder``), so that it tokenizes as in its file.
A record that does not tokenize to its end (for example one that starts inside a triple-quoted
string) is labelled by the tokens read before the error; characters after it hold the default (no
string or comment; ``bracket_depth`` counts every bracket character there, carrying on from the
depth reached). Where tokenize stops differs between Python versions (3.12 reads source with the
compiler's own tokenizer), so the Python version (major.minor) is part of these hypotheses'
versions: labels stored under one Python are computed again under another. A single-quoted
string left open at its line's end (an apostrophe in prose, say) is such an error on 3.12; on
3.11, whose tokenize yields an ERRORTOKEN for its quote and reads the rest of the line as code,
that line's characters from the quote on hold the default and the lines after it are labelled as
tokenize reads them (``_tokens``).

Indentation widths follow Python's rules: a tab advances to the next multiple of 8 columns and a
form feed in the leading whitespace resets the count to 0.
"""
from __future__ import annotations

import collections
import functools
import io
import keyword as _keyword
import re
import sys
import threading
import tokenize
import unicodedata

import numpy as np

from .core import Hypothesis, register

#: Character classes of ``char_class``; "digit" is str.isdecimal (decimal digits: "7", Arabic-Indic
#: "٣"; not "²" or "①", which str.isdigit accepts).
CHAR_CLASSES = {
    "digit": str.isdecimal,
    "alpha": str.isalpha,
    "alnum": str.isalnum,
    "upper": str.isupper,
    "lower": str.islower,
    "space": str.isspace,
    "punct": lambda c: (not c.isalnum()) and (not c.isspace()),
}


# -- factories ------------------------------------------------------------------------------
def _regex_fn(text, pattern, flags, group):
    rx = re.compile(pattern, flags)
    return [(m.start(group), m.end(group)) for m in rx.finditer(text) if m.end(group) > m.start(group)]


def regex_span(name: str, pattern: str, flags: int = 0, group: int | str = 0,
               description: str = "") -> Hypothesis:
    """Binary: the characters of every match of ``pattern`` (or of its ``group``)."""
    rx = re.compile(pattern, flags)  # fail now on a bad pattern, or a group it does not have
    if not (group in rx.groupindex if isinstance(group, str) else
            isinstance(group, (int, np.integer)) and not isinstance(group, bool) and 0 <= group <= rx.groups):
        raise ValueError(f"regex_span {name!r}: the pattern has no group {group!r} (groups: 0..{rx.groups}"
                         + "".join(f", {g!r}" for g in rx.groupindex) + ")")
    fn = functools.partial(_regex_fn, pattern=pattern, flags=flags, group=group)
    return register(Hypothesis(name, fn, "binary", description or f"matches of /{pattern}/"))


def _word_characters() -> str:
    """The body of a regular-expression class of the characters that continue a word besides
    ``\\w`` (letters, digits, ``_``): combining marks (the accent of a decomposed "e\\u0301", the
    vowel signs of Indic scripts) and the other characters Python allows inside an identifier
    (connector punctuation such as "\\u203f", the middle dot). With ``\\w`` alone a whole-word match
    took the Hindi word "par" (on) inside "pari" (fairy), whose last vowel sign is a mark, and the
    keyword "if" inside the identifier "if\\u0301". Such characters lie below U+20000 and in
    U+E0100..U+E01EF (variation selectors), the only ranges read (about 12 ms at import)."""
    cat = unicodedata.category
    ranges: list[list[int]] = []
    for i in (*range(0x80, 0x20000), *range(0xE0000, 0xE1000)):
        c = chr(i)
        if not c.isalnum() and (cat(c)[0] == "M" or ("a" + c).isidentifier()):
            if ranges and ranges[-1][1] == i - 1:
                ranges[-1][1] = i
            else:
                ranges.append([i, i])
    return "".join(re.escape(chr(a)) + ("" if a == b else "-" + re.escape(chr(b))) for a, b in ranges)


#: What continues a word for ``keyword_set``'s whole words: ``\w`` and these (``_word_characters``).
WORD_CHARACTERS = _word_characters()


def keyword_set(name: str, words, case_sensitive: bool = True, whole_word: bool = True,
                description: str = "") -> Hypothesis:
    """Binary: occurrences of any of ``words`` (whole words by default: neither the character
    before nor the one after continues a word, as a letter, digit, ``_``, combining mark or other
    identifier character does: ``WORD_CHARACTERS``)."""
    words = sorted({str(w) for w in words}, key=lambda w: (-len(w), w))
    if not words:
        raise ValueError(f"keyword_set {name!r}: no words given")
    alt = "|".join(re.escape(w) for w in words)
    pattern = (rf"(?<![\w{WORD_CHARACTERS}])(?:{alt})(?![\w{WORD_CHARACTERS}])" if whole_word
               else f"(?:{alt})")
    flags = 0 if case_sensitive else re.IGNORECASE
    return regex_span(name, pattern, flags, 0,
                      description or f"whole-word occurrences of {len(words)} keywords")


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _char_class_fn(text, cls, chars):
    cp = _codepoints(text)
    if chars is not None:
        return np.isin(cp, np.fromiter((ord(c) for c in chars), np.uint32)).astype(np.float64)
    test = CHAR_CLASSES[cls]
    table = np.fromiter((bool(test(chr(i))) for i in range(128)), bool, 128)
    out = np.zeros(len(cp))
    ascii_ = cp < 128
    out[ascii_] = table[cp[ascii_]]
    for i in np.flatnonzero(~ascii_):                    # the rare non-ASCII characters
        out[i] = bool(test(text[i]))
    return out


def char_class(name: str, cls: str | None = None, chars: str | None = None,
               description: str = "") -> Hypothesis:
    """Binary: characters of a class (digit, alpha, alnum, upper, lower, space, punct) or of a
    given set of characters."""
    if (cls is None) == (chars is None):
        raise ValueError(f"char_class {name!r}: give exactly one of cls= or chars=")
    if chars is not None and not chars:
        raise ValueError(f"char_class {name!r}: chars is empty; give the characters to label")
    if cls is not None and cls not in CHAR_CLASSES:
        raise ValueError(f"char_class {name!r}: unknown class {cls!r}; valid: {', '.join(CHAR_CLASSES)}")
    fn = functools.partial(_char_class_fn, cls=cls, chars=frozenset(chars) if chars else None)
    if cls == "digit":                    # the test is part of the version (digit: isdigit -> isdecimal)
        test = CHAR_CLASSES[cls]
        fn.__dbd_params__ = {"test": getattr(test, "__qualname__", None) if test.__name__ != "<lambda>"
                             else "not alnum and not space"}
    return register(Hypothesis(name, fn, "binary", description or f"characters of class {cls or chars!r}"))


def _bracket_masks(text, opening, closing):
    cp = _codepoints(text)
    opens = np.isin(cp, np.fromiter((ord(c) for c in opening), np.uint32))
    closes = np.isin(cp, np.fromiter((ord(c) for c in closing), np.uint32))
    return opens, closes


def _depth_walk(opens, closes):
    walk = np.cumsum(opens.astype(np.int64) - closes)
    # depth never goes below 0 (an unmatched closing bracket is ignored): the walk reflected at 0
    depth = walk - np.minimum(np.minimum.accumulate(walk), 0) if len(walk) else walk
    before = np.concatenate([[0], depth[:-1]]) if len(depth) else depth
    return np.where(closes, before, depth).astype(np.float64)


def _bracket_fn(text, opening, closing):
    """Depth counting every bracket character (``bracket_depth(..., code=False)``)."""
    return _depth_walk(*_bracket_masks(text, opening, closing))


def _bracket_code_fn(text, opening, closing):
    """Depth counting the bracket characters outside Python string literals and comments, as
    tokenize reads them (``_literal_mask``); after a tokenize error, every bracket character."""
    opens, closes = _bracket_masks(text, opening, closing)
    if opens.any() or closes.any():
        lit = _literal_mask(text)
        opens &= ~lit
        closes &= ~lit
    return _depth_walk(opens, closes)


def bracket_depth(name: str = "bracket_depth", pairs: str = "()[]{}", description: str = "",
                  code: bool = True) -> Hypothesis:
    """Continuous: bracket nesting depth (brackets of any kind count alike). ``code=True``
    (default): Python source, brackets inside string literals (f-strings whole) and comments do
    not count, as tokenize reads them (for (), [] and {}: exactly the bracket operator tokens);
    after a tokenize error every bracket character counts. ``code=False``: every bracket
    character of any text counts."""
    if len(pairs) % 2:
        raise ValueError(f"bracket_depth {name!r}: pairs must hold opening/closing pairs, got {pairs!r}")
    fn = functools.partial(_bracket_code_fn if code else _bracket_fn, opening=frozenset(pairs[0::2]),
                           closing=frozenset(pairs[1::2]))
    if code:
        fn.__dbd_params__ = _TOKENIZE_PARAMS
    return register(Hypothesis(name, fn, "continuous",
                               description or f"nesting depth of {pairs}"
                               + (" outside strings and comments (tokenize)" if code else "")))


# -- Python source code, through tokenize ---------------------------------------------------
#: Part of the version of every tokenize-based hypothesis: the Python whose tokenizer reads the
#: code (where it stops on broken code differs between 3.11 and 3.12) and a revision of the rules
#: below (_tokens, _ladder, _indent_width), which the hypotheses' own source does not show.
_TOKENIZE_PARAMS = {"python": "%d.%d" % sys.version_info[:2], "rules": 3}
#: An ERRORTOKEN starting with one of these is the quote of a string literal left open at its
#: line's end (_tokens drops the rest of that line).
QUOTES = ("'", '"')


def _indent_width(lead):
    """Columns of a line's leading whitespace as Python counts them: a tab advances to the next
    multiple of 8, a form feed resets the count to 0."""
    return len(lead[lead.rfind("\x0c") + 1:].expandtabs(8))


def _leading(line):
    return line[:len(line) - len(line.lstrip(" \t\x0c"))]


def _line_starts(text):
    """Where each of tokenize's rows starts, then len(text): rows end at "\n" only (it reads
    lines with StringIO.readline), not at the form feeds, "\x1c", "\u2028"... that
    str.splitlines also breaks at."""
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
    if starts[-1] != len(text):
        starts.append(len(text))
    return starts


def _ladder(text):
    """Virtual lines that open the indentation levels a fragment starts inside of.

    A record cut from the middle of a file may start indented and later dedent to a level it
    never opened, which tokenize refuses ("unindent does not match any outer indentation
    level"). Prefixing one ``if 1:`` line per indentation width below the first line's makes
    those levels known; the prefix's tokens are dropped and positions shifted back."""
    code = [l for l in text.split("\n") if l.strip() and not l.lstrip().startswith("#")]
    if not code:
        return []
    # indentations as written (tabs and spaces, from the last form feed on), ordered by their width
    by_width = {}                                   # one indentation as written per width
    for line in code:
        w = _leading(line)
        by_width.setdefault(_indent_width(w), w[w.rfind("\x0c") + 1:])
    first = _indent_width(_leading(code[0]))
    return [by_width[k] + "if 1:\n" for k in sorted(by_width) if k < first]


#: The tokens of the latest texts are kept (several code hypotheses tokenize the same record):
#: at most TOKEN_CACHE_SIZE texts (a label chunk of records, annotate: 256) of TOKEN_CACHE_CHARS
#: characters in all (their tokens take 34 to 100 bytes a character: whole files as records kept
#: 512 of them, gigabytes, until the process ended), the latest text always.
TOKEN_CACHE_SIZE, TOKEN_CACHE_CHARS = 512, 1_000_000
_TOKEN_CACHE: "collections.OrderedDict[str, tuple]" = collections.OrderedDict()
_TOKEN_CACHE_LOCK = threading.Lock()


def _tokens(text):
    """``_read_tokens(text)``, kept for the latest texts (TOKEN_CACHE_SIZE, TOKEN_CACHE_CHARS)."""
    with _TOKEN_CACHE_LOCK:
        got = _TOKEN_CACHE.get(text)
        if got is not None:
            _TOKEN_CACHE.move_to_end(text)
            return got
    got = _read_tokens(text)
    with _TOKEN_CACHE_LOCK:
        _TOKEN_CACHE[text] = got
        chars = sum(map(len, _TOKEN_CACHE))
        while len(_TOKEN_CACHE) > 1 and (len(_TOKEN_CACHE) > TOKEN_CACHE_SIZE or chars > TOKEN_CACHE_CHARS):
            chars -= len(_TOKEN_CACHE.popitem(last=False)[0])
    return got


def _read_tokens(text):
    """The tokens of ``text`` that tokenize yields before any error, positions in ``text``.
    Whether a ladder is put before the text is decided by its first code line, wherever it lies.

    A single-quoted string left open at its line's end ends there (Python reports "unterminated
    string literal"). Python 3.11's tokenize yields an ERRORTOKEN for its quote and reads the rest
    of that line as code (a '#' inside the string was taken for a comment, a bracket inside it
    for an operator): the tokens that start on that line after the quote are dropped (but the
    line's NEWLINE / NL), so its characters from the quote on hold the default, as after an error;
    tokenize reads the next lines as before."""
    ladder = _ladder(text)
    k = len(ladder)
    out, open_row = [], None
    try:
        for tok in tokenize.generate_tokens(io.StringIO("".join(ladder) + text).readline):
            if tok.start[0] <= k:
                continue
            if tok.start[0] == open_row and tok.type not in (tokenize.NEWLINE, tokenize.NL):
                continue
            if tok.type == tokenize.ERRORTOKEN and tok.string[:1] in QUOTES:
                open_row = tok.start[0]
            out.append(tok._replace(start=(tok.start[0] - k, tok.start[1]), end=(tok.end[0] - k, tok.end[1]))
                       if k else tok)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return tuple(out)


def _offset(starts, pos):
    row, col = pos
    return min(starts[row - 1] + col, starts[-1]) if row - 1 < len(starts) else starts[-1]


STRING_TYPES = {tokenize.STRING}
FSTRING_START = getattr(tokenize, "FSTRING_START", None)
FSTRING_END = getattr(tokenize, "FSTRING_END", None)


def in_string_fn(text):
    starts = _line_starts(text)
    spans, open_f = [], []
    for tok in _tokens(text):
        if tok.type in STRING_TYPES:
            spans.append((_offset(starts, tok.start), _offset(starts, tok.end)))
        elif FSTRING_START is not None and tok.type == FSTRING_START:
            open_f.append(_offset(starts, tok.start))
        elif FSTRING_END is not None and tok.type == FSTRING_END and open_f:
            s = open_f.pop()
            if not open_f:
                spans.append((s, _offset(starts, tok.end)))
    return spans


def in_comment_fn(text):
    starts = _line_starts(text)
    return [(_offset(starts, t.start), _offset(starts, t.end)) for t in _tokens(text)
            if t.type == tokenize.COMMENT]


def _literal_mask(text):
    """Characters inside a string literal (an f-string whole) or a comment, as tokenize reads
    ``text``; an f-string still open at a tokenize error holds to the end of the last token read,
    and the characters after that hold False."""
    out = np.zeros(len(text), bool)
    toks = _tokens(text)
    spans = in_string_fn(text) + in_comment_fn(text)
    if FSTRING_START is not None and toks and toks[-1].type != tokenize.ENDMARKER:
        starts = _line_starts(text)
        depth, first = 0, None
        for tok in toks:
            if tok.type == FSTRING_START:
                first = _offset(starts, tok.start) if depth == 0 else first
                depth += 1
            elif tok.type == FSTRING_END and depth:
                depth -= 1
        if depth:
            spans.append((first, _offset(starts, toks[-1].end)))
    for a, b in spans:
        out[a:b] = True
    return out


def indent_level_fn(text):
    """Indentation of each character's logical line, in levels of 4 columns (tabs advance to the
    next multiple of 8 and a form feed resets the count, as in tokenize). Continuation lines of a
    statement hold the statement's level; blank and comment-only lines hold their own leading
    whitespace. Context-free, so a record that starts inside an indented block is labelled as in
    its file."""
    starts = _line_starts(text)
    n_lines = len(starts) - 1
    level = [None] * n_lines
    at_start, current = True, 0.0
    for tok in _tokens(text):
        if tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.ENDMARKER, tokenize.COMMENT):
            continue
        if at_start and tok.type != tokenize.NEWLINE:
            lead = text[starts[tok.start[0] - 1]:starts[tok.start[0] - 1] + tok.start[1]]
            current = _indent_width(lead) / 4
            at_start = False
        for r in range(tok.start[0], min(tok.end[0], n_lines) + 1):
            if level[r - 1] is None:
                level[r - 1] = current
        if tok.type == tokenize.NEWLINE:
            at_start = True
    out = np.zeros(len(text))
    for i in range(n_lines):
        if level[i] is None:
            level[i] = _indent_width(_leading(text[starts[i]:starts[i + 1]])) / 4
        out[starts[i]:starts[i + 1]] = level[i]
    return out


def position_in_line_fn(text):
    cp = _codepoints(text)
    i = np.arange(len(cp))
    after_newline = np.concatenate([[False], cp[:-1] == 10]) if len(cp) else np.zeros(0, bool)
    line_start = np.maximum.accumulate(np.where(after_newline, i, 0)) if len(cp) else i
    return (i - line_start).astype(np.float64)


for _fn in (in_string_fn, in_comment_fn, indent_level_fn):      # the Python version is in their version
    _fn.__dbd_params__ = _TOKENIZE_PARAMS
del _fn
register(Hypothesis("in_string", in_string_fn, "binary",
                    "inside a Python string literal (tokenize STRING), quotes and prefix included"))
register(Hypothesis("in_comment", in_comment_fn, "binary", "inside a # comment (tokenize COMMENT)"))
register(Hypothesis("indent_level", indent_level_fn, "continuous",
                    "indentation of the logical line, in levels of 4 columns (tokenize)"))
register(Hypothesis("position_in_line", position_in_line_fn, "continuous", "0-based column of the character"))
bracket_depth("bracket_depth")
keyword_set("python_keyword", _keyword.kwlist, description="Python keywords as whole words")
char_class("digit", "digit")
char_class("whitespace", "space")
char_class("uppercase", "upper")

CODE_HYPOTHESES = ["in_string", "in_comment", "indent_level", "position_in_line", "bracket_depth"]

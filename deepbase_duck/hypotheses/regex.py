"""Regular-expression hypotheses: defined from SQL (``define_hypothesis``) or Python
(``dbd.define_hypothesis``), stored in the store's ``hypothesis_definitions`` table, and registered
in every process that opens the store, so that one without any Python definition (``deepbase-duck
shell``, a second script) computes their labels too.

A definition is a pattern of Python's ``re`` with flags (letters, see FLAGS) and a kind:

* ``binary``: the characters of each match hold 1;
* ``categorical``: the pattern's named groups are the categories, in the pattern's order; each
  match is labelled with the first of them (in that order) that took part in it, a match in which
  none did is left unlabelled.

A pattern that can match the empty string (``a*``, ``\\b``, ``(?=x)``, ``x|``) is refused:
its empty matches label nothing, and the hypothesis would silently label only some of what it seems to.
The version follows the definition (kind, pattern, flags), not the code that runs it: editing a
definition (``replace``) recomputes its labels, and every process derives the same version.

``drop_hypothesis`` (SQL ``drop_hypothesis(name)``, CLI ``drop-hypothesis``) deletes a definition
with what the store holds only for it: its labels (every dataset, every version) and its catalog
row. Query results (``queries``, ``scores``) stay, as ``drop_dataset`` keeps them: they are
keyed by the hypothesis' version, so a name defined again by another pattern (another version)
is never served them, nor the old labels; the same definition again gets the same version, and
its labels and scores are the same.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ..errors import HypothesisError, UnknownNameError
from ..store import Transaction, one_writer, q_scalar      # (not `from .. import store`: that loads the engine)
from .core import Hypothesis

#: The flag letters a definition takes, as Python's inline flags (``(?i)``) spell them.
FLAGS = {"a": re.ASCII, "i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
REGEX_KINDS = ("binary", "categorical")


def _parser():
    try:
        from re import _parser as parser        # Python 3.11+
    except ImportError:                         # pragma: no cover - Python 3.10
        import sre_parse as parser
    return parser


def canonical_flags(flags, what: str = "flags") -> str:
    """``flags`` (letters of FLAGS, either case, in any order) as sorted lower-case letters."""
    if flags is None:
        raise HypothesisError(f"{what} must be a string of flag letters ({', '.join(FLAGS)}) or '', got NULL")
    if not isinstance(flags, str):
        raise HypothesisError(f"{what} must be a string of flag letters ({', '.join(FLAGS)}), got {flags!r}")
    letters = set(flags.replace(" ", "").lower())
    bad = sorted(letters - set(FLAGS))
    if bad:
        raise HypothesisError(f"{what}: unknown flag(s) {', '.join(map(repr, bad))} in {flags!r}; the flags are "
                              f"a (ASCII), i (IGNORECASE), m (MULTILINE), s (DOTALL), x (VERBOSE)")
    return "".join(sorted(letters))


def compile_definition(name: str, pattern: str, kind: str, flags: str):
    """Check a definition and return (compiled pattern, categories or None); errors name the
    argument at fault."""
    if not isinstance(pattern, str):
        raise HypothesisError(f"hypothesis {name!r}: pattern must be a string, got "
                              f"{'NULL' if pattern is None else repr(pattern)}")
    if pattern == "":
        raise HypothesisError(f"hypothesis {name!r}: pattern is empty")
    if kind not in REGEX_KINDS:
        raise HypothesisError(f"hypothesis {name!r}: kind {'NULL' if kind is None else repr(kind)} is not one of "
                              f"{', '.join(REGEX_KINDS)} (a pattern defines binary or categorical hypotheses)")
    bits = 0
    for letter in flags:
        bits |= FLAGS[letter]
    try:
        compiled = re.compile(pattern, bits)
    except re.error as exc:
        raise HypothesisError(f"hypothesis {name!r}: pattern {pattern!r} is not a valid regular expression: "
                              f"{exc}") from None
    if _parser().parse(pattern, bits).getwidth()[0] == 0:
        raise HypothesisError(f"hypothesis {name!r}: pattern {pattern!r} can match the empty string, and an empty "
                              f"match labels no character; make every alternative match at least one character "
                              f"(e.g. '[0-9]+' rather than '[0-9]*')")
    categories = None
    if kind == "categorical":
        groups = sorted(compiled.groupindex.items(), key=lambda kv: kv[1])
        if not groups:
            raise HypothesisError(f"hypothesis {name!r}: a categorical pattern names its categories with named "
                                  f"groups, e.g. '(?P<digit>[0-9])|(?P<upper>[A-Z])'; pattern {pattern!r} has none")
        categories = tuple(g for g, _ in groups)
    return compiled, categories


def definition_version(kind: str, pattern: str, flags: str) -> str:
    """The labels' version of a definition: the same in every process, changed by any edit of
    kind, pattern or flags (not of the description)."""
    text = "\0".join(["regex", kind, pattern, flags])
    return "re-" + hashlib.sha256(text.encode()).hexdigest()[:12]


class _Matcher:
    """The function of a RegexHypothesis: text -> spans of the matches (categorical: with the
    name of the first named group that took part, in the pattern's order)."""

    def __init__(self, compiled: re.Pattern, categories):
        self.compiled = compiled
        self.categories = categories

    def __call__(self, text: str):
        if self.categories is None:
            return [(m.start(), m.end()) for m in self.compiled.finditer(text)]
        out = []
        for m in self.compiled.finditer(text):
            group = next((g for g in self.categories if m.group(g) is not None), None)
            if group is not None:
                out.append((m.start(), m.end(), group))
        return out


@dataclass(eq=False)
class RegexHypothesis(Hypothesis):
    """A hypothesis defined by a regular expression (see the module docstring)."""

    pattern: str = ""
    flags: str = ""

    @property
    def source(self) -> str:
        return f"regex {self.pattern!r}" + (f" flags {self.flags!r}" if self.flags else "")

    def definition(self) -> dict:
        return {"name": self.name, "kind": self.kind, "pattern": self.pattern, "flags": self.flags,
                "categories": list(self.categories) if self.categories else None,
                "description": self.description, "version": self.version}


def regex_hypothesis(name, pattern, kind="binary", flags="", description="") -> RegexHypothesis:
    """A checked RegexHypothesis (not registered); bad arguments raise HypothesisError naming them."""
    if not isinstance(name, str) or not name.strip():
        raise HypothesisError(f"a hypothesis needs a non-empty name, got {'NULL' if name is None else repr(name)}")
    if kind is None:
        raise HypothesisError(f"hypothesis {name!r}: kind must be 'binary' or 'categorical', got NULL")
    if description is not None and not isinstance(description, str):
        raise HypothesisError(f"hypothesis {name!r}: description must be a string, got {description!r}")
    flags = canonical_flags(flags, f"hypothesis {name!r}: flags")
    compiled, categories = compile_definition(name, pattern, kind, flags)
    return RegexHypothesis(name, _Matcher(compiled, categories), kind, description or "",
                           definition_version(kind, pattern, flags), categories, pattern=pattern, flags=flags)


def drop_hypothesis(con, name: str) -> dict:
    """Drop the regular-expression hypothesis ``name`` defined in the store of ``con`` (a
    connection from ``dbd.connect``, a ``dbd.cursor``; or its Session): its definition, its
    labels and its catalog row (see the module docstring), and its registration in this
    process. Refused by name: a name the store does not define (a built-in, a Python hypothesis,
    one known only by labels that Python code stored: those are not the store's to drop).
    Returns the dropped definition and ``labeled_records``, the (dataset, record) labels dropped."""
    from ..catalog import Session
    if isinstance(con, Session):
        session = con
    else:
        from .. import _session
        session = _session(con)
    return _drop_hypothesis(session, name)


@one_writer
def _drop_hypothesis(session, name) -> dict:
    """drop_hypothesis's work, holding the store's writer lock."""
    from . import core
    from .store import _WAITING, _settings_key, catalog_hypothesis, stored_definition, stored_definitions
    if not isinstance(name, str):
        raise HypothesisError(f"drop_hypothesis: name must be the name of a hypothesis defined in this store, got "
                              f"{'NULL' if name is None else repr(name)}")
    con = session.con
    held = core.registry().get(name)
    python = held if held is not None and not isinstance(held, RegexHypothesis) else None
    with Transaction(con):
        d = stored_definition(con, name)
        if d is None:
            if python is not None and core.is_builtin(python):
                raise HypothesisError(f"drop_hypothesis: {name!r} is a built-in hypothesis of deepbase_duck, which "
                                      f"cannot be dropped; drop_hypothesis drops what define_hypothesis stored")
            if python is not None:
                raise HypothesisError(f"drop_hypothesis: {name!r} is a Python hypothesis of this process "
                                      f"({python.source}), not one defined in this store by define_hypothesis: it "
                                      f"lives in your code (remove it there); drop_hypothesis drops what "
                                      f"define_hypothesis stored")
            row = catalog_hypothesis(con, name)
            if row is not None:
                raise HypothesisError(f"drop_hypothesis: {name!r} is not defined in this store by define_hypothesis: "
                                      f"the store holds only its labels, computed by Python code ({row['kind']}), "
                                      f"which drop_hypothesis leaves (define_hypothesis({name!r}, pattern, replace "
                                      f":= true) defines the name by a pattern instead)")
            err = UnknownNameError("hypothesis", name, [x["name"] for x in stored_definitions(con)])
            text = err.args[0].replace("valid hypotheses", "hypotheses defined in this store", 1)
            err.args = (f"drop_hypothesis: {text.replace('(none registered)', '(none)')}",)
            raise err
        # a Python hypothesis of this process that shadows the definition keeps its own labels
        keep = python.version if python is not None else None
        n = q_scalar(con, "SELECT count(*) FROM labeled_records WHERE hypothesis = ? AND version IS DISTINCT FROM ?",
                     [name, keep])
        for table, column in (("labels", "hypothesis"), ("labeled_records", "hypothesis"), ("hypotheses", "name")):
            con.execute(f"DELETE FROM {table} WHERE {column} = ? AND version IS DISTINCT FROM ?", [name, keep])
        con.execute("DELETE FROM hypothesis_definitions WHERE name = ?", [name])
        if keep is None:                     # the settings recorded with its catalog row (store.stored_settings)
            con.execute("DELETE FROM dbd_meta WHERE key = ?", [_settings_key(name)])
    if isinstance(held, RegexHypothesis) and (held.kind, held.pattern, held.flags) == \
            (d["kind"], d["pattern"], d["flags"]):
        core._REGISTRY.pop(name, None)     # (core has no unregister) another store's other definition stays
    for key in [k for k in _WAITING if k[0] == name and k[1] != keep]:
        _WAITING.pop(key, None)
    return {**{k: d[k] for k in ("name", "kind", "pattern", "flags", "version")},
            "categories": list(d["categories"]) if d["categories"] else None, "labeled_records": int(n)}

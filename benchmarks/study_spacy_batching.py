"""Does spaCy tag sentences the same way together (``nlp.pipe``) as one at a time (``nlp``)?
And how much faster is it? The check behind the ``upos``/``ptb_tag`` hypotheses' batch function
(deepbase_duck/hypotheses/spacy_pos.py).

    .venv/bin/python benchmarks/study_spacy_batching.py                # 4,000 PTB training sentences
    .venv/bin/python benchmarks/study_spacy_batching.py --sentences 500

For each pipe batch size: seconds against one ``nlp(text)`` per sentence, and how many sentences
and tokens differ in (offset, coarse tag, fine tag).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=4000)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256, 1000])
    a = ap.parse_args()
    import bench_baseline_minilm as bm
    from deepbase_duck.hypotheses.spacy_pos import load_spacy
    texts = [r["text"] for r in bm.records_for(a.sentences, "train", 0)]
    nlp = load_spacy()
    nlp("warm up")
    t0 = time.perf_counter()
    one = [[(tok.idx, tok.pos_, tok.tag_) for tok in nlp(x)] for x in texts]
    alone = time.perf_counter() - t0
    n_tok = sum(map(len, one))
    for bs in a.batch_sizes:
        t0 = time.perf_counter()
        many = [[(tok.idx, tok.pos_, tok.tag_) for tok in d] for d in nlp.pipe(texts, batch_size=bs)]
        together = time.perf_counter() - t0
        texts_diff = sum(x != y for x, y in zip(one, many))
        tok_diff = sum(sum(p != q for p, q in zip(x, y)) + abs(len(x) - len(y)) for x, y in zip(one, many))
        print(f"batch_size {bs}: {together:.1f} s vs per-text {alone:.1f} s ({alone / together:.2f}x); "
              f"texts differing {texts_diff} of {len(texts)}, tokens differing {tok_diff} of {n_tok}", flush=True)


if __name__ == "__main__":
    main()

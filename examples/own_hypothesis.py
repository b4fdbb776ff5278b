"""Bring your own hypothesis (and see how to bring your own model).

Run:  .venv/bin/python examples/own_hypothesis.py  [--chars 40000]

1. A hypothesis is a plain Python function from a record's text to labels. Here: "inside the
   parameter list of a def" (spans), and "number of open quotes so far" is left to the built-ins.
   A hypothesis that runs a model of its own (a tagger) can also give ``batch=``, a function
   from a list of texts to their labels, computed together: ``@dbd.hypothesis("pos", "categorical",
   categories=..., batch=tag_many)`` (deepbase_duck/hypotheses/spacy_pos.py uses spaCy's nlp.pipe).
2. A model is any torch.nn.Module plus an encoder; CharAdapter covers character-level models.
   The bundled char-LSTM is registered from its loader spec so that any process can rebuild it.
3. One inspect call scores every unit of both LSTM layers against every hypothesis, then plain
   SQL ranks, filters and joins the scores with the catalog.
"""
from __future__ import annotations

import argparse
import re

import deepbase_duck as dbd
from deepbase_duck.corpora.code import code_records


@dbd.hypothesis("in_def_params", kind="binary", description="inside the parameter list of a def")
def in_def_params(text: str):
    spans = []
    for m in re.finditer(r"\bdef\s+\w+\s*\(", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        spans.append((m.end(), i - 1))      # the characters between the parentheses
    return spans


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--chars", type=int, default=40_000, help="characters of held-out standard-library code")
    ap.add_argument("--store", default=None, help="a .duckdb path (None: a store in memory)")
    a = ap.parse_args()
    con = dbd.connect(a.store)
    dbd.register_model(con, "charlstm", "deepbase_duck.models.zoo:charlstm")
    dbd.add_dataset(con, "code", code_records("heldout", limit_chars=a.chars), replace=True)
    dbd.inspect(con, "charlstm", ["lstm0", "lstm1"], ["in_def_params", "in_string", "bracket_depth"], "code")
    con.sql("""
        SELECT s.hypothesis, s.layer, s.unit, round(s.score, 3) AS r, s.n, l.width
        FROM scores s JOIN layers l USING (model, layer)
        WHERE s.score IS NOT NULL
        QUALIFY row_number() OVER (PARTITION BY s.hypothesis ORDER BY abs(s.score) DESC) <= 3
        ORDER BY s.hypothesis, abs(s.score) DESC""").show()
    dbd.close(con)


if __name__ == "__main__":
    main()

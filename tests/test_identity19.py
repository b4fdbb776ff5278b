"""A model's identity covers the functions its submodules keep as attributes.

Two models of one class with the same weights, one keeping ``self.act = torch.tanh`` and the
other ``torch.relu``, had one ``model_checksum``: what was stored from one (activations, cached
scores) was served as the other's. Now the identity text adds a line for each such attribute
(``settings.function_text``): builtins and torch ops by name, Python functions by their code and
closure, partials by their function and arguments, bound methods by their function and their
module's place. A model without one keeps its checksum; a store written before, holding a model
with one under the old checksum, is adopted (``model_checksum_v3_no_functions``), except where
two models shared that old checksum (their cached scores are not served again).
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import deepbase_duck as dbd
from conftest import TEXTS, numpy_corr, planted_adapter
from deepbase_duck.extraction import adapters
from deepbase_duck.extraction.adapters import CharAdapter, model_checksum
from deepbase_duck.models.charlstm import VOCAB, encode_chars

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = Path(__file__).parent
# the identity the code before this change computed (for a model with function attributes: the
# checksum two such models shared); before it existed, the checksum itself
OLD_V3 = getattr(adapters, "model_checksum_v3_no_functions", adapters.model_checksum)

ACTS = {"tanh": torch.tanh, "relu": torch.relu}


class Act(torch.nn.Module):
    """A char model whose layer `out` reads act(embedding): ``act`` a function kept as an
    attribute (of the root, or of the submodule ``inner`` with ``nested``)."""

    def __init__(self, act, nested: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(len(VOCAB), 4)
        self.out = torch.nn.Linear(4, 4)
        self.inner = torch.nn.Identity()
        if nested:
            self.inner.act = act
        else:
            self.act = act

    def forward(self, ids):
        act = self.inner.act if hasattr(self.inner, "act") else self.act
        return self.out(act(self.embed(ids)))


def act_model(act: str = "tanh", device=None):
    """A loader spec for Act ('test_identity19:act_model', act 'tanh' or 'relu')."""
    return CharAdapter(Act(ACTS[act]), encode_chars, "chars-test", device="cpu")


def lambda_of(code: str, k: float):
    """A lambda made per call: the same code for one ``code``, closing over ``k``."""
    if code == "tanh":
        return lambda x: torch.tanh(k * x)
    return lambda x: torch.relu(k * x)


def checksum(act, nested: bool = False) -> str:
    return CharAdapter(Act(act, nested), encode_chars, "chars-test", device="cpu").checksum


def last_query(con):
    qid, source, params = con.sql("SELECT query_id, source, params FROM queries "
                                  "ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    return qid, source, json.loads(params)


def scores(table, model: str) -> dict:
    return {(r["layer"], r["unit"]): r["score"] for r in table.to_pylist()
            if r["model"] == model and r["measure"] == "corr"}


def assert_numpy(table, model: str, act) -> None:
    """The model's corr scores of layer `out` are numpy's over its own forward pass."""
    module = Act(act).eval()
    want = numpy_corr(lambda ids: {"out": module(ids)}, TEXTS)
    got = scores(table, model)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert (got[k] is None) if v is None else got[k] == pytest.approx(v, abs=1e-5), k


def far_apart(a: dict, b: dict) -> float:
    return max(abs(a[k] - b[k]) for k in a if a[k] is not None and b[k] is not None)


def test_tanh_and_relu_do_not_share_stored_activations_or_scores(con):
    """relu's stored activations and cached scores are not tanh's: each model's query scans
    its own forward pass (scores as numpy's), in either order."""
    dbd.register_model(con, "tanh", act_model("tanh"))
    dbd.register_model(con, "relu", act_model("relu"))
    checksums = dict(con.sql("SELECT name, checksum FROM models").fetchall())
    assert checksums["tanh"] != checksums["relu"]
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.extract(con, "relu", ["out"], "snippets")
    t = dbd.inspect(con, "tanh", ["out"], ["digit"], "snippets")
    _, source, params = last_query(con)
    assert source == "model" and params["reused"]["activation_records_read"] == 0
    assert_numpy(t, "tanh", torch.tanh)
    r = dbd.inspect(con, "relu", ["out"], ["digit"], "snippets")
    assert last_query(con)[1] == "stored"                     # its own extracted activations
    assert_numpy(r, "relu", torch.relu)
    assert far_apart(scores(t, "tanh"), scores(r, "relu")) > 1e-3
    again = dbd.inspect(con, "tanh", ["out"], ["digit"], "snippets")     # tanh's own cache
    assert last_query(con)[1] == "cache" and scores(again, "tanh") == scores(t, "tanh")


def test_a_function_swapped_on_a_live_model_is_another_model(con):
    ad = act_model("tanh")
    dbd.register_model(con, "m", ad)
    first = ad.checksum
    ad.module.act = torch.relu
    assert ad.checksum != first and ad.checksum == act_model("relu").checksum
    ad.module.act = torch.tanh
    assert ad.checksum == first


def test_function_attributes_are_told_apart_by_what_they_compute():
    """A lambda made per model with the same code and closure is one function; other code, or
    another closed-over value, is another. Builtins by name (also in a submodule), partials by
    their arguments, bound methods by their module's place."""
    assert checksum(torch.tanh) == checksum(torch.tanh) != checksum(torch.relu)
    assert checksum(torch.tanh, nested=True) == checksum(torch.tanh, nested=True) != checksum(torch.relu, nested=True)
    same = checksum(lambda_of("tanh", 2.0))
    assert checksum(lambda_of("tanh", 2.0)) == same
    assert len({same, checksum(lambda_of("tanh", 3.0)), checksum(lambda_of("relu", 2.0))}) == 3
    leaky = functools.partial(torch.nn.functional.leaky_relu, negative_slope=0.1)
    assert checksum(leaky) == checksum(functools.partial(torch.nn.functional.leaky_relu, negative_slope=0.1))
    assert checksum(leaky) != checksum(functools.partial(torch.nn.functional.leaky_relu, negative_slope=0.3))
    assert checksum(torch.nn.functional.gelu) != checksum(functools.partial(torch.nn.functional.gelu,
                                                                            approximate="tanh"))
    assert checksum(torch.ops.aten.relu.default) != checksum(torch.ops.aten.tanh.default)

    def bound(which: str):
        m = Act(torch.tanh)
        m.pre, m.post = torch.nn.Tanh(), torch.nn.ReLU()
        m.act = getattr(m, which).forward
        return model_checksum(m)
    assert bound("pre") == bound("pre") != bound("post")


def test_a_config_object_stays_out_of_the_identity():
    """The kept rule: a config object (here a SimpleNamespace holding a path) is the variant's
    to say, not the identity's (it holds machine-dependent fields)."""
    a, b = Act(torch.tanh), Act(torch.tanh)
    a.config, b.config = types.SimpleNamespace(path="/home/a"), types.SimpleNamespace(path="/home/b")
    assert model_checksum(a) == model_checksum(b)


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_identity19 import Act, lambda_of
from deepbase_duck.extraction.adapters import model_checksum
print(model_checksum(Act(lambda_of("tanh", 2.0))))
"""


def test_a_lambda_model_has_one_checksum_in_two_processes():
    here = model_checksum(Act(lambda_of("tanh", 2.0)))
    out = subprocess.run([sys.executable, "-c", _CHILD.format(tests=str(TESTS))], capture_output=True, text=True,
                         timeout=120, cwd=str(TESTS.parent))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == here


def test_models_without_function_attributes_keep_their_checksums():
    """The checksums the code before this change computed (hard-coded): every store of these
    models stays keyed as it was."""
    from deepbase_duck.models.zoo import charlstm
    assert planted_adapter().checksum == "6692d29ea7135d3b72a76ed4b40043aa471bd5062b197e59a0c464ef6389bb45"
    assert planted_adapter(nan_on_tilde=True).checksum == \
        "07e0b9ec81e3da4bfaecf71565369e31260181fdafce3a06d1dd61aa15e35536"
    assert charlstm(device="cpu").checksum == "13a91dc33220efca63361e97af201fefecf0c655b9385703721ff203dd18b0ce"


def test_minilm_keeps_its_earlier_checksum_as_a_legacy_one(minilm):
    """MiniLM's GELU keeps ``nn.functional.gelu`` as an attribute (``act``): its checksum now
    covers it, and the one earlier stores hold is among its legacy checksums (adopted). (Not a
    checksum written out: MiniLM's settings differ between transformers versions, 5.23 and 5.24
    gave two, so its identity is one of this installation.)"""
    old = OLD_V3(minilm.module)
    assert minilm.checksum != old and old in adapters.legacy_checksums(minilm.module, minilm.variant)


def written_by_earlier_code(monkeypatch, path: str, work) -> None:
    """Open ``path`` and run ``work(con)`` with models' checksums computed as the code before
    function attributes were covered did (their rows' identity stays 3)."""
    with monkeypatch.context() as patch:
        patch.setattr(adapters, "model_checksum", OLD_V3)
        con = dbd.connect(path, progress=False)
        try:
            work(con)
        finally:
            dbd.close(con)


def test_a_store_of_one_such_model_is_adopted_with_its_cached_scores(tmp_path, monkeypatch):
    sys.path.insert(0, str(TESTS))
    path = str(tmp_path / "one.duckdb")
    query = dict(layers=["out"], hypotheses=["digit"], dataset="d")
    cached = {}

    def work(con):
        dbd.register_model(con, "t", f"{Path(__file__).stem}:act_model", {"act": "tanh"})
        dbd.add_dataset(con, "d", TEXTS)
        cached["scores"] = scores(dbd.inspect(con, "t", **query), "t")
        cached["qid"], source, _ = last_query(con)
        assert source == "model"
    written_by_earlier_code(monkeypatch, path, work)
    old, new = OLD_V3(act_model("tanh").module), act_model("tanh").checksum
    assert old != new
    con = dbd.connect(path, progress=False)
    try:
        assert con.sql("SELECT checksum FROM models").fetchall() == [(old,)]
        t = dbd.inspect(con, "t", **query)
        _, source, params = last_query(con)
        assert source == "cache" and params["reused"]["scores_of_query"] == cached["qid"]
        assert scores(t, "t") == cached["scores"]
        assert con.sql("SELECT checksum, identity FROM models").fetchall() == [(new, 3)]
        assert_numpy(t, "t", torch.tanh)
    finally:
        dbd.close(con)


def test_tanh_and_relu_of_one_old_store_do_not_adopt_each_others_rows(tmp_path, monkeypatch):
    """Under the old identity tanh and relu were one checksum: tanh's scan read relu's stored
    activations. Adopted, each name moves to its own checksum with its own rows only; tanh is
    not served what it was served then (relu's scores): it scans, and its scores are numpy's
    of tanh (a warning names relu)."""
    sys.path.insert(0, str(TESTS))
    path = str(tmp_path / "two.duckdb")
    spec = f"{Path(__file__).stem}:act_model"
    query = dict(layers=["out"], hypotheses=["digit"], dataset="d")

    def work(con):
        dbd.register_model(con, "tanh", spec, {"act": "tanh"})
        dbd.register_model(con, "relu", spec, {"act": "relu"})
        assert con.sql("SELECT count(DISTINCT checksum) FROM models").fetchall() == [(1,)]   # one identity then
        dbd.add_dataset(con, "d", TEXTS)
        dbd.extract(con, "relu", ["out"], "d")
        dbd.inspect(con, "tanh", **query)
        assert last_query(con)[1] == "stored"                # the old identity's mistake, kept in the store
    written_by_earlier_code(monkeypatch, path, work)
    con = dbd.connect(path, progress=False)
    try:
        with pytest.warns(UserWarning, match="'relu'"):
            t = dbd.inspect(con, "tanh", **query)
        _, source, params = last_query(con)
        assert source == "model" and params["reused"]["scores_of_query"] is None
        assert params["reused"]["activation_records_read"] == 0
        assert_numpy(t, "tanh", torch.tanh)
        r = dbd.inspect(con, "relu", **query)
        assert last_query(con)[1] in ("stored", "model")
        assert_numpy(r, "relu", torch.relu)
        checksums = dict(con.sql("SELECT name, checksum FROM models").fetchall())
        assert checksums == {"tanh": act_model("tanh").checksum, "relu": act_model("relu").checksum}
        owners = dict(con.sql("SELECT model_checksum, list(DISTINCT model) FROM behaviors GROUP BY 1").fetchall())
        assert owners[checksums["relu"]] == ["relu"]            # relu's extracted rows moved with relu only
        assert owners.get(checksums["tanh"], ["tanh"]) == ["tanh"]
        assert old_rows_left(con) == 0
    finally:
        dbd.close(con)


def old_rows_left(con) -> int:
    old = OLD_V3(act_model("tanh").module)
    return con.sql("SELECT count(*) FROM behaviors WHERE model_checksum = ?", params=[old]).fetchall()[0][0]


class Memo(torch.nn.Module):
    """A char model whose forward keeps the function it last used (a partial over the batch's
    length, and a lambda made per pass): its state, not its configuration."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(len(VOCAB), 4)
        self.out = torch.nn.Linear(4, 4)
        self.last = None

    def forward(self, ids):
        n = ids.shape[1]
        self.last = functools.partial(torch.mul, other=1.0 + 0.0 * n)
        self.scaled = lambda x: x * (n / n)
        return self.out(self.scaled(self.last(self.embed(ids))))


def test_a_function_a_forward_pass_keeps_does_not_change_the_identity(con):
    """The functions a forward pass stores on the module change with every batch: like a call
    counter, they are left out of the identity, so the model stays one model across queries."""
    ad = CharAdapter(Memo(), encode_chars, "chars-test", device="cpu")
    first = ad.checksum
    dbd.register_model(con, "memo", ad)
    dbd.add_dataset(con, "d", TEXTS)
    dbd.extract(con, "memo", ["out"], "d")
    with torch.no_grad():
        ad.module(torch.tensor([encode_chars("a much longer line than the example")]))
    assert ad.checksum == first == CharAdapter(Memo(), encode_chars, "chars-test", device="cpu").checksum
    assert dbd.extract(con, "memo", ["out"], "d")[0]["reused"] == len(TEXTS)


def test_a_forward_patched_on_an_instance_is_another_model():
    """``m.forward = MethodType(ablated, m)`` (a researcher's ablation) is another computation."""
    def ablated(self, ids):
        return self.out(torch.zeros_like(self.embed(ids)))
    plain, patched = Act(torch.tanh), Act(torch.tanh)
    patched.forward = types.MethodType(ablated, patched)
    assert model_checksum(plain) != model_checksum(patched)
    again = Act(torch.tanh)
    again.forward = types.MethodType(ablated, again)
    assert model_checksum(again) == model_checksum(patched)


def test_functions_in_containers_are_covered_and_odd_ones_do_not_break_the_checksum():
    """A list or dict of functions is covered item by item; a dict whose keys write alike
    (devices, which count only as present) and a function closing over itself still give one
    checksum per model, in a fixed order."""
    def with_acts(acts):
        m = Act(torch.tanh)
        m.acts = acts
        return model_checksum(m)
    assert with_acts([torch.tanh, torch.relu]) == with_acts([torch.tanh, torch.relu]) \
        != with_acts([torch.relu, torch.tanh])
    assert with_acts({"a": torch.tanh}) != with_acts({"a": torch.relu})
    by_device = {torch.device("cpu"): torch.tanh, torch.device("meta"): torch.relu}
    assert with_acts(by_device) == with_acts(dict(by_device))

    def recursive():
        def f(x, n=2):
            return x if n == 0 else f(torch.tanh(x), n - 1)
        return f
    assert with_acts(recursive()) == with_acts(recursive())


def _top_level_gelu(x):
    return torch.nn.functional.gelu(x)


def _top_level_relu(x):
    return torch.relu(x)


def test_a_top_level_function_is_named_not_digested():
    """A function of a module's top level is covered by its module and name, as a class is: its
    bytecode changes with the Python version (3.11 to 3.12), and a digest of it would change the
    identity of every model holding one at an upgrade, refusing a registered loader model. Two
    such functions still differ by name; a lambda keeps its code's digest."""
    import re
    from deepbase_duck.extraction.settings import function_text
    text = function_text(_top_level_gelu, [], set(), {})
    assert text.startswith("function:test_identity19._top_level_gelu:") and not re.search(r"[0-9a-f]{64}", text)
    assert checksum(_top_level_gelu) != checksum(_top_level_relu)
    assert re.search(r"[0-9a-f]{64}", function_text(lambda_of("tanh", 1.0), [], set(), {}))


def test_accelerates_device_hooks_stay_out_of_the_identity():
    """accelerate (device_map loading) wraps a module's forward in a partial, keeps the original as
    _old_forward and sets _hf_hook: which modules get them follows the machine's devices, so the
    same model was another on a machine with other devices (refused as changed). Left out on a
    hooked module; an instance forward patched by hand elsewhere still counts (see above)."""
    model = Act(torch.tanh)
    plain = model_checksum(model)
    inner = model.out
    inner._hf_hook = object()
    inner._old_forward = inner.forward
    inner.forward = functools.partial(lambda module, *a, **k: module._old_forward(*a, **k), inner)
    assert model_checksum(model) == plain


def test_a_transformers_upgrade_keeps_minilms_identity(minilm):
    """transformers 5.23 sets MiniLM's _skip_keys_device_placement to set(), 5.24 to {'cache'}:
    read as a setting, it made an upgrade of transformers another model (a loader model refused
    as changed). It is transformers' bookkeeping now; the identity of before, which counted it,
    stays among the legacy checksums, so stores of either version adopt their rows."""
    module = minilm.module
    had = module.__dict__.get("_skip_keys_device_placement", "absent")
    try:
        module._skip_keys_device_placement = set()
        a, old_a = model_checksum(module, minilm.variant), OLD_V3(module, minilm.variant)
        module._skip_keys_device_placement = {"cache"}
        b, old_b = model_checksum(module, minilm.variant), OLD_V3(module, minilm.variant)
        assert a == b and old_a != old_b
        assert old_b in adapters.legacy_checksums(module, minilm.variant)
    finally:
        if had == "absent":
            del module._skip_keys_device_placement
        else:
            module._skip_keys_device_placement = had

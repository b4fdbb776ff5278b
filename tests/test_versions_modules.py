"""A hypothesis' version follows the functions and values it reads as attributes of the user's own
modules (``import mod`` then ``mod.helper(x)``; ``from pkg import sub`` then ``sub.helper``):
editing such a helper and reloading its module gives a new version, so stored labels are not
served for the new code. Modules of the standard library and of installed packages are not
followed, as their functions called by name are not."""
from __future__ import annotations

import importlib
import json
import os
import sys

import numpy as np
import pytest

from deepbase_duck.hypotheses import core
from deepbase_duck.hypotheses.core import Hypothesis, function_inputs, module_attributes


def _write(path, text: str) -> None:
    """Write a module's source so that a reload sees it: a new mtime, and no stale bytecode."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    importlib.invalidate_caches()


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """A module ``vmod_helpers`` and a package ``vpkg_helpers`` with a submodule ``sub``, written
    to tmp_path and imported; bytecode is not written, so a reload reads the source."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    _write(tmp_path / "vmod_helpers.py", "THRESHOLD = 3\n\ndef helper(c):\n    return c.isdigit()\n")
    (tmp_path / "vpkg_helpers").mkdir()
    _write(tmp_path / "vpkg_helpers" / "__init__.py", "")
    _write(tmp_path / "vpkg_helpers" / "sub.py", "def helper(c):\n    return c in '()'\n")
    names = ["vmod_helpers", "vpkg_helpers", "vpkg_helpers.sub"]
    for n in names:
        sys.modules.pop(n, None)
    mod = importlib.import_module("vmod_helpers")
    sub = importlib.import_module("vpkg_helpers.sub")
    yield tmp_path, mod, sub
    for n in names:
        sys.modules.pop(n, None)


def _version(fn) -> str:
    return Hypothesis("h", fn).version


def test_a_helper_of_an_imported_module_is_followed(user_modules):
    """``mod.helper(c)`` inside the hypothesis: rewriting helper's code and reloading the module
    changes the version; a reload of the same code keeps it."""
    tmp_path, mod, _ = user_modules

    def hyp(text):
        return [float(mod.helper(c)) for c in text]

    before = _version(hyp)
    importlib.reload(mod)                                   # the same code again
    assert _version(hyp) == before
    _write(tmp_path / "vmod_helpers.py", "THRESHOLD = 3\n\ndef helper(c):\n    return c.isalpha()\n")
    importlib.reload(mod)
    assert _version(hyp) != before
    assert "mod.helper=<function helper>{" in function_inputs(hyp) and "c.isalpha()" in function_inputs(hyp)
    # and back: the version is a function of the code, not of the reloads
    _write(tmp_path / "vmod_helpers.py", "THRESHOLD = 3\n\ndef helper(c):\n    return c.isdigit()\n")
    importlib.reload(mod)
    assert _version(hyp) == before


def test_a_module_constant_and_a_submodule_from_a_package(user_modules):
    """``mod.THRESHOLD`` (a plain value) and ``sub.helper`` after ``from pkg import sub`` (here
    a closed-over variable, as a module imported in a factory would be) are followed too."""
    tmp_path, mod, sub = user_modules

    def make(s):
        return lambda text: [float(s.helper(c) and len(text) > mod.THRESHOLD) for c in text]

    hyp = make(sub)
    before = _version(hyp)
    _write(tmp_path / "vpkg_helpers" / "sub.py", "def helper(c):\n    return c in '[]'\n")
    importlib.reload(sub)
    after_sub = _version(hyp)
    assert after_sub != before
    _write(tmp_path / "vmod_helpers.py", "THRESHOLD = 4\n\ndef helper(c):\n    return c.isdigit()\n")
    importlib.reload(mod)
    assert _version(hyp) != after_sub
    assert [p for p, _ in module_attributes(hyp)] == ["mod.THRESHOLD", "s.helper"]


def test_a_dotted_chain_through_a_package(user_modules):
    """``pkg.sub.helper`` through the package's attribute ``sub``."""
    tmp_path, _, sub = user_modules
    pkg = sys.modules["vpkg_helpers"]
    g = {"pkg": pkg}
    exec("def hyp(text):\n    return [float(pkg.sub.helper(c)) for c in text]\n", g)   # noqa: S102
    before = _version(g["hyp"])
    _write(tmp_path / "vpkg_helpers" / "sub.py", "def helper(c):\n    return c == ' '\n")
    importlib.reload(sub)
    assert _version(g["hyp"]) != before
    assert [p for p, _ in module_attributes(g["hyp"])] == ["pkg.sub", "pkg.sub.helper"]


def test_library_modules_are_not_followed():
    """numpy's, json's and os.path's functions reached as module attributes are not part of the
    version (an upgrade of an installed package keeps the versions, as for a library function
    called by name), nor are deepbase_duck's modules."""
    from deepbase_duck.hypotheses import align

    def uses(text):
        return [float(np.isfinite(1.0) and json.dumps(c) != "" and os.path.join(c) == c
                      and align.align is not None) for c in text]
    assert module_attributes(uses) == []
    assert "<function" not in function_inputs(uses)
    assert not core._user_module(np) and not core._user_module(json) and not core._user_module(os)
    assert not core._user_module(sys) and not core._user_module(align)


def test_a_user_module_in_memory_is_followed():
    """A module made in memory (a notebook's ``types.ModuleType``) is the user's; attributes it
    does not hold, or that lead out of it to a library module, end the chain."""
    import types
    m = types.ModuleType("mem_helpers")
    exec("import numpy as np\n\ndef helper(c):\n    return c.isdigit()\n", m.__dict__)   # noqa: S102
    g = {"m": m}
    exec("def hyp(text):\n    return [float(m.helper(c)) + m.np.zeros(1)[0] for c in text]\n", g)  # noqa: S102
    before = _version(g["hyp"])
    exec("def helper(c):\n    return c.isspace()\n", m.__dict__)                          # noqa: S102
    assert _version(g["hyp"]) != before
    paths = [p for p, _ in module_attributes(g["hyp"])]
    assert paths == ["m.helper", "m.np"]                     # m.np.zeros: numpy is not followed

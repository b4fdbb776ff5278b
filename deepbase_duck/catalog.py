"""The session: one DuckDB connection, its activation folder and the live model adapters, plus
the catalog operations (register a model, add a dataset, look names up).
"""
from __future__ import annotations

import copy
import importlib
import json
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import store
from .errors import ActivationError, DeepBaseError, EmptyDatasetError, UnknownNameError, check_name
from .extraction.adapters import ModelAdapter, legacy_checksums
from .extraction.hooks import Retain, never_called, user_hooks

_SESSIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _earlier_key(name: str, checksum: str) -> str:
    """The dbd_meta key of the checksums ``name`` had before it was adopted as ``checksum``
    (the checksum first: it has no spaces, so the name after it is read back whole)."""
    return f"earlier_checksums {checksum} {name}"


class DatasetExistsError(DeepBaseError):
    """A dataset of that name holds other records (``add_dataset`` without ``replace``)."""


class ModelChangedError(DeepBaseError):
    """A registered model's loader now yields another model than the one registered (its weights
    file was overwritten, say): what is stored from the registered one is not this model's."""


def _check_json_params(name: str, params: dict) -> None:
    """Refuse loader params that the models row cannot keep: they are stored as JSON to call the
    loader again in another session (``adapter``), so a value JSON cannot write (a Path, a torch
    device) failed only at the INSERT, as a bare TypeError naming neither the model nor the key."""
    for key, value in params.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise DeepBaseError(
                f"register_model({name!r}): params[{key!r}] is {type(value).__name__} {value!r}, which the store "
                f"cannot keep ({exc}): params are stored as JSON, to call the loader again when the model is "
                f"loaded in another session; give JSON values (strings, numbers, booleans, null, lists, dicts), "
                f"e.g. str(path) for a path") from None



def loader_params(text: str | None, what: str) -> dict:
    """A model loader's keyword arguments from JSON text (None or '' none): a JSON object, or
    one DeepBaseError naming ``what`` (the CLI's '--params', SQL register_model's params)."""
    if not text:
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeepBaseError(f"{what} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(params, dict):
        raise DeepBaseError(f"{what} must be a JSON object of the loader's keyword arguments, e.g. "
                            f"'{{\"checkpoint\": \"final\"}}', got {text!r}")
    return params


class Session:
    """Everything deepbase_duck keeps beside one DuckDB connection."""

    def __init__(self, con, db_path: str | None, act_root: Path, progress: bool = True):
        self.con = con
        self.db_path = db_path
        self.act_root = Path(act_root)
        self.adapters: dict[str, ModelAdapter] = {}
        # {model: its live module's tensor shapes when the row's layer widths were last measured}
        # (model_row: an edit in place that keeps them keeps the widths; shared with cursor sessions)
        self.live_shapes: dict[str, tuple] = {}
        self.progress = progress
        self.temporary_acts = db_path in (None, ":memory:")
        self.udf_tracebacks: list[str] = []
        self.scan_memory_limit: str | None = None   # connect() sets it (engine/memory.py)
        self.write_lock = threading.RLock()          # shared with cursor sessions: see one_writer
        self.loader_checked: set[str] = set()   # models whose loader was checked against their row (model_row)

    # -- models ----------------------------------------------------------------------------
    @store.one_writer
    def register_model(self, name: str, adapter: ModelAdapter | str, params: dict | None = None,
                       replace: bool = True) -> dict:
        """Register ``adapter`` (or a loader spec 'pkg.module:function' called with ``params``)
        under ``name``; records its checksum, tokenisation and every named module with its width.
        """
        check_name("model", name, lambda n: store.q_one(self.con, "SELECT 1 FROM models WHERE name = ?", [n]))
        if params is not None and not isinstance(params, dict):
            raise DeepBaseError(f"register_model({name!r}): params must be a dict of the loader's keyword arguments "
                                f"(e.g. {{'checkpoint': 'final'}}), got {type(params).__name__} {params!r}")
        _check_json_params(name, params or {})
        loader = None
        if isinstance(adapter, str):
            loader = adapter
            adapter = load_adapter(loader, params or {}, name)
        if not isinstance(adapter, ModelAdapter):
            raise DeepBaseError(
                f"register_model({name!r}): expected a ModelAdapter or a loader spec string, got "
                f"{type(adapter).__name__}")
        hooked = [n or "(root)" for n in user_hooks(adapter.module)]
        if hooked and not adapter.variant:
            warnings.warn(f"register_model({name!r}): modules {', '.join(hooked[:3])}{' ...' if len(hooked) > 3 else ''} "
                          f"carry forward hooks, which the model's checksum cannot see: set adapter.variant to name "
                          f"what they do before registering, or what is stored from the same weights without them "
                          f"(activations, scores) will be reused for this model", stacklevel=3)
        existing = store.q_one(self.con, "SELECT checksum FROM models WHERE name = ?", [name])
        if existing and existing[0] != adapter.checksum:
            if self._adopt_legacy_checksum(name, adapter, existing[0]):
                existing = (adapter.checksum,)
            elif not replace:
                raise DeepBaseError(f"a different model is already registered as {name!r} (checksum "
                                    f"{existing[0][:12]}..., this one {adapter.checksum[:12]}...); pass replace=True "
                                    f"to register this one under the name (what was stored from the other stays, "
                                    f"under its checksum), or register it under another name")
        split = getattr(adapter, "window_split", 1)
        if isinstance(split, bool) or not isinstance(split, (int, np.integer)) or split < 1:
            raise DeepBaseError(f"register_model({name!r}): the adapter's window_split must be a positive "
                                f"integer, got {split!r}")
        widths = layer_widths(adapter)
        n_params = sum(p.numel() for p in adapter.module.parameters())
        rows = [(name, lname, type(m).__name__, widths.get(lname))
                for lname, m in adapter.module.named_modules() if lname]
        with store.Transaction(self.con) as con:
            con.execute("DELETE FROM layers WHERE model = ?", [name])
            con.execute("DELETE FROM models WHERE name = ?", [name])
            con.execute(
                "INSERT INTO models (name, loader, params, checksum, tokenization, architecture, n_params, "
                "window_split, identity) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 3)",
                [name, loader, json.dumps(params or {}), adapter.checksum, adapter.tokenization,
                 adapter.architecture, n_params, int(split)])
            if rows:
                store.insert_arrow(con, "layers", pa.table({
                    "model": [r[0] for r in rows], "layer": [r[1] for r in rows],
                    "module_type": [r[2] for r in rows],
                    "width": pa.array([r[3] for r in rows], pa.int32())}))
        self.adapters[name] = adapter
        self.live_shapes[name] = tensor_shapes(adapter.module)
        return {"name": name, "checksum": adapter.checksum, "tokenization": adapter.tokenization,
                "layers": len(rows)}

    def adapter(self, name: str) -> ModelAdapter:
        if name in self.adapters:
            return self.adapters[name]
        row = store.q_one(self.con, "SELECT loader, params, checksum, tokenization FROM models WHERE name = ?", [name])
        if row is None:
            raise UnknownNameError("model", name, self.model_names())
        loader, params, checksum, tokenization = row
        if not loader:
            raise DeepBaseError(
                f"model {name!r} was registered from a live Python object in another session; "
                "register it again in this session (or register it with a loader spec)")
        adapter = load_adapter(loader, json.loads(params or "{}"), name)
        if adapter.checksum != checksum and not self._adopt_legacy_checksum(name, adapter, checksum):
            raise ModelChangedError(
                f"model {name!r}: the loader {loader!r} now yields weights with checksum "
                f"{adapter.checksum[:12]}..., not the registered {checksum[:12]}... (with params {params or '{}'}: "
                f"its weights file, classes or settings changed since); register it again (register_model with "
                f"this loader) to inspect the model as it is now: what the registered one stored is not reused")
        if adapter.tokenization != tokenization:
            self._follow_tokenization(name, adapter, tokenization)
        self.adapters[name] = adapter
        self.live_shapes[name] = tensor_shapes(adapter.module)    # the registered checksum's: the row's widths
        return adapter

    def _follow_tokenization(self, name: str, adapter: ModelAdapter, stored: str) -> None:
        """The loader now gives the model another tokenisation than its row holds (an image
        adapter's grid rule, which names how layers are resampled to cells, changed since a
        store of an earlier version registered it): the row takes the adapter's, so that what
        is keyed by the old one (symbols, stored activations, stored scores) is no longer
        reused as the model's; it stays in the store under the old key. Warns, naming both."""
        with store.Transaction(self.con) as con:
            con.execute("UPDATE models SET tokenization = ? WHERE name = ?", [adapter.tokenization, name])
        warnings.warn(f"model {name!r}: its loader now gives tokenization {adapter.tokenization!r}, not "
                      f"{stored!r} as registered (the adapter's rule changed since); the model's row follows it, "
                      f"and what was stored under the old one is no longer used for it", stacklevel=4)

    def _adopt_legacy_checksum(self, name: str, adapter: ModelAdapter, stored: str) -> bool:
        """A store written before model identities covered module classes and variants holds the
        weights' checksum alone (``weights_checksum``); one written before they covered the
        submodules' settings holds ``model_checksum_v2``. When ``stored`` is one of these for this
        adapter's model as it is now (``legacy_checksums``), the model row and the behaviors this
        model name stored move to the adapter's checksum (their activations came from this model
        under this name, and are read, not computed again), and True is returned; otherwise
        nothing changes (False). Scores cached by the earlier identity are keyed by a query
        fingerprint over the old checksum, which no query computes any more: the old checksum is
        recorded for this name and checksum (``earlier_checksums``), so that the same query
        finds them (engine/inspect.py: ``earlier_fingerprints``); not where another model under
        the old checksum stored activations, which this name's scans may have read (a warning
        says so: ``_shared_earlier_identity``)."""
        if stored not in legacy_checksums(adapter.module, adapter.variant):
            return False
        checksum = adapter.checksum
        earlier = [c for c in self.earlier_checksums(name, checksum) if c != stored] + [stored]
        shared = self._shared_earlier_identity(name, checksum, stored)
        with store.Transaction(self.con) as con:
            con.execute("UPDATE models SET checksum = ?, identity = 3 WHERE name = ?", [checksum, name])
            con.execute("UPDATE behaviors SET model_checksum = ? WHERE model_checksum = ? AND model = ?",
                        [checksum, stored, name])
            # dbd_meta, a key-value table every store holds: no new table for stores to migrate
            if not shared:
                con.execute("INSERT INTO dbd_meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                            [_earlier_key(name, checksum), json.dumps(earlier)])
        if shared:
            warnings.warn(f"model {name!r}: the scores this store cached for it under its earlier identity are not "
                          f"reused: model {shared!r}, another model under that identity, stored activations then, "
                          f"which scans of {name!r} may have read as its own; its queries are computed again",
                          stacklevel=4)
        return True

    def _shared_earlier_identity(self, name: str, checksum: str, stored: str) -> str | None:
        """Another model name whose activations were stored under the earlier checksum ``stored``
        that ``name`` is being adopted from (as ``checksum``), or None. The earlier identity could
        not tell such models apart (two settings of one class under v2): a scan of ``name`` then
        read the other's stored activations as its own (they were keyed by the checksum alone),
        so its scores are not this model's and are not to be served again (``earlier_checksums``
        is not recorded). Its rows still under ``stored``, or already adopted from ``stored`` to
        another checksum than ``checksum`` (the same model under another name is no other model)."""
        row = store.q_one(self.con, "SELECT model FROM behaviors WHERE model_checksum = ? AND model <> ? "
                                    "ORDER BY model LIMIT 1", [stored, name])
        if row is not None:
            return row[0]
        for key, value in store.q_all(self.con, "SELECT key, value FROM dbd_meta WHERE key LIKE 'earlier_checksums %' "
                                                "ORDER BY key"):
            _, other_checksum, other = key.split(" ", 2)
            if other != name and other_checksum != checksum and stored in json.loads(value) and store.q_one(
                    self.con, "SELECT 1 FROM behaviors WHERE model = ? AND model_checksum = ? LIMIT 1",
                    [other, other_checksum]) is not None:
                return other
        return None

    def earlier_checksums(self, name: str, checksum: str) -> list[str]:
        """The checksums the model ``name`` was stored under before it was adopted as ``checksum``
        (``_adopt_legacy_checksum``), oldest first; [] for a model never adopted. Keyed by both:
        a name registered since as another model (another checksum) has none, and another name
        of the same weights none either (under its earlier identity it may have been a model the
        old checksum could not tell from this one)."""
        row = store.q_one(self.con, "SELECT value FROM dbd_meta WHERE key = ?", [_earlier_key(name, checksum)])
        return json.loads(row[0]) if row else []

    def model_names(self) -> list[str]:
        return [r[0] for r in store.q_all(self.con, "SELECT name FROM models ORDER BY name")]

    def model_row(self, name: str) -> dict:
        row = store.q_one(self.con, "SELECT name, checksum, tokenization, identity, loader FROM models WHERE name = ?",
                          [name])
        if row is None:
            raise UnknownNameError("model", name, self.model_names())
        live = self.adapters.get(name)
        if (live is not None and row[3] is not None and row[3] < 3 and live.checksum != row[1]
                and live.tokenization == row[2] and self._adopt_legacy_checksum(name, live, row[1])):
            return self.model_row(name)      # a row of an earlier store (v2), the live model's own
        if live is not None and row[3] is not None and (live.checksum != row[1] or live.tokenization != row[2]):
            # the model object registered (or loaded) under this name was changed in place since
            # (its weights or submodules, or its encoder: a new ``tokenization``, as the adapter's
            # docs ask of an encoder change): the name follows the object, now another model (its
            # own keys, nothing stored reused); registered again as a live object, since no loader
            # yields it any more. With the same submodules of the same widths (one forward pass over
            # the example measures them: a submodule swapped for one of its class with another
            # width changes no name or class), only the row's keys and loader change
            self._follow_live(name, live)
            return self.model_row(name)
        if (row[3] is None or row[3] < 3) and row[4] and name not in self.adapters:
            # a row keyed by an earlier identity (the weights alone, or v2 without the settings):
            # loading the model moves it and its behaviors to the current checksum before any
            # query keys anything by it
            try:
                self.adapter(name)
            except ModelChangedError:       # it loads, as another model: refused (see below)
                raise
            except Exception:      # it cannot load here: the store keeps its own (weights) keys,
                pass               # which still serve stored activations; a scan that runs the model fails then
            else:
                return self.model_row(name)
        if row[4] and name not in self.adapters and name not in self.loader_checked:
            # loaded once per session before any query keys by the row (a query reading stored
            # activations or scores only would not load it): a loader that now yields other
            # weights (a checkpoint file overwritten since) is refused here, as when the model
            # runs, not served what the registered weights stored; and an image model's
            # tokenisation names its grid rule, which an earlier version's row may hold: the
            # row follows the adapter's (adapter())
            self.loader_checked.add(name)
            try:
                self.adapter(name)
            except ModelChangedError:
                self.loader_checked.discard(name)       # refused again by the next query
                raise
            except Exception:      # as above: a scan that runs the model fails with the reason
                pass
            else:
                return self.model_row(name)
        return {"name": row[0], "checksum": row[1], "tokenization": row[2]}

    def _follow_live(self, name: str, live: ModelAdapter) -> None:
        """The row of ``name`` takes the live adapter's checksum and tokenisation (see model_row).
        Where its submodules' names or classes differ from the row's layers, or its tensors'
        shapes from those the layers' widths were measured with (a submodule swapped for one of
        its class with another width changes no name or class), the model is registered again
        whole: one forward pass over the example measures the widths again. Else (weights written
        in place) the widths stand and the model does not run."""
        layers = sorted((n, type(m).__name__) for n, m in live.module.named_modules() if n)
        stored = sorted(store.q_all(self.con, "SELECT layer, module_type FROM layers WHERE model = ?", [name]))
        shapes = tensor_shapes(live.module)
        if layers != stored or self.live_shapes.get(name) != shapes:
            widths = layer_widths(live)
            if layers != stored or widths != {k: w for k, w in self.stored_widths(name).items() if w is not None}:
                self.register_model(name, live)
                return
            self.live_shapes[name] = shapes
        with store.Transaction(self.con) as con:
            con.execute("UPDATE models SET checksum = ?, tokenization = ?, loader = NULL, params = '{}' "
                        "WHERE name = ?", [live.checksum, live.tokenization, name])

    def stored_widths(self, model: str) -> dict:
        """{layer: output width (None for a module without a tensor output)} of a registered model."""
        return dict(store.q_all(self.con, "SELECT layer, width FROM layers WHERE model = ?", [model]))

    def check_layers(self, model: str, layers) -> list[str]:
        """``layers`` (one name, or a list of them) as a list, each a layer of ``model``."""
        valid = self.stored_widths(model)
        if isinstance(layers, str):
            layers = [layers]
        if layers is None or len(layers) == 0:
            raise DeepBaseError(f"no layers given for model {model!r}; its layers with tensor outputs: "
                                + ", ".join(k for k, w in valid.items() if w))
        for layer in layers:
            if layer not in valid:
                raise UnknownNameError("layer", layer, [k for k, w in valid.items() if w] or valid)
            if valid[layer] is None:      # a ModuleList, a module returning None or no tensor
                inner = [k for k, w in valid.items() if w and k.startswith(f"{layer}.") and "." not in k[len(layer) + 1:]]
                live = self.adapters.get(model)
                why = never_called(live.module, layer) if live is not None else None
                raise ActivationError(
                    f"layer {layer!r} of model {model!r} gives no tensor output ("
                    + (f"it never runs in the forward pass: {why}" if why else
                       "a container such as a ModuleList is never called itself, or the module returns None or "
                       "no tensor") + "), so it has no activations to read; " + (f"its submodules with tensor outputs: {', '.join(inner[:10])}"
                                    f"{' ...' if len(inner) > 10 else ''}" if inner else
                                    "its layers with tensor outputs: " + ", ".join(k for k, w in valid.items() if w))
                    + " (if it does return a tensor in a dict or a PackedSequence, which stores made before "
                      "deepbase_duck read them recorded without a width, register the model again to measure it)")
        return list(dict.fromkeys(layers))     # a layer named twice: once

    # -- datasets --------------------------------------------------------------------------
    @store.one_writer
    def add_dataset(self, name: str, records, description: str = "", replace: bool = False) -> int:
        """Store ``records`` (strings, or dicts with 'text' and optional 'source'; or a table with
        those columns: an Arrow table, a DuckDB relation, ``_table_records``) as dataset ``name``;
        record ids are 0..n-1 in the given order. Returns the number of records.

        Where the dataset exists (a non-empty ``description`` given replaces its description in
        every case; none given keeps it, ``replace`` too): the same texts change nothing (sources
        are updated); the same texts followed by more appends the new records, keeping everything stored from the others
        (symbols, labels, activations); other texts are refused unless ``replace``, which stores
        the new records and drops what was stored from each old record whose text is not the new
        record's of its id (symbols, labels, and the activation parts holding it; a record id
        keeps its stored data only with the same text): editing a few records of a large dataset
        recomputes those (and the other records of their parts), not the whole dataset."""
        check_name("dataset", name, lambda n: store.q_one(self.con, "SELECT 1 FROM datasets WHERE name = ?", [n]))
        if isinstance(records, (str, bytes)):
            raise DeepBaseError(f"dataset {name!r}: records must be a list of texts (or dicts with 'text'), "
                                f"got one {type(records).__name__}; for files use dbd.read_records(path)")
        records = _table_records(name, records)
        try:
            iterable = not isinstance(records, dict) and iter(records) is not None
        except TypeError:
            iterable = False
        if not iterable:                   # None, a number, one dict record: not a list of records
            raise DeepBaseError(f"dataset {name!r}: records must be a list of texts (or of dicts with 'text'), "
                                f"got {type(records).__name__} {repr(records)[:80]}; nothing was stored")
        texts, sources = [], []
        for i, r in enumerate(records):
            if isinstance(r, str):
                texts.append(r); sources.append(None)
            elif isinstance(r, dict) and isinstance(r.get("text"), str):
                texts.append(r["text"])
                src = r.get("source")
                if src is not None and "offset" in r:
                    src = f"{src}:{r['offset']}"
                sources.append(None if src is None else str(src))
            else:
                what = (type(r).__name__ if not isinstance(r, dict) else "a dict with no 'text'" if "text" not in r
                        else f"a dict whose 'text' is {type(r['text']).__name__} {repr(r['text'])[:40]}")
                raise DeepBaseError(
                    f"dataset {name!r}: record {i} is {what}; give strings or dicts with a 'text' string")
        if not texts:
            raise EmptyDatasetError(f"dataset {name!r}: no records given")
        columns = {}                       # as Arrow now: what the store cannot hold fails here, by name
        for column, values in (("text", texts), ("source", sources)):
            try:
                columns[column] = pa.array(values, pa.string())
            except UnicodeEncodeError:
                _refuse_surrogate(name, column, values)
                raise
        exists = store.q_scalar(self.con, "SELECT count(*) FROM datasets WHERE name = ?", [name])
        first = 0                          # the first record id to insert
        if exists:
            # a record edited with SQL since it was stored loses what was stored from its old text
            # first: below its rows may be written again, with the md5 of the text they then hold
            self._forget_edited_records(name)
            old = store.q_all(self.con, "SELECT text, source FROM records WHERE dataset = ? ORDER BY record_id", [name])
            if len(old) <= len(texts) and all(t == o[0] for t, o in zip(texts, old)):
                first = len(old)           # the stored records, unchanged (maybe more after them)
                if all(s == o[1] for s, o in zip(sources, old)) and first == len(texts):
                    if description:          # a description given is stored, as with new records
                        with store.Transaction(self.con) as con:
                            con.execute("UPDATE datasets SET description = ? WHERE name = ?", [description, name])
                    return len(texts)
            elif not replace:
                raise DatasetExistsError(
                    f"dataset {name!r} already exists with different records; pass replace=True to replace it "
                    "(what was stored from the records whose text changed is then dropped)")
        dropped, part_files = [], []
        with store.Transaction(self.con) as con:
            if not exists:
                con.execute("INSERT INTO datasets (name, description) VALUES (?, ?)", [name, description])
            elif first == 0:               # replace: a record id keeps its stored data only with its text
                gone = [i for i, o in enumerate(old) if i >= len(texts) or texts[i] != o[0]]
                # (no description given keeps the stored one, as for the same or appended records)
                description = description or store.q_scalar(con, "SELECT description FROM datasets WHERE name = ?",
                                                            [name])
                if len(gone) < len(old):
                    part_files, dropped = self._forget_records(con, name, gone)
                    con.execute("DELETE FROM records WHERE dataset = ?", [name])
                    con.execute("UPDATE datasets SET description = ? WHERE name = ?", [description, name])
                else:                      # nothing kept: the dataset goes whole
                    dropped = self._drop_dataset(con, name)
                    con.execute("INSERT INTO datasets (name, description) VALUES (?, ?)", [name, description])
            else:
                if description:
                    con.execute("UPDATE datasets SET description = ? WHERE name = ?", [description, name])
                if any(s != o[1] for s, o in zip(sources, old)):
                    con.execute("DELETE FROM records WHERE dataset = ?", [name])   # new sources of the kept
                    first = 0                                                    # records: their rows rewritten
            store.insert_arrow(con, "records", pa.table({
                "dataset": pa.array([name] * (len(texts) - first)),
                "record_id": pa.array(np.arange(first, len(texts), dtype=np.int32)),
                "source": columns["source"].slice(first),
                "text": columns["text"].slice(first)}))
            con.execute("UPDATE records SET text_md5 = md5(text) WHERE dataset = ? AND text_md5 IS NULL", [name])
        for f in part_files:               # files go once the catalog no longer lists them
            f.unlink(missing_ok=True)
        for directory in dropped:
            store.remove_tree(self.act_root / directory)
        return len(texts)

    @store.one_writer
    def drop_dataset(self, name: str) -> dict:
        """Delete dataset ``name`` with everything stored from its records; returns the counts of
        records and stored activations (behaviors) dropped."""
        if name not in self.dataset_names():
            raise UnknownNameError("dataset", name, self.dataset_names())
        n = store.q_scalar(self.con, "SELECT count(*) FROM records WHERE dataset = ?", [name])
        with store.Transaction(self.con) as con:
            dropped = self._drop_dataset(con, name)
        for directory in dropped:          # files go once the catalog no longer lists them
            store.remove_tree(self.act_root / directory)
        return {"dataset": name, "records": int(n), "behaviors": len(dropped)}

    def _drop_dataset(self, con, name) -> list[str]:
        """Delete dataset ``name`` and everything stored from its records (symbols, labels, stored
        activations with their views) in the caller's transaction; returns the activation
        folders to delete once it commits."""
        self.forget_image_maxima(name)
        for table in ("records", "symbols", "tokenized_records", "labels", "labeled_records"):
            con.execute(f"DELETE FROM {table} WHERE dataset = ?", [name])
        con.execute("DELETE FROM datasets WHERE name = ?", [name])
        behaviors = store.q_all(con, "SELECT behavior_id, view_name, directory FROM behaviors WHERE dataset = ?", [name])
        for bid, view, _ in behaviors:
            con.execute(f"DROP VIEW IF EXISTS {view}")
            for table in ("behavior_records", "behavior_parts", "behaviors"):
                con.execute(f"DELETE FROM {table} WHERE behavior_id = ?", [bid])
        return [directory for _, _, directory in behaviors]

    def forget_image_maxima(self, dataset: str) -> None:
        """Drop the per-unit image maxima this session remembers for ``dataset`` (reports/images.py:
        ``unit_maxima``); its records were dropped, replaced or edited. (Those entries are keyed by
        the records' texts too, so they would not be served again; this frees them.)"""
        cache = self.__dict__.get("_unit_maxima")
        if cache:
            for key in [k for k in cache if k[3] == dataset]:
                cache.pop(key, None)

    def query_provenance(self, models, dataset: str) -> dict:
        """What a query's scores come from, for its ``queries.params``: each model's checksum and
        tokenisation (lists in the order of ``models``) and the dataset's records as they are
        (their number and an md5 over each record's text md5, in record-id order). A report of
        the query (reports/data.py: ``provenance``) checks them, so that it shows activations of
        these weights over these texts only."""
        rows = [self.model_row(m) for m in models]
        n, digest = store.q_one(self.con, "SELECT count(*), md5(string_agg(coalesce(text_md5, md5(text)), ',' "
                                          "ORDER BY record_id)) FROM records WHERE dataset = ?", [dataset])
        return {"checksums": [r["checksum"] for r in rows], "tokenizations": [r["tokenization"] for r in rows],
                "dataset_records": int(n), "dataset_md5": digest}

    def dataset_names(self) -> list[str]:
        return [r[0] for r in store.q_all(self.con, "SELECT name FROM datasets ORDER BY name")]

    def check_dataset(self, name: str) -> int:
        if name not in self.dataset_names():
            raise UnknownNameError("dataset", name, self.dataset_names())
        n = store.q_scalar(self.con, "SELECT count(*) FROM records WHERE dataset = ?", [name])
        if not n:
            raise EmptyDatasetError(f"dataset {name!r} has no records")
        self._forget_edited_records(name)
        return n

    def _forget_edited_records(self, name: str) -> list[int]:
        """Records of ``name`` whose text was changed in place since it was stored (an UPDATE of
        ``records``: its md5 no longer matches ``text_md5``) lose what was stored from the old
        text: symbols, labels, and the activation parts holding them (their other records are
        computed again too); a warning names them. Rows from before text_md5 existed get it
        now. Returns the changed record ids."""
        con = self.con
        if store.q_scalar(con, "SELECT count(*) FROM records WHERE dataset = ? AND text_md5 IS NULL", [name]):
            con.execute("UPDATE records SET text_md5 = md5(text) WHERE dataset = ? AND text_md5 IS NULL", [name])
        changed = [int(r) for (r,) in store.q_all(con, "SELECT record_id FROM records WHERE dataset = ? AND "
                                                       "text_md5 <> md5(text) ORDER BY record_id", [name])]
        if not changed:
            return changed
        with store.Transaction(con):
            part_files, dropped = self._forget_records(con, name, changed)
            con.execute("UPDATE records SET text_md5 = md5(text) WHERE dataset = ? AND list_contains(?, record_id)",
                        [name, changed])
        for f in part_files:
            f.unlink(missing_ok=True)
        for directory in dropped:
            store.remove_tree(self.act_root / directory)
        shown = ", ".join(map(str, changed[:10])) + (" ..." if len(changed) > 10 else "")
        warnings.warn(f"dataset {name!r}: the text of {len(changed)} record(s) ({shown}) changed since it was stored; "
                      f"their symbols, labels and stored activations will be computed again", stacklevel=3)
        return changed

    def _forget_records(self, con, name: str, ids: list[int]) -> tuple[list[Path], list[str]]:
        """In the caller's transaction: what was stored from records ``ids`` of dataset ``name``
        goes: their symbols and labels, and the activation parts holding them (the parts' other
        records count as not stored then); a behavior left with no part goes too (its row and
        view), as after a failed extraction: no catalog row lists activations it does not hold.
        Returns the part files and the behavior folders to delete once the transaction commits."""
        from .engine.extract import forget_parts
        part_files, dropped = [], []
        if not ids:
            return part_files, dropped
        self.forget_image_maxima(name)
        for table in ("symbols", "tokenized_records", "labels", "labeled_records"):
            con.execute(f"DELETE FROM {table} WHERE dataset = ? AND list_contains(?, record_id)", [name, ids])
        rows = store.q_all(con, "SELECT b.behavior_id, b.view_name, b.directory, list(DISTINCT r.part) "
                                "FROM behaviors b JOIN behavior_records r USING (behavior_id) "
                                "WHERE b.dataset = ? AND list_contains(?, r.record_id) "
                                "GROUP BY ALL", [name, ids])
        for bid, view, directory, parts in rows:
            _, files = forget_parts(con, {"behavior_id": bid, "view_name": view}, [int(p) for p in parts])
            part_files += [self.act_root / directory / f for f in files]
            if not store.q_scalar(con, "SELECT count(*) FROM behavior_parts WHERE behavior_id = ?", [bid]):
                con.execute("DELETE FROM behavior_records WHERE behavior_id = ?", [bid])
                con.execute("DELETE FROM behaviors WHERE behavior_id = ?", [bid])
                dropped.append(directory)
        return part_files, dropped

    def record_ids(self, dataset: str) -> np.ndarray:
        t = store.q_arrow(self.con, "SELECT record_id FROM records WHERE dataset = ? ORDER BY record_id", [dataset])
        return t.column(0).to_numpy()

    def select_records(self, dataset: str, record_ids=None, limit=None) -> np.ndarray:
        """The records a query reads: ``record_ids`` (every one must be a record of ``dataset``;
        an id given more than once is read once, at its first place) or all of the dataset's,
        then the first ``limit`` of them (an integer >= 0)."""
        from .errors import check_int
        every = self.record_ids(dataset)
        if record_ids is None:
            ids = every
        else:
            try:
                given = np.asarray(record_ids).reshape(-1)
                ids = given.astype(np.int64)
            except (TypeError, ValueError) as exc:
                raise DeepBaseError(f"record_ids must be a list of integer record ids, got {record_ids!r}") from exc
            # (a cast would read 1.5 as record 1 and True as record 1: refused, not guessed)
            if given.dtype.kind not in "iuf" or not np.array_equal(given, ids):
                bad = (given[given != ids] if given.dtype.kind == "f" else given)[:1].tolist()[0]
                raise DeepBaseError(f"record_ids must be a list of integer record ids, got {bad!r} "
                                    f"({given.dtype} values)")
            unknown = np.setdiff1d(ids, every)
            if len(unknown):
                raise DeepBaseError(f"record_ids: {len(unknown)} id(s) are not records of dataset {dataset!r}: "
                                    f"{', '.join(map(str, unknown[:10].tolist()))}{' ...' if len(unknown) > 10 else ''}")
            _, first = np.unique(ids, return_index=True)
            if len(first) < len(ids):      # repeats would weigh a record twice: each is read once
                ids = ids[np.sort(first)]
        if limit is not None:
            ids = ids[:check_int("limit", limit, 0)]
        return ids

    def texts(self, dataset: str, record_ids) -> dict[int, str]:
        ids = pa.table({"record_id": pa.array(np.asarray(record_ids, dtype=np.int32))})
        self.con.register("__dbd_ids", ids)
        try:
            rows = store.q_all(self.con, "SELECT r.record_id, r.text FROM records r JOIN __dbd_ids USING (record_id) "
                                         "WHERE r.dataset = ?", [dataset])
        finally:
            self.con.unregister("__dbd_ids")
        return {int(k): v for k, v in rows}

    def cursor_session(self) -> "Session":
        """This session over a new cursor of its connection, for work in another thread (DuckDB
        refuses concurrent calls on one connection): the same database, models and folders. Its
        ``close()`` closes the cursor only."""
        view = copy.copy(self)
        view.con = self.con.cursor()
        view.temporary_acts = False           # the folder stays with this session
        return view

    def close(self):
        try:
            self.con.close()
        finally:
            if self.temporary_acts:
                store.remove_tree(self.act_root)


def _table_records(dataset: str, records):
    """``records`` as add_dataset reads them where they are a table or a column: an Arrow array
    its strings; a table (an Arrow table or record batch, a DuckDB relation such as
    ``con.sql('SELECT text FROM ...')``, any object with the Arrow stream interface: a polars or
    recent pandas DataFrame) the dicts of its rows' 'text' and, where it has one, 'source'
    columns. Iterated as they are, a table gives its columns (or a DuckDB relation fails), not its
    rows. Anything else is returned as it is."""
    if isinstance(records, (pa.Array, pa.ChunkedArray)):
        return records.to_pylist()
    if not (isinstance(records, (pa.Table, pa.RecordBatch)) or hasattr(records, "__arrow_c_stream__")):
        return records
    try:
        t = pa.table(records)
    except (TypeError, ValueError, pa.ArrowException) as exc:
        raise DeepBaseError(f"dataset {dataset!r}: cannot read the {type(records).__name__} given as a table "
                            f"({exc}); give a list of texts or of dicts with 'text'") from None
    if "text" not in t.column_names:
        raise DeepBaseError(f"dataset {dataset!r}: the {type(records).__name__} given has no column 'text' "
                            f"(columns: {', '.join(t.column_names) or 'none'}); name the texts' column 'text' "
                            f"(and where they came from 'source')")
    texts = t.column("text")
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)
            or getattr(pa.types, "is_string_view", lambda _: False)(texts.type)
            or (pa.types.is_dictionary(texts.type) and pa.types.is_string(texts.type.value_type))):
        raise DeepBaseError(f"dataset {dataset!r}: column 'text' holds {texts.type}, not text")
    texts = texts.cast(pa.large_string()).to_pylist()
    if "source" not in t.column_names:
        return [{"text": x} for x in texts]
    sources = t.column("source").cast(pa.large_string()).to_pylist()
    return [{"text": x, "source": src} for x, src in zip(texts, sources)]


def _refuse_surrogate(dataset: str, column: str, values) -> None:
    """Raise a DeepBaseError naming the first record whose ``column`` value holds a lone surrogate
    (a str that is no UTF-8 text: ``'\\ud83e'`` from a broken JSON escape or a bad decode)."""
    for i, v in enumerate(values):
        try:
            if v is not None:
                v.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DeepBaseError(f"dataset {dataset!r}: record {i}'s {column} holds {v[exc.start]!r} at character "
                                f"{exc.start}, not a character (a lone surrogate, from a broken JSON escape or a bad "
                                f"decode); nothing was stored") from None


def load_adapter(spec: str, params: dict, model: str | None = None) -> ModelAdapter:
    """Import 'package.module:function' and call it with ``params``; every failure to do so is
    one DeepBaseError naming the loader, its params and ``model`` (the name being registered or
    loaded), with the loader's own error."""
    who = f"model {model!r}: " if model else ""
    if not isinstance(spec, str) or ":" not in spec:
        raise DeepBaseError(f"{who}loader {spec!r} is not of the form 'package.module:function'")
    mod_name, fn_name = (part.strip() for part in spec.split(":", 1))
    if not mod_name or not fn_name:
        raise DeepBaseError(f"{who}loader {spec!r} has an empty {'module' if not mod_name else 'function'} name; "
                            f"give 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise DeepBaseError(f"{who}loader {spec!r} cannot be imported: {exc}") from exc
    if not callable(fn):
        raise DeepBaseError(f"{who}loader {spec!r} names a {type(fn).__name__}, not a function")
    try:
        adapter = fn(**params)
    except DeepBaseError:
        raise
    except (TypeError, ValueError, KeyError, OSError) as exc:
        # an unexpected keyword, a bad value (an unknown checkpoint), a missing file
        raise DeepBaseError(f"{who}loader {spec!r} failed with params {json.dumps(params, default=str)}: "
                            f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(adapter, ModelAdapter):
        raise DeepBaseError(f"{who}loader {spec!r} returned {type(adapter).__name__}, not a ModelAdapter")
    return adapter


def tensor_shapes(module) -> tuple:
    """(name, shape) of every parameter and buffer of ``module``: no value is read."""
    return tuple((k, tuple(v.shape)) for k, v in module.state_dict(keep_vars=True).items())


def layer_widths(adapter: ModelAdapter) -> dict[str, int]:
    """Width of every named module's output, from one forward pass over the adapter's example
    (``example_encoding``)."""
    names = [n for n, _ in adapter.module.named_modules() if n]
    try:
        enc = adapter.example_encoding(1)
    except Exception as exc:
        example = getattr(adapter, "example_text", None)
        raise DeepBaseError(
            f"register_model: the adapter ({type(adapter).__name__}) cannot encode its example record, "
            f"example_text={example if example is None else example[:80]!r}, which one forward pass at "
            f"registration reads to measure each layer's width ({type(exc).__name__}: {exc}); set "
            f"adapter.example_text to a record its encoder reads (or override example_encoding())") from exc
    widths = {}
    with Retain(adapter.module, names) as ret:
        adapter.forward(enc)
        for n in names:
            t = ret.outputs.get(n)
            if t is not None and t.dim() >= 2:
                # (batch, sequence, width) and (batch, width): the last axis; (batch, channels, ...): channels
                widths[n] = int(t.shape[-1]) if t.dim() <= 3 else int(t.shape[1])
    return widths


def session_of(con) -> Session:
    s = _SESSIONS.get(con)
    if s is None:
        raise DeepBaseError("this connection was not opened by deepbase_duck.connect()")
    return s

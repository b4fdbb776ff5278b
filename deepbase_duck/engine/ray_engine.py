"""The Ray engine: ``inspect(..., engine="ray")`` runs the forward passes on the workers of a Ray
cluster, in blocks of records, and merges the inspector states they return.

What moves where:

- Each worker is a Ray actor (one per CPU, or per GPU share when the cluster has GPUs) that loads
  the model ONCE from the catalog's loader spec ('pkg.mod:fn' + params, as register_model stored
  it) and checks the weights' checksum against the store's ``models`` row; a live model object is
  never pickled. A model registered from a live object has no loader spec: refused.
- The driver (this process, beside the DuckDB store) plans the blocks, computes each block's
  labels (``LabelStream``, engine/labels.py) and sends the records' texts and the label
  matrix with the block. Symbols of records not yet tokenised are encoded by a worker too, so the
  driver never loads the model: block by block, as each block is prepared for dispatch (a query
  that stops early tokenises only the records it dispatched, not the whole selection), on the
  worker's own ``encode`` thread (a Ray concurrency group), so tokenising never waits behind a
  block that worker is running. (A control task's class frequencies need every selected record's
  symbols: such a query tokenises them all first.)
- A worker runs the forward passes of its block, folds them into fresh inspector states (the
  step the local engine runs, ``update_states``) and returns the states: a few KB for corr
  (moments per unit x hypothesis), not the activations.
- The driver combines the block states in BLOCK order (not completion order) with the
  inspectors' own ``combine()``, so the result does not depend on which worker finished first: it
  equals the local engine's up to float64 rounding (the forward batches are the same). It then
  finalises and writes exactly as the local engine does (``inspect()``), in one transaction at
  the end: an interrupted driver writes no scores (the symbols, labels and committed parts of
  the blocks it merged stay, consistent, for the next query).
- Early stopping (``max_error``, ``plateau_tol``): a block is one window of the seeded order;
  blocks are merged as they finish (``ray.wait``) in order, the bound (and the probes' plateau)
  is checked after each merge with the local engine's rule (``StopRule``), and once it holds no
  block is dispatched any more and those in flight are cancelled (``ray.cancel``): the records
  used are the same prefix the local engine uses. In a query of several models (or with the
  untrained twin) a run whose rule held before another's goes on (``run(..., resume=)``) from
  the blocks it merged, as the local engine's does (``stop_together``): every model is scored
  on the same windows.
- Faults: a block whose worker died (node lost, process killed), or a worker found dead when
  asked to tokenise a block's records, is dispatched again to a live worker, and a replacement
  actor is requested from Ray (tokenising waits for it when no worker is live); a replacement
  still starting when the query ends stays in the kept pool, which keeps its size. An error of a
  block (a hypothesis raising on one of its records, its tokenising, its forward pass: bad
  activations, an exception of the model) is held with the block and raised when the scan merges
  it, as the local engine raises when its scan reaches the record: an early-stopped scan that
  never merges the block succeeds, as locally, and no block past it is dispatched. The model's
  own exception is raised as itself (its type, e.g. a RuntimeError, with a note naming the Ray
  worker and its traceback) where Ray hands it back, else as a DeepBaseError.

Activations already stored for every requested layer and every selected record are scanned where
they are, by the local engine (no model runs, so there is nothing to distribute), with
``keep_activations`` too (there is nothing to store, as locally). Where only some records are
stored (a dataset grown since its extraction), the blocks mix them as the local engine does
(``LocalEngine.run``): a worker reads the stored records' rows from their Parquet parts and runs
the model on the others. Every worker is asked whether it sees the stored parts (the store's
activation folder must be a path the nodes see): the blocks that read them go only to those that
do, the others run the model's blocks (``queries.params`` counts them,
'ray_workers_not_seeing_stored'); where no worker sees them the model runs for every record
('ray_stored_unseen'), and a scan left with no worker that sees them (they died, replacements
landed elsewhere) fails saying so. A full scan reads the stored records part by part and then
the model's batches over the rest (mi's calibration records first), a progressive scan splits
each seeded batch into its stored and its computed records, so that both engines read the same
records in the same windows. Otherwise, with ``keep_activations`` the workers
write each batch's Parquet part into the behavior's folder under the store's activation folder,
which must be a path every node sees (a shared file system); the driver commits a part to the
catalog when it merges its block, so DuckDB reads them in place through the behavior's view. The
blocks that write parts, too, go only to the workers that see the folder (a file the driver puts
there for the query tells them): a worker that does not would write its parts where the store
never finds them; where none sees it the query fails before anything is written.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import socket
import sys
import time

import numpy as np
import torch

from .. import store
from ..errors import DeepBaseError, EmptyDatasetError
from ..extraction.adapters import Encoded, legacy_checksums
from ..inspectors.base import measure_class
from ..progress import progress_bar
from .extract import (SymbolWriter, batches_with_texts, cleanup_orphans, commit_parts, drop_unstored_behaviors,
                      ensure_symbols, forward_batch, plan_batches, stored_symbol_counts, write_part_file)
from .inspect import (
    KeepActivations,
    LabelStream,
    LabelSupport,
    LocalEngine,
    Plan,
    StopRule,
    StoredRows,
    _score_matrix,
    class_frequencies,
    engine_sets_mi_bins,
    mi_calibration_records,
    new_samples,
    seeded_windows,
    stored_halves,
    stored_part_blocks,
    stored_reads,
    uncalibrated,
    update_states,
)

try:                                     # the engine is optional: pip install 'deepbase-duck[ray]'
    import ray
    from ray import exceptions as rex
except ImportError:                      # pragma: no cover - exercised where ray is absent
    ray = None


# -- the worker ------------------------------------------------------------------------------
def _to_cpu(obj, seen=None):
    """Move every tensor held by an inspector state (or sample) to the CPU, in place, so the
    driver can unpickle it without a GPU."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return obj
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, list):
        return [_to_cpu(v, seen) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v, seen) for v in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v, seen) for k, v in obj.items()}
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        for k, v in list(vars(obj).items()):
            if isinstance(v, torch.device):
                setattr(obj, k, torch.device("cpu"))
            elif isinstance(v, (torch.Tensor, list, tuple, dict)) or _ours(v):
                # (an object of ours held by the state, e.g. the RowSample of ap/spearman or the
                # PearsonState of pointbiserial: its tensors and device moved too)
                setattr(obj, k, _to_cpu(v, seen))
    return obj


def _ours(v) -> bool:
    """Whether ``v`` is an instance of a deepbase_duck class (a state's nested sample or state)."""
    return (not isinstance(v, type) and hasattr(v, "__dict__")
            and type(v).__module__.split(".", 1)[0] == "deepbase_duck")


class BlockWorker:
    """One Ray actor: the model loaded once from its loader spec and checked against the catalog's
    checksum. ``configure`` sets a query's plan (hooks on its layers); ``run_block`` turns a block
    of records (texts and labels) into inspector states. An actor serves query after query of the
    same model (see RayEngine.keep_workers)."""

    def __init__(self, model: str, loader: str, params: dict, checksum: str, threads: int = 1):
        from ..catalog import load_adapter
        torch.set_num_threads(max(1, int(threads)))
        where = f"Ray worker on {socket.gethostname()} (pid {os.getpid()})"
        try:
            adapter = load_adapter(loader, params)
        except Exception as exc:
            raise DeepBaseError(f"model {model!r}: the loader {loader!r} failed on the {where}: "
                                f"{type(exc).__name__}: {exc}") from None
        # a store written before identities covered module classes holds the weights' checksum,
        # one written before they covered plain settings the v2 checksum (catalog adopts both)
        if checksum != adapter.checksum and checksum not in legacy_checksums(adapter.module, adapter.variant):
            raise DeepBaseError(f"model {model!r}: the loader {loader!r} yields weights with checksum "
                                f"{adapter.checksum[:12]}... on the {where}, not the registered "
                                f"{checksum[:12]}...; the workers must load the same weights")
        self.adapter, self.model = adapter, model
        self.device = adapter.device           # chosen at run time: a GPU when Ray assigned one
        self.ret = None
        self.rows = None                       # the stored parts this query reads (StoredRows)

    def configure(self, plan: Plan, widths: dict) -> dict:
        """Take the plan of the next query: hooks on its layers, its label columns."""
        from ..extraction.hooks import Retain
        if self.ret is not None:
            self.ret.__exit__(None, None, None)
        self.plan, self.widths = plan, widths
        self.rows = None                       # (the last query's decoded parts: freed)
        self.ret = Retain(self.adapter.module, plan.layers).__enter__()
        col_index = {c["name"]: j for j, c in enumerate(plan.label_columns)}
        self.take = {m: torch.as_tensor([col_index[c["name"]] for c in plan.columns[m]]) for m in plan.measures}
        return self.ready()

    def ready(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device),
                "node": ray.get_runtime_context().get_node_id()}

    def sees(self, files: list[str]) -> bool:
        """Whether this worker can read every one of ``files`` (stored parts under the store's
        activation folder: a mixed scan reads them on the workers, which needs a shared folder)."""
        return all(os.access(f, os.R_OK) for f in files)

    def stored_batch(self, ids: list[int], read: dict, counts: dict):
        """The stored activations of records ``ids`` (each layer's rows in ``read``: {layer:
        [(part file, its records of ``ids``)]}), read as the local engine reads them (StoredRows,
        whose decoded row groups are kept for the query's later blocks)."""
        from .extract import Batch
        if self.rows is None:
            self.rows = StoredRows([])
        for layer, files in read.items():
            for f, recs in files:
                if not os.access(f, os.R_OK):
                    raise DeepBaseError(f"stored activations of layer {layer!r} are missing or unreadable on the "
                                        f"Ray worker on {socket.gethostname()}: {f} (the store's activation folder "
                                        f"must be a path every node sees, e.g. a shared file system)")
                self.rows.where.setdefault(layer, {}).update(dict.fromkeys(recs, f))
        batch = self.rows.batch(ids, counts)
        n = int(sum(counts[r] for r in ids))
        for layer, x in batch.acts.items():
            if x.shape[0] != n:
                raise DeepBaseError(f"stored activations of layer {layer!r} hold {x.shape[0]} rows for records "
                                    f"{ids[:5]}{'...' if len(ids) > 5 else ''}, whose symbols are {n}: the stored "
                                    f"parts and the symbols disagree")
        return Batch(batch.record_ids, batch.n_symbols, {layer: batch.acts[layer] for layer in self.plan.layers})

    def encode(self, texts: list[str]) -> Encoded:
        """The symbols of ``texts`` (the model inputs dropped): tokenisation for the driver."""
        enc = self.adapter.encode(texts)
        return Encoded(None, enc.starts, enc.ends, enc.tokens, enc.index)

    def run_block(self, block: dict) -> dict:
        """``block``: {'batches': [(record ids, texts, symbol counts)], 'labels': [float64 arrays]},
        and per batch ('read') None (the model runs) or where its records' activations are stored
        (``stored_batch``; its texts are then None). Returns the block's states {(layer, measure):
        state}, permutation samples and timings."""
        t0 = time.perf_counter()
        plan = self.plan
        edges = block.get("edges") or {}        # bins calibrated by the driver's states (mi)
        calibration = block.get("calibration") or {}     # else the records that set them (mi)
        states = {(layer, m): measure_class(m)(self.widths[layer], plan.columns[m], device=self.device,
                                               **{**plan.measure_params.get(m, {}),
                                                  **({"edges": edges[(layer, m)]} if (layer, m) in edges
                                                     else calibration.get((layer, m), {}))})
                  for layer in plan.layers for m in plan.measures}
        samples = new_samples(plan, self.widths, self.device)
        act_bytes, parts = 0, []
        stores = block.get("store") or [[] for _ in block["batches"]]
        reads = block.get("read") or [None for _ in block["batches"]]
        for (ids, texts, n_symbols), y, store_to, read in zip(block["batches"], block["labels"], stores, reads):
            counts = dict(zip(ids, n_symbols))
            if read:                            # records whose activations are stored: read, not run
                batch = self.stored_batch(ids, read, counts)
            else:
                batch = forward_batch(self.adapter, self.ret, self.model, plan.layers, plan.dataset, ids, texts,
                                      counts)
                act_bytes += sum(x.numel() * x.element_size() for x in batch.acts.values())
            update_states(states, samples, batch, torch.from_numpy(np.array(y)), self.take)  # (a writable copy)
            for layer, folder, name, part, need in store_to:     # keep_activations: a part per batch
                need = np.asarray(need, bool)
                mask = None if need.all() else np.repeat(need, batch.n_symbols)
                rows = write_part_file(folder, name, plan.dtype, batch, batch.acts[layer], mask)
                parts.append((layer, name, part, rows, [r for r, k in zip(ids, need) if k]))
        if self.device.type != "cpu":
            states, samples = _to_cpu(states), _to_cpu(samples)
        return {"states": states, "samples": samples, "seconds": time.perf_counter() - t0,
                "activation_bytes": act_bytes, "parts": parts}


# -- the driver ------------------------------------------------------------------------------
class _RemoteEncoder:
    """What ensure_symbols needs of an adapter (tokenization, encode), answered by a live worker
    of ``engine`` on its ``encode`` thread. A worker found dead here is treated as one lost with a
    block (``RayEngine._lost``: out of the pool, a replacement requested), and when none is live the
    tokenising waits for a replacement to start. With ``actor``, that worker alone is asked (the
    answer is None when it died: lost as above)."""

    def __init__(self, engine, tokenization: str | None, actor=None):
        self.engine, self.tokenization, self.actor = engine, tokenization, actor

    def encode(self, texts):
        return self.ask("encode", list(texts))

    def ask(self, method: str, *args):
        """A live worker's answer to ``method(*args)``, on its ``encode`` thread."""
        engine, deaths = self.engine, 0
        while True:
            for actor in list(engine._live) if self.actor is None else [self.actor]:
                try:
                    return ray.get(getattr(actor, method).options(concurrency_group="encode").remote(*args))
                except _DIED:
                    deaths += 1
                    engine._lost(actor)
                    if self.actor is not None:
                        return None
                    if deaths > engine.max_redispatch:
                        raise DeepBaseError(f"{'tokenising' if method == 'encode' else method} failed on "
                                            f"{deaths} Ray workers (each died); giving up") from None
                except Exception as exc:
                    raise _unwrap(exc) from None
            if not engine._await_worker():
                raise engine._none_left("no live Ray worker could tokenise the records (every worker died)")


def _probe_address(address: str, timeout: float, source: str | None = None) -> None:
    """Fail fast (and clearly) when nothing listens at a 'host:port' or 'ray://host:port'
    address; ray.init itself retries for a minute or more. ``source``: where the address came
    from, when the user did not name it (``_environment_address``)."""
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port = hostport.rpartition(":")
    named = f"Ray address {address!r}" + (f" ({_SOURCES[source][0]})" if source else "")
    if not host or not port.isdigit():
        raise DeepBaseError(f"{named} is not of the form 'host:port', 'ray://host:port' or 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        if source:
            what, fix = _SOURCES[source]
            raise DeepBaseError(f"the Ray cluster at {address!r} ({what}) is unreachable ({exc}): {fix}, or pass "
                                f"ray_address explicitly ('local' for a Ray of this process alone)") from None
        raise DeepBaseError(f"Ray cluster at {address!r} is unreachable ({exc}); start one with "
                            f"`ray start --head` and pass its address, or leave ray_address unset "
                            f"for a local Ray") from None


_SOURCES = {          # where ray_address None or 'auto' found the address: (what names it, what to do)
    "RAY_ADDRESS": ("named by the RAY_ADDRESS environment variable", "start it, or correct or unset RAY_ADDRESS"),
    "ray start": ("the cluster the last `ray start` on this machine recorded",
                  "start it again (`ray start --head`), or, where it is gone for good, forget it with `ray stop`"),
}


def _environment_address() -> tuple[str | None, str | None]:
    """The cluster that ray_address None or 'auto' names by Ray's own rules, and where that name
    comes from: RAY_ADDRESS, else the cluster the last `ray start` on this machine recorded
    (Ray's ray_current_cluster file). (None, None) where neither names one: None then starts a
    local Ray, 'auto' takes any Ray running on this machine (Ray's legacy rule)."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != "auto":
        return (None, None) if env == "local" else (env, "RAY_ADDRESS")
    try:
        from ray._private.utils import read_ray_address
        recorded = read_ray_address()
    except Exception:                            # (another Ray version)
        recorded = None
    if recorded:
        return recorded, "ray start"
    return None, None


def _connection() -> tuple[str | None, str | None]:
    """(GCS address, Ray client server 'host:port') of the live connection this process holds;
    the client server is None unless connected through Ray client (ray://), and both are None
    for a Ray client connection whose server no longer answers (it dropped: connect() makes a
    new one)."""
    client = None
    try:
        from ray.util.client import ray as ray_client
        if ray_client.is_connected():
            worker = ray_client.get_context().client_worker
            if not worker.ping_server(timeout=5):
                return None, None
            client = worker._conn_str
    except Exception:                            # (no Ray client support, another Ray version)
        client = None
    try:
        current = ray.get_runtime_context().gcs_address
    except Exception:
        current = None
    return current, client


def _drop_stale_client() -> None:
    """Forget a Ray client connection that dropped: Ray refuses a new ray.init('ray://...') while
    the dead one is still held ('ray client is already connected')."""
    try:
        from ray.util.client import ray as ray_client
        if ray_client.get_context().client_worker is not None and not ray_client.is_connected():
            ray_client.disconnect()
    except Exception:
        pass


_DIED = ()  # filled below when ray is importable: errors after which a block is dispatched again
if ray is not None:
    _DIED = tuple(e for e in (getattr(rex, n, None) for n in (
        "RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
        "ObjectLostError", "OwnerDiedError", "ObjectReconstructionFailedError")) if e is not None)


def _unwrap(exc: Exception) -> Exception:
    """The deepbase_duck error a worker raised, out of Ray's wrappers."""
    cause = exc
    for _ in range(4):
        inner = getattr(cause, "cause", None)
        if inner is None or inner is cause:
            break
        cause = inner
    if isinstance(cause, DeepBaseError):
        return cause
    text = str(exc)
    if "ModuleNotFoundError" in text and "deepbase_duck" in text:
        return DeepBaseError("Ray workers cannot import deepbase_duck: install deepbase-duck (with the same "
                             "version) in every node's Python environment, or pass a runtime_env")
    if cause is not exc and isinstance(cause, Exception) and not isinstance(cause, rex.RayError):
        # the worker's own exception object (unpickled): raised as the local engine raises it, of
        # its own type, with a note saying where it came from and the worker's traceback
        where = getattr(exc, "pid", None)
        note = (f"raised on a Ray worker{f' (pid {where})' if where else ''}; the worker's traceback:\n"
                + re.sub(r"\x1b\[[0-9;]*m", "", str(getattr(exc, "traceback_str", "") or text)).rstrip())
        if note not in (getattr(cause, "__notes__", None) or []):
            cause.add_note(note)
        return cause
    for line in text.splitlines()[::-1]:        # Ray's text of an error in a worker ends with it
        if "DeepBaseError:" in line or "Error: model " in line:
            return DeepBaseError(line.split("Error: ", 1)[-1].strip())
    return DeepBaseError(f"Ray worker failed: {type(cause).__name__}: {str(cause)[-2000:]}")


class _Held:
    """A block's error (its labels, tokens or forward pass failed), kept with the block's place in
    the scan and raised when the scan merges the block."""
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


class RayEngine:
    """Runs a plan on a Ray cluster (see the module docstring).

    address: None (RAY_ADDRESS, or else a new local Ray; an initialised ray is reused), 'auto'
        (the cluster RAY_ADDRESS names, else the one the last `ray start` on this machine recorded,
        else any running on it: Ray's rules; a connection to another Ray, e.g. one 'local'
        started, is left for it), 'local' (a Ray of this process alone, as
        Ray's own 'local': RAY_ADDRESS and running clusters ignored; the one this process started,
        by an earlier query or ray.init(), is reused, a connection to a cluster is left for a new
        one) or 'host:port' / 'ray://host:port'.
    num_workers: actors to start (default: as many as the cluster's free CPUs, or GPUs, allow).
    num_gpus: GPU share per actor (default 1 when the cluster has GPUs, else 0); fractional values
        put several actors on one GPU.
    num_cpus: CPUs per actor (its torch threads); block_batches: forward batches per block of a
        full scan (a progressive scan's block is one window); inflight: blocks queued per actor.
    ahead: how far past the next block to merge (in blocks) the driver may dispatch; default two
        rounds of every worker's queue (2 * inflight * workers). Blocks merge in order, so a slow
        block would otherwise let the others run on without limit: finished states waiting in the
        driver's memory, records tokenised (and models run) beyond where an early stop lands.
    runtime_env: Ray runtime_env of the actors (e.g. env_vars PYTHONPATH for a loader module).
    keep_workers: keep the actors (model loaded) for the next query of the same model in this
        process, as a Spark session keeps its executors; one pool is kept at a time, and a query
        of another model releases it. ``release_workers()`` frees them at once.
    startup_timeout: seconds to wait for workers to start (and for replacements of dead ones);
    block_timeout: seconds a running block may take before the query fails (None: no limit; a
        block whose worker died is dispatched again whatever the limit).
    """

    name = "ray"
    mixes_stored = True         # reads the stored activations of the records they cover, runs the rest

    def __init__(self, address: str | None = None, num_workers: int | None = None, num_gpus: float | None = None,
                 num_cpus: float = 1, block_batches: int = 4, inflight: int = 2, runtime_env: dict | None = None,
                 connect_timeout: float = 10.0, startup_timeout: float = 120.0, max_redispatch: int = 3,
                 keep_workers: bool = True, ahead: int | None = None, block_timeout: float | None = None):
        if ray is None:
            raise DeepBaseError("engine='ray' needs the ray package: pip install 'deepbase-duck[ray]'")
        if block_batches < 1 or inflight < 1:
            raise DeepBaseError(f"block_batches and inflight must be >= 1, got {block_batches}, {inflight}")
        if ahead is not None and int(ahead) < 1:
            raise DeepBaseError(f"ahead must be >= 1 block, got {ahead}")
        if num_workers is not None and int(num_workers) < 1:
            raise DeepBaseError(f"num_workers must be >= 1, got {num_workers}")
        self.address, self.num_workers, self.num_gpus, self.num_cpus = address, num_workers, num_gpus, num_cpus
        self.block_batches, self.inflight, self.runtime_env = int(block_batches), int(inflight), runtime_env
        self.connect_timeout, self.startup_timeout = connect_timeout, startup_timeout
        self.block_timeout = block_timeout          # None: a block may take as long as it takes
        self.max_redispatch = max_redispatch
        self.keep_workers = bool(keep_workers)
        self.ahead = None if ahead is None else int(ahead)
        self.stats: dict = {}
        self.stored_unseen = None                   # the activation folder, where the workers could not read it
        self._files = None                          # the files of the store's folder its workers must see
        self._probe = None                          # (a file the driver put there: keep_activations)
        self._sees = {}                             # actor -> whether it reads them (RayEngine._ask_sees)

    # -- connecting and starting workers ----------------------------------------------------
    def connect(self) -> None:
        """Connect this process to the cluster at ``address``, reusing the connection it holds when
        that is the one asked for: a new connection releases the kept workers and restarts Ray, so
        'local' reuses the Ray this process started (it restarted Ray, and lost the kept workers,
        on every query). The connection held is the one asked for when the address names the same
        host (by what it resolves to: this machine by any of its names) and port (``_same_address``):
        a Ray this process started, asked for by another name, was shut down and then connected to
        (a hang). A Ray client connection that dropped is made again."""
        addr = self.address
        # 'auto' and None name a cluster through RAY_ADDRESS or the last `ray start` (Ray's rules):
        # 'auto' is reconnected to it from another Ray (e.g. one 'local' started), None reuses any
        target, source = (None, None) if addr == "local" else \
            (addr, None) if addr not in (None, "auto") else _environment_address()
        live = ray.is_initialized()
        if live:
            current, client = _connection()
            if current is not None or client is not None:      # (else a Ray client connection that dropped)
                if addr is None or (addr == "local" and _started_here(current)) \
                        or (addr == "auto" and target is None) \
                        or (target is not None and _same_address(target, current, client)):
                    return
        if target is not None:
            _probe_address(target, self.connect_timeout, source)   # before leaving a working connection
        release_workers()                        # the kept workers of the connection left behind
        if live:
            ray.shutdown()
        _drop_stale_client()
        try:
            ray.init(address=addr, logging_level="WARNING", log_to_driver=False,
                     ignore_reinit_error=True, include_dashboard=False)
        except Exception as exc:                 # (Ray raises ConnectionError, ValueError, bare Exception)
            named = f"{target!r} ({_SOURCES[source][0]})" if source else repr(target if target is not None else addr)
            raise DeepBaseError(f"cannot connect to the Ray cluster at {named}: {type(exc).__name__}: {exc}") \
                from None
        if addr == "local":
            _STARTED.add(ray.get_runtime_context().gcs_address)

    def _start(self, model, loader, params, checksum, plan, widths):
        """Live actors configured for ``plan``: the kept pool of this model when there is one, else
        new ones (a kept pool of another model is released first, freeing its CPUs/GPUs)."""
        global _POOL
        env = dict(self.runtime_env or {})
        env["env_vars"] = {"OMP_NUM_THREADS": str(max(1, int(self.num_cpus))), **env.get("env_vars", {})}
        free = ray.available_resources()
        key = (_cluster_id(), model, loader, json.dumps(params, sort_keys=True), checksum, self.num_cpus,
               self.num_gpus, self.num_workers, json.dumps(env, sort_keys=True, default=str))
        worker_plan = dataclasses.replace(plan, record_ids=np.zeros(0, np.int64), hypotheses=[], device="cpu")
        self._configure = lambda a: a.configure.remote(worker_plan, widths)
        self._reused = _POOL is not None and _POOL[0] == key
        if self._reused:
            actors, gpus, self._spawn = _POOL[1], _POOL[2], _POOL[3]
            _POOL = None
        else:
            if _POOL is not None:                 # free the kept pool's CPUs/GPUs (ray.kill is asynchronous)
                # (only its started actors hold any: a replacement still waiting for room holds none;
                # a pool of another cluster, the one Ray was connected to before, holds none here)
                same = _POOL[0][0] == key[0]
                held = {"CPU": _POOL[4] * _POOL[0][5] * same, "GPU": _POOL[4] * (_POOL[2] or 0) * same}
                release_workers()
                deadline = time.time() + 15
                while time.time() < deadline and any(
                        ray.available_resources().get(r, 0) < free.get(r, 0) + v - 1e-6 for r, v in held.items()):
                    time.sleep(0.05)
            free = ray.available_resources()
            gpus = self.num_gpus if self.num_gpus is not None else (1 if free.get("GPU", 0) >= 1 else 0)
            if self.num_workers is not None:
                n = int(self.num_workers)
            else:
                what, per = ("GPU", gpus) if gpus else ("CPU", self.num_cpus)
                n = int(free.get(what, 0) // per)
                deadline = time.time() + 15
                while n < 1 and time.time() - _KILLED_AT < 30 and time.time() < deadline:
                    time.sleep(0.05)              # workers this process killed are still releasing theirs
                    free = ray.available_resources()
                    n = int(free.get(what, 0) // per)
                if n < 1:
                    total = ray.cluster_resources().get(what, 0)
                    raise DeepBaseError(
                        f"the Ray cluster has no free {what} for a worker ({free.get(what, 0):g} of {total:g} "
                        f"free, {per:g} needed): other drivers hold them (deepbase-duck keeps its workers between "
                        f"queries until release_workers() or exit); free some, add nodes, or pass num_workers")
            # an 'encode' thread tokenises beside run_block, which stays serial (the default group)
            cls = ray.remote(concurrency_groups={"encode": 1})(BlockWorker).options(
                num_cpus=self.num_cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0,
                scheduling_strategy="SPREAD", runtime_env=env)
            args = (model, loader, params, checksum, max(1, int(self.num_cpus)))
            self._spawn = lambda: cls.remote(*args)
            actors = [self._spawn() for _ in range(n)]
        try:
            ready = {self._configure(a): a for a in actors}
            self._pending_start = {}
            if self._reused:
                # the kept actors that were live answer at once; one that was still starting when the
                # last query ended (a replacement) may take longer: it joins the scan once it is up,
                # as a replacement does (RayEngine._scan), instead of holding the query back
                done, waiting = ray.wait(list(ready), num_returns=len(ready), timeout=min(2.0, self.startup_timeout))
                if not done and waiting:
                    more, waiting = ray.wait(waiting, num_returns=1, timeout=self.startup_timeout)
                    done = done + more
                self._pending_start = {ref: ready[ref] for ref in waiting}
                waiting = []
            else:
                done, waiting = ray.wait(list(ready), num_returns=len(ready), timeout=self.startup_timeout)
            live = []
            for ref in done:
                try:
                    ray.get(ref)
                    live.append(ready[ref])
                except _DIED as exc:
                    if "DeepBaseError" in str(exc) or "ModuleNotFoundError" in str(exc):
                        _kill(actors)
                        raise _unwrap(exc) from None
                    ray.kill(ready[ref])              # a kept actor that died meanwhile
                except Exception as exc:
                    _kill(actors)
                    raise _unwrap(exc) from None
            _kill([ready[ref] for ref in waiting])    # never started (no room): not used
            if not live:
                _kill(list(self._pending_start.values()))
                raise DeepBaseError(f"no Ray worker started within {self.startup_timeout:.0f} s (free resources: "
                                    f"{free}); lower num_cpus/num_gpus or add nodes")
        except BaseException:
            # interrupted while they started (Ctrl-C in ray.wait): none left behind holding CPUs/GPUs
            # (no kept pool names them any more)
            _kill(actors)
            raise
        self._key = key
        return live, gpus

    # -- losing and replacing workers (a block's or a tokenisation's worker died) ---------------
    def _lost(self, actor) -> None:
        """``actor`` died: out of the live pool, and a replacement is requested (it joins when up)."""
        if actor in self._live:
            self._live.remove(actor)
            new = self._spawn()
            self._extra.append(new)
            self._starting[self._configure(new)] = new

    def _join(self, ref) -> bool:
        """A starting actor's configure call ``ref`` finished: the actor joins the live pool, or
        (it died starting) is dropped. True when it joined."""
        actor = self._starting.pop(ref)
        try:
            ray.get(ref)
        except _DIED as exc:
            # (why it could not start, e.g. its node lacks the model's files: told if no worker is left)
            self._start_failure = _unwrap(exc) if "DeepBaseError" in str(exc) or "ModuleNotFoundError" in str(exc) \
                else self._start_failure
            return False
        self._live.append(actor)
        if self._files:                         # (it may run on a node that does not see them)
            self._ask_sees(actor)
        return True

    def _ask_sees(self, actor) -> None:
        """Ask ``actor`` whether it reads the stored parts the scan reads on its workers: the
        blocks that read them go only to the workers that do (nodes may differ in whether they
        mount the store's activation folder), the others run the model's blocks."""
        self._sees[actor] = bool(_RemoteEncoder(self, None, actor).ask("sees", self._files))

    def _none_left(self, what: str) -> DeepBaseError:
        """The error of a scan left without a live worker: ``what``, and why the last replacement
        could not start where a worker said so."""
        why = getattr(self, "_start_failure", None)
        return DeepBaseError(what if why is None else f"{what}; a replacement failed to start: {why}")

    def _await_worker(self) -> bool:
        """Wait for a starting actor while none is live; False when none is live or starting."""
        while not self._live:
            if not self._starting:
                return False
            done, _ = ray.wait(list(self._starting), num_returns=1, timeout=self.startup_timeout)
            if not done:
                raise DeepBaseError(f"no Ray worker started within {self.startup_timeout:.0f} s")
            for ref in done:
                self._join(ref)
        return True

    # -- the run ------------------------------------------------------------------------------
    def run(self, session, plan: Plan, progress=None, resume: dict | None = None) -> dict:
        """Scan ``plan`` on the cluster. ``resume``: an earlier run of this progressive plan to go
        on from (``LocalEngine.run``; ``stop_together`` in engine/inspect.py)."""
        t_start = time.perf_counter()
        row = store.q_one(session.con, "SELECT loader, params, checksum, tokenization FROM models WHERE name = ?",
                          [plan.model])
        session.model_row(plan.model)                       # unknown model: the usual error
        loader, params, checksum, tokenization = row
        # (with keep_activations too: the local engine stores nothing where every record is stored)
        if resume is not None:
            local = resume["scan"]["engine"] == "local"
        else:
            _, covered = stored_reads(session, plan, checksum, tokenization)
            local = len(covered) > 0 and len(covered) == len(np.unique(plan.record_ids))
        if local:
            out = LocalEngine().run(session, plan, progress, resume)   # nothing to run: scan the stored parts here
            out["engine"] = "local (stored activations)"
            return out
        if not loader:
            raise DeepBaseError(f"model {plan.model!r} was registered from a live Python object, which the Ray "
                                "engine does not ship to workers; register it with a loader spec "
                                "('package.module:function' + params) to run it on Ray")
        self.connect()
        widths = session.stored_widths(plan.model)
        t0 = time.perf_counter()
        actors, gpus = self._start(plan.model, loader, json.loads(params or "{}"), checksum, plan, widths)
        self._gpus = gpus
        startup = time.perf_counter() - t0
        # _live: the actors serving blocks now; _starting: configure ref -> an actor still starting
        # (a replacement of a lost one, or a kept one not up yet); _extra: the replacements
        self._extra, self._live, self._starting = [], list(actors), dict(self._pending_start)
        self._start_failure = None
        self._files, self._sees, self._probe = None, {}, None
        every = lambda: list(dict.fromkeys(actors + list(self._pending_start.values()) + self._extra))  # noqa: E731
        ok = False
        try:
            result = self._scan(session, plan, progress, actors, tokenization, checksum, widths, resume)
            ok = True
        finally:
            global _POOL
            if self._probe is not None:
                self._probe.unlink(missing_ok=True)
            if ok and self.keep_workers and (self._live or self._starting):
                # the pool keeps its size: a replacement still starting joins it (the next query
                # takes it in once it is up)
                kept = self._live + [a for a in self._starting.values() if a not in self._live]
                _kill([a for a in every() if a not in kept])
                _POOL = (self._key, kept, self._gpus, self._spawn, len(self._live))
            else:
                _kill(every())
        result["engine"] = "ray"
        result["engine_info"] = {"ray_workers": len(actors), "ray_gpus_per_worker": gpus,
                                 "ray_blocks": self.stats["blocks"], "ray_blocks_merged": self.stats["merged"],
                                 "ray_redispatched": self.stats["redispatched"],
                                 "ray_blocks_dispatched": self.stats["dispatched"], "ray_ahead": self.stats["ahead"],
                                 "ray_startup_s": round(startup, 3), "ray_workers_reused": self._reused,
                                 "ray_total_s": round(time.perf_counter() - t_start, 3)}
        if self.stored_unseen:          # stored activations the workers could not read: the model ran
            result["engine_info"]["ray_stored_unseen"] = self.stored_unseen
        elif self._sees and not all(self._sees.values()):    # read by some workers, the others ran the model
            result["engine_info"]["ray_workers_not_seeing_stored"] = sum(not v for v in self._sees.values())
        return result

    def _scan(self, session, plan: Plan, progress, actors, tokenization, checksum, widths, resume=None) -> dict:
        progressive = plan.progressive
        encoder = _RemoteEncoder(self, tokenization)
        scan = resume["scan"] if resume is not None else None
        start = scan["windows"] if scan is not None else 0      # blocks (windows) merged before
        # records whose activations are stored (a dataset grown since its extraction): the workers
        # read them from the stored parts, the model runs for the rest (as LocalEngine.run)
        if scan is None:
            behaviors, covered = stored_reads(session, plan, checksum, tokenization)
            where = _stored_where(session, plan, behaviors, covered) if len(covered) else {}
            self.stored_unseen = None
        else:
            behaviors, covered, missing = scan["behaviors"], scan["covered"], scan["missing"]
            where = _stored_where(session, plan, behaviors, covered) if len(covered) else {}
            self.stored_unseen = scan.get("stored_unseen")
        if plan.keep_activations:
            # the workers write the parts into the store's activation folder, and the driver lists
            # them: a worker that does not see the folder would write them where the store never
            # finds them (a file the driver puts there tells the workers that see it)
            session.act_root.mkdir(parents=True, exist_ok=True)
            self._probe = session.act_root / f".ray-sees-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
            self._probe.touch()
        if where or self._probe is not None:
            # every worker is asked whether it sees the stored parts (a kept one still starting,
            # or a replacement, when it joins: _join): nodes may differ in whether they mount the
            # store's activation folder, and the blocks that read or write there go to those that do
            self._files = sorted({f for w in where.values() for f in w.values()}
                                 | ({str(self._probe)} if self._probe is not None else set()))
            for a in list(self._live):
                self._ask_sees(a)
            if self._probe is not None and not any(self._sees.get(a) for a in self._live):
                raise DeepBaseError(f"keep_activations: the Ray workers write the activations into the store's "
                                    f"activation folder {session.act_root}, and no worker sees it: make it a path "
                                    f"every node sees (a shared file system), or run without keep_activations")
            if scan is None and not any(self._sees.get(a) for a in self._live):
                # no worker sees the store's activation folder: the model runs for every record,
                # as it does where nothing is stored (a resumed scan read them: it goes on so)
                self.stored_unseen = str(session.act_root)
                behaviors, covered, where, self._files = {}, np.empty(0, np.int64), {}, None
        if scan is None:
            missing = np.setdiff1d(np.unique(plan.record_ids), covered)
            plan.source = "stored+model" if len(covered) else "model"
        if plan.control and scan is None:  # class frequencies read every selected record's symbols
            counts = ensure_symbols(session, encoder, plan.dataset, plan.record_ids)
            plan.control_freq = class_frequencies(session, plan, tokenization)
        else:                              # the others: tokenised block by block (payload below)
            counts = stored_symbol_counts(session, plan.dataset, tokenization)
        # a full scan's mi bins: from every row of the records mi_calibration_records chooses,
        # scanned first (the states buffer until those rows have come), as the local engine's
        calibration = {}
        if scan is None and engine_sets_mi_bins(plan):
            chosen, total = mi_calibration_records(session, plan, tokenization, lambda: encoder)
            if total:
                calibration = {"calibration_records": chosen, "calibration_rows": total}
                counts.update(stored_symbol_counts(session, plan.dataset, tokenization))
        symbols = SymbolWriter(session, tokenization, plan.dataset, counts)
        stored = set(int(r) for r in covered)
        reads_of = {}                              # (block, batch) -> where its records are stored
        if progressive:
            batches, windows = seeded_windows(session, plan)
            blocks, lo = [], 0
            for w in windows:                      # one block per window
                blk = []
                for ids in batches[lo:lo + w]:
                    if stored:                     # its stored records read, then the model's (_mixed)
                        kept, ids = stored_halves(ids, stored)
                        if kept:
                            reads_of[(len(blocks), len(blk))] = _reads(where, kept)
                            blk.append(kept)
                    if ids:
                        blk.append(ids)
                blocks.append(blk)
                lo += w
        else:
            groups = [plan.record_ids]
            if calibration:                        # mi's calibration records first (mi_calibration)
                first = calibration["calibration_records"]
                groups = [np.asarray(first, np.int64), np.setdiff1d(np.unique(plan.record_ids), first)]
            batches, read_at = [], {}
            for g in groups:
                if stored:                         # stored records part by part, then the model's batches
                    for ids in _stored_batches(session, plan, behaviors, np.intersect1d(g, covered)):
                        read_at[len(batches)] = _reads(where, ids)
                        batches.append(ids)
                    g = np.setdiff1d(g, covered)
                if len(g):
                    batches += plan_batches(session, plan.dataset, g, plan.batch_size)
            blocks = [batches[i:i + self.block_batches] for i in range(0, len(batches), self.block_batches)]
            reads_of = {divmod(k, self.block_batches): r for k, r in read_at.items()}
        labels = LabelStream(session, plan, tokenization, counts,
                             [r for blk in blocks[start:] for ids in blk for r in ids])
        keep = parts_of = None
        if plan.keep_activations:
            # workers write each batch's part to the shared activation folder, staged (hidden from
            # the views; a re-run block rewrites the same file); the driver commits and publishes it
            # when it merges the block, so the catalog never lists a part twice or one of an
            # unmerged block (engine/extract.py: the write protocol)
            # (only the records the model runs for: those read from storage may come from another
            # dtype's parts, float16, whose rounded values a float32 behavior would hold as the model's)
            keep = KeepActivations(session, plan, checksum, tokenization, widths, computed=missing)
            base = {l: int(store.q_scalar(session.con, "SELECT coalesce(max(part), 0) + 1 FROM behavior_parts "
                                                       "WHERE behavior_id = ?", [b["behavior_id"]]))
                    for l, b in keep.behaviors.items()}
            parts_of, j = [], 0
            for blk in blocks:
                per = []
                for ids in blk:
                    todo = []
                    for layer, b in keep.behaviors.items():
                        need = np.isin(np.asarray(ids), keep.missing[layer])
                        if need.any():
                            todo.append((layer, str(session.act_root / b["directory"]),
                                         f"part-{base[layer] + j:06d}.parquet", base[layer] + j, need.tolist()))
                    per.append(todo)
                    j += 1
                parts_of.append(per)
        make = lambda layer, m: measure_class(m)(widths[layer], plan.columns[m], device="cpu",  # noqa: E731
                                                 **{**plan.measure_params.get(m, {}),
                                                    **(calibration if m == "mi" else {})})
        if scan is None:
            states = {(layer, m): make(layer, m) for layer in plan.layers for m in plan.measures}
            samples = new_samples(plan, widths, "cpu")
            window_scores = {k: [] for k in states}
        else:                                      # going on from an earlier run's merged windows
            states, samples, window_scores = resume["states"], resume["samples"], resume["window_scores"]
        ahead = self.ahead or 2 * self.inflight * max(1, len(self._live))
        stats = self.stats = {"blocks": len(blocks), "merged": start, "redispatched": 0, "dispatched": start,
                              "ahead": ahead, "block_seconds": [],
                              "state_bytes": [], "activation_bytes": [], "combine_seconds": 0.0,
                              "label_seconds": 0.0, "roundtrip_seconds": []}

        payloads = {}
        if scan is None:
            # (a progressive scan counts its labels: min_support, and the hypotheses not met yet)
            support = LabelSupport(plan.label_columns) if plan.min_support or plan.progressive else None
        else:
            support = scan["support"]
        block_support = {}                         # block -> the support of its labels, merged with it

        def payload(i):
            """Block ``i``'s payload (put in the object store), or a _Held error: its records'
            tokenising or labelling failed, raised only if the scan merges the block."""
            if i not in payloads:
                t = time.perf_counter()
                try:
                    payloads[i] = prepare(i)
                except Exception as exc:
                    # (the labels the stream stored stay consistent: LabelStream writes a
                    # hypothesis' spans of a record with its labeled_records mark, in one
                    # transaction, so the labels of a block never merged, or one whose labelling
                    # failed part-way, are whole and reused by the next query)
                    payloads[i] = _Held(exc)
                stats["label_seconds"] += time.perf_counter() - t
            return payloads[i]

        def prepare(i):
            part = []
            ys = []
            if support is not None:
                block_support[i] = LabelSupport(plan.label_columns)
            batches_i = list(batches_with_texts(session, plan.dataset, blocks[i]))
            new = list(dict.fromkeys(int(r) for ids, _ in batches_i for r in ids if int(r) not in counts))
            if new:                            # this block's records met for the first time
                text_of = {int(r): t for _, texts in batches_i for r, t in texts.items()}
                symbols.add(new, encoder.encode([text_of[r] for r in new]))
                symbols.flush()                # the labels below read their character ranges
            read = [reads_of.get((i, j)) for j in range(len(batches_i))]
            for (ids, texts), rd in zip(batches_i, read):
                part.append(([int(r) for r in ids], None if rd else [texts[r] for r in ids],
                             [int(counts[r]) for r in ids]))
                ys.append(labels.next(ids, texts=[texts[r] for r in ids]).numpy())
                if support is not None:
                    block_support[i].add(ys[-1], ids, [counts[r] for r in ids])
            return ray.put({"batches": part, "labels": ys, "read": read if any(read) else None,
                            "store": parts_of[i] if parts_of is not None else None,
                            "edges": {k: st.edges.cpu().numpy() for k, st in states.items()
                                      if getattr(st, "edges", None) is not None
                                      and hasattr(st, "empty_like")},
                            "calibration": {k: calibration for k, st in states.items()
                                            if calibration and k[1] == "mi" and st.edges is None}})

        show = session.progress if progress is None else progress
        bar = progress_bar(len(plan.record_ids), f"inspect {plan.model} (ray)", "rec", show)
        pending = collections.deque(range(start, len(blocks)))
        live = self._live                          # the actors alive now (kept for the next query)
        load = collections.Counter()               # blocks queued per actor
        starting = self._starting                  # ready ref -> replacement actor
        in_flight = {}                             # ref -> (block, actor, submitted at)
        tries = collections.Counter()
        results, next_merge, used = {}, start, list(scan["used"]) if scan is not None else []
        # an error of a block (its labels, tokens or forward pass) is held with the block's result
        # and raised when the scan merges that block, as the local engine raises when its scan
        # reaches the record; a scan that stops before it succeeds. No block past it is dispatched
        # (the scan either stops before it or fails there).
        failed_at = len(blocks)
        # the blocks that read stored parts or write parts (keep_activations): only on workers that see them
        reading = {i for i, _ in reads_of} | {i for i, per in enumerate(parts_of or []) if any(per)} \
            if self._files else set()

        def runnable(a, limit):
            """The place in ``pending`` of the first block below ``limit`` that worker ``a`` can run
            (a block reading stored activations: only where ``a`` sees them), or None."""
            for k, i in enumerate(pending):
                if i >= limit:
                    return None
                if i not in reading or self._sees.get(a):
                    return k
            return None

        stopped, rule, stop = False, None, scan["stop"] if scan is not None else StopRule(plan)
        bar.update(len(used))
        calibrating = uncalibrated(states)
        try:
            while next_merge < len(blocks) and not stopped:
                for a in list(live):                # keep every live worker busy
                    # a re-dispatched block comes first and is always below the window's end
                    # states still calibrating their bins (mi): one block at a time, merged first
                    while a in live and pending and load[a] < self.inflight:
                        limit = min(failed_at, next_merge + (1 if calibrating and not in_flight else
                                                             0 if calibrating else ahead))
                        k = runnable(a, limit)
                        if k is None:
                            break
                        i = pending[k]
                        del pending[k]
                        stats["dispatched"] = max(stats["dispatched"], i + 1)
                        load_i = payload(i)
                        if isinstance(load_i, _Held):
                            results[i] = load_i
                            failed_at = min(failed_at, i)
                            continue
                        if a not in live:           # found dead while tokenising this block's records
                            pending.insert(k, i)
                            break
                        ref = a.run_block.remote(load_i)
                        in_flight[ref] = (i, a, time.perf_counter())
                        load[a] += 1
                if next_merge not in results:
                    if not in_flight and not starting:
                        if live and pending and pending[0] in reading and not any(self._sees.get(a) for a in live):
                            raise DeepBaseError(
                                f"block {pending[0]} reads or writes activations under {session.act_root}, and no "
                                f"live Ray worker sees that folder (those that did died; their replacements run "
                                f"on nodes without it): make it a path every node sees (a shared file system), "
                                f"or run the query again (where no worker sees it, the model runs for every record)")
                        if live and pending:        # a replacement joined while tokenising: use it
                            continue
                        raise self._none_left("every Ray worker died and no replacement could start")
                    # startup_timeout bounds a wait for replacement workers only; a running block is
                    # bounded by block_timeout (a dead worker's block fails in ray.get, not here)
                    limit = self.startup_timeout if not in_flight else self.block_timeout
                    done, _ = ray.wait(list(in_flight) + list(starting), num_returns=1, timeout=limit)
                    if not done:
                        what = "Ray worker started" if not in_flight else "Ray block finished"
                        raise DeepBaseError(f"no {what} within {limit:.0f} s")
                    for ref in done:
                        if ref in starting:         # a replacement worker is up (or failed to start)
                            self._join(ref)
                            continue
                        i, a, t_sub = in_flight.pop(ref)
                        load[a] = max(0, load[a] - 1)
                        try:
                            res = ray.get(ref)
                        except _DIED:
                            tries[i] += 1
                            if tries[i] > self.max_redispatch:
                                raise DeepBaseError(f"block {i} failed on {tries[i]} Ray workers; giving up") from None
                            stats["redispatched"] += 1
                            pending.appendleft(i)
                            if len(pending) > 1 and pending[0] > pending[1]:   # kept in block order
                                in_order = sorted(pending)
                                pending.clear()
                                pending.extend(in_order)
                            self._lost(a)
                            continue
                        except Exception as exc:    # the forward pass raised: held with the block
                            results[i] = _Held(_unwrap(exc))
                            failed_at = min(failed_at, i)
                            continue
                        stats["roundtrip_seconds"].append(time.perf_counter() - t_sub)
                        stats["block_seconds"].append(res["seconds"])
                        stats["activation_bytes"].append(res["activation_bytes"])
                        results[i] = res
                while next_merge in results and not stopped:   # merge in block order
                    res = results.pop(next_merge)
                    payloads.pop(next_merge, None)
                    if isinstance(res, _Held):       # the scan reached a block that failed
                        raise res.exc
                    t = time.perf_counter()
                    if len(stats["state_bytes"]) < 3:                # a sample: pickling costs time
                        stats["state_bytes"].append(len(_pickled(res["states"])))
                    for k, st in res["states"].items():
                        if progressive:
                            window_scores[k].append(_score_matrix(st))
                        states[k].combine(st)
                    for layer, smp in res["samples"].items():
                        samples[layer].merge(smp)
                    if keep is not None and res["parts"]:
                        commit_parts(session, [(keep.behaviors[layer], name, part, rows, np.asarray(recs, np.int64))
                                               for layer, name, part, rows, recs in res["parts"]])
                    stats["combine_seconds"] += time.perf_counter() - t
                    ids = [r for ids in blocks[next_merge] for r in ids]
                    used.extend(ids)
                    bar.update(len(ids))
                    next_merge += 1
                    stats["merged"] = next_merge
                    if support is not None:
                        support.merge(block_support.pop(next_merge - 1))
                    if progressive:                  # the local engine's stop rules, per merged block
                        rule = stop.check(states, window_scores, support and support.support())
                        stopped = rule is not None
                    calibrating = calibrating and uncalibrated(states)
        finally:
            bar.close()
            labels.close(failed=sys.exc_info()[0] is not None)
            symbols.close(failed=sys.exc_info()[0] is not None)
            for ref in in_flight:                   # stop what is queued or running (a worker still
                try:                                # starting is left to start: it joins the pool)
                    ray.cancel(ref, force=False)
                except Exception:
                    pass
            if keep is not None:
                # parts of blocks that were not merged are not in the catalog: once no worker can
                # still write one, delete them (staged files the views do not read, but disk used)
                if in_flight:
                    ray.wait(list(in_flight), num_returns=len(in_flight), timeout=60)
                for b in keep.behaviors.values():
                    cleanup_orphans(session, b)
                # as a failed extract: no behavior row without a stored part (also after a success: a
                # progressive scan may stop before the model runs once)
                drop_unstored_behaviors(session, keep.behaviors.values())
        used = sorted(set(used))
        n_symbols = int(sum(counts[r] for r in used))
        if n_symbols == 0:
            raise EmptyDatasetError(f"the selected records of dataset {plan.dataset!r} hold no symbols")
        take = {m: torch.as_tensor([[c["name"] for c in plan.label_columns].index(c["name"]) for c in plan.columns[m]])
                for m in plan.measures}
        return {"states": states, "n_symbols": n_symbols, "samples": samples, "take": take,
                "records_used": len(used), "stopped_early": stopped, "stop_rule": rule,
                "bound": stop.bound if progressive else None, "window_scores": window_scores if progressive else None,
                "rare": stop.rare if plan.min_support else None,
                "windows": next_merge if progressive else None,
                "scan": {"engine": "ray", "windows": next_merge, "support": support, "used": used, "stop": stop,
                         "behaviors": behaviors, "covered": covered, "missing": missing,
                         "stored_unseen": self.stored_unseen} if progressive else None,
                "used_ids": used,
                "reused": {"activation_records_read": int(len(np.intersect1d(covered, used))),
                           "activation_records_computed": int(len(np.intersect1d(missing, used)))}}


def _stored_where(session, plan: Plan, behaviors: dict, covered) -> dict:
    """{layer: {record: its stored part file}} of the ``covered`` records (stored_coverage)."""
    where = {}
    for ids, files in stored_part_blocks(session, plan, behaviors, covered):
        for layer, f in files.items():
            where.setdefault(layer, {}).update(dict.fromkeys((int(r) for r in ids), str(f)))
    return where


def _stored_batches(session, plan: Plan, behaviors: dict, ids) -> list[list[int]]:
    """The records ``ids`` in batches of their stored parts (the first layer's), in part order:
    what the local engine reads part by part."""
    if not len(ids):
        return []
    first = plan.layers[0]
    return [[int(r) for r in rec] for rec, files in stored_part_blocks(session, plan, behaviors, ids)
            if first in files]


def _reads(where: dict, ids: list[int]) -> dict:
    """Where a worker reads the stored rows of records ``ids``: {layer: [(part file, its records)]}."""
    out = {}
    for layer, w in where.items():
        per = {}
        for r in ids:
            per.setdefault(w[int(r)], []).append(int(r))
        out[layer] = list(per.items())
    return out


_POOL = None      # (key, actors, gpus per actor, spawn): the workers kept for the next query


def release_workers() -> None:
    """Kill the Ray workers kept for the next query (their CPUs/GPUs return to the cluster)."""
    global _POOL
    if _POOL is not None:
        _kill(_POOL[1])
        _POOL = None


_KILLED_AT = 0.0      # when this process last killed workers: ray.kill frees their CPUs/GPUs later


def _kill(actors) -> None:
    global _KILLED_AT
    for a in actors:
        try:
            ray.kill(a)
        except Exception:
            pass
    if actors:
        _KILLED_AT = time.time()


_STARTED = set()     # the GCS addresses of the local Rays connect() started for ray_address='local'


def _started_here(current: str | None) -> bool:
    """Whether the Ray this process is connected to (GCS at ``current``) was started by this
    process rather than joined: ray_address='local' reuses it. Ray says so only privately (the
    driver's node is then the head): the Rays connect() started are recorded too."""
    if current is not None and current in _STARTED:
        return True
    try:
        from ray._private import worker
        node = worker._global_node
        return bool(node is not None and node.head)
    except Exception:                            # (another Ray version, client mode)
        return False


def _cluster_id() -> str:
    """The cluster and this process's connection to it (its job): a pool kept on a connection that
    was shut down (ray.shutdown() and ray.init() again, a Ray client that reconnected) is not
    reused, since Ray killed its actors with the job that started them."""
    ctx = ray.get_runtime_context()
    try:
        return f"{ctx.gcs_address} job {ctx.get_job_id()}"
    except Exception:
        return str(ctx.get_job_id())


def _pickled(obj) -> bytes:
    import pickle
    return pickle.dumps(obj, protocol=5)


def _same_address(wanted: str, current: str | None, client: str | None = None) -> bool:
    """Whether ``wanted`` ('host:port' of a GCS, or 'ray://host:port' of a Ray client server)
    names the connection this process holds: its GCS at ``current`` and, through Ray client, the
    client server ``client`` (a 'ray://' address names a client server, never a GCS, and a GCS
    address a native connection, the client's server aside). Hosts are compared by what they
    resolve to, every name of this machine (localhost, 127.0.0.1, its host name, its own IPs)
    being one host: 'localhost:6379' is not another machine's port 6379."""
    have = client if wanted.startswith("ray://") else current
    if have is None:
        return False
    w_host, _, w_port = wanted.split("://", 1)[-1].rpartition(":")
    h_host, _, h_port = have.split("://", 1)[-1].rpartition(":")
    if not (w_port.isdigit() and h_port.isdigit()) or int(w_port) != int(h_port):
        return False
    return _same_host(w_host.strip("[]"), h_host.strip("[]"))


def _same_host(a: str, b: str) -> bool:
    if a.lower() == b.lower():
        return True
    ka, kb = _host_key(a), _host_key(b)
    return bool(ka & kb)


def _host_key(host: str) -> set:
    """The addresses ``host`` resolves to, or {'this machine'} where it is this machine."""
    try:
        ips = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:                              # (not resolvable: only its own spelling matches)
        return {host.lower()}
    return {"this machine"} if any(_this_machine(ip) for ip in ips) else ips


def _this_machine(ip: str) -> bool:
    """Whether ``ip`` is an address of this machine: a loopback one, or one it can bind."""
    import ipaddress
    try:
        if ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback:
            return True
    except ValueError:
        return False
    try:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False

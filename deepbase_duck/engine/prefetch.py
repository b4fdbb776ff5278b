"""Run a scan's forward passes one batch ahead of the work on their results.

A scan's loop does two kinds of work per batch: the model's forward pass, and the host work on
its output (labels, inspector states, stored symbols). On a GPU they need not wait for each
other: while the host works on batch k, the device can compute batch k+1. ``prefetched`` runs a
producer (a generator of batches) in a background thread and hands its items over through a
bounded queue, ``depth`` items ahead: at most ``depth`` finished batches wait, plus the one the
producer is computing, so memory stays bounded by the depth, not by the corpus.

The producer owns what it opened (the model's hooks in ``forward_batches``): it is closed in its
own thread, also when the consumer stops early (a progressive scan's stop rule, an error, an
interrupt). An exception in the producer is raised in the consumer, at the item where it
happened. The producer must not share a DuckDB connection with the consumer (DuckDB 2.0 refuses
concurrent calls on one connection): it reads through a cursor (``Session.cursor_session``).

Used by the local engine where the model runs on CUDA (``LocalEngine(pipeline=...)``), for one
model or several scanned together (``run_stacked``). On a CPU the forward pass itself runs on
every core, and a second thread only competes with it: a 300k-character char-LSTM scan on 2
cores took 1.6-2.7x its serial time (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import queue
import threading

import torch

_END = object()


def pipeline_by_default(adapter) -> bool:
    """Whether a scan or an extraction runs this model's forward passes in a prefetch thread when
    not told: where the model runs on CUDA, unless its adapter opts in to TF32 (``tf32=True``):
    its forward pass switches torch's process-wide TF32 flags on, and a float32 product of the
    inspectors running meanwhile in the other thread would take them too."""
    return torch.device(adapter.device).type == "cuda" and getattr(adapter, "tf32", False) is not True


def batch_source(session, batches_from, pipelined: bool):
    """The forward batches of ``batches_from(reader)`` (a generator reading through a Session):
    run here over ``session``, or, when ``pipelined``, one batch ahead in a prefetch thread that
    reads through its own cursor session, opened and closed in that thread. Either way the caller
    closes what it gets (a prefetching producer stops and its thread ends there)."""
    if not pipelined:
        return batches_from(session)

    def produce():
        reader = session.cursor_session()
        try:
            yield from batches_from(reader)
        finally:
            reader.close()
    return prefetched(produce)


def prefetched(produce, depth: int = 1, name: str = "deepbase-prefetch"):
    """Yield the items of the iterator ``produce()`` makes, computed in a background thread up
    to ``depth`` items ahead. Closing this generator (or an exception in the consumer) stops and
    closes the producer and joins its thread before returning."""
    if depth < 1:
        raise ValueError(f"prefetch depth must be at least 1, got {depth}")
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            it = iter(produce())
            try:
                for item in it:
                    if not put((True, item)):
                        break
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()                 # the producer's own clean-up runs in its own thread
            put((False, _END))
        except BaseException as exc:        # noqa: BLE001 - handed to the consumer, raised there
            put((False, exc))

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            try:
                ok, item = items.get(timeout=0.05)
            except queue.Empty:
                if not thread.is_alive() and items.empty():     # pragma: no cover - work() always puts
                    raise RuntimeError("the prefetch thread ended without handing over a result")
                continue
            if ok:
                yield item
            elif item is _END:
                return
            else:
                raise item
    finally:
        stop.set()
        thread.join()

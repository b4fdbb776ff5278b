"""A progressive query over stored activations against the same query running the model
(session 11: stored activations are read in the seeded windows, by Parquet row group).

    .venv/bin/python benchmarks/bench_progressive_stored.py --chars 1000000 --repeat 2

The char-LSTM (final), both layers, five code hypotheses, held-out standard-library code of
``--chars`` characters stored twice: as dataset ``model`` (nothing stored but labels and
symbols, so the query runs the model) and as dataset ``stored`` (the same records, activations
extracted beforehand, float32 or ``--dtype``). Each repeat times the same ``max_error`` query
(seed 1, ``reuse=False``) on both, alternating which goes first, and prints the seconds, the
records used and whether both read the same records with the same bound.

``--stored-fraction F`` extracts only the first F of the ``stored`` records (a dataset grown
since its extraction): since session 15 the query reads those and runs the model on the rest,
batch by batch (before, a progressive query ran the model on every record unless all were
stored); it prints the records read and computed.

    .venv/bin/python benchmarks/bench_progressive_stored.py --chars 300000 --repeat 1 --stored-fraction 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chars", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--max-error", type=float, default=0.1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--stored-fraction", type=float, default=1.0,
                    help="extract only this fraction of the records (the first ones) of dataset 'stored'")
    a = ap.parse_args()
    import bench_baseline as bb
    import deepbase_duck as dbd
    records = bb.records_for(a.chars, 600, "heldout")
    with tempfile.TemporaryDirectory() as tmp:
        con = dbd.connect(os.path.join(tmp, "s.duckdb"), progress=False)
        try:
            dbd.register_model(con, "charlstm", "deepbase_duck.models.zoo:charlstm", {"checkpoint": "final"})
            for name in ("model", "stored"):
                dbd.add_dataset(con, name, records)
                dbd.annotate(con, bb.HYPS, name)
            t0 = time.perf_counter()
            some = int(round(a.stored_fraction * len(records)))
            dbd.extract(con, "charlstm", bb.LAYERS, "stored", a.dtype,
                        record_ids=None if some >= len(records) else list(range(some)))
            print(f"{len(records)} records, {sum(len(r['text']) for r in records):,} characters; "
                  f"extracted ({a.dtype}, {min(some, len(records))} records) in {time.perf_counter() - t0:.1f} s")

            def run(ds):
                t = time.perf_counter()
                dbd.inspect(con, "charlstm", bb.LAYERS, bb.HYPS, ds, max_error=a.max_error, seed=1, reuse=False)
                s = time.perf_counter() - t
                src, params = con.sql("SELECT source, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
                p = json.loads(params)
                return s, src, p["records_used"], p["bound_reached"], p["reused"]

            for i in range(a.repeat):
                order = ("model", "stored") if i % 2 == 0 else ("stored", "model")
                got = {ds: run(ds) for ds in order}
                (sm, srcm, nm, bm, _), (ss, srcs, ns, bs, reused) = got["model"], got["stored"]
                print(f"repeat {i + 1} ({order[0]} first): model {sm:.2f} s ({srcm}), stored {ss:.2f} s ({srcs}: "
                      f"{reused['activation_records_read']} records read, {reused['activation_records_computed']} "
                      f"computed); records {nm} / {ns}, bound {bm:.4f} / {bs:.4f}; stored / model {ss / sm:.2f}")
        finally:
            dbd.close(con)


if __name__ == "__main__":
    main()

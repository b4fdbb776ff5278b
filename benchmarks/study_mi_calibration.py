"""What a full scan with ``mi`` runs through the model: records and seconds, for comparing two
versions of the code (since session 14 the records mi's bins are calibrated on feed the scan, not
run twice). Counts are exact; seconds are this shared machine's.

    .venv/bin/python benchmarks/study_mi_calibration.py --model minilm --records 1000
    .venv/bin/python benchmarks/study_mi_calibration.py --model charlstm --records 100000 --checkpoints
    (cd /tmp && PYTHONPATH=/tmp/wt_old <checkout>/.venv/bin/python <checkout>/benchmarks/study_mi_calibration.py)

Workloads as bench_scan_overhead.py's (``minilm``: PTB sentences, three layers, spaCy UPOS;
``charlstm``: characters of standard-library records, both layers, five code hypotheses); labels
stored before the clock. Prints the records the forward passes took (the early-exit check's
example passes included, the same in both versions), the records selected, and the scan's time.
``--checkpoints``: three models of one architecture scanned together (bench_scan_overhead's
``checkpoint_models``; since session 15 their calibration records run once through every model
and feed the scan), the records each model's forward passes took.
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
    ap.add_argument("--model", choices=["minilm", "charlstm"], default="minilm")
    ap.add_argument("--records", type=int, default=1000, help="minilm: sentences; charlstm: characters")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoints", action="store_true", help="three models of one architecture scanned together")
    a = ap.parse_args()
    from bench_baseline import limit_threads
    from bench_scan_overhead import checkpoint_models, workload
    limit_threads(a.threads)
    import deepbase_duck as dbd
    print(dbd.__file__)
    records, name, layers, hyps, make = workload(a.model, a.records, "cpu", None, None)
    from deepbase_duck.hypotheses.core import get_hypothesis
    hyps = [h for h in hyps if get_hypothesis(h).kind != "continuous"]   # (mi takes binary and categorical ones)
    adapters = checkpoint_models(a.model, make, "cpu") if a.checkpoints else [make()]
    names = [f"{name}{i}" for i in range(len(adapters))] if a.checkpoints else [name]
    seen = {n: [] for n in names}

    def counting(adapter, out):
        forward = adapter.forward

        def counted(encoded):
            out.append(len(encoded.starts))
            return forward(encoded)
        adapter.forward = counted
    for n, adapter in zip(names, adapters):
        counting(adapter, seen[n])
    with tempfile.TemporaryDirectory() as tmp:
        con = dbd.connect(os.path.join(tmp, "m.duckdb"), progress=False)
        for n, adapter in zip(names, adapters):
            dbd.register_model(con, n, adapter)
        dbd.add_dataset(con, "d", records)
        dbd.annotate(con, hyps, "d")
        for v in seen.values():
            v.clear()
        t0 = time.perf_counter()
        dbd.inspect(con, names if a.checkpoints else name, layers, hyps, "d", measures=["mi"])
        secs = time.perf_counter() - t0
        params = con.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0]
        dbd.close(con)
    took = "; ".join(f"{n} {sum(v)}" for n, v in seen.items())
    scan = f" (scan {json.loads(params).get('scan')}, forward {json.loads(params).get('forward')})" if a.checkpoints else ""
    print(f"{a.model}: {len(records)} records selected; forward passes took {took} records{scan}; "
          f"full scan with mi {secs:.2f} s")


if __name__ == "__main__":
    main()

"""What a full scan with ``mi`` runs through the model: records and seconds, for comparing two
versions of the code (since session 14 the records mi's bins are calibrated on feed the scan, not
run twice). Counts are exact; seconds are this shared machine's.

    .venv/bin/python benchmarks/study_mi_calibration.py --model minilm --records 1000
    (cd /tmp && PYTHONPATH=/tmp/wt_old <checkout>/.venv/bin/python <checkout>/benchmarks/study_mi_calibration.py)

Workloads as bench_scan_overhead.py's (``minilm``: PTB sentences, three layers, spaCy UPOS;
``charlstm``: characters of standard-library records, both layers, five code hypotheses); labels
stored before the clock. Prints the records the forward passes took (the early-exit check's
example passes included, the same in both versions), the records selected, and the scan's time.
"""
from __future__ import annotations

import argparse
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
    a = ap.parse_args()
    from bench_baseline import limit_threads
    from bench_scan_overhead import workload
    limit_threads(a.threads)
    import deepbase_duck as dbd
    print(dbd.__file__)
    records, name, layers, hyps, make = workload(a.model, a.records, "cpu", None, None)
    adapter = make()
    seen = []
    forward = adapter.forward

    def counted(encoded):
        seen.append(len(encoded.starts))
        return forward(encoded)
    adapter.forward = counted
    with tempfile.TemporaryDirectory() as tmp:
        con = dbd.connect(os.path.join(tmp, "m.duckdb"), progress=False)
        dbd.register_model(con, name, adapter)
        dbd.add_dataset(con, "d", records)
        dbd.annotate(con, hyps, "d")
        seen.clear()
        t0 = time.perf_counter()
        dbd.inspect(con, name, layers, hyps, "d", measures=["mi"])
        secs = time.perf_counter() - t0
        dbd.close(con)
    print(f"{a.model}: {len(records)} records selected; forward passes took {sum(seen)} records; "
          f"full scan with mi {secs:.2f} s")


if __name__ == "__main__":
    main()

"""Run a benchmark script against another checkout of deepbase_duck (old code against new).

    git worktree add /tmp/wt_old <commit>
    (cd /tmp && /work/main/.venv/bin/python <checkout>/benchmarks/run_old.py /tmp/wt_old \\
        /tmp/wt_old/benchmarks/bench_scan_overhead.py --model charlstm --records 300000 --pairs 3)

An editable install maps the package ``deepbase_duck.sql`` (the SQL files) to its own checkout's
``sql/`` folder through a meta-path finder, which wins over ``PYTHONPATH``: old Python code would
then run with new SQL (and fail where a macro changed its signature). This drops that finder,
links ``<worktree>/deepbase_duck/sql`` to ``<worktree>/sql`` and runs the script with the
worktree first on ``sys.path``.
"""
from __future__ import annotations

import os
import runpy
import sys


def main():
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)                   # asked for: the usage, and a clean exit
        return
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    root, script = os.path.abspath(sys.argv[1]), sys.argv[2]
    link = os.path.join(root, "deepbase_duck", "sql")
    if not os.path.exists(link):
        os.symlink(os.path.join(root, "sql"), link)
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()
                        and "editable" not in type(f).__module__.lower()]
    sys.path.insert(0, root)
    import deepbase_duck
    import deepbase_duck.sql
    if not deepbase_duck.__file__.startswith(root):
        sys.exit(f"deepbase_duck still imports from {deepbase_duck.__file__}")
    print(f"code and SQL from {root}", file=sys.stderr)
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()

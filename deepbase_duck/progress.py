"""Progress bars (tqdm on stderr), silent when asked or when stderr is not a terminal and
DEEPBASE_DUCK_PROGRESS is not set."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, unit: str = "rec", enabled: bool = True):
    show = enabled and (sys.stderr.isatty() or os.environ.get("DEEPBASE_DUCK_PROGRESS") == "1")
    return tqdm(total=total, desc=desc, unit=unit, disable=not show, dynamic_ncols=True, leave=False)

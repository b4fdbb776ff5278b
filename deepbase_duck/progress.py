"""Progress bars (tqdm on stderr), silent when asked or when stderr is not a terminal and
DEEPBASE_DUCK_PROGRESS is not set, and when there is no stderr to write to (None under pythonw
or a daemon, or closed: ``2>&-``)."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def _stderr():
    """sys.stderr when it can be written to, else None."""
    err = sys.stderr
    try:
        if err is None or getattr(err, "closed", False):
            return None
    except (ValueError, OSError):
        return None
    return err


def progress_bar(total: int, desc: str, unit: str = "rec", enabled: bool = True):
    err = _stderr() if enabled else None
    try:
        tty = err is not None and err.isatty()
    except (AttributeError, ValueError, OSError):     # a stream without isatty, or closed meanwhile
        tty = False
    show = err is not None and (tty or os.environ.get("DEEPBASE_DUCK_PROGRESS") == "1")
    return tqdm(total=total, desc=desc, unit=unit, disable=not show, dynamic_ncols=True, leave=False,
                file=err if show else None)

"""Progress bars for the product's own long phases (eval generation and loss, 4-bit
calibration): one tqdm bar per phase on stderr, never a log line per row.

Shown when stderr is a terminal, so logs and pipes carry only the result lines.
`TUNEWRIGHT_PROGRESS=1` shows them anyway (e.g. under a CI log viewer that renders them),
`TUNEWRIGHT_PROGRESS=0` hides them on a terminal too.
"""

from __future__ import annotations

import os
import sys

ENV = "TUNEWRIGHT_PROGRESS"


def progress_wanted(stream=None) -> bool:
    """Whether bars go to `stream` (default: stderr): $TUNEWRIGHT_PROGRESS, else whether it is a terminal."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in ("1", "on", "yes", "true"):
        return True
    if setting in ("0", "off", "no", "false"):
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(total: int, desc: str, unit: str):
    """A tqdm bar on stderr over `total` units of one phase; a no-op bar when not wanted. Use as a
    context manager (closed also when the phase fails) and call `.update(n)`."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=not progress_wanted(sys.stderr))

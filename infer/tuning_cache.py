"""Kernel launch choices measured on a GPU (infer.kernels' tuning), kept on disk so that a
restarted server or a second bench reads them instead of timing every candidate again.

One JSON file per GPU model, Triton and torch version, under the cache directory
(`<cache>/kernels/`): {"matvec": {"<shape>": [config]}, "attention": ..., "head": ...}.
`TUNEWRIGHT_RETUNE=1` ignores what is saved and measures afresh (and saves that).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

_table: dict | None = None
_path: Path | None = None


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(torch.cuda.current_device())


def table_path() -> Path:
    import torch

    from infer.models import cache_dir

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = re.sub(r"[^A-Za-z0-9.]+", "-", device_name()).strip("-")
    return cache_dir() / "kernels" / f"{name}-triton{triton_version}-torch{torch.__version__.split('+')[0]}.json"


def _load() -> dict:
    global _table, _path
    if _table is None:
        _path = table_path()
        _table = {}
        if os.environ.get("TUNEWRIGHT_RETUNE") != "1" and _path.is_file():
            try:
                _table = json.loads(_path.read_text())
                log.info("kernel launch choices from %s", _path)
            except (OSError, ValueError) as exc:  # unreadable: measure again, and write it anew
                log.warning("ignoring %s (%s): kernels are tuned again", _path, exc)
                _table = {}
    return _table


def _key(key: tuple) -> str:
    return "|".join(str(part) for part in key)


def lookup(kind: str, key: tuple):
    """The saved choice for this kind ("matvec", "attention", "head") and shape, or None."""
    value = _load().get(kind, {}).get(_key(key))
    return tuple(value) if isinstance(value, list) else value


def remember(kind: str, key: tuple, value) -> None:
    table = _load()
    table.setdefault(kind, {})[_key(key)] = list(value) if isinstance(value, tuple) else value
    from infer.outputs import write_json_atomically

    try:
        write_json_atomically(_path, table)
    except OSError as exc:  # a read-only cache costs the next start its tuning, nothing else
        log.warning("could not save kernel launch choices to %s: %s", _path, exc)


def forget_loaded() -> None:
    """Read the file again on next use (tests; another process may have written it)."""
    global _table, _path
    _table = _path = None

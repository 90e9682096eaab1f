"""Result files: checked before the work that fills them, written whole or not at all."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path


def check_regex(pattern: str) -> re.Pattern:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"--regex {pattern!r} is not a valid regular expression: {exc}") from None
    return compiled


def check_writable(path, *, overwrite: bool = False) -> Path:
    """Refuse an existing file (unless `overwrite`) and a place no file can be written, now
    rather than after the work: creates the parent directory and a test file there."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; pass --overwrite to replace it, or choose another name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def free_name(path: Path) -> Path:
    """`path`, or `stem-2.ext`, `stem-3.ext`, ... : the first that does not exist."""
    n = 1
    candidate = path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def write_atomically(path, text: str) -> Path:
    """Write under a temporary name in the same directory, flushed to disk, then rename:
    readers see the old file or the whole new one, never half of it. The file gets the
    permissions an ordinary write would (mkstemp's 0600 would hide what is meant to be read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomically(path, obj) -> Path:
    """`obj` as indented JSON (anything JSON cannot hold as its str()), written atomically."""
    return write_atomically(path, json.dumps(obj, indent=2, default=str) + "\n")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

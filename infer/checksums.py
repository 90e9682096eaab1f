"""SHA-256 of files, as run manifests, quantized copies and exports record them."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(path) -> str:
    """One SHA-256 for a directory: its files' relative paths and hashes, in name order."""
    root = Path(path).expanduser()
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + sha256_file(file).encode())
    return digest.hexdigest()

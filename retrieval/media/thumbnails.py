"""Small JPEG thumbnails kept in the index home, keyed by content hash (moves and duplicates share one).

They are a cache, not part of the commit point: a missing one is simply made again from the original.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from retrieval.fsutil import atomic_write

THUMBS = "thumbs"


def thumb_path(home: str | os.PathLike[str], sha256: str) -> Path:
    return Path(home) / THUMBS / sha256[:2] / f"{sha256}.jpg"


def write_thumb(home: str | os.PathLike[str], sha256: str, data: bytes) -> Path:
    """Write once, atomically (a reader never sees half a JPEG)."""
    path = thumb_path(home, sha256)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, durable=False)  # a cache: a crash costs one thumbnail, made again on demand
    return path


def prune_thumbs(home: str | os.PathLike[str], shas: Iterable[str]) -> int:
    """Delete the thumbnails of these hashes; returns how many files went."""
    n = 0
    for sha in set(shas):
        if not sha:
            continue
        p = thumb_path(home, sha)
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n

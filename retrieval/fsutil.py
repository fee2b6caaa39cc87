"""File plumbing in one place: reading user files, content hashes, and durable (fsync + rename) writes.

Every file the store, the caches and the ONNX export write goes through `atomic_write` or `fsync_dir`, so a
crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from retrieval.errors import InputNotFound


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a query or corpus file, turning OS errors into one-line user errors."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError as e:
        raise InputNotFound(f"no such file: {p}") from e
    except IsADirectoryError as e:
        raise InputNotFound(f"is a directory, not a file: {p}") from e
    except PermissionError as e:
        raise InputNotFound(f"permission denied: {p}") from e
    except OSError as e:
        raise InputNotFound(f"cannot read {p}: {e.strerror or e}") from e


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hash a file without holding it in memory (OSError passes through)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_hex(data: bytes) -> str:
    """Content hash stored per item (moved-file detection and dedupe build on it)."""
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file in a folder, then the folder itself (before renaming it into place)."""
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_file(path: Path, durable: bool = True) -> Iterator[BinaryIO]:
    """Write `path` through a unique temp file renamed into place on success (removed on failure).

    With `durable`, the data and the rename are fsynced; caches that can be rebuilt skip that cost.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """`atomic_file` for bytes already in memory."""
    with atomic_file(path, durable) as f:
        f.write(data)


def atomic_write_with(path: Path, write: Callable[[str], None]) -> None:
    """For writers that want a file name (faiss): `write(tmp_name)`, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)

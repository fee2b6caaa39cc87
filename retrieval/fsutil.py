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


def read_bytes(path: str | os.PathLike[str], limit: int | None = None, what: str = "this file") -> bytes:
    """Read a query or corpus file, turning OS errors into one-line user errors.

    With `limit`, at most limit+1 bytes are ever read: `--image /dev/zero` or a runaway file is refused
    with the cap in the message instead of filling memory.
    """
    p = Path(path)
    try:
        if limit is None:
            return p.read_bytes()
        with open(p, "rb") as f:
            data = bytearray()
            while len(data) <= limit:
                block = f.read(min(1 << 20, limit + 1 - len(data)))
                if not block:
                    break
                data += block
    except FileNotFoundError as e:
        raise InputNotFound(f"no such file: {p}") from e
    except IsADirectoryError as e:
        raise InputNotFound(f"is a directory, not a file: {p}") from e
    except PermissionError as e:
        raise InputNotFound(f"permission denied: {p}") from e
    except OSError as e:
        raise InputNotFound(f"cannot read {p}: {e.strerror or e}") from e
    if len(data) > limit:
        raise InputNotFound(f"{p} is larger than {limit / 2**20:g} MB, the limit for {what}")
    return bytes(data)


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


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists: temporary files named for a dead one are orphans (True when unsure)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, not ours to signal
    return True


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC or a quota, or numpy's short write ('20 requested and 10 written'), which carries no errno."""
    import errno
    import re

    return isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT)
                                       or re.search(r"\d+ requested and \d+ written", str(e)) is not None)


def can_write(path: str | os.PathLike[str]) -> bool:
    """Whether this process may write `path` (a folder: create files in it), by the effective ids.

    Root passes every permission check except a read-only mount; a missing path is not writable."""
    effective = os.access in os.supports_effective_ids
    return os.access(path, os.W_OK, effective_ids=effective)


def folder_problem(path: Path, what: str = "index home") -> str | None:
    """Why `path` cannot be a folder (it is a file, or lies under one), else None; missing folders are fine.

    Checked before anything opens it, so `--home afile/sub` is one line, not NotADirectoryError."""
    for p in (path, *path.parents):
        try:
            if p.is_dir():
                return None
            if p.exists():
                return (f"{what} {path} is a file, not a folder" if p == path else
                        f"{what} {path} is under {p}, which is a file, not a folder")
        except OSError as e:  # EACCES on a parent, a name too long, ...
            return f"{what} {path} cannot be used: {e.strerror or e}"
    return None

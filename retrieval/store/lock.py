"""One writer per index home: an OS file lock that dies with its process, so stale locks clear themselves."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from retrieval.errors import IndexLocked, ReadOnlyHome

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class WriterLock:
    """Held for the life of a writing Store; `release` is idempotent (and releases what `also` added)."""

    def __init__(self, home: Path) -> None:
        self.path = home / "index.lock"
        self._others: list[Callable[[], None]] = []
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # the first write any writer makes: a read-only home is a user error here
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise ReadOnlyHome(f"the index in {home} is read-only ({self.path.name}: {e.strerror}): "
                                   f"searches work, but changing the index needs write access") from e
            raise
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise IndexLocked(f"another crossmodal process (pid {holder}) is writing to {home}; "
                              f"wait for it to finish, then run this again") from e
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def also(self, release: Callable[[], None]) -> None:
        """Hold another lock as long as this one (a PostgreSQL catalog's advisory lock: pg_lock.py)."""
        self._others.append(release)

    def release(self) -> None:
        while self._others:
            self._others.pop()()
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

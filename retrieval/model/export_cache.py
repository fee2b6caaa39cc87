"""Where ONNX exports live: one per-user cache that every index home shares, so a model is exported once per
machine (about 25 s and 606 MB for ViT-B-32), not once per home.

The cache is $CROSSMODAL_CACHE, else platformdirs' user_cache_dir("crossmodal") (~/.cache/crossmodal on
Linux). Under <cache>/onnx/:

  <key>/               the export of one model (`export_dir`); <key> from its fingerprint and EXPORT_VERSION,
                       so another model, or another export layout, never reads a stale export
  <key>.lock           exists while a process writes that export, flock-ed by it (`export_lock`), so two
                       processes never both spend the export's time; the lock dies with its process
  <key>.unsupported    the model cannot be exported (the reason); <key>.failed: the last failed export
  .<key>.<pid>.*.tmp   an export in progress (renamed into place when checked); `.old`: one moved aside

Homes of earlier versions keep their export under HOME/onnx/<key>/ (`legacy_dir`). It is used in place when
the cache has none, and never moved: a home may be read-only or on another filesystem (a move would then be
a 600 MB copy), and a move would pull the files from under a query reading them. Once the cache holds the
model's export, HOME/onnx is unused and can be deleted (`crossmodal info` says so).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from retrieval.config import CACHE_ENV as CACHE_ENV  # the setting lives with the other defaults
from retrieval.config import cache_root as cache_root
from retrieval.errors import ExportBusy
from retrieval.model.spec import Fingerprint

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: exporters are not serialised, installs stay atomic
    fcntl = None  # type: ignore[assignment]

EXPORT_VERSION = 2  # 2: token-feature outputs for the reranker
EXPORT_WAIT_S = 600.0  # how long `crossmodal index` waits for another process's export of the same model


def exports_root() -> Path:
    return cache_root() / "onnx"


def export_key(fp: Fingerprint, version: int = EXPORT_VERSION) -> str:
    """Folder name for one model's export (the same fingerprint fields the store compares)."""
    return hashlib.sha256(f"{fp.cache_id()}|onnx-v{version}".encode()).hexdigest()[:16]


def export_dir(fp: Fingerprint, version: int = EXPORT_VERSION) -> Path:
    """The cache's folder for the export of model `fp` (it may not exist yet)."""
    return exports_root() / export_key(fp, version)


def legacy_root(home: str | Path) -> Path:
    """Where earlier versions exported, inside each index home."""
    return Path(home) / "onnx"


def legacy_dir(home: str | Path, fp: Fingerprint, version: int = EXPORT_VERSION) -> Path:
    return legacy_root(home) / export_key(fp, version)


def unsupported_marker(fp: Fingerprint) -> Path:
    """Written instead of an export when a model's towers cannot be exported; holds the reason."""
    return exports_root() / f"{export_key(fp)}.unsupported"


def failure_marker(fp: Fingerprint) -> Path:
    """Where the last failed export of model `fp` is recorded (time, error, versions; see onnx_upkeep)."""
    return exports_root() / f"{export_key(fp)}.failed"


def lock_path(fp: Fingerprint) -> Path:
    return exports_root() / f"{export_key(fp)}.lock"


def write_problem() -> str | None:
    """Why no export can be written to the cache (a read-only mount, permissions, a path under a file), or
    None when it can. Readers never need this: an unwritable cache still serves the exports it holds."""
    root = exports_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return _cannot_write(root, e.strerror or type(e).__name__)
    if not os.access(root, os.W_OK | os.X_OK):
        return _cannot_write(root, "read-only")
    return None


def _cannot_write(root: Path, why: str) -> str:
    return f"no ONNX export can be written to {root} ({why}; set {CACHE_ENV} to a writable folder)"


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def export_busy(fp: Fingerprint) -> str | None:
    """'another crossmodal process (pid N) is exporting this model now' while one holds the lock, else None.
    Only reads: works on a read-only cache."""
    if fcntl is None:
        return None
    try:
        fd = os.open(lock_path(fp), os.O_RDONLY)
    except OSError:
        return None  # no lock file: nobody is exporting
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return f"another crossmodal process (pid {_holder(fd)}) is exporting this model now"
    except OSError:
        return None  # no flock on this filesystem
    finally:
        os.close(fd)
    return None


@contextlib.contextmanager
def export_lock(fp: Fingerprint, wait_s: float = 0.0,
                on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock on writing model `fp`'s export. When another process holds it, call `on_wait` once and
    wait up to `wait_s` seconds, then raise ExportBusy.

    The lock file is removed by its holder on release, so the cache keeps only exports and markers; a waiter
    that then locks a removed file sees its inode gone and takes the lock again on the new one. On a
    filesystem without flock (some network mounts) this goes ahead unlocked: two exporters then only
    duplicate work, since each installs by rename and keeps an export already in place.
    """
    path = lock_path(fp)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            busy = f"another crossmodal process (pid {holder}) is exporting this model"
            if time.monotonic() >= deadline:
                raise ExportBusy(busy + (f" (waited {wait_s:g} s)" if wait_s else " now")) from None
            if on_wait is not None and not said:
                on_wait(f"{busy}; waiting for it (at most {wait_s:g} s)")
                said = True
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            continue
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            break  # no locking here: go ahead unlocked
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            break
        os.close(fd)  # locked a file its holder removed on release: lock the current one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if _same_file(fd, path):
                path.unlink()  # while still holding it, so nobody holds a removed file's lock for long
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def fingerprints_under(root: Path) -> list[Fingerprint]:
    """The models whose exports a folder of exports holds (any version), read from their export.json."""
    found = []
    for p in sorted(root.glob("*/export.json")) if root.is_dir() else []:
        try:
            found.append(Fingerprint.from_json(json.dumps(json.loads(p.read_text())["fingerprint"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found

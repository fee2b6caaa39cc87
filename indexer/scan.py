"""Walk photo folders and diff them against the catalog: what is new, changed, or already indexed."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.config import IMAGE_EXTENSIONS
from retrieval.errors import InputNotFound
from retrieval.store.paths import to_catalog


@dataclass(frozen=True)
class FileEntry:
    """A candidate image file as the file system describes it.

    `path` is what os functions take: a name that is not valid UTF-8 keeps its bytes as lone surrogates
    (surrogateescape); the catalog stores it as `retrieval.store.paths.to_catalog(path)`.
    """

    path: str
    size: int
    mtime: float


@dataclass
class ScanResult:
    """Files to consider, and what could not be (catalog path, reason): ready to record and to show."""

    files: list[FileEntry] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append((to_catalog(path), reason))


@dataclass
class Plan:
    """What an indexing run must do."""

    new: list[FileEntry]
    changed: list[tuple[FileEntry, int]]  # entry and the id it replaces
    unchanged: int
    missing: dict[int, str] = field(default_factory=dict)  # id -> old path: indexed, no longer found
    kept: list[tuple[str, int]] = field(default_factory=list)  # (root, n): empty roots not emptied


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _entry(path: str, result: ScanResult) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        reason = "broken symlink" if os.path.islink(path) else "file vanished during the scan"
        result.skip(path, reason)
        return
    except OSError as e:
        result.skip(path, f"cannot stat: {e.strerror or e}")
        return
    if not stat.S_ISREG(st.st_mode):
        if not stat.S_ISDIR(st.st_mode):
            result.skip(path, "not a regular file")
        return
    result.files.append(FileEntry(path=path, size=st.st_size, mtime=st.st_mtime))


def scan(roots: Iterable[str | os.PathLike[str]]) -> ScanResult:
    """Recursively list image files under each root (a file root is taken as is); sorted, deduplicated."""
    result = ScanResult()
    for root in roots:
        root_path = Path(root).expanduser()
        if not root_path.exists():
            raise InputNotFound(f"no such file or folder: {root_path}")
        base = os.path.abspath(root_path)
        if root_path.is_file():
            if _is_image_name(base):
                _entry(base, result)
            else:
                result.skip(base, "not an image file extension")
            continue

        def onerror(err: OSError) -> None:
            result.skip(str(err.filename), f"cannot list folder: {err.strerror or err}")

        for dirpath, dirnames, filenames in os.walk(base, onerror=onerror):
            dirnames.sort()
            for name in sorted(filenames):
                if _is_image_name(name):
                    _entry(os.path.join(dirpath, name), result)
    seen: set[str] = set()
    unique = []
    for f in result.files:
        if f.path not in seen:
            seen.add(f.path)
            unique.append(f)
    result.files = unique
    return result


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def plan(files: Iterable[FileEntry], known: Mapping[str, tuple[int, int | None, float | None]],
         roots: Iterable[str | os.PathLike[str]] = ()) -> Plan:
    """Split scanned files into new, changed (same path, other size or mtime) and unchanged, and list the
    indexed files under `roots` that were not found (deleted or moved). `known` is keyed like `files`: by the
    path os functions take (catalog paths decoded with `from_catalog`).

    A root that yields no files at all while the index holds images under it is left alone (an unmounted
    drive must not empty the index); it is reported in `kept`.
    """
    files = list(files)
    new: list[FileEntry] = []
    changed: list[tuple[FileEntry, int]] = []
    unchanged = 0
    seen = set()
    for f in files:
        seen.add(f.path)
        hit = known.get(f.path)
        if hit is None:
            new.append(f)
        elif hit[1] == f.size and hit[2] is not None and abs(hit[2] - f.mtime) < 1e-6:
            unchanged += 1
        else:
            changed.append((f, hit[0]))
    missing: dict[int, str] = {}
    kept: list[tuple[str, int]] = []
    for root in roots:
        base = os.path.abspath(os.path.expanduser(os.fspath(root)))
        under = [(p, v[0]) for p, v in known.items() if _under(p, base)]
        gone = [(p, i) for p, i in under if p not in seen]
        if gone and len(gone) == len(under) and not any(_under(f.path, base) for f in files):
            kept.append((base, len(gone)))
            continue
        missing.update({i: p for p, i in gone})
    return Plan(new=new, changed=changed, unchanged=unchanged, missing=missing, kept=kept)

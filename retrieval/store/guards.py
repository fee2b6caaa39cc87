"""What the Store checks before it touches a home, and how low-level failures become one-line errors.

Why a module of its own: a home under a regular file, a read-only home, a damaged or lost catalog all
surface deep inside sqlite3, SQLAlchemy or os as NotADirectoryError, PermissionError or "database disk
image is malformed". These checks run first (cheap: a few stat calls) and the translation runs where
opening fails, so every command says what is wrong and what to run instead. Standard library only.
"""

from __future__ import annotations

import errno
import re
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.errors import IndexMismatch, ReadOnlyHome, UserError
from retrieval.fsutil import can_write, folder_problem
from retrieval.store.records import CATALOG

if TYPE_CHECKING:
    from retrieval.store.reader import CatalogReader

VECTOR_FILE = re.compile(r"^(image|text)-(\d+)\.faiss$")
REPAIR = "run `crossmodal repair`: it rebuilds the catalog from what it can read and keeps the damaged file aside"


class CatalogDamaged(IndexMismatch, sqlite3.DatabaseError):
    """SQLite says the catalog is damaged (malformed, not a database). Also a sqlite3.DatabaseError, so code
    that already handles catalog failures by sqlite3's type (the page's index signature) still does."""


def read_only_problem(home: Path) -> str | None:
    """Which part of an existing home this process cannot write (None: all of it can be written)."""
    for p in (home, home / CATALOG, home / "vectors", home / "index.lock"):
        if p.exists() and not can_write(p):
            return f"{p.name or p} is not writable"
    return None


def read_only(home: Path, why: str) -> ReadOnlyHome:
    return ReadOnlyHome(f"the index in {home} is read-only ({why}): searches work, but this command "
                        f"changes the index and needs write access")


def check_home(home: Path, writable: bool) -> None:
    """Refuse a home that cannot be a folder, and a writer on a home it cannot write, in one line each."""
    problem = folder_problem(home)
    if problem:
        raise UserError(problem)
    if writable:
        why = read_only_problem(home)
        if why:
            raise read_only(home, why)


def make_home(home: Path) -> None:
    """Create a new home's folders; a parent this process cannot write is a ReadOnlyHome, not a traceback."""
    try:
        (home / "vectors").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ReadOnlyHome(f"cannot create the index home {home}: {e.strerror}") from e
        raise


def vector_files(home: Path) -> dict[str, list[int]]:
    """modality -> generations of exact vector files present in `vectors/`, ascending."""
    found: dict[str, list[int]] = {"image": [], "text": []}
    try:
        names = [p.name for p in (home / "vectors").iterdir()]
    except OSError:
        return found
    for name in names:
        m = VECTOR_FILE.match(name)
        if m:
            found[m.group(1)].append(int(m.group(2)))
    return {k: sorted(v) for k, v in found.items()}


def lost_catalog(home: Path, reader: CatalogReader | None = None) -> IndexMismatch | None:
    """A catalog file without tables (0 bytes, say) next to vector files: the catalog was lost, not new.

    Writers must not turn it into a fresh empty catalog (the next commit would delete the vector files).
    A `reader` that finds a recorded schema (an older one, about to be migrated) says it is not lost."""
    path = home / CATALOG
    if not any(vector_files(home).values()):
        return None
    if reader is not None and reader.has_catalog() and reader.schema_version() is not None:
        return None
    pointer = home / "catalog.url"  # location.POINTER: a PostgreSQL catalog, which repair cannot rebuild
    if pointer.is_file():
        return IndexMismatch(f"the database {pointer} names holds no crossmodal catalog but vectors/ holds vector "
                             f"files: the catalog was lost; restore the database from a backup")
    try:
        if path.stat().st_size > 0:
            return None  # a catalog without tables but with bytes is reported by whoever reads it
    except OSError:
        pass
    return IndexMismatch(f"catalog {path} is empty but vectors/ holds vector files: the catalog was lost; "
                         f"{REPAIR}")


def catalog_error(home: Path, e: BaseException) -> UserError | None:
    """The one-line error for a failure opening the catalog, or None when it is not the catalog's fault.

    sqlite3's errors arrive bare (the reader) or wrapped by SQLAlchemy (`.orig`, the writer)."""
    err = e if isinstance(e, sqlite3.Error) else getattr(e, "orig", None)
    if isinstance(e, UserError) or not isinstance(err, sqlite3.Error):
        return None
    path = home / CATALOG
    if isinstance(err, sqlite3.OperationalError):
        text = str(err)
        why = read_only_problem(home)
        if why and ("readonly" in text or "unable to open" in text):
            return read_only(home, why) if "readonly" in text else ReadOnlyHome(
                f"the catalog in read-only {home} has a write-ahead log that only a writable folder can "
                f"replay ({text}); open the index once where its folder is writable")
        return None  # locked, I/O: not a verdict on the file
    return CatalogDamaged(f"catalog {path} is damaged ({err}); {REPAIR}")

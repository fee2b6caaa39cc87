"""`SqliteReader`: the catalog reads on the standard library's sqlite3 (the `CatalogReader` for SQLite).

Why stdlib sqlite3 and not SQLAlchemy: importing SQLAlchemy costs 0.25-0.4 s of a one-shot
`crossmodal search` whose target is 1 s, and reads need only a handful of SELECTs. This module imports
nothing but the standard library, numpy, fsutil, guards and the reader interface, so a query
process never loads SQLAlchemy. tests/test_store_reader.py holds every answer equal to an independent
SQLAlchemy oracle on a real index.

A home this process cannot write is still readable: the catalog opens with `mode=ro`, plus `immutable=1`
when its folder is read-only and holds no write-ahead log (a WAL-mode read otherwise needs to create
`-shm`, and no writer can exist there). A read-only Store `hold`s the snapshot its vectors were loaded
from, so rows and vectors agree until it refreshes; the hold ends by itself after `hold_s`, so an idle
reader (the page) never starves the writer's WAL checkpoints for long.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from retrieval.fsutil import can_write
from retrieval.store.guards import REPAIR, CatalogDamaged
from retrieval.store.reader import ITEM_FIELDS, DateBound
from retrieval.store.reader_hold import TimedHold

_CHUNK = 900  # below SQLite's default limit on bound parameters

_Read = TypeVar("_Read", bound=Callable[..., Any])


def _locked(method: _Read) -> _Read:
    """Run a read holding the reader's lock: the page shares one read-only Store between sessions' threads,
    and one sqlite3 connection must not interleave a snapshot with another thread's statements.

    A damaged catalog found mid-read (a page SQLite cannot read) is a CatalogDamaged naming `repair`."""

    @functools.wraps(method)
    def run(self: SqliteReader, *args: Any, **kwargs: Any) -> Any:
        with self._guard:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.DatabaseError as e:
                if isinstance(e, (sqlite3.OperationalError, CatalogDamaged)):
                    raise
                raise CatalogDamaged(f"catalog {self.path} is damaged ({e}); {REPAIR}") from e

    return run  # type: ignore[return-value]


def _chunks(values: Iterable[Any]) -> Iterator[list[Any]]:
    """Values in slices small enough to bind as parameters of one IN (...)."""
    values = list(values)
    for start in range(0, len(values), _CHUNK):
        yield values[start:start + _CHUNK]


def _marks(chunk: list[Any]) -> str:
    return ",".join("?" * len(chunk))


def catalog_uri(path: Path) -> str:
    """The URI that opens a catalog for reading: `mode=rw` where this process could write it (as always:
    the last reader still checkpoints), else `mode=ro`, with `immutable=1` when nothing can change it.

    Never creates a missing file (the writer makes the schema first). `as_uri` escapes `?`, `%` and `#`."""
    path = path.absolute()
    uri = path.as_uri()
    if can_write(path) and can_write(path.parent):
        return uri + "?mode=rw"
    wal = path.with_name(path.name + "-wal")
    if not can_write(path.parent) and not wal.exists():
        return uri + "?mode=ro&immutable=1"
    return uri + "?mode=ro"


class SqliteReader(TimedHold):
    """Read-only access to `catalog.sqlite`; one connection, WAL-friendly (never blocks the indexer)."""

    def __init__(self, path: str | Path, busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        # isolation_level=None: no implicit transactions; `snapshot` and `hold` open one where reads must agree.
        self._db = sqlite3.connect(catalog_uri(self.path), uri=True, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        self._db.execute("PRAGMA query_only=ON")
        self._guard = threading.RLock()
        self._held = False
        self._timer: threading.Timer | None = None

    def close(self) -> None:
        with self._guard:
            self.release()
            self._db.close()

    def _open_snapshot(self) -> None:
        """A read transaction that stays open (`hold`): a read-only Store loads vectors once, and its rows must
        come from the same commit, or a `remove` in between leaves hits without rows. WAL keeps the snapshot
        while writers commit, but cannot checkpoint past it: hence `hold_s`."""
        self._db.execute("BEGIN")
        self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot starts here

    def _close_snapshot(self) -> None:
        self._db.execute("COMMIT")

    def __enter__(self) -> SqliteReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[SqliteReader]:
        """Reads inside see one committed state (WAL keeps it while writers commit).

        Other threads' reads wait until the snapshot ends. Inside a `hold`, that snapshot is the one."""
        with self._guard:
            if self._held:
                yield self
                return
            self._db.execute("BEGIN")
            try:
                yield self
            finally:
                self._db.execute("COMMIT")

    def _column(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        return [r[0] for r in self._db.execute(sql, tuple(args))]

    def _ids(self, sql: str, args: Iterable[Any] = ()) -> np.ndarray:
        return np.asarray(self._column(sql, args), dtype=np.int64)

    # ---- meta --------------------------------------------------------------------------------------
    @_locked
    def has_catalog(self) -> bool:
        row = self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        return row is not None

    @_locked
    def schema_version(self) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else None

    @_locked
    def meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta"))

    # ---- ids ---------------------------------------------------------------------------------------
    @_locked
    def ids(self, modality: str) -> np.ndarray:
        return self._ids("SELECT id FROM items WHERE modality = ?", (modality,))

    @_locked
    def text_ids(self, corpus: str) -> np.ndarray:
        return self._ids("SELECT id FROM items WHERE modality = 'text' AND corpus = ?", (corpus,))

    @_locked
    def image_ids(self, under: str | None = None, camera: str | None = None, after: DateBound | None = None,
                  before: DateBound | None = None) -> np.ndarray:
        cond, args = ["modality = 'image'"], []
        if under:
            exact = os.path.abspath(os.path.expanduser(under)).rstrip(os.sep) or os.sep
            folder = exact.rstrip(os.sep) + os.sep
            cond.append("(substr(path, 1, ?) = ? OR path = ?)")
            args += [len(folder), folder, exact]
        if camera:  # a substring: `_`, `%` and a backslash in it match only themselves
            cond.append("lower(coalesce(camera_make, '') || ' ' || coalesce(camera_model, '')) LIKE ? ESCAPE '\\'")
            args.append("%" + re.sub(r"([\\%_])", r"\\\1", camera.lower()) + "%")
        for bound, op in ((after, ">="), (before, "<")):
            if bound is None:
                continue
            iso, ts = bound
            cond.append(f"(taken_at {op} ? OR (taken_at IS NULL AND mtime {op} ?))")
            args += [iso, ts]
        return self._ids(f"SELECT id FROM items WHERE {' AND '.join(cond)}", args)

    # ---- rows --------------------------------------------------------------------------------------
    @_locked
    def items(self, ids: Iterable[int]) -> dict[int, tuple[Any, ...]]:
        out: dict[int, tuple[Any, ...]] = {}
        for chunk in _chunks(i for i in map(int, ids) if i >= 0):
            sql = f"SELECT {', '.join(ITEM_FIELDS)} FROM items WHERE id IN ({_marks(chunk)})"
            for row in self._db.execute(sql, chunk):
                out[row[0]] = tuple(row)
        return out

    @_locked
    def image_shas(self, ids: Iterable[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for chunk in _chunks(i for i in map(int, ids) if i >= 0):
            out.update(self._db.execute(f"SELECT id, sha256 FROM items WHERE id IN ({_marks(chunk)})", chunk))
        return out

    @_locked
    def corpora(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT corpus, count(*) FROM items WHERE modality = 'text' "
                                     "GROUP BY corpus ORDER BY corpus"))

    @_locked
    def cameras(self, limit: int = 200) -> list[str]:
        rows = self._db.execute(
            "SELECT camera_make, camera_model, count(*) AS n FROM items WHERE modality = 'image' AND "
            "(camera_make IS NOT NULL OR camera_model IS NOT NULL) GROUP BY camera_make, camera_model "
            "ORDER BY n DESC LIMIT ?", (int(limit),))
        return [" ".join(p for p in (make, model) if p) for make, model, _ in rows]

    @_locked
    def skipped(self) -> list[tuple[str, str]]:
        return [(p, r) for p, r in self._db.execute("SELECT path, reason FROM skipped ORDER BY path")]

    @_locked
    def image_folders(self) -> list[str]:
        # Only the path column is read; dirname in Python matches os.path semantics exactly.
        rows = self._db.execute("SELECT path FROM items WHERE modality = 'image' AND path IS NOT NULL")
        return sorted({os.path.dirname(p) for (p,) in rows})

    # ---- the indexer's reads -----------------------------------------------------------------------
    @_locked
    def image_files(self) -> dict[str, tuple[int, int | None, float | None]]:
        rows = self._db.execute("SELECT path, id, bytes, mtime FROM items WHERE modality = 'image'")
        return {p: (i, b, m) for p, i, b, m in rows}

    @_locked
    def all_image_shas(self) -> set[str]:
        return set(self._column("SELECT sha256 FROM items WHERE modality = 'image'"))

    @_locked
    def shas_in_use(self, shas: Iterable[str]) -> set[str]:
        used: set[str] = set()
        for chunk in _chunks(set(shas)):
            used.update(self._column(f"SELECT sha256 FROM items WHERE modality = 'image' AND sha256 IN "
                                     f"({_marks(chunk)})", chunk))
        return used

    def catalog_bytes(self) -> int:
        wal = self.path.with_name(self.path.name + "-wal")
        return sum(p.stat().st_size for p in (self.path, wal) if p.is_file())

    @_locked
    def text_hashes(self, corpus: str) -> set[str]:
        return set(self._column("SELECT sha256 FROM items WHERE modality = 'text' AND corpus = ?", (corpus,)))

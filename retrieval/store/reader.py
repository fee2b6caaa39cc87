"""The catalog's read queries on the standard library's sqlite3, for processes that only query.

Why: importing SQLAlchemy costs 0.25-0.4 s of a one-shot `crossmodal search` whose target is 1 s, and a
query needs only a handful of SELECTs. This module answers exactly the reads a read-only `Store` makes
(meta, ids per modality, catalog rows, filters, corpora, skipped files) with the same SQL semantics as the
SQLAlchemy expressions in store.py (tests/test_store_reader.py holds them equal on a real index). It imports
nothing but the standard library and numpy, and nothing from this package, so it can be used without
SQLAlchemy: a `Store` opened read-only delegates its catalog reads here (and its schema check).

Rows come back as plain tuples in `ITEM_FIELDS` order (ItemView's field order), so the caller builds its
own view objects.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

ITEM_FIELDS = ("id", "modality", "path", "corpus", "row", "text", "width", "height", "taken_at", "bytes",
               "camera_make", "camera_model", "gps_lat", "gps_lon", "sha256")
_CHUNK = 900  # below SQLite's default limit on bound parameters


_Read = TypeVar("_Read", bound=Callable[..., Any])


def _locked(method: _Read) -> _Read:
    """Run a read holding the reader's lock: the page shares one read-only Store between sessions' threads,
    and one sqlite3 connection must not interleave a snapshot with another thread's statements."""

    @functools.wraps(method)
    def run(self: CatalogReader, *args: Any, **kwargs: Any) -> Any:
        with self._guard:
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


class CatalogReader:
    """Read-only access to `catalog.sqlite`; one connection, WAL-friendly (never blocks the indexer)."""

    def __init__(self, path: str | Path, busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        # isolation_level=None: no implicit transactions; `snapshot` opens one where reads must agree.
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        self._db.execute("PRAGMA query_only=ON")
        self._guard = threading.RLock()

    def close(self) -> None:
        with self._guard:
            self._db.close()

    def __enter__(self) -> CatalogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[CatalogReader]:
        """Reads inside see one committed state (meta and ids from the same commit, as Store._load needs).

        Other threads' reads wait until the snapshot ends."""
        with self._guard:
            self._db.execute("BEGIN")
            try:
                yield self
            finally:
                self._db.execute("COMMIT")

    # ---- meta ------------------------------------------------------------------------------------
    @_locked
    def has_catalog(self) -> bool:
        row = self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        return row is not None

    @_locked
    def meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta"))

    @_locked
    def schema_version(self) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else None

    # ---- ids ---------------------------------------------------------------------------------------
    @_locked
    def ids(self, modality: str) -> np.ndarray:
        """Every id of a modality (Store._catalog_ids)."""
        rows = self._db.execute("SELECT id FROM items WHERE modality = ?", (modality,)).fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    @_locked
    def text_ids(self, corpus: str) -> np.ndarray:
        rows = self._db.execute("SELECT id FROM items WHERE modality = 'text' AND corpus = ?", (corpus,))
        return np.asarray([r[0] for r in rows.fetchall()], dtype=np.int64)

    @_locked
    def image_ids(self, under: str | None = None, camera: str | None = None, after: tuple[str, float] | None = None,
                  before: tuple[str, float] | None = None) -> np.ndarray:
        """Ids of images passing a filter (Store.image_ids). `after`/`before` are (ISO bound, timestamp):
        the EXIF date compares as text, the file time (for images without one) as a number."""
        cond, args = ["modality = 'image'"], []
        if under:
            exact = os.path.abspath(os.path.expanduser(under)).rstrip(os.sep) or os.sep
            folder = exact.rstrip(os.sep) + os.sep
            cond.append("(substr(path, 1, ?) = ? OR path = ?)")
            args += [len(folder), folder, exact]
        if camera:
            cond.append("lower(coalesce(camera_make, '') || ' ' || coalesce(camera_model, '')) LIKE ?")
            args.append(f"%{camera.lower()}%")
        for bound, op in ((after, ">="), (before, "<")):
            if bound is None:
                continue
            iso, ts = bound
            cond.append(f"(taken_at {op} ? OR (taken_at IS NULL AND mtime {op} ?))")
            args += [iso, ts]
        rows = self._db.execute(f"SELECT id FROM items WHERE {' AND '.join(cond)}", args).fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    # ---- rows --------------------------------------------------------------------------------------
    def _chunks(self, ids: Iterable[int]) -> Iterator[list[int]]:
        ids = [int(i) for i in ids if int(i) >= 0]
        for start in range(0, len(ids), _CHUNK):
            yield ids[start:start + _CHUNK]

    @_locked
    def items(self, ids: Iterable[int]) -> dict[int, tuple[Any, ...]]:
        """id -> row in ITEM_FIELDS order, for the ids that exist."""
        out: dict[int, tuple[Any, ...]] = {}
        for chunk in self._chunks(ids):
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(f"SELECT {', '.join(ITEM_FIELDS)} FROM items WHERE id IN ({marks})", chunk):
                out[row[0]] = tuple(row)
        return out

    @_locked
    def image_shas(self, ids: Iterable[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for chunk in self._chunks(ids):
            marks = ",".join("?" * len(chunk))
            out.update(self._db.execute(f"SELECT id, sha256 FROM items WHERE id IN ({marks})", chunk))
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

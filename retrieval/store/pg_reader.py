"""`PgReader`: the catalog reads on psycopg (the `CatalogReader` for a PostgreSQL catalog).

Why psycopg and not SQLAlchemy, as for SQLite: a one-shot query must not pay SQLAlchemy's import; the reads are
the same handful of SELECTs as sqlite_reader.py, in PostgreSQL's spelling (`%s` parameters, `= ANY(list)`
instead of chunked IN lists, `starts_with` for the folder prefix). Text that is compared or ordered uses
COLLATE "C", the byte order SQLite uses, whatever the database's locale: EXIF dates compare as text and
`skipped` sorts by path the same on both backends.

Snapshots are REPEATABLE READ transactions (read only): `snapshot` for one load, `hold` for a read-only
Store's life (up to `hold_s`), so its rows come from the commit its vectors did, while the indexer in another
process (or on another machine) commits. Imports only the standard library, numpy, psycopg and the project's
own store modules.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

from retrieval.errors import UserError
from retrieval.store.catalog_url import mask
from retrieval.store.reader import ITEM_FIELDS, DateBound
from retrieval.store.reader_hold import TimedHold

_Read = TypeVar("_Read", bound=Callable[..., Any])
CONNECT_TIMEOUT_S = 10
EXTRA = "pip install 'crossmodal[cluster]'"


def connect(url: str, role: str, autocommit: bool = True) -> Any:
    """A psycopg connection to the catalog at `url`; no psycopg, a bad URL, an unreachable server or a missing
    database is one UserError naming the URL (password masked). `role` shows in pg_stat_activity."""
    try:
        import psycopg
    except ImportError:
        raise UserError(f"the catalog {mask(url)} is in PostgreSQL, which needs psycopg: {EXTRA}") from None
    conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
    name = f"crossmodal {role} pid {os.getpid()} on {socket.gethostname()}"[:63]
    try:
        return psycopg.connect(conninfo, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name=name)
    except psycopg.Error as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot open the catalog {mask(url)}: {first}") from None


def _locked(method: _Read) -> _Read:
    """Run a read holding the reader's lock (the page shares one reader between sessions' threads, and a
    snapshot must not interleave with another thread's statements); a lost server is one UserError."""

    @functools.wraps(method)
    def run(self: PgReader, *args: Any, **kwargs: Any) -> Any:
        import psycopg

        with self._guard:
            try:
                return method(self, *args, **kwargs)
            except psycopg.OperationalError as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UserError(f"lost the catalog {mask(self.url)}: {first}") from None

    return run  # type: ignore[return-value]


class PgReader(TimedHold):
    """Read-only access to a PostgreSQL catalog; one autocommit connection, transactions only where reads
    must agree (`snapshot`, `hold`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._db = connect(url, "reader")
        self._db.execute("SET default_transaction_read_only = on")
        self._guard = threading.RLock()
        self._held = False
        self._open = False  # a transaction (snapshot or hold) is open
        self._timer: threading.Timer | None = None

    def close(self) -> None:
        with self._guard:
            self.release()
            self._db.close()

    def __enter__(self) -> PgReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _begin(self) -> None:
        self._db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        self._db.execute("SELECT 1")  # the snapshot is taken by the first statement: now
        self._open = True

    def _end(self) -> None:
        if self._open:
            self._open = False
            self._db.execute("ROLLBACK")  # read only: nothing to keep; also ends a failed transaction

    def _open_snapshot(self) -> None:
        self._begin()

    def _close_snapshot(self) -> None:
        if not self._db.closed:
            self._end()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[PgReader]:
        """Reads inside see one committed state; inside a `hold`, the held one."""
        with self._guard:
            if self._held:
                yield self
                return
            self._begin()
            try:
                yield self
            finally:
                self._end()

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._db.execute(sql, tuple(args)).fetchall())

    def _column(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        return [r[0] for r in self._rows(sql, args)]

    def _ids(self, sql: str, args: Iterable[Any] = ()) -> np.ndarray:
        return np.asarray(self._column(sql, args), dtype=np.int64)

    # ---- meta --------------------------------------------------------------------------------------
    @_locked
    def has_catalog(self) -> bool:
        return bool(self._rows("SELECT to_regclass('meta') IS NOT NULL")[0][0])

    @_locked
    def schema_version(self) -> int | None:
        rows = self._rows("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(rows[0][0]) if rows else None

    @_locked
    def meta(self) -> dict[str, str]:
        return {k: v for k, v in self._rows("SELECT key, value FROM meta")}

    # ---- ids ---------------------------------------------------------------------------------------
    @_locked
    def ids(self, modality: str) -> np.ndarray:
        return self._ids("SELECT id FROM items WHERE modality = %s", (modality,))

    @_locked
    def text_ids(self, corpus: str) -> np.ndarray:
        return self._ids("SELECT id FROM items WHERE modality = 'text' AND corpus = %s", (corpus,))

    @_locked
    def image_ids(self, under: str | None = None, camera: str | None = None, after: DateBound | None = None,
                  before: DateBound | None = None) -> np.ndarray:
        cond, args = ["modality = 'image'"], list[Any]()
        if under:
            exact = os.path.abspath(os.path.expanduser(under)).rstrip(os.sep) or os.sep
            folder = exact.rstrip(os.sep) + os.sep
            cond.append("(starts_with(path, %s) OR path = %s)")
            args += [folder, exact]
        if camera:  # a substring: `_`, `%` and a backslash in it match only themselves
            cond.append("lower(coalesce(camera_make, '') || ' ' || coalesce(camera_model, '')) LIKE %s "
                        "ESCAPE '\\'")
            args.append("%" + re.sub(r"([\\%_])", r"\\\1", camera.lower()) + "%")
        for bound, op in ((after, ">="), (before, "<")):
            if bound is None:
                continue
            iso, ts = bound
            cond.append(f'(taken_at COLLATE "C" {op} %s OR (taken_at IS NULL AND mtime {op} %s))')
            args += [iso, float(ts)]
        return self._ids(f"SELECT id FROM items WHERE {' AND '.join(cond)}", args)

    # ---- rows --------------------------------------------------------------------------------------
    @staticmethod
    def _wanted(ids: Iterable[int]) -> list[int]:
        return [i for i in map(int, ids) if i >= 0]

    @_locked
    def items(self, ids: Iterable[int]) -> dict[int, tuple[Any, ...]]:
        rows = self._rows(f"SELECT {', '.join(ITEM_FIELDS)} FROM items WHERE id = ANY(%s)", (self._wanted(ids),))
        return {int(r[0]): tuple(r) for r in rows}

    @_locked
    def image_shas(self, ids: Iterable[int]) -> dict[int, str]:
        rows = self._rows("SELECT id, sha256 FROM items WHERE id = ANY(%s)", (self._wanted(ids),))
        return {int(i): s for i, s in rows}

    @_locked
    def corpora(self) -> dict[str, int]:
        return {c: int(n) for c, n in self._rows("SELECT corpus, count(*) FROM items WHERE modality = 'text' "
                                                 "GROUP BY corpus ORDER BY corpus COLLATE \"C\"")}

    @_locked
    def cameras(self, limit: int = 200) -> list[str]:
        rows = self._rows(
            "SELECT camera_make, camera_model, count(*) AS n FROM items WHERE modality = 'image' AND "
            "(camera_make IS NOT NULL OR camera_model IS NOT NULL) GROUP BY camera_make, camera_model "
            "ORDER BY n DESC LIMIT %s", (int(limit),))
        return [" ".join(p for p in (make, model) if p) for make, model, _ in rows]

    @_locked
    def skipped(self) -> list[tuple[str, str]]:
        return [(p, r) for p, r in self._rows('SELECT path, reason FROM skipped ORDER BY path COLLATE "C"')]

    @_locked
    def image_folders(self) -> list[str]:
        rows = self._rows("SELECT path FROM items WHERE modality = 'image' AND path IS NOT NULL")
        return sorted({os.path.dirname(p) for (p,) in rows})

    # ---- the indexer's reads -----------------------------------------------------------------------
    @_locked
    def image_files(self) -> dict[str, tuple[int, int | None, float | None]]:
        rows = self._rows("SELECT path, id, bytes, mtime FROM items WHERE modality = 'image'")
        return {p: (int(i), b, m) for p, i, b, m in rows}

    @_locked
    def all_image_shas(self) -> set[str]:
        return set(self._column("SELECT sha256 FROM items WHERE modality = 'image'"))

    @_locked
    def shas_in_use(self, shas: Iterable[str]) -> set[str]:
        return set(self._column("SELECT sha256 FROM items WHERE modality = 'image' AND sha256 = ANY(%s)",
                                (list(set(shas)),)))

    @_locked
    def catalog_bytes(self) -> int:
        return int(self._rows("SELECT sum(pg_total_relation_size(to_regclass(t))) FROM "
                              "unnest(ARRAY['items', 'meta', 'skipped']) AS t")[0][0] or 0)

    @_locked
    def text_hashes(self, corpus: str) -> set[str]:
        return set(self._column("SELECT sha256 FROM items WHERE modality = 'text' AND corpus = %s", (corpus,)))

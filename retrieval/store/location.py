"""Where a home's catalog lives: `catalog.sqlite` in the home (the default), or a PostgreSQL database.

Why a pointer file: the first `crossmodal index --catalog postgresql+psycopg://...` decides where the catalog
lives; every later command (index, search, info, the page) must find it without the flag, so the home records
the URL in `catalog.url` (written atomically; vectors stay in the home). `CROSSMODAL_CATALOG` overrides the
pointer (the server moved, or a reader on another machine reaches it by another name); on a home without a
pointer it works like `--catalog`. A home never changes backend silently: asking for another catalog than the
one it has is a one-line error, and nothing is touched.

Standard library only (query processes import it); the backend modules load when their catalog is opened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.errors import UserError
from retrieval.fsutil import atomic_write
from retrieval.store.catalog_url import mask, parse
from retrieval.store.records import CATALOG

if TYPE_CHECKING:
    from retrieval.store.lock import WriterLock
    from retrieval.store.reader import CatalogReader

POINTER = "catalog.url"
ENV = "CROSSMODAL_CATALOG"
def read_pointer(home: Path) -> str | None:
    """The URL the home's pointer file records (None: no pointer, the catalog is SQLite)."""
    try:
        text = (home / POINTER).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read {home / POINTER}: {e.strerror}") from e
    if not text:
        return None
    try:
        return parse(text)
    except UserError as e:
        raise UserError(f"{home / POINTER}: {e}") from None


@dataclass(frozen=True)
class CatalogLocation:
    """One home's catalog: `url` None is `catalog.sqlite` in the home, else a PostgreSQL URL."""

    home: Path
    url: str | None = None
    pointed: bool = True  # the home's pointer records this URL (False: a new PostgreSQL catalog, or via env)

    @property
    def is_postgres(self) -> bool:
        return self.url is not None

    def describe(self) -> str:
        """Where the catalog lives, fit to print: the SQLite file, or the URL with its password masked."""
        return mask(self.url) if self.url else str(self.home / CATALOG)

    def present(self) -> bool:
        """Whether there may be a catalog to read (SQLite: a non-empty file; PostgreSQL: always, the reader
        looks for its tables)."""
        if self.url:
            return True
        path = self.home / CATALOG
        return path.is_file() and path.stat().st_size > 0

    def exists(self) -> bool:
        """Whether this home has an index already (SQLite: the file; PostgreSQL: the home's pointer)."""
        return (self.home / CATALOG).is_file() if self.url is None else (self.home / POINTER).is_file()

    def reader(self) -> CatalogReader:
        """A reader of the catalog (PostgreSQL: connects now; a failure is a one-line UserError)."""
        if self.url is None:
            from retrieval.store.sqlite_reader import SqliteReader

            return SqliteReader(self.home / CATALOG)
        from retrieval.store.pg_reader import PgReader

        return PgReader(self.url)

    def engine_url(self) -> Any:
        """The SQLAlchemy URL writers and migrations use. SQLite's goes through URL.create: a `?`, `%` or `#`
        in the home is part of the file name, never a query string."""
        if self.url is not None:
            return self.url
        from sqlalchemy.engine import URL

        return URL.create("sqlite", database=str(self.home / CATALOG))

    def writer_lock(self) -> WriterLock:
        """The home's file lock, plus for PostgreSQL the catalog's advisory lock (writers on other machines)."""
        from retrieval.store.lock import WriterLock

        lock = WriterLock(self.home)
        if self.url is not None:
            try:
                from retrieval.store.pg_lock import advisory_lock

                lock.also(advisory_lock(self.url))
            except BaseException:
                lock.release()
                raise
        return lock

    def refuse_foreign(self, reader: CatalogReader, found: int | None) -> None:
        """Refuse a PostgreSQL database that already holds another home's catalog, on a home new to it.

        Why: that catalog names vector generations this home does not have; opening would call them lost and
        `repair` would drop every row. A home with vector files (a reader elsewhere, given the URL by
        CROSSMODAL_CATALOG) or a catalog without vectors yet is fine."""
        from retrieval.store.guards import vector_files

        if self.url is None or self.pointed or found is None or any(vector_files(self.home).values()):
            return
        if any(v not in ("", "0") for k, v in reader.meta().items() if k.startswith("gen.")):
            raise UserError(f"the database {self.describe()} already holds the catalog of another index, whose "
                            f"vectors are not in {self.home}; give an empty database, or use that index's home")

    def record(self, writable: bool) -> None:
        """A writer writes the home's pointer (atomically) when a PostgreSQL catalog is new to it; SQLite
        needs none, and a reader (given the URL by the env var) leaves the home as it is."""
        if writable and self.url is not None and not self.pointed:
            atomic_write(self.home / POINTER, (self.url + "\n").encode())


def resolve(home: Path, requested: str | None = None) -> CatalogLocation:
    """The catalog of `home`: `requested` (--catalog) or $CROSSMODAL_CATALOG for a new home, the pointer for
    an existing one (the env var overrides it). Asking an existing home for another catalog is refused."""
    pointed = read_pointer(home)
    env = os.environ.get(ENV, "").strip()
    env_url = parse(env) if env else None
    has_sqlite = (home / CATALOG).is_file() and pointed is None
    current = (env_url if env else pointed) if pointed else None
    asked = parse(requested) if requested is not None else None
    if pointed is not None and env and env_url is None:
        raise UserError(f"{ENV}={env} but the index in {home} keeps its catalog in {mask(pointed)}")
    if pointed is None and env:  # env on a home without a pointer: like --catalog
        if requested is not None and asked != env_url:
            raise UserError(f"--catalog {mask(requested)} and {ENV}={mask(env)} disagree; give one of them")
        requested, asked = env, env_url
    if requested is not None and (pointed is not None or has_sqlite) and asked != current:
        have = mask(current) if current else f"SQLite ({home / CATALOG})"
        raise UserError(f"the index in {home} keeps its catalog in {have}; it cannot move to "
                        f"{mask(asked) if asked else 'SQLite'} (use another --home for a new index)")
    if pointed is not None:
        return CatalogLocation(home, current)
    return CatalogLocation(home, asked, pointed=False)

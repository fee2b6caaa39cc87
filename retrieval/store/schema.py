"""The catalog's tables (through SQLAlchemy): one row per indexed item, plus meta and skipped files; the
engine, and the schema's creation and migration ladder.

Only writers and migrations import this module (SQLAlchemy costs 0.3-0.4 s); reads go through a
`CatalogReader` (reader.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy import column as sql_column
from sqlalchemy import table as sql_table
from sqlalchemy import text as sql_text
from sqlalchemy.engine import URL, Connection, Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from retrieval.errors import IndexLocked, SchemaTooNew
from retrieval.store.lock import WriterLock
from retrieval.store.records import SCHEMA_VERSION, no_catalog, schema_too_new


def utcnow() -> datetime:
    """Row timestamps in UTC, so they compare across machines and time zones."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class CatalogText(TypeDecorator[str]):
    """Text every backend stores alike. SQLite keeps its declared type (VARCHAR(n) or TEXT, lengths unenforced);
    PostgreSQL gets TEXT, since it would enforce a length SQLite never did (a long EXIF camera name), and a NUL
    character, which its text cannot hold (a caption may have one), becomes U+FFFD there."""

    impl = Text
    cache_ok = True

    def __init__(self, length: int | None = None) -> None:
        super().__init__()
        self.length = length

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name != "postgresql" and self.length is not None:
            return dialect.type_descriptor(String(self.length))
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is not None and dialect.name == "postgresql" and "\x00" in value:
            return value.replace("\x00", "\ufffd")
        return value


BigId = Integer().with_variant(BigInteger(), "postgresql")  # SQLite's INTEGER is 64-bit; PostgreSQL's is not


def path_exclusion(table: str) -> str:
    """PostgreSQL's one row per path (SQLite keeps its unique constraint, see `sqlite_only`).

    Why: a PostgreSQL B-tree entry holds at most ~2,700 bytes, so a unique index on the path failed the commit
    of any file path longer than that (Linux allows 4,095 bytes). A hash index stores a 4-byte hash of any
    length of text and rechecks equal hashes against the rows, so `path WITH =` stays exact uniqueness, and
    `WHERE path = ...` lookups use the same index. Added by DDL after CREATE TABLE (and by the 3 -> 4 step),
    so SQLite writers never import SQLAlchemy's PostgreSQL dialect."""
    return f"ALTER TABLE {table} ADD CONSTRAINT ex_{table}_path EXCLUDE USING hash (path WITH =)"


def sqlite_only(constraint: UniqueConstraint | PrimaryKeyConstraint) -> Any:
    """The path's constraint as SQLite has always had it; PostgreSQL gets `path_exclusion` instead."""
    return constraint.ddl_if(dialect="sqlite")


# One caption text per corpus: a partial index over caption rows only (image rows have no corpus). A plain
# unique constraint gave every image row an entry too: 138 of the 586 bytes per image of a PostgreSQL catalog
# (bench/pg_catalog_size.py). Catalogs made before schema 4 keep the constraint on SQLite (same rule; SQLite
# cannot drop a table's constraint in place) and get the partial index on PostgreSQL (`_v3_to_v4`).
CAPTIONS_ONLY: dict[str, Any] = {f"{d}_where": sql_text("corpus IS NOT NULL") for d in ("sqlite", "postgresql")}


class Item(Base):
    """An image file or a caption; its integer id is also its FAISS id (never reused: AUTOINCREMENT)."""

    __tablename__ = "items"
    __table_args__ = (
        sqlite_only(UniqueConstraint("path", name="uq_items_path")),
        Index("uq_items_corpus_text", "corpus", "sha256", unique=True, **CAPTIONS_ONLY),
        Index("ix_items_modality", "modality"),
        Index("ix_items_sha256", "sha256"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    modality: Mapped[str] = mapped_column(CatalogText(8))
    path: Mapped[str | None] = mapped_column(CatalogText())  # a catalog path (paths.py): valid text for any name
    corpus: Mapped[str | None] = mapped_column(CatalogText(200))
    row: Mapped[int | None] = mapped_column(Integer)
    text: Mapped[str | None] = mapped_column(CatalogText())
    sha256: Mapped[str | None] = mapped_column(CatalogText(64))
    bytes: Mapped[int | None] = mapped_column(BigId)
    mtime: Mapped[float | None] = mapped_column(Float)  # FLOAT: double precision on PostgreSQL too
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    taken_at: Mapped[str | None] = mapped_column(CatalogText(32))
    camera_make: Mapped[str | None] = mapped_column(CatalogText(100))  # schema 2
    camera_model: Mapped[str | None] = mapped_column(CatalogText(100))  # schema 2
    gps_lat: Mapped[float | None] = mapped_column(Float)  # schema 2
    gps_lon: Mapped[float | None] = mapped_column(Float)  # schema 2
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Meta(Base):
    """Key/value facts about the index: schema version, model fingerprint, vector generations."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(CatalogText(64), primary_key=True)
    value: Mapped[str] = mapped_column(CatalogText())


class Skipped(Base):
    """Files the last runs could not index, with the reason (for reports; retried on each run)."""

    __tablename__ = "skipped"
    __table_args__ = (sqlite_only(PrimaryKeyConstraint("path")),)  # the ORM's key; on SQLite the table's too
    path: Mapped[str] = mapped_column(CatalogText())
    reason: Mapped[str] = mapped_column(CatalogText())
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def _add_path_exclusion(target: Any, connection: Connection, **_kw: Any) -> None:
    """After CREATE TABLE items/skipped on PostgreSQL: `path_exclusion`."""
    if connection.dialect.name == "postgresql":
        connection.execute(sql_text(path_exclusion(target.name)))


for _model in (Item, Skipped):
    event.listen(_model.__table__, "after_create", _add_path_exclusion)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """Durable, reader-friendly settings on every new SQLite connection."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers keep working while the indexer commits
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str | URL) -> Engine:
    """An engine with durable SQLite settings; other URLs (PostgreSQL) pass through unchanged.

    SQLite files are passed as `URL.create("sqlite", database=path)`: in a "sqlite:///path" string a `?`
    or `%` in the path would be read as a query string or an escape (the catalog would land elsewhere)."""
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


# ---- migrations --------------------------------------------------------------------------------------
def _v1_to_v2(session: Session) -> None:
    """Schema 2 adds camera make/model and GPS position to items (the types CatalogText gives)."""
    text = "TEXT" if session.get_bind().dialect.name == "postgresql" else "VARCHAR(100)"
    for column, kind in (("camera_make", text), ("camera_model", text), ("gps_lat", "FLOAT"), ("gps_lon", "FLOAT")):
        session.execute(sql_text(f"ALTER TABLE items ADD COLUMN {column} {kind}"))


def _v2_to_v3(session: Session) -> None:
    """Schema 3 stores every file name, UTF-8 or not, as a catalog path (store/paths.py): undecodable bytes
    as `\\xHH`, a real backslash doubled. Names with a backslash are rewritten so (the rest, nearly all, are
    already in that form); skips of names that were not UTF-8 go, as their stored form was lossy and such
    files are now indexed (skips are retried on every run anyway).

    Portable SQL (LIKE with an explicit ESCAPE, replace()), so the same step runs on PostgreSQL."""
    for name in ("items", "skipped"):
        t = sql_table(name, sql_column("path"))
        session.execute(update(t).where(t.c.path.contains("\\", autoescape=True))
                        .values(path=func.replace(t.c.path, "\\", "\\\\")))
    skipped = sql_table("skipped", sql_column("reason"))
    session.execute(delete(skipped).where(skipped.c.reason == "file name is not valid UTF-8"))


def _v3_to_v4(session: Session) -> None:
    """Schema 4: on PostgreSQL the path's uniqueness (items' unique index, skipped's primary key) moves to
    exclusion constraints on hash indexes (`path_exclusion`), so paths longer than a B-tree entry index too,
    and one caption per corpus becomes a partial index over captions (CAPTIONS_ONLY). SQLite is unchanged.
    Idempotent: a table whose constraint has the new form already is left as it is."""
    if session.get_bind().dialect.name != "postgresql":
        return
    captions = session.execute(sql_text("SELECT 1 FROM pg_constraint WHERE conname = 'uq_items_corpus_text' AND "
                                        "conrelid = CAST('items' AS regclass)")).first()
    if captions is not None:  # schema 3's unique constraint: the partial index of captions only (CAPTIONS_ONLY)
        session.execute(sql_text("ALTER TABLE items DROP CONSTRAINT uq_items_corpus_text"))
        session.execute(sql_text("CREATE UNIQUE INDEX uq_items_corpus_text ON items (corpus, sha256) "
                                 "WHERE corpus IS NOT NULL"))
    for table, old_kind in (("items", "u"), ("skipped", "p")):
        found = session.execute(sql_text("SELECT conname, contype, pg_get_constraintdef(oid) FROM pg_constraint "
                                         "WHERE conrelid = CAST(:t AS regclass)"), {"t": table}).all()
        if any(name == f"ex_{table}_path" for name, _, _ in found):
            continue
        for name, kind, definition in found:
            if kind == old_kind and definition.endswith("(path)"):  # UNIQUE (path) / PRIMARY KEY (path)
                session.execute(sql_text(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'))
        if table == "skipped":  # the primary key made it NOT NULL; say so on its own
            session.execute(sql_text("ALTER TABLE skipped ALTER COLUMN path SET NOT NULL"))
        session.execute(sql_text(path_exclusion(table)))


def _v4_to_v5(session: Session) -> None:
    """Schema 5: the exact store is segments, named by `segs.<modality>` with sums per segment
    (exact_segments.py). No table changes; an older catalog's one vector file becomes its one segment. The
    version step is what matters: an older crossmodal, which reads `gen.<modality>` as the whole store, refuses
    a catalog of segments (schema too new) instead of taking its newest segment for all of it."""
    meta = {m.key: m.value for m in session.scalars(select(Meta).where(Meta.key.like("%.%")))}
    for modality in ("image", "text"):
        gen = int(meta.get(f"gen.{modality}", "0") or 0)
        if gen and f"segs.{modality}" not in meta:
            session.merge(Meta(key=f"segs.{modality}", value=json.dumps([gen])))
            if f"sums.{modality}" in meta:
                session.merge(Meta(key=f"sums.{modality}.{gen}", value=meta[f"sums.{modality}"]))
                session.execute(delete(Meta).where(Meta.key == f"sums.{modality}"))


LADDER: dict[int, Callable[[Session], None]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4, 4: _v4_to_v5}  # found -> +1


def migrate(session: Session, found: int) -> None:
    """The migration ladder: step found -> found+1 until current. Version 1 is the first schema."""
    while found < SCHEMA_VERSION:
        step = LADDER.get(found)
        if step is None:
            raise SchemaTooNew(f"catalog schema {found} cannot be upgraded by this crossmodal")
        step(session)
        found += 1


def _no_writer_elsewhere(session: Session, home: Path) -> None:
    """A reader that migrates a PostgreSQL catalog holds the writers' advisory lock for its transaction, so a
    writer on another machine (whom the home's file lock may not reach) cannot run meanwhile."""
    from retrieval.store.pg_lock import KEY

    if not session.execute(sql_text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": KEY}).scalar():
        raise IndexLocked(f"the catalog of {home} needs an upgrade, but a writer is running; run this again "
                          f"when it finishes")


def prepare(engine: Engine, home: Path, writable: bool) -> None:
    """Make the tables (writers), refuse a newer schema, migrate an older one in one transaction.

    A read-only store comes here only for an older catalog: it migrates too (holding the writer lock
    meanwhile), so queries keep working after an upgrade.
    """
    if writable:
        if not inspect(engine).has_table("items"):
            Base.metadata.create_all(engine)
        else:  # tables of an older schema are migrated below, never recreated
            Base.metadata.create_all(engine, tables=[Base.metadata.tables[t] for t in ("meta", "skipped")])
    lock: WriterLock | None = None
    try:
        with Session(engine) as s, s.begin():
            row = s.get(Meta, "schema_version")
            if row is None:
                if not writable:
                    raise no_catalog(home)
                s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            found = int(row.value)
            if found > SCHEMA_VERSION:
                raise schema_too_new(home, found)
            if found < SCHEMA_VERSION:
                lock = None if writable else WriterLock(home)
                if not writable and engine.dialect.name == "postgresql":
                    _no_writer_elsewhere(s, home)
                migrate(s, found)
                row.value = str(SCHEMA_VERSION)
    finally:
        if lock:
            lock.release()

"""The SQLite catalog (through SQLAlchemy): one row per indexed item, plus meta and skipped files."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .records import SCHEMA_VERSION  # noqa: F401  (defined there so read-only stores need no SQLAlchemy)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Item(Base):
    """An image file or a caption; its integer id is also its FAISS id (never reused: AUTOINCREMENT)."""

    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("path", name="uq_items_path"),
        UniqueConstraint("corpus", "sha256", name="uq_items_corpus_text"),
        Index("ix_items_modality", "modality"),
        Index("ix_items_sha256", "sha256"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    modality: Mapped[str] = mapped_column(String(8))
    path: Mapped[str | None] = mapped_column(Text)
    corpus: Mapped[str | None] = mapped_column(String(200))
    row: Mapped[int | None] = mapped_column(Integer)
    text: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    bytes: Mapped[int | None] = mapped_column(Integer)
    mtime: Mapped[float | None] = mapped_column(Float)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    taken_at: Mapped[str | None] = mapped_column(String(32))
    camera_make: Mapped[str | None] = mapped_column(String(100))  # schema 2
    camera_model: Mapped[str | None] = mapped_column(String(100))  # schema 2
    gps_lat: Mapped[float | None] = mapped_column(Float)  # schema 2
    gps_lon: Mapped[float | None] = mapped_column(Float)  # schema 2
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Meta(Base):
    """Key/value facts about the index: schema version, model fingerprint, vector generations."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Skipped(Base):
    """Files the last runs could not index, with the reason (for reports; retried on each run)."""

    __tablename__ = "skipped"
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers keep working while the indexer commits
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine with durable SQLite settings; other URLs (PostgreSQL) pass through unchanged."""
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine

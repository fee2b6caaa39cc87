"""The catalog's read interface: every read the store (and the indexer, through it) makes, backend-free.

Why a Protocol: the Store never runs a SELECT itself; it asks a `CatalogReader`, so one class per catalog
backend holds all of the read SQL (`sqlite_reader.SqliteReader` on the standard library's sqlite3,
`pg_reader.PgReader` on psycopg), and query processes read without importing SQLAlchemy.
Writes and migrations stay on SQLAlchemy (store/schema.py, store/writes.py).

This module imports only the standard library and numpy, like every reader implementation must.
Rows come back as plain tuples in `ITEM_FIELDS` order (ItemView's field order), so the caller builds its
own view objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import numpy as np

ITEM_FIELDS = ("id", "modality", "path", "corpus", "row", "text", "width", "height", "taken_at", "bytes",
               "camera_make", "camera_model", "gps_lat", "gps_lon", "sha256")

DateBound = tuple[str, float]  # (ISO text for the EXIF date, timestamp for the file time)


@runtime_checkable
class CatalogReader(Protocol):
    """Read-only access to one catalog. Implementations must be safe to share between threads and must
    never block a writer (the indexer commits while the page and one-shot queries read)."""

    def close(self) -> None:
        """Release the connection; the reader is unusable afterwards."""

    def snapshot(self) -> AbstractContextManager[CatalogReader]:
        """Reads inside see one committed state (meta and ids of the same commit, as loading needs)."""

    def hold(self, hold_s: float | None = None) -> None:
        """Keep one committed state for every later read (a read-only Store's rows then match the vectors
        it loaded), until `release` or, after `hold_s` seconds, by itself (writers' checkpoints wait)."""

    def release(self) -> None:
        """End a `hold`: later reads see the latest commit. Idempotent."""

    # ---- meta --------------------------------------------------------------------------------------
    def has_catalog(self) -> bool:
        """Whether the catalog's tables exist at all (a file that is not a catalog has none)."""

    def schema_version(self) -> int | None:
        """The recorded schema version; None when the catalog never recorded one."""

    def meta(self) -> dict[str, str]:
        """Every meta key and value: model fingerprint, vector generations, ANN state."""

    # ---- ids ---------------------------------------------------------------------------------------
    def ids(self, modality: str) -> np.ndarray:
        """Every id of a modality (int64), for the agreement check with the vector file."""

    def text_ids(self, corpus: str) -> np.ndarray:
        """Ids of one corpus's captions (int64), to restrict a caption search."""

    def image_ids(self, under: str | None = None, camera: str | None = None, after: DateBound | None = None,
                  before: DateBound | None = None) -> np.ndarray:
        """Ids of images passing a filter: a folder (or exact file), a camera substring (case-insensitive),
        and dates; the EXIF date compares as text, the file time (for images without one) as a number."""

    # ---- rows --------------------------------------------------------------------------------------
    def items(self, ids: Iterable[int]) -> dict[int, tuple[Any, ...]]:
        """id -> row in ITEM_FIELDS order, for the ids that exist (negative ids are ignored)."""

    def image_shas(self, ids: Iterable[int]) -> dict[int, str]:
        """id -> content hash, for move detection."""

    def corpora(self) -> dict[str, int]:
        """Caption corpus -> how many captions it holds, by name."""

    def cameras(self, limit: int = 200) -> list[str]:
        """Distinct "make model" strings of indexed images, most common first."""

    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of files the indexer could not read, by path."""

    def image_folders(self) -> list[str]:
        """Sorted distinct parent folders of the indexed images (the page's folder filter)."""

    # ---- the indexer's reads -----------------------------------------------------------------------
    def image_files(self) -> dict[str, tuple[int, int | None, float | None]]:
        """path -> (id, bytes, mtime) of every indexed image, for the rescan diff."""

    def all_image_shas(self) -> set[str]:
        """Every content hash the image rows hold (what caches keyed by content must keep)."""

    def shas_in_use(self, shas: Iterable[str]) -> set[str]:
        """Which of these content hashes some image row still has."""

    def text_hashes(self, corpus: str) -> set[str]:
        """Hashes of the captions a corpus holds, so re-adding a file adds only what is new."""

    def catalog_bytes(self) -> int:
        """What the catalog takes where it is stored (`info`'s size: a SQLite file with its WAL, or the
        PostgreSQL tables with their indexes and TOAST)."""

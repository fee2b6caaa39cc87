"""The store's plain values and constants, free of SQLAlchemy.

Why a module of its own: a one-shot query process (`crossmodal search`) needs these types but not the ORM,
whose import alone costs 0.3-0.4 s of a 1 s budget. The package (`retrieval.store`) re-exports the public
names, so callers write `from retrieval.store import ImageFilter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import IndexMissing, SchemaTooNew, UserError
from retrieval.media.photo_meta import PhotoMeta

MODALITIES = ("image", "text")
CATALOG = "catalog.sqlite"
SCHEMA_VERSION = 2  # schema.py's tables; read-only stores compare against it without importing them


def schema_too_new(home: Path, found: int) -> SchemaTooNew:
    """The refusal of a catalog a newer crossmodal wrote (the reader's check and the migration share it)."""
    return SchemaTooNew(f"index in {home} was written by a newer crossmodal "
                        f"(schema {found} > {SCHEMA_VERSION}); upgrade crossmodal")


def no_catalog(home: Path) -> IndexMissing:
    """The refusal of a catalog file without a recorded schema (not ours, or never finished)."""
    return IndexMissing(f"{home} holds no crossmodal catalog")


@dataclass(frozen=True)
class ImageRecord:
    """What the indexer learned about one image file."""

    path: str
    sha256: str
    bytes: int
    mtime: float
    width: int
    height: int
    meta: PhotoMeta = PhotoMeta()


@dataclass(frozen=True)
class TextRecord:
    """One caption of a named corpus; `sha256` is of the text and dedupes within the corpus."""

    corpus: str
    row: int
    text: str
    sha256: str


@dataclass(frozen=True)
class ImageFilter:
    """Restrict image results: a folder prefix and a capture-date range (EXIF date, else file time).

    Dates are ISO strings ('2024-05-01' or '2024-05-01T12:00:00'); `after` is inclusive, `before` exclusive.
    """

    under: str | None = None
    after: str | None = None
    before: str | None = None
    camera: str | None = None  # case-insensitive substring of "make model"

    def active(self) -> bool:
        return bool(self.under or self.after or self.before or self.camera)


def _iso_to_ts(text: str) -> float:
    from datetime import datetime

    try:
        dt = datetime.fromisoformat(text)
    except ValueError as e:
        raise UserError(f"'{text}' is not a date (use YYYY-MM-DD)") from e
    return dt.timestamp()


def date_bound(text: str) -> tuple[str, float]:
    """(ISO text, timestamp) of a filter date: the EXIF date compares as text, the file time as a number."""
    return (text if "T" in text else text + "T00:00:00"), _iso_to_ts(text)


@dataclass(frozen=True)
class QueryOptions:
    """Per-query ANN settings: exact search, or a knob overriding the tuned one."""

    exact: bool = False
    nprobe: int | None = None
    ef_search: int | None = None


@dataclass(frozen=True)
class ItemView:
    """A catalog row as plain values, safe to hand to the CLI and the page.

    The field order is the catalog reader's column order (reader.ITEM_FIELDS), so `ItemView(*row)` works.
    """

    id: int
    modality: str
    path: str | None
    corpus: str | None
    row: int | None
    text: str | None
    width: int | None
    height: int | None
    taken_at: str | None
    bytes: int | None
    camera_make: str | None = None
    camera_model: str | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None
    sha256: str | None = None

    @property
    def meta(self) -> PhotoMeta:
        """The EXIF facts of an image row."""
        return PhotoMeta(self.taken_at, self.camera_make, self.camera_model, self.gps_lat, self.gps_lon)

    @property
    def camera(self) -> str | None:
        return self.meta.camera

"""The store's plain values and constants, free of SQLAlchemy.

Why a module of its own: a one-shot query process (`crossmodal search`) needs these types but not the ORM,
whose import alone costs 0.3-0.4 s of a 1 s budget. The package (`retrieval.store`) re-exports the public
names, so callers write `from retrieval.store import ImageFilter`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from retrieval.errors import IndexMissing, SchemaTooNew, UserError
from retrieval.media.photo_meta import PhotoMeta

MODALITIES = ("image", "text")
CATALOG = "catalog.sqlite"
SCHEMA_VERSION = 5  # schema.py's tables; read-only stores compare against it without importing them


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

    path: str  # a catalog path (paths.py): any file name as valid text
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

    Dates are strings in one of DATE_FORMS ('2024-05-01', '2024-05-01T12:00', '2024-05-01 12:00:30'; an
    offset such as '+02:00' is turned into local time, as cameras record it); `date_bound` parses them and
    refuses anything else (a UserError naming the forms). `after` is inclusive, `before` exclusive.
    """

    under: str | None = None
    after: str | None = None
    before: str | None = None
    camera: str | None = None  # case-insensitive substring of "make model"

    def active(self) -> bool:
        return bool(self.under or self.after or self.before or self.camera)


DATE_FORMS = "YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] ('T' or a space; optional offset such as +02:00)"
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})"
                   r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?"
                   r"(Z|[+-](?:[01]\d|2[0-3]):?[0-5]\d)?)?", re.ASCII)


def parse_date(text: str) -> datetime:
    """A filter date as a naive local datetime; only DATE_FORMS pass.

    Why so strict: Python's fromisoformat also takes '20230101' and '2023-W01-1', whose text never compares
    correctly with the stored EXIF dates; a user error beats silently wrong results.
    """
    m = _DATE.fullmatch(text.strip())
    if m is None:
        raise UserError(f"'{text}' is not a date (use {DATE_FORMS})")
    y, mo, d, hh, mm, ss, frac, off = m.groups()
    try:
        dt = datetime(int(y), int(mo), int(d), int(hh or 0), int(mm or 0), int(ss or 0),
                      int((frac or "0").ljust(6, "0")))
        if off:
            sign = -1 if off[0] == "-" else 1
            digits = off[1:].replace(":", "")
            delta = timedelta(hours=int(digits[:2]), minutes=int(digits[2:])) if off != "Z" else timedelta(0)
            dt = dt.replace(tzinfo=timezone(sign * delta)).astimezone().replace(tzinfo=None)
        dt.timestamp()  # years the platform's clock cannot represent fail here, not in the query
    except (ValueError, OverflowError, OSError) as e:
        raise UserError(f"'{text}' is not a date ({e}; use {DATE_FORMS})") from None
    return dt


def date_bound(text: str) -> tuple[str, float]:
    """(ISO text, timestamp) of a filter date: the EXIF date compares as text, the file time as a number.

    The text has the stored EXIF form ('2023-06-15T12:00:00', local time, no offset), so the text comparison
    orders like the times it spells.
    """
    dt = parse_date(text)
    return dt.isoformat(), dt.timestamp()


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
    path: str | None  # a catalog path (paths.py): display_path to show it, from_catalog to open it
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

"""What EXIF says about a photo, as one value: read by media/decode.py, carried by the indexer's ImageRecord,
stored as catalog columns. Its own module so the store can name it without importing Pillow."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PhotoMeta:
    """Every field is optional because most files lack some."""

    taken_at: str | None = None  # ISO 8601, from DateTimeOriginal (else DateTime)
    camera_make: str | None = None
    camera_model: str | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None

    @property
    def camera(self) -> str | None:
        """"make model" as people name a camera, None without either."""
        parts = [p for p in (self.camera_make, self.camera_model) if p]
        return " ".join(parts) or None

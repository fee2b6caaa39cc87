"""Small JPEG renditions for the page, so the browser never receives a full-size original.

Pure Pillow (no Streamlit): the page caches the results, the benchmark calls the same functions.
"""

from __future__ import annotations

import io
import os

from PIL import Image, ImageOps

from retrieval.errors import DecodeError, InputNotFound
from retrieval.fsutil import read_bytes
from retrieval.media.decode import load_image

THUMB_PX = 256
PREVIEW_PX = 1024


def file_key(path: str) -> tuple[int, int] | None:
    """(mtime_ns, size) of a catalog path, the cache key that notices edited files; None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def render(data: bytes, px: int = THUMB_PX, square: bool = False, quality: int = 82) -> bytes:
    """Image bytes -> upright RGB JPEG within px x px (center-cropped to a square for the grid).

    JPEG draft mode decodes at a reduced DCT scale first, so a 12 MP photo costs a fraction of a full decode.
    """
    img, _, _, _ = load_image(data, target=px)
    if square:
        img = ImageOps.fit(img, (px, px), Image.Resampling.LANCZOS)
    else:
        img.thumbnail((px, px), Image.Resampling.LANCZOS if px <= THUMB_PX else Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def render_file(path: str, px: int = THUMB_PX, square: bool = False) -> bytes | None:
    """A rendition of an indexed file, or None when it is missing or no longer decodes."""
    try:
        return render(read_bytes(path), px, square)
    except (InputNotFound, DecodeError):
        return None


def placeholder(px: int = THUMB_PX) -> bytes:
    """A neutral grey square for files that vanished or broke since they were indexed."""
    buf = io.BytesIO()
    Image.new("RGB", (px, px), (200, 200, 200)).save(buf, "JPEG", quality=60)
    return buf.getvalue()

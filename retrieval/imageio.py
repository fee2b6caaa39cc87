"""Bytes -> RGB pixels, the same way for indexed files and for query uploads.

Decoding is cheap to get wrong (rotated phone photos, CMYK, palettes, bombs), so every path that turns
a file into model input goes through `load_image` and `prepare`. Imports only Pillow and numpy: this
module runs inside decode worker processes, which must stay light.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import MAX_IMAGE_PIXELS
from .errors import DecodeError, InputNotFound

_heif_registered = False


def _register_heif() -> None:
    """pillow-heif adds HEIC/HEIF to Pillow; optional so a broken install only costs those formats."""
    global _heif_registered
    if _heif_registered:
        return
    _heif_registered = True
    try:
        from pillow_heif import register_heif_opener

        register_heif_opener()
    except Exception:  # noqa: BLE001 - a missing or broken plugin just means no HEIC support
        pass


@dataclass(frozen=True)
class Preprocess:
    """The model's input geometry and normalisation, read from open_clip's preprocess config."""

    size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill_color: int = 0


@dataclass(frozen=True)
class DecodedImage:
    """Model-ready pixels plus the facts the catalog keeps about the original."""

    pixels: np.ndarray  # uint8, (size, size, 3)
    width: int
    height: int
    taken_at: str | None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    _register_heif()
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise DecodeError("not a recognised image format") from e
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file, not a crash
        raise DecodeError(f"cannot read image header: {e}") from e
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DecodeError("image has no pixels")
    if w * h > max_pixels:
        raise DecodeError(f"image too large ({w}x{h} pixels, limit {max_pixels:,})")
    return img


def _taken_at(img: Image.Image) -> str | None:
    """EXIF DateTimeOriginal (else DateTime) as ISO 8601, or None."""
    try:
        exif = img.getexif()
        raw = exif.get_ifd(0x8769).get(0x9003) or exif.get(0x0132)
        if not raw:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return datetime.strptime(text.strip().rstrip("\x00")[:19], "%Y:%m:%d %H:%M:%S").isoformat()
    except Exception:  # noqa: BLE001 - bad EXIF must never cost the image
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Flatten any mode (P with transparency, LA, RGBA, CMYK, I;16, ...) onto white, as RGB."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def load_image(data: bytes, target: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS
               ) -> tuple[Image.Image, int, int, str | None]:
    """Decode bytes to an upright RGB image (first frame), optionally JPEG-draft-reduced toward `target`.

    Returns (image, original width, original height, taken_at); width and height are after EXIF rotation.
    Raises DecodeError for anything that is not a decodable image.
    """
    img = _open(data, max_pixels)
    try:
        taken = _taken_at(img)
        orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
        w, h = img.size
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        if target and img.format == "JPEG":
            # DCT-domain downscale: decodes 12 MP photos several times faster, never below `target`.
            img.draft("RGB", (target, target))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            img = _to_rgb(img)
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"corrupt or truncated image: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise DecodeError(f"cannot decode image: {e}") from e
    return img, w, h, taken


def _resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision Resize(int) arithmetic: short side -> size, long side truncated proportionally."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def prepare(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """Resize and crop exactly as open_clip's transform does, stopping before float conversion (uint8 HWC)."""
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(pre.interpolation, Image.BICUBIC)
    s = pre.size
    if pre.resize_mode == "squash":
        out = img.resize((s, s), resample)
    elif pre.resize_mode == "longest":
        w, h = img.size
        scale = s / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        small = img.resize((nw, nh), resample)
        out = Image.new("RGB", (s, s), (pre.fill_color,) * 3)
        out.paste(small, ((s - nw) // 2, (s - nh) // 2))
    else:
        w, h = img.size
        nw, nh = _resized_size(w, h, s)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample)
        left = int(round((nw - s) / 2.0))
        top = int(round((nh - s) / 2.0))
        out = img.crop((left, top, left + s, top + s))
    return np.array(out, dtype=np.uint8)  # a writable copy: torch refuses read-only buffers


def decode_for_model(data: bytes, pre: Preprocess, max_pixels: int = MAX_IMAGE_PIXELS) -> DecodedImage:
    """Bytes -> model-ready uint8 pixels and catalog facts; the one path for index and query images."""
    img, w, h, taken = load_image(data, target=pre.size, max_pixels=max_pixels)
    return DecodedImage(pixels=prepare(img, pre), width=w, height=h, taken_at=taken)


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a query or corpus file, turning OS errors into one-line user errors."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError as e:
        raise InputNotFound(f"no such file: {p}") from e
    except IsADirectoryError as e:
        raise InputNotFound(f"is a directory, not a file: {p}") from e
    except PermissionError as e:
        raise InputNotFound(f"permission denied: {p}") from e
    except OSError as e:
        raise InputNotFound(f"cannot read {p}: {e.strerror or e}") from e


def sha256_hex(data: bytes) -> str:
    """Content hash stored per item (moved-file detection and dedupe build on it)."""
    return hashlib.sha256(data).hexdigest()

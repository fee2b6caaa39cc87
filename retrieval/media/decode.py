"""Bytes -> RGB pixels, the same way for indexed files and for query uploads.

Decoding is cheap to get wrong (rotated phone photos, CMYK, palettes, bombs), so every path that turns
a file into model input goes through `load_image` and `prepare`. Imports only Pillow and numpy: this
module runs inside decode worker processes, which must stay light.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from retrieval.config import MAX_IMAGE_PIXELS, RAW_EXTENSIONS, THUMB_SIZE
from retrieval.errors import DecodeError
from retrieval.media.photo_meta import PhotoMeta

_heif_registered = False
# Our own pixel cap (checked before decoding) replaces Pillow's warning-then-error thresholds.
Image.MAX_IMAGE_PIXELS = None


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

    def to_json(self) -> dict[str, object]:
        """As recorded in the catalog and in ONNX exports."""
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "resize_mode": self.resize_mode,
                "interpolation": self.interpolation, "fill_color": self.fill_color}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Preprocess:
        mean, std = (float(v) for v in raw["mean"]), (float(v) for v in raw["std"])
        return cls(size=int(raw["size"]), mean=(next(mean), next(mean), next(mean)),
                   std=(next(std), next(std), next(std)), resize_mode=str(raw["resize_mode"]),
                   interpolation=str(raw["interpolation"]), fill_color=int(raw["fill_color"]))


@dataclass(frozen=True)
class DecodedImage:
    """Model-ready pixels plus the facts the catalog keeps about the original."""

    pixels: np.ndarray  # uint8, (size, size, 3)
    width: int
    height: int
    meta: PhotoMeta
    thumbnail: bytes | None = None  # JPEG, THUMB_SIZE on the short side


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


def _exif_text(value: object) -> str | None:
    if value is None:
        return None
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    text = text.strip().strip("\x00").strip()
    return text or None


def _gps_degrees(dms: object, ref: object) -> float | None:
    if not isinstance(dms, (tuple, list)):
        return None
    try:
        d, m, sec = (float(x) for x in dms)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = d + m / 60.0 + sec / 3600.0
    if _exif_text(ref) in ("S", "W"):
        value = -value
    return round(value, 7)


def photo_meta(img: Image.Image) -> PhotoMeta:
    """EXIF capture time (DateTimeOriginal, else DateTime) as ISO 8601, camera make/model, GPS."""
    try:
        exif = img.getexif()
    except Exception:  # noqa: BLE001 - bad EXIF must never cost the image
        return PhotoMeta()
    taken = None
    try:
        raw = exif.get_ifd(0x8769).get(0x9003) or exif.get(0x0132)
        text = _exif_text(raw)
        if text:
            taken = datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S").isoformat()
    except Exception:  # noqa: BLE001
        taken = None
    lat = lon = None
    try:
        gps = exif.get_ifd(0x8825)
        if gps:
            lat = _gps_degrees(gps.get(2), gps.get(1))
            lon = _gps_degrees(gps.get(4), gps.get(3))
            if lat is not None and not -90 <= lat <= 90 or lon is not None and not -180 <= lon <= 180:
                lat = lon = None
    except Exception:  # noqa: BLE001
        lat = lon = None
    try:
        make, model = _exif_text(exif.get(0x010F)), _exif_text(exif.get(0x0110))
    except Exception:  # noqa: BLE001
        make = model = None
    return PhotoMeta(taken_at=taken, camera_make=make, camera_model=model, gps_lat=lat, gps_lon=lon)


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


def _raw_image(data: bytes, target: int | None) -> tuple[Image.Image, PhotoMeta]:
    """Camera RAW via rawpy: the embedded JPEG preview when it is big enough, else a half-size develop."""
    try:
        import rawpy
    except ImportError as e:
        raise DecodeError("camera RAW support needs the rawpy package (pip install rawpy)") from e
    meta = PhotoMeta()
    try:  # most RAW containers are TIFF-like: Pillow can often read their EXIF
        with Image.open(io.BytesIO(data)) as container:
            meta = photo_meta(container)
    except Exception:  # noqa: BLE001
        pass
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            flip = raw.sizes.flip
            try:
                thumb = raw.extract_thumb()
            except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
                thumb = None
            img: Image.Image | None = None
            if thumb is not None:
                if thumb.format == rawpy.ThumbFormat.JPEG:
                    preview: Image.Image = Image.open(io.BytesIO(bytes(thumb.data)))
                    preview.load()
                else:
                    preview = Image.fromarray(np.asarray(thumb.data))
                preview = _to_rgb(preview)
                preview = preview.transpose(_RAW_FLIP[flip]) if flip in _RAW_FLIP else preview
                if not target or min(preview.size) >= target:  # a tiny preview would blur the embedding
                    img = preview
            if img is None:
                img = Image.fromarray(raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8))
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - LibRaw errors come in many types
        raise DecodeError(f"cannot decode camera RAW: {e}") from e
    return img, meta


_RAW_FLIP = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}


def load_image(data: bytes, target: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
               raw: bool = False) -> tuple[Image.Image, int, int, PhotoMeta]:
    """Decode bytes to an upright RGB image (first frame), optionally JPEG-draft-reduced toward `target`.

    Returns (image, original width, original height, metadata); width and height are after EXIF rotation.
    `raw` routes camera RAW files through rawpy. Raises DecodeError for anything that is not an image.
    """
    if raw:
        img, meta = _raw_image(data, target)
        return img, img.size[0], img.size[1], meta
    img = _open(data, max_pixels)
    try:
        meta = photo_meta(img)
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
    return img, w, h, meta


MAX_ASPECT = 4.0


def _limit_aspect(img: Image.Image, max_aspect: float) -> Image.Image:
    """Center-crop panoramas beyond `max_aspect`: the model only sees the center anyway, and resizing a
    1x60000 strip's short side to 224 would allocate billions of pixels."""
    w, h = img.size
    if max(w, h) <= max_aspect * min(w, h):
        return img
    if w > h:
        nw = int(max_aspect * h)
        left = (w - nw) // 2
        return img.crop((left, 0, left + nw, h))
    nh = int(max_aspect * w)
    top = (h - nh) // 2
    return img.crop((0, top, w, top + nh))


def _resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision Resize(int) arithmetic: short side -> size, long side truncated proportionally."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def prepare(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """Resize and crop exactly as open_clip's transform does, stopping before float conversion (uint8 HWC)."""
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}.get(
        pre.interpolation, Image.Resampling.BICUBIC)
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
        img = _limit_aspect(img, MAX_ASPECT)
        w, h = img.size
        nw, nh = _resized_size(w, h, s)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample)
        left = int(round((nw - s) / 2.0))
        top = int(round((nh - s) / 2.0))
        out = img.crop((left, top, left + s, top + s))
    return np.array(out, dtype=np.uint8)  # a writable copy: torch refuses read-only buffers


def make_thumbnail(img: Image.Image, short_side: int = THUMB_SIZE, quality: int = 82) -> bytes:
    """A small JPEG for the page and the reranker; never larger than the source.

    Made from the draft decode, which is at most about twice the thumbnail's size, so a bilinear (triangle)
    filter loses nothing visible, and Huffman optimisation is left out: together they halve the
    thumbnail's cost (2.4 -> 1.3 ms a 2 MP photo, about 3% of indexing at bf16) for ~4% larger files."""
    img = _limit_aspect(img, MAX_ASPECT)
    w, h = img.size
    scale = min(1.0, short_side / max(1, min(w, h)))
    small = img if scale >= 1.0 else img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                  Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def decode_for_model(data: bytes, pre: Preprocess, max_pixels: int = MAX_IMAGE_PIXELS, raw: bool = False,
                     thumbnail: bool = False) -> DecodedImage:
    """Bytes -> model-ready uint8 pixels and catalog facts; the one path for index and query images."""
    # One draft target for index and query alike, so an indexed photo used as a query gives its own vector.
    target = max(pre.size, THUMB_SIZE)
    img, w, h, meta = load_image(data, target=target, max_pixels=max_pixels, raw=raw)
    thumb = make_thumbnail(img) if thumbnail else None
    return DecodedImage(pixels=prepare(img, pre), width=w, height=h, meta=meta, thumbnail=thumb)


def is_raw_name(name: str) -> bool:
    """Camera RAW files are routed by extension: Pillow would misread many of them as small TIFFs."""
    return Path(name).suffix.lower() in RAW_EXTENSIONS

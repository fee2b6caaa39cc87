"""Batched JPEG decoding on the GPU (nvJPEG through torchvision) that gives the CPU path's model input.

The CPU path (`media.decode.decode_for_model`) is the reference: Pillow's draft mode (DCT-domain 1/2, 1/4, 1/8
reduction toward the 256-pixel target), EXIF orientation, panorama crop, bicubic resize and center crop.
Here the same geometry is replayed on tensors: full decode, a box reduction by the draft factor, the
orientation as flips/transposes, then the same integer crop and resize arithmetic. Pixels agree with the
CPU path to within a few levels (tests/test_gpu_fallback.py measures it).

Only files nvJPEG decodes the way libjpeg does are taken: 8-bit baseline or extended-sequential Huffman
JPEGs, grey or YCbCr, with an end-of-image marker, under the pixel cap. Everything else (PNG, HEIC,
progressive, CMYK, arithmetic-coded, truncated) is for the CPU path, which stays the single authority on
bad files. `probe_jpeg` decides, on header bytes only; `decode_jpegs` returns None for any file the GPU
could not decode, so the caller sends that file to the CPU path as well.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from retrieval.config import MAX_IMAGE_PIXELS, THUMB_SIZE
from retrieval.media.decode import MAX_ASPECT, Preprocess, _resized_size, photo_meta
from retrieval.media.photo_meta import PhotoMeta

# Decoded RGB pixels per nvJPEG call, and per float resize step (memory: 3 bytes, then 12, per pixel).
DEFAULT_BATCH_PIXELS = 256_000_000
DEFAULT_OP_PIXELS = 48_000_000
THUMB_QUALITY = 82

_SOF_OK = (0xC0, 0xC1)  # baseline and extended sequential, Huffman-coded
_SOF_ALL = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclass(frozen=True)
class JpegProbe:
    """What the header says: stored size (before orientation), EXIF orientation, draft reduction, meta."""

    width: int
    height: int
    orientation: int
    scale: int
    meta: PhotoMeta

    @property
    def upright(self) -> tuple[int, int]:
        """(width, height) after EXIF orientation: what the catalog records."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


@dataclass(frozen=True)
class GpuImage:
    pixels: Any  # uint8 tensor (size, size, 3) on the decode device
    thumbnail: bytes | None = None


def _frame(data: bytes) -> tuple[int, int, int] | None:
    """(SOF marker, sample precision, component count) from a marker walk; None if not a sane JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            i += 2
            continue
        if m in (0xD9, 0xDA):  # end of image or scan data before any frame header
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            return None
        if m in _SOF_ALL:
            if i + 10 > n:
                return None
            return m, data[i + 4], data[i + 9]
        i += 2 + length
    return None


def _has_eoi(data: bytes) -> bool:
    """Truncated files lack the end marker; nvJPEG may decode them to grey where libjpeg refuses."""
    return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def draft_scale(width: int, height: int, target: int) -> int:
    """Pillow's JPEG draft choice for a square target: the largest of 8, 4, 2, 1 keeping both sides >= target."""
    scale = min(width // target, height // target)
    for s in (8, 4, 2):
        if scale >= s:
            return s
    return 1


def probe_jpeg(data: bytes, pre: Preprocess, max_pixels: int = MAX_IMAGE_PIXELS) -> JpegProbe | None:
    """A probe when the GPU can decode `data` exactly as the CPU path would, else None (use the CPU path).

    Reads headers only (the marker walk and Pillow's lazy open), so it is cheap enough to run per file.
    """
    frame = _frame(data)
    if frame is None or frame[0] not in _SOF_OK or frame[1] != 8 or frame[2] not in (1, 3):
        return None
    if not _has_eoi(data):
        return None
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None  # MPO, CMYK/YCCK and friends: the CPU path knows them
        if frame[2] == 3 and img.info.get("adobe_transform") == 0:
            return None  # RGB-coded (not YCbCr) JPEG: nvJPEG would convert colours it should not
        w, h = img.size
        if w <= 0 or h <= 0 or w * h > max_pixels:
            return None  # the CPU path gives the reason
        meta = photo_meta(img)
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - anything odd in the header: the CPU path decides
        return None
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1  # what ImageOps.exif_transpose does with a value it does not know
    target = max(pre.size, THUMB_SIZE)  # the CPU path's draft target (decode_for_model)
    return JpegProbe(width=w, height=h, orientation=orientation, scale=draft_scale(w, h, target), meta=meta)


# ---- tensor geometry (mirrors media.decode.prepare / make_thumbnail) ----------------------------------


def orient(x: Any, orientation: int) -> Any:
    """Apply EXIF orientation to (..., H, W) tensors, as ImageOps.exif_transpose does to images."""
    import torch

    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-1, -2)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))
    if orientation == 7:
        return x.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))
    return x


def _limit_aspect(x: Any) -> Any:
    h, w = x.shape[-2:]
    if max(w, h) <= MAX_ASPECT * min(w, h):
        return x
    if w > h:
        nw = int(MAX_ASPECT * h)
        left = (w - nw) // 2
        return x[..., :, left:left + nw]
    nh = int(MAX_ASPECT * w)
    top = (h - nh) // 2
    return x[..., top:top + nh, :]


def _resize(x: Any, h: int, w: int, interpolation: str) -> Any:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
    return F.resize(x, [h, w], interpolation=mode, antialias=True)


def model_input(x: Any, pre: Preprocess) -> Any:
    """(n, 3, H, W) uint8 upright images -> (n, 3, size, size) uint8, as media.decode.prepare does."""
    import torch

    s = pre.size
    if pre.resize_mode == "squash":
        return _resize(x, s, s, pre.interpolation)
    if pre.resize_mode == "longest":
        h, w = x.shape[-2:]
        scale = s / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        small = _resize(x, nh, nw, pre.interpolation)
        out = torch.full((x.shape[0], 3, s, s), pre.fill_color, dtype=x.dtype, device=x.device)
        top, left = (s - nh) // 2, (s - nw) // 2
        out[..., top:top + nh, left:left + nw] = small
        return out
    x = _limit_aspect(x)
    h, w = x.shape[-2:]
    nw, nh = _resized_size(w, h, s)
    x = _resize(x, nh, nw, pre.interpolation)
    left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
    return x[..., top:top + s, left:left + s]


def thumbnail_input(x: Any, short_side: int = THUMB_SIZE) -> Any:
    """(n, 3, H, W) -> the thumbnail's pixels, as media.decode.make_thumbnail sizes them."""
    x = _limit_aspect(x)
    h, w = x.shape[-2:]
    scale = min(1.0, short_side / max(1, min(w, h)))
    if scale >= 1.0:
        return x
    return _resize(x, max(1, round(h * scale)), max(1, round(w * scale)), "bilinear")  # as make_thumbnail


def _draft(x: Any, scale: int) -> Any:
    """libjpeg's DCT scaling approximated by a box average (partial edge blocks average what they have)."""
    import torch.nn.functional as F

    if scale <= 1:
        return x
    return F.avg_pool2d(x.float(), scale, ceil_mode=True).round_().clamp_(0, 255).to(x.dtype)


# ---- batched decode ------------------------------------------------------------------------------


def _decode_many(raw: list[Any], device: Any) -> list[Any | None]:
    """One nvJPEG call for the batch; if it fails (one bad stream fails the call), one call per file."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its image IO in favour of torchcodec
        try:
            return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError):
            pass
        out: list[Any | None] = []
        for r in raw:
            try:
                out.append(decode_jpeg([r], mode=ImageReadMode.RGB, device=device)[0])
            except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError):
                out.append(None)
        return out


def _groups(sizes: Sequence[int], budget: int) -> list[list[int]]:
    groups: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if groups[-1] and used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return [g for g in groups if g]


def decode_jpegs(datas: Sequence[bytes], probes: Sequence[JpegProbe], pre: Preprocess, device: Any = "cuda",
                 thumbnails: bool = False, batch_pixels: int = DEFAULT_BATCH_PIXELS,
                 op_pixels: int = DEFAULT_OP_PIXELS) -> list[GpuImage | None]:
    """Decode probed JPEGs on `device` to model input (and thumbnails); None marks a file for the CPU path.

    Memory stays bounded: at most `batch_pixels` decoded pixels per nvJPEG call and `op_pixels` per float
    resize step, whatever the batch. Works on device='cpu' too (torchvision's libjpeg), which is how the
    tests check it on machines without a GPU.
    """
    import torch

    device = torch.device(device)
    results: list[GpuImage | None] = [None] * len(datas)
    sizes = [p.width * p.height for p in probes]
    for group in _groups(sizes, batch_pixels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer on immutable bytes: nvJPEG only reads them
            raw = [torch.frombuffer(datas[i], dtype=torch.uint8) for i in group]
        decoded = _decode_many(raw, device)
        buckets: dict[tuple[int, int, int, int], list[int]] = {}
        for i, t in zip(group, decoded, strict=True):
            p = probes[i]
            if t is None or tuple(t.shape) != (3, p.height, p.width):
                continue
            buckets.setdefault((p.height, p.width, p.orientation, p.scale), []).append(i)
        by_index = {i: t for i, t in zip(group, decoded, strict=True) if t is not None}
        for (h, w, o, s), members in buckets.items():
            per_op = max(1, op_pixels // (h * w))
            for j in range(0, len(members), per_op):
                part = members[j:j + per_op]
                try:
                    out = _finish(torch.stack([by_index.pop(i) for i in part]), o, s, pre, thumbnails)
                except (RuntimeError, torch.cuda.OutOfMemoryError):
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue  # these files go to the CPU path
                for i, img in zip(part, out, strict=True):
                    results[i] = img
        del decoded, by_index
    return results


def _finish(x: Any, orientation: int, scale: int, pre: Preprocess, thumbnails: bool) -> list[GpuImage]:
    x = orient(_draft(x, scale), orientation)
    pixels = model_input(x, pre).permute(0, 2, 3, 1)
    thumbs: list[bytes | None] = [None] * len(x)
    if thumbnails:
        thumbs = _encode_thumbs(thumbnail_input(x))
    return [GpuImage(pixels[i], thumbs[i]) for i in range(len(x))]


def _encode_thumbs(x: Any) -> list[bytes | None]:
    """JPEG-encode thumbnails where the pixels are (nvJPEG on CUDA); a failure only costs the thumbnail,
    which the page and the reranker remake from the original."""
    from torchvision.io import encode_jpeg

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoded = encode_jpeg([t.contiguous() for t in x], quality=THUMB_QUALITY)
        return [bytes(e.cpu().numpy().tobytes()) for e in encoded]
    except (RuntimeError, ValueError):
        return [None] * len(x)

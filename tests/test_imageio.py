"""Decoding: orientation, odd modes, bad bytes, and exact agreement with open_clip's own transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from retrieval.errors import DecodeError
from retrieval.media.decode import Preprocess, decode_for_model, load_image, prepare
from tests.helpers import exif_rotated_jpeg, pattern


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_exif_rotation_applied(tmp_path):
    data = exif_rotated_jpeg(tmp_path / "r.jpg").read_bytes()
    img, w, h, meta = load_image(data)
    assert (w, h) == (80, 120) and img.size == (80, 120)
    assert meta.taken_at == "2021-06-15T10:30:00"


def test_prepare_matches_open_clip_transform():
    import open_clip
    import torch

    _, _, transform = open_clip.create_model_and_transforms("ViT-S-32")
    pre = Preprocess()
    for size in [(300, 200), (200, 300), (224, 224), (390, 100)]:
        img = pattern(sum(size), size)
        ours = torch.from_numpy(prepare(img, pre)).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(pre.mean).view(3, 1, 1)
        std = torch.tensor(pre.std).view(3, 1, 1)
        ours = (ours - mean) / std
        theirs = transform(img)
        assert ours.shape == theirs.shape
        assert torch.allclose(ours, theirs, atol=1e-5), size


def test_panorama_is_center_cropped_without_blowing_up():
    import open_clip
    import torch

    _, _, transform = open_clip.create_model_and_transforms("ViT-S-32")
    pre = Preprocess()
    img = pattern(11, (1400, 100))
    ours = torch.from_numpy(prepare(img, pre)).permute(2, 0, 1).float() / 255.0
    ours = (ours - torch.tensor(pre.mean).view(3, 1, 1)) / torch.tensor(pre.std).view(3, 1, 1)
    assert (ours - transform(img)).abs().mean() < 0.02  # same center, only edge resampling differs
    strip = Image.new("RGB", (1, 60000), (10, 200, 30))
    d = decode_for_model(_bytes(strip, "PNG"), pre, thumbnail=True)
    assert d.pixels.shape == (224, 224, 3) and (d.width, d.height) == (1, 60000)
    thumb = Image.open(io.BytesIO(d.thumbnail))
    assert max(thumb.size) <= 4 * min(thumb.size)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "CMYK", "P", "I;16", "1"])
def test_odd_modes_become_rgb(mode):
    base = pattern(3, (50, 40))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        fmt = "PNG"
    elif mode == "P":
        img = base.convert("P", palette=Image.ADAPTIVE)
        img.info["transparency"] = 0
        fmt = "PNG"
    else:
        img = base.convert(mode)
        fmt = "TIFF" if mode == "CMYK" else "PNG"
    d = decode_for_model(_bytes(img, fmt), Preprocess(size=32))
    assert d.pixels.shape == (32, 32, 3) and d.pixels.dtype == np.uint8
    assert (d.width, d.height) == (50, 40)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (40, 40), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    d = decode_for_model(buf.getvalue(), Preprocess(size=16))
    r, g, b = d.pixels.reshape(-1, 3).mean(0)
    assert r > 200 and b < 50


@pytest.mark.parametrize("data", [b"", b"not an image", b"\xff\xd8\xff\xe0" + b"\x00" * 50])
def test_bad_bytes_raise_decode_error(data):
    with pytest.raises(DecodeError):
        decode_for_model(data, Preprocess())


def test_truncated_jpeg_raises():
    data = _bytes(pattern(1, (200, 200)), "JPEG")
    with pytest.raises(DecodeError):
        decode_for_model(data[: len(data) // 2], Preprocess())


def test_pixel_cap_refuses_before_decoding():
    data = _bytes(Image.new("RGB", (400, 400)), "PNG")
    with pytest.raises(DecodeError, match="too large"):
        decode_for_model(data, Preprocess(), max_pixels=100_000)


def test_jpeg_draft_keeps_enough_resolution():
    data = _bytes(pattern(5, (2000, 1500)), "JPEG")
    img, w, h, _ = load_image(data, target=224)
    assert (w, h) == (2000, 1500)
    assert min(img.size) >= 224 and img.size[0] < 2000


def test_index_and_query_decode_identically():
    """An indexed photo used as a query must reproduce its own pixels (same draft target either way)."""
    data = _bytes(pattern(12, (600, 500)), "JPEG")
    indexed = decode_for_model(data, Preprocess(), thumbnail=True)
    queried = decode_for_model(data, Preprocess())
    assert np.array_equal(indexed.pixels, queried.pixels)


def test_thumbnail_write_failure_keeps_the_image(tmp_path):
    from indexer.decode import Decoded, decode_entry
    from indexer.scan import FileEntry

    p = tmp_path / "a.jpg"
    pattern(13, (80, 60)).save(p)
    home = tmp_path / "home-is-a-file"
    home.write_text("not a folder")
    res = decode_entry(FileEntry(str(p), p.stat().st_size, p.stat().st_mtime), Preprocess(), str(home))
    assert isinstance(res, Decoded)

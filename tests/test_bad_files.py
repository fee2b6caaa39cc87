"""The bad-file zoo: each file is indexed correctly or skipped with a reason, and the run completes."""

from __future__ import annotations

import io
import os
import struct
import sys
import types
import zlib

import numpy as np
import pytest
from PIL import Image

from indexer.pipeline import index_paths
from retrieval.media.decode import Preprocess, decode_for_model
from retrieval.store import ImageFilter, Store
from tests.helpers import exif_rotated_jpeg, pattern


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny file that claims to be width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def jpeg_with_exif(path, seed, make=None, model=None, when=None, gps=None):
    exif = Image.Exif()
    if make:
        exif[0x010F] = make
    if model:
        exif[0x0110] = model
    if when:
        exif.get_ifd(0x8769)[0x9003] = when
    if gps:
        lat, lon = gps
        g = exif.get_ifd(0x8825)
        g[1], g[2] = ("N" if lat >= 0 else "S"), (abs(lat), 0.0, 0.0)
        g[3], g[4] = ("E" if lon >= 0 else "W"), (abs(lon), 0.0, 0.0)
    pattern(seed, (90, 70)).save(path, "JPEG", exif=exif.tobytes())
    return path


def build_zoo(root):
    root.mkdir(parents=True)
    expect_ok, expect_skip = set(), {}

    def ok(name):
        expect_ok.add(str(root / name))

    def skip(name, reason):
        expect_skip[str(root / name)] = reason

    buf = io.BytesIO()
    pattern(1, (200, 150)).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[:900])
    skip("truncated.jpg", "truncated")
    (root / "zero.jpg").write_bytes(b"")
    skip("zero.jpg", "empty file")
    (root / "text.jpg").write_text("hello, I am text\n" * 20)
    skip("text.jpg", "not a recognised image format")
    (root / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    skip("bomb.png", "too large")
    Image.new("RGB", (12000, 4), (200, 10, 10)).save(root / "wide.png")  # huge dimension, small file
    ok("wide.png")
    pattern(2, (64, 48)).convert("CMYK").save(root / "cmyk.jpg", "JPEG")
    ok("cmyk.jpg")
    Image.fromarray(np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)).save(root / "deep.png")
    ok("deep.png")
    pal = pattern(3, (64, 48)).convert("P", palette=Image.ADAPTIVE)
    pal.save(root / "palette.png", transparency=0)
    ok("palette.png")
    frames = [pattern(s, (40, 40)) for s in (4, 5, 6)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    ok("anim.gif")
    frames[0].save(root / "anim.webp", save_all=True, append_images=frames[1:], duration=50)
    ok("anim.webp")
    exif_rotated_jpeg(root / "rotated.jpg")
    ok("rotated.jpg")
    pattern(7, (50, 50)).save(root / "locked.jpg")
    os.chmod(root / "locked.jpg", 0)
    if os.geteuid() == 0:
        ok("locked.jpg")  # root reads anything: indexed correctly
    else:
        skip("locked.jpg", "permission denied")
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    skip("dangling.jpg", "broken symlink")
    os.symlink(root / "loop2.jpg", root / "loop1.jpg")
    os.symlink(root / "loop1.jpg", root / "loop2.jpg")
    skip("loop1.jpg", "cannot stat")
    skip("loop2.jpg", "cannot stat")
    (root / "album.jpg").mkdir()  # a folder named like an image
    pattern(8, (50, 40)).save(root / "album.jpg" / "inside.png")
    ok("album.jpg/inside.png")
    raw_name = os.fsencode(str(root)) + b"/caf\xe9.jpg"  # Latin-1 bytes: not valid UTF-8
    with open(raw_name, "wb") as f:
        pattern(9, (40, 40)).save(f, "JPEG")
    expect_ok.add(str(root) + "/caf\\xe9.jpg")  # indexed, under its catalog path (retrieval/store/paths.py)
    return expect_ok, expect_skip


def test_zoo(tmp_path, encoder):
    expect_ok, expect_skip = build_zoo(tmp_path / "zoo")
    with Store.open(tmp_path / "home", create=True, writable=True) as store:
        store.bind_model(encoder.fingerprint)
        r = index_paths(store, encoder, [str(tmp_path / "zoo")], workers=1, batch_size=4)
        indexed = set(store.image_files())
        skipped = dict(store.skipped())
        views = {v.path: v for v in store.items(i for i, *_ in store.image_files().values()).values()}
    assert indexed == expect_ok
    assert r.added == len(expect_ok)
    for path, reason in expect_skip.items():
        assert reason in skipped.get(path, ""), (path, skipped.get(path))
    assert set(skipped) == set(expect_skip) and len(r.skipped) == len(expect_skip)  # the Latin-1 name is not
    latin = views[str(tmp_path / "zoo") + "/caf\\xe9.jpg"]
    assert (latin.width, latin.height) == (40, 40)
    rot, wide = views[str(tmp_path / "zoo" / "rotated.jpg")], views[str(tmp_path / "zoo" / "wide.png")]
    assert (rot.width, rot.height) == (80, 120) and (wide.width, wide.height) == (12000, 4)


def test_heic_and_avif(tmp_path, encoder):
    from pillow_heif import register_heif_opener

    register_heif_opener()
    lib = tmp_path / "fmt"
    lib.mkdir()
    pattern(20, (96, 64)).save(lib / "phone.heic", quality=80)
    pattern(21, (96, 64)).save(lib / "web.avif", quality=80)
    with Store.open(tmp_path / "home", create=True, writable=True) as store:
        store.bind_model(encoder.fingerprint)
        r = index_paths(store, encoder, [str(lib)], workers=0)
    assert r.added == 2 and not r.skipped


def test_exif_metadata_and_camera_filter(tmp_path, encoder):
    lib = tmp_path / "cams"
    lib.mkdir()
    jpeg_with_exif(lib / "pixel.jpg", 30, "Google", "Pixel 8", "2023:05:01 09:00:00", (48.8584, 2.2945))
    jpeg_with_exif(lib / "canon.jpg", 31, "Canon", "EOS R6", "2019:12:31 23:59:59", (-33.8568, -151.2153))
    jpeg_with_exif(lib / "plain.jpg", 32)
    with Store.open(tmp_path / "home", create=True, writable=True) as store:
        store.bind_model(encoder.fingerprint)
        index_paths(store, encoder, [str(lib)], workers=0)
        ids = [i for i, *_ in store.image_files().values()]
        views = {os.path.basename(v.path): v for v in store.items(ids).values()}
        assert views["pixel.jpg"].camera == "Google Pixel 8"
        pix, can = views["pixel.jpg"], views["canon.jpg"]
        assert (pix.gps_lat, pix.gps_lon) == (pytest.approx(48.8584), pytest.approx(2.2945))
        assert (can.gps_lat, can.gps_lon) == (pytest.approx(-33.8568), pytest.approx(-151.2153))
        assert views["canon.jpg"].taken_at == "2019-12-31T23:59:59"
        assert views["plain.jpg"].camera is None and views["plain.jpg"].taken_at is None

        def names(**kw):
            return sorted(os.path.basename(v.path) for v in store.items(store.image_ids(ImageFilter(**kw))).values())

        assert names(camera="pixel") == ["pixel.jpg"]
        assert names(camera="EOS") == ["canon.jpg"]
        assert names(after="2020-01-01", before="2024-01-01") == ["pixel.jpg"]
        assert names(before="2020-01-01") == ["canon.jpg"]
        os.utime(lib / "plain.jpg", (0, 0))  # no EXIF date: the file time decides
        # (file time is read at index time, so re-index to pick up the new mtime)
        index_paths(store, encoder, [str(lib)], workers=0)
        assert names(before="1971-01-01") == ["plain.jpg"]


def test_raw_uses_embedded_preview(monkeypatch):
    """rawpy path: a large embedded JPEG preview is used as is; a tiny one triggers a half-size develop."""
    preview = io.BytesIO()
    pattern(40, (400, 300)).save(preview, "JPEG")
    calls = {"postprocess": 0}

    class FakeRaw:
        def __init__(self, thumb_bytes):
            self.sizes = types.SimpleNamespace(flip=6)
            self._thumb = thumb_bytes

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def extract_thumb(self):
            return types.SimpleNamespace(format="jpeg", data=self._thumb)

        def postprocess(self, **kw):
            calls["postprocess"] += 1
            return np.full((300, 400, 3), 128, np.uint8)

    small = io.BytesIO()
    pattern(41, (64, 48)).save(small, "JPEG")
    fake = types.SimpleNamespace(
        imread=lambda f: FakeRaw(preview.getvalue() if f.getvalue() == b"big" else small.getvalue()),
        ThumbFormat=types.SimpleNamespace(JPEG="jpeg", BITMAP="bitmap"),
        LibRawNoThumbnailError=type("E1", (Exception,), {}),
        LibRawUnsupportedThumbnailError=type("E2", (Exception,), {}),
    )
    monkeypatch.setitem(sys.modules, "rawpy", fake)
    d = decode_for_model(b"big", Preprocess(), raw=True)
    assert (d.width, d.height) == (300, 400)  # flip 6: the preview is turned upright
    assert calls["postprocess"] == 0
    d = decode_for_model(b"small", Preprocess(), raw=True)
    assert calls["postprocess"] == 1 and (d.width, d.height) == (400, 300)

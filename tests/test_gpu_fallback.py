"""The GPU indexing path, checked on the CPU: batched JPEG decoding vs the CPU decoder (same code with
device='cpu'), per-file fallback, and indexing through the GPU decode path giving the same catalog as the
normal path. The GPU vector helpers and their tests live in bench/ (bench/tests/test_gpu_search.py)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from indexer.decode import Failed, decode_stream
from indexer.gpu_stream import GpuJob, GpuStats, gpu_decode_stream, probe_entry, stack_pixels, wants_gpu_decode
from indexer.pipeline import index_paths
from indexer.scan import scan
from retrieval import hardware
from retrieval.media.decode import Preprocess, decode_for_model
from retrieval.media.gpu_decode import decode_jpegs, draft_scale, orient, probe_jpeg
from retrieval.media.thumbnails import thumb_path
from retrieval.store import Store
from tests.helpers import pattern, run_cli

PRE = Preprocess()


# ---- batched JPEG decoding vs the CPU decoder -----------------------------------------------------


def _jpeg(img: Image.Image, orientation: int = 1, **kw) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    exif[0x010F] = "TestCam"
    exif.get_ifd(0x8769)[0x9003] = "2022:03:04 05:06:07"
    img.save(buf, "JPEG", quality=kw.pop("quality", 90), exif=exif.tobytes(), **kw)
    return buf.getvalue()


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    return pattern(seed, size).filter(ImageFilter.GaussianBlur(1.5))  # photo-like, not pure noise


CASES = [((640, 480), 1), ((640, 480), 6), ((300, 200), 8), ((1000, 200), 3), ((212, 900), 5),
         ((1100, 800), 1), ((1100, 800), 7), ((560, 2600), 6), ((2100, 1500), 2), ((1600, 1200), 1),
         ((2900, 2100), 6)]


@pytest.mark.slow
def test_gpu_decode_matches_cpu_preprocess(encoder, capsys):
    """Same pixels within a few levels: exact geometry, resize rounding, and libjpeg's DCT-domain draft
    reduction replayed as a box average. Tolerances: draft-free files <= 2 levels anywhere; drafted files
    mean <= 2.5 levels and max <= 40 (edges of noisy blocks), and at 1/4 and 1/8 (where skipping the draft
    emulation costs 5-7 levels on average) mean <= 1.5; embeddings of the two inputs nearly identical."""
    datas = [_jpeg(_photo(i, size), o) for i, (size, o) in enumerate(CASES)]
    datas.append(_jpeg(_photo(50, (400, 300)).convert("L"), 6))  # greyscale
    probes = [probe_jpeg(d, PRE) for d in datas]
    assert all(p is not None for p in probes)
    out = decode_jpegs(datas, probes, PRE, "cpu", thumbnails=True)
    cpu = [decode_for_model(d, PRE, thumbnail=True) for d in datas]
    report = []
    for p, g, c in zip(probes, out, cpu, strict=True):
        assert g is not None and tuple(g.pixels.shape) == (224, 224, 3)
        assert p.upright == (c.width, c.height) and p.meta == c.meta
        diff = np.abs(g.pixels.numpy().astype(int) - c.pixels.astype(int))
        report.append(f"{p.width}x{p.height} o{p.orientation} draft/{p.scale}: max {diff.max()} "
                      f"mean {diff.mean():.3f}")
        if p.scale == 1:
            assert diff.max() <= 2, report[-1]
        else:
            assert diff.mean() <= (2.5 if p.scale == 2 else 1.5) and diff.max() <= 40, report[-1]
        assert Image.open(io.BytesIO(g.thumbnail)).size == Image.open(io.BytesIO(c.thumbnail)).size
    assert {p.scale for p in probes} == {1, 2, 4, 8}  # every draft reduction is exercised
    gv = encoder.encode_pixels(stack_pixels([g.pixels for g in out]))
    cv = encoder.encode_pixels(np.stack([c.pixels for c in cpu]))
    cos = (gv * cv).sum(1)
    with capsys.disabled():
        print("\nGPU-path decode vs CPU preprocess (uint8 levels):\n  " + "\n  ".join(report)
              + f"\n  embedding cosine min {cos.min():.5f}")
    assert cos.min() > 0.995


def test_orientation_matches_exif_transpose():
    import torch
    from PIL import ImageOps

    base = pattern(3, (5, 3))
    for o in range(1, 9):
        img = base.copy()
        exif = img.getexif()
        exif[0x0112] = o
        img.info["exif"] = exif.tobytes()
        want = np.asarray(ImageOps.exif_transpose(img))
        got = orient(torch.from_numpy(np.array(base)).permute(2, 0, 1), o).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"orientation {o}")


def test_draft_scale_follows_pillow():
    for size in [(256, 256), (511, 600), (512, 512), (4000, 3000), (4000, 600), (2100, 1023)]:
        img = Image.open(io.BytesIO(_jpeg(Image.new("RGB", size, (90, 120, 30)))))
        img.draft("RGB", (256, 256))
        s = draft_scale(*size, 256)
        assert img.size == ((size[0] + s - 1) // s, (size[1] + s - 1) // s), size


def _bad_jpegs() -> dict[str, bytes]:
    img = _photo(7, (300, 200))
    good = _jpeg(img)

    def enc(im: Image.Image, fmt: str, **kw) -> bytes:
        b = io.BytesIO()
        im.save(b, fmt, **kw)
        return b.getvalue()

    corrupt = bytearray(good)
    sos = corrupt.find(b"\xff\xda")
    rng = np.random.default_rng(0)
    for i in range(sos + 200, len(corrupt) - 10, 7):
        corrupt[i] = int(rng.integers(0, 255))
    return {"png": enc(img, "PNG"), "cmyk": enc(img.convert("CMYK"), "JPEG"),
            "progressive": enc(img, "JPEG", progressive=True), "truncated": good[: len(good) // 2],
            "text": b"not an image at all", "corrupt": bytes(corrupt), "good": good}


def test_probe_sends_other_formats_to_the_cpu():
    cases = _bad_jpegs()
    for name in ("png", "cmyk", "progressive", "truncated", "text"):
        assert probe_jpeg(cases[name], PRE) is None, name
    assert probe_jpeg(cases["good"], PRE) is not None
    huge = probe_jpeg(cases["good"], PRE, max_pixels=1000)
    assert huge is None  # over the pixel cap: the CPU path refuses it with its own message


def test_a_bad_stream_in_a_batch_costs_only_that_file():
    cases = _bad_jpegs()
    good, corrupt = cases["good"], cases["corrupt"]
    p_good, p_bad = probe_jpeg(good, PRE), probe_jpeg(corrupt, PRE)
    assert p_bad is not None  # headers are fine: only decoding finds the damage
    out = decode_jpegs([good, corrupt, good], [p_good, p_bad, p_good], PRE, "cpu")
    assert out[0] is not None and out[2] is not None and out[1] is None
    lying = probe_jpeg(good, PRE).__class__(width=999, height=7, orientation=1, scale=1, meta=p_good.meta)
    assert decode_jpegs([good], [lying], PRE, "cpu") == [None]  # size disagrees with the header


def _mixed_folder(root):
    root.mkdir(parents=True)
    for name, data in _bad_jpegs().items():
        (root / f"{name}.{'png' if name == 'png' else 'jpg'}").write_bytes(data)
    for i in range(5):
        (root / f"photo{i}.jpg").write_bytes(_jpeg(_photo(20 + i, (320 + 40 * i, 240)), orientation=1 + i))
    (root / "empty.jpg").write_bytes(b"")
    return root


def test_gpu_stream_falls_back_per_file_with_cpu_reasons(tmp_path):
    lib = _mixed_folder(tmp_path / "lib")
    entries = scan([str(lib)]).files
    stats = GpuStats()
    home = tmp_path / "home"
    gpu_res = list(gpu_decode_stream(entries, PRE, "cpu", workers=0, home=str(home), batch=3, stats=stats))
    cpu_res = list(decode_stream(entries, PRE, workers=0))
    assert [r.entry.path for r in gpu_res] == [e.path for e in entries]  # input order kept
    assert stats.gpu == 6 and stats.gpu_failed == 1 and stats.cpu == len(entries) - 7
    for g, c in zip(gpu_res, cpu_res, strict=True):
        assert type(g) is type(c), g.entry.path
        if isinstance(c, Failed):
            assert g.reason == c.reason
            continue
        assert (g.width, g.height, g.meta, g.sha256) == (c.width, c.height, c.meta, c.sha256)
        px = g.pixels if isinstance(g.pixels, np.ndarray) else g.pixels.numpy()
        assert np.abs(px.astype(int) - c.pixels.astype(int)).max() <= 2
        assert thumb_path(home, g.sha256).is_file()
    assert {os.path.basename(r.entry.path) for r in gpu_res if isinstance(r, Failed)} == {
        "truncated.jpg", "text.jpg", "corrupt.jpg", "empty.jpg"}


def test_probe_entry_runs_in_workers(tmp_path):
    lib = _mixed_folder(tmp_path / "lib")
    entries = scan([str(lib)]).files
    inline = [probe_entry(e, PRE) for e in entries]
    pooled = list(decode_stream(entries, PRE, workers=2, task=probe_entry))
    assert [type(r) for r in pooled] == [type(r) for r in inline]
    assert sum(isinstance(r, GpuJob) for r in pooled) == 7


def test_gpu_stream_stops_cleanly_when_the_consumer_stops(tmp_path):
    import threading

    lib = _mixed_folder(tmp_path / "lib")
    entries = scan([str(lib)]).files
    before = threading.active_count()
    stream = gpu_decode_stream(entries, PRE, "cpu", workers=0, batch=2, prefetch=1)
    next(stream)
    stream.close()
    assert threading.active_count() == before


def test_stack_pixels_mixes_numpy_and_tensors(encoder):
    import torch

    a = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    assert isinstance(stack_pixels([a, a]), np.ndarray)
    mixed = stack_pixels([torch.from_numpy(a.copy()), a])
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (2, 224, 224, 3)
    np.testing.assert_array_equal(encoder.encode_pixels(mixed), encoder.encode_pixels(np.stack([a, a])))


def test_gpu_decode_is_off_without_cuda():
    assert wants_gpu_decode("cpu", None) is False
    assert wants_gpu_decode("cpu", True) is True  # the forced path the tests use
    assert wants_gpu_decode("cuda", False) is False
    assert hardware.gpu_decode_problem("cpu")


# ---- indexing through the GPU decode path ---------------------------------------------------------


def test_index_with_gpu_decode_path_matches_cpu_path(tmp_path, encoder, photos):
    results = {}
    for forced in (False, True):
        with Store.open(tmp_path / f"home-{forced}", create=True, writable=True) as store:
            store.bind_model(encoder.fingerprint)
            report = index_paths(store, encoder, [str(photos["root"])], batch_size=4, workers=0,
                                 gpu_decode=forced)
            ids, vecs = store.vectors("image")
            views = store.items(ids.tolist())
            rows = {views[i].path: (v, views[i].width, views[i].height, views[i].taken_at, views[i].bytes,
                                    views[i].camera_make, views[i].sha256)
                    for i, v in zip(ids.tolist(), vecs, strict=True)}
            results[forced] = (report, rows, sorted(v.sha256 for v in views.values()), store.home)
    (r0, rows0, sha0, _), (r1, rows1, sha1, home1) = results[False], results[True]
    assert (r1.added, sorted(r1.skipped)) == (r0.added, sorted(r0.skipped))
    assert set(rows0) == set(rows1) and sha0 == sha1
    for path, (v0, *facts0) in rows0.items():
        v1, *facts1 = rows1[path]
        assert facts0 == facts1, path
        assert float(v0 @ v1) > 0.999, path
    assert all(thumb_path(home1, s).is_file() for s in sha1)


# ---- the CLI on a machine without CUDA ------------------------------------------


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(hardware.cuda_available(), reason="checks the no-CUDA messages")
def test_cli_gpu_decode_needs_cuda(tmp_path, checkpoint, photos):
    r = run_cli("index", str(photos["root"]), "--model", "ViT-S-32", "--pretrained", str(checkpoint),
                "--gpu-decode", home=tmp_path / "home")
    assert r.returncode == 2, r.stderr
    assert "--gpu-decode" in r.stderr and "CUDA" in r.stderr and "Traceback" not in r.stderr

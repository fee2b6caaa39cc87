"""The GPU path, checked on the CPU: torch exact search vs brute force, batched JPEG decoding vs the CPU
decoder (same code with device='cpu'), per-file fallback, faiss GPU helpers falling back, and indexing
through the GPU decode path giving the same catalog as the normal path."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image, ImageFilter

from indexer.decode import Failed, decode_stream
from indexer.gpu_stream import GpuJob, GpuStats, gpu_decode_stream, probe_entry, stack_pixels, wants_gpu_decode
from indexer.pipeline import index_paths
from indexer.scan import scan
from retrieval import gpu
from retrieval.gpu import PAD_SCORE, TorchFlatIndex
from retrieval.gpu_decode import decode_jpegs, draft_scale, orient, probe_jpeg
from retrieval.imageio import Preprocess, decode_for_model
from retrieval.store import Store
from retrieval.thumbnails import thumb_path
from tests.conftest import ROOT, _pattern, run_cli

PRE = Preprocess()


# ---- exact search ---------------------------------------------------------------------------------


def _brute(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: all scores, stable sort (equal scores: earlier position first), pad like faiss."""
    s = q @ x.T
    out_s = np.full((len(q), k), PAD_SCORE, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    for r in range(len(q)):
        order = np.argsort(-s[r], kind="stable")[:k]
        out_s[r, :len(order)] = s[r, order]
        out_i[r, :len(order)] = ids[order]
    return out_s, out_i


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("block", [1 << 27, 97])  # one block, and many query and column blocks
def test_torch_search_equals_brute_force(block):
    rng = np.random.default_rng(0)
    x, q = _unit(rng, 500, 32), _unit(rng, 13, 32)
    ids = rng.permutation(10_000)[:500].astype(np.int64)
    index = TorchFlatIndex(x, ids, device="cpu", block_elements=block)
    s, i = index.search(q, 10)
    bs, bi = _brute(x, ids, q, 10)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == i.shape == (13, 10)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(s, bs, atol=1e-5)


def test_torch_search_pads_like_faiss_when_k_exceeds_n():
    import faiss

    rng = np.random.default_rng(1)
    x, q = _unit(rng, 5, 8), _unit(rng, 3, 8)
    s, i = TorchFlatIndex(x, device="cpu").search(q, 8)
    flat = faiss.IndexFlatIP(8)
    flat.add(x)
    fs, fi = flat.search(q, 8)
    np.testing.assert_array_equal(i, fi)  # the 5 real hits, then -1
    np.testing.assert_allclose(s[:, :5], fs[:, :5], atol=1e-5)
    assert (s[:, 5:] == fs[:, 5:]).all() and (i[:, 5:] == -1).all()
    empty_s, empty_i = TorchFlatIndex(np.zeros((0, 8), np.float32), device="cpu").search(q, 4)
    assert (empty_i == -1).all() and (empty_s == PAD_SCORE).all()


@pytest.mark.parametrize("block", [1 << 27, 40])
def test_torch_search_ties_break_by_position(block):
    """Duplicate photos give exactly equal scores: the k-th place must not be a coin toss."""
    rng = np.random.default_rng(2)
    base = _unit(rng, 6, 16)
    x = np.concatenate([base[[0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 0]], _unit(rng, 30, 16)])
    ids = np.arange(100, 100 + len(x), dtype=np.int64)
    q = np.stack([base[0], base[3], x[20]])
    s, i = TorchFlatIndex(x, ids, device="cpu", block_elements=block).search(q, 4)  # 7 copies tie for 4 places
    bs, bi = _brute(x, ids, q, 4)
    np.testing.assert_array_equal(i, bi)
    assert list(i[0]) == [100, 102, 104, 106]
    np.testing.assert_allclose(s, bs, atol=1e-5)
    import faiss

    flat = faiss.IndexFlatIP(16)
    flat.add(x)
    assert set(flat.search(q[:1], 4)[1][0] + 100) == set(i[0])  # faiss picks the same set


def test_torch_search_rejects_wrong_width():
    from retrieval.errors import UserError

    with pytest.raises(UserError):
        TorchFlatIndex(np.zeros((3, 4), np.float32), device="cpu").search(np.zeros((1, 5), np.float32), 2)


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
    return _pattern(seed, size).filter(ImageFilter.GaussianBlur(1.5))  # photo-like, not pure noise


CASES = [((640, 480), 1), ((640, 480), 6), ((300, 200), 8), ((1000, 200), 3), ((212, 900), 5),
         ((1100, 800), 1), ((1100, 800), 7), ((560, 2600), 6), ((2100, 1500), 2), ((1600, 1200), 1),
         ((2900, 2100), 6)]


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

    base = _pattern(3, (5, 3))
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
    assert gpu.gpu_decode_problem("cpu")


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


# ---- faiss GPU helpers, through their fallback ----------------------------------------------------


def test_faiss_gpu_helpers_fall_back_to_the_cpu_index():
    import faiss

    if gpu.faiss_has_gpu():
        pytest.skip("this faiss has a GPU: the fallback is not reachable")
    reason = gpu.faiss_gpu_reason()
    assert reason and "\n" not in reason
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    placed = gpu.index_to_gpu(flat)
    assert placed.index is flat and not placed.on_gpu and placed.reason == reason
    assert gpu.index_to_cpu(flat) is flat
    rng = np.random.default_rng(3)
    x = _unit(rng, 600, 8)
    centroids, why = gpu.kmeans(x, 4, niter=5)
    assert centroids.shape == (4, 8) and why == reason
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 4, faiss.METRIC_INNER_PRODUCT)
    assert gpu.train_ivf(ivf, x) == reason and ivf.is_trained
    ivf.add(x)
    ivf.nprobe = 4
    np.testing.assert_array_equal(ivf.search(x[:5], 1)[1][:, 0], np.arange(5))


def test_train_ivf_uses_the_clustering_index_hook(monkeypatch):
    """The GPU branch with a CPU flat index standing in for the GPU one: the hook is used, then cleared."""
    import faiss

    used = []

    def fake_to_gpu(index, device=0, fp16=True):
        used.append(type(index).__name__)
        return gpu.Placed(index, True)

    monkeypatch.setattr(gpu, "faiss_gpu_reason", lambda: None)
    monkeypatch.setattr(gpu, "index_to_gpu", fake_to_gpu)
    x = _unit(np.random.default_rng(4), 500, 8)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 5, faiss.METRIC_INNER_PRODUCT)
    assert gpu.train_ivf(ivf, x) is None
    assert used == ["IndexFlat"] and ivf.is_trained and ivf.quantizer.ntotal == 5
    assert ivf.clustering_index is None
    flat = faiss.IndexFlatIP(8)
    assert "no IVF" in gpu.train_ivf(flat, x)


def test_index_to_gpu_with_a_gpu_faiss(monkeypatch):
    """Against a stand-in for faiss-gpu: fp16 cloner options, one resource object, unsupported types fall back."""
    calls = []

    class Options:
        useFloat16 = False
        useFloat16CoarseQuantizer = True

    def cpu_to_gpu(res, device, index, co):
        if index == "hnsw":
            raise RuntimeError("Error in ... \nindex type not supported on GPU")
        calls.append((res, device, co.useFloat16, co.useFloat16CoarseQuantizer))
        return f"gpu:{index}"

    fake = types.SimpleNamespace(StandardGpuResources=object, index_cpu_to_gpu=cpu_to_gpu,
                                 get_num_gpus=lambda: 1, GpuClonerOptions=Options)
    monkeypatch.setitem(sys.modules, "faiss", fake)
    monkeypatch.setattr(gpu, "_resources", {})
    a, b = gpu.index_to_gpu("flat"), gpu.index_to_gpu("ivfpq", fp16=False)
    assert (a.index, a.on_gpu, a.reason) == ("gpu:flat", True, None) and b.index == "gpu:ivfpq"
    assert calls[0][0] is calls[1][0] and calls[0][2:] == (True, False) and calls[1][2] is False
    hnsw = gpu.index_to_gpu("hnsw")
    assert hnsw.index == "hnsw" and not hnsw.on_gpu and "not supported on GPU" in hnsw.reason


# ---- the CLI and the benchmark on a machine without CUDA ------------------------------------------


@pytest.mark.skipif(gpu.cuda_available(), reason="checks the no-CUDA messages")
def test_cli_gpu_decode_needs_cuda(tmp_path, checkpoint, photos):
    r = run_cli("index", str(photos["root"]), "--model", "ViT-S-32", "--pretrained", str(checkpoint),
                "--gpu-decode", home=tmp_path / "home")
    assert r.returncode == 2, r.stderr
    assert "--gpu-decode" in r.stderr and "CUDA" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(gpu.cuda_available(), reason="checks the no-CUDA exit")
def test_gpu_check_exits_cleanly_without_cuda():
    r = subprocess.run([sys.executable, "bench/gpu_check.py"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA" in lines[0] and "Traceback" not in r.stderr

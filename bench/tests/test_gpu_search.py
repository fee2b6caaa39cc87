"""The GPU vector helpers (bench/gpu_search.py), checked on the CPU: torch exact search against brute force,
faiss GPU helpers through their fallback and against a stand-in for faiss-gpu, and the GPU benchmark's exit on
a machine without CUDA."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

from bench import gpu_search as gpu
from bench.gpu_search import PAD_SCORE, TorchFlatIndex
from retrieval.hardware import cuda_available
from tests.helpers import ROOT


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


@pytest.mark.subprocess
@pytest.mark.skipif(cuda_available(), reason="checks the no-CUDA exit")
def test_gpu_check_exits_cleanly_without_cuda():
    r = subprocess.run([sys.executable, "bench/gpu_check.py"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA" in lines[0] and "Traceback" not in r.stderr

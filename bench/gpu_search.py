"""GPU vector helpers used by the GPU benchmark (bench/gpu_check.py): exact search with torch, and faiss GPU
placement, k-means and IVF training. Nothing in the product calls them yet; they live here, with their tests
(bench/tests), until the scale-out work wires them in.

Everything degrades to the CPU: a machine without CUDA, or a faiss without GPU support (the default
`faiss-cpu`), gets the CPU object back with a one-line reason instead of an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.errors import UserError

# Scores of padding slots when fewer than k vectors exist: what faiss's inner-product indexes return.
PAD_SCORE = float(-np.finfo(np.float32).max)
# Bound on one (queries x vectors) score block: 2**27 fp32 scores is 512 MiB on the device.
DEFAULT_BLOCK_ELEMENTS = 1 << 27


# ---- exact search with torch -------------------------------------------------------------------


class TorchFlatIndex:
    """Exact inner-product search as a matrix product plus top-k, on any torch device.

    Vectors are held on the device (fp16 on CUDA: half the memory, tensor-core matmuls; fp32 on the
    CPU, where half precision is slow). `search` has faiss's contract: (scores float32 (nq, k), ids
    int64 (nq, k)), best first, padded with (PAD_SCORE, -1) when fewer than k vectors exist. Equal
    scores are ordered by insertion position, smaller first (faiss picks the same set on ties but
    orders them differently). Work is done in score blocks of at most `block_elements`, so memory stays
    bounded for any batch of queries.
    """

    def __init__(self, vectors: np.ndarray, ids: np.ndarray | None = None, device: str = "cuda",
                 dtype: str | None = None, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> None:
        import torch

        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise UserError(f"vectors must be 2-d (n, d), got shape {vectors.shape}")
        n, self.dim = vectors.shape
        if ids is None:
            ids = np.arange(n, dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape != (n,):
            raise UserError(f"{len(ids)} ids for {n} vectors")
        self.device = torch.device(device)
        name = dtype or ("float16" if self.device.type == "cuda" else "float32")
        self.dtype = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                      "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}[name]
        self.vectors = torch.from_numpy(vectors).to(self.device, self.dtype)
        self.ids = torch.from_numpy(ids).to(self.device)
        self.block_elements = max(1, int(block_elements))

    @property
    def ntotal(self) -> int:
        return int(self.vectors.shape[0])

    def _scores(self, q: Any, x: Any) -> Any:
        """(nq, n) fp32 scores; half inputs keep an fp32 result where the device can (no fp16 rounding of
        scores, which would tie neighbours 2e-4 apart)."""
        import torch

        if x.dtype != torch.float32 and x.is_cuda:
            try:
                return torch.mm(q, x.T, out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):
                pass
        return torch.mm(q, x.T).float()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise UserError(f"query width {queries.shape[1]} != index width {self.dim}")
        nq, n = len(queries), self.ntotal
        if k <= 0:
            raise UserError("k must be positive")
        scores = np.full((nq, k), PAD_SCORE, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        if nq == 0 or n == 0:
            return scores, ids
        kk = min(k, n)
        q_all = torch.from_numpy(queries).to(self.device, self.dtype)
        rows = max(1, min(nq, self.block_elements // max(1, min(n, self.block_elements))))
        cols = max(kk, min(n, self.block_elements // rows))
        with torch.inference_mode():
            for q0 in range(0, nq, rows):
                q = q_all[q0:q0 + rows]
                best_s: list[Any] = []
                best_p: list[Any] = []
                for c0 in range(0, n, cols):
                    s = self._scores(q, self.vectors[c0:c0 + cols])
                    v, p = _exact_topk(s, min(kk, s.shape[1]))
                    best_s.append(v)
                    best_p.append(p + c0)
                v, p = _order(torch.cat(best_s, 1), torch.cat(best_p, 1), kk)
                scores[q0:q0 + len(q), :kk] = v.cpu().numpy()
                ids[q0:q0 + len(q), :kk] = self.ids[p].cpu().numpy()
        return scores, ids


def _order(scores: Any, pos: Any, k: int) -> tuple[Any, Any]:
    """Sort candidates by (score desc, position asc) and keep k: two stable sorts."""
    import torch

    o = torch.argsort(pos, dim=1, stable=True)
    scores, pos = scores.gather(1, o), pos.gather(1, o)
    o = torch.argsort(scores, dim=1, descending=True, stable=True)
    return scores.gather(1, o)[:, :k], pos.gather(1, o)[:, :k]


def _exact_topk(s: Any, k: int) -> tuple[Any, Any]:
    """topk whose choice among scores tied at the k-th place is the smallest positions (topk's own
    choice is unspecified); rows with such a boundary tie are redone exactly, the rest keep topk's."""
    import torch

    v, p = torch.topk(s, k, dim=1)
    kth = v[:, -1:]
    tied = (s >= kth).sum(1) > k
    if bool(tied.any()):
        for r in torch.nonzero(tied).flatten().tolist():
            cand = torch.nonzero(s[r] >= kth[r]).flatten()  # ascending positions
            o = torch.argsort(s[r, cand], descending=True, stable=True)[:k]
            p[r] = cand[o]
            v[r] = s[r, p[r]]
    return v, p


# ---- faiss GPU helpers (the `[gpu]` extra) -------------------------------------------------------


@dataclass(frozen=True)
class Placed:
    """An index and where it ended up; `reason` says why it stayed on the CPU (None when on the GPU)."""

    index: Any
    on_gpu: bool
    reason: str | None = None


_resources: dict[int, Any] = {}


def faiss_gpu_reason() -> str | None:
    """None when faiss can use a GPU here, else why not (one line, for logs and `info`)."""
    try:
        import faiss
    except ImportError:
        return "faiss is not installed"
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "index_cpu_to_gpu"):
        return "this faiss build has no GPU support (pip uninstall faiss-cpu, then install '.[gpu]')"
    try:
        n = int(faiss.get_num_gpus())
    except Exception as e:  # noqa: BLE001 - CUDA driver errors land here
        return f"faiss cannot query GPUs: {e}"
    return None if n > 0 else "faiss sees no GPU"


def faiss_has_gpu() -> bool:
    return faiss_gpu_reason() is None


def gpu_resources(device: int = 0) -> Any:
    """One StandardGpuResources per device for the life of the process: GPU indexes keep a pointer to it,
    and creating one reserves scratch memory, so it is made once and never freed under an index."""
    import faiss

    if device not in _resources:
        _resources[device] = faiss.StandardGpuResources()
    return _resources[device]


def cloner_options(fp16: bool = True) -> Any:
    """fp16 storage for flat/IVF-flat and fp16 lookup tables for IVF-PQ: half the memory, same recall in
    practice for unit-norm CLIP vectors. indicesOptions stays the default (ids kept on the GPU)."""
    import faiss

    co = faiss.GpuClonerOptions()
    co.useFloat16 = fp16
    if hasattr(co, "useFloat16CoarseQuantizer"):
        co.useFloat16CoarseQuantizer = False  # coarse assignment is cheap and most sensitive to precision
    return co


def index_to_gpu(index: Any, device: int = 0, fp16: bool = True) -> Placed:
    """Copy a CPU faiss index to a GPU; on any obstacle (no GPU faiss, an index type the GPU lacks such as
    HNSW, out of memory) the CPU index comes back unchanged with the reason."""
    reason = faiss_gpu_reason()
    if reason is not None:
        return Placed(index, False, reason)
    import faiss

    try:
        gpu = faiss.index_cpu_to_gpu(gpu_resources(device), device, index, cloner_options(fp16))
    except Exception as e:  # noqa: BLE001 - faiss raises RuntimeError for unsupported types
        return Placed(index, False, f"cannot move {type(index).__name__} to the GPU: "
                                    f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else e}")
    return Placed(gpu, True, None)


def index_to_cpu(index: Any) -> Any:
    """The CPU copy to save or to mmap; a CPU index is returned as is."""
    try:
        import faiss
    except ImportError:
        return index
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index


def kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 1234, spherical: bool = True,
           gpu: bool = True) -> tuple[np.ndarray, str | None]:
    """k-means centroids (k, d), on the GPU when faiss can; returns (centroids, reason it ran on the CPU)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    reason = faiss_gpu_reason() if gpu else "GPU not requested"
    use_gpu = reason is None
    km = faiss.Kmeans(x.shape[1], int(k), niter=niter, seed=seed, spherical=spherical, gpu=use_gpu,
                      verbose=False)
    try:
        km.train(x)
    except Exception as e:  # noqa: BLE001 - GPU out of memory or driver error: redo on the CPU
        if not use_gpu:
            raise
        km = faiss.Kmeans(x.shape[1], int(k), niter=niter, seed=seed, spherical=spherical, gpu=False,
                          verbose=False)
        km.train(x)
        reason = f"GPU k-means failed ({str(e).strip()[:120]}); ran on the CPU"
    return np.asarray(km.centroids, dtype=np.float32), reason


def train_ivf(index: Any, sample: np.ndarray, device: int = 0) -> str | None:
    """Train an index in place; for IVF indexes the coarse k-means runs on the GPU when faiss can.

    The GPU does only the clustering (faiss's `clustering_index` hook, as its own benchmarks do); the
    trained index stays a CPU index, so it is saved, memory-mapped and searched as before. Returns why the
    clustering ran on the CPU, or None.
    """
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    reason = faiss_gpu_reason()
    ivf = None
    if reason is None:
        try:
            ivf = faiss.extract_index_ivf(index)
        except Exception:  # noqa: BLE001 - not an IVF index: nothing to cluster
            reason = f"{type(index).__name__} has no IVF clustering to put on the GPU"
    if ivf is None:
        index.train(sample)
        return reason
    flat = faiss.IndexFlat(ivf.d, ivf.metric_type)  # the quantizer's metric: IP for CLIP vectors
    placed = index_to_gpu(flat, device, fp16=False)
    ivf.clustering_index = placed.index
    try:
        index.train(sample)
    except Exception as e:  # noqa: BLE001 - GPU trouble mid-training: retrain on the CPU
        ivf.clustering_index = None
        index.train(sample)
        return f"GPU clustering failed ({str(e).strip()[:120]}); trained on the CPU"
    finally:
        ivf.clustering_index = None  # do not keep (or serialize) a reference to the GPU index
    return None if placed.on_gpu else placed.reason

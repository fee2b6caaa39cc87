"""IVF indexes whose inverted lists live on disk: built in shards, merged with faiss's `merge_ondisk`,
memory-mapped by every reader; what later commits add goes to a small in-memory IVF beside it (the delta).

Why: an IVF index is built in memory, and its lists (codes and ids) grow with the collection: 520 bytes
per 512-d vector with 8-bit codes, 72 with PQ64. Where the lists of the index `auto` (or the user) chose
exceed 80% of the memory budget, the index is built the way a sharded collection is (ivf_shards.py):
trained once on a sample, each chunk of the exact store added to its own copy of the trained index and
written as a shard, the shards merged into one `.ivfdata` file that queries map (only the lists a query
probes are read). Memory while building: the training sample, one shard's codes (a quarter of the budget)
and 100,000 float vectors at a time.

The merged index is never written to (faiss aborts when a mapped array grows). A commit adds its vectors
to the delta, an IVF with the same trained quantizer and codes, written as its own small file; queries
search both and keep the best k (same codes, same nprobe: the scores compare). Once the delta holds a
quarter of what the merged index does, the next commit rebuilds (retrained on the grown collection).
Deleted ids are tombstones hidden at search time, as for every ANN index here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.store import ivf_shards
from retrieval.store import vectors as vec
from retrieval.store.ann import ADD_CHUNK, TUNE_QUERIES, tune
from retrieval.store.ann_choice import AnnState
from retrieval.store.exact import keep_best

DELTA_REMERGE = 0.25  # rebuild once the delta holds this share of the merged index's vectors
SHARD_SHARE = 4  # a shard's lists take at most a quarter of the memory budget while building


def _faiss() -> Any:
    import faiss

    return faiss


class SplitIndex:
    """The merged on-disk IVF (`base`, lists mapped, read-only) and the delta (`delta`, in memory): one
    index to the rest of the store (ntotal, d, add_with_ids to the delta, search over both)."""

    def __init__(self, base: Any, delta: Any) -> None:
        self.base = base
        self.delta = delta

    @property
    def ntotal(self) -> int:
        return int(self.base.ntotal) + int(self.delta.ntotal)

    @property
    def d(self) -> int:
        return int(self.base.d)

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.delta.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                np.ascontiguousarray(ids, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The best k of both parts, by score (equal scores: the merged index's first)."""
        scores, ids = self.base.search(queries, k, params=params)
        if not self.delta.ntotal:
            return scores, ids
        more_s, more_i = self.delta.search(queries, k, params=params)
        return keep_best(scores, ids, more_s, more_i, k)


def list_ids(index: Any) -> np.ndarray:
    """Every id an IVF index's lists hold (read from the mapped lists for an on-disk index)."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    out = []
    for i in range(ivf.nlist):
        size = int(lists.list_size(i))
        if size:
            out.append(faiss.rev_swig_ptr(lists.get_ids(i), size).copy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def held_ids(index: Any) -> np.ndarray:
    """The ids an ANN index holds, whatever its kind (id-mapped in memory, or split on disk)."""
    if isinstance(index, SplitIndex):
        return np.concatenate([list_ids(index.base), list_ids(index.delta)])
    return vec.ids_of(index)


def part_path(path: Path, i: int) -> Path:
    return path.with_name(path.name.replace(".faiss", f".part-{i}.faiss"))


def delta_path(path: Path, delta: int) -> Path:
    return path.with_name(path.name.replace(".faiss", f".delta-{delta}.faiss"))


def lists_path(path: Path) -> Path:
    return path.with_name(path.name + ivf_shards.IVFDATA)


def open_split(path: Path, delta: int) -> SplitIndex:
    """A recorded on-disk index: the merged lists mapped from beside `path`, the delta read whole."""
    base = ivf_shards.open_merged(path)
    return SplitIndex(base, vec.read_index(delta_path(path, delta)))


def shard_rows(code_bytes: int, budget: int) -> int:
    """Vectors per shard: its lists within a quarter of the budget (at least 10,000)."""
    return max(10_000, budget // SHARD_SHARE // max(code_bytes, 1))


def build(factory: str, ids: np.ndarray, vectors: np.ndarray, state: AnnState, path: Path, rows_per_shard: int,
          exact_search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
          exact_vectors: Callable[[np.ndarray], np.ndarray], seed: int = 0, train_limit: int = 200_000,
          log: Callable[[str], None] | None = None, kind: str = "same",
          cross: dict[str, np.ndarray] | None = None) -> tuple[SplitIndex, AnnState]:
    """Build `factory` over (ids, vectors: the mapped exact store) with its lists in `path`'s `.ivfdata`,
    shard by shard, and tune it as ann.build does (a held-out sample, added to the delta once tuned)."""
    n = len(ids)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    tune_rows = np.sort(order[:min(TUNE_QUERIES, n // 10)])
    rest = np.sort(order[len(tune_rows):])
    t0 = time.perf_counter()
    trained = ivf_shards.train(factory, np.ascontiguousarray(vectors[np.sort(order[len(tune_rows):][:train_limit])]))
    t1 = time.perf_counter()
    parts: list[Path] = []
    try:
        for i, start in enumerate(range(0, len(rest), rows_per_shard)):
            shard = ivf_shards.copy(trained)
            for at in range(start, min(start + rows_per_shard, len(rest)), ADD_CHUNK):  # floats: a chunk at a time
                rows = rest[at:min(at + ADD_CHUNK, start + rows_per_shard)]
                shard.add_with_ids(np.ascontiguousarray(vectors[rows], dtype=np.float32), ids[rows])
            parts.append(ivf_shards.write(shard, part_path(path, i)))
            del shard
        ivf_shards.merge_on_disk(trained, parts, path)
    finally:
        for p in parts:
            p.unlink(missing_ok=True)
    t2 = time.perf_counter()
    index = SplitIndex(ivf_shards.open_merged(path), ivf_shards.copy(trained))
    tuned = tune(index, replace(state, factory=factory, built_n=n, on_disk=True, delta=0), ids[tune_rows],
                 np.ascontiguousarray(vectors[tune_rows], dtype=np.float32), exact_search, exact_vectors,
                 kind=kind, cross=cross)
    if log:
        shards = f"{len(parts)} shard" + ("" if len(parts) == 1 else "s")
        log(f"trained {factory} in {t1 - t0:.1f} s; {len(rest)} vectors added in {shards} and merged on disk in "
            f"{t2 - t1:.1f} s; tuned in {time.perf_counter() - t2:.1f} s")
    index.add_with_ids(vectors[tune_rows], ids[tune_rows])
    return index, tuned

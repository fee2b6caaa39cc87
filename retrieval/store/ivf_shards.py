"""One IVF index from many shards: trained once on a sample, each shard's vectors added to its own copy of
the trained index, then merged, in memory or on disk.

Why shards: at 100M+ vectors no single process embeds, holds or adds everything. Every machine that embedded
a shard (indexer/shards.py) adds its vectors to a copy of the same trained index (same centroids, same
codes), which costs no more RAM than the shard; merging then only concatenates inverted lists. On disk,
`faiss.contrib.ondisk.merge_ondisk` writes the lists of every shard into one `.ivfdata` file that queries
memory-map (faiss's OnDiskInvertedLists), so the index may be larger than RAM: only the coarse quantizer
and the lists a query probes are read.

Exact re-scoring at that size reads the vectors of the few candidates a query keeps (refine x k), so the
exact store need not be in RAM either: `HalfVectors` keeps it as fp16 shards, memory-mapped (half of fp32,
cosine error ~1e-3, far below the gaps re-scoring decides). With 8-bit scalar codes (SQ8) recall at the tuned
nprobe is already close to exact and re-scoring is optional (the bench says how close).

The recall tuning of the landed index types (`ann.tune`) applies unchanged: it searches the merged index
through the same `nprobe` knob and re-score factor.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.fsutil import atomic_write_with, fsync_dir
from retrieval.store import vectors as vec
from retrieval.store.ann import ADD_CHUNK

IVFDATA = ".ivfdata"


def _faiss() -> Any:
    import faiss

    return faiss


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """faiss's on-disk lists print their internals with C's printf ("resizing ...", "updating ondisk
    filename"), on every open: silenced, so a command's JSON on stdout stays JSON and stderr says only
    what a user needs."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def train(factory: str, sample: np.ndarray) -> Any:
    """An empty IVF index of `factory` (inner product), trained once on `sample`: every shard copies it."""
    from retrieval.store.ann import _prepare_training  # no polysemous training, no small-sample warnings

    faiss = _faiss()
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if faiss.try_extract_index_ivf(index) is None:
        raise ValueError(f"{factory} is not an IVF index")
    _prepare_training(index)
    index.train(sample)
    return index


def copy(index: Any) -> Any:
    """An independent copy (serialised: works for every quantizer, HNSW included)."""
    faiss = _faiss()
    return faiss.deserialize_index(faiss.serialize_index(index))


def build_shard(trained: Any, ids: np.ndarray, vectors: np.ndarray) -> Any:
    """The trained index holding one shard's vectors under their catalog ids (IVF lists keep ids)."""
    index = copy(trained)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    for start in range(0, len(ids), ADD_CHUNK):
        index.add_with_ids(np.ascontiguousarray(vectors[start:start + ADD_CHUNK], dtype=np.float32),
                           ids[start:start + ADD_CHUNK])
    return index


def write(index: Any, path: Path) -> Path:
    """Write an index atomically (shards are read back by the merge, possibly on another machine)."""
    vec.write_atomic(index, path)
    return path


def merge_in_memory(trained: Any, shard_paths: Sequence[Path]) -> Any:
    """All shards' lists appended, in shard order, to a copy of the trained index (fits in RAM)."""
    faiss = _faiss()
    out = copy(trained)
    ivf = faiss.extract_index_ivf(out)
    for p in shard_paths:
        shard = faiss.read_index(str(p))
        ivf.merge_from(faiss.extract_index_ivf(shard), 0)
    out.ntotal = ivf.ntotal
    return out


def merge_on_disk(trained: Any, shard_paths: Sequence[Path], out: Path) -> Path:
    """Merge the shards into `out` (the index) and `out.ivfdata` (its inverted lists, on disk).

    The lists are written under a temporary name and renamed before the index file that names them is
    written (atomically), so a crash leaves either no index or a whole one. Shards are read memory-mapped:
    their total may exceed RAM."""
    from faiss.contrib.ondisk import merge_ondisk

    faiss = _faiss()
    index = copy(trained)
    data = out.with_name(out.name + IVFDATA)
    tmp = data.with_name(data.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with _quiet_stdout():
        merge_ondisk(index, [str(p) for p in shard_paths], str(tmp))
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    lists.filename = str(data)  # what the index file records (re-rooted on open: IO_FLAG_ONDISK_SAME_DIR)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    tmp.replace(data)
    fsync_dir(data.parent)
    atomic_write_with(out, lambda name: faiss.write_index(index, name))
    return out


def open_merged(path: Path) -> Any:
    """A merged on-disk index, its lists memory-mapped from the `.ivfdata` beside it (wherever the folder
    was moved: the recorded file name is re-rooted to the index's folder). Read-only: never add to it."""
    faiss = _faiss()
    with _quiet_stdout():
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)


class HalfVectors:
    """An exact store for re-scoring at scale: fp16 shards (`.npy`, memory-mapped), ids dense per shard.

    Shard i holds the vectors of ids [offsets[i], offsets[i+1]); `__call__(ids)` returns their float32
    rows, so it plugs into `ann.ann_search` and `ann.tune` as `exact_vectors`."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.shards = [np.load(p, mmap_mode="r") for p in paths]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    @staticmethod
    def write(path: Path, vectors: np.ndarray) -> Path:
        """One shard, fp16, written atomically."""
        def save(name: str) -> None:
            with open(name, "wb") as f:
                np.save(f, np.asarray(vectors, dtype=np.float16))

        atomic_write_with(path, save)
        return path

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        out = np.empty((len(ids), self.shards[0].shape[1] if self.shards else 0), dtype=np.float32)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.shards[int(s)][ids[sel] - self.offsets[s]]
        return out

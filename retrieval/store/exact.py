"""The exact store of one modality, read and written through the file's own layout, memory-mapped.

Why not faiss's IndexIDMap2: loading it copies every float32 vector into process memory and builds a hash
map of the ids, so a writer (and every reader of a store it loaded whole) needed RAM for the whole
collection: 2 KB per 512-d vector, 20 GB at 10M. The file format stays faiss's (an IndexIDMap2 over an
IndexFlatIP: header, n*d float32, n int64 ids), so older homes, `repair`, `salvage` and the checksums read
it as before; here it is mapped read-only and never changed. A commit streams the kept rows of the current
generation and the new rows into the next generation's file, in chunks (memory per commit: the chunk, not
the collection), summing its blocks on the way (checksums.py), so the writer's memory no longer grows with
the store. Ids are kept ascending (catalog ids only grow), so an id's row is a binary search in the mapped
ids: no id map in memory.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import numpy as np

from retrieval.errors import IndexMismatch
from retrieval.fsutil import atomic_write_with
from retrieval.store.checksums import FileSums, Summer, block_size

CHUNK_BYTES = 64 << 20  # rows streamed or scored per step: bounded memory at any size


@functools.lru_cache(maxsize=16)
def _template(d: int) -> tuple[bytes, tuple[int, ...]]:
    """faiss's header of an empty IndexIDMap2(IndexFlatIP(d)), and where its vector-count fields sit
    (found by comparing with a one-vector index, so no faiss constant is copied here)."""
    import faiss

    def ser(n: int) -> bytes:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        if n:
            index.add_with_ids(np.zeros((n, d), np.float32), np.zeros(n, np.int64))
        return bytes(faiss.serialize_index(index))

    empty, one = ser(0), ser(1)
    head = len(empty) - 16  # then the float count field and the id count field
    fields = tuple(i for i in range(0, head - 7) if empty[i:i + 8] == bytes(8) and one[i:i + 8] == struct.pack("<q", 1))
    return empty[:head], fields


def header(d: int, n: int) -> bytes:
    """The bytes before the vectors of a file holding n vectors: faiss's header and the float count."""
    head, fields = _template(d)
    out = bytearray(head)
    for at in fields:
        out[at:at + 8] = struct.pack("<q", n)
    return bytes(out) + struct.pack("<q", n * d)


def _rows(n: int, d: int) -> int:
    return max(1, CHUNK_BYTES // (4 * d)) if n else 1


class ExactVectors:
    """One segment of a modality's exact store: ids (ascending) and float32 rows, mapped from its file.

    Answers what the store asks of a segment (exact_segments.py): `ntotal`, exact top-k `search` (optionally
    restricted to some ids), `reconstruct_batch` by id, and the arrays themselves. Never written to."""

    def __init__(self, d: int, ids: np.ndarray, vectors: np.ndarray, path: Path | None = None) -> None:
        self.d = d
        self.ids = ids
        self.vectors = vectors
        self.path = path

    @classmethod
    def empty(cls, d: int) -> ExactVectors:
        return cls(d, np.zeros(0, np.int64), np.zeros((0, d), np.float32))

    @classmethod
    def open(cls, path: Path, d: int, mmap: bool = True) -> ExactVectors:
        """Map (or with mmap=False, read) a generation's file; one that is not an exact store of width d
        is an IndexMismatch the user can repair."""
        size = path.stat().st_size
        empty = len(header(d, 0)) + 8
        n, rest = divmod(size - empty, 4 * d + 8)
        with open(path, "rb") as f:
            head = f.read(len(header(d, 0)))
        if size < empty or rest or head != header(d, n):
            raise IndexMismatch(f"vector file {path} is unreadable (not an exact store of {d}-d vectors); "
                                f"run `crossmodal repair` to rebuild the index state")
        at_vectors = len(head)
        at_ids = at_vectors + 4 * d * n + 8
        if n == 0:
            return cls(d, np.zeros(0, np.int64), np.zeros((0, d), np.float32), path)
        vectors: np.ndarray
        ids: np.ndarray
        if mmap:
            vectors = np.memmap(path, dtype="<f4", mode="r", offset=at_vectors, shape=(n, d))
            ids = np.memmap(path, dtype="<i8", mode="r", offset=at_ids, shape=(n,))
        else:
            vectors = np.fromfile(path, dtype="<f4", count=n * d, offset=at_vectors).reshape(n, d)
            ids = np.fromfile(path, dtype="<i8", count=n, offset=at_ids)
        return cls(d, ids, vectors, path)

    @property
    def ntotal(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def _order(self) -> np.ndarray | None:
        """None when ids ascend (every file this module writes); else the sorting permutation (a file
        written by an older version or by hand), held in memory."""
        ids = self.ids
        step = _rows(len(ids), 2)
        ascending = all(bool(np.all(np.diff(np.asarray(ids[a:min(a + step + 1, len(ids))])) > 0))
                        for a in range(0, max(len(ids) - 1, 0), step))
        return None if ascending else np.argsort(np.asarray(ids), kind="stable")

    def rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found): the row of each id, and which ids the store holds at all."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.ntotal == 0:
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        order = self._order
        sorted_ids = self.ids if order is None else np.asarray(self.ids)[order]
        pos = np.minimum(np.searchsorted(sorted_ids, ids), self.ntotal - 1)
        found = np.asarray(sorted_ids[pos]) == ids
        rows = pos if order is None else order[pos]
        return rows.astype(np.int64), found

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of these ids (KeyError for one the store does not hold)."""
        rows, found = self.rows_of(ids)
        if not found.all():  # (as faiss's reconstruct, which raises for an unknown id)
            raise KeyError(f"id {int(np.asarray(ids).reshape(-1)[~found][0])} is not in the exact store")
        if not len(rows):
            return np.zeros((0, self.d), np.float32)
        order = np.argsort(rows, kind="stable")  # mapped rows are read in file order
        out = np.empty((len(rows), self.d), np.float32)
        out[order] = self.vectors[rows[order]]
        return out

    def search(self, queries: np.ndarray, k: int, restrict: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner-product top-k over every row (or the rows of `restrict`'s ids), a chunk at a time with
        faiss's own flat kernels (as IndexFlatIP scores): (scores, ids), each (n_queries, k), padded with
        -inf / -1."""
        import faiss

        q, k, best_s, best_r = no_results(queries, self.d, k)
        if restrict is not None:
            rows, found = self.rows_of(np.unique(np.asarray(restrict, dtype=np.int64)))
            picked = np.sort(rows[found])
            candidates: np.ndarray | None = picked
            total = len(picked)
        else:
            candidates, total = None, self.ntotal
        step = _rows(total, self.d)
        for a in range(0, total if k else 0, step):
            b = min(a + step, total)
            block = self.vectors[a:b] if candidates is None else self.vectors[candidates[a:b]]
            scores, found_rows = faiss.knn(q, block, min(k, b - a), metric=faiss.METRIC_INNER_PRODUCT)
            rows = found_rows + a if candidates is None else candidates[a:b][found_rows]
            best_s, best_r = keep_best(best_s, best_r, scores, rows, k)
        ids = np.full(best_r.shape, -1, np.int64)
        hit = best_r >= 0
        ids[hit] = np.asarray(self.ids)[best_r[hit]]
        return best_s, ids


def no_results(queries: np.ndarray, d: int, k: int) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """(queries as float32 rows, k, scores -inf, ids -1): where a top-k search starts."""
    q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, d)
    k = max(int(k), 0)
    return q, k, np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)


def keep_best(scores: np.ndarray, labels: np.ndarray, more_scores: np.ndarray, more_labels: np.ndarray, k: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score, label) pairs per query of two result sets (a label of -1 is padding, last); equal
    scores keep the first set's first. How partial top-k results (chunks, segments, index parts) combine."""
    all_s = np.concatenate([scores, more_scores], axis=1)
    all_l = np.concatenate([labels, more_labels], axis=1)
    all_s = np.where(all_l >= 0, all_s, -np.inf).astype(np.float32)
    order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_s, order, axis=1), np.take_along_axis(all_l, order, axis=1)


Source = tuple[ExactVectors, "np.ndarray | None"]  # a segment (or new rows) and which of its rows to keep


def write_sources(path: Path, gen: int, d: int, sources: list[Source]) -> FileSums:
    """One generation's file from the kept rows of `sources`, in order, streamed in chunks into `path` (temp
    file, fsync, rename) and summed block by block as written. Returns the sums.

    Memory: a chunk, unless the rows' ids would not ascend (a file of an older version, or new ids below
    stored ones): those are sorted in memory, once; the file written ascends again."""
    keeps = [np.ones(src.ntotal, bool) if keep is None else keep for src, keep in sources]
    n = sum(int(k.sum()) for k in keeps)
    ascending = True
    last: int | None = None
    for (src, _), keep in zip(sources, keeps, strict=True):
        if src._order is not None:
            ascending = False
            break
        kept_ids = np.flatnonzero(keep)
        if len(kept_ids):
            first = int(np.asarray(src.ids[int(kept_ids[0])]))
            if last is not None and first <= last:
                ascending = False
                break
            last = int(np.asarray(src.ids[int(kept_ids[-1])]))
    if not ascending:
        ids = np.concatenate([np.asarray(src.ids)[keep] for (src, _), keep in zip(sources, keeps, strict=True)])
        vectors = np.concatenate([np.asarray(src.vectors)[keep] for (src, _), keep in zip(sources, keeps, strict=True)])
        order = np.argsort(ids, kind="stable")
        sources, keeps = [(ExactVectors(d, ids[order], np.ascontiguousarray(vectors[order])), None)], [np.ones(n, bool)]
    head = header(d, n)
    summer = Summer(block_size(len(head) + n * (4 * d + 8) + 8))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            def put(data: bytes | np.ndarray) -> None:
                if isinstance(data, np.ndarray):
                    if not data.size:
                        return
                    data = np.ascontiguousarray(data)
                view = memoryview(data).cast("B")  # type: ignore[arg-type]  # an ndarray is a buffer
                f.write(view)
                summer.update(view)

            put(head)
            for part in ("vectors", "ids"):
                if part == "ids":
                    put(struct.pack("<q", n))
                for (src, _), keep in zip(sources, keeps, strict=True):
                    step = _rows(src.ntotal, d)
                    whole = bool(keep.all())
                    for a in range(0, src.ntotal, step):
                        rows = np.asarray(getattr(src, part)[a:a + step], dtype="<f4" if part == "vectors" else "<i8")
                        put(rows if whole else rows[keep[a:a + step]])  # straight from the mapped file

    atomic_write_with(path, write)
    return FileSums(gen, summer.size, summer.block, summer.done())


def write_all(path: Path, gen: int, ids: np.ndarray, vectors: np.ndarray) -> FileSums:
    """A generation holding exactly these (id, vector) pairs."""
    d = int(np.asarray(vectors).shape[1])
    rows = ExactVectors(d, np.asarray(ids, dtype=np.int64).reshape(-1),
                        np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, d))
    return write_sources(path, gen, d, [(rows, None)])

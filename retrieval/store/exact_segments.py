"""A modality's exact store as segments: files of the exact format (exact.py), in id order, named by the
catalog (meta `segs.<modality>`), so a commit writes what it adds and not the whole store.

Why segments: with one file per generation, every commit rewrote the whole store (20 GB at 10M vectors),
so the indexer had to commit in chunks that grow with the index (a quarter of it), and hold that chunk's
vectors in memory: a collection beyond RAM could not be indexed. Here a commit writes its new rows as a
segment, merged with the newest segments while they are not at least twice its size (a binary counter:
O(log n) segments, each row rewritten O(log n) times), so commit cost follows the commit's size. A deletion
rewrites only the segments that held the deleted ids (without them). Files are never changed in place;
segments another reader may still hold are kept one commit longer, like every generation before.

Search, lookups by id and the ANN builds read every segment through its memory map; ids ascend across
segments (catalog ids only grow), so a row is found by binary search, segment by segment.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from retrieval.store.checksums import FileSums
from retrieval.store.exact import ExactVectors, Source, keep_best, no_results, write_sources

MERGE_RATIO = 2  # the newest segments are merged into a commit's rows while smaller than twice them


class Rows:
    """The vectors of several segments as one read-only row array: `rows[int array or slice]` copies just
    those rows out of the mapped segments (what ANN builds and re-scoring read)."""

    def __init__(self, parts: list[np.ndarray], d: int) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]), d)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        rows = np.arange(self.shape[0])[key] if isinstance(key, slice) else np.asarray(key).reshape(-1)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        out = np.empty((len(rows), self.shape[1]), np.float32)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[int(p)][rows[sel] - self.offsets[p]]
        return out

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        return self[slice(None)]


class ExactStore:
    """The segments the catalog names (`gens`, in id order) as one exact store: ntotal, ids, vectors,
    exact top-k search, lookups by id. Never written to: a commit makes the next ExactStore."""

    def __init__(self, d: int, gens: list[int], segments: list[ExactVectors]) -> None:
        self.d = d
        self.gens = list(gens)
        self.segments = list(segments)

    @classmethod
    def empty(cls, d: int) -> ExactStore:
        return cls(d, [], [])

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.segments)

    @property
    def ids(self) -> np.ndarray:
        """Every id, in storage order (8 bytes per vector in memory)."""
        if len(self.segments) == 1:
            return np.asarray(self.segments[0].ids, dtype=np.int64)
        return np.concatenate([np.asarray(s.ids, dtype=np.int64) for s in self.segments] or [np.zeros(0, np.int64)])

    @property
    def vectors(self) -> np.ndarray | Rows:
        if len(self.segments) == 1:
            return self.segments[0].vectors
        if not self.segments:
            return np.zeros((0, self.d), np.float32)
        return Rows([s.vectors for s in self.segments], self.d)

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of these ids (KeyError for one the store does not hold, as faiss raises)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.d), np.float32)
        todo = np.ones(len(ids), bool)
        for seg in self.segments:
            if not todo.any():
                break
            rows, found = seg.rows_of(ids[todo])
            if found.any():
                where = np.flatnonzero(todo)[found]
                out[where] = seg.reconstruct_batch(ids[where])
                todo[where] = False
        if todo.any():
            raise KeyError(f"id {int(ids[todo][0])} is not in the exact store")
        return out

    def reconstruct(self, item_id: int) -> np.ndarray:
        row: np.ndarray = self.reconstruct_batch(np.asarray([item_id]))[0]
        return row

    def search(self, queries: np.ndarray, k: int, restrict: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over every segment (or the ids of `restrict`): (scores, ids), padded -inf / -1."""
        q, k, best_s, best_i = no_results(queries, self.d, k)
        for seg in self.segments:
            scores, ids = seg.search(q, k, restrict)
            best_s, best_i = keep_best(best_s, best_i, scores, ids, k)
        return best_s, best_i


def _removed(seg: ExactVectors, remove: np.ndarray) -> np.ndarray | None:
    """The keep mask of a segment losing the ids in `remove` (None: it loses none)."""
    if not len(remove) or not seg.ntotal:
        return None
    rows, found = seg.rows_of(remove)
    if not found.any():
        return None
    keep = np.ones(seg.ntotal, bool)
    keep[rows[found]] = False
    return keep


def commit(store: ExactStore, add_ids: np.ndarray, add_vectors: np.ndarray, remove: np.ndarray,
           last_gen: int, path_of: Callable[[int], Path]) -> tuple[ExactStore, dict[int, FileSums]]:
    """Write the files of the store after a commit and return it, with the sums of each file written (their
    generations follow `last_gen`, the highest one ever used).

    Segments losing ids are rewritten without them (dropped when emptied); the new rows become a segment,
    merged with the newest segments while those are smaller than MERGE_RATIO times what is being written."""
    d = store.d
    remove = np.unique(np.asarray(remove, dtype=np.int64))
    segs: list[tuple[int, ExactVectors, np.ndarray | None]] = [
        (g, s, _removed(s, remove)) for g, s in zip(store.gens, store.segments, strict=True)]
    tail: list[Source] = []
    rows = 0
    if len(add_ids):
        new = ExactVectors(d, np.asarray(add_ids, dtype=np.int64).reshape(-1),
                           np.ascontiguousarray(add_vectors, dtype=np.float32).reshape(-1, d))
        tail, rows = [(new, None)], new.ntotal
        while segs and segs[-1][1].ntotal < MERGE_RATIO * rows:
            _, seg, keep = segs.pop()
            tail.insert(0, (seg, keep))
            rows += seg.ntotal if keep is None else int(keep.sum())
    written: dict[int, FileSums] = {}
    out: list[tuple[int, ExactVectors]] = []

    def write(sources: list[Source]) -> None:
        if not sum(src.ntotal if keep is None else int(keep.sum()) for src, keep in sources):
            return  # every row of it was deleted
        gen = max([last_gen, *written]) + 1
        written[gen] = write_sources(path_of(gen), gen, d, sources)
        out.append((gen, ExactVectors.open(path_of(gen), d)))

    for gen, seg, keep in segs:
        if keep is None:
            out.append((gen, seg))
        else:
            write([(seg, keep)])
    if tail:
        write(tail)
    return ExactStore(d, [g for g, _ in out], [s for _, s in out]), written


def compact(store: ExactStore, remove: np.ndarray, gen: int, path: Path) -> tuple[ExactStore, FileSums]:
    """All segments, without the ids in `remove`, as one new segment (repair's rewrite)."""
    sources: list[Source] = [(s, _removed(s, np.unique(np.asarray(remove, dtype=np.int64)))) for s in store.segments]
    if not sources:
        sources = [(ExactVectors.empty(store.d), None)]
    sums = write_sources(path, gen, store.d, sources)
    return ExactStore(store.d, [gen], [ExactVectors.open(path, store.d)]), sums


def named(meta: dict[str, str], modality: str) -> list[int]:
    """The segments (generations) the catalog names, in id order; a catalog from before segments names one
    file by its generation."""
    raw = meta.get(f"segs.{modality}")
    if raw:
        return [int(g) for g in json.loads(raw)]
    gen = int(meta.get(f"gen.{modality}", "0") or 0)
    return [gen] if gen else []


def sums_of(meta: dict[str, str], modality: str, gen: int) -> FileSums | None:
    """The checksums recorded for a segment (`sums.<modality>.<gen>`; before segments, `sums.<modality>`)."""
    for key in (f"sums.{modality}.{gen}", f"sums.{modality}"):
        sums = FileSums.from_json(meta.get(key))
        if sums is not None and sums.gen == gen:
            return sums
    return None


def meta_after(meta: dict[str, str], modality: str, old: ExactStore, new: ExactStore,
               written: dict[int, FileSums], last_gen: int) -> dict[str, str | None]:
    """The meta values a commit records for the store it wrote (None: delete the key): the segments, the
    newest generation, the highest ever used, each new file's sums; sums of segments no longer named go."""
    out: dict[str, str | None] = {f"segs.{modality}": json.dumps(new.gens),
                                  f"gen.{modality}": str(max(new.gens, default=0)),
                                  f"maxgen.{modality}": str(max([last_gen, *written]))}
    out.update({f"sums.{modality}.{g}": sums.to_json() for g, sums in written.items()})
    out.update({f"sums.{modality}.{g}": None for g in set(old.gens) - set(new.gens) if f"sums.{modality}.{g}" in meta})
    legacy = FileSums.from_json(meta.get(f"sums.{modality}"))
    if legacy is not None and legacy.gen not in new.gens:
        out[f"sums.{modality}"] = None
    return out

"""The Store's read API: catalog reads (each a thin delegate to the store's `CatalogReader`), meta and
ANN state as loaded, the vectors and the top-k search.

Why a mixin of its own: everything a read-only store answers is here, away from opening, loading and the
commit point (store.py); nothing here writes, and nothing here imports SQLAlchemy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import IndexMissing, UserError
from retrieval.model.spec import Fingerprint
from retrieval.store import ann
from retrieval.store import vectors as vec
from retrieval.store.ann_choice import AnnState
from retrieval.store.ann_upkeep import AnnUpkeep
from retrieval.store.reader import CatalogReader
from retrieval.store.records import ImageFilter, ItemView, QueryOptions, date_bound


class StoreReads:
    """Reads of a Store (mixed into it): the attributes below are the Store's."""

    home: Path
    fingerprint: Fingerprint | None
    meta: dict[str, str]
    indexes: dict[str, Any]
    generations: dict[str, int]
    mapped: dict[str, bool]
    query_options: QueryOptions
    _ann: AnnUpkeep

    @property
    def reader(self) -> CatalogReader:
        """The catalog reader every read goes through (the Store opens it)."""
        raise NotImplementedError

    def _require_model(self) -> Fingerprint:
        """The index's model; an index that never bound one has nothing to search."""
        if self.fingerprint is None:
            raise IndexMissing(f"the index in {self.home} is empty; run `crossmodal index FOLDER` first")
        return self.fingerprint

    def _vector_path(self, modality: str, gen: int) -> Path:
        return self.home / "vectors" / f"{modality}-{gen}.faiss"

    # ---- meta and the ANN state ----------------------------------------------------------------
    @property
    def ann(self) -> dict[str, Any | None]:
        """modality -> the ANN index serving unfiltered queries (None: exact search)."""
        return self._ann.index

    @property
    def ann_state(self) -> dict[str, AnnState]:
        """modality -> the ANN state the catalog records (type asked for, type built, tuned knob)."""
        return self._ann.state

    @property
    def ann_dead(self) -> dict[str, np.ndarray]:
        """modality -> tombstones: ids still in the ANN index whose rows are gone (hidden at search)."""
        return self._ann.dead

    @property
    def ann_problem(self) -> dict[str, str]:
        """modality -> why its ANN index cannot serve (exact search does meanwhile)."""
        return self._ann.problem

    def checkpoint_stat(self) -> dict[str, int] | None:
        """Size and mtime of the checkpoint recorded at bind time, so later runs can skip re-hashing it."""
        raw = self.meta.get("checkpoint_stat")
        return json.loads(raw) if raw else None

    def get_meta(self, key: str) -> str | None:
        """A meta value as of when the store was opened (or last set), None if absent."""
        return self.meta.get(key)

    def _ann_path(self, modality: str, gen: int) -> Path:
        return self._ann.path(modality, gen)

    def ann_info(self, modality: str) -> dict[str, object]:
        """How a modality is searched: the recorded ANN state, any problem, and whether files are mapped."""
        return self._ann.info(modality, bool(self.mapped.get(modality, False)))

    # ---- catalog rows --------------------------------------------------------------------------
    def items(self, ids: Iterable[int]) -> dict[int, ItemView]:
        """Catalog rows for ids, as plain values."""
        return {i: ItemView(*row) for i, row in self.reader.items(ids).items()}

    def image_ids(self, flt: ImageFilter) -> np.ndarray:
        """Ids of the images that pass a filter (for `search(..., restrict=...)`).

        A date bound compares with the EXIF date as text, or with the file time for images without one.
        The camera is a substring (LIKE wildcards in it are plain characters), trimmed; one that is only
        spaces is refused, since "make model" always holds a space and it would match every image.
        """
        camera = flt.camera.strip() if flt.camera else None
        if flt.camera and not camera:
            raise UserError("--camera is blank; give part of a camera's make or model (e.g. --camera pixel)")
        return self.reader.image_ids(under=flt.under, camera=camera,
                                     after=date_bound(flt.after) if flt.after else None,
                                     before=date_bound(flt.before) if flt.before else None)

    def ids_under(self, folder: str) -> list[int]:
        """Images at or below a folder (or that exact file), given as a catalog path (paths.py)."""
        ids: list[int] = self.image_ids(ImageFilter(under=folder)).tolist()
        return ids

    def text_ids(self, corpus: str) -> np.ndarray:
        """Ids of one corpus's captions (to restrict a caption search)."""
        return self.reader.text_ids(corpus)

    def image_shas(self, ids: Iterable[int]) -> dict[int, str]:
        """id -> content hash, for move detection."""
        return self.reader.image_shas(ids)

    def corpora(self) -> dict[str, int]:
        """Caption corpus -> how many captions it holds, by name."""
        return self.reader.corpora()

    def cameras(self, limit: int = 200) -> list[str]:
        """Distinct "make model" strings of indexed images (for a camera picker), most common first."""
        return self.reader.cameras(limit)

    def image_folders(self) -> list[str]:
        """Sorted distinct folders that directly hold indexed images (for a folder picker)."""
        return self.reader.image_folders()

    def skipped(self) -> list[tuple[str, str]]:
        """Files the indexer could not read, with the reason, by path."""
        return self.reader.skipped()

    # ---- the indexer's reads -------------------------------------------------------------------
    def image_files(self) -> dict[str, tuple[int, int | None, float | None]]:
        """path -> (id, bytes, mtime) for every indexed image, for the rescan diff."""
        return self.reader.image_files()

    def all_image_shas(self) -> set[str]:
        """Every content hash the image rows hold (what caches keyed by content must keep)."""
        return self.reader.all_image_shas()

    def shas_in_use(self, shas: Iterable[str]) -> set[str]:
        """Which of these content hashes some image row still has (thumbnails of the rest can go)."""
        return self.reader.shas_in_use(shas)

    def text_hashes(self, corpus: str) -> set[str]:
        """Hashes of the captions a corpus already holds, so re-adding a file adds only what is new."""
        return self.reader.text_hashes(corpus)

    # ---- vectors and search --------------------------------------------------------------------
    def count(self, modality: str) -> int:
        """How many vectors (hence items) a modality holds."""
        index = self.indexes.get(modality)
        return int(index.ntotal) if index is not None else 0

    def vectors(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of a modality, in memory: for oracles and exports (builds read the mapped store)."""
        index = self.indexes.get(modality)
        if index is None:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        ids, vectors = vec.vectors_of(index)
        return ids, np.array(vectors, dtype=np.float32)

    def vector(self, modality: str, item_id: int) -> np.ndarray:
        """The stored vector of one item."""
        index: Any = self.indexes.get(modality)
        try:
            stored: np.ndarray = index.reconstruct(int(item_id))
            return stored
        except (KeyError, AttributeError) as e:
            raise UserError(f"no {modality} with id {item_id} in the index") from e

    def search(self, modality: str, queries: np.ndarray, k: int,
               restrict: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner-product top-k: (scores, ids), each (n_queries, <=k); ids of -1 are dropped later.

        `restrict` limits the search to those ids (a FAISS id selector, so the top-k stays exact);
        filtered queries stay exact, since a selective filter starves an ANN index. Unfiltered ones go to
        the ANN index when one serves.
        """
        index: Any = self.indexes.get(modality)
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self._require_model().dim)
        pool = int(index.ntotal) if index is not None else 0
        if restrict is not None:
            pool = min(pool, len(restrict))
        if pool == 0 or k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if restrict is None:
            approx = self._ann.plan(modality, self.query_options)
            if approx is not None:
                param, value, refine = approx
                return ann.ann_search(self._ann.index[modality], q, min(k, pool), param, value, refine,
                                      self._ann.dead[modality], index.reconstruct_batch)
        found: tuple[np.ndarray, np.ndarray] = index.search(q, min(k, pool), restrict=restrict)
        return found

    def size_on_disk(self) -> int:
        """Bytes used by the catalog (in the home, or in PostgreSQL) and the current vector files."""
        total = self.reader.catalog_bytes()
        for p in [self._vector_path(m, g) for m, index in self.indexes.items() for g in getattr(index, "gens", ())]:
            if p.is_file():
                total += p.stat().st_size
        for m, st in self._ann.state.items():
            if st.active:
                found = self._ann.info(m, False).get("ann_bytes")  # on-disk lists and delta too
                total += found if isinstance(found, int) else 0
        return total

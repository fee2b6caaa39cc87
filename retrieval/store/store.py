"""The Store facade: catalog rows and vectors change together at one commit point.

Commit protocol: new vectors go to new segment files (`vectors/<modality>-<gen>.faiss`, written atomically;
exact_segments.py) and only then does one catalog transaction insert the rows and name the segments. A
crash before the catalog commit leaves orphan files that are ignored; after it, both agree. Segments no
longer named are kept one commit longer for readers that opened them. The commit records each file's
checksums (checksums.py); opening checks them cheaply, `repair` (repair.py) fully.

A read-only store holds the catalog snapshot its vectors were loaded from (for SNAPSHOT_HOLD_S at most, so
writers' checkpoints never wait long), so its rows always match its vectors; `refresh` loads the latest.

Every catalog read goes through one `CatalogReader` (reader.py; SqliteReader, or PgReader where location.py
says the catalog is PostgreSQL's: same protocol, REPEATABLE READ snapshots), writers' reads too; writes and
migrations go through SQLAlchemy (schema.py, writes.py), imported only when needed, so a query process never
loads it. The ANN bookkeeping lives in ann_upkeep.py.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import IndexMismatch, IndexMissing, ModelMismatch
from retrieval.model.spec import Fingerprint
from retrieval.store import checksums, exact, exact_segments, guards
from retrieval.store import vectors as vec
from retrieval.store.ann_upkeep import AnnUpkeep, Log, QuerySource
from retrieval.store.location import CatalogLocation, resolve
from retrieval.store.lock import WriterLock
from retrieval.store.reader import CatalogReader
from retrieval.store.reads import StoreReads
from retrieval.store.records import (
    CATALOG,
    MODALITIES,
    SCHEMA_VERSION,
    ImageRecord,
    QueryOptions,
    TextRecord,
    no_catalog,
    schema_too_new,
)
from retrieval.store.repair import StoreRepair

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from retrieval.store.schema import Item

SNAPSHOT_HOLD_S = 300.0  # how long a read-only store keeps its load's snapshot (then reads the latest)


class Store(StoreReads, StoreRepair):
    """An index home: a catalog (`catalog`: SQLite or PostgreSQL) + one FAISS file per modality; `Store.open`.

    Reads go through `reader` (stdlib sqlite3, or psycopg), opened once the schema is current; writes go through
    SQLAlchemy (`engine`, created on first use), so a read-only store imports SQLAlchemy only to migrate
    an older catalog.
    """

    def __init__(self, home: Path, writable: bool, lock: WriterLock | None, mmap: bool | None = None,
                 catalog: CatalogLocation | None = None) -> None:
        self.home = home
        self.catalog = catalog or CatalogLocation(home)
        self.writable = writable
        self._lock = lock
        self.mmap = mmap  # None: map (exact.py: the writer's memory does not grow with the store)
        self.mapped: dict[str, bool] = {}
        self.query_options = QueryOptions()
        self._engine: Engine | None = None
        # A writer opens its reader only once the schema exists (schema.prepare), a reader at once: it
        # checks the schema version itself.
        self._reader: CatalogReader | None = None if writable else self.catalog.reader()
        self.fingerprint: Fingerprint | None = None
        self.indexes: dict[str, Any] = {}
        self.generations: dict[str, int] = {}
        self.meta: dict[str, str] = {}
        self.salvaged: list[str] = []  # what rebuilding a damaged catalog lost (Store.open(salvage=True))
        self._ann = AnnUpkeep(home / "vectors", self.indexes)

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, home: str | Path, *, create: bool = False, writable: bool = False,
             check: bool = True, mmap: bool | None = None, salvage: bool = False, catalog: str | None = None
             ) -> Store:
        """Open (or with `create`, make) an index; writers take the home's lock; `check` verifies agreement.
        `salvage` (repair) first rebuilds a catalog SQLite cannot read (salvage.py). `catalog`: a new index's
        catalog URL (location.py: PostgreSQL, or sqlite; the home's pointer file records it).

        Readers memory-map vector files with `mmap=True`, or by default when a file is larger than a
        quarter of free memory or an ANN index serves the queries (the exact vectors are then only
        read for re-scoring). Writers never map.
        """
        home = Path(home).expanduser().absolute()
        guards.check_home(home, writable)  # under a file, or read-only for a writer: one line
        where = resolve(home, catalog)
        if not where.exists() and not (salvage and any(guards.vector_files(home).values())):
            if not create:
                raise IndexMissing(f"no index in {home} yet; build one with `crossmodal index FOLDER`")
            guards.make_home(home)
        lock = where.writer_lock() if writable else None
        store: Store | None = None
        try:
            from retrieval.store import salvage as salvaging

            why = salvaging.damage(home) if salvage and not where.is_postgres else None
            notes = salvaging.rebuild(home, why) if why else []
            store = cls(home, writable, lock, mmap, where)
            store.salvaged = notes
            store._prepare_schema()
            store._load(check=check)
            where.record(writable)
        except BaseException as e:
            if store is not None:
                store.close()  # releases the lock too
            elif lock:
                lock.release()
            problem = guards.catalog_error(home, e)
            if problem is not None:
                raise problem from e
            raise
        return store

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, made (and SQLAlchemy imported) on first use: writers and migrations."""
        if self._engine is None:
            from retrieval.store.schema import make_engine

            self._engine = make_engine(self.catalog.engine_url())
        return self._engine

    @property
    def reader(self) -> CatalogReader:
        """The catalog reader every read goes through."""
        if self._reader is None:
            raise RuntimeError("store is closed")
        return self._reader

    def _prepare_schema(self) -> None:
        """Make the tables (writers), refuse a newer schema, migrate an older one; then open the reader.

        The version is checked through the reader, writers' too when the catalog exists: a current catalog
        needs no SQLAlchemy until something is written (an unchanged `index` re-run writes nothing, and
        importing SQLAlchemy was a third of its time). Only a new or older catalog needs it here.
        """
        if self._reader is None and self.catalog.present():
            self._reader = self.catalog.reader()
        if self._reader is not None:
            try:
                found = self._reader.schema_version() if self._reader.has_catalog() else None
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError):  # locked, I/O: not a verdict on the file
                    raise
                raise IndexMismatch(f"catalog {self.home / CATALOG} is unreadable ({e}): not a crossmodal "
                                    f"catalog, or damaged; {guards.REPAIR}") from e
            if found is None and not self.writable:
                raise guards.lost_catalog(self.home) or no_catalog(self.home)
            if found is not None and found > SCHEMA_VERSION:
                raise schema_too_new(self.home, found)
            self.catalog.refuse_foreign(self._reader, found)
            if found == SCHEMA_VERSION:
                return
        lost = guards.lost_catalog(self.home, self._reader)
        if lost is not None:  # a fresh schema here would orphan every vector file
            raise lost
        from retrieval.store import schema

        schema.prepare(self.engine, self.home, self.writable)
        if self._reader is None:
            self._reader = self.catalog.reader()

    def _should_map(self, path: Path, ann_serves: bool) -> bool:
        """ANN files: map for readers when the ANN serves or the file is large (faiss cannot grow a mapped
        index, so writers load theirs); the exact store is always mapped unless `mmap=False`."""
        if self.writable or self.mmap is not None:
            return not self.writable and bool(self.mmap)
        return ann_serves or path.stat().st_size > vec.memory_available() // 4

    def _load_vectors(self, modality: str, check: bool) -> None:
        """Map the modality's segments named by `meta` (exact_segments.py); a lost or damaged one is left out
        unless `check` (repair then finds its rows without vectors)."""
        gens = exact_segments.named(self.meta, modality)
        self.generations[modality] = max(gens, default=0)
        if not gens:
            self.indexes[modality] = exact_segments.ExactStore.empty(self.fingerprint.dim) if self.fingerprint else None
            return
        d = self._require_model().dim
        self.mapped[modality] = self.mmap is not False
        kept, segments = [], []
        for gen in gens:
            path = self._vector_path(modality, gen)
            if not path.is_file():
                if check:
                    raise FileNotFoundError(path)
                continue
            sums = exact_segments.sums_of(self.meta, modality, gen)
            problem = checksums.problem_at_open(path, sums) if check else None
            if problem:
                raise IndexMismatch(f"vector file {path} {problem}: it is damaged; run `crossmodal repair` (it drops "
                                    f"the damaged vectors), then `crossmodal index` to re-embed them")
            try:
                segments.append(exact.ExactVectors.open(path, d, mmap=self.mapped[modality]))
                kept.append(gen)
            except IndexMismatch:
                if check:
                    raise
        self.indexes[modality] = exact_segments.ExactStore(d, kept, segments)

    def _load(self, check: bool, attempts: int = 3) -> None:
        """Read meta and vectors from one catalog snapshot; retry if a writer rotated files meanwhile.

        A read-only store keeps that snapshot (`hold`): its rows then come from the commit its vectors did."""
        for attempt in range(attempts):
            try:
                if not self.writable:
                    self.reader.hold(SNAPSHOT_HOLD_S)
                with self.reader.snapshot() as catalog:
                    self.meta = catalog.meta()
                    fp = self.meta.get("model")
                    self.fingerprint = Fingerprint.from_json(fp) if fp else None
                    for m in MODALITIES:
                        self._load_vectors(m, check)
                        self._ann.load(m, self.meta, self._should_map, last_attempt=attempt == attempts - 1)
                    if check:
                        self._check_agreement(catalog)
                return
            except FileNotFoundError as e:
                if attempt == attempts - 1:
                    raise IndexMismatch(f"vector file {e} named by the catalog is missing; run "
                                        f"`crossmodal repair`, then `crossmodal index` to re-embed") from e

    def refresh(self) -> bool:
        """Load the latest commit (a read-only store drops its held snapshot); True when anything changed."""
        before = dict(self.meta)
        self._load(check=True)
        return self.meta != before

    def close(self) -> None:
        """Release the writer lock and database handles."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._engine is not None:
            self._engine.dispose()
        if self._lock:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- model and meta ------------------------------------------------------------------------
    def bind_model(self, fp: Fingerprint, checkpoint_stat: dict[str, int] | None = None) -> None:
        """Record the model of a new index, or refuse one that differs from the recorded model."""
        if self.fingerprint is not None:
            if not self.fingerprint.same_model(fp):
                raise ModelMismatch(
                    f"this index was built with {self.fingerprint.describe()} and cannot be mixed with "
                    f"{fp.describe()}; use another --home for the new model")
            return
        self._require_writable()
        from retrieval.store import writes

        with writes.transaction(self.engine) as s:
            writes.put_meta(s, "model", fp.to_json())
            if checkpoint_stat:
                writes.put_meta(s, "checkpoint_stat", json.dumps(checkpoint_stat))
        self.fingerprint = fp
        self.meta["model"] = fp.to_json()
        for m in MODALITIES:
            if self.indexes.get(m) is None:
                self.indexes[m] = exact_segments.ExactStore.empty(fp.dim)

    def set_meta(self, key: str, value: str) -> None:
        """Record one small fact about the index (e.g. the reranker file) in the meta table."""
        self._require_writable()
        from retrieval.store import writes

        with writes.transaction(self.engine) as s:
            writes.put_meta(s, key, value)
        self.meta[key] = value

    def _require_writable(self) -> None:
        if not self.writable:
            raise RuntimeError("store opened read-only")

    # ---- the commit point ----------------------------------------------------------------------
    def commit(self, modality: str, items: Sequence[Item], vectors: np.ndarray,
               remove: Iterable[int] = ()) -> list[int]:
        """Insert `items` with their `vectors` and drop ids in `remove`, atomically. Returns new ids."""
        self._require_writable()
        fp = self._require_model()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, fp.dim)
        if len(items) != len(vectors):
            raise ValueError("one vector per item is required")
        remove = np.asarray(sorted(set(remove)), dtype=np.int64)
        index: exact_segments.ExactStore = self.indexes[modality]
        last_gen = max(self.generations[modality], int(self.meta.get(f"maxgen.{modality}", "0")))
        from retrieval.store import writes

        try:
            with writes.transaction(self.engine) as s:
                writes.delete_ids(s, remove.tolist())
                ids = np.asarray(writes.insert(s, items), dtype=np.int64)
                new, written = exact_segments.commit(index, ids, vectors, remove, last_gen,  # files written before
                                                     lambda g: self._vector_path(modality, g))  # the catalog names them
                self.indexes[modality] = new
                self._ann.follow(s, modality, ids, vectors, self.meta, fp.dim)  # writes its file first too
                writes.set_meta(s, exact_segments.meta_after(self.meta, modality, index, new, written, last_gen),
                                self.meta)
                writes.forget_skipped(s, [it.path for it in items if it.path])
        except BaseException:
            # Memory may hold uncommitted vectors and meta; reload the committed state before anything else.
            self._load(check=False)
            raise
        self.generations[modality] = max(new.gens, default=0)
        vec.cleanup(self.home / "vectors", modality, keep=set(index.gens) | set(new.gens))
        self._ann.cleanup(modality)
        return [int(i) for i in ids]

    # ---- ANN indexes (derived from the exact vectors: ann.py, ann_upkeep.py) ----------------------
    def tune_with(self, source: QuerySource | None) -> None:
        """Where ANN tuning gets query vectors of a kind this index holds too few of (see AnnUpkeep._cross):
        `source("text")` returns caption-like text vectors, e.g. the built-in vocabulary's."""
        self._ann.query_source = source

    def set_index_type(self, requested: str, budget: int | None = None, rebuild: bool = True,
                       force: bool = False, log: Log | None = None) -> dict[str, str]:
        """Record the index type to keep (auto/flat/hnsw/ivfpq/factory) and, with `rebuild`, build it now.

        The switch re-reads the stored vectors, never the images. Returns modality -> description.
        """
        self._require_writable()
        dim = self._require_model().dim
        from retrieval.store import writes

        try:
            with writes.transaction(self.engine) as s:
                out = self._ann.set_type(s, MODALITIES, requested, budget, self.meta, dim, rebuild, force, log)
        except BaseException:
            self._load(check=False)  # memory may hold the refused state; the catalog does not
            raise
        for m in MODALITIES:
            self._ann.cleanup(m)
        return out

    # ---- writes --------------------------------------------------------------------------------
    def add_images(self, records: Sequence[ImageRecord], vectors: np.ndarray,
                   replace: Iterable[int] = ()) -> list[int]:
        """Commit new image rows and vectors (and drop the rows they replace)."""
        from retrieval.store import writes

        return self.commit("image", writes.image_items(records), vectors, remove=replace)

    def add_texts(self, records: Sequence[TextRecord], vectors: np.ndarray) -> list[int]:
        """Commit caption rows and vectors."""
        from retrieval.store import writes

        return self.commit("text", writes.text_items(records), vectors)

    def remove_images(self, ids: Iterable[int]) -> int:
        """Drop images (rows and vectors) in one commit; returns how many."""
        ids = sorted({int(i) for i in ids})
        if not ids:
            return 0
        self.commit("image", [], np.zeros((0, self._require_model().dim), np.float32), remove=ids)
        return len(ids)

    def move_images(self, moves: Sequence[tuple[int, str, int, float]]) -> None:
        """Record new (path, bytes, mtime) for images whose content did not change: vectors stay."""
        if not moves:
            return
        self._require_writable()
        from retrieval.store import writes

        with writes.transaction(self.engine) as s:
            writes.move(s, moves)

    def record_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Remember files that could not be indexed and why (latest reason wins)."""
        if not skipped:
            return
        self._require_writable()
        from retrieval.store import writes

        with writes.transaction(self.engine) as s:
            writes.record_skipped(s, skipped)

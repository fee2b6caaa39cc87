"""The Store facade: catalog rows and vectors change together at one commit point.

Commit protocol: new vectors go to a new generation file (`vectors/<modality>-<gen>.faiss`, written
atomically) and only then does one SQLite transaction insert the rows and record the new generation.
A crash before the SQLite commit leaves an orphan file that is ignored; after it, both agree. The
previous generation is kept one commit longer so readers that opened it keep working.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..encoder import Fingerprint
from ..errors import IndexMismatch, IndexMissing, ModelMismatch, SchemaTooNew, UserError
from . import ann
from . import vectors as vec
from .lock import WriterLock
from .reader import CatalogReader
from .records import (
    CATALOG,
    MODALITIES,
    SCHEMA_VERSION,
    ImageFilter,
    ImageRecord,
    ItemView,
    QueryOptions,
    TextRecord,
    _iso_to_ts,
    date_bound,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

    from .catalog import Item

__all__ = ["CATALOG", "MODALITIES", "SCHEMA_VERSION", "ImageFilter", "ImageRecord", "ItemView", "QueryOptions",
           "Store", "TextRecord", "_iso_to_ts"]

# SQLAlchemy and the ORM tables load only when a store writes (or migrates, or makes an indexer-only read):
# a read-only store answers from the stdlib-sqlite3 CatalogReader, which keeps `crossmodal search` under 1 s.
_CATALOG_NAMES = ("Base", "Item", "Meta", "Skipped", "make_engine", "utcnow")


def __getattr__(name: str) -> Any:
    """The ORM names this module used to import eagerly (`store.Meta`, ...), loaded on first use."""
    if name in _CATALOG_NAMES:
        from . import catalog

        return getattr(catalog, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _view_of(it: Item) -> ItemView:
    """An ORM row as plain values."""
    return ItemView(it.id, it.modality, it.path, it.corpus, it.row, it.text, it.width, it.height,
                    it.taken_at, it.bytes, it.camera_make, it.camera_model, it.gps_lat, it.gps_lon, it.sha256)


def _session_ids(s: Session, modality: str) -> np.ndarray:
    """Every id of a modality, through a writer's session."""
    from sqlalchemy import select

    from .catalog import Item

    return np.asarray(s.scalars(select(Item.id).where(Item.modality == modality)).all(), dtype=np.int64)


class _SessionCatalog:
    """The snapshot reads `Store._load` makes (meta, ids per modality) on a SQLAlchemy session.

    Same two methods as CatalogReader, so loading reads one committed state either way.
    """

    def __init__(self, s: Session) -> None:
        self.s = s

    def meta(self) -> dict[str, str]:
        from sqlalchemy import select

        from .catalog import Meta

        return {m.key: m.value for m in self.s.scalars(select(Meta))}

    def ids(self, modality: str) -> np.ndarray:
        return _session_ids(self.s, modality)


def _v1_to_v2(session: Session) -> None:
    """Schema 2 adds camera make/model and GPS position to items."""
    from sqlalchemy import text

    for column, kind in (("camera_make", "VARCHAR(100)"), ("camera_model", "VARCHAR(100)"),
                         ("gps_lat", "FLOAT"), ("gps_lon", "FLOAT")):
        session.execute(text(f"ALTER TABLE items ADD COLUMN {column} {kind}"))


def _migrate(session: Session, found: int) -> None:
    """The migration ladder: step found -> found+1 until current. Version 1 is the first schema."""
    ladder: dict[int, object] = {1: _v1_to_v2}
    while found < SCHEMA_VERSION:
        step = ladder.get(found)
        if step is None:
            raise SchemaTooNew(f"catalog schema {found} cannot be upgraded by this crossmodal")
        step(session)  # type: ignore[operator]
        found += 1


class Store:
    """An index home: catalog.sqlite + one FAISS file per modality. Open with `Store.open`.

    Writers go through SQLAlchemy (`engine`, created on first use). A read-only store answers catalog reads
    from a stdlib-sqlite3 CatalogReader, so a query process never imports SQLAlchemy unless it must migrate
    an older catalog or asks for an indexer-only read (all_image_shas, shas_in_use, image_files, text_hashes).
    """

    def __init__(self, home: Path, writable: bool, lock: WriterLock | None, mmap: bool | None = None
                 ) -> None:
        self.home = home
        self.writable = writable
        self._lock = lock
        self.mmap = False if writable else mmap  # None: map files larger than a quarter of free memory
        self.mapped: dict[str, bool] = {}
        self.ann: dict[str, object | None] = {}
        self.ann_state: dict[str, ann.AnnState] = {}
        self.ann_dead: dict[str, np.ndarray] = {}
        self.ann_problem: dict[str, str] = {}
        self.query_options = QueryOptions()
        self._engine: Engine | None = None
        self._reader: CatalogReader | None = None if writable else CatalogReader(home / CATALOG)
        self.fingerprint: Fingerprint | None = None
        self.indexes: dict[str, object] = {}
        self.generations: dict[str, int] = {}
        self.meta: dict[str, str] = {}

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, home: str | Path, *, create: bool = False, writable: bool = False,
             check: bool = True, mmap: bool | None = None) -> Store:
        """Open (or with `create`, make) an index; writers take the home's lock; `check` verifies agreement.

        Readers memory-map vector files with `mmap=True`, or by default when a file is larger than a
        quarter of free memory or an ANN index serves the queries (the exact vectors are then only
        read for re-scoring). Writers never map.
        """
        home = Path(home).expanduser().absolute()
        if not (home / CATALOG).is_file():
            if not create:
                raise IndexMissing(f"no index in {home} yet; build one with `crossmodal index FOLDER`")
            if home.exists() and not home.is_dir():
                raise UserError(f"index home {home} exists and is not a folder")
            (home / "vectors").mkdir(parents=True, exist_ok=True)
        lock = WriterLock(home) if writable else None
        store: Store | None = None
        try:
            store = cls(home, writable, lock, mmap)
            store._prepare_schema()
            store._load(check=check)
        except BaseException:
            if store is not None:
                store.close()  # releases the lock too
            elif lock:
                lock.release()
            raise
        return store

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, made (and SQLAlchemy imported) on first use: writers and migrations."""
        if self._engine is None:
            from .catalog import make_engine

            self._engine = make_engine(f"sqlite:///{self.home / CATALOG}")
        return self._engine

    def _too_new(self, found: int) -> SchemaTooNew:
        return SchemaTooNew(f"index in {self.home} was written by a newer crossmodal "
                            f"(schema {found} > {SCHEMA_VERSION}); upgrade crossmodal")

    def _prepare_schema(self) -> None:
        """Make the tables (writers), refuse a newer schema, migrate an older one.

        A read-only store checks the version through its reader; only an older catalog, which it migrates
        under the writer lock, needs SQLAlchemy.
        """
        if self._reader is not None:
            try:
                found = self._reader.schema_version() if self._reader.has_catalog() else None
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError):  # locked, I/O: not a verdict on the file
                    raise
                raise IndexMismatch(f"catalog {self.home / CATALOG} is unreadable ({e}): not a crossmodal "
                                    f"catalog, or damaged; restore it, or index into a new --home") from e
            if found is None:
                raise IndexMissing(f"{self.home} holds no crossmodal catalog")
            if found > SCHEMA_VERSION:
                raise self._too_new(found)
            if found == SCHEMA_VERSION:
                return
        from sqlalchemy.orm import Session

        from .catalog import Base, Meta, Skipped

        if self.writable:
            from sqlalchemy import inspect

            if not inspect(self.engine).has_table("items"):
                Base.metadata.create_all(self.engine)
            else:  # tables of an older schema are migrated below, never recreated
                Base.metadata.create_all(self.engine, tables=[Meta.__table__, Skipped.__table__])
        lock: WriterLock | None = None
        try:
            with Session(self.engine) as s, s.begin():
                row = s.get(Meta, "schema_version")
                if row is None:
                    if not self.writable:
                        raise IndexMissing(f"{self.home} holds no crossmodal catalog")
                    s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                    return
                found = int(row.value)
                if found > SCHEMA_VERSION:
                    raise self._too_new(found)
                if found < SCHEMA_VERSION:
                    # Readers upgrade too (holding the writer lock meanwhile), so queries keep working.
                    lock = None if self.writable else WriterLock(self.home)
                    _migrate(s, found)
                    row.value = str(SCHEMA_VERSION)
        finally:
            if lock:
                lock.release()

    def _vector_path(self, modality: str, gen: int) -> Path:
        return self.home / "vectors" / f"{modality}-{gen}.faiss"

    def _ann_path(self, modality: str, gen: int) -> Path:
        return self.home / "vectors" / f"{modality}-ann-{gen}.faiss"

    def _should_map(self, path: Path, ann_serves: bool) -> bool:
        if self.writable:
            return False
        if self.mmap is not None:
            return self.mmap
        return ann_serves or path.stat().st_size > vec.memory_available() // 4

    def _load_ann(self, modality: str, last_attempt: bool) -> None:
        """Open the modality's ANN index named by the catalog; an unusable one means exact search."""
        state = ann.AnnState.from_json(self.meta.get(f"ann.{modality}"))
        self.ann_state[modality] = state
        self.ann[modality] = None
        self.ann_dead[modality] = np.zeros(0, np.int64)
        self.ann_problem.pop(modality, None)
        flat = self.indexes.get(modality)
        if not state.active or flat is None:
            return
        path = self._ann_path(modality, state.gen)
        if not path.is_file():
            if not last_attempt:
                raise FileNotFoundError(path)  # a writer may have rotated files: read the catalog again
            self.ann_problem[modality] = f"ANN file {path.name} is missing"
            return
        try:
            index = vec.read_index(path, mmap=self._should_map(path, True), ivf=ann.family(state.factory) == "ivf")
        except IndexMismatch:
            self.ann_problem[modality] = f"ANN file {path.name} is unreadable"
            return
        self.ann[modality] = index
        if int(index.ntotal) == int(flat.ntotal):
            return  # the commit protocol keeps every live id in the ANN index: equal counts, no tombstones
        held, live = vec.ids_of(index), vec.ids_of(flat)
        missing = len(np.setdiff1d(live, held, assume_unique=True))
        if missing:
            self.ann[modality] = None
            self.ann_problem[modality] = f"ANN index lacks {missing} vectors"
            return
        self.ann_dead[modality] = np.setdiff1d(held, live, assume_unique=True)

    def _load(self, check: bool, attempts: int = 3) -> None:
        """Read meta and vectors from one catalog snapshot; retry if a writer rotated files meanwhile."""
        for attempt in range(attempts):
            try:
                with self._snapshot() as catalog:
                    self.meta = catalog.meta()
                    fp = self.meta.get("model")
                    self.fingerprint = Fingerprint.from_json(fp) if fp else None
                    for m in MODALITIES:
                        gen = int(self.meta.get(f"gen.{m}", "0"))
                        self.generations[m] = gen
                        if gen == 0:
                            self.indexes[m] = vec.new_index(self.fingerprint.dim) if self.fingerprint else None
                        else:
                            path = self._vector_path(m, gen)
                            if path.is_file():
                                try:
                                    ann_serves = ann.AnnState.from_json(self.meta.get(f"ann.{m}")).active
                                    self.mapped[m] = self._should_map(path, ann_serves)
                                    self.indexes[m] = vec.read_index(path, mmap=self.mapped[m])
                                except IndexMismatch:
                                    if check:
                                        raise
                                    self.indexes[m] = vec.new_index(self.fingerprint.dim)
                            elif check:
                                raise FileNotFoundError(path)
                            else:  # repair mode: a lost file counts as no vectors
                                self.indexes[m] = vec.new_index(self.fingerprint.dim)
                        self._load_ann(m, last_attempt=attempt == attempts - 1)
                    if check:
                        self._check_agreement(catalog.ids)
                return
            except FileNotFoundError as e:
                if attempt == attempts - 1:
                    raise IndexMismatch(f"vector file {e} named by the catalog is missing; run "
                                        f"`crossmodal repair`, then `crossmodal index` to re-embed") from e

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[CatalogReader | _SessionCatalog]:
        """One committed catalog state offering `meta()` and `ids(modality)`: the reader's, or a session's."""
        if self._reader is not None:
            with self._reader.snapshot() as reader:
                yield reader
            return
        from sqlalchemy.orm import Session

        with Session(self.engine) as s, s.begin():
            yield _SessionCatalog(s)

    def _check_agreement(self, catalog_ids: Callable[[str], np.ndarray]) -> None:
        for m in MODALITIES:
            rows = catalog_ids(m)
            index = self.indexes.get(m)
            held = vec.ids_of(index) if index is not None else np.zeros(0, dtype=np.int64)
            if len(rows) == len(held) and np.array_equal(np.sort(rows), np.sort(held)):
                continue
            no_vec = len(np.setdiff1d(rows, held))
            no_row = len(np.setdiff1d(held, rows))
            raise IndexMismatch(
                f"catalog and {m} vectors disagree in {self.home} ({no_vec} rows without a vector, "
                f"{no_row} vectors without a row); run `crossmodal repair`, then `crossmodal index` "
                f"to re-embed what it dropped")

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

    # ---- model ---------------------------------------------------------------------------------
    def bind_model(self, fp: Fingerprint, checkpoint_stat: dict[str, int] | None = None) -> None:
        """Record the model of a new index, or refuse one that differs from the recorded model."""
        if self.fingerprint is not None:
            if not self.fingerprint.same_model(fp):
                raise ModelMismatch(
                    f"this index was built with {self.fingerprint.describe()} and cannot be mixed with "
                    f"{fp.describe()}; use another --home for the new model")
            return
        self._require_writable()
        from sqlalchemy.orm import Session

        from .catalog import Meta

        with Session(self.engine) as s, s.begin():
            s.merge(Meta(key="model", value=fp.to_json()))
            if checkpoint_stat:
                s.merge(Meta(key="checkpoint_stat", value=json.dumps(checkpoint_stat)))
        self.fingerprint = fp
        self.meta["model"] = fp.to_json()
        for m in MODALITIES:
            if self.indexes.get(m) is None:
                self.indexes[m] = vec.new_index(fp.dim)

    def checkpoint_stat(self) -> dict[str, int] | None:
        raw = self.meta.get("checkpoint_stat")
        return json.loads(raw) if raw else None

    def set_meta(self, key: str, value: str) -> None:
        """Record one small fact about the index (e.g. the reranker file) in the meta table."""
        self._require_writable()
        from sqlalchemy.orm import Session

        from .catalog import Meta

        with Session(self.engine) as s, s.begin():
            s.merge(Meta(key=key, value=value))
        self.meta[key] = value

    def get_meta(self, key: str) -> str | None:
        """A meta value as of when the store was opened (or last set), None if absent."""
        return self.meta.get(key)

    def _require_writable(self) -> None:
        if not self.writable:
            raise RuntimeError("store opened read-only")

    def _require_model(self) -> Fingerprint:
        if self.fingerprint is None:
            raise IndexMissing(f"the index in {self.home} is empty; run `crossmodal index FOLDER` first")
        return self.fingerprint

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
        index = self.indexes[modality]
        old_gen = self.generations[modality]
        new_gen = max(old_gen, int(self.meta.get(f"maxgen.{modality}", "0"))) + 1
        from sqlalchemy import delete
        from sqlalchemy.orm import Session

        from .catalog import Item, Meta, Skipped

        try:
            with Session(self.engine, expire_on_commit=False) as s, s.begin():
                if len(remove):
                    s.execute(delete(Item).where(Item.id.in_(remove.tolist())))
                s.add_all(items)
                s.flush()
                ids = np.asarray([it.id for it in items], dtype=np.int64)
                vec.remove_ids(index, remove)
                if len(ids):
                    index.add_with_ids(vectors, ids)
                vec.write_atomic(index, self._vector_path(modality, new_gen))
                self._ann_follow(s, modality, ids, vectors)
                s.merge(Meta(key=f"gen.{modality}", value=str(new_gen)))
                s.merge(Meta(key=f"maxgen.{modality}", value=str(new_gen)))
                paths = [it.path for it in items if it.path]
                if paths:
                    s.execute(delete(Skipped).where(Skipped.path.in_(paths)))
        except BaseException:
            # Memory may hold uncommitted vectors; reload the committed state before anything else.
            self._load(check=False)
            raise
        self.generations[modality] = new_gen
        self.meta[f"gen.{modality}"] = self.meta[f"maxgen.{modality}"] = str(new_gen)
        self._cleanup(modality, keep={new_gen, old_gen})
        self._cleanup_ann(modality)
        return ids.tolist()

    # ---- ANN indexes (derived from the exact vectors, see ann.py) --------------------------------
    def _ann_follow(self, s: Session, modality: str, ids: np.ndarray, vectors: np.ndarray,
                    force: bool = False, log=None) -> None:
        """Keep the ANN index in step with a commit: add the new vectors, or rebuild when due.

        Runs inside the commit's transaction; the new ANN file is written before SQLite commits.
        """
        from .catalog import Meta

        state = self.ann_state.get(modality) or ann.AnnState()
        flat = self.indexes[modality]
        n = int(flat.ntotal)
        target = ann.resolve(state.requested, n, self._require_model().dim, state.budget)
        current = self.ann.get(modality)
        dead = 0
        if current is not None and state.active:
            dead = int(current.ntotal) + len(ids) - n  # every entry beyond the live count is a tombstone
        healthy = modality not in self.ann_problem and (current is not None or not state.active)
        if force or ann.needs_rebuild(state, target, n, dead, healthy):
            new_index, state = self._ann_build(modality, target, state, log)
        elif state.active and len(ids):
            current.add_with_ids(vectors, ids)  # type: ignore[union-attr]
            new_index = current
        elif state.active:
            # Only deletions: the ANN file stays as it is; tombstones follow from the exact store.
            self.ann_dead[modality] = np.setdiff1d(vec.ids_of(current), vec.ids_of(flat), assume_unique=True)
            return
        else:
            if f"ann.{modality}" not in self.meta or self.meta[f"ann.{modality}"] != state.to_json():
                s.merge(Meta(key=f"ann.{modality}", value=state.to_json()))
                self.meta[f"ann.{modality}"] = state.to_json()
            return
        if new_index is not None:
            gen = max(state.gen, int(self.meta.get(f"annmax.{modality}", "0"))) + 1
            vec.write_atomic(new_index, self._ann_path(modality, gen))
            state = replace(state, gen=gen)
            s.merge(Meta(key=f"annmax.{modality}", value=str(gen)))
            self.meta[f"annmax.{modality}"] = str(gen)
        s.merge(Meta(key=f"ann.{modality}", value=state.to_json()))
        self.meta[f"ann.{modality}"] = state.to_json()
        self.ann[modality] = new_index
        self.ann_state[modality] = state
        self.ann_problem.pop(modality, None)
        self.ann_dead[modality] = (np.zeros(0, np.int64) if new_index is None else
                                   np.setdiff1d(vec.ids_of(new_index), vec.ids_of(flat), assume_unique=True))

    def _ann_build(self, modality: str, target: str, state: ann.AnnState, log=None):
        """Build `target` from the stored vectors and tune its knob; Flat means no ANN index."""
        flat = self.indexes[modality]
        n = int(flat.ntotal)
        base = replace(state, factory=target, gen=0, built_n=n, param=None, value=None, refine=1,
                       recall=None, query_ms=None)
        if target == ann.FLAT:
            return None, base
        ids, vectors = vec.vectors_of(flat)
        index, tuned = ann.build(target, ids, vectors, base, lambda q, k: flat.search(q, min(k, n)),
                                 flat.reconstruct_batch, log=log)
        if log:
            log(f"{modality}: built {target} over {n} vectors: {tuned.describe()}")
        return index, tuned

    def set_index_type(self, requested: str, budget: int | None = None, rebuild: bool = True,
                       force: bool = False, log=None) -> dict[str, str]:
        """Record the index type to keep (auto/flat/hnsw/ivfpq/factory) and, with `rebuild`, build it now.

        The switch re-reads the stored vectors, never the images. Returns modality -> description.
        """
        self._require_writable()
        dim = self._require_model().dim
        req = requested.strip()
        if req.lower() in ann.TYPES:
            req = req.lower()
        else:
            ann.check_factory(req, dim)
        out: dict[str, str] = {}
        from sqlalchemy.orm import Session

        from .catalog import Meta

        with Session(self.engine) as s, s.begin():
            for m in MODALITIES:
                old = self.ann_state.get(m) or ann.AnnState()
                state = replace(old, requested=req, budget=budget)
                self.ann_state[m] = state
                if rebuild and self.indexes.get(m) is not None:
                    changed = (old.requested, old.budget) != (req, budget)
                    self._ann_follow(s, m, np.zeros(0, np.int64), np.zeros((0, dim), np.float32),
                                     force=force or changed and state.active, log=log)
                else:
                    s.merge(Meta(key=f"ann.{m}", value=state.to_json()))
                    self.meta[f"ann.{m}"] = state.to_json()
                out[m] = self.ann_state[m].describe()
        for m in MODALITIES:
            self._cleanup_ann(m)
        return out

    def _cleanup_ann(self, modality: str) -> None:
        """Drop ANN files other than the current one and the one before it (readers may hold it)."""
        current = self.ann_state.get(modality, ann.AnnState()).gen
        pattern = re.compile(rf"^{modality}-ann-(\d+)\.faiss(\.tmp)?$")
        files = []
        for p in (self.home / "vectors").glob(f"{modality}-ann-*.faiss*"):
            m = pattern.match(p.name)
            if m:
                files.append((int(m.group(1)), bool(m.group(2)), p))
        older = sorted({g for g, tmp, _ in files if g < current and not tmp})
        keep = {current} | ({older[-1]} if older else set())
        for g, tmp, p in files:
            if tmp or g not in keep:
                p.unlink(missing_ok=True)

    def ann_info(self, modality: str) -> dict[str, object]:
        """How a modality is searched: the recorded ANN state, any problem, and whether files are mapped."""
        state = self.ann_state.get(modality) or ann.AnnState()
        info: dict[str, object] = {"requested": state.requested, "factory": state.factory,
                                   "describe": state.describe(), "param": state.param, "value": state.value,
                                   "refine": state.refine, "recall_at_10": state.recall,
                                   "tombstones": int(len(self.ann_dead.get(modality, ()))),
                                   "memory_mapped": bool(self.mapped.get(modality, False))}
        if state.active:
            p = self._ann_path(modality, state.gen)
            info["ann_bytes"] = p.stat().st_size if p.is_file() else None
        if modality in self.ann_problem:
            info["problem"] = self.ann_problem[modality] + "; exact search serves until `crossmodal reindex`"
        return info

    def _cleanup(self, modality: str, keep: set[int]) -> None:
        pattern = re.compile(rf"^{modality}-(\d+)\.faiss(\.tmp)?$")
        for p in (self.home / "vectors").glob(f"{modality}-*.faiss*"):
            m = pattern.match(p.name)
            if m and (m.group(2) or int(m.group(1)) not in keep):
                p.unlink(missing_ok=True)

    # ---- images --------------------------------------------------------------------------------
    def add_images(self, records: Sequence[ImageRecord], vectors: np.ndarray,
                   replace: Iterable[int] = ()) -> list[int]:
        """Commit new image rows and vectors (and drop the rows they replace)."""
        from .catalog import Item, utcnow

        now = utcnow()
        items = [Item(modality="image", path=r.path, sha256=r.sha256, bytes=r.bytes, mtime=r.mtime,
                      width=r.width, height=r.height, taken_at=r.taken_at, camera_make=r.camera_make,
                      camera_model=r.camera_model, gps_lat=r.gps_lat, gps_lon=r.gps_lon, added_at=now)
                 for r in records]
        return self.commit("image", items, vectors, remove=replace)

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
        from sqlalchemy import delete, update
        from sqlalchemy.orm import Session

        from .catalog import Item, Skipped

        with Session(self.engine) as s, s.begin():
            for item_id, path, size, mtime in moves:
                s.execute(update(Item).where(Item.id == item_id).values(path=path, bytes=size, mtime=mtime))
            s.execute(delete(Skipped).where(Skipped.path.in_([m[1] for m in moves])))

    def image_shas(self, ids: Iterable[int]) -> dict[int, str]:
        """id -> content hash, for move detection."""
        if self._reader is not None:
            return self._reader.image_shas(ids)
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from .catalog import Item

        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        with Session(self.engine) as s:
            for start in range(0, len(ids), 900):
                rows = s.execute(select(Item.id, Item.sha256).where(Item.id.in_(ids[start:start + 900])))
                out.update({i: h for i, h in rows})
        return out

    def ids_under(self, folder: str) -> list[int]:
        """Images at or below a folder (or that exact file)."""
        return self.image_ids(ImageFilter(under=folder)).tolist()

    def all_image_shas(self) -> set[str]:
        """Every content hash the image rows hold (what caches keyed by content must keep)."""
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from .catalog import Item

        with Session(self.engine) as s:
            return set(s.scalars(select(Item.sha256).where(Item.modality == "image")))

    def shas_in_use(self, shas: Iterable[str]) -> set[str]:
        """Which of these content hashes some image row still has (thumbnails of the rest can go)."""
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from .catalog import Item

        shas = list(set(shas))
        used: set[str] = set()
        with Session(self.engine) as s:
            for start in range(0, len(shas), 900):
                used.update(s.scalars(select(Item.sha256).where(Item.modality == "image",
                                                                Item.sha256.in_(shas[start:start + 900]))))
        return used

    def image_files(self) -> dict[str, tuple[int, int | None, float | None]]:
        """path -> (id, bytes, mtime) for every indexed image, for the rescan diff."""
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from .catalog import Item

        with Session(self.engine) as s:
            rows = s.execute(select(Item.path, Item.id, Item.bytes, Item.mtime)
                             .where(Item.modality == "image"))
            return {p: (i, b, m) for p, i, b, m in rows}

    def record_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Remember files that could not be indexed and why (latest reason wins)."""
        if not skipped:
            return
        self._require_writable()
        from sqlalchemy.orm import Session

        from .catalog import Skipped, utcnow

        with Session(self.engine) as s, s.begin():
            for path, reason in skipped:
                s.merge(Skipped(path=path, reason=reason, at=utcnow()))

    def skipped(self) -> list[tuple[str, str]]:
        """Files the indexer could not read, with the reason, by path."""
        if self._reader is not None:
            return self._reader.skipped()
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from .catalog import Skipped

        with Session(self.engine) as s:
            return [(p, r) for p, r in s.execute(select(Skipped.path, Skipped.reason).order_by(Skipped.path))]

    # ---- texts ---------------------------------------------------------------------------------
    def add_texts(self, records: Sequence[TextRecord], vectors: np.ndarray) -> list[int]:
        """Commit caption rows and vectors."""
        from .catalog import Item, utcnow

        now = utcnow()
        items = [Item(modality="text", corpus=r.corpus, row=r.row, text=r.text, sha256=r.sha256,
                      added_at=now) for r in records]
        return self.commit("text", items, vectors)

    def text_hashes(self, corpus: str) -> set[str]:
        """Hashes of the captions a corpus already holds, so re-adding a file adds only what is new."""
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from .catalog import Item

        with Session(self.engine) as s:
            return set(s.scalars(select(Item.sha256).where(Item.modality == "text", Item.corpus == corpus)))

    # ---- reading -------------------------------------------------------------------------------
    def count(self, modality: str) -> int:
        index = self.indexes.get(modality)
        return int(index.ntotal) if index is not None else 0

    def corpora(self) -> dict[str, int]:
        """Caption corpus -> how many captions it holds, by name."""
        if self._reader is not None:
            return self._reader.corpora()
        from sqlalchemy import func, select
        from sqlalchemy.orm import Session

        from .catalog import Item

        with Session(self.engine) as s:
            rows = s.execute(select(Item.corpus, func.count()).where(Item.modality == "text")
                             .group_by(Item.corpus).order_by(Item.corpus))
            return {c: n for c, n in rows}

    def search(self, modality: str, queries: np.ndarray, k: int,
               restrict: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner-product top-k: (scores, ids), each (n_queries, <=k); ids of -1 are dropped later.

        `restrict` limits the search to those ids (a FAISS id selector, so the top-k stays exact).
        """
        index = self.indexes.get(modality)
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self._require_model().dim)
        pool = int(index.ntotal) if index is not None else 0
        if restrict is not None:
            pool = min(pool, len(restrict))
        if pool == 0 or k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if restrict is None:
            approx = self._ann_query(modality)
            if approx is not None:
                param, value, refine = approx
                return ann.ann_search(self.ann[modality], q, min(k, pool), param, value, refine,
                                      self.ann_dead[modality], index.reconstruct_batch)
            return index.search(q, min(k, pool))
        import faiss

        sel = faiss.IDSelectorBatch(np.ascontiguousarray(restrict, dtype=np.int64))
        return index.search(q, min(k, pool), params=faiss.SearchParameters(sel=sel))

    def _ann_query(self, modality: str) -> tuple[str | None, int | None, int] | None:
        """(knob, value, refine) when the ANN index answers this query; None for exact search.

        Filtered queries (`restrict`) stay exact: a selective filter starves an ANN index.
        """
        opts = self.query_options
        state = self.ann_state.get(modality) or ann.AnnState()
        knob = ("nprobe", opts.nprobe) if opts.nprobe else ("efSearch", opts.ef_search) if opts.ef_search else None
        if opts.exact or self.ann.get(modality) is None:
            if knob and not opts.exact and modality == "image":
                raise UserError(f"--{'nprobe' if knob[0] == 'nprobe' else 'ef-search'} needs an ANN index; "
                                f"this one searches exactly ({state.describe()})")
            return None
        if knob:
            if knob[0] != state.param:
                flag = "--nprobe" if knob[0] == "nprobe" else "--ef-search"
                raise UserError(f"{flag} does not apply to {state.factory} "
                                f"(its knob is {state.param or 'none'})")
            return knob[0], knob[1], state.refine
        return state.param, state.value, state.refine

    def image_ids(self, flt: ImageFilter) -> np.ndarray:
        """Ids of the images that pass a filter (for `search(..., restrict=...)`).

        A date bound compares with the EXIF date as text, or with the file time for images without one.
        """
        after = date_bound(flt.after) if flt.after else None
        before = date_bound(flt.before) if flt.before else None
        if self._reader is not None:
            return self._reader.image_ids(under=flt.under, camera=flt.camera, after=after, before=before)
        from sqlalchemy import and_, func, or_, select
        from sqlalchemy.orm import Session

        from .catalog import Item

        cond = [Item.modality == "image"]
        if flt.under:
            exact = os.path.abspath(os.path.expanduser(flt.under)).rstrip(os.sep) or os.sep
            folder = exact.rstrip(os.sep) + os.sep
            cond.append(or_(func.substr(Item.path, 1, len(folder)) == folder, Item.path == exact))
        if flt.camera:
            needle = f"%{flt.camera.lower()}%"
            camera = func.lower(func.coalesce(Item.camera_make, "") + " " + func.coalesce(Item.camera_model, ""))
            cond.append(camera.like(needle))
        for bound, op in ((after, "ge"), (before, "lt")):
            if bound is None:
                continue
            iso, ts = bound
            by_exif = Item.taken_at >= iso if op == "ge" else Item.taken_at < iso
            by_mtime = Item.mtime >= ts if op == "ge" else Item.mtime < ts
            cond.append(or_(by_exif, and_(Item.taken_at.is_(None), by_mtime)))
        with Session(self.engine) as s:
            ids = s.scalars(select(Item.id).where(and_(*cond))).all()
        return np.asarray(ids, dtype=np.int64)

    def cameras(self, limit: int = 200) -> list[str]:
        """Distinct "make model" strings of indexed images (for a camera picker), most common first."""
        if self._reader is not None:
            return self._reader.cameras(limit)
        from sqlalchemy import func, select
        from sqlalchemy.orm import Session

        from .catalog import Item

        with Session(self.engine) as s:
            rows = s.execute(select(Item.camera_make, Item.camera_model, func.count())
                             .where(Item.modality == "image",
                                    (Item.camera_make.is_not(None)) | (Item.camera_model.is_not(None)))
                             .group_by(Item.camera_make, Item.camera_model)
                             .order_by(func.count().desc()).limit(limit))
            return [" ".join(p for p in (make, model) if p) for make, model, _ in rows]

    def text_ids(self, corpus: str) -> np.ndarray:
        """Ids of one corpus's captions (to restrict a caption search)."""
        if self._reader is not None:
            return self._reader.text_ids(corpus)
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from .catalog import Item

        with Session(self.engine) as s:
            ids = s.scalars(select(Item.id).where(Item.modality == "text", Item.corpus == corpus)).all()
        return np.asarray(ids, dtype=np.int64)

    def vectors(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of a modality: for oracles, exports and rebuilds."""
        index = self.indexes.get(modality)
        if index is None:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        return vec.vectors_of(index)

    def vector(self, modality: str, item_id: int) -> np.ndarray:
        """The stored vector of one item."""
        index = self.indexes.get(modality)
        try:
            return index.reconstruct(int(item_id))  # type: ignore[union-attr]
        except (RuntimeError, AttributeError) as e:
            raise UserError(f"no {modality} with id {item_id} in the index") from e

    def items(self, ids: Iterable[int]) -> dict[int, ItemView]:
        """Catalog rows for ids, as plain values."""
        if self._reader is not None:
            return {i: ItemView(*row) for i, row in self._reader.items(ids).items()}
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from .catalog import Item

        ids = [int(i) for i in ids if int(i) >= 0]
        out: dict[int, ItemView] = {}
        with Session(self.engine) as s:
            for start in range(0, len(ids), 900):
                for it in s.scalars(select(Item).where(Item.id.in_(ids[start:start + 900]))):
                    out[it.id] = _view_of(it)
        return out

    def size_on_disk(self) -> int:
        """Bytes used by the catalog and the current vector files."""
        total = 0
        for p in [self.home / CATALOG, self.home / (CATALOG + "-wal")] + [
                self._vector_path(m, g) for m, g in self.generations.items() if g] + [
                self._ann_path(m, st.gen) for m, st in self.ann_state.items() if st.active]:
            if p.is_file():
                total += p.stat().st_size
        return total

    # ---- repair --------------------------------------------------------------------------------
    def repair(self) -> dict[str, int]:
        """Make catalog and vectors agree: drop rows without vectors and vectors without rows."""
        self._require_writable()
        report = {"rows_dropped": 0, "vectors_dropped": 0}
        from sqlalchemy import delete
        from sqlalchemy.orm import Session

        from .catalog import Item, Meta

        with Session(self.engine) as s, s.begin():
            for m in MODALITIES:
                rows = _session_ids(s, m)
                index = self.indexes.get(m)
                if index is None:
                    if len(rows):
                        s.execute(delete(Item).where(Item.modality == m))
                        report["rows_dropped"] += len(rows)
                    continue
                held = vec.ids_of(index)
                no_vec = np.setdiff1d(rows, held)
                no_row = np.setdiff1d(held, rows)
                if len(no_vec):
                    for start in range(0, len(no_vec), 900):
                        s.execute(delete(Item).where(Item.id.in_(no_vec[start:start + 900].tolist())))
                report["rows_dropped"] += len(no_vec)
                report["vectors_dropped"] += vec.remove_ids(index, no_row)
                gen = max(self.generations.get(m, 0), int(self.meta.get(f"maxgen.{m}", "0"))) + 1
                vec.write_atomic(index, self._vector_path(m, gen))
                s.merge(Meta(key=f"gen.{m}", value=str(gen)))
                s.merge(Meta(key=f"maxgen.{m}", value=str(gen)))
                self.generations[m] = gen
                if index is not None and self.fingerprint is not None:  # ANN: derived, rebuilt from the rest
                    self.ann_problem.pop(m, None)
                    self._ann_follow(s, m, np.zeros(0, np.int64), np.zeros((0, index.d), np.float32),
                                     force=(self.ann_state.get(m) or ann.AnnState()).active)
        self._load(check=True)
        return report

"""Both catalog readers (stdlib sqlite3, and psycopg for PostgreSQL) answer every read exactly as SQLAlchemy does.

Every Store, read-only or writable, reads through its CatalogReader (SqliteReader or PgReader); the reference
each answer is held equal to is `OrmOracle` below: the SQLAlchemy ORM expressions the Store used to run itself,
kept here as an independent oracle, run on the same backend. The shared-index tests run once per backend
(`backend`), the PostgreSQL ones marked `postgres`.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.errors import IndexMismatch, IndexMissing, SchemaTooNew
from retrieval.model.spec import Fingerprint
from retrieval.store import ImageFilter, ImageRecord, ItemView, Store
from retrieval.store.reader import ITEM_FIELDS, CatalogReader
from retrieval.store.sqlite_reader import SqliteReader
from tests.helpers import ROOT


def _bound(text: str) -> tuple[str, float]:
    from datetime import datetime

    return (text if "T" in text else text + "T00:00:00"), datetime.fromisoformat(text).timestamp()


class OrmOracle:
    """The catalog reads as SQLAlchemy ORM expressions (what the Store ran before every read went through
    its CatalogReader): an independent reference for the reader's SQL."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine

        self.engine = create_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    def _all(self, stmt: Any) -> list[Any]:
        from sqlalchemy.orm import Session

        with Session(self.engine) as s:
            return list(s.execute(stmt).all())

    def _scalars(self, stmt: Any) -> list[Any]:
        return [row[0] for row in self._all(stmt)]

    def meta(self) -> dict[str, str]:
        from sqlalchemy import select

        from retrieval.store.schema import Meta

        return dict(self._all(select(Meta.key, Meta.value)))

    def ids(self, modality: str) -> np.ndarray:
        from sqlalchemy import select

        from retrieval.store.schema import Item

        return np.asarray(self._scalars(select(Item.id).where(Item.modality == modality)), dtype=np.int64)

    def items(self, ids: Iterable[int]) -> dict[int, ItemView]:
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from retrieval.store.schema import Item

        ids = [int(i) for i in ids if int(i) >= 0]
        out: dict[int, ItemView] = {}
        with Session(self.engine) as s:
            for start in range(0, len(ids), 900):
                for it in s.scalars(select(Item).where(Item.id.in_(ids[start:start + 900]))):
                    out[it.id] = ItemView(it.id, it.modality, it.path, it.corpus, it.row, it.text, it.width,
                                          it.height, it.taken_at, it.bytes, it.camera_make, it.camera_model,
                                          it.gps_lat, it.gps_lon, it.sha256)
        return out

    def image_shas(self, ids: Iterable[int]) -> dict[int, str]:
        from sqlalchemy import select

        from retrieval.store.schema import Item

        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        for start in range(0, len(ids), 900):
            out.update(dict(self._all(select(Item.id, Item.sha256).where(Item.id.in_(ids[start:start + 900])))))
        return out

    def corpora(self) -> dict[str, int]:
        from sqlalchemy import func, select

        from retrieval.store.schema import Item

        return dict(self._all(select(Item.corpus, func.count()).where(Item.modality == "text")
                              .group_by(Item.corpus).order_by(Item.corpus)))

    def skipped(self) -> list[tuple[str, str]]:
        from sqlalchemy import select

        from retrieval.store.schema import Skipped

        return [(p, r) for p, r in self._all(select(Skipped.path, Skipped.reason).order_by(Skipped.path))]

    def cameras(self, limit: int = 200) -> list[str]:
        from sqlalchemy import func, select

        from retrieval.store.schema import Item

        rows = self._all(select(Item.camera_make, Item.camera_model, func.count())
                         .where(Item.modality == "image",
                                (Item.camera_make.is_not(None)) | (Item.camera_model.is_not(None)))
                         .group_by(Item.camera_make, Item.camera_model)
                         .order_by(func.count().desc()).limit(limit))
        return [" ".join(p for p in (make, model) if p) for make, model, _ in rows]

    def text_ids(self, corpus: str) -> np.ndarray:
        from sqlalchemy import select

        from retrieval.store.schema import Item

        return np.asarray(self._scalars(select(Item.id).where(Item.modality == "text", Item.corpus == corpus)),
                          dtype=np.int64)

    def image_ids(self, flt: ImageFilter) -> np.ndarray:
        from sqlalchemy import and_, func, or_, select

        from retrieval.store.schema import Item

        cond = [Item.modality == "image"]
        if flt.under:
            exact = os.path.abspath(os.path.expanduser(flt.under)).rstrip(os.sep) or os.sep
            folder = exact.rstrip(os.sep) + os.sep
            cond.append(or_(func.substr(Item.path, 1, len(folder)) == folder, Item.path == exact))
        if flt.camera:
            camera = func.lower(func.coalesce(Item.camera_make, "") + " " + func.coalesce(Item.camera_model, ""))
            cond.append(camera.like(f"%{flt.camera.lower()}%"))
        for text, op in ((flt.after, "ge"), (flt.before, "lt")):
            if text is None:
                continue
            iso, ts = _bound(text)
            by_exif = Item.taken_at >= iso if op == "ge" else Item.taken_at < iso
            by_mtime = Item.mtime >= ts if op == "ge" else Item.mtime < ts
            cond.append(or_(by_exif, and_(Item.taken_at.is_(None), by_mtime)))
        return np.asarray(self._scalars(select(Item.id).where(and_(*cond))), dtype=np.int64)

    def image_files(self) -> dict[str, tuple[int, int | None, float | None]]:
        from sqlalchemy import select

        from retrieval.store.schema import Item

        rows = self._all(select(Item.path, Item.id, Item.bytes, Item.mtime).where(Item.modality == "image"))
        return {p: (i, b, m) for p, i, b, m in rows}

    def all_image_shas(self) -> set[str]:
        from sqlalchemy import select

        from retrieval.store.schema import Item

        return set(self._scalars(select(Item.sha256).where(Item.modality == "image")))

    def shas_in_use(self, shas: Iterable[str]) -> set[str]:
        from sqlalchemy import select

        from retrieval.store.schema import Item

        shas = list(set(shas))
        used: set[str] = set()
        for start in range(0, len(shas), 900):
            used.update(self._scalars(select(Item.sha256).where(Item.modality == "image",
                                                                Item.sha256.in_(shas[start:start + 900]))))
        return used

    def text_hashes(self, corpus: str) -> set[str]:
        from sqlalchemy import select

        from retrieval.store.schema import Item

        return set(self._scalars(select(Item.sha256).where(Item.modality == "text", Item.corpus == corpus)))

    def image_folders(self) -> list[str]:
        from pathlib import PurePosixPath

        from sqlalchemy import select

        from retrieval.store.schema import Item

        paths = self._scalars(select(Item.path).where(Item.modality == "image"))
        return sorted({str(PurePosixPath(p).parent) for p in paths if p is not None})


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module", params=BACKENDS)
def indexed(request) -> tuple[Path, str, type]:
    """(home, catalog URL for SQLAlchemy, reader class) of the shared index, on each backend."""
    if request.param == "sqlite":
        home = request.getfixturevalue("built_index")
        return home, f"sqlite:///{home / 'catalog.sqlite'}", SqliteReader
    from retrieval.store.location import read_pointer
    from retrieval.store.pg_reader import PgReader

    home = request.getfixturevalue("built_pg_index")
    return home, str(read_pointer(home)), PgReader


def _reader(indexed: tuple[Path, str, type]) -> CatalogReader:
    home, url, kind = indexed
    return kind(home / "catalog.sqlite" if kind is SqliteReader else url)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def built_any(indexed) -> Path:
    return indexed[0]


@pytest.fixture(scope="module")
def oracle(indexed):
    """The SQLAlchemy reference on the shared index."""
    orm = OrmOracle(indexed[1])
    yield orm
    orm.close()


@pytest.fixture(scope="module")
def trio(indexed):
    """(writable store, read-only store, bare reader) on one index; the writer only reads here."""
    built_index, _, kind = indexed
    orm = Store.open(built_index, writable=True)
    ro = Store.open(built_index)
    reader = _reader(indexed)
    # Every store reads through its backend's reader, writers too; the bare reader is a CatalogReader.
    assert isinstance(orm.reader, kind) and isinstance(ro.reader, kind)
    assert isinstance(reader, CatalogReader)
    yield orm, ro, reader
    reader.close()
    ro.close()
    orm.close()


def test_item_fields_are_itemviews() -> None:
    from dataclasses import fields

    assert tuple(f.name for f in fields(ItemView)) == ITEM_FIELDS


def test_meta_ids_and_rows_equal_the_store(trio, oracle) -> None:
    store, ro, reader = trio
    assert ro.meta == store.meta == oracle.meta() and ro.generations == store.generations
    with reader.snapshot():
        assert reader.meta() == store.meta and reader.has_catalog()
        assert reader.schema_version() == int(store.meta["schema_version"])
        for m in ("image", "text"):
            ids = reader.ids(m)
            assert len(ids) == store.count(m) > 0
            assert np.array_equal(np.sort(ids), np.sort(store.vectors(m)[0]))
            assert np.array_equal(np.sort(ids), np.sort(oracle.ids(m)))
    home = store.home
    files = [p for p in (home / "catalog.sqlite", home / "catalog.sqlite-wal") if p.is_file()]
    assert reader.catalog_bytes() == (sum(p.stat().st_size for p in files) if files else reader.catalog_bytes()) > 0
    every = np.concatenate([reader.ids("image"), reader.ids("text"), [-1, 10**9]])
    want = oracle.items(every)
    got = {i: ItemView(*row) for i, row in reader.items(every).items()}
    assert got == want == store.items(every) == ro.items(every) and len(got) == len(every) - 2
    assert reader.image_shas(every) == oracle.image_shas(every) == store.image_shas(every) == ro.image_shas(every)
    assert reader.corpora() == oracle.corpora() == store.corpora() == ro.corpora() == {"alpha": 30, "beta": 20}
    assert reader.skipped() == oracle.skipped() == store.skipped() == ro.skipped() and len(reader.skipped()) == 3
    assert reader.cameras() == oracle.cameras() == store.cameras() == ro.cameras()
    assert ro.cameras(limit=1) == store.cameras(limit=1) == oracle.cameras(limit=1)
    for corpus in ("alpha", "beta", "none"):
        assert np.array_equal(reader.text_ids(corpus), oracle.text_ids(corpus))
        assert np.array_equal(store.text_ids(corpus), oracle.text_ids(corpus))
        assert np.array_equal(ro.text_ids(corpus), oracle.text_ids(corpus))


def test_indexer_reads_and_folders_equal_the_oracle(trio, oracle, photos) -> None:
    """The reads that used to need SQLAlchemy (the indexer's) and the page's folder list."""
    store, ro, reader = trio
    files = oracle.image_files()
    assert len(files) == store.count("image") > 0
    assert reader.image_files() == files == store.image_files() == ro.image_files()
    shas = oracle.all_image_shas()
    assert len(shas) > 0 and reader.all_image_shas() == shas == store.all_image_shas() == ro.all_image_shas()
    some = sorted(shas)[::2] + [f"{i:064x}" for i in range(2000)]  # more than one IN (...) chunk
    want = oracle.shas_in_use(some)
    assert want == set(sorted(shas)[::2])
    assert reader.shas_in_use(some) == want == store.shas_in_use(some) == ro.shas_in_use(some)
    assert reader.shas_in_use([]) == set() == oracle.shas_in_use([])
    for corpus, n in (("alpha", 30), ("beta", 20), ("none", 0)):
        hashes = oracle.text_hashes(corpus)
        assert len(hashes) == n
        assert reader.text_hashes(corpus) == hashes == store.text_hashes(corpus) == ro.text_hashes(corpus)
    folders = oracle.image_folders()
    root = str(photos["root"])
    assert folders == [root, f"{root}/sub"]
    assert reader.image_folders() == folders == store.image_folders() == ro.image_folders()


@pytest.mark.parametrize("flt", [
    ImageFilter(under="SUB"), ImageFilter(under="ROOT"), ImageFilter(under="ROOT/img01.png"),
    ImageFilter(after="2021-06-15"), ImageFilter(before="2021-06-16T00:00:00"), ImageFilter(after="2000-01-01"),
    ImageFilter(after="NOW"), ImageFilter(camera="pixel"), ImageFilter(under="ROOT", after="2000-01-01", before="NOW"),
])
def test_filters_equal_the_store(trio, oracle, photos, flt: ImageFilter) -> None:
    from dataclasses import replace

    store, ro, reader = trio
    root = str(photos["root"])
    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 3600))
    sub = {"SUB": f"{root}/sub/", "ROOT": root, "ROOT/img01.png": str(photos["img01"]), "NOW": now}
    flt = replace(flt, **{k: sub.get(getattr(flt, k), getattr(flt, k)) for k in ("under", "after", "before")})
    want = oracle.image_ids(flt)
    assert np.array_equal(store.image_ids(flt), want)
    got = reader.image_ids(under=flt.under, camera=flt.camera, after=_bound(flt.after) if flt.after else None,
                           before=_bound(flt.before) if flt.before else None)
    assert np.array_equal(got, want) and np.array_equal(ro.image_ids(flt), want)


@pytest.mark.subprocess
def test_read_only_queries_never_import_sqlalchemy(built_any: Path, photos) -> None:
    """Why the readers exist: opening and every query-side read stay off SQLAlchemy, on both backends."""
    built_index = built_any
    probe = textwrap.dedent(f"""
        import sys
        from retrieval.store import ImageFilter, Store
        with Store.open({str(built_index)!r}) as s:
            ids = s.image_ids(ImageFilter(under={str(photos["root"])!r}, after="2000-01-01", camera="x"))
            every = s.vectors("image")[0].tolist() + s.vectors("text")[0].tolist()
            assert len(s.items(every)) == len(every) and s.image_shas(every)
            s.corpora(), s.cameras(), s.skipped(), s.text_ids("alpha"), s.ids_under("/"), s.size_on_disk()
            assert s.image_files() and s.image_folders() and s.text_hashes("alpha")
            assert s.shas_in_use(s.all_image_shas()) == s.all_image_shas()
        print(sorted(m for m in sys.modules if m.split(".")[0] == "sqlalchemy"))
    """)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


# ---- snapshots, rotation and the schema check on a small store ----------------------------------
FP = Fingerprint(model="ViT-S-32", pretrained="/m.pt", weights="sha256:abc", dim=8)


def _unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _add(store: Store, n: int, start: int) -> list[int]:
    recs = [ImageRecord(path=f"/p/{i}.jpg", sha256=f"{i:064x}", bytes=i, mtime=float(i), width=4, height=3)
            for i in range(start, start + n)]
    return store.add_images(recs, _unit(n, start))


def _bare_reader(home: Path, catalog: str | None) -> CatalogReader:
    from retrieval.store.location import CatalogLocation

    return CatalogLocation(home, catalog).reader()


def test_snapshot_keeps_one_commit(tmp_path: Path, any_catalog: str | None) -> None:
    catalog = any_catalog
    with Store.open(tmp_path, create=True, writable=True, catalog=catalog) as w:
        w.bind_model(FP)
        first = _add(w, 2, 0)
        reader = _bare_reader(tmp_path, catalog)
        with reader.snapshot():
            gen = reader.meta()["gen.image"]
            _add(w, 3, 10)  # commits while the snapshot is open: WAL / REPEATABLE READ keep the reader on it
            assert sorted(reader.ids("image").tolist()) == first and reader.meta()["gen.image"] == gen
        assert len(reader.ids("image")) == 5 and reader.meta()["gen.image"] != gen
        reader.hold()  # what a read-only Store does: every read until `release` sees this commit
        _add(w, 1, 20)
        assert len(reader.ids("image")) == 5 and reader.meta()["gen.image"] != w.meta["gen.image"]
        reader.release()
        assert len(reader.ids("image")) == 6 and reader.meta()["gen.image"] == w.meta["gen.image"]
        reader.close()


def test_load_retries_when_a_writer_rotates_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that commits twice while a reader opens deletes the file the reader's snapshot names."""
    with Store.open(tmp_path, create=True, writable=True) as w:
        w.bind_model(FP)
        _add(w, 2, 0)
        real_meta, calls = SqliteReader.meta, []

        def meta_then_rotate(self: SqliteReader) -> dict[str, str]:
            out = real_meta(self)
            if not calls:
                while (tmp_path / "vectors" / "image-1.faiss").exists():  # kept while a commit before named it
                    _add(w, 1, 10 * (len(calls) + 1))
                    calls.append("commit")
            calls.append(out["gen.image"])
            return out

        monkeypatch.setattr(SqliteReader, "meta", meta_then_rotate)
        with Store.open(tmp_path) as ro:
            commits = calls.count("commit")
            assert commits >= 2 and calls[commits:] == ["1", w.meta["gen.image"]]  # the first snapshot's file
            assert ro.count("image") == 2 + commits  # vanished; the retry saw the last commit
            assert len(ro.items(ro.vectors("image")[0])) == 2 + commits


def test_writers_read_through_the_reader(tmp_path: Path, any_catalog: str | None) -> None:
    """A writer's reads see its own commits, and no reader ever creates a catalog file."""
    catalog = any_catalog
    with pytest.raises(sqlite3.OperationalError):
        SqliteReader(tmp_path / "nothing.sqlite").meta()
    assert not (tmp_path / "nothing.sqlite").exists()
    with Store.open(tmp_path, create=True, writable=True, catalog=catalog) as w:
        assert type(w.reader).__name__ == ("PgReader" if catalog else "SqliteReader") and w.image_files() == {}
        w.bind_model(FP)
        ids = _add(w, 3, 0)
        w.record_skipped([("/p/bad.jpg", "unreadable")])
        assert w.image_files() == {f"/p/{i}.jpg": (ids[i], i, float(i)) for i in range(3)}
        assert w.image_folders() == ["/p"] and w.skipped() == [("/p/bad.jpg", "unreadable")]
        w.move_images([(ids[0], "/q/0.jpg", 7, 7.0)])
        assert w.image_files()["/q/0.jpg"] == (ids[0], 7, 7.0) and w.image_folders() == ["/p", "/q"]
        w.remove_images(ids[1:])
        assert w.items(ids).keys() == {ids[0]} and w.all_image_shas() == {f"{0:064x}"}


def test_read_only_schema_check(tmp_path: Path) -> None:
    with Store.open(tmp_path, create=True, writable=True) as w:
        w.bind_model(FP)
    db = sqlite3.connect(tmp_path / "catalog.sqlite")
    with db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(SchemaTooNew, match="99 > "):
        Store.open(tmp_path)
    with db:
        db.execute("DELETE FROM meta WHERE key = 'schema_version'")
    with pytest.raises(IndexMissing, match="holds no crossmodal catalog"):
        Store.open(tmp_path)
    with db:
        db.execute("DROP TABLE meta")
    db.close()
    with pytest.raises(IndexMissing, match="holds no crossmodal catalog"):
        Store.open(tmp_path)
    (tmp_path / "catalog.sqlite").write_bytes(b"not a database, just text" * 100)
    for p in tmp_path.glob("catalog.sqlite-*"):
        p.unlink()
    with pytest.raises(IndexMismatch, match="is unreadable"):
        Store.open(tmp_path)

"""The stdlib-sqlite3 catalog reader answers every read exactly as the SQLAlchemy Store does.

A read-only Store reads through the reader, a writable one through SQLAlchemy: the writer is the reference
each read-only answer (and each bare reader answer) is held equal to.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.encoder import Fingerprint
from retrieval.errors import IndexMismatch, IndexMissing, SchemaTooNew
from retrieval.store import ImageFilter, ImageRecord, ItemView, Store
from retrieval.store.reader import ITEM_FIELDS, CatalogReader
from tests.conftest import ROOT


def _bound(text: str) -> tuple[str, float]:
    from datetime import datetime

    return (text if "T" in text else text + "T00:00:00"), datetime.fromisoformat(text).timestamp()


@pytest.fixture(scope="module")
def trio(built_index):
    """(SQLAlchemy store, read-only store, bare reader) on one index; the writer only reads here."""
    orm = Store.open(built_index, writable=True)
    ro = Store.open(built_index)
    reader = CatalogReader(built_index / "catalog.sqlite")
    assert orm._reader is None and ro._reader is not None  # the two paths under test
    yield orm, ro, reader
    reader.close()
    ro.close()
    orm.close()


def test_item_fields_are_itemviews() -> None:
    from dataclasses import fields

    assert tuple(f.name for f in fields(ItemView)) == ITEM_FIELDS


def test_meta_ids_and_rows_equal_the_store(trio) -> None:
    store, ro, reader = trio
    assert ro.meta == store.meta and ro.generations == store.generations
    with reader.snapshot():
        assert reader.meta() == store.meta and reader.has_catalog()
        assert reader.schema_version() == int(store.meta["schema_version"])
        for m in ("image", "text"):
            ids = reader.ids(m)
            assert len(ids) == store.count(m) > 0
            assert np.array_equal(np.sort(ids), np.sort(store.vectors(m)[0]))
    every = np.concatenate([reader.ids("image"), reader.ids("text"), [-1, 10**9]])
    want = store.items(every)
    got = {i: ItemView(*row) for i, row in reader.items(every).items()}
    assert got == want == ro.items(every) and len(got) == len(every) - 2
    assert reader.image_shas(every) == store.image_shas(every) == ro.image_shas(every)
    assert reader.corpora() == store.corpora() == ro.corpora() == {"alpha": 30, "beta": 20}
    assert reader.skipped() == store.skipped() == ro.skipped() and len(reader.skipped()) == 3
    assert reader.cameras() == store.cameras() == ro.cameras()
    assert ro.cameras(limit=1) == store.cameras(limit=1)
    for corpus in ("alpha", "beta", "none"):
        assert np.array_equal(reader.text_ids(corpus), store.text_ids(corpus))
        assert np.array_equal(ro.text_ids(corpus), store.text_ids(corpus))


@pytest.mark.parametrize("flt", [
    ImageFilter(under="SUB"), ImageFilter(under="ROOT"), ImageFilter(under="ROOT/img01.png"),
    ImageFilter(after="2021-06-15"), ImageFilter(before="2021-06-16T00:00:00"), ImageFilter(after="2000-01-01"),
    ImageFilter(after="NOW"), ImageFilter(camera="pixel"), ImageFilter(under="ROOT", after="2000-01-01", before="NOW"),
])
def test_filters_equal_the_store(trio, photos, flt: ImageFilter) -> None:
    from dataclasses import replace

    store, ro, reader = trio
    root = str(photos["root"])
    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 3600))
    sub = {"SUB": f"{root}/sub/", "ROOT": root, "ROOT/img01.png": str(photos["img01"]), "NOW": now}
    flt = replace(flt, **{k: sub.get(getattr(flt, k), getattr(flt, k)) for k in ("under", "after", "before")})
    want = store.image_ids(flt)
    got = reader.image_ids(under=flt.under, camera=flt.camera, after=_bound(flt.after) if flt.after else None,
                           before=_bound(flt.before) if flt.before else None)
    assert np.array_equal(got, want) and np.array_equal(ro.image_ids(flt), want)


def test_read_only_queries_never_import_sqlalchemy(built_index: Path, photos) -> None:
    """Why the reader exists: opening and every query-side read stay off SQLAlchemy."""
    probe = textwrap.dedent(f"""
        import sys
        from retrieval.store import ImageFilter, Store
        with Store.open({str(built_index)!r}) as s:
            ids = s.image_ids(ImageFilter(under={str(photos["root"])!r}, after="2000-01-01", camera="x"))
            every = s.vectors("image")[0].tolist() + s.vectors("text")[0].tolist()
            assert len(s.items(every)) == len(every) and s.image_shas(every)
            s.corpora(), s.cameras(), s.skipped(), s.text_ids("alpha"), s.ids_under("/"), s.size_on_disk()
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


def test_snapshot_keeps_one_commit(tmp_path: Path) -> None:
    with Store.open(tmp_path, create=True, writable=True) as w:
        w.bind_model(FP)
        first = _add(w, 2, 0)
        reader = CatalogReader(tmp_path / "catalog.sqlite")
        with reader.snapshot():
            gen = reader.meta()["gen.image"]
            _add(w, 3, 10)  # commits while the snapshot is open: WAL keeps the reader on its commit
            assert sorted(reader.ids("image").tolist()) == first and reader.meta()["gen.image"] == gen
        assert len(reader.ids("image")) == 5 and reader.meta()["gen.image"] != gen
        reader.close()


def test_load_retries_when_a_writer_rotates_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that commits twice while a reader opens deletes the file the reader's snapshot names."""
    with Store.open(tmp_path, create=True, writable=True) as w:
        w.bind_model(FP)
        _add(w, 2, 0)
        real_meta, calls = CatalogReader.meta, []

        def meta_then_rotate(self: CatalogReader) -> dict[str, str]:
            out = real_meta(self)
            if not calls:
                _add(w, 1, 10)
                _add(w, 1, 20)  # the generation `out` names is now gone
            calls.append(out["gen.image"])
            return out

        monkeypatch.setattr(CatalogReader, "meta", meta_then_rotate)
        with Store.open(tmp_path) as ro:
            assert calls == ["1", "3"]  # the first snapshot's file vanished; the retry saw the new commit
            assert ro.count("image") == 4 and len(ro.items(ro.vectors("image")[0])) == 4


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

"""The store: one commit point, agreement checks, repair, lock, model binding, schema guard."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import text

from retrieval.errors import IndexLocked, IndexMismatch, IndexMissing, ModelMismatch, SchemaTooNew
from retrieval.model.spec import Fingerprint
from retrieval.store import ImageRecord, Store, TextRecord

FP = Fingerprint(model="ViT-S-32", pretrained="/m.pt", weights="sha256:abc", dim=8)


def _unit(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _records(n: int, start: int = 0) -> list[ImageRecord]:
    return [ImageRecord(path=f"/p/{i}.jpg", sha256=f"{i:064x}", bytes=i, mtime=float(i), width=4, height=3)
            for i in range(start, start + n)]


def _new(home) -> Store:
    s = Store.open(home, create=True, writable=True)
    s.bind_model(FP)
    return s


def test_commit_and_reopen(tmp_path):
    with _new(tmp_path) as s:
        ids = s.add_images(_records(5), _unit(5))
        s.add_texts([TextRecord("c", 1, "hello", "h1")], _unit(1, 1))
    with Store.open(tmp_path) as s:
        assert s.count("image") == 5 and s.count("text") == 1
        assert s.fingerprint == FP
        got_ids, vecs = s.vectors("image")
        order = np.argsort(got_ids)
        assert got_ids[order].tolist() == ids
        assert np.allclose(vecs[order], _unit(5))
        assert s.items([ids[2]])[ids[2]].path == "/p/2.jpg"
        assert s.corpora() == {"c": 1}


def test_ids_never_reused_and_replace(tmp_path):
    with _new(tmp_path) as s:
        ids = s.add_images(_records(3), _unit(3))
        new = s.add_images([ImageRecord("/p/1.jpg", "f" * 64, 9, 9.0, 4, 3)], _unit(1, 5), replace=[ids[1]])
        assert new[0] > max(ids)
        assert s.count("image") == 3
        assert sorted(s.image_files()) == ["/p/0.jpg", "/p/1.jpg", "/p/2.jpg"]
        assert s.image_files()["/p/1.jpg"] == (new[0], 9, 9.0)


def test_only_current_and_previous_generation_files_kept(tmp_path):
    """The segments the catalog names, and those the commit before named (readers may hold them): no more."""
    with _new(tmp_path) as s:
        before: list[str] = []
        for i in range(6):
            s.add_images(_records(1, i), _unit(1, i))
            named = [f"image-{g}.faiss" for g in json.loads(s.meta["segs.image"])]
            files = sorted(p.name for p in (tmp_path / "vectors").iterdir())
            assert files == sorted(set(named) | set(before))
            before = named
        # Six commits of one: segments merge like a binary counter (6 = 4 + 2), not one file rewritten each time.
        assert [seg.ntotal for seg in s.indexes["image"].segments] == [4, 2]


def test_segments_commit_their_own_size_and_deletions_rewrite_only_their_segment(tmp_path):
    x = _unit(40, 3)
    with _new(tmp_path) as s:
        ids = s.add_images(_records(32), x[:32])  # one segment of 32
        more = s.add_images(_records(8, 32), x[32:])  # 8 < 32 / 2: a segment of its own, the first untouched
        first = s.indexes["image"].segments[0].path
        assert [seg.ntotal for seg in s.indexes["image"].segments] == [32, 8]
        s.remove_images([more[0]])  # only the small segment is rewritten
        assert s.indexes["image"].segments[0].path == first
        assert [seg.ntotal for seg in s.indexes["image"].segments] == [32, 7]
        s.remove_images(more[1:])  # emptied: dropped
        assert [seg.ntotal for seg in s.indexes["image"].segments] == [32]
        s.remove_images([ids[5]])
        assert [seg.ntotal for seg in s.indexes["image"].segments] == [31]
    with Store.open(tmp_path) as s:
        got, vecs = s.vectors("image")
        assert got.tolist() == [i for i in ids if i != ids[5]] and np.allclose(vecs, np.delete(x[:32], 5, axis=0))
        assert s.vector("image", ids[7]).tolist() == x[7].tolist()


def test_a_schema_4_catalog_names_its_one_file_as_a_segment(tmp_path):
    from sqlalchemy import create_engine

    with _new(tmp_path) as s:
        s.add_images(_records(5), _unit(5))
        gen = s.generations["image"]
        sums = s.meta[f"sums.image.{gen}"]
    with create_engine(f"sqlite:///{tmp_path / 'catalog.sqlite'}").begin() as c:  # as schema 4 wrote it
        c.execute(text("DELETE FROM meta WHERE key LIKE 'segs.%' OR key LIKE 'sums.%'"))
        c.execute(text("INSERT INTO meta (key, value) VALUES ('sums.image', :v)"), {"v": sums})
        c.execute(text("UPDATE meta SET value = '4' WHERE key = 'schema_version'"))
    with Store.open(tmp_path) as s:  # a reader migrates (schema 5), and the file's checksums still apply
        assert s.count("image") == 5
        assert json.loads(s.meta["segs.image"]) == [gen] and s.meta[f"sums.image.{gen}"] == sums
        assert "sums.image" not in s.meta


def test_crash_before_catalog_commit_leaves_old_state(tmp_path, monkeypatch):
    with _new(tmp_path) as s:
        s.add_images(_records(2), _unit(2))
        import retrieval.store.writes as mod  # where the commit's meta rows are made

        def boom(*a, **k):
            raise OSError("disk full")

        monkeypatch.setattr(mod.Meta, "__init__", boom)
        with pytest.raises(OSError):
            s.add_images(_records(2, 10), _unit(2, 3))
        monkeypatch.undo()
        assert s.count("image") == 2  # in-memory state reloaded from the committed files
    with Store.open(tmp_path) as s:
        assert s.count("image") == 2


def test_mismatch_detected_and_repaired(tmp_path):
    with _new(tmp_path) as s:
        ids = s.add_images(_records(4), _unit(4))
        with s.engine.begin() as c:  # a row the vectors never got
            c.execute(text("INSERT INTO items (modality, path, added_at) VALUES ('image', '/ghost.jpg', '2024-01-01')"))
            c.execute(text(f"DELETE FROM items WHERE id = {ids[0]}"))  # a vector without a row
    with pytest.raises(IndexMismatch, match="1 rows without a vector, 1 vectors without a row.*repair"):
        Store.open(tmp_path)
    with Store.open(tmp_path, writable=True, check=False) as s:
        assert s.repair() == {"rows_dropped": 1, "vectors_dropped": 1}
    with Store.open(tmp_path) as s:
        assert s.count("image") == 3


def test_missing_vector_file_reported_and_repairable(tmp_path):
    with _new(tmp_path) as s:
        s.add_images(_records(2), _unit(2))
    for p in (tmp_path / "vectors").iterdir():
        p.unlink()
    with pytest.raises(IndexMismatch, match="missing"):
        Store.open(tmp_path)
    with Store.open(tmp_path, writable=True, check=False) as s:
        assert s.repair()["rows_dropped"] == 2
    with Store.open(tmp_path) as s:
        assert s.count("image") == 0


def test_second_writer_refused_and_lock_released(tmp_path):
    s = _new(tmp_path)
    with pytest.raises(IndexLocked, match="another crossmodal process"):
        Store.open(tmp_path, writable=True)
    with Store.open(tmp_path) as reader:  # readers never wait for the writer
        assert reader.count("image") == 0
    s.close()
    Store.open(tmp_path, writable=True).close()


def test_model_binding(tmp_path):
    with _new(tmp_path) as s:
        s.bind_model(FP)  # same model: fine
        with pytest.raises(ModelMismatch, match="cannot be mixed"):
            s.bind_model(Fingerprint("ViT-B-32", "laion2b_s34b_b79k", "laion2b_s34b_b79k", 512))


def test_missing_index_and_newer_schema(tmp_path):
    with pytest.raises(IndexMissing, match="crossmodal index"):
        Store.open(tmp_path / "nothing")
    with _new(tmp_path):
        pass
    from sqlalchemy import create_engine

    with create_engine(f"sqlite:///{tmp_path / 'catalog.sqlite'}").begin() as c:
        c.execute(text("UPDATE meta SET value = '99' WHERE key = 'schema_version'"))
    with pytest.raises(SchemaTooNew):
        Store.open(tmp_path)


def test_search_restrict_is_exact(tmp_path):
    with _new(tmp_path) as s:
        ids = np.asarray(s.add_images(_records(50), _unit(50)))
        vecs = _unit(50)
        q = _unit(1, 7)
        allowed = ids[::3]
        scores, got = s.search("image", q, 5, restrict=allowed)
        brute = vecs[::3] @ q[0]
        order = np.argsort(-brute)[:5]
        assert got[0].tolist() == allowed[order].tolist()
        assert np.allclose(scores[0], brute[order], atol=1e-6)

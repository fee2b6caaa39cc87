"""Re-runs: new, changed, moved/renamed, deleted files; empty roots; `remove`; thumbnails follow."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from indexer.pipeline import index_paths, remove_paths
from retrieval.media.thumbnails import thumb_path
from retrieval.store import Store
from tests.helpers import pattern


def _library(root, n=8):
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(n):
        pattern(100 + i, (80, 60)).save(root / ("a" if i % 2 else "b") / f"p{i}.jpg", quality=90)
    return root


def _state(store: Store) -> dict[str, tuple[int, np.ndarray]]:
    files = store.image_files()
    ids, vecs = store.vectors("image")
    by_id = dict(zip(ids.tolist(), vecs, strict=True))
    return {p: (v[0], by_id[v[0]]) for p, v in files.items()}


@pytest.fixture()
def indexed(tmp_path, encoder):
    lib = _library(tmp_path / "lib")
    store = Store.open(tmp_path / "home", create=True, writable=True)
    store.bind_model(encoder.fingerprint)
    r = index_paths(store, encoder, [str(lib)], batch_size=3, workers=0)
    assert r.added == 8
    yield lib, store
    store.close()


def test_unchanged_rerun_only_stats(indexed, encoder, monkeypatch):
    lib, store = indexed
    import indexer.decode as decode

    def no_decode(entries, *a, **k):
        assert not entries, "unchanged files must not be read again"
        return iter(())

    monkeypatch.setattr(decode, "decode_stream", no_decode)
    monkeypatch.setattr(decode, "decode_entry", lambda *a, **k: pytest.fail("unchanged files must not be read"))
    r = index_paths(store, encoder, [str(lib)], workers=0)
    assert (r.added, r.updated, r.moved, r.removed, r.unchanged) == (0, 0, 0, 0, 8)


def test_move_rename_delete_change(indexed, encoder):
    lib, store = indexed
    before = _state(store)
    os.rename(lib / "a" / "p1.jpg", lib / "a" / "renamed.jpg")  # rename
    shutil.move(str(lib / "b"), str(lib / "c"))  # a whole folder moves
    (lib / "a" / "p3.jpg").unlink()  # deleted
    pattern(999, (80, 60)).save(lib / "a" / "p5.jpg", quality=90)  # changed in place
    os.utime(lib / "a" / "p5.jpg", (1e9, 1e9))
    pattern(1000, (80, 60)).save(lib / "a" / "new.jpg")  # brand new
    r = index_paths(store, encoder, [str(lib)], workers=0)
    assert (r.added, r.updated, r.moved, r.removed, r.unchanged) == (1, 1, 5, 1, 1)
    after = _state(store)
    assert store.count("image") == 8
    # moved files keep their id and vector
    assert after[str(lib / "a" / "renamed.jpg")][0] == before[str(lib / "a" / "p1.jpg")][0]
    for i in (0, 2, 4, 6):
        old, new = before[str(lib / "b" / f"p{i}.jpg")], after[str(lib / "c" / f"p{i}.jpg")]
        assert old[0] == new[0] and np.array_equal(old[1], new[1])
    assert str(lib / "a" / "p3.jpg") not in after
    changed_old, changed_new = before[str(lib / "a" / "p5.jpg")], after[str(lib / "a" / "p5.jpg")]
    assert changed_new[0] != changed_old[0] and not np.allclose(changed_new[1], changed_old[1])
    with Store.open(store.home) as fresh:  # agreement holds on disk too
        assert fresh.count("image") == 8


def test_thumbnails_written_and_pruned(indexed, encoder):
    lib, store = indexed
    victim = lib / "a" / "p7.jpg"
    sha = store.image_shas([store.image_files()[str(victim)][0]])
    sha = next(iter(sha.values()))
    thumb = thumb_path(store.home, sha)
    assert thumb.is_file() and thumb.stat().st_size < 20_000
    from PIL import Image

    with Image.open(thumb) as t:
        assert min(t.size) == 60  # never upscaled beyond the source
    victim.unlink()
    index_paths(store, encoder, [str(lib)], workers=0)
    assert not thumb.exists()


def test_empty_root_keeps_images(indexed, encoder, tmp_path):
    lib, store = indexed
    shutil.move(str(lib / "a"), str(tmp_path / "elsewhere"))
    (lib / "a").mkdir()  # like an unmounted drive's empty mount point
    r = index_paths(store, encoder, [str(lib / "a")], workers=0)
    assert r.removed == 0 and r.kept == [(str(lib / "a"), 4)]
    assert store.count("image") == 8


def test_remove_folder(indexed):
    lib, store = indexed
    assert remove_paths(store, [str(lib / "a")]) == 4
    assert all(not p.startswith(str(lib / "a") + os.sep) for p in store.image_files())
    assert remove_paths(store, [str(lib / "b" / "p0.jpg")]) == 1
    assert remove_paths(store, [str(lib / "nothing-here")]) == 0
    assert store.count("image") == 3
    # a prefix that is not a folder boundary is not "under"
    assert remove_paths(store, [str(lib / "b" / "p")]) == 0


def test_token_cache_compacted_when_a_quarter_is_dead(indexed, encoder):
    from indexer.pipeline import compact_tokens
    from retrieval.rerank.token_cache import TokenCache

    lib, store = indexed
    cache = TokenCache.open(store.home, store.fingerprint, "image")
    if len(cache) == 0:
        pytest.skip("this model keeps no rerank tokens")
    assert len(cache) == 8
    remove_paths(store, [str(lib / "a" / "p1.jpg")])  # 1 dead of 8: below the threshold, kept
    assert len(TokenCache.open(store.home, store.fingerprint, "image")) == 8
    assert compact_tokens(store, min_dead=1) == 0  # 1 of 8 is under a quarter
    remove_paths(store, [str(lib / "a")])  # 4 dead of 8, but under the 64-entry floor: kept
    assert len(TokenCache.open(store.home, store.fingerprint, "image")) == 8
    assert compact_tokens(store, min_dead=1) == 4  # a quarter or more is dead: rewritten
    cache = TokenCache.open(store.home, store.fingerprint, "image")
    assert len(cache) == 4 and all(sha in cache for sha in store.all_image_shas())

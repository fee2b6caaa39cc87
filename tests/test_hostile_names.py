"""File names that are not valid UTF-8 (Latin-1 from old cameras, Shift-JIS from zip archives and Windows
shares) are indexed, found, moved, removed, shown with U+FFFD and opened again by their exact bytes.

The catalog's form of a path is checked against literal strings here (`\\xHH` per undecodable byte, a real
backslash doubled), an oracle independent of retrieval/store/paths.py.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer.pipeline import index_paths, remove_paths
from retrieval.store import ImageFilter, Store
from retrieval.store.records import SCHEMA_VERSION
from tests.helpers import TEST_MODEL, catalog_url, pattern, run_cli

LATIN = b"caf\xe9.jpg"  # Latin-1 e-acute
SJIS = b"\x8e\xca\x90^.jpg"  # "shashin" (photo) in Shift-JIS
FOLDER = b"f\xeate"  # Latin-1 folder name
INSIDE = b"inside.jpg"
LOOKALIKE = b"caf\\xe9.jpg"  # valid UTF-8: a real backslash, then "xe9"
PLAIN = "été.jpg".encode()  # valid UTF-8, not ASCII
SEEDS = {LATIN: 41, SJIS: 42, FOLDER + b"/" + INSIDE: 43, LOOKALIKE: 44, PLAIN: 45}
# what the catalog holds for each (relative to the library, whose own path is plain ASCII)
KEYS = {LATIN: "caf\\xe9.jpg", SJIS: "\\x8eʐ^.jpg", FOLDER + b"/" + INSIDE: "f\\xeate/inside.jpg",
        LOOKALIKE: "caf\\\\xe9.jpg", PLAIN: "été.jpg"}


def hostile_library(root: Path) -> dict[bytes, bytes]:
    """The five pictures; returns relative name bytes -> absolute name bytes."""
    base = os.fsencode(root)
    os.makedirs(base + b"/" + FOLDER)
    out = {}
    for rel, seed in SEEDS.items():
        full = base + b"/" + rel
        with open(full, "wb") as f:
            pattern(seed, (64, 48)).save(f, "JPEG")
        out[rel] = full
    return out


def key(root: Path, rel: bytes) -> str:
    assert "\\" not in str(root) and str(root).isascii()
    return f"{root}/{KEYS[rel]}"


def shown(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _index(home: Path, lib: Path, encoder, catalog: str | None = None, **kw):  # noqa: ANN001, ANN202
    with Store.open(home, create=True, writable=True, catalog=catalog) as store:
        store.bind_model(encoder.fingerprint)
        return index_paths(store, encoder, [str(lib)], workers=kw.pop("workers", 0), **kw)


def test_catalog_paths_are_reversible_and_never_collide():
    from retrieval.store.paths import display_path, from_catalog, is_exact, path_json, to_catalog

    names = [b"/a/" + rel for rel in KEYS] + [b"/a/\\", b"/a/\\\\x41", b"/\xff\\\xfe/x", b"/\xc3", b"/ok"]
    texts = [to_catalog(os.fsdecode(n)) for n in names]
    assert len(set(texts)) == len(names)  # one catalog path per name (UNIQUE means one row per file)
    for raw, text in zip(names, texts, strict=True):
        text.encode("utf-8")  # valid text: SQLite and PostgreSQL both accept it
        assert os.fsencode(from_catalog(text)) == raw
        assert display_path(text) == shown(raw) and is_exact(text) == (shown(raw) == os.fsdecode(raw))
        fields = path_json(text)
        assert fields["path"] == shown(raw)
        assert base64.b64decode(fields.get("path_bytes", "")) == (b"" if is_exact(text) else raw)
    for rel, want in KEYS.items():
        assert to_catalog(os.fsdecode(b"/a/" + rel)) == "/a/" + want
    # a folder's catalog path + "/" prefixes those of the files under it (the --under filter's SQL)
    folder = to_catalog(os.fsdecode(b"/a/" + FOLDER))
    assert to_catalog(os.fsdecode(b"/a/" + FOLDER + b"/" + INSIDE)).startswith(folder + "/")


def test_library_indexes_searches_moves_and_removes_them(tmp_path, encoder, any_catalog):
    """On both backends: the escaped names are plain valid text, which PostgreSQL's text accepts too."""
    from sqlalchemy import create_engine, text

    from retrieval.query.search import Searcher

    lib = tmp_path / "lib"
    files = hostile_library(lib)
    home = tmp_path / "home"
    r = _index(home, lib, encoder, any_catalog, workers=1)  # names cross a process boundary too
    want = {key(lib, rel) for rel in KEYS}
    assert (r.added, r.skipped) == (5, [])
    with Store.open(home) as store:
        known = store.image_files()
        assert set(known) == want
        views = store.items(v[0] for v in known.values())
        ids = {v.path: v.id for v in views.values()}
        searcher = Searcher(store, encoder)
        hits = searcher.search_images(searcher.query_vector(text="a photo"), 10)
        assert {h.item.path for h in hits} == want
        under = store.image_ids(ImageFilter(under=f"{lib}/f\\xeate")).tolist()
        assert under == [ids[key(lib, FOLDER + b"/" + INSIDE)]]
        vec = store.vector("image", ids[key(lib, LATIN)])
    engine = create_engine(catalog_url(home))  # what any other client reads: plain text
    with engine.begin() as c:
        assert {p for (p,) in c.execute(text("SELECT path FROM items"))} == want
    engine.dispose()
    # an unchanged re-run only stats (the diff matches every name)
    again = _index(home, lib, encoder)
    assert (again.added, again.updated, again.removed, again.unchanged) == (0, 0, 0, 5)
    # a rename from one non-UTF-8 name to another is a move: same id, same vector
    os.rename(files[LATIN], os.fsencode(lib) + b"/caf\xe8-moved.jpg")
    moved = _index(home, lib, encoder)
    assert (moved.moved, moved.added, moved.removed) == (1, 0, 0)
    with Store.open(home, writable=True) as store:
        new_key = f"{lib}/caf\\xe8-moved.jpg"
        assert store.image_files()[new_key][0] == ids[key(lib, LATIN)]
        np.testing.assert_array_equal(store.vector("image", ids[key(lib, LATIN)]), vec)
        # remove a folder given as os.fsdecode gives its name
        assert remove_paths(store, [os.fsdecode(os.fsencode(lib) + b"/" + FOLDER)]) == 1
        assert key(lib, FOLDER + b"/" + INSIDE) not in store.image_files() and len(store.image_files()) == 4
    # with the folder gone from disk too, a re-run finds the rest unchanged
    shutil.rmtree(os.fsencode(lib) + b"/" + FOLDER)
    assert _index(home, lib, encoder).unchanged == 4


def test_reranker_and_page_open_the_exact_original(tmp_path, encoder):
    from retrieval.query.search import QueryVector, Searcher
    from retrieval.rerank.reranker import Reranker
    from retrieval.rerank.token_cache import TokenCache
    from webui import services

    lib = tmp_path / "lib"
    hostile_library(lib)
    home = tmp_path / "home"
    _index(home, lib, encoder)
    shutil.rmtree(home / "tokens")
    shutil.rmtree(home / "thumbs")  # the reranker's fallback must reopen each original
    with Store.open(home) as store:
        searcher = Searcher(store, encoder)
        rr = Reranker.open(searcher)
        q = QueryVector(searcher.query_vector(text="red"), "red")
        hits = rr.search_images(q, 5, rerank_k=5)
        assert (rr.stats.recomputed, rr.stats.unavailable) == (5, 0)
        assert len(TokenCache.open(home, encoder.fingerprint, "image")) == 5
        cells = services.cells(hits, home)
        assert sorted(c.name for c in cells) == sorted(shown(rel.rpartition(b"/")[2]) for rel in KEYS)
        assert not any(c.missing for c in cells)
        by_path = {h.item.path: h.id for h in hits}
        d = services.detail(searcher, by_path[key(lib, FOLDER + b"/" + INSIDE)])
        assert (d.name, d.facts["folder"], d.missing) == ("inside.jpg", shown(os.fsencode(lib) + b"/" + FOLDER), False)
        d = services.detail(searcher, by_path[key(lib, SJIS)])
        assert d.name == shown(SJIS) and "\ufffd" in d.name and not d.missing
        assert "\\" in services.detail(searcher, by_path[key(lib, LOOKALIKE)]).name


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_json_and_tables_show_replacement_characters(tmp_path, checkpoint):
    lib = tmp_path / "lib"
    files = hostile_library(lib)
    home = tmp_path / "home"
    env = {"CROSSMODAL_BACKEND": "torch"}  # the path handling is the same on ONNX; no export to wait for

    def ok(*args: str) -> str:
        r = run_cli(*args, home=home, env=env)  # text=True: stdout must decode as UTF-8
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        return r.stdout

    report = json.loads(ok("index", str(lib), "--model", TEST_MODEL, "--pretrained", str(checkpoint), "--json"))
    assert (report["added"], report["skipped"]) == (5, [])
    hits = json.loads(ok("search", "a photo", "-k", "10", "--json"))
    got = {h["path"]: h for h in hits}
    assert set(got) == {shown(raw) for raw in files.values()}
    for raw in files.values():
        h = got[shown(raw)]
        exact = shown(raw) == os.fsdecode(raw)
        assert ("path_bytes" in h) == (not exact)
        assert exact or base64.b64decode(h["path_bytes"]) == raw
    assert got[shown(files[LATIN])]["path"].endswith("caf\ufffd.jpg")
    assert got[shown(files[LOOKALIKE])]["path"].endswith("caf\\xe9.jpg")
    folder = os.fsdecode(os.fsencode(lib) + b"/" + FOLDER)  # a non-UTF-8 argument, as a shell passes it
    under = json.loads(ok("search", "a photo", "--under", folder, "--json"))
    assert [h["path"] for h in under] == [shown(files[FOLDER + b"/" + INSIDE])]
    env["COLUMNS"] = "400"  # one table row per line, whatever the path length
    table = ok("search", "a photo", "-k", "10")
    assert "caf\ufffd.jpg" in table and "inside.jpg" in table
    assert json.loads(ok("remove", folder, "--json")) == {"removed": 1}
    assert len(json.loads(ok("search", "a photo", "-k", "10", "--json"))) == 4
    assert json.loads(ok("skipped", "--json")) == []


@pytest.mark.parametrize("readonly_first", [True, False])
def test_schema_2_catalog_is_migrated(tmp_path, encoder, readonly_first, any_catalog):
    """A schema-2 catalog stored backslashes as they are and skipped non-UTF-8 names with a lossy path (the
    migration's SQL is portable: it runs on PostgreSQL too)."""
    from sqlalchemy import create_engine, text

    lib = tmp_path / "lib"
    lib.mkdir()
    for i, name in enumerate(("back\\slash.jpg", "plain.jpg")):
        pattern(60 + i, (64, 48)).save(lib / name)
    home = tmp_path / "home"
    _index(home, lib, encoder, any_catalog)
    with Store.open(home) as store:
        before = {p: v[0] for p, v in store.image_files().items()}
    assert set(before) == {f"{lib}/back\\\\slash.jpg", f"{lib}/plain.jpg"}
    lossy = f"{lib}/caf\ufffd.jpg"
    engine = create_engine(catalog_url(home))
    with engine.begin() as c:  # schema 2's form of the same catalog
        c.execute(text("UPDATE items SET path = replace(path, '\\\\', '\\')"))
        c.execute(text("INSERT INTO skipped (path, reason, at) VALUES (:p, 'file name is not valid UTF-8', "
                       "'2024-01-01')"), {"p": lossy})
        c.execute(text("UPDATE meta SET value = '2' WHERE key = 'schema_version'"))
        assert {p for (p,) in c.execute(text("SELECT path FROM items"))} == {f"{lib}/back\\slash.jpg",
                                                                             f"{lib}/plain.jpg"}
    engine.dispose()
    with Store.open(home, writable=not readonly_first) as store:
        assert {p: v[0] for p, v in store.image_files().items()} == before
        assert store.skipped() == []
    engine = create_engine(catalog_url(home))
    with engine.begin() as c:
        assert c.execute(text("SELECT value FROM meta WHERE key='schema_version'")).scalar() == str(SCHEMA_VERSION)
    engine.dispose()
    # the next run keeps both images (nothing re-embedded) and now indexes the non-UTF-8 name
    with open(os.fsencode(lib) + b"/" + LATIN, "wb") as f:
        pattern(62, (64, 48)).save(f, "JPEG")
    r = _index(home, lib, encoder)
    assert (r.unchanged, r.added, r.removed, r.updated, r.skipped) == (2, 1, 0, 0, [])

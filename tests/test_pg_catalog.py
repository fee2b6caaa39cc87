"""A catalog in PostgreSQL: where the home finds it (pointer file, CROSSMODAL_CATALOG), what is refused in one
line (another catalog for an existing home, a bad URL, no server, no psycopg, a second writer anywhere), and
the commit protocol with reader processes running while one writer indexes.

Every test here runs against the throwaway cluster of `pg_server` (tests/pg_cluster.py); the concurrency test
runs on SQLite too, as the reference.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import UserError
from retrieval.model.spec import Fingerprint
from retrieval.store import ImageRecord, Store, TextRecord
from retrieval.store.catalog_url import mask, parse
from retrieval.store.location import ENV, POINTER
from retrieval.store.records import SCHEMA_VERSION
from tests.helpers import ROOT, TEST_MODEL, pattern, run_cli, start_cli

pytestmark = pytest.mark.postgres
FP = Fingerprint(model="ViT-S-32", pretrained="/m.pt", weights="sha256:abc", dim=8)


def _unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _small(home: Path, catalog: str | None, n: int = 3) -> list[int]:
    with Store.open(home, create=True, writable=True, catalog=catalog) as w:
        w.bind_model(FP)
        recs = [ImageRecord(path=f"/p/{i}.jpg", sha256=f"{i:064x}", bytes=i, mtime=float(i), width=4, height=3)
                for i in range(n)]
        return w.add_images(recs, _unit(n, 0))


def _one_line(r: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert r.returncode == code, f"exit {r.returncode}: {r.stdout} {r.stderr}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_urls_are_checked_and_passwords_masked() -> None:
    assert parse("postgresql://me@db/photos") == parse("postgres://me@db/photos") == "postgresql+psycopg://me@db/photos"
    assert parse("sqlite") is None
    assert mask("postgresql+psycopg://me:s3cret@db:5433/photos") == "postgresql+psycopg://me:***@db:5433/photos"
    assert mask("postgresql+psycopg://me@db/photos?password=s3cret&sslmode=require") == \
        "postgresql+psycopg://me@db/photos?password=***&sslmode=require"
    for bad, why in (("mysql://me@db/photos", "not a catalog URL"), ("postgresql://me:pw@db:port/x", "port"),
                     ("postgresql://me:pw@db", "names no database")):
        with pytest.raises(UserError, match=why) as e:
            parse(bad)
        assert "pw" not in str(e.value)


def test_pointer_file_and_env_var_are_honoured(tmp_path: Path, new_catalog, pg_server,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    url = new_catalog()
    home = tmp_path / "home"
    ids = _small(home, url)
    assert (home / POINTER).read_text().strip() == url and not (home / "catalog.sqlite").exists()
    with Store.open(home) as s:  # no flag: the pointer names the catalog
        assert type(s.reader).__name__ == "PgReader" and s.count("image") == 3 and sorted(s.items(ids)) == ids
        assert s.catalog.describe() == url
    with Store.open(home, writable=True, catalog=url.replace("postgresql+psycopg", "postgresql")) as s:
        assert s.count("image") == 3  # --catalog naming the home's own catalog (in any spelling) is fine
    # the env var overrides the pointer: here the same database by another name (as another machine may)
    other_name = url.replace("127.0.0.1", "localhost")
    monkeypatch.setenv(ENV, other_name)
    with Store.open(home) as s:
        assert s.catalog.url == other_name and s.count("image") == 3
    monkeypatch.setenv(ENV, "sqlite")  # an override cannot switch a home's backend
    with pytest.raises(UserError, match="keeps its catalog in postgresql"):
        Store.open(home)
    monkeypatch.setenv(ENV, f"postgresql+psycopg://postgres@127.0.0.1:{pg_server.port}/no_such_db")
    with pytest.raises(UserError, match='cannot open the catalog .*"no_such_db" does not exist'):
        Store.open(home)
    monkeypatch.delenv(ENV)
    # on a home without a pointer the env var works like --catalog, and the first writer records it
    fresh = tmp_path / "fresh"
    monkeypatch.setenv(ENV, new_catalog())
    _small(fresh, None)
    monkeypatch.delenv(ENV)
    assert (fresh / POINTER).is_file() and not (fresh / "catalog.sqlite").exists()
    with Store.open(fresh) as s:
        assert s.count("image") == 3


def test_another_catalog_for_an_existing_home_is_refused(tmp_path: Path, new_catalog, photos,
                                                         checkpoint) -> None:
    lite, pg = tmp_path / "lite", tmp_path / "pg"
    _small(lite, None)
    url = new_catalog()
    _small(pg, url)
    before = (lite / "catalog.sqlite").read_bytes()
    line = _one_line(run_cli("index", str(photos["img01"]), "--catalog", new_catalog(), home=lite))
    assert "keeps its catalog in SQLite" in line and "cannot move" in line
    assert (lite / "catalog.sqlite").read_bytes() == before and not (lite / POINTER).exists()
    line = _one_line(run_cli("index", str(photos["img01"]), "--catalog", "sqlite", home=pg))
    assert f"keeps its catalog in {url}" in line and not (pg / "catalog.sqlite").exists()
    line = _one_line(run_cli("index", str(photos["img01"]), "--catalog", url.replace("/t", "/x"), home=pg))
    assert "cannot move" in line and (pg / POINTER).read_text().strip() == url
    with Store.open(pg) as s:
        assert s.count("image") == 3  # nothing lost
    # a second home must not adopt a database that holds another index's catalog
    line = _one_line(run_cli("index", str(photos["img01"]), "--catalog", url, "--model", TEST_MODEL,
                             "--pretrained", str(checkpoint), home=tmp_path / "third"))
    assert "already holds the catalog of another index" in line
    assert not (tmp_path / "third" / POINTER).exists()


def test_bad_url_no_server_no_psycopg_are_one_line(tmp_path: Path, pg_server, photos) -> None:
    from tests.helpers import free_port

    home = tmp_path / "h"
    line = _one_line(run_cli("index", str(photos["img01"]), "--catalog", "mysql://me:pw@db/x", home=home))
    assert "not a catalog URL" in line and "pw" not in line
    dead = f"postgresql+psycopg://me:s3cret@127.0.0.1:{free_port()}/photos"
    line = _one_line(run_cli("index", str(photos["img01"]), "--catalog", dead, home=home))
    assert "cannot open the catalog" in line and "me:***@" in line and "s3cret" not in line
    assert not (home / POINTER).exists()
    # psycopg missing (a module that fails to import shadows it)
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "psycopg.py").write_text("raise ImportError('no psycopg here')\n")
    line = _one_line(run_cli("index", str(photos["img01"]), "--catalog", pg_server.url("x"), home=home,
                             env={"PYTHONPATH": f"{shadow}:{ROOT}"}))
    assert "needs psycopg" in line and "crossmodal[cluster]" in line


def test_a_reader_upgrading_the_schema_waits_for_no_writer(tmp_path: Path, new_catalog) -> None:
    """A read-only open migrates an older catalog; on PostgreSQL only while no writer (anywhere) holds the lock."""
    from sqlalchemy import create_engine, text

    from retrieval.errors import IndexLocked
    from retrieval.store.pg_lock import advisory_lock

    url = new_catalog()
    home = tmp_path / "h"
    _small(home, url)
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text("UPDATE meta SET value = '2' WHERE key = 'schema_version'"))
    release = advisory_lock(url)  # a writer on another machine
    try:
        with pytest.raises(IndexLocked, match="needs an upgrade, but a writer is running"):
            Store.open(home)
    finally:
        release()
    with Store.open(home) as s:
        assert s.count("image") == 3
    with engine.begin() as c:
        assert c.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == str(SCHEMA_VERSION)
    engine.dispose()


def test_info_shows_the_catalog_with_the_password_masked(tmp_path: Path, new_catalog) -> None:
    url = new_catalog().replace("postgres@", "postgres:s3cret@")  # trust auth: any password is accepted
    home = tmp_path / "h"
    _small(home, url)
    with Store.open(home) as s:  # the size counts the catalog's tables in PostgreSQL (a few pages each)
        vectors = sum(p.stat().st_size for p in (home / "vectors").glob("*.faiss"))
        assert s.size_on_disk() - vectors >= s.reader.catalog_bytes() >= 3 * 8192
    r = run_cli("info", "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["catalog"] == url.replace(":s3cret@", ":***@")
    table = run_cli("info", home=home).stdout
    assert "postgres:***@" in table and "s3cret" not in table


def test_nul_in_text_and_escaped_names_are_stored(tmp_path: Path, new_catalog) -> None:
    """PostgreSQL's text holds no NUL (SQLite's does): a caption with one is stored with U+FFFD there."""
    import os

    from retrieval.store.paths import from_catalog, to_catalog

    home = tmp_path / "h"
    name = to_catalog(os.fsdecode(b"/lib/caf\xe9\\x.jpg"))
    with Store.open(home, create=True, writable=True, catalog=new_catalog()) as w:
        w.bind_model(FP)
        [img] = w.add_images([ImageRecord(path=name, sha256="a" * 64, bytes=2**40, mtime=1.5, width=4,
                                          height=3)], _unit(1, 1))
        [cap] = w.add_texts([TextRecord(corpus="c", row=1, text="a\x00b", sha256="b" * 64)], _unit(1, 2))
    with Store.open(home) as s:
        views = s.items([img, cap])
        assert views[img].path == name and os.fsencode(from_catalog(name)) == b"/lib/caf\xe9\\x.jpg"
        assert views[img].bytes == 2**40  # 64-bit on PostgreSQL too
        assert views[cap].text == "a\ufffdb"


# ---- several processes: one writer indexing, readers querying, a second writer refused ----------------
READER = textwrap.dedent("""
    import json, os, sys, time
    from retrieval.store import Store
    home, stop, until = sys.argv[1], sys.argv[2], time.time() + 150
    seen = []
    while not os.path.exists(stop) and time.time() < until:
        try:
            s = Store.open(home)  # checks that rows and vectors agree
        except Exception as e:  # noqa: BLE001 - an index not created yet
            if "no index" in str(e) or "holds no crossmodal catalog" in str(e):
                time.sleep(0.05)
                continue
            raise
        with s:
            for _ in range(3):
                ids, _vecs = s.vectors("image")
                rows = s.items(ids)
                assert sorted(rows) == sorted(ids.tolist()), "a vector without its row"
                seen.append(len(ids))
                time.sleep(0.02)
                s.refresh()
    print(json.dumps(seen))
""")


def _library(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        pattern(700 + i, (96, 72)).save(root / f"c{i:03d}.png")
    return root


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_readers_while_one_writer_indexes(tmp_path: Path, checkpoint: Path, backend: str, request) -> None:
    url = request.getfixturevalue("new_catalog")() if backend == "postgres" else None
    lib = _library(tmp_path / "lib", 12)
    home = tmp_path / "home"
    writer = start_cli("index", str(lib), "--model", TEST_MODEL, "--pretrained", str(checkpoint), "--batch-size",
                       "2", "--commit-every", "2", "--workers", "0", "--quiet", *(["--catalog", url] if url else []),
                       home=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stop = tmp_path / "stop"
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(home), str(stop)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        deadline = time.time() + 120
        while time.time() < deadline and writer.poll() is None and not (home / "vectors").is_dir():
            time.sleep(0.05)
        while time.time() < deadline and writer.poll() is None and not list((home / "vectors").glob("image-*")):
            time.sleep(0.05)
        assert writer.poll() is None, "the writer finished too early for the test"
        second = run_cli("index", str(lib), home=home)  # the same home: refused
        assert "is writing" in _one_line(second)
        if url:  # a writer elsewhere (another home on the same catalog, as on another machine): the advisory lock
            elsewhere = run_cli("index", str(lib), home=tmp_path / "elsewhere", env={ENV: url})
            line = _one_line(elsewhere)
            assert f"crossmodal writer pid {writer.pid}" in line and "is writing to the catalog" in line
        q = run_cli("search", "anything", "-k", "3", "--json", home=home)  # a one-shot query does not wait
        assert q.returncode == 0, q.stderr
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
    finally:
        stop.touch()
        if writer.poll() is None:
            writer.kill()
    counts = []
    for r in readers:
        out, err = r.communicate(timeout=120)
        assert r.returncode == 0, err[-2000:]
        counts.append(json.loads(out))
    assert all(c for c in counts), "every reader read while the writer indexed"
    assert any(0 < n < 12 for c in counts for n in c), "some read saw a commit in the middle of the run"
    with Store.open(home) as s:
        assert s.count("image") == 12


def test_page_signature_follows_a_postgres_catalog(tmp_path: Path, new_catalog) -> None:
    """The page reloads its index when a writer commits: its signature is read from the PostgreSQL catalog."""
    from webui import services

    home = tmp_path / "h"
    assert services.index_signature(home) is None  # no index: nothing is created by looking
    _small(home, new_catalog())
    before = services.index_signature(home)
    assert before and not before.startswith("unreadable")
    with Store.open(home, writable=True) as w:
        w.add_images([ImageRecord(path="/p/new.jpg", sha256="f" * 64, bytes=1, mtime=1.0, width=4, height=3)],
                     _unit(1, 9))
    assert services.index_signature(home) not in (before, None)


# ---- paths longer than a B-tree entry (~2,700 bytes): uniqueness on a hash index ------------------------------
def _noise(n: int, seed: int) -> str:
    """Letters that do not compress: PostgreSQL compresses a long index entry, so "ddd..." would fit anyway."""
    return "".join(np.random.default_rng(seed).choice(list("abcdefghijklmnopqrstuvwxyz0123456789"), n))


def _deep_folder(root: Path, total: int) -> Path:
    """A folder whose absolute path is at least `total` bytes (names of 200 bytes; Linux allows 255 each)."""
    folder = root
    while len(str(folder).encode()) < total:
        folder = folder / _noise(200, len(folder.parts))
    folder.mkdir(parents=True)
    return folder


@pytest.mark.slow
@pytest.mark.subprocess
def test_paths_longer_than_a_btree_entry_index_and_are_found(tmp_path: Path, new_catalog, checkpoint) -> None:
    """A photo and a bad file whose paths are > 3,000 bytes index through the CLI on PostgreSQL as on SQLite
    (the unique B-tree on the path refused them), and the photo is found by search and --under."""
    deep = _deep_folder(tmp_path / "lib", 3200)
    pattern(5, (64, 48)).save(deep / "long.png")
    (deep / "broken.jpg").write_bytes(b"not a jpeg")
    photo = str(deep / "long.png")
    assert len(photo.encode()) > 3000
    home = tmp_path / "home"
    r = run_cli("index", str(tmp_path / "lib"), "--catalog", new_catalog(), "--model", TEST_MODEL, "--pretrained",
                str(checkpoint), "--workers", "0", "--json", home=home)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["added"] == 1 and [s["path"] for s in report["skipped"]] == [str(deep / "broken.jpg")]
    hits = json.loads(run_cli("search", "a photo", "-k", "5", "--json", home=home).stdout)
    assert [h["path"] for h in hits] == [photo]
    under = json.loads(run_cli("search", "a photo", "--under", str(deep), "--json", home=home).stdout)
    assert [h["path"] for h in under] == [photo]
    again = run_cli("index", str(tmp_path / "lib"), "--json", home=home)  # unchanged: nothing added, skip kept
    assert again.returncode == 0 and json.loads(again.stdout)["added"] == 0, again.stderr
    with Store.open(home) as s:
        assert list(s.image_files()) == [photo] and [p for p, _ in s.skipped()] == [str(deep / "broken.jpg")]


def test_schema_3_postgres_catalog_moves_path_uniqueness_to_hash_indexes(tmp_path: Path, new_catalog) -> None:
    """A schema-3 PostgreSQL catalog (UNIQUE (path) on items, PRIMARY KEY (path) on skipped, UNIQUE (corpus,
    sha256) over every row) is migrated: long paths commit afterwards, a duplicate path is still refused, and
    lookups by path use the hash index; one caption per corpus is a partial index over captions only, and a
    repeated caption is still refused."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import IntegrityError

    url = new_catalog()
    home = tmp_path / "h"
    _small(home, url)
    engine = create_engine(url)
    with engine.begin() as c:  # schema 3's constraints
        c.execute(text("ALTER TABLE items DROP CONSTRAINT ex_items_path"))
        c.execute(text("ALTER TABLE items ADD CONSTRAINT uq_items_path UNIQUE (path)"))
        c.execute(text("ALTER TABLE skipped DROP CONSTRAINT ex_skipped_path"))
        c.execute(text("ALTER TABLE skipped ADD PRIMARY KEY (path)"))
        c.execute(text("DROP INDEX uq_items_corpus_text"))
        c.execute(text("ALTER TABLE items ADD CONSTRAINT uq_items_corpus_text UNIQUE (corpus, sha256)"))
        c.execute(text("UPDATE meta SET value = '3' WHERE key = 'schema_version'"))
    long = "/p/" + _noise(3500, 1) + ".jpg"
    with Store.open(home, writable=True) as w:
        w.add_images([ImageRecord(path=long, sha256="e" * 64, bytes=1, mtime=1.0, width=4, height=3)], _unit(1, 5))
        w.record_skipped([(long + ".bad", "not an image")])
        with pytest.raises(IntegrityError):  # still one row per path
            w.add_images([ImageRecord(path=long, sha256="d" * 64, bytes=2, mtime=2.0, width=4, height=3)],
                         _unit(1, 6))
        w.add_texts([TextRecord(corpus="c", row=0, text="a dog", sha256="f" * 64)], _unit(1, 7))
        with pytest.raises(IntegrityError):  # still one caption text per corpus
            w.add_texts([TextRecord(corpus="c", row=1, text="a dog", sha256="f" * 64)], _unit(1, 8))
    with engine.begin() as c:
        kinds = dict(c.execute(text("SELECT conname, contype FROM pg_constraint WHERE conrelid IN "
                                    "('items'::regclass, 'skipped'::regclass)")).all())
        assert "uq_items_path" not in kinds and "p" not in {kinds[k] for k in kinds if "skipped" in k}
        assert kinds["ex_items_path"] == kinds["ex_skipped_path"] == "x" and "uq_items_corpus_text" not in kinds
        partial = c.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'uq_items_corpus_text'")).scalar()
        assert partial is not None and "UNIQUE" in partial and "WHERE (corpus IS NOT NULL)" in partial, partial
        assert c.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == str(SCHEMA_VERSION)
        c.execute(text("SET LOCAL enable_seqscan = off"))  # a tiny table: ask whether an index can serve it
        for table in ("items", "skipped"):
            plan = " ".join(r for (r,) in c.execute(text(f"EXPLAIN SELECT * FROM {table} WHERE path = :p"),
                                                     {"p": long}))
            assert f"ex_{table}_path" in plan, plan
    engine.dispose()
    with Store.open(home) as s:
        assert s.count("image") == 4 and long in s.image_files() and s.skipped() == [(long + ".bad",
                                                                                        "not an image")]

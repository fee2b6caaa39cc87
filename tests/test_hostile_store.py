"""Hostile input to the store (issue 13): homes named with URL characters, 40,000-id statements, read-only
homes, damaged vector files and catalogs, LIKE wildcards in --camera, a home under a regular file, and rows
read from a newer snapshot than the vectors.

Most tests build small stores in-process with fake vectors and a bound fake Fingerprint (no model); the
read-only, repair and home-under-a-file tests also run the real CLI on a copy of the shared index.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from retrieval import fsutil
from retrieval.errors import IndexMismatch, UserError
from retrieval.media.photo_meta import PhotoMeta
from retrieval.model.spec import Fingerprint
from retrieval.store import ImageFilter, ImageRecord, Store, TextRecord
from retrieval.store import store as store_module
from tests.helpers import ROOT, cli_command, cli_env, jpeg_bytes, run_cli
from tests.helpers import cli_in_process as cli

pytestmark = pytest.mark.usefixtures("cli_state")

DIM = 64
FP = Fingerprint(model="ViT-S-32", pretrained="/m.pt", weights="sha256:abc", dim=DIM)


def unit(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def records(n: int, start: int = 0, folder: str = "/p") -> list[ImageRecord]:
    return [ImageRecord(path=f"{folder}/{i}.jpg", sha256=f"{i:064x}", bytes=i, mtime=float(i), width=4, height=3)
            for i in range(start, start + n)]


def new_store(home: Path) -> Store:
    s = Store.open(home, create=True, writable=True)
    s.bind_model(FP)
    return s


def build(home: Path, n: int, texts: int = 0) -> list[int]:
    """A closed store of `n` images (and `texts` captions); returns the image ids."""
    with new_store(home) as s:
        ids = s.add_images(records(n), unit(n))
        if texts:
            s.add_texts([TextRecord("c", i, f"caption {i}", f"{i:064x}") for i in range(texts)], unit(texts, 1))
    return ids


def finds_itself(s: Store, ids: list[int]) -> bool:
    """Every id's stored vector is finite and its own nearest neighbour (one batched search)."""
    vecs = np.stack([s.vector("image", i) for i in ids])
    if not np.isfinite(vecs).all():
        return False
    _, got = s.search("image", vecs, 1)
    return bool(got[:, 0].tolist() == list(ids))


def one_line(stderr: str, *needles: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---- item 1: `?`, `%`, `#` in the home --------------------------------------------------------------
@pytest.mark.parametrize("name", ["a?b", "50%", "x#y", "%3F"])
def test_home_names_with_url_characters_keep_the_catalog_inside(tmp_path: Path, name: str) -> None:
    home = tmp_path / name / "home"
    ids = build(home, 3)
    with Store.open(home, writable=True) as s:  # the writer (SQLAlchemy) and ...
        s.remove_images(ids[:1])
    with Store.open(home) as s:  # ... the reader (sqlite3) find the same catalog
        assert s.count("image") == 2 and sorted(s.items(ids)) == ids[1:]
    assert (home / "catalog.sqlite").is_file()
    outside = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
               if p.is_file() and home not in p.parents}
    assert outside == set()


# ---- item 8: no statement binds more variables than SQLite's stock limit ------------------------------
@pytest.mark.slow
def test_40000_row_commit_and_remove_under_the_stock_variable_limit(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 32_766  # SQLITE_MAX_VARIABLE_NUMBER's default since 3.32 (distributions may build it higher)
    plain = sqlite3.connect

    def connect(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        db = plain(*args, **kwargs)
        db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)
        return db

    monkeypatch.setattr(sqlite3, "connect", connect)  # the reader's
    monkeypatch.setattr(sqlite3.dbapi2, "connect", connect)  # SQLAlchemy's
    n = 40_000
    with new_store(tmp_path) as s:
        s.record_skipped([(f"/p/d/{i}.jpg", "unreadable") for i in range(n)])
        ids = s.add_images(records(n, folder="/p/d"), unit(n))  # forgets the 40,000 skips too
        assert s.skipped() == []
        assert len(s.items(ids)) == n and len(s.image_shas(ids)) == n
        assert len(s.shas_in_use(f"{i:064x}" for i in range(n))) == n
        s.move_images([(i, f"/q/{i}.jpg", 1, 1.0) for i in ids])
        under = s.ids_under("/q")
        assert len(under) == n
        assert s.remove_images(under) == n
    with Store.open(tmp_path) as s:
        assert s.count("image") == 0 and s.items(ids) == {}


# ---- item 9: a read-only home ---------------------------------------------------------------------------
def _chmod_tree(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
        os.chmod(p, (mode | stat.S_IWUSR) if writable else (mode & ~bits))


def _drop_root_powers() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so
    root obeys file permissions like anyone (root ignores them otherwise, and the test would prove nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _run_unprivileged(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_command(*args, home=home), capture_output=True, text=True, timeout=300,
                          env=cli_env(), cwd=ROOT, preexec_fn=_drop_root_powers if os.geteuid() == 0 else None)


def copy_home(src: Path, dst: Path) -> Path:
    """A copy of an index whose WAL is folded into the catalog (the session's readers keep the source's open)."""
    shutil.copytree(src, dst)
    db = sqlite3.connect(dst / "catalog.sqlite")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()  # the last connection removes -wal and -shm
    for leftover in ("catalog.sqlite-wal", "catalog.sqlite-shm"):
        assert not (dst / leftover).exists()
    return dst


@pytest.fixture
def read_only_home(home: Path, tmp_path: Path) -> Iterator[Path]:
    copy = copy_home(home, tmp_path / "ro" / "home")
    _chmod_tree(copy, writable=False)
    yield copy
    _chmod_tree(copy, writable=True)


@pytest.mark.slow
@pytest.mark.subprocess
def test_read_only_home_answers_queries_and_refuses_writers(read_only_home: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root's sqlite would simply write -shm into the read-only folder: drop that power
        try:
            subprocess.run(["true"], preexec_fn=_drop_root_powers, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"cannot drop root's file-permission override here ({e}); "
                        f"test_read_only_probe covers the code path")
    before = {p.name: p.stat().st_mtime_ns for p in read_only_home.iterdir()}
    r = _run_unprivileged("search", "caption number", "--json", "-k", "3", "--no-rerank", home=read_only_home)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 3
    r = _run_unprivileged("info", "--json", home=read_only_home)
    assert r.returncode == 0 and json.loads(r.stdout)["images"] > 0, r.stderr
    caps = tmp_path / "more.txt"
    caps.write_text("one more caption\n")
    for args in (["remove", "/nowhere"], ["repair"], ["add-texts", str(caps)], ["index", str(tmp_path)],
                 ["set-reranker", "--clear"], ["reindex"]):
        r = _run_unprivileged(*args, home=read_only_home)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        one_line(r.stderr, "read-only")
    assert {p.name: p.stat().st_mtime_ns for p in read_only_home.iterdir()} == before  # nothing written


def test_read_only_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same paths with the writability probe saying no (whoever runs the tests, root included)."""
    from retrieval.errors import ReadOnlyHome
    from retrieval.store import sqlite_reader

    ids = build(tmp_path, 5, texts=2)
    monkeypatch.setattr(fsutil, "os", _NoWrite(os))

    assert sqlite_reader.catalog_uri(tmp_path / "catalog.sqlite").endswith("?mode=ro&immutable=1")
    with Store.open(tmp_path) as s:
        assert s.count("image") == 5 and sorted(s.items(ids)) == ids
    for kwargs in ({"writable": True}, {"writable": True, "create": True}, {"writable": True, "check": False,
                                                                          "salvage": True}):
        with pytest.raises(ReadOnlyHome, match="read-only"):
            Store.open(tmp_path, **kwargs)
    assert not (tmp_path / "catalog.sqlite-shm").exists()


class _NoWrite:
    """`os` as fsutil sees it, except that nothing is writable."""

    def __init__(self, real: object) -> None:
        self._real = real

    def access(self, path: object, mode: int, **kwargs: object) -> bool:
        return False if mode & os.W_OK else bool(os.access(path, mode, **kwargs))  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


# ---- item 11: damaged vector files and catalogs -------------------------------------------------------
def _garbage(path: Path, offset: int, size: int = 2048) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8).tobytes())


def _vector_file(home: Path) -> Path:
    with Store.open(home, check=False) as s:
        return s._vector_path("image", s.generations["image"])


def test_garbage_inside_the_vector_file_is_found_and_repaired(tmp_path: Path) -> None:
    ids = build(tmp_path, 2000)
    path = _vector_file(tmp_path)
    _garbage(path, path.stat().st_size // 2)
    with pytest.raises(IndexMismatch, match="checksum.*crossmodal repair"):
        Store.open(tmp_path)
    with Store.open(tmp_path, writable=True, check=False, salvage=True) as s:
        report = s.repair_report()
    assert 0 < report.vectors_dropped <= 40  # 2 KB of 256-byte vectors, to the 4 KB block
    assert report.rows_dropped == report.vectors_dropped and len(report.lost) == report.rows_dropped
    assert any("checksum" in n for n in report.notes)
    with Store.open(tmp_path) as s:  # checks the new file's sums
        kept = sorted(s.items(ids))
        assert len(kept) == 2000 - report.rows_dropped and finds_itself(s, kept)


def test_non_finite_vectors_without_recorded_sums_are_dropped(tmp_path: Path) -> None:
    """A store from before checksums: repair still drops NaN/inf vectors and their rows."""
    ids = build(tmp_path, 50)
    with Store.open(tmp_path, writable=True) as s, s.engine.begin() as c:
        from sqlalchemy import text

        c.execute(text("DELETE FROM meta WHERE key LIKE 'sums.%'"))
    import faiss

    path = _vector_file(tmp_path)
    at_vectors = len(faiss.serialize_index(faiss.IndexIDMap2(faiss.IndexFlatIP(DIM)))) - 8  # then n*d float32
    with open(path, "r+b") as f:
        f.seek(at_vectors + 4 * DIM * 7)
        f.write(np.full(DIM, np.nan, np.float32).tobytes())
    with Store.open(tmp_path, writable=True, check=False) as s:
        assert s.repair() == {"rows_dropped": 1, "vectors_dropped": 1}
    with Store.open(tmp_path) as s:
        assert sorted(s.items(ids)) == ids[:7] + ids[8:] and finds_itself(s, ids[:7] + ids[8:])


def test_unreadable_vector_header_keeps_the_intact_vectors(tmp_path: Path) -> None:
    ids = build(tmp_path, 300)
    path = _vector_file(tmp_path)
    _garbage(path, 0, 16)  # faiss cannot even read it now
    with pytest.raises(IndexMismatch, match="repair"):
        Store.open(tmp_path)
    with Store.open(tmp_path, writable=True, check=False, salvage=True) as s:
        report = s.repair_report()
    # Only the vectors sharing the header's 4 KB block go (they may be damaged too); the rest are read
    # from the file's layout.
    assert 0 < report.rows_dropped <= 16 and any("layout" in n for n in report.notes), report.notes
    with Store.open(tmp_path) as s:
        assert sorted(s.items(ids)) == ids[report.rows_dropped:] and finds_itself(s, ids[16::37])


@pytest.mark.parametrize("cut", ["last-20KB", "first-20KB-only", "empty"])
def test_repair_rebuilds_a_damaged_catalog_and_says_what_is_lost(tmp_path: Path, cut: str) -> None:
    ids = build(tmp_path, 1500, texts=10)
    catalog = tmp_path / "catalog.sqlite"
    assert not (tmp_path / "catalog.sqlite-wal").exists()
    data = catalog.read_bytes()
    catalog.write_bytes({"last-20KB": data[:-20_000], "first-20KB-only": data[:20_000], "empty": b""}[cut])
    damaged = catalog.read_bytes()
    with pytest.raises(UserError, match="crossmodal repair"):  # queries and writers name the fix
        with Store.open(tmp_path) as s:
            s.items(ids)
    with pytest.raises(UserError, match="crossmodal repair"):
        Store.open(tmp_path, writable=True).close()
    assert catalog.read_bytes() == damaged  # the writer made no fresh, empty catalog of it
    with Store.open(tmp_path, writable=True, check=False, salvage=True) as s:
        report = s.repair_report()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("catalog.sqlite.damaged-")]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged  # kept, untouched
    assert any(aside[0].name in n for n in report.notes)
    with Store.open(tmp_path) as s:  # agrees now
        kept = sorted(s.items(ids))
        assert s.count("image") == len(kept) and (not kept or finds_itself(s, kept[::50]))
        lost = len(ids) - len(kept)
    no_model = any("model record is lost" in n for n in report.notes)  # meta's page went: nothing is usable
    said = any(f"image: {lost} of 1500 vectors have no readable row" in n for n in report.notes)
    assert (kept == [] if no_model else said == (lost > 0)), report.notes
    assert no_model == (cut == "empty") or cut == "first-20KB-only"
    assert lost > 0 or cut == "last-20KB"  # the last pages may hold only index entries
    if no_model:
        return
    assert min(build_more(tmp_path)) > max(ids)  # ids are never reused after a rebuild


def build_more(home: Path) -> list[int]:
    with Store.open(home, writable=True) as s:
        return s.add_images(records(2, start=10_000), unit(2, 9))


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_repair_of_a_truncated_catalog(home: Path, tmp_path: Path) -> None:
    copy = copy_home(home, tmp_path / "home")
    catalog = copy / "catalog.sqlite"
    catalog.write_bytes(b"")  # the model is recovered from the ONNX export
    r = run_cli("search", "caption", "--json", home=copy)
    assert r.returncode == 2, r.stderr
    one_line(r.stderr, "crossmodal repair")
    r = run_cli("repair", home=copy)
    assert r.returncode == 0, r.stderr
    assert "recovered from the ONNX export" in r.stdout and "kept aside as catalog.sqlite.damaged-" in r.stdout
    r = run_cli("info", "--json", home=copy)
    assert r.returncode == 0 and json.loads(r.stdout)["images"] == 0, r.stderr
    assert "ViT-S-32" in json.loads(r.stdout)["model"]


# ---- item 12: LIKE wildcards in --camera ----------------------------------------------------------------
def test_camera_filter_matches_wildcards_literally(tmp_path: Path) -> None:
    cams = [("Canon", "EOS R5"), ("Google", "Pixel_8"), ("Acme", "100% zoom"), ("Back\\slash", "X"), (None, None)]
    recs = [ImageRecord(f"/c/{i}.jpg", f"{i:064x}", 1, 1.0, 4, 3, PhotoMeta(camera_make=m, camera_model=o))
            for i, (m, o) in enumerate(cams)]
    with new_store(tmp_path) as s:
        ids = s.add_images(recs, unit(len(recs)))

        def found(camera: str) -> list[int]:
            return sorted(s.image_ids(ImageFilter(camera=camera)).tolist())

        assert found("_") == [ids[1]] and found("%") == [ids[2]] and found("\\") == [ids[3]]
        assert found(" pixel_8 ") == [ids[1]] and found("eos") == [ids[0]] and found("%_") == []
        for blank in (" ", "   ", "\t"):
            with pytest.raises(UserError, match="--camera is blank"):
                found(blank)


# ---- item 14: a home under a regular file ---------------------------------------------------------------
def test_home_under_a_file_is_one_line_for_every_command(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    bad = afile / "sub"
    caps = tmp_path / "caps.txt"
    caps.write_text("a caption\n")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes())
    for kwargs in ({}, {"writable": True}, {"writable": True, "create": True}):
        with pytest.raises(UserError, match="which is a file"):
            Store.open(bad, **kwargs)
    for args in (["index", str(tmp_path)], ["reindex"], ["remove", "/x"], ["add-texts", str(caps)], ["skipped"],
                 ["repair"], ["search", "a dog"], ["caption", str(photo)], ["info"], ["set-reranker", "--clear"]):
        r = cli(*args, home=bad)
        assert r.exit_code == 2, (args, r.exit_code, r.output, r.exception)
        one_line(r.stderr, "which is a file, not a folder")
    assert afile.read_text() == "not a folder"


@pytest.mark.subprocess
def test_ui_with_a_home_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    r = run_cli("ui", "--port", "1", home=tmp_path / "afile" / "sub", timeout=60)
    assert r.returncode == 2
    one_line(r.stderr, "which is a file, not a folder")


# ---- item 15: rows from the snapshot the vectors came from ------------------------------------------------
def test_read_only_store_answers_rows_from_its_own_snapshot(tmp_path: Path) -> None:
    ids = build(tmp_path, 20)
    vecs = unit(20)
    reader = Store.open(tmp_path)
    try:
        with Store.open(tmp_path, writable=True) as w:
            w.remove_images(ids[:10])
            assert sorted(w.items(ids)) == ids[10:]  # a writer reads its own state
        _, got = reader.search("image", vecs[:3], 5)
        hits = [int(i) for i in got.ravel()]
        assert set(reader.items(hits)) == set(hits)  # every id its vectors name still has its row
        assert sorted(reader.items(ids)) == ids
        assert reader.refresh() is True
        assert sorted(reader.items(ids)) == ids[10:] and reader.count("image") == 10
    finally:
        reader.close()


def test_the_held_snapshot_ends_by_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle reader (the page) must not keep the writer's WAL from being checkpointed for long."""
    ids = build(tmp_path, 5)
    monkeypatch.setattr(store_module, "SNAPSHOT_HOLD_S", 0.3, raising=False)
    reader = Store.open(tmp_path)
    try:
        with Store.open(tmp_path, writable=True) as w:
            w.remove_images(ids[:1])
            db = sqlite3.connect(tmp_path / "catalog.sqlite", timeout=0.05)
            assert db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 1  # busy: the reader holds
            deadline = time.monotonic() + 10
            while reader.reader.held and time.monotonic() < deadline:
                time.sleep(0.05)
            assert db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
            db.close()
        assert sorted(reader.items(ids)) == ids[1:]  # released: the latest commit from now on
    finally:
        reader.close()

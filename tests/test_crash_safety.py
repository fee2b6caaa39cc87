"""kill -9 at random moments loses nothing committed; one writer at a time; readers see committed state."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.pipeline import index_paths
from retrieval.store import Store
from retrieval.store.records import SCHEMA_VERSION
from tests.helpers import TEST_MODEL, catalog_url, pattern, run_cli, start_cli


def _library(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        pattern(500 + i, (96, 72)).save(root / f"k{i:03d}.png")
    return root


def _start_index(home: Path, lib: Path, checkpoint: Path, *extra: str) -> subprocess.Popen:
    return start_cli("index", str(lib), "--model", TEST_MODEL, "--pretrained", str(checkpoint), "--batch-size", "2",
                     "--commit-every", "2", "--workers", "1", "--quiet", *extra, home=home,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _generation(home: Path) -> int:
    vec = home / "vectors"
    return len(list(vec.glob("image-*.faiss"))) if vec.is_dir() else 0


def _committed(home: Path) -> int:
    if not (home / "catalog.sqlite").is_file():
        return 0
    with Store.open(home) as s:  # also asserts catalog and vectors agree
        return s.count("image")


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=30)


def _by_path(home: Path) -> dict[str, np.ndarray]:
    with Store.open(home) as s:
        ids, vecs = s.vectors("image")
        by_id = dict(zip(ids.tolist(), vecs, strict=True))
        return {p: by_id[v[0]] for p, v in s.image_files().items()}


@pytest.mark.slow
@pytest.mark.subprocess
def test_kill_at_random_moments_then_finish(tmp_path, checkpoint, encoder):
    total = 96
    lib = _library(tmp_path / "lib", total)
    home = tmp_path / "home"
    rng = random.Random(1234)
    mid_run_kills = 0
    for _round in range(8):
        p = _start_index(home, lib, checkpoint)
        start = _committed_safe(home)
        deadline = time.time() + 120
        # wait for this run to commit something, then kill it a random moment later
        while time.time() < deadline and p.poll() is None and _committed_safe(home) <= start:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        _kill_group(p)
        n = _committed(home)  # opening checks catalog/vector agreement
        assert n >= start
        mid_run_kills += n < total
        if n == total or mid_run_kills >= 4:
            break
    assert mid_run_kills >= 3, "the runs finished before they could be killed; the test proved nothing"
    leftovers = list((home / "vectors").glob("*.tmp"))
    r = run_cli("index", str(lib), "--json", "--quiet", home=home)
    assert r.returncode == 0, r.stderr
    assert _committed(home) == total
    assert not [t for t in leftovers if t.exists()], "orphan temp files are cleaned by the next commit"

    ref_home = tmp_path / "ref"
    with Store.open(ref_home, create=True, writable=True) as store:
        store.bind_model(encoder.fingerprint)
        index_paths(store, encoder, [str(lib)], batch_size=2, workers=0)
    got, want = _by_path(home), _by_path(ref_home)
    assert sorted(got) == sorted(want)
    for path, v in want.items():
        assert float(np.dot(got[path], v)) > 0.9999, path


def _committed_safe(home: Path) -> int:
    try:
        return _committed(home)
    except Exception:  # noqa: BLE001 - a catalog being created right now
        return 0


@pytest.mark.slow
@pytest.mark.subprocess
def test_lock_queries_during_indexing_and_stale_lock(tmp_path, checkpoint):
    lib = _library(tmp_path / "lib", 40)
    home = tmp_path / "home"
    first = _start_index(home, lib, checkpoint)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and _committed_safe(home) == 0:
            time.sleep(0.05)
        assert first.poll() is None, "indexer finished too early for the test"
        second = run_cli("index", str(lib), home=home)
        assert second.returncode == 2 and "another crossmodal process" in second.stderr
        assert "Traceback" not in second.stderr
        q = run_cli("search", "anything", "-k", "3", "--json", home=home)  # readers do not wait
        assert q.returncode == 0, q.stderr
    finally:
        _kill_group(first)
    # the killed writer's lock is gone with its process
    r = run_cli("index", str(lib), "--json", "--quiet", home=home)
    assert r.returncode == 0, r.stderr
    assert _committed(home) == 40


@pytest.mark.parametrize("readonly_first", [True, False])
def test_schema_1_catalog_is_migrated(tmp_path, encoder, readonly_first, any_catalog):
    """The ladder from the first schema, on SQLite and on PostgreSQL."""
    from sqlalchemy import create_engine, text

    lib = _library(tmp_path / "lib", 3)
    home = tmp_path / "home"
    with Store.open(home, create=True, writable=True, catalog=any_catalog) as store:
        store.bind_model(encoder.fingerprint)
        index_paths(store, encoder, [str(lib)], workers=0)
    engine = create_engine(catalog_url(home))
    with engine.begin() as c:
        for col in ("camera_make", "camera_model", "gps_lat", "gps_lon"):
            c.execute(text(f"ALTER TABLE items DROP COLUMN {col}"))
        c.execute(text("UPDATE meta SET value = '1' WHERE key = 'schema_version'"))
    engine.dispose()
    with Store.open(home, writable=not readonly_first) as store:
        assert store.count("image") == 3
        views = store.items(i for i, *_ in store.image_files().values())
        assert all(v.camera is None for v in views.values())
    engine = create_engine(catalog_url(home))
    with engine.begin() as c:
        assert c.execute(text("SELECT value FROM meta WHERE key='schema_version'")).scalar() == str(SCHEMA_VERSION)
    engine.dispose()

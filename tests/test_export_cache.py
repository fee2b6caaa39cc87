"""ONNX exports in one per-user cache that every index home shares (issue 14): a model is exported once per
machine, under a lock per model, an unwritable cache costs one line, and homes of earlier versions keep
their own export working.

Real exports are made by the first query (tests/fixtures.py) and by the two-homes test here; the others
install a linked copy of the first query's export (`link_export`) instead of spending 20 s each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

import retrieval.model.onnx_export as ox  # noqa: E402
import retrieval.query.open as query_open  # noqa: E402
from retrieval.model.export_cache import (  # noqa: E402
    CACHE_ENV,
    export_busy,
    export_dir,
    export_key,
    exports_root,
    failure_marker,
    legacy_dir,
    lock_path,
    unsupported_marker,
)
from retrieval.model.onnx_encoder import OnnxEncoder  # noqa: E402
from retrieval.model.spec import Fingerprint  # noqa: E402
from retrieval.model.torch_encoder import TorchEncoder  # noqa: E402
from retrieval.query.open import open_index  # noqa: E402
from tests.fixtures import link_export  # noqa: E402
from tests.helpers import GOOD, ROOT, TEST_MODEL, cli_command, cli_env, run_cli  # noqa: E402

FP = Fingerprint(model="M", pretrained="p", weights="sha256:x", dim=8)
DEBUG = {"CROSSMODAL_DEBUG_IMPORTS": "1"}


def _notes(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and "heavy imports:" not in ln]


def _heavy(stderr: str) -> str:
    found = [ln for ln in stderr.splitlines() if "heavy imports:" in ln]
    assert len(found) == 1, stderr
    return found[0].split("heavy imports:", 1)[1].strip()


def _stamp(folder: Path) -> tuple[int, int, int]:
    """Identity and time of an export: a new export (temp folder renamed into place) changes all three."""
    st = folder.stat()
    return st.st_ino, st.st_mtime_ns, (folder / "export.json").stat().st_mtime_ns


@pytest.fixture
def no_export(monkeypatch):  # noqa: ANN001, ANN201
    """Queries open the session's model without reloading it, and any real export fails the test."""

    def refuse(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("no export may start here")

    monkeypatch.setattr(ox, "export_onnx", refuse)
    return refuse


def _query(home: Path, encoder):  # noqa: ANN001, ANN202
    """(encoder that answers, notices) of opening `home` for a query, as `crossmodal search` does."""
    lines: list[str] = []
    s = open_index(home, device="cpu", notify=lines.append)
    s.store.close()
    return s.encoder, lines


# ---- where ------------------------------------------------------------------------------------------------
def test_the_cache_is_the_setting_else_the_users_cache_folder(tmp_path, monkeypatch) -> None:
    import platformdirs

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    key = export_key(FP)
    assert export_dir(FP) == tmp_path / "c" / "onnx" / key
    assert {p.name for p in (unsupported_marker(FP), failure_marker(FP), lock_path(FP))} == \
        {f"{key}.unsupported", f"{key}.failed", f"{key}.lock"}
    assert {p.parent for p in (unsupported_marker(FP), failure_marker(FP), lock_path(FP))} == {export_dir(FP).parent}
    assert legacy_dir(tmp_path / "home", FP) == tmp_path / "home" / "onnx" / key  # earlier versions' place
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # only paths are computed: nothing is written
    assert export_dir(FP) == Path(platformdirs.user_cache_dir("crossmodal", appauthor=False)) / "onnx" / key
    assert export_dir(FP) == tmp_path / "xdg" / "crossmodal" / "onnx" / key


# ---- two homes, one export -----------------------------------------------------------------------------------
def test_queries_on_every_home_of_a_model_use_the_one_export(built_index: Path, encoder, linked_cache, tmp_path,
                                                            no_export) -> None:
    homes = [tmp_path / "a", tmp_path / "b"]
    for h in homes:
        shutil.copytree(built_index, h)
    for h in homes:
        enc, lines = _query(h, encoder)
        assert isinstance(enc, OnnxEncoder) and lines == []
        assert enc.folder == export_dir(encoder.fingerprint) and enc.folder.parent.parent == linked_cache
        assert not (h / "onnx").exists()


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_second_home_of_a_model_pays_nothing(own_cache: Path, checkpoint: Path, photos, tmp_path) -> None:
    """`index` into a first home exports (once per machine); into a second home it finds that export, makes
    nothing, and the second home's re-run and queries import no torch."""
    library = tmp_path / "lib"
    shutil.copytree(photos["root"], library)
    for p in (library / "truncated.jpg", library / "empty.jpg", library / "notes.jpg"):
        p.unlink()  # only good files: the re-run has nothing to decode (tests/test_lazy_model.py)
    args = ("index", str(library), "--model", TEST_MODEL, "--pretrained", str(checkpoint),
            "--device", "cpu", "--workers", "0")
    first = run_cli(*args, home=tmp_path / "a")
    assert first.returncode == 0, first.stderr
    assert [ln for ln in first.stderr.splitlines() if "exporting the model to ONNX" in ln] != [], first.stderr
    (folder,) = [p for p in exports_root().iterdir()]  # the export alone: no lock file, marker or temp folder
    assert folder.parent.parent == own_cache and (folder / "export.json").is_file()
    made = _stamp(folder)

    second = run_cli(*args, home=tmp_path / "b")
    assert second.returncode == 0, second.stderr
    assert "export" not in second.stderr.lower(), second.stderr
    assert [p for p in exports_root().iterdir()] == [folder] and _stamp(folder) == made  # not made again
    assert not (tmp_path / "a" / "onnx").exists() and not (tmp_path / "b" / "onnx").exists()

    again = run_cli("index", str(library), "--json", home=tmp_path / "b", env=DEBUG)
    assert again.returncode == 0 and json.loads(again.stdout)["unchanged"] == GOOD, again.stderr
    assert _heavy(again.stderr) == "none"
    r = run_cli("search", "red circles", "-k", "3", "--json", home=tmp_path / "b", env=DEBUG)
    assert r.returncode == 0 and _heavy(r.stderr) == "none" and _notes(r.stderr) == [], r.stderr
    assert len(json.loads(r.stdout)) == 3
    info = json.loads(run_cli("info", "--json", home=tmp_path / "b").stdout)
    assert info["onnx_export"] == {"path": str(folder), "bytes": info["onnx_export"]["bytes"], "shared": True}
    assert info["onnx_export"]["bytes"] == sum(p.stat().st_size for p in folder.iterdir())
    assert _stamp(folder) == made


# ---- one exporter at a time ------------------------------------------------------------------------------------
def test_concurrent_exporters_export_once(encoder, first_export: Path, own_cache, tmp_path, monkeypatch) -> None:
    """Two `index` runs of one model at once: the second waits for the first's export and uses it."""
    started, calls = threading.Event(), []

    def slow_export(enc, _home):  # noqa: ANN001, ANN202 - the install step of a real export, after 1 s
        calls.append(threading.current_thread().name)
        started.set()
        time.sleep(1.0)
        final = export_dir(enc.fingerprint)
        tmp = exports_root() / f".{final.name}.{os.getpid()}.slow.tmp"
        shutil.copytree(first_export, tmp, copy_function=os.link)
        ox._install(tmp, final, enc.fingerprint)
        return final

    monkeypatch.setattr(ox, "export_onnx", slow_export)
    got: dict[str, Path | None] = {}
    notes: dict[str, list[str]] = {"first": [], "second": []}
    waits: dict[str, list[str]] = {"first": [], "second": []}

    def run(name: str) -> None:
        got[name] = ox.ensure_export(encoder, tmp_path / name, notes[name].append, wait_s=60,
                                     on_wait=waits[name].append)

    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    first.join(60)
    second.join(60)
    assert calls == ["first"]  # one export
    assert got == {"first": export_dir(encoder.fingerprint), "second": export_dir(encoder.fingerprint)}
    assert notes == {"first": [], "second": []} and waits["first"] == []
    assert len(waits["second"]) == 1 and f"pid {os.getpid()}" in waits["second"][0]
    assert "waiting" in waits["second"][0]
    assert [p.name for p in exports_root().iterdir()] == [export_key(encoder.fingerprint)]  # lock file gone


@pytest.fixture
def lock_holder(encoder, own_cache):  # noqa: ANN001, ANN201
    """Another process that holds the export lock of the test model (and exports nothing); killed after."""
    code = ("import sys, time\nfrom retrieval.model.export_cache import export_lock\n"
            "from retrieval.model.spec import Fingerprint\n"
            "with export_lock(Fingerprint.from_json(sys.argv[1])):\n"
            "    print('held', flush=True)\n    time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, encoder.fingerprint.to_json()], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.subprocess
def test_a_busy_lock_bounds_the_wait_and_queries_answer_on_torch(lock_holder, built_index: Path, encoder,
                                                                first_export: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(query_open, "open_model", lambda *_a, **_k: encoder)
    home = tmp_path / "home"
    shutil.copytree(built_index, home)
    attempts: list[str] = []

    def export_copy(enc, into):  # noqa: ANN001, ANN202
        attempts.append(str(into))
        final = export_dir(enc.fingerprint)
        tmp = exports_root() / f".{final.name}.{os.getpid()}.copy.tmp"
        shutil.copytree(first_export, tmp, copy_function=os.link)
        ox._install(tmp, final, enc.fingerprint)
        return final

    monkeypatch.setattr(ox, "export_onnx", export_copy)
    assert export_busy(encoder.fingerprint) == \
        f"another crossmodal process (pid {lock_holder.pid}) is exporting this model now"
    enc, lines = _query(home, encoder)  # a query does not wait: torch answers, one line says why
    assert isinstance(enc, TorchEncoder) and attempts == []
    assert len(lines) == 1 and "torch" in lines[0] and f"pid {lock_holder.pid}" in lines[0], lines

    notes: list[str] = []
    waits: list[str] = []
    t = time.monotonic()
    assert ox.ensure_export(encoder, home, notes.append, wait_s=0.5, on_wait=waits.append) is None  # `index`
    assert 0.5 <= time.monotonic() - t < 10 and attempts == []
    assert len(waits) == 1 and len(notes) == 1 and f"pid {lock_holder.pid}" in notes[0], (waits, notes)
    assert "waited 0.5 s" in notes[0] and "torch" in notes[0]

    lock_holder.kill()  # the lock dies with its process (its file stays: the next exporter takes it over)
    lock_holder.wait()
    assert lock_path(encoder.fingerprint).exists() and export_busy(encoder.fingerprint) is None
    assert ox.ensure_export(encoder, home, notes.append, wait_s=0.5) == export_dir(encoder.fingerprint)
    assert attempts == [str(home)] and len(notes) == 1
    assert [p.name for p in exports_root().iterdir()] == [export_key(encoder.fingerprint)]
    enc, lines = _query(home, encoder)
    assert isinstance(enc, OnnxEncoder) and lines == []


# ---- a cache that cannot be written ------------------------------------------------------------------------------
def test_an_unwritable_cache_costs_one_line(built_index: Path, encoder, tmp_path, monkeypatch, no_export) -> None:
    """A cache path under a regular file (what a read-only mount or missing permission also give: no folder
    can be made there): queries answer on torch and say why in one line; `index` says it once too."""
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    monkeypatch.setattr(query_open, "open_model", lambda *_a, **_k: encoder)
    home = tmp_path / "home"
    shutil.copytree(built_index, home)
    enc, lines = _query(home, encoder)
    assert isinstance(enc, TorchEncoder)
    assert len(lines) == 1 and "no ONNX export can be written" in lines[0] and CACHE_ENV in lines[0], lines
    assert str(tmp_path / "a-file" / "cache" / "onnx") in lines[0] and "torch" in lines[0]
    notes: list[str] = []
    assert ox.ensure_export(encoder, home, notes.append) is None
    assert len(notes) == 1 and "no ONNX export can be written" in notes[0]
    assert not (home / "onnx").exists()


def _chmod_dirs(root: Path, writable: bool) -> None:
    """Folders only: the export's files are hard links shared with the session's export."""
    for p in [root, *[d for d in root.rglob("*") if d.is_dir()]]:
        os.chmod(p, 0o755 if writable else 0o555)


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_read_only_cache_serves_its_export_and_index_says_once(built_index: Path, encoder, first_export: Path,
                                                                checkpoint: Path, photos, tmp_path) -> None:
    from tests.test_hostile_store import _drop_root_powers

    preexec = _drop_root_powers if os.geteuid() == 0 else None  # root ignores permissions otherwise
    full, empty = tmp_path / "full-cache", tmp_path / "empty-cache"
    link_export(first_export, full / "onnx" / export_key(encoder.fingerprint))
    (empty / "onnx").mkdir(parents=True)
    home = tmp_path / "home"
    shutil.copytree(built_index, home)
    for cache in (full, empty):
        _chmod_dirs(cache, writable=False)
    try:
        def cli(*args: str, cache: Path, at: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(cli_command(*args, home=at), capture_output=True, text=True, timeout=300,
                                  env=cli_env({CACHE_ENV: str(cache), **DEBUG}), cwd=ROOT, preexec_fn=preexec)

        r = cli("search", "red circles", "-k", "3", "--json", cache=full, at=home)
        assert r.returncode == 0 and _notes(r.stderr) == [] and _heavy(r.stderr) == "none", r.stderr
        assert len(json.loads(r.stdout)) == 3
        r = cli("index", str(photos["root"]), "--model", TEST_MODEL, "--pretrained", str(checkpoint),
                "--device", "cpu", "--workers", "0", "--json", "-q", cache=empty, at=tmp_path / "new")
        assert r.returncode == 0 and json.loads(r.stdout)["added"] == GOOD, r.stderr
        notes = _notes(r.stderr)
        assert len(notes) == 1 and "no ONNX export can be written" in notes[0], r.stderr
        assert str(empty / "onnx") in notes[0] and "exporting" not in r.stderr
    finally:
        for cache in (full, empty):
            _chmod_dirs(cache, writable=True)
    assert [p.name for p in (empty / "onnx").iterdir()] == []


# ---- homes of earlier versions -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.subprocess
def test_an_old_homes_own_export_is_still_used(built_index: Path, encoder, first_export: Path, own_cache, photos,
                                               tmp_path, no_export) -> None:
    """An export under HOME/onnx (versions before the shared cache) answers queries while the cache has none,
    gives `index` the model's preprocessing, is never exported again, and `info` says where it is."""
    from retrieval.model.recorded import PREPROCESS_KEY, recorded_preprocess
    from retrieval.store import Store

    home = tmp_path / "home"
    shutil.copytree(built_index, home)
    old = link_export(first_export, legacy_dir(home, encoder.fingerprint))
    enc, lines = _query(home, encoder)
    assert isinstance(enc, OnnxEncoder) and enc.folder == old and lines == []
    with Store.open(home) as store:
        assert store.get_meta(PREPROCESS_KEY) is None  # built before the catalog recorded it: the export has it
        assert recorded_preprocess(store) == encoder.preprocess
    assert ox.ensure_export(encoder, home) == old

    r = run_cli("index", str(photos["root"]), "--json", home=home)  # an unchanged re-run
    assert r.returncode == 0 and json.loads(r.stdout)["unchanged"] == GOOD, r.stderr
    assert "export" not in r.stderr.lower()
    r = run_cli("search", "red circles", "-k", "3", "--json", home=home, env=DEBUG)
    assert r.returncode == 0 and _heavy(r.stderr) == "none" and _notes(r.stderr) == [], r.stderr
    info = json.loads(run_cli("info", "--json", home=home).stdout)
    assert info["onnx_export"]["path"] == str(old) and info["onnx_export"]["shared"] is False
    assert not exports_root().exists() or list(exports_root().iterdir()) == []  # nothing made in the cache

    link_export(first_export, export_dir(encoder.fingerprint))  # once the cache has it, the cache's is used
    enc, lines = _query(home, encoder)
    assert isinstance(enc, OnnxEncoder) and enc.folder == export_dir(encoder.fingerprint) and lines == []
    r = run_cli("info", home=home, env={"COLUMNS": "400"})
    assert r.returncode == 0 and "unused ONNX export of an earlier crossmodal" in r.stdout, r.stdout
    assert str(old) in r.stdout and "shared by every index of this model" in r.stdout

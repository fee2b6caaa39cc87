"""Hostile caches (issue 13): token-cache segments and ONNX exports cut short or corrupt, a full disk, the
folders of killed exporters, and texts too long to tokenize naively. Caches are damaged only on copies.

Each damage must cost one line and nothing else: the query answers with the results of an undamaged copy,
the damaged part is dropped, and the next query is clean.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from open_clip.tokenizer import SimpleTokenizer, default_bpe  # noqa: E402

import retrieval.model.onnx_export as ox  # noqa: E402
import retrieval.query.open as query_open  # noqa: E402
from retrieval.errors import DiskFull, UserError  # noqa: E402
from retrieval.model.bpe import BpeTokenizer, cap_text  # noqa: E402
from retrieval.model.export_cache import export_dir, export_key, exports_root  # noqa: E402
from retrieval.model.onnx_encoder import OnnxEncoder  # noqa: E402
from retrieval.model.onnx_upkeep import failure_marker, sweep_exports  # noqa: E402
from retrieval.model.spec import Fingerprint  # noqa: E402
from retrieval.model.torch_encoder import TorchEncoder  # noqa: E402
from retrieval.query.open import open_index  # noqa: E402
from retrieval.rerank.reranker import open_reranker  # noqa: E402
from retrieval.rerank.token_cache import TokenCache, TokenCacheWriter, cache_dir  # noqa: E402
from tests.helpers import GOOD, run_cli  # noqa: E402

TEXT = "a dog running on a beach"
FP = Fingerprint(model="M", pretrained="p", weights="sha256:x", dim=8)


# ---- helpers --------------------------------------------------------------------------------------------
def _cut(path: Path, keep: float = 0.5) -> None:
    """Truncate a file as a full disk or a killed copy does (a new inode: hard-linked copies stay whole)."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: int(len(data) * keep)])


def _zero(path: Path) -> None:
    """Same size, no content: passes the size check, fails when ONNX Runtime loads it."""
    size = path.stat().st_size
    path.unlink()
    path.write_bytes(bytes(size))


def _copy(home: Path, dst: Path) -> Path:
    """A copy of an index home; export files are hard links (never written in place, only replaced)."""
    shutil.copytree(home, dst, ignore=shutil.ignore_patterns("onnx"))
    if (home / "onnx").is_dir():
        shutil.copytree(home / "onnx", dst / "onnx", copy_function=os.link)
    return dst


def _dead_pid() -> int:
    """A pid no process can have (above the kernel's pid_max, 2**22 at most)."""
    pid = 2**22 + 4321
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            pass
        pid += 1


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging when something that must be fast is not (the unfixed tokenizer took minutes)."""
    def stop(_sig: int, _frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _search(home: Path, encoder, rerank: bool = True, **kwargs):  # noqa: ANN001, ANN202
    """(hits, notices) of one text->image query in a fresh process-like open; `encoder` None: auto backend."""
    lines: list[str] = []
    s = (open_index(home, reuse=encoder, notify=lines.append) if encoder is not None
         else open_index(home, device="cpu", notify=lines.append))
    try:
        rr = open_reranker(s, True, lines.append) if rerank else None
        q = s.embed_query(text=kwargs.get("text", TEXT), image=kwargs.get("image"), with_tokens=rr is not None)
        hits = rr.search_images(q, GOOD, rerank_k=32) if rr is not None else s.search_images(q.vector, GOOD)
        return hits, lines, s.encoder
    finally:
        s.store.close()


def _caption(home: Path, encoder, image: bytes):  # noqa: ANN001, ANN202
    lines: list[str] = []
    s = open_index(home, reuse=encoder, notify=lines.append)
    try:
        rr = open_reranker(s, True, lines.append)
        assert rr is not None
        return rr.caption(image, 20, rerank_k=32), lines
    finally:
        s.store.close()


def _same(got, want) -> None:  # noqa: ANN001
    assert [h.id for h in got] == [h.id for h in want]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=2e-3)


# ---- 3: damaged token-cache segments -------------------------------------------------------------------
def _same_set(got, want) -> None:  # noqa: ANN001
    """The candidate set and its dense order are the undamaged ones (reranking only reorders)."""
    assert sorted((h.id, h.dense_rank) for h in got) == sorted((h.id, h.dense_rank) for h in want)
    np.testing.assert_allclose(sorted(h.dense_score for h in got), sorted(h.dense_score for h in want), atol=1e-6)


@pytest.mark.parametrize("part", ["data", "keys"])
def test_truncated_image_segment_is_dropped_and_the_query_answers(built_index, encoder, tmp_path, part) -> None:
    """Dropped entries are encoded again from the thumbnails, as for an index without them (by design, see
    README "Reranking"), so the results equal those of a copy where the segment is simply missing; against
    the undamaged copy the set and dense order are equal, and the reranked scores move by the thumbnails'
    JPEG difference only."""
    home = _copy(built_index, tmp_path / "home")
    missing = _copy(built_index, tmp_path / "missing")
    want, quiet, _ = _search(built_index, encoder)
    assert quiet == []
    seg = sorted(cache_dir(home, encoder.fingerprint, "image").glob(f"seg-*.{part}.npy"))[0]
    for p in cache_dir(missing, encoder.fingerprint, "image").glob(seg.name.split(".")[0] + ".*"):
        p.unlink()
    without, _, _ = _search(missing, encoder)
    _cut(seg)
    got, lines, _ = _search(home, encoder)
    _same(got, without)
    _same_set(got, want)
    np.testing.assert_allclose([h.score for h in sorted(got, key=lambda h: h.id)],
                               [h.score for h in sorted(want, key=lambda h: h.id)], atol=0.03)
    assert len(lines) == 1 and "token cache" in lines[0] and "damaged" in lines[0], lines
    assert seg.name.split(".")[0] in lines[0] and "bytes" in lines[0]
    other = seg.with_name(seg.name.replace(f".{part}.", ".keys." if part == "data" else ".data."))
    assert not seg.exists() and not other.exists()
    again, lines, _ = _search(home, encoder)
    assert lines == []
    _same(again, got)


@pytest.mark.parametrize("part", ["data", "keys"])
def test_truncated_caption_segment_is_dropped_and_captions_answer(built_index, encoder, photos, tmp_path,
                                                                 part) -> None:
    home = _copy(built_index, tmp_path / "home")
    image = photos["img03"].read_bytes()
    want, _ = _caption(built_index, encoder, image)
    seg = sorted(cache_dir(home, encoder.fingerprint, "text").glob(f"seg-*.{part}.npy"))[-1]
    _cut(seg, 0.7)
    got, lines = _caption(home, encoder, image)
    _same(got, want)
    assert len(lines) == 1 and "token cache" in lines[0] and "damaged" in lines[0], lines
    again, lines = _caption(home, encoder, image)
    assert lines == []
    _same(again, want)


def test_segment_that_cannot_be_mapped_is_dropped_at_read(tmp_path) -> None:
    """Cut after the cache was opened (its sizes were fine then): mapping fails at the first read."""
    rng = np.random.default_rng(0)
    w = TokenCacheWriter(tmp_path, FP, "image")
    w.add([f"{1:064x}", f"{2:064x}"], [rng.normal(size=(3, 8)).astype(np.float32) for _ in range(2)])
    w.flush()
    lines: list[str] = []
    cache = TokenCache.open(tmp_path, FP, "image", notify=lines.append)
    assert len(cache) == 2 and lines == []
    data = next(cache_dir(tmp_path, FP, "image").glob("seg-*.data.npy"))
    _cut(data, 0.6)
    assert cache.get([f"{1:064x}", f"{2:064x}"]) == [None, None]
    assert len(lines) == 1 and "damaged" in lines[0] and "mapped" in lines[0]
    assert len(cache) == 0 and not data.exists()


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_search_answers_over_a_truncated_segment(home: Path, tmp_path) -> None:
    """The reported symptom: `search` failed with an internal error for good."""
    copy = _copy(home, tmp_path / "home")
    missing = _copy(home, tmp_path / "missing")
    folder = next((copy / "tokens").iterdir()).name
    seg = sorted((copy / "tokens" / folder / "image").glob("seg-*.data.npy"))[0]
    for p in (missing / "tokens" / folder / "image").glob(seg.name.split(".")[0] + ".*"):
        p.unlink()
    _cut(seg)
    want = json.loads(run_cli("search", TEXT, "--json", "--rerank", home=home).stdout)
    without = json.loads(run_cli("search", TEXT, "--json", "--rerank", home=missing).stdout)
    got = run_cli("search", TEXT, "--json", "--rerank", home=copy)
    assert got.returncode == 0, got.stderr
    hits = json.loads(got.stdout)
    assert [h["id"] for h in hits] == [h["id"] for h in without]
    assert sorted((h["id"], h["dense_rank"]) for h in hits) == sorted((h["id"], h["dense_rank"]) for h in want)
    notes = [ln for ln in got.stderr.splitlines() if ln.strip()]
    assert len(notes) == 1 and "damaged" in notes[0], got.stderr
    again = run_cli("search", TEXT, "--json", "--rerank", home=copy)
    assert again.returncode == 0 and again.stderr.strip() == "", again.stderr
    assert [h["id"] for h in json.loads(again.stdout)] == [h["id"] for h in hits]


# ---- 3: damaged exports ----------------------------------------------------------------------------------
@pytest.fixture
def remake(first_export: Path, linked_cache: Path, encoder, monkeypatch):  # noqa: ANN001, ANN201
    """In an export cache of this test's own (linked_cache: the good export, linked, so the test may damage
    it): the model on torch without reloading it, and a re-export that installs a copy of the good export
    (real exports are tested in test_onnx_export.py); returns the homes it exported for."""
    made: list[Path] = []

    def export_copy(enc, into):  # noqa: ANN001, ANN202
        final = export_dir(enc.fingerprint)
        tmp = exports_root() / f".{final.name}.{os.getpid()}.copy.tmp"
        shutil.copytree(first_export, tmp, copy_function=os.link)
        ox._install(tmp, final, enc.fingerprint)
        made.append(Path(into))
        return final

    monkeypatch.setattr(query_open, "open_model", lambda *_a, **_k: encoder)
    monkeypatch.setattr(ox, "export_onnx", export_copy)
    return made


@pytest.mark.parametrize(("name", "query"), [("text.onnx", "text"), ("image.onnx.data", "image")])
def test_truncated_export_is_dropped_remade_and_torch_answers(home: Path, photos, tmp_path, remake, name,
                                                              query) -> None:
    kwargs = {"text": TEXT} if query == "text" else {"text": "", "image": photos["img05"].read_bytes()}
    want, quiet, enc = _search(home, None, rerank=query == "text", **kwargs)
    assert isinstance(enc, OnnxEncoder) and quiet == []
    copy = _copy(home, tmp_path / "home")
    _cut(export_dir(enc.fingerprint) / name, 0.3)
    got, lines, enc = _search(copy, None, rerank=query == "text", **kwargs)
    assert isinstance(enc, TorchEncoder)
    _same(got, want)
    assert len(lines) == 1 and "damaged" in lines[0] and name in lines[0] and "torch" in lines[0], lines
    assert remake == [copy]
    again, lines, enc = _search(copy, None, rerank=query == "text", **kwargs)
    assert isinstance(enc, OnnxEncoder) and lines == []
    _same(again, want)
    assert [p.name for p in exports_root().iterdir()] == [export_key(enc.fingerprint)]
    assert not (copy / "onnx").exists()


def test_export_onnx_runtime_cannot_load_falls_back_mid_query(home: Path, tmp_path, remake) -> None:
    want, _, _ = _search(home, None)
    copy = _copy(home, tmp_path / "home")
    _zero(export_dir(_fingerprint(home)) / "text.onnx")
    got, lines, enc = _search(copy, None)
    assert isinstance(enc, OnnxEncoder) and isinstance(enc.instead, TorchEncoder)  # opened fine, failed at use
    _same(got, want)
    assert len(lines) == 1 and "damaged" in lines[0] and "text.onnx cannot be loaded" in lines[0], lines
    assert remake == [copy]
    again, lines, enc = _search(copy, None)
    assert isinstance(enc, OnnxEncoder) and enc.instead is None and lines == []
    _same(again, want)


def _fingerprint(home: Path) -> Fingerprint:
    from retrieval.store import Store

    with Store.open(home) as store:
        assert store.fingerprint is not None
        return store.fingerprint


# ---- 10: a full disk ---------------------------------------------------------------------------------------
def test_full_disk_in_the_token_cache_says_so_and_keeps_what_was_committed(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(1)
    w = TokenCacheWriter(tmp_path, FP, "text")
    w.add([f"{1:064x}"], [rng.normal(size=(4, 8)).astype(np.float32)])
    w.flush()
    folder = cache_dir(tmp_path, FP, "text")
    save = np.save

    def full(file, arr, **kwargs):  # noqa: ANN001, ANN003, ANN202 - half written, then ENOSPC
        file.write(b"\x93NUMPY half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    w.add([f"{2:064x}"], [rng.normal(size=(4, 8)).astype(np.float32)])
    with pytest.raises(DiskFull) as e:
        w.flush()
    assert isinstance(e.value, UserError) and "disk full" in str(e.value) and str(folder) in str(e.value)
    assert "kept" in str(e.value)
    lines: list[str] = []
    cache = TokenCache.open(tmp_path, FP, "text", notify=lines.append)
    assert cache.put([f"{3:064x}"], [rng.normal(size=(2, 8)).astype(np.float32)]) is False  # a query's addition
    assert len(lines) == 1 and "disk full" in lines[0] and str(folder) in lines[0]
    monkeypatch.setattr(np, "save", save)
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == []
    cache = TokenCache.open(tmp_path, FP, "text")
    assert len(cache) == 1 and f"{1:064x}" in cache


def test_writer_sweeps_temporary_files_of_dead_writers(tmp_path) -> None:
    folder = cache_dir(tmp_path, FP, "image")
    folder.mkdir(parents=True)
    dead, live = _dead_pid(), os.getpid()
    orphans = [folder / f"seg-1-{dead}.data.npy.{dead}.tmp", folder / f"seg-2-{dead}.data.npy"]
    now = time.time_ns()
    alive = [folder / f"seg-{now}-{live}.keys.npy.{live}.tmp", folder / f"seg-{now}-{live}.data.npy"]
    for p in orphans + alive:
        p.write_bytes(b"partial")
    TokenCacheWriter(tmp_path, FP, "image")
    assert [p.exists() for p in orphans] == [False, False]
    assert [p.exists() for p in alive] == [True, True]  # a live writer's segment in progress


@pytest.fixture
def failing_export(built_index: Path, encoder, tmp_path, own_cache, monkeypatch):  # noqa: ANN001, ANN201
    """A home without an export (and an empty cache) whose exports fail with a full disk; returns (home,
    attempts)."""
    import torch

    attempts: list[str] = []

    def fake_export(_module, _args, path, **_k):  # noqa: ANN001, ANN003, ANN202
        Path(path).write_bytes(b"a graph")

    def full(raw: Path, dst: Path) -> None:
        attempts.append(str(dst))
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(torch.onnx, "export", fake_export)
    monkeypatch.setattr(ox, "_optimise", full)
    monkeypatch.setattr(query_open, "open_model", lambda *_a, **_k: encoder)
    return _copy(built_index, tmp_path / "home"), attempts


@pytest.mark.slow
def test_full_disk_export_says_so_and_queries_back_off(failing_export, encoder) -> None:
    home, attempts = failing_export
    want, _, _ = _search(home, encoder, rerank=False)
    got, lines, enc = _search(home, None, rerank=False)
    assert isinstance(enc, TorchEncoder) and len(attempts) == 1
    _same(got, want)
    assert len(lines) == 2 and "no ONNX export" in lines[0], lines
    assert "disk full" in lines[1] and str(exports_root()) in lines[1] and "torch" in lines[1]
    assert "nothing of it was kept" in lines[1]
    marker = failure_marker(encoder.fingerprint)
    assert [p.name for p in exports_root().iterdir()] == [marker.name]  # no temporary folder (or lock) left
    got, lines, enc = _search(home, None, rerank=False)  # backs off: no second 10 s export
    assert isinstance(enc, TorchEncoder) and len(attempts) == 1
    _same(got, want)
    assert len(lines) == 1 and "disk full" in lines[0] and "tried again" in lines[0], lines
    # an hour later, or with another onnxruntime, a query tries again; `crossmodal index` always does
    record = json.loads(marker.read_text())
    for change in ({"time": record["time"] - 2 * 3600}, {"versions": {**record["versions"], "onnxruntime": "0"}}):
        marker.write_text(json.dumps({**record, **change}))
        _search(home, None, rerank=False)
        assert len(attempts) == 2
        attempts.clear()
        attempts.append("first")
    lines = []
    assert ox.ensure_export(encoder, home, lines.append) is None and len(attempts) == 2
    assert len(lines) == 1 and "disk full" in lines[0]


# ---- 16: folders of killed exporters ---------------------------------------------------------------------
@pytest.mark.subprocess
def test_info_lists_and_removes_leftovers_of_dead_exporters(built_index: Path, encoder, tmp_path,
                                                            own_cache) -> None:
    home = _copy(built_index, tmp_path / "home")
    key = export_key(encoder.fingerprint)
    dead = exports_root() / f".{key}.{_dead_pid()}.k1ll3d.tmp"  # in the shared cache, where exports are made
    live = exports_root() / f".{key}.{os.getpid()}.busy.tmp"  # this process is alive: not a leftover
    for p in (dead, live):
        (p / "sub").mkdir(parents=True)
        (p / "text.onnx.data").write_bytes(bytes(1_000_000))
        (p / "sub" / "x").write_bytes(bytes(234))
    r = run_cli("info", "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["onnx_leftovers"] == [{"path": str(dead), "bytes": 1_000_234, "removed": True}]
    assert not dead.exists() and live.exists()
    shutil.copytree(live, dead)
    r = run_cli("info", home=home)
    assert r.returncode == 0 and dead.name in r.stdout and "1.0 MB" in r.stdout and "removed" in r.stdout
    assert not dead.exists() and live.exists()


def test_leftovers_on_a_read_only_home_are_only_listed(tmp_path, monkeypatch) -> None:
    import retrieval.model.onnx_upkeep as upkeep

    root = tmp_path / "onnx"
    dead = root / f".abcd.{_dead_pid()}.x.tmp"
    dead.mkdir(parents=True)
    (dead / "f").write_bytes(b"12345")
    monkeypatch.setattr(upkeep.shutil, "rmtree", lambda *_a, **_k: None)  # what a read-only folder does
    assert [(x.path, x.bytes, x.removed) for x in sweep_exports(root)] == [(dead, 5, False)]
    assert dead.exists()


# ---- 7: texts too long to tokenize naively ------------------------------------------------------------------
def _long_texts() -> dict[str, str]:
    rng = np.random.default_rng(7)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    return {"100 KB query without spaces": "".join(rng.choice(letters, 100_000)),
            "1 MB caption line": "".join(rng.choice(list("!?.,;:-_/#@"), 3_000)) + "".join(
                rng.choice(letters + list("éüß"), 1_000_000))}


@pytest.mark.parametrize("which", ["100 KB query without spaces", "1 MB caption line"])
def test_long_texts_tokenize_fast_as_open_clip_tokenizes_the_capped_text(which: str) -> None:
    light = BpeTokenizer(default_bpe())
    text = _long_texts()[which]
    with _deadline(30):
        started = time.perf_counter()
        got = light([text])
        assert time.perf_counter() - started < 5
    np.testing.assert_array_equal(got, SimpleTokenizer()([cap_text(text)]).numpy())
    assert got[0, -1] == light.eot_token_id


def test_caps_leave_every_reachable_token_alone() -> None:
    """Texts whose first 77 tokens lie within the caps get open_clip's ids of the uncut text."""
    texts = ["x" * 10_000, "😍" * 3_000, "ab" * 3_000, "hello world, " * 5_000, "日本語" * 3_000,
             " ".join(f"word{i}" for i in range(5_000)), "a" + " " * 4_000 + "b"]
    assert [cap_text(t) != t for t in texts] == [True] * 6 + [False]  # cut, yet the same ids
    np.testing.assert_array_equal(BpeTokenizer(default_bpe())(texts), SimpleTokenizer()(texts).numpy())


def test_torch_path_caps_before_open_clip(encoder) -> None:
    """TorchEncoder (queries on torch, and what `add-texts` indexes with) cuts the same way, fast."""
    line = _long_texts()["1 MB caption line"]
    with _deadline(60):
        started = time.perf_counter()
        vecs, toks = encoder.encode_texts_with_tokens([line, "a short caption"])
        plain = encoder.encode_texts([line])
        assert time.perf_counter() - started < 10
    capped = cap_text(line)
    ref_vecs, ref_toks = encoder.encode_texts_with_tokens([capped, "a short caption"])
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-5)
    np.testing.assert_allclose(plain, ref_vecs[:1], atol=1e-5)
    assert toks[0].shape == ref_toks[0].shape
    np.testing.assert_array_equal(encoder.tokenizer([capped]).numpy(), BpeTokenizer(default_bpe())([line]))


def test_caption_file_with_a_1mb_line_is_indexed(built_index: Path, encoder, tmp_path) -> None:
    from indexer.texts import add_corpus
    from retrieval.store import Store

    home = _copy(built_index, tmp_path / "home")
    caps = tmp_path / "long.txt"
    caps.write_text("a normal caption\n" + _long_texts()["1 MB caption line"] + "\n")
    with _deadline(60), Store.open(home, writable=True) as store:
        started = time.perf_counter()
        report = add_corpus(store, encoder, caps, corpus="long")
        assert time.perf_counter() - started < 30
    assert report.added == 2

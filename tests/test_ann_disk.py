"""IVF lists on disk through the Store and the CLI (retrieval/store/ann_disk.py): lists beyond the memory
budget are built in shards, merged on disk and mapped; commits go to a delta beside them; the answers are
checked against exact search (numpy brute force), before and after commits, deletions and a reopen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.model.spec import Fingerprint
from retrieval.store import Store, ann, ann_disk
from tests.helpers import run_cli
from tests.test_ann import DIM, clustered, grown_home, records

BUDGET = 1 << 20  # 1 MB: 8-bit codes of more than 11,650 64-d vectors (72 bytes each) exceed 80% of it


def brute_top(st: Store, q: np.ndarray, k: int = 10) -> np.ndarray:
    ids, x = st.vectors("image")
    return ids[np.argsort(-(q @ np.asarray(x).T), axis=1, kind="stable")[:, :k]]


def files(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "vectors").glob("image-ann-*"))


@pytest.fixture
def disk_home(tmp_path: Path) -> tuple[Path, np.ndarray]:
    home = tmp_path / "home"
    with Store.open(home, create=True, writable=True) as st:
        st.bind_model(Fingerprint("test", "test", "sha256:test", DIM))
        st.add_images(records(0, 16_000), POOL[:16_000])
        st.set_index_type("ivfsq", budget=BUDGET)
    return home, POOL[16_000:16_100]


POOL = clustered(21_000, seed=3)  # stored, queries (not stored), then what later commits add: one distribution


def more(start: int, n: int) -> np.ndarray:
    return POOL[16_100 + start:16_100 + start + n]


def test_lists_beyond_the_budget_are_merged_on_disk_and_answer_like_exact_search(
        disk_home: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    home, q = disk_home
    assert ann.lists_on_disk("IVF128_HNSW32,SQ8", 16_000, DIM, BUDGET)
    assert not ann.lists_on_disk("IVF128_HNSW32,SQ8", 10_000, DIM, BUDGET)
    with Store.open(home) as st:
        state = st.ann_state["image"]
        info = st.ann_info("image")
        assert state.on_disk and state.delta == 1 and isinstance(st.ann["image"], ann_disk.SplitIndex)
        assert "lists on disk" in info["describe"] and "problem" not in info
        assert state.recall is not None and state.recall >= ann.TARGET_RECALL
        split = st.ann["image"]
        assert split.base.ntotal + split.delta.ntotal == 16_000 and split.delta.ntotal == 400  # the tuning sample
        lists = faiss_lists(split.base)
        assert lists == "OnDiskInvertedLists"  # mapped from the .ivfdata file, not read into memory
        assert sorted(ann_disk.held_ids(split).tolist()) == sorted(st.vectors("image")[0].tolist())
        _, found = st.search("image", q, 10)
        assert ann.recall_at(found, brute_top(st, q)) >= 0.9
        scores, _ = st.search("image", q, 10, restrict=st.vectors("image")[0])  # filtered queries stay exact
        x = np.asarray(st.vectors("image")[1])
        assert np.allclose(scores, -np.sort(-(q @ x.T), axis=1)[:, :10], atol=1e-5)
    assert files(home) == [f"image-ann-{state.gen}.delta-1.faiss", f"image-ann-{state.gen}.faiss",
                           f"image-ann-{state.gen}.faiss.ivfdata"]
    # The shards a build writes are gone; the build held one shard at a time (rows per shard from the budget).
    assert ann_disk.shard_rows(ann.lists_bytes(state.factory, DIM, 1), BUDGET) == 10_000
    monkeypatch.setattr(ann_disk, "SHARD_SHARE", 64)  # more, smaller shards: the same answers
    with Store.open(home, writable=True) as st:
        st.set_index_type("ivfsq", budget=BUDGET, force=True)
        assert st.ann_state["image"].on_disk
        _, found = st.search("image", q, 10)
        assert ann.recall_at(found, brute_top(st, q)) >= 0.9


def faiss_lists(index: object) -> str:
    import faiss

    return type(faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)).__name__


def test_commits_go_to_the_delta_and_deletions_are_hidden(disk_home: tuple[Path, np.ndarray]) -> None:
    home, q = disk_home
    lists = next((home / "vectors").glob("*.ivfdata"))
    before = (lists.stat().st_ino, lists.stat().st_mtime_ns)
    new = more(0, 300)
    with Store.open(home, writable=True) as st:
        gen = st.ann_state["image"].gen
        added = st.add_images(records(50_000, 300), new)
        assert st.ann_state["image"].gen == gen and st.ann_state["image"].delta == 2
        st.remove_images(added[:100] + [1, 2, 3])
        _, found = st.search("image", new[100:110], 1)
        assert found[:, 0].tolist() == added[100:110]  # each new vector finds itself
        assert st.ann_info("image")["tombstones"] == 103
    assert (lists.stat().st_ino, lists.stat().st_mtime_ns) == before  # the merged lists were not rewritten
    assert files(home) == [f"image-ann-{gen}.delta-1.faiss", f"image-ann-{gen}.delta-2.faiss",
                           f"image-ann-{gen}.faiss", f"image-ann-{gen}.faiss.ivfdata"]
    with Store.open(home) as st:  # a reader: the same split index, the same tombstones hidden
        _, found = st.search("image", np.vstack([q, new[:100]]), 10)
        gone = set(added[:100]) | {1, 2, 3}
        assert not gone & set(found.ravel().tolist())
        assert ann.recall_at(found, brute_top(st, np.vstack([q, new[:100]]))) >= 0.9
        assert st.count("image") == 16_000 + 300 - 103


def test_a_grown_delta_is_merged_by_a_rebuild(disk_home: tuple[Path, np.ndarray]) -> None:
    home, q = disk_home
    with Store.open(home, writable=True) as st:
        gen = st.ann_state["image"].gen
        base = int(st.ann["image"].base.ntotal)
        st.add_images(records(50_000, 3000), more(0, 3000))  # delta 3,400 of 15,600: below a quarter
        assert st.ann_state["image"].gen == gen
        st.add_images(records(60_000, 1000), more(3000, 1000))  # 4,400 > a quarter: rebuilt
        state = st.ann_state["image"]
        assert state.gen > gen and state.on_disk and state.delta == 1 and state.built_n == 20_000
        assert int(st.ann["image"].base.ntotal) > base
    names = files(home)
    assert f"image-ann-{state.gen}.faiss.ivfdata" in names and f"image-ann-{gen}.faiss.ivfdata" in names
    with Store.open(home, writable=True) as st:  # the next commit drops the generation before the last
        st.add_images(records(70_000, 10), more(4000, 10))
    assert not [n for n in files(home) if n.startswith(f"image-ann-{gen}.")]
    with Store.open(home) as st:
        _, found = st.search("image", q, 10)
        assert ann.recall_at(found, brute_top(st, q)) >= 0.9


def test_a_budget_that_holds_the_lists_brings_them_back_to_memory(disk_home: tuple[Path, np.ndarray]) -> None:
    home, _ = disk_home
    with Store.open(home, writable=True) as st:
        st.set_index_type("ivfsq", budget=64 << 20)
        assert not st.ann_state["image"].on_disk and not isinstance(st.ann["image"], ann_disk.SplitIndex)
        st.add_images(records(50_000, 10), more(0, 10))
    assert not list((home / "vectors").glob("*.ivfdata*")) and not list((home / "vectors").glob("*delta*"))


def test_lost_lists_mean_exact_search_until_repair(disk_home: tuple[Path, np.ndarray]) -> None:
    home, q = disk_home
    next((home / "vectors").glob("*.ivfdata")).unlink()
    with Store.open(home) as st:
        assert "unreadable" in st.ann_info("image")["problem"] and st.ann["image"] is None
        scores, _ = st.search("image", q, 10)  # exact search serves
        x = np.asarray(st.vectors("image")[1])
        assert np.allclose(scores, -np.sort(-(q @ x.T), axis=1)[:, :10], atol=1e-5)
    with Store.open(home, writable=True) as st:
        st.repair()
    with Store.open(home) as st:
        assert "problem" not in st.ann_info("image") and st.ann_state["image"].on_disk


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_reindex_with_a_small_budget_puts_the_lists_on_disk(tmp_path: Path, built_index: Path, encoder) -> None:
    dim = encoder.fingerprint.dim
    home = grown_home(tmp_path, built_index, dim, int(0.8 * BUDGET / (dim + 8)) + 2000)  # lists > 80% of 1 MB
    r = run_cli("reindex", "--index-type", "ivfsq", "--memory-budget", "1M", "--json", home=home)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)["image"]
    assert "lists on disk" in out["describe"] and out["recall_at_10"] >= ann.TARGET_RECALL
    r = run_cli("info", "--json", home=home)
    vi = json.loads(r.stdout)["vector_index"]["image"]
    assert vi["ann_lists_on_disk"].endswith(".ivfdata") and vi["ann_bytes"] > 0.8 * BUDGET
    nlist = int(out["factory"].split("_")[0][3:])
    overlap = 0
    for text in ("a red square", "a blue circle", "green stripes"):
        common = ["search", text, "-k", "5", "--no-rerank", "--json", "--backend", "torch"]
        tuned = run_cli(*common, home=home)  # the tuned nprobe (tuned with image queries: no vocabulary here)
        every = run_cli(*common, "--nprobe", str(nlist), home=home)  # every list probed: 8-bit codes decide
        exact = run_cli(*common, "--exact", home=home)
        for r in (tuned, every, exact):
            assert r.returncode == 0 and len(json.loads(r.stdout)) == 5, r.stderr
            assert "ondisk" not in r.stderr  # faiss's own chatter about its lists is not the user's business
        ids = lambda r: [h["id"] for h in json.loads(r.stdout)]  # noqa: E731
        overlap += len(set(ids(every)) & set(ids(exact)))
    assert overlap >= 13  # of 15: only the 8-bit codes' rounding differs from exact search

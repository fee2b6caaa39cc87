"""IVF shards merged on disk answer exactly as one IVF index built in memory from the same vectors and
centroids; the merged lists are memory-mapped, survive a moved folder, and tune like any landed index."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from retrieval.store import ann, ivf_shards

FACTORIES = ["IVF64,SQ8", "IVF64_HNSW32,Flat", "IVF64,PQ8np"]


def _data(n: int = 12_000, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + 0.4 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = centres[rng.integers(0, 40, 200)] + 0.4 * rng.standard_normal((200, dim)).astype(np.float32)
    return x, q / np.linalg.norm(q, axis=1, keepdims=True)


def _shards(tmp_path: Path, trained, x: np.ndarray, ids: np.ndarray, k: int = 4) -> list[Path]:  # noqa: ANN001
    bounds = np.linspace(0, len(x), k + 1).astype(int)
    return [ivf_shards.write(ivf_shards.build_shard(trained, ids[a:b], x[a:b]), tmp_path / f"shard{i}.faiss")
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]


@pytest.mark.parametrize("factory", FACTORIES)
def test_merged_on_disk_answers_like_one_index_in_memory(tmp_path: Path, factory: str) -> None:
    x, q = _data()
    ids = np.arange(len(x), dtype=np.int64) * 7 + 3  # catalog ids need not be dense
    trained = ivf_shards.train(factory, x[:4000])
    whole = ivf_shards.build_shard(trained, ids, x)  # one index, every vector added at once
    paths = _shards(tmp_path, trained, x, ids)
    merged = ivf_shards.open_merged(ivf_shards.merge_on_disk(trained, paths, tmp_path / "merged.faiss"))
    in_memory = ivf_shards.merge_in_memory(trained, paths)
    assert merged.ntotal == whole.ntotal == in_memory.ntotal == len(x)
    for nprobe in (1, 8, 64):
        params = ann.search_params("nprobe", nprobe, None, ann.hnsw_quantizer(whole))
        d0, i0 = whole.search(q, 10, params=params)
        for other in (merged, in_memory):
            d1, i1 = other.search(q, 10, params=params)
            np.testing.assert_array_equal(i1, i0)
            np.testing.assert_array_equal(d1, d0)


def test_merged_lists_are_on_disk_and_follow_the_folder(tmp_path: Path) -> None:
    import faiss

    x, q = _data(6000)
    trained = ivf_shards.train("IVF32,SQ8", x[:3000])
    paths = _shards(tmp_path, trained, x, np.arange(len(x)), k=3)
    (tmp_path / "a").mkdir()
    ivf_shards.merge_on_disk(trained, paths, tmp_path / "a" / "image-ann-1.faiss")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["image-ann-1.faiss", "image-ann-1.faiss.ivfdata"]
    shutil.move(tmp_path / "a", tmp_path / "b")  # the home moved: the lists are found beside the index
    index = ivf_shards.open_merged(tmp_path / "b" / "image-ann-1.faiss")
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.filename.startswith(str(tmp_path / "b"))
    _, found = index.search(q[:5], 5, params=faiss.SearchParametersIVF(nprobe=32))
    _, truth = faiss.knn(q[:5], x, 5, faiss.METRIC_INNER_PRODUCT)
    assert ann.recall_at(found, truth, 5) > 0.9


def test_tuning_applies_to_the_merged_index_with_fp16_rescoring(tmp_path: Path) -> None:
    import faiss

    x, q = _data()
    ids = np.arange(len(x), dtype=np.int64)
    trained = ivf_shards.train("IVF64,PQ8np", x[:4000])
    paths = _shards(tmp_path, trained, x, ids)
    index = ivf_shards.open_merged(ivf_shards.merge_on_disk(trained, paths, tmp_path / "m.faiss"))
    half = ivf_shards.HalfVectors([ivf_shards.HalfVectors.write(tmp_path / f"v{i}.npy", part)
                                   for i, part in enumerate(np.array_split(x, 3))])
    assert len(half) == len(x) and np.abs(half(np.array([5, 9000, 11_999])) - x[[5, 9000, 11_999]]).max() < 1e-3
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    state = ann.tune(index, ann.AnnState(factory="IVF64,PQ8np"), np.zeros(0, np.int64), np.zeros((0, 32), np.float32),
                     exact.search, half, cross={"image": q})
    assert state.param == "nprobe" and state.recall is not None and state.recall >= 0.9
    assert state.refine > 1  # PQ codes alone miss the target: candidates are re-scored from the fp16 store
    _, found = ann.ann_search(index, q, 10, state.param, state.value, state.refine, None, half)
    _, truth = exact.search(q, 10)
    assert ann.recall_at(found, truth) >= 0.9

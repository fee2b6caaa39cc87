"""ANN tuning for the queries an index really gets: text against the image index, images against the caption
index. CLIP's two modalities sit in different regions of the space (the modality gap), so such queries are
out of distribution for the index; tuned only with its own vectors, an index promised 0.95 and gave 0.5-0.8.

The data reproduce the gap: image and text vectors share cluster centres but are pushed apart along one
direction. Recall is always measured against exact search, on fresh queries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import UserError
from retrieval.model.spec import Fingerprint
from retrieval.store import Store, TextRecord, ann
from retrieval.store.records import ImageRecord, QueryOptions
from tests.helpers import run_cli

DIM = 32
CLUSTERS = 200
_rng = np.random.default_rng(0)
CENTRES = _rng.normal(size=(CLUSTERS, DIM))
GAP = _rng.normal(size=DIM)
GAP /= np.linalg.norm(GAP)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def modality(n: int, seed: int, side: float) -> np.ndarray:
    """Unit vectors around shared centres, shifted by `side` along the gap (+ images, - texts)."""
    rng = np.random.default_rng(seed)
    c = _unit(CENTRES)[rng.integers(0, CLUSTERS, n)]
    return _unit(c + 0.35 * rng.normal(size=(n, DIM)) + side * 1.2 * GAP)


def images(n: int, seed: int) -> np.ndarray:
    return modality(n, seed, +1.0)


def texts(n: int, seed: int) -> np.ndarray:
    return modality(n, seed, -1.0)


def image_records(n: int) -> list[ImageRecord]:
    return [ImageRecord(path=f"/lib/{i:06d}.jpg", sha256=f"{i:064x}", bytes=1, mtime=0.0, width=1, height=1)
            for i in range(n)]


def text_records(n: int) -> list[TextRecord]:
    return [TextRecord(corpus="c", row=i, text=f"caption {i}", sha256=f"{i:064x}") for i in range(n)]


def make(home: Path, n_images: int, n_texts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A store with image and caption vectors; returns (image ids, image vectors, text ids, text vectors)."""
    x, t = images(n_images, 1), texts(n_texts, 2)
    with Store.open(home, create=True, writable=True) as st:
        st.bind_model(Fingerprint("test", "test", "sha256:test", DIM))
        ids = st.add_images(image_records(n_images), x)
        tids = st.add_texts(text_records(n_texts), t) if n_texts else []
    return np.asarray(ids), x, np.asarray(tids, dtype=np.int64), t


def exact_top(ids: np.ndarray, x: np.ndarray, q: np.ndarray, k: int = 10) -> np.ndarray:
    return ids[np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]]


def fresh_recall(home: Path, modality_searched: str, q: np.ndarray, ids: np.ndarray, x: np.ndarray) -> float:
    with Store.open(home) as st:
        assert st.ann[modality_searched] is not None  # the ANN index answers, not exact search
        _, found = st.search(modality_searched, q, 10)
    return ann.recall_at(found, exact_top(ids, x, q))


@pytest.mark.slow
def test_the_gap_is_real_here(tmp_path: Path) -> None:
    """The oracle for the tests below: tuned with image queries only (the old way), an HNSW index over these
    images misses text queries' neighbours far below its promise; tuned with text queries too, it keeps it."""
    x = images(20_000, 1)
    ids = np.arange(len(x), dtype=np.int64)
    import faiss

    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    flat.add_with_ids(x, ids)
    search = lambda q, k: flat.search(q, min(k, len(x)))  # noqa: E731
    q = texts(1000, 3)
    truth = exact_top(ids, x, q)
    old_index, old = ann.build("HNSW32", ids, x, ann.AnnState(requested="hnsw"), search, flat.reconstruct_batch)
    _, found = ann.ann_search(old_index, q, 10, old.param, old.value, old.refine, None, flat.reconstruct_batch)
    assert old.recall >= 0.95 and ann.recall_at(found, truth) < 0.9  # promised 0.95, gave far less
    new_index, new = ann.build("HNSW32", ids, x, ann.AnnState(requested="hnsw"), search, flat.reconstruct_batch,
                               kind="image", cross={"text": texts(400, 2)})
    _, found = ann.ann_search(new_index, q, 10, new.param, new.value, new.refine, None, flat.reconstruct_batch)
    assert new.value > old.value and set(new.recalls) == {"image", "text"}
    assert ann.recall_at(found, truth) >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hnsw", "ivfsq"])
def test_image_index_is_tuned_with_stored_captions(tmp_path: Path, kind: str) -> None:
    ids, x, _, _ = make(tmp_path, 20_000, 1_000)
    with Store.open(tmp_path, writable=True) as st:
        st.set_index_type(kind, rebuild=True, force=True)
        state = st.ann_state["image"]
        assert set(state.recalls or {}) == {"image", "text"}
        assert min(state.recalls.values()) >= 0.95 and state.recall == min(state.recalls.values())
        assert "text queries" in st.ann_info("image")["describe"]
    assert fresh_recall(tmp_path, "image", texts(1000, 3), ids, x) >= 0.95
    assert fresh_recall(tmp_path, "image", images(1000, 4), ids, x) >= 0.95


@pytest.mark.slow
def test_caption_index_is_tuned_with_stored_images(tmp_path: Path) -> None:
    """`crossmodal caption` queries the caption index with an image vector."""
    _, _, tids, t = make(tmp_path, 1_000, 20_000)
    with Store.open(tmp_path, writable=True) as st:
        st.set_index_type("hnsw", rebuild=True, force=True)
        assert set(st.ann_state["text"].recalls or {}) == {"text", "image"}
    assert fresh_recall(tmp_path, "text", images(1000, 5), tids, t) >= 0.95


@pytest.mark.slow
def test_without_captions_the_query_source_gives_text_queries(tmp_path: Path) -> None:
    """Too few stored captions: the store asks its query source (the CLI gives the built-in vocabulary)."""
    ids, x, _, _ = make(tmp_path, 20_000, 0)
    asked = []

    def source(kind: str) -> np.ndarray | None:
        asked.append(kind)
        return texts(1000, 6) if kind == "text" else None

    with Store.open(tmp_path, writable=True) as st:
        st.set_index_type("hnsw", rebuild=False)
        st.set_index_type("hnsw", rebuild=True, force=True)  # no source: tuned for its own kind only
        assert set(st.ann_state["image"].recalls or {}) == {"image"}
        st.tune_with(source)
        st.set_index_type("hnsw", rebuild=True, force=True)
        assert "text" in asked and set(st.ann_state["image"].recalls or {}) == {"image", "text"}
    assert fresh_recall(tmp_path, "image", texts(1000, 3), ids, x) >= 0.95


def test_an_index_type_that_cannot_be_built_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    make(tmp_path, 2_000, 0)
    with Store.open(tmp_path, writable=True) as st:
        with pytest.raises(UserError, match="needs at least 65,536 vectors"):
            st.set_index_type("IVF65536,Flat")
        assert st.ann_state["image"].requested == "auto"
    with Store.open(tmp_path, writable=True) as st:  # nothing was recorded, and writes still work
        assert st.ann_state["image"].requested == "auto"
        st.add_images([ImageRecord("/lib/new.jpg", "f" * 64, 1, 0.0, 1, 1)], images(1, 9))
        assert st.count("image") == 2_001


def test_a_recorded_type_waits_until_it_can_be_built(tmp_path: Path) -> None:
    """Recorded on a small collection, a fixed list count waits for enough vectors (exact search meanwhile)
    instead of failing every later commit."""
    make(tmp_path, 10, 0)
    with Store.open(tmp_path, writable=True) as st:
        st.set_index_type("IVF4096,Flat")
        assert "waits for 4,096 vectors" in st.ann_info("image")["describe"]
        st.add_images([ImageRecord(f"/lib/more{i}.jpg", f"{i:063x}f", 1, 0.0, 1, 1) for i in range(1_500)],
                      images(1_500, 7))
        assert st.count("image") == 1_510 and st.ann["image"] is None


@pytest.mark.slow
@pytest.mark.subprocess
def test_caption_takes_the_ann_knobs(home: Path, photos: dict[str, Path]) -> None:
    """`caption --exact/--ef-search/--nprobe` like `search`; on an exact caption index a knob is refused."""
    image = str(photos["img02"])
    exact = run_cli("caption", image, "--exact", "--json", home=home)
    assert exact.returncode == 0, exact.stderr
    plain = run_cli("caption", image, "--json", home=home)
    assert [h["id"] for h in json_rows(exact.stdout)] == [h["id"] for h in json_rows(plain.stdout)]
    knob = run_cli("caption", image, "--ef-search", "64", home=home)
    assert knob.returncode == 2 and "needs an ANN index" in knob.stderr and "Traceback" not in knob.stderr


def json_rows(text: str) -> list[dict[str, object]]:
    import json

    return list(json.loads(text))


def test_knob_refusal_names_the_modality_searched(tmp_path: Path) -> None:
    make(tmp_path, 1_500, 1_500)
    with Store.open(tmp_path, writable=True) as st:
        st.set_index_type("hnsw", rebuild=True, force=True)
    with Store.open(tmp_path) as st:
        st.query_options = QueryOptions(nprobe=8)
        with pytest.raises(UserError, match="does not apply"):
            st.search("text", texts(1, 8), 5)


@pytest.mark.slow
def test_auto_falls_back_to_ivf_where_hnsw_misses_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """The quality lab saw HNSW give photo queries 0.65 recall@10 on 237k captions at any efSearch (IVF with
    re-scoring: 0.97). Auto then builds the IVF kind too, keeps the better, remembers the choice (no HNSW
    rebuild on the next commit), and an explicit `hnsw` is still built as asked."""
    from dataclasses import replace

    from retrieval.store import ann_choice

    monkeypatch.setattr(ann_choice, "FLAT_MAX", 2_000)  # auto picks HNSW from 2,000 vectors
    real = ann.build

    def weak_hnsw(factory: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        index, state = real(factory, *args, **kwargs)
        if ann.family(factory) == "hnsw":  # as on the lab's caption index
            state = replace(state, recall=0.65, recalls={"image": 0.65, "text": 0.99})
        return index, state

    monkeypatch.setattr(ann, "build", weak_hnsw)
    make(tmp_path, 5_000, 500)
    with Store.open(tmp_path, writable=True) as st:
        state = st.ann_state["image"]
        assert ann.family(state.factory) == "ivf" and state.fallback == "ivfsq" and state.recall >= 0.95
        assert "HNSW missed the recall target" in st.ann_info("image")["describe"]
        st.add_images(image_records(6_000)[5_000:], images(1_000, 7))  # grows 20%: no type change
        again = st.ann_state["image"]
        assert again.factory == state.factory and again.fallback == "ivfsq"
        st.set_index_type("hnsw", rebuild=True, force=True)
        assert ann.family(st.ann_state["image"].factory) == "hnsw" and st.ann_state["image"].fallback is None
        st.set_index_type("flat", rebuild=True, force=True)
        assert st.ann_info("image")["describe"] == "flat (exact)"

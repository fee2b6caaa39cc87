"""The quality lab's product-path measures: searches through `open_index` (what `search`, `caption` and the
page call) on homes the real CLI built, scored by scene and by own item; and the large collection, where the
test scenes hide among 200,000+ distractor scenes and every index type answers at its tuned setting.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.distractors import Distractors
from training.lab_metrics import SceneTruth


@dataclass
class TestSet:
    """The test split as the lab queries it: photo files, captions, and who belongs to whom."""

    files: list[Path]
    captions: list[str]
    caption_file: list[str]  # each caption's own photo (file name)
    own_captions: dict[str, set[str]]  # file name -> its captions


def _keys(searcher: Any, ids: np.ndarray, key: Any) -> list[list[str]]:
    """key(item) of each hit's catalog row, in rank order (-1 and rows gone dropped)."""
    items = searcher.store.items([int(i) for row in ids for i in row if i >= 0])
    return [[key(items[int(i)]) for i in row if i >= 0 and int(i) in items] for row in ids]


def photo_keys(searcher: Any, ids: np.ndarray) -> list[list[str]]:
    """File names of image ids."""
    return _keys(searcher, ids, lambda item: Path(item.path).name)


def caption_keys(searcher: Any, ids: np.ndarray) -> list[list[str]]:
    """Caption texts of text ids."""
    return _keys(searcher, ids, lambda item: str(item.text))


def query_vectors(searcher: Any, test: TestSet) -> tuple[np.ndarray, np.ndarray]:
    """(caption query vectors, photo query vectors) through the query path: text encoder, and the photo's
    bytes decoded and embedded as `caption PHOTO` does."""
    text = searcher.encoder.encode_texts(test.captions, batch_size=256)
    photos = np.stack([searcher.query_vector(image=p.read_bytes()) for p in test.files])
    return text.astype(np.float32), photos.astype(np.float32)


def search_recall(searcher: Any, truth: SceneTruth, test: TestSet, corpus_restrict: bool = True,
                  reranker: Any = None, rerank_k: int = 32) -> dict[str, Any]:
    """R@K both ways through the home's searcher (and its reranker for text queries when given)."""
    tq, iq = query_vectors(searcher, test)
    if reranker is None:
        found = photo_keys(searcher, searcher.store.search("image", tq, 10)[1])
    else:
        from retrieval.query.search import QueryVector

        found = []
        for text, v in zip(test.captions, tq, strict=True):
            hits = reranker.search_images(QueryVector(v, text), 10, None, rerank_k)
            found.append([Path(h.item.path).name for h in hits])
    restrict = searcher.store.text_ids("test") if corpus_restrict else None
    caps = caption_keys(searcher, searcher.store.search("text", iq, 10, restrict=restrict)[1])
    names = [p.name for p in test.files]
    t2i = truth.text_to_image(test.captions, found, test.caption_file)
    i2t = truth.image_to_text(names, caps, [test.own_captions[n] for n in names])
    return {name: {"t2i": t2i[name], "i2t": i2t[name]} for name in ("scene", "own")}


# ---- the large collection ---------------------------------------------------------------------------
def add_distractors(home: Path, d: Distractors, log: Any = print) -> None:
    """Add the distractors' vectors to a home the CLI built (once: a meta key remembers it), as photos under
    a virtual folder and captions of a 'distractors' corpus. Their files do not exist: nothing reads them."""
    from retrieval.store import Store
    from retrieval.store.records import ImageRecord, TextRecord

    with Store.open(home, writable=True) as store:
        if store.meta.get("lab_distractors") == str(len(d)):
            return
        t0 = time.perf_counter()
        step = 50_000
        for s in range(0, len(d), step):
            recs = [ImageRecord(path=f"/quality-lab/distractors/{i:07d}.jpg",
                                sha256=hashlib.sha256(f"distractor {i}".encode()).hexdigest(), bytes=1, mtime=0.0,
                                width=96, height=96) for i in range(s, min(len(d), s + step))]
            store.add_images(recs, d.image_vectors[s:s + len(recs)])
        for s in range(0, len(d.texts), step):
            texts = d.texts[s:s + step]
            store.add_texts([TextRecord("distractors", s + j, t, hashlib.sha256(t.encode()).hexdigest())
                             for j, t in enumerate(texts)], d.text_vectors[s:s + len(texts)])
        store.set_meta("lab_distractors", str(len(d)))
        log(f"large collection: {len(d):,} distractor photos and {len(d.texts):,} captions added "
            f"in {time.perf_counter() - t0:.0f} s")


def ann_rows(home: Path, truth: SceneTruth, test: TestSet, types: Sequence[str], reindex: Any,
             log: Any = print) -> list[dict[str, Any]]:
    """Per index type: `reindex` it through the CLI, then R@K both ways at its tuned setting, agreement with
    exact search (recall@10 of the exact top 10) and ms per query, for text queries against the photo index
    and photo queries against the caption index (cross-modal, out of distribution for either index)."""
    from retrieval.query.open import open_index
    from retrieval.store import QueryOptions

    rows = []
    names = [p.name for p in test.files]
    own = [test.own_captions[n] for n in names]
    exact: dict[str, np.ndarray] = {}
    for kind in types:
        t0 = time.perf_counter()
        built = reindex(kind)
        build_s = time.perf_counter() - t0
        searcher = open_index(home, backend="torch", precision="fp32")
        try:
            if not exact:
                tq, iq = query_vectors(searcher, test)
                searcher.store.query_options = QueryOptions(exact=True)
                exact = {"tq": tq, "iq": iq, "t2i": searcher.store.search("image", tq, 10)[1],
                         "i2t": searcher.store.search("text", iq, 10)[1]}
                searcher.store.query_options = QueryOptions()
            row: dict[str, Any] = {"type": kind, "index": built, "build_s": round(build_s, 1)}
            for direction, modality, q in (("t2i", "image", exact["tq"]), ("i2t", "text", exact["iq"])):
                t1 = time.perf_counter()
                ids = searcher.store.search(modality, q, 10)[1]
                ms = (time.perf_counter() - t1) * 1000 / len(q)
                agree = np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / 10 for a, b in zip(ids, exact[direction],
                                                                                            strict=True)])
                if direction == "t2i":
                    got = truth.text_to_image(test.captions, photo_keys(searcher, ids), test.caption_file)
                else:
                    got = truth.image_to_text(names, caption_keys(searcher, ids), own)
                row[direction] = {**got, "vs_exact": float(agree), "ms": round(ms, 3)}
            rows.append(row)
            log(f"large collection: {kind}: t2i by scene {row['t2i']['scene']}, vs exact {row['t2i']['vs_exact']:.3f}")
        finally:
            searcher.store.close()
    return rows


def distractor_truth(test_scenes: dict[str, dict[str, Any]], test_specs: dict[str, dict[str, Any]],
                     d: Distractors) -> SceneTruth:
    """Scenes and meanings of the test split and the distractors, keyed as the searches return them."""
    scenes = dict(test_scenes)
    scenes.update({f"{i:07d}.jpg": s for i, s in enumerate(d.scenes)})
    specs = dict(test_specs)
    for t, s in zip(d.texts, d.specs, strict=True):
        specs.setdefault(t, s)
    return SceneTruth(scenes, specs)


def load_test(scenes_dir: Path, images_dir: Path) -> tuple[TestSet, dict[str, Any], dict[str, Any]]:
    """The test split (files under `images_dir`), with its scenes by file name and meanings by caption."""
    from training.scenes import DATASET

    doc = json.loads((scenes_dir / DATASET).read_text(encoding="utf-8"))
    entries = [e for e in doc["images"] if e["split"] == "test"]
    files = [images_dir / e["filename"] for e in entries]
    captions = [s["raw"] for e in entries for s in e["sentences"]]
    owner = [e["filename"] for e in entries for _ in e["sentences"]]
    own = {e["filename"]: {s["raw"] for s in e["sentences"]} for e in entries}
    scenes = {e["filename"]: e["scene"] for e in entries}
    specs = {s["raw"]: s["spec"] for e in entries for s in e["sentences"]}
    return TestSet(files, captions, owner, own), scenes, specs

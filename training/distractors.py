"""Distractor scenes for the quality lab's large collection: many small captioned scenes, embedded once.

Why: ANN indexes only serve at scale (`auto` switches from exact search to IVF/HNSW at tens of thousands of
vectors), and 200,000 photo-size JPEGs would take hours to write and index on 2 cores. So the lab renders
small scenes (64-96 px: the lab's model sees 64 px anyway) with the same generator in chunks, embeds them with
the model through the index's own decode path, and keeps per chunk an .npz of image vectors, the scene
graphs, and the scenes' captions with their vectors and meanings. A chunk on disk is never redone (a killed
build resumes), and the seeds (10,000 + chunk) never meet the lab's own scenes (seed 0..9,999).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.fsutil import atomic_file
from training.scenes import DATASET, generate

CHUNK = 10_000
SEED_BASE = 10_000
SIZE_RANGE = (64, 96)


@dataclass
class Distractors:
    """Embedded distractor scenes: image vectors with their scenes, and distinct captions with theirs."""

    image_vectors: np.ndarray  # (N, d) float32, unit rows
    scenes: list[dict[str, Any]]
    texts: list[str]
    text_vectors: np.ndarray  # (M, d) float32, unit rows
    specs: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.scenes)


def _render_chunk(args: tuple[int, Path, tuple[str, ...]]) -> Path:
    """Write one chunk's scenes (JPEGs + Karpathy JSON) into a fresh folder under `tmp`; returns it."""
    chunk, tmp, backgrounds = args
    out = tmp / f"chunk-{chunk:04d}"
    shutil.rmtree(out, ignore_errors=True)
    generate(out, CHUNK, seed=SEED_BASE + chunk, backgrounds=backgrounds, size_range=SIZE_RANGE)
    return out


def _embed_chunk(folder: Path, encoder: Any, batch: int = 256) -> dict[str, Any]:
    """Vectors of a rendered chunk's images (decode_for_model, as `index` does) and of its captions."""
    from retrieval.media.decode import decode_for_model

    doc = json.loads((folder / DATASET).read_text(encoding="utf-8"))
    entries = doc["images"]
    vectors = []
    for start in range(0, len(entries), batch):
        pixels = np.stack([decode_for_model((folder / "images" / e["filename"]).read_bytes(),
                                            encoder.preprocess).pixels for e in entries[start:start + batch]])
        vectors.append(encoder.encode_pixels(pixels))
    texts: dict[str, str] = {}
    for e in entries:
        for s in e["sentences"]:
            texts.setdefault(s["raw"], json.dumps(s["spec"], sort_keys=True))
    raw = list(texts)
    return {"image_vectors": np.concatenate(vectors).astype(np.float32),
            "scenes": np.asarray([json.dumps(e["scene"]) for e in entries]),
            "texts": np.asarray(raw), "specs": np.asarray([texts[t] for t in raw]),
            "text_vectors": encoder.encode_texts(raw, batch_size=512).astype(np.float32)}


def build(cache: str | Path, n: int, encoder: Any, backgrounds: Sequence[str | Path] = (), workers: int = 2,
          log: Callable[[str], None] | None = None) -> Distractors:
    """At least `n` distractor scenes (whole chunks of 10,000) embedded by `encoder`, from `cache` when there.

    `cache` is a folder owned by one model: the caller keys it by the model's fingerprint."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    chunks = -(-n // CHUNK)
    todo = [c for c in range(chunks) if not (cache / f"chunk-{c:04d}.npz").is_file()]
    if todo:
        tmp = Path(tempfile.mkdtemp(prefix="render-", dir=cache))
        try:
            bg = tuple(str(b) for b in backgrounds)
            # spawn, not fork: the caller holds a loaded torch model, whose threads a fork would deadlock on
            spawn = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=spawn) as pool:
                for c, folder in zip(todo, pool.map(_render_chunk, [(c, tmp, bg) for c in todo]), strict=True):
                    arrays = _embed_chunk(folder, encoder)
                    with atomic_file(cache / f"chunk-{c:04d}.npz") as f:
                        np.savez(f, **arrays)
                    shutil.rmtree(folder, ignore_errors=True)
                    if log:
                        log(f"distractors: chunk {c + 1}/{chunks} embedded")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load(cache, chunks)


def load(cache: Path, chunks: int) -> Distractors:
    """The first `chunks` chunks of a cache, captions made distinct across chunks."""
    images, scenes, texts, tvecs, specs = [], [], [], [], []
    seen: set[str] = set()
    for c in range(chunks):
        with np.load(cache / f"chunk-{c:04d}.npz") as z:  # each z[...] reads (and inflates) the array again
            images.append(z["image_vectors"])
            scenes += [json.loads(s) for s in z["scenes"]]
            chunk_texts, chunk_specs = [str(t) for t in z["texts"]], z["specs"]
            keep = [i for i, t in enumerate(chunk_texts) if t not in seen]
            seen.update(chunk_texts[i] for i in keep)
            texts += [chunk_texts[i] for i in keep]
            specs += [json.loads(str(chunk_specs[i])) for i in keep]
            tvecs.append(z["text_vectors"][keep])
    return Distractors(np.concatenate(images), scenes, texts, np.concatenate(tvecs), specs)

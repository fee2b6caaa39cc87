"""The built-in caption vocabulary: ImageNet class names and open_clip's prompt templates.

Used by `caption` when no corpus has been added. Each class is the mean of its prompts' embeddings
(CLIP's zero-shot recipe), computed once per model and cached in the index home.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.fsutil import atomic_file

if TYPE_CHECKING:
    from retrieval.model.protocol import Encoder
    from retrieval.model.spec import Fingerprint

BUILTIN_CORPUS = "builtin:imagenet"


def _cache_path(home: Path, fp: Fingerprint, kind: str = "imagenet") -> Path:
    version = "v1" if kind == "imagenet" else f"{kind}-v1"
    key = hashlib.sha256(f"{fp.cache_id()}|{version}".encode()).hexdigest()[:16]
    return home / "vocab" / f"{kind}-{key}.npz"


def _read_cache(home: Path, fp: Fingerprint, kind: str = "imagenet") -> tuple[list[str] | None, np.ndarray] | None:
    """(texts or None for a cache from before texts were stored, vectors) of a sound cache, else None."""
    path = _cache_path(home, fp, kind)
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            vectors = np.asarray(z["vectors"], dtype=np.float32)
            texts = [str(t) for t in z["texts"]] if "texts" in z.files else None
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache is simply rebuilt
    if vectors.ndim != 2 or vectors.shape[1] != fp.dim or (texts is not None and len(texts) != len(vectors)):
        return None
    return texts, vectors


def cached_vocabulary_vectors(home: Path, fp: Fingerprint) -> np.ndarray | None:
    """The built-in vocabulary's vectors if they are cached for this model (no model, no open_clip)."""
    found = _read_cache(home, fp)
    return found[1] if found is not None else None


def _zero_shot(encoder: Encoder) -> tuple[list[str], list[Callable[[str], str]]]:
    """Class names and prompt templates: from the ONNX export (no open_clip import) or from open_clip."""
    names, templates = encoder.zero_shot_metadata()
    return names, [functools.partial(_fill, t) for t in templates]


def _fill(template: str, name: str) -> str:
    return template.replace("{}", name)


def builtin_vocabulary(encoder: Encoder, home: Path) -> tuple[list[str], np.ndarray]:
    """(texts, unit vectors) for the 1,000 ImageNet classes; embeds once, then loads from the cache.

    The cache holds the texts too, so a cached vocabulary needs neither open_clip nor a model.
    """
    path = _cache_path(home, encoder.fingerprint)
    found = _read_cache(home, encoder.fingerprint)
    if found is not None:
        texts, vectors = found
        if texts is None:  # a cache from before texts were stored
            texts = [f"a photo of a {c}." for c in _zero_shot(encoder)[0]]
        if len(texts) == len(vectors):
            return texts, vectors
    classnames, templates = _zero_shot(encoder)
    texts = [f"a photo of a {c}." for c in classnames]
    prompts = [t(c) for c in classnames for t in templates]
    emb = encoder.encode_texts(prompts, batch_size=256)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
    vectors = (emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    _write_cache(path, texts, vectors)
    return texts, vectors


def _write_cache(path: Path, texts: list[str], vectors: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, durable=False) as f:  # a cache: rebuilt if a crash loses it
            np.savez(f, vectors=vectors, texts=np.asarray(texts))
    except OSError:
        pass  # a read-only home still answers, it just embeds again next time


def prompt_vocabulary(encoder: Encoder, home: Path) -> np.ndarray:
    """Unit vectors of the 1,000 prompts "a photo of a {class}." (one each): the relevance cutoff's baseline.

    One prompt per class, not the mean of every template: 1,000 texts embed in seconds on a CPU, so the first
    query with a cutoff does not wait minutes; cached in the home like the vocabulary."""
    found = _read_cache(home, encoder.fingerprint, "prompts")
    if found is not None:
        return found[1]
    texts = [f"a photo of a {c}." for c in _zero_shot(encoder)[0]]
    vectors = np.asarray(encoder.encode_texts(texts, batch_size=256), dtype=np.float32)
    _write_cache(_cache_path(home, encoder.fingerprint, "prompts"), texts, vectors)
    return vectors

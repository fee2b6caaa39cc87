"""The built-in caption vocabulary: ImageNet class names and open_clip's prompt templates.

Used by `caption` when no corpus has been added. Each class is the mean of its prompts' embeddings
(CLIP's zero-shot recipe), computed once per model and cached in the index home.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .encoder import Encoder

BUILTIN_CORPUS = "builtin:imagenet"


def _cache_path(home: Path, encoder: Encoder) -> Path:
    fp = encoder.fingerprint
    key = hashlib.sha256(f"{fp.model}|{fp.weights}|{fp.dim}|v1".encode()).hexdigest()[:16]
    return home / "vocab" / f"imagenet-{key}.npz"


def builtin_vocabulary(encoder: Encoder, home: Path) -> tuple[list[str], np.ndarray]:
    """(texts, unit vectors) for the 1,000 ImageNet classes; embeds once, then loads from the cache."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, SIMPLE_IMAGENET_TEMPLATES

    texts = [f"a photo of a {c}." for c in IMAGENET_CLASSNAMES]
    path = _cache_path(home, encoder)
    if path.is_file():
        try:
            with np.load(path) as z:
                vectors = z["vectors"]
            if vectors.shape == (len(texts), encoder.dim):
                return texts, vectors
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is simply rebuilt
    prompts = [t(c) for c in IMAGENET_CLASSNAMES for t in SIMPLE_IMAGENET_TEMPLATES]
    emb = encoder.encode_texts(prompts, batch_size=256)
    emb = emb.reshape(len(IMAGENET_CLASSNAMES), len(SIMPLE_IMAGENET_TEMPLATES), -1).mean(axis=1)
    vectors = (emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, vectors=vectors)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home still answers, it just embeds again next time
    return texts, vectors

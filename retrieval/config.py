"""Frozen settings with every default in one place, so the CLI, the page and the tests agree."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
DEFAULT_K = 10
DEFAULT_BATCH_SIZE = 32
# On CUDA the model needs large batches to be fed (ViT-B-32 in fp16 reaches its rate around 512).
DEFAULT_CUDA_BATCH_SIZE = 512
DEFAULT_WEIGHT = 0.5
COMMIT_EVERY = 512
# A commit's buffered vectors stay below this: commits cost their own size (segments, store/exact_segments.py),
# so a collection beyond RAM is committed in bounded chunks instead of a quarter of the index at a time.
COMMIT_MAX_BYTES = 256 << 20
# Decompression-bomb guard: images above this many pixels are refused before a full decode.
MAX_IMAGE_PIXELS = 200_000_000
RAW_EXTENSIONS = frozenset({".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".pef", ".srw"})
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
) | RAW_EXTENSIONS
# Thumbnails written while indexing (short side, pixels): for the page and for reranking.
THUMB_SIZE = 256
HOME_ENV = "CROSSMODAL_HOME"
CACHE_ENV = "CROSSMODAL_CACHE"


def default_home() -> Path:
    """The index home: $CROSSMODAL_HOME, else the platform's user data dir for `crossmodal`."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("crossmodal", appauthor=False))


def cache_root() -> Path:
    """The per-user cache every index home shares (ONNX exports, checkpoint hashes): $CROSSMODAL_CACHE, else
    the platform's user cache dir for `crossmodal` (~/.cache/crossmodal on Linux)."""
    raw = os.environ.get(CACHE_ENV, "")
    if raw:
        return Path(raw).expanduser().absolute()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("crossmodal", appauthor=False))

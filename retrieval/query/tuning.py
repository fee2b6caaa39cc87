"""Text queries for tuning an image index: what `crossmodal index` and `reindex` give the store.

An ANN index tuned only with its own vectors over-promises for queries of the other modality (CLIP's
modality gap: text and image embeddings sit in different regions), so the store also tunes the image index
with text vectors. It samples stored captions when there are enough; otherwise this source gives the built-in
vocabulary's 1,000 class vectors (caption-like prompts): from their cache, else embedded once with the
model's ONNX export (no torch), else with the encoder the caller already has loaded, and cached.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from retrieval.model.onnx_encoder import OnnxEncoder, onnxruntime_problem
from retrieval.model.protocol import Encoder
from retrieval.model.spec import Fingerprint
from retrieval.query.vocab import builtin_vocabulary, cached_vocabulary_vectors


def vocabulary_queries(home: Path, model: Fingerprint | Callable[[], Fingerprint | None],
                       loaded: Callable[[], Encoder | None] | None = None) -> Callable[[str], np.ndarray | None]:
    """A query source for Store.tune_with: "text" -> the vocabulary's vectors (None when no encoder can
    make them and none are cached); other kinds -> None. `model` is the index's fingerprint, or a function
    giving it when tuning runs (a new index records its model with its first batch). `loaded` gives the
    encoder the caller has loaded anyway (or None), tried after the ONNX export; nothing is loaded for this."""

    def source(kind: str) -> np.ndarray | None:
        fp = model() if callable(model) else model
        if kind != "text" or fp is None:
            return None
        cached = cached_vocabulary_vectors(home, fp)
        if cached is not None:
            return cached
        encoder: Encoder | None = OnnxEncoder.open(home, fp) if onnxruntime_problem() is None else None
        encoder = encoder or (loaded() if loaded is not None else None)
        if encoder is None or not encoder.fingerprint.same_model(fp):
            return None
        return builtin_vocabulary(encoder, home)[1]

    return source

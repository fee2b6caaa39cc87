"""Relevance cutoff and date sort: hide results that are not about the query, then order the rest.

A raw CLIP cosine says little on its own: its scale differs between models, and within one model some
photos score high against every text. So each text->image or image->text pair gets a calibrated relevance,
a z-score of its dense cosine against the same photo's cosines with the built-in vocabulary's prompts (the
1,000 prompts "a photo of a {class}." for the ImageNet classes, which every index can embed: vocab.py): how
far this text stands out, for this photo, from a thousand generic concepts. That needs nothing a model was
trained on, so it works for any model; the threshold `AUTO_MIN_SCORE` was fitted on the quality lab
(bench/quality_lab.py, README "Quality"). Image-only queries have no text to calibrate, so the cutoff leaves
them alone. The reranker's score orders results; the
cutoff reads the dense score (ARCHITECTURE: relevance, not the fused score).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from retrieval.errors import UserError
from retrieval.query.search import Hit, Searcher
from retrieval.query.vocab import prompt_vocabulary
from retrieval.store.paths import from_catalog
from retrieval.store.records import date_bound

AUTO_MIN_SCORE = -0.25  # the F1-best threshold on the quality lab's val split (-0.27), rounded; README "Quality"
SORTS = ("score", "date")


def parse_min_score(text: str | None) -> float | None:
    """`--min-score`: None (no cutoff), 'auto' (the lab's threshold) or a number on the relevance scale."""
    if text is None or not str(text).strip():
        return None
    if str(text).strip().lower() == "auto":
        return AUTO_MIN_SCORE
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--min-score must be 'auto' or a number (the relevance column), got {text!r}") from None
    if not math.isfinite(value):
        raise UserError(f"--min-score must be a finite number, got {text!r}")
    return value


def check_sort(sort: str) -> str:
    """`--sort`: 'score' or 'date'."""
    if sort not in SORTS:
        raise UserError(f"--sort must be one of {', '.join(SORTS)}, got {sort!r}")
    return sort


def vocab_z(scores: np.ndarray, image_vectors: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    """z-scores of text-image cosines `scores` (n,) against each image's (n, d) cosines with `vocab` (V, d)."""
    base = np.asarray(image_vectors, np.float32).reshape(len(scores), -1) @ vocab.T
    std = np.maximum(base.std(axis=1), 1e-6)
    z: np.ndarray = ((np.asarray(scores, np.float32) - base.mean(axis=1)) / std).astype(np.float32)
    return z


class Relevance:
    """Calibrated relevance for one searcher's hits, from its model's built-in vocabulary vectors."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher
        self._vocab: np.ndarray | None = None

    @property
    def vocab(self) -> np.ndarray:
        """The vocabulary's unit vectors (embedded once per model, then read from the home's cache)."""
        if self._vocab is None:
            self._vocab = prompt_vocabulary(self.searcher.encoder, self.searcher.store.home)
        return self._vocab

    def images(self, hits: Sequence[Hit]) -> list[Hit]:
        """Text->image hits with `relevance` set (from each photo's stored vector)."""
        if not hits:
            return []
        vectors = np.stack([self.searcher.store.vector("image", h.id) for h in hits])
        z = vocab_z(np.asarray([h.dense_score for h in hits]), vectors, self.vocab)
        return [replace(h, relevance=float(v)) for h, v in zip(hits, z, strict=True)]

    def captions(self, image_vector: np.ndarray, hits: Sequence[Hit]) -> list[Hit]:
        """Image->text hits of the query photo `image_vector` with `relevance` set."""
        if not hits:
            return []
        scores = np.asarray([h.dense_score for h in hits])
        z = vocab_z(scores, np.repeat(np.asarray(image_vector, np.float32)[None], len(hits), 0), self.vocab)
        return [replace(h, relevance=float(v)) for h, v in zip(hits, z, strict=True)]


def split_by(hits: Sequence[Hit], min_score: float | None) -> tuple[list[Hit], list[Hit]]:
    """(kept, weaker): hits whose relevance reaches `min_score`, in their order, and the rest. Hits without
    a relevance (image-only queries) are all kept."""
    if min_score is None:
        return list(hits), []
    kept = [h for h in hits if h.relevance is None or h.relevance >= min_score]
    return kept, [h for h in hits if h.relevance is not None and h.relevance < min_score]


def _date_key(h: Hit) -> float:
    """Capture time (EXIF), else the file's modification time; unknown dates sort last."""
    if h.item.taken_at:
        try:
            return date_bound(h.item.taken_at)[1]
        except UserError:
            pass
    try:
        return os.stat(Path(from_catalog(h.item.path or ""))).st_mtime
    except (OSError, ValueError):
        return -math.inf


def sort_hits(hits: Sequence[Hit], sort: str) -> list[Hit]:
    """Order kept hits by score (as they come) or by date, newest first; ranks renumbered from 1."""
    order = list(hits) if check_sort(sort) == "score" else sorted(hits, key=_date_key, reverse=True)
    return [replace(h, rank=r) for r, h in enumerate(order, 1)]

"""Recall of ranked result lists in the quality lab, by scene and by own item, and the cutoff's precision.

The lab's searches return item keys (a photo's file name, a caption's text) in rank order; these helpers
score them under the two relevance definitions of clip_metrics.py: "scene" (the photo's scene graph makes
the caption true, `satisfies`) and "own" (the caption was written for that photo). Only retrieved items are
checked, so a collection of 200,000 distractor scenes costs K checks per query, not 200,000.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from training.scene_graph import satisfies

KS = (1, 5, 10)


def recall_lists(found: Sequence[Sequence[Hashable]], right: Callable[[int, Hashable], bool],
                 ks: Sequence[int] = KS) -> dict[str, float]:
    """R@K: the share of queries q with some key among their first K for which right(q, key) holds."""
    first = [next((r for r, key in enumerate(keys) if right(q, key)), None) for q, keys in enumerate(found)]
    return {f"R@{k}": float(np.mean([f is not None and f < k for f in first])) if found else 0.0 for k in ks}


class SceneTruth:
    """Who is right for whom: photos' scenes by key, captions' meanings by text, and each query's own items."""

    def __init__(self, scenes: dict[Hashable, dict[str, Any]], specs: dict[str, dict[str, Any]]) -> None:
        self.scenes = scenes
        self.specs = specs
        self._memo: dict[tuple[str, Hashable], bool] = {}

    def holds(self, text: str, photo: Hashable) -> bool:
        """Whether photo's scene makes the caption true (memoised: the same pairs recur across settings)."""
        key = (text, photo)
        if key not in self._memo:
            self._memo[key] = satisfies(self.scenes[photo], self.specs[text])
        return self._memo[key]

    def text_to_image(self, queries: Sequence[str], found: Sequence[Sequence[Hashable]],
                      own: Sequence[Hashable]) -> dict[str, dict[str, float]]:
        """R@K of caption queries over photo keys, by scene and by own photo."""
        return {"scene": recall_lists(found, lambda q, p: self.holds(queries[q], p)),
                "own": recall_lists(found, lambda q, p: p == own[q])}

    def image_to_text(self, queries: Sequence[Hashable], found: Sequence[Sequence[str]],
                      own: Sequence[set[str]]) -> dict[str, dict[str, float]]:
        """R@K of photo queries over caption texts, by scene and by own captions."""
        return {"scene": recall_lists(found, lambda q, t: self.holds(t, queries[q])),
                "own": recall_lists(found, lambda q, t: t in own[q])}


def cutoff_quality(z: np.ndarray, relevant: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision and recall of keeping the pairs with z >= threshold, against `relevant` (same shape, bool)."""
    kept = z >= threshold
    tp = float(np.logical_and(kept, relevant).sum())
    precision = tp / max(float(kept.sum()), 1.0)
    recall = tp / max(float(relevant.sum()), 1.0)
    return {"threshold": float(threshold), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-12), "kept": float(kept.mean())}


def fit_threshold(z: np.ndarray, relevant: np.ndarray, grid: Sequence[float] | None = None) -> dict[str, float]:
    """The threshold with the best F1 on these pairs (a grid of quantiles of z unless given)."""
    cands = grid if grid is not None else np.unique(np.round(np.quantile(z, np.linspace(0.01, 0.99, 99)), 2))
    return max((cutoff_quality(z, relevant, float(t)) for t in cands), key=lambda r: r["f1"])


def spec_key(spec: dict[str, Any]) -> str:
    """A caption meaning as text (distinct meanings, distinct keys)."""
    return json.dumps(spec, sort_keys=True)

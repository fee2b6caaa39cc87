"""Retrieval and binding measures for the scene lab, with what chance would score on each.

Two relevance definitions: "scene" (an image is right for a caption when its scene makes the caption true,
`satisfies`) and "own" (the classic protocol: a caption's one right image is the one it was written for; an
image's right captions are its own). Under "scene" a caption like "one circle" has many right images, so
chance is far above K/N: it is computed per query from its count of right answers (the probability that K
random picks include at least one), then averaged, and every recall is reported next to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

KS = (1, 5, 10)


def chance_at_k(relevant: np.ndarray, total: int, k: int) -> float:
    """Mean over queries of P(at least one of k random distinct picks among `total` is relevant), given each
    query's number of relevant items."""
    if len(relevant) == 0:
        return 0.0
    k = min(k, total)
    m = np.asarray(relevant, dtype=np.float64)
    miss = np.ones_like(m)
    for i in range(k):  # P(no hit) = C(total - m, k) / C(total, k), as a product
        miss *= np.clip((total - m - i) / (total - i), 0.0, 1.0)
    return float(np.mean(1.0 - miss))


def recall(sim: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """R@K of each row of `sim` (queries x candidates) against the bool matrix `relevant` of the same shape;
    a query counts when any relevant candidate is in its top K (ties broken by candidate order)."""
    depth = min(max(ks), sim.shape[1])
    order = np.argsort(-sim, axis=1, kind="stable")[:, :depth]
    hits = np.take_along_axis(relevant, order, axis=1)
    return {f"R@{k}": float(hits[:, :k].any(axis=1).mean()) if len(sim) else 0.0 for k in ks}


def chance(relevant: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """What a random ranking scores on `recall` for this relevance matrix."""
    return {f"R@{k}": chance_at_k(relevant.sum(axis=1), relevant.shape[1], k) for k in ks}


def own_relevance(caption_image: np.ndarray, n_images: int) -> np.ndarray:
    """(captions, images) bool: True at each caption's own image."""
    rel = np.zeros((len(caption_image), n_images), dtype=bool)
    rel[np.arange(len(caption_image)), caption_image] = True
    return rel


def retrieval_report(image_emb: np.ndarray, text_emb: np.ndarray, scene_rel: np.ndarray,
                     caption_image: np.ndarray, ks: Sequence[int] = KS) -> dict[str, Any]:
    """Text->image and image->text R@K under both definitions, each with its chance level.

    `image_emb` (Ni, d) and `text_emb` (Nt, d) are unit rows; `scene_rel` is (Nt, Ni)."""
    sim = text_emb @ image_emb.T
    out: dict[str, Any] = {}
    for name, rel in (("scene", scene_rel), ("own", own_relevance(caption_image, len(image_emb)))):
        out[name] = {"t2i": recall(sim, rel, ks), "i2t": recall(sim.T, rel.T, ks),
                     "chance": {"t2i": chance(rel, ks), "i2t": chance(rel.T, ks)}}
    return out


def binding_report(image_emb: dict[str, np.ndarray], text_emb: dict[str, np.ndarray],
                   probes: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy on binding_test.json: per probe, whether its image scores the true caption above every hard
    negative (chance 1 / (1 + negatives)); per swap kind, how often the true caption beats that negative
    (chance 0.5). `image_emb` maps file names, `text_emb` caption texts, to unit vectors."""
    probe_hits, probe_chance = [], []
    pairs: dict[str, list[bool]] = {}
    by_type: dict[str, list[bool]] = {}
    for item in probes:
        img = image_emb.get(item["filename"])
        if img is None:
            continue
        for p in item["probes"]:
            pos = float(text_emb[p["positive"]["raw"]] @ img)
            negs = [(n["kind"], float(text_emb[n["raw"]] @ img)) for n in p["negatives"]]
            win = all(pos > s for _, s in negs)
            probe_hits.append(win)
            probe_chance.append(1.0 / (1 + len(negs)))
            by_type.setdefault(p["type"], []).append(win)
            for kind, s in negs:
                pairs.setdefault(kind, []).append(pos > s)
    every = [h for hs in pairs.values() for h in hs]
    return {"probes": len(probe_hits), "accuracy": float(np.mean(probe_hits)) if probe_hits else 0.0,
            "chance": float(np.mean(probe_chance)) if probe_chance else 0.0,
            "by_type": {k: float(np.mean(v)) for k, v in sorted(by_type.items())},
            "pairwise": float(np.mean(every)) if every else 0.0,
            "pairwise_by_kind": {k: float(np.mean(v)) for k, v in sorted(pairs.items())}}


def binding_texts(probes: list[dict[str, Any]]) -> list[str]:
    """Every caption text the binding probes use, each once, in a fixed order."""
    seen: dict[str, None] = {}
    for item in probes:
        for p in item["probes"]:
            seen[p["positive"]["raw"]] = None
            for n in p["negatives"]:
                seen[n["raw"]] = None
    return list(seen)


def summary_line(report: dict[str, Any]) -> str:
    """ "scene t2i R@1/5/10 12.0/40.1/60.3 (chance 3.1/14.0/26.2) ..." for logs."""
    parts = []
    for name in ("scene", "own"):
        r = report[name]
        for d in ("t2i", "i2t"):
            got = "/".join(f"{100 * v:.1f}" for v in r[d].values())
            ch = "/".join(f"{100 * v:.1f}" for v in r["chance"][d].values())
            parts.append(f"{name} {d} {got} (chance {ch})")
    return "; ".join(parts)

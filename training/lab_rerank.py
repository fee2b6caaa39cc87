"""The quality lab's reranking measures: dense vs the parameter-free scorer vs a trained reranker, on the
test split (recall by scene and by own item, sweeping rerank-k and lambda) and on the binding set.

Features come from `training.evaluate.extract_features` (the encoder `eval` uses), so these numbers are the
ones `crossmodal eval` prints for the own-item definition, plus the by-scene definition the scenes carry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.clip_metrics import chance, own_relevance, recall
from training.evaluate import Features, Pairs, extract_features, rerank_orders, top_k
from training.scene_graph import satisfies
from training.scenes import BINDING, DATASET


def scene_relevance(scenes_dir: Path, pairs: Pairs) -> np.ndarray:
    """(captions, images) bool relevance by scene for `pairs` (the test split in dataset order)."""
    doc = json.loads((scenes_dir / DATASET).read_text(encoding="utf-8"))
    by_name = {e["filename"]: e for e in doc["images"]}
    entries = [by_name[p.name] for p in pairs.images]
    specs = {s["raw"]: s["spec"] for e in entries for s in e["sentences"]}
    return np.asarray([[satisfies(e["scene"], specs[c]) for e in entries] for c in pairs.captions], dtype=bool)


def _ranked_recall(order: np.ndarray, rel: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    hits = np.take_along_axis(rel, order[:, :max(ks)], axis=1)
    return {f"R@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


def rerank_recall(feats: Features, scene_rel: np.ndarray, scorer: Any | None, rerank_k: int) -> dict[str, Any]:
    """R@1/5/10 both ways, by scene and by own item, dense (scorer None) or with the top rerank_k reranked."""
    sim = feats.text_pooled @ feats.image_pooled.T
    own = own_relevance(feats.caption_image, len(feats.image_pooled))
    out: dict[str, Any] = {}
    for direction, s, rels in (("t2i", sim, (scene_rel, own)), ("i2t", sim.T, (scene_rel.T, own.T))):
        order = top_k(s, max(10, rerank_k))
        if scorer is not None:
            kk = min(rerank_k, order.shape[1])
            order = np.concatenate([rerank_orders(scorer, feats, direction, order[:, :kk], s), order[:, kk:]], 1)
        for name, rel in zip(("scene", "own"), rels, strict=True):
            out.setdefault(name, {})[direction] = _ranked_recall(order, rel)
    return out


def dense_recall(image_vectors: np.ndarray, text_vectors: np.ndarray, scene_rel: np.ndarray,
                 caption_image: np.ndarray) -> dict[str, Any]:
    """Dense R@K both ways and both definitions from any image and text vectors (the decode and precision
    rows), with chance levels."""
    sim = text_vectors @ image_vectors.T
    own = own_relevance(caption_image, len(image_vectors))
    return {name: {"t2i": recall(sim, rel), "i2t": recall(sim.T, rel.T),
                   "chance": {"t2i": chance(rel), "i2t": chance(rel.T)}}
            for name, rel in (("scene", scene_rel), ("own", own))}


def binding_accuracy(encoder: Any, scenes_dir: Path, pairs: Pairs, feats: Features,
                     scorers: dict[str, Any | None]) -> dict[str, dict[str, float]]:
    """Per scorer (None: dense), the share of binding probes whose true caption outscores every hard negative
    for its image, and the pairwise share (true caption above one negative); chance beside them."""
    import torch

    doc = json.loads((scenes_dir / BINDING).read_text(encoding="utf-8"))
    index = {p.name: i for i, p in enumerate(pairs.images)}
    probes = [(index[e["filename"]], p) for e in doc["images"] if e["filename"] in index for p in e["probes"]]
    texts = list(dict.fromkeys(t for _, p in probes for t in [p["positive"]["raw"]] + [n["raw"] for n in
                                                                                    p["negatives"]]))
    where = {t: i for i, t in enumerate(texts)}
    words = extract_features(encoder, Pairs([], texts, np.zeros(len(texts), np.int64)))  # captions only
    tt, tm, pooled = words.text_tokens.astype(np.float32), words.text_mask, words.text_pooled
    out: dict[str, dict[str, float]] = {}
    for name, scorer in scorers.items():
        wins, pair_wins, chances = [], [], []
        for img, p in probes:
            ids = [where[p["positive"]["raw"]]] + [where[n["raw"]] for n in p["negatives"]]
            dense = pooled[ids] @ feats.image_pooled[img]
            if scorer is None:
                s = dense
            else:
                with torch.inference_mode():
                    image = torch.from_numpy(feats.image_tokens[[img] * len(ids)].astype(np.float32))
                    s = scorer(torch.from_numpy(dense.astype(np.float32)), torch.from_numpy(tt[ids]),
                               torch.from_numpy(tm[ids]), image, torch.ones(image.shape[:2], dtype=torch.bool)
                               ).float().numpy()
            wins.append(bool((s[0] > s[1:]).all()))
            pair_wins += [bool(s[0] > x) for x in s[1:]]
            chances.append(1 / len(ids))
        out[name] = {"accuracy": float(np.mean(wins)), "chance": float(np.mean(chances)),
                     "pairwise": float(np.mean(pair_wins)), "probes": float(len(wins))}
    return out

"""Learn the co-attention reranker's W^Q, W^K, W^V, W_O and lambda with the encoder frozen.

Features of every image and caption are computed once (the encoder never changes), so an epoch only runs
the small scorer. Each step scores, for a batch of caption queries, the positive image against hard
negatives mined from the caption's dense top-k, and for a batch of image queries one of its captions against
hard negatives from the image's dense top-k captions; the loss is the cross-entropy of the positive over
logit_scale * (s_dense + lambda * s_coatt), averaged over both directions. Validation Recall@1 (reranked
dense top-k) is reported per epoch; the best epoch's parameters are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from retrieval.rerank.scorer import DEFAULT_HEADS, DEFAULT_LAMBDA
from training.evaluate import Features, evaluate_features
from training.torch_scorer import CoAttentionScorer

EpochFn = Callable[[dict], None]


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    negatives: int = 7
    mine_k: int = 32  # hard negatives come from this dense top-k
    rerank_k: int = 32  # validation reranks this dense top-k
    heads: int = DEFAULT_HEADS
    lam: float = DEFAULT_LAMBDA
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"


@dataclass
class TrainResult:
    scorer: object
    history: list[dict] = field(default_factory=list)
    baseline: dict = field(default_factory=dict)
    best_epoch: int = 0


def _mine(sim: np.ndarray, positives: list[set[int]], k: int) -> list[np.ndarray]:
    """Per query, its dense top-k candidates minus its positives (the hard negatives)."""
    k = min(k + max((len(p) for p in positives), default=1), sim.shape[1])
    out = []
    for start in range(0, len(sim), 4096):
        part = sim[start:start + 4096]
        top = np.argpartition(-part, k - 1, axis=1)[:, :k] if k < part.shape[1] else np.tile(
            np.arange(part.shape[1]), (len(part), 1))
        for r, row in enumerate(top):
            row = row[np.argsort(-part[r, row], kind="stable")]
            out.append(np.asarray([c for c in row if c not in positives[start + r]], dtype=np.int64))
    return out


def _positives(texts: list[str] | None, cap_img: np.ndarray, img_caps: list[np.ndarray]
               ) -> tuple[list[set[int]], list[set[int]]]:
    """Who may not be a negative: for a caption, every image that has a caption of the same text (a
    generic caption such as "one circle" or "a dog" is as true of those images as of its own); for an image,
    every caption whose text equals one of its own. Without texts, a caption's own image and an image's own
    captions. (The quality lab measured a reranker trained with such equal captions as negatives far below
    dense ranking.)"""
    if texts is None:
        return [{int(i)} for i in cap_img], [set(c.tolist()) for c in img_caps]
    key = [" ".join(t.lower().split()) for t in texts]
    images: dict[str, set[int]] = {}
    captions: dict[str, set[int]] = {}
    for c, k in enumerate(key):
        images.setdefault(k, set()).add(int(cap_img[c]))
        captions.setdefault(k, set()).add(c)
    return ([images[k] for k in key],
            [set().union(*(captions[key[int(c)]] for c in own)) if len(own) else set() for own in img_caps])


def _pick(rng: np.random.Generator, pool: np.ndarray, fallback: int, n: int, exclude: set[int]) -> np.ndarray:
    if len(pool) >= n:
        return rng.choice(pool, size=n, replace=False)
    extra = [c for c in rng.permutation(fallback) if c not in exclude and c not in set(pool.tolist())]
    return np.concatenate([pool, np.asarray(extra[:n - len(pool)], dtype=np.int64)])


def _summary(result) -> dict:
    r = {d: v[1] for d, v in (result.reranked or result.dense).items()}
    return {"t2i_R@1": r.get("t2i", 0.0), "i2t_R@1": r.get("i2t", 0.0),
            "mean_R@1": float(np.mean(list(r.values()))) if r else 0.0}


def train(train_feats: Features, val_feats: Features, cfg: TrainConfig | None = None,
          on_epoch: EpochFn | None = None) -> TrainResult:
    """Train a scorer on precomputed features; returns the best-by-validation scorer and the history."""
    import torch

    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dev = cfg.device
    scorer = CoAttentionScorer(train_feats.dim, cfg.heads, cfg.lam).to(dev)
    scorer.identity = False
    opt = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr, weight_decay=0.0)
    scale = float(train_feats.logit_scale)

    sim = train_feats.text_pooled @ train_feats.image_pooled.T
    cap_img = train_feats.caption_image
    img_caps = train_feats.image_captions()
    n_txt, n_img = sim.shape
    t2i_pos, i2t_pos = _positives(train_feats.caption_texts, cap_img, img_caps)
    neg_t2i = _mine(sim, t2i_pos, cfg.mine_k)
    neg_i2t = _mine(sim.T, i2t_pos, cfg.mine_k)
    n_neg = min(cfg.negatives, n_img - 1, max(n_txt - max(len(c) for c in img_caps), 1))

    def tens(a, dtype=torch.float32):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev, dtype)

    def batch_loss(t_idx: np.ndarray, i_idx: np.ndarray, q: int) -> torch.Tensor:
        """t_idx, i_idx: (q * (1 + n_neg),) pairs, positive first in each group of 1 + n_neg."""
        dense = tens(np.einsum("nd,nd->n", train_feats.text_pooled[t_idx], train_feats.image_pooled[i_idx]))
        s = scorer(dense, tens(train_feats.text_tokens[t_idx]), tens(train_feats.text_mask[t_idx], torch.bool),
                   tens(train_feats.image_tokens[i_idx]), tens(train_feats.image_mask[i_idx], torch.bool))
        logits = scale * s.reshape(q, 1 + n_neg)
        return torch.nn.functional.cross_entropy(logits, torch.zeros(q, dtype=torch.long, device=dev))

    baseline = evaluate_features(val_feats, None, cfg.rerank_k, ks=(1,), device=dev)
    result = TrainResult(scorer=scorer, baseline=_summary(baseline))
    best, best_state = -1.0, None
    for epoch in range(1, cfg.epochs + 1):
        scorer.train()
        t_order, i_order = rng.permutation(n_txt), rng.permutation(n_img)
        steps = max(1, int(np.ceil(n_txt / cfg.batch_size)))
        i_per = max(1, int(np.ceil(n_img / steps)))
        losses = []
        for step in range(steps):
            caps = t_order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            imgs = i_order[(step * i_per) % n_img:][:i_per]
            t_idx, i_idx = [], []
            for c in caps:  # caption query: its image, then hard-negative images
                negs = _pick(rng, neg_t2i[c], n_img, n_neg, t2i_pos[c])
                t_idx += [c] * (1 + n_neg)
                i_idx += [int(cap_img[c])] + negs.tolist()
            loss = batch_loss(np.asarray(t_idx), np.asarray(i_idx), len(caps))
            t_idx, i_idx = [], []
            for i in imgs:  # image query: one of its captions, then hard-negative captions
                pos = int(rng.choice(img_caps[i]))
                negs = _pick(rng, neg_i2t[i], n_txt, n_neg, i2t_pos[i])
                i_idx += [int(i)] * (1 + n_neg)
                t_idx += [pos] + negs.tolist()
            if len(imgs):
                loss = 0.5 * (loss + batch_loss(np.asarray(t_idx), np.asarray(i_idx), len(imgs)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        scorer.eval()
        val = evaluate_features(val_feats, scorer, cfg.rerank_k, ks=(1,), device=dev)
        row = {"epoch": epoch, "loss": float(np.mean(losses)), **_summary(val), "lambda": float(scorer.lam.detach())}
        result.history.append(row)
        if on_epoch:
            on_epoch(row)
        if row["mean_R@1"] > best:
            best, result.best_epoch = row["mean_R@1"], epoch
            best_state = {k: v.detach().clone() for k, v in scorer.state_dict().items()}
    if best_state is not None:
        scorer.load_state_dict(best_state)
    result.scorer = scorer.cpu().eval()
    return result

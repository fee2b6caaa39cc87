"""The training loop really learns: on a synthetic set whose match signal lives only in token features
(the pooled vectors are random, so dense retrieval is at chance), validation Recall@1 rises far above it."""

from __future__ import annotations

import numpy as np
import torch

from training.evaluate import Features
from training.train_reranker import TrainConfig, train


def synthetic(n_img: int, seed: int, rotation: np.ndarray, d: int = 32, li: int = 8, caps: int = 2,
              lt: int = 6) -> Features:
    """Captions are a few of their image's tokens, rotated by a fixed hidden matrix, plus noise; padded."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n_img, li, d)).astype(np.float32)
    text = np.zeros((n_img * caps, lt, d), np.float32)
    mask = np.zeros((n_img * caps, lt), bool)
    for i in range(n_img):
        for c in range(caps):
            n = int(rng.integers(3, lt + 1))
            sel = rng.choice(li, size=n, replace=False)
            text[i * caps + c, :n] = img[i, sel] @ rotation + 0.1 * rng.normal(size=(n, d))
            mask[i * caps + c, :n] = True

    def noise(n: int) -> np.ndarray:
        v = rng.normal(size=(n, d)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return Features(image_tokens=img, image_mask=np.ones((n_img, li), bool), image_pooled=noise(n_img),
                    text_tokens=text, text_mask=mask, text_pooled=noise(n_img * caps),
                    caption_image=np.repeat(np.arange(n_img), caps), logit_scale=10.0)


def test_training_beats_the_dense_baseline():
    rotation = np.linalg.qr(np.random.default_rng(99).normal(size=(32, 32)))[0].astype(np.float32)
    tr, va = synthetic(160, 1, rotation), synthetic(32, 2, rotation)
    epochs = []
    cfg = TrainConfig(epochs=6, batch_size=32, heads=4, lr=1e-2, rerank_k=32, mine_k=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the test suite shares two cores
    try:
        result = train(tr, va, cfg, on_epoch=epochs.append)
    finally:
        torch.set_num_threads(threads)
    assert len(epochs) == 6 and all("t2i_R@1" in e and "i2t_R@1" in e for e in epochs)
    base = result.baseline["mean_R@1"]
    best = max(e["mean_R@1"] for e in epochs)
    assert base < 0.15  # dense is at chance: pooled vectors carry no signal
    assert best > base + 0.4, (base, epochs)
    assert epochs[result.best_epoch - 1]["mean_R@1"] == best
    assert epochs[-1]["loss"] < epochs[0]["loss"] / 2


def test_equal_captions_are_never_negatives() -> None:
    """A generic caption ("one circle") shared by several images is positive for all of them: training must
    not push those images apart (the quality lab's first trained reranker did, and fell far below dense)."""
    from training.train_reranker import _positives

    texts = ["one circle", "a red square", "One  circle", "a blue star"]
    cap_img = np.asarray([0, 0, 1, 2])
    img_caps = [np.asarray([0, 1]), np.asarray([2]), np.asarray([3])]
    t2i, i2t = _positives(texts, cap_img, img_caps)
    assert t2i == [{0, 1}, {0}, {0, 1}, {2}]
    assert i2t == [{0, 1, 2}, {0, 2}, {3}]
    assert _positives(None, cap_img, img_caps) == ([{0}, {0}, {1}, {2}], [{0, 1}, {2}, {3}])

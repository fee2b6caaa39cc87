"""Recall@K on a tiny hand-made set equals hand-computed values, both directions, dense and reranked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.evaluate import Features, evaluate_features, load_pairs, recall_at_k

# sim[caption, image]; captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2
SIM = np.array([[0.9, 0.1, 0.0],
                [0.2, 0.5, 0.3],
                [0.1, 0.8, 0.0],
                [0.6, 0.4, 0.1],
                [0.0, 0.3, 0.2],
                [0.7, 0.0, 0.25]], dtype=np.float32)
OWNER = np.array([0, 0, 1, 1, 2, 2])


def _features() -> Features:
    n_t, n_i = SIM.shape
    return Features(image_tokens=np.zeros((n_i, 2, 3), np.float32), image_mask=np.ones((n_i, 2), bool),
                    image_pooled=np.eye(3, dtype=np.float32), text_tokens=np.zeros((n_t, 2, 3), np.float32),
                    text_mask=np.ones((n_t, 2), bool), text_pooled=SIM.copy(), caption_image=OWNER)


class Reverse(torch.nn.Module):
    """A stand-in scorer: reverses the dense order of the candidates it is given."""

    def forward(self, dense, text, text_mask, image, image_mask):
        return -dense


def test_recall_at_k_by_hand():
    orders = np.array([[2, 0, 1], [1, 2, 0]])
    assert recall_at_k(orders, [[0], [0, 1]], (1, 2, 3)) == {1: 0.5, 2: 1.0, 3: 1.0}  # query 1 hits at once


def test_dense_recall_both_directions():
    res = evaluate_features(_features(), None, ks=(1, 2, 3))
    # text->image ranks of the right image: 1, 3, 1, 2, 2, 2
    assert res.dense["t2i"] == pytest.approx({1: 2 / 6, 2: 5 / 6, 3: 1.0})
    # image->text rank of the first of its captions: image0 1 (c0), image1 1 (c2), image2 2 (c5 after c1)
    assert res.dense["i2t"] == pytest.approx({1: 2 / 3, 2: 1.0, 3: 1.0})
    assert res.reranked is None


def test_reranked_recall_reorders_only_the_top_k():
    res = evaluate_features(_features(), Reverse(), rerank_k=2, ks=(1, 2, 3))
    # each top-2 reversed: t2i ranks 2, 3, 2, 1, 1, 1; i2t ranks 2, 2, 1
    assert res.reranked["t2i"] == pytest.approx({1: 3 / 6, 2: 5 / 6, 3: 1.0})
    assert res.reranked["i2t"] == pytest.approx({1: 1 / 3, 2: 1.0, 3: 1.0})
    assert res.dense["t2i"][1] == pytest.approx(2 / 6)
    doc = res.to_json()
    assert doc["reranked"]["t2i"]["R@1"] == 50.0 and doc["dense"]["i2t"]["R@1"] == pytest.approx(66.67)


def test_karpathy_and_csv_layouts(tmp_path):
    import json

    from PIL import Image

    (tmp_path / "images").mkdir()
    entries = []
    for i, split in enumerate(["train", "train", "val", "test"]):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "images" / f"{i}.jpg")
        entries.append({"filename": f"{i}.jpg", "split": split,
                        "sentences": [{"raw": f"caption {i}.{j}"} for j in range(5)]})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    pairs = load_pairs(tmp_path)
    assert len(pairs.images) == 4 and len(pairs.captions) == 20 and all(p.is_file() for p in pairs.images)
    test = pairs.split("test")
    assert [p.name for p in test.images] == ["3.jpg"] and test.captions[0] == "caption 3.0"
    assert test.caption_image.tolist() == [0] * 5
    assert len(pairs.split(("train", "restval")).images) == 2

    (tmp_path / "pairs.csv").write_text("path,caption\nimages/0.jpg,a red one\nimages/1.jpg,b\nimages/0.jpg,c\n")
    pairs = load_pairs(tmp_path / "pairs.csv")
    assert len(pairs.images) == 2 and pairs.caption_image.tolist() == [0, 1, 0]
    assert pairs.images[0] == tmp_path / "images" / "0.jpg"

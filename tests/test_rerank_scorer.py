"""The co-attention scorer against a plain, separately written reference of the formula, and token features
against open_clip's own pooled outputs (the class-token row and the end-of-text row are the embeddings)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retrieval.rerank.scorer import PARAMS
from training.torch_scorer import CoAttentionScorer, load_params, save_params


def _softmax(x: list[float]) -> list[float]:
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8))


def _direction(x, x_mask, y, y_mask, wq, wk, wv, wo, heads):
    """Tokens of x attend to the tokens of y: mean over valid x tokens of cos(x_i, MultiHead(x_i, y, y))."""
    d = x.shape[1]
    dk = d // heads
    cosines = []
    for i in range(x.shape[0]):
        if not x_mask[i]:
            continue
        concat = np.zeros(d)
        for h in range(heads):
            sl = slice(h * dk, (h + 1) * dk)
            q = (x[i] @ wq)[sl]
            keys = [j for j in range(y.shape[0]) if y_mask[j]]
            logits = [float(q @ (y[j] @ wk)[sl]) / math.sqrt(dk) for j in keys]
            weights = _softmax(logits)
            head = np.zeros(dk)
            for w, j in zip(weights, keys, strict=True):
                head += w * (y[j] @ wv)[sl]
            concat[sl] = head
        cosines.append(_cos(x[i], concat @ wo))
    return sum(cosines) / len(cosines)


def reference_score(dense, text, tmask, image, imask, W, lam, heads):
    s_t = _direction(text, tmask, image, imask, W["w_q_text"], W["w_k_image"], W["w_v_image"], W["w_o_text"],
                     heads)
    s_i = _direction(image, imask, text, tmask, W["w_q_image"], W["w_k_text"], W["w_v_text"], W["w_o_image"],
                     heads)
    return dense + lam * 0.5 * (s_t + s_i), s_t, s_i


def _case(rng, b=3, lt=7, li=9, d=16):
    text = rng.normal(size=(b, lt, d))
    image = rng.normal(size=(b, li, d))
    tmask = np.zeros((b, lt), bool)
    for r, n in enumerate([7, 3, 1][:b]):
        tmask[r, 1:1 + n] = True  # start token and padding masked, like real captions
    tmask[0, 0] = True
    imask = np.ones((b, li), bool)
    imask[1, -3:] = False
    dense = rng.uniform(-1, 1, size=b)
    return dense, text, tmask, image, imask


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("learned", [False, True])
def test_scorer_equals_reference(heads, learned):
    rng = np.random.default_rng(heads + 10 * learned)
    dense, text, tmask, image, imask = _case(rng)
    d = text.shape[-1]
    scorer = CoAttentionScorer(d, heads=heads, lam=0.7).double()
    W = {n: np.eye(d) for n in PARAMS}
    if learned:
        with torch.no_grad():
            for n in PARAMS:
                W[n] = rng.normal(scale=0.5, size=(d, d))
                getattr(scorer, n).copy_(torch.from_numpy(W[n]))
        scorer.identity = False
    t = torch.from_numpy
    got = scorer(t(dense), t(text), t(tmask), t(image), t(imask)).detach().numpy()
    s_t, s_i = (v.detach().numpy() for v in scorer.directions(t(text), t(tmask), t(image), t(imask)))
    for b in range(len(dense)):
        lam = float(scorer.lam.detach())  # 0.7 as stored (float32)
        want, want_t, want_i = reference_score(dense[b], text[b], tmask[b], image[b], imask[b], W, lam, heads)
        assert got[b] == pytest.approx(want, abs=1e-9)
        assert (s_t[b], s_i[b]) == pytest.approx((want_t, want_i), abs=1e-9)


def test_one_query_broadcasts_against_many_candidates():
    rng = np.random.default_rng(3)
    dense, text, tmask, image, imask = _case(rng)
    scorer = CoAttentionScorer(16, heads=4).double()
    t = torch.from_numpy
    many = scorer(t(dense), t(text[:1]), t(tmask[:1]), t(image), t(imask)).detach().numpy()
    for b in range(3):
        one = scorer(t(dense[b:b + 1]), t(text[:1]), t(tmask[:1]), t(image[b:b + 1]), t(imask[b:b + 1]))
        assert many[b] == pytest.approx(float(one[0].detach()), abs=1e-12)


def test_params_file_roundtrip(tmp_path):
    scorer = CoAttentionScorer(16, heads=4, lam=0.3)
    with torch.no_grad():
        scorer.w_q_text.add_(1.0)
    path = tmp_path / "r.safetensors"
    save_params(scorer, path, model="M", weights="sha256:x")
    back = load_params(path, dim=16, weights="sha256:x")
    assert not back.identity and back.heads == 4
    assert float(back.lam.detach()) == pytest.approx(0.3)
    assert torch.equal(back.w_q_text, scorer.w_q_text.detach())
    from retrieval.errors import ModelMismatch

    with pytest.raises(ModelMismatch):
        load_params(path, dim=32)
    with pytest.raises(ModelMismatch):
        load_params(path, dim=16, weights="sha256:other")


# ---- token features -------------------------------------------------------------------------------
def test_class_token_row_is_the_image_embedding(encoder):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8)
    pooled, tokens = encoder.encode_pixels_with_tokens(pixels)
    assert tokens.shape == (3, 1 + 7 * 7, encoder.dim)
    np.testing.assert_array_equal(pooled, encoder.encode_pixels(pixels))
    with torch.inference_mode():
        raw = encoder.model.encode_image(encoder.pixels_to_tensor(pixels)).numpy()
    np.testing.assert_allclose(tokens[:, 0], raw, rtol=1e-5, atol=1e-5)


def test_end_of_text_row_is_the_text_embedding(encoder):
    texts = ["a dog", "a red car parked next to a very long wall of bricks", "x"]
    tt = encoder.encode_text_tokens(texts)
    with torch.inference_mode():
        raw = encoder.model.encode_text(encoder.tokenizer(texts)).numpy()
    eot = tt.mask.shape[1] - 1 - np.argmax(tt.mask[:, ::-1], axis=1)
    np.testing.assert_allclose(tt.tokens[np.arange(3), eot], raw, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tt.pooled, encoder.encode_texts(texts), atol=1e-6)
    lengths = (encoder.tokenizer(texts).argmax(-1)).numpy()  # index of end-of-text
    assert tt.mask.sum(1).tolist() == lengths.tolist()  # words + end-of-text, no start token, no padding
    assert not tt.mask[:, 0].any()


def test_other_architectures_are_refused():
    from retrieval.errors import TokensUnsupported
    from retrieval.model.token_features import check_token_support

    class NotAViT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(2, 2)

    with pytest.raises(TokensUnsupported, match="ViT-B-32"):
        check_token_support(NotAViT())

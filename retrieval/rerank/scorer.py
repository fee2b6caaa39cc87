"""The co-attention scorer that reranks the dense top-k: image patch tokens against text word tokens.

    CoAttention(Q1,K1,V1,Q2,K2,V2) = [ softmax(Q1 K2^T / sqrt(d_k)) V2 , softmax(Q2 K1^T / sqrt(d_k)) V1 ]
    MultiHead(Q,K,V) = Concat(head_1..head_h) W_O,   head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

Text tokens attend to image tokens and image tokens attend to text tokens. Each direction's agreement is
the mean, over the attending tokens (padding masked), of the cosine between a token and what it attended
to; the co-attention score is the mean of the two directions, and the final score fuses it with the dense
cosine: s = s_dense + lambda * s_coatt. The candidate set never changes, only its order.

By default the scorer has no parameters (identity W^Q, W^K, W^V, W_O; the heads split the dimension;
lambda = 1). `crossmodal train-reranker` (training/train_reranker.py) learns W's and lambda with the
encoder frozen and saves them as a small safetensors file (params.py), which an index records.

This is the numpy implementation queries run, so a reranked query never imports torch. Training and `eval`
use the torch module training/torch_scorer.py: the same formula, parameters and operation order in
float32, tested equal (tests/test_onnx_rerank.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

DEFAULT_HEADS = 8
DEFAULT_LAMBDA = 1.0
PARAMS = ("w_q_text", "w_k_text", "w_v_text", "w_o_text", "w_q_image", "w_k_image", "w_v_image", "w_o_image")


class NumpyCoAttention:
    """s = s_dense + lambda * mean(text->image, image->text agreement); identity projections by default."""

    def __init__(self, dim: int, heads: int = DEFAULT_HEADS, lam: float = DEFAULT_LAMBDA,
                 weights: Mapping[str, np.ndarray] | None = None) -> None:
        if dim % heads:
            raise ValueError(f"{heads} heads do not split dimension {dim}")
        self.dim, self.heads = dim, heads
        self.lam = np.float32(lam)
        self.identity = weights is None
        self.w = {n: np.ascontiguousarray(weights[n], dtype=np.float32) for n in PARAMS} if weights else {}

    @classmethod
    def from_torch(cls, scorer: Any) -> NumpyCoAttention:
        """The numpy twin of a training.torch_scorer.CoAttentionScorer (same parameters)."""
        weights = None if scorer.identity else {n: getattr(scorer, n).detach().float().cpu().numpy()
                                                for n in PARAMS}
        return cls(scorer.dim, scorer.heads, float(scorer.lam.detach()), weights)

    def _proj(self, x: np.ndarray, name: str) -> np.ndarray:
        return x if self.identity else x @ self.w[name]

    def _split(self, x: np.ndarray) -> np.ndarray:
        """(B, L, d) -> (B, h, L, d_k)."""
        b, n, _ = x.shape
        return np.ascontiguousarray(x.reshape(b, n, self.heads, self.dim // self.heads).transpose(0, 2, 1, 3))

    def _attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, key_mask: np.ndarray) -> np.ndarray:
        """MultiHead(q, k, v) before W_O: (B, Lq, d); batch dims broadcast (1 query vs B candidates)."""
        qh, kh = self._split(q), self._split(k)
        vh = kh if v is k else self._split(v)
        logits = (qh @ kh.swapaxes(-1, -2)) * np.float32(1.0 / math.sqrt(self.dim // self.heads))
        logits = np.where(key_mask[:, None, None, :], logits, np.float32(-np.inf))
        logits = np.exp(logits - logits.max(axis=-1, keepdims=True))
        out = (logits / logits.sum(axis=-1, keepdims=True)) @ vh  # (B, h, Lq, d_k)
        b, _, lq, _ = out.shape
        return np.asarray(out.transpose(0, 2, 1, 3).reshape(b, lq, self.dim))

    @staticmethod
    def _agreement(x: np.ndarray, attended: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Mean over x's valid tokens of cos(x_i, attended_i); x may broadcast against attended."""
        dot = (x * attended).sum(axis=-1)
        norms = np.linalg.norm(x, axis=-1) * np.linalg.norm(attended, axis=-1)
        cos = dot / np.maximum(norms, np.float32(1e-8))
        m = mask.astype(cos.dtype)
        return np.asarray((cos * m).sum(axis=-1) / np.maximum(m.sum(axis=-1), np.float32(1.0)))

    def directions(self, text: np.ndarray, text_mask: np.ndarray, image: np.ndarray,
                   image_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(text->image, image->text) agreement, each (B,); a leading 1 on either side broadcasts."""
        text, image = np.asarray(text, np.float32), np.asarray(image, np.float32)
        text_mask, image_mask = np.asarray(text_mask, bool), np.asarray(image_mask, bool)
        t_att = self._attend(self._proj(text, "w_q_text"), self._proj(image, "w_k_image"),
                             image if self.identity else self._proj(image, "w_v_image"), image_mask)
        i_att = self._attend(self._proj(image, "w_q_image"), self._proj(text, "w_k_text"),
                             text if self.identity else self._proj(text, "w_v_text"), text_mask)
        t_att, i_att = self._proj(t_att, "w_o_text"), self._proj(i_att, "w_o_image")
        b = max(text.shape[0], image.shape[0])
        s_t = np.broadcast_to(self._agreement(text, t_att, text_mask), (b,))
        s_i = np.broadcast_to(self._agreement(image, i_att, image_mask), (b,))
        return s_t, s_i

    def coattention(self, text: np.ndarray, text_mask: np.ndarray, image: np.ndarray,
                    image_mask: np.ndarray) -> np.ndarray:
        """The co-attention score (B,): the mean of the two directions' agreement."""
        s_t, s_i = self.directions(text, text_mask, image, image_mask)
        return np.asarray(np.float32(0.5) * (s_t + s_i))

    def __call__(self, dense: np.ndarray, text: np.ndarray, text_mask: np.ndarray, image: np.ndarray,
                 image_mask: np.ndarray) -> np.ndarray:
        """s = s_dense + lambda * s_coatt, (B,) float32."""
        co = self.coattention(text, text_mask, image, image_mask)
        return (np.asarray(dense, np.float32) + self.lam * co).astype(np.float32, copy=False)

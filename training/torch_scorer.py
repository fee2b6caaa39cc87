"""The co-attention scorer as a torch module, for training the reranker and for `eval`; queries use its numpy
twin (retrieval/rerank/scorer.py: same formula, parameters and operation order, tested equal).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrieval.rerank.params import FORMAT, checked_meta
from retrieval.rerank.scorer import DEFAULT_HEADS, DEFAULT_LAMBDA, PARAMS


class CoAttentionScorer(nn.Module):
    """Multi-head co-attention agreement between token sets; the formula is in retrieval/rerank/scorer.py.

    Projections act on the right (x @ W), W (d, d). `identity=True` skips them (the parameter-free
    default); training or loading a file turns it off.
    """

    def __init__(self, dim: int, heads: int = DEFAULT_HEADS, lam: float = DEFAULT_LAMBDA) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} heads do not split dimension {dim}")
        self.dim, self.heads = dim, heads
        for name in PARAMS:
            self.register_parameter(name, nn.Parameter(torch.eye(dim)))
        self.lam = nn.Parameter(torch.tensor(float(lam)))
        self.identity = True

    def _proj(self, x: Any, name: str) -> Any:
        return x if self.identity else x @ getattr(self, name)

    def _heads(self, x: Any) -> Any:
        """(B, L, d) -> (B, h, L, d_k), contiguous (one copy, reused for keys and values)."""
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.dim // self.heads).transpose(1, 2).contiguous()

    def _attend(self, q: Any, k: Any, v: Any, key_mask: Any) -> Any:
        """MultiHead(q, k, v) before W_O: (B, Lq, d). Batch dims broadcast (1 query vs B candidates)."""
        qh = self._heads(q)
        kh = self._heads(k)
        vh = kh if v is k else self._heads(v)
        logits = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(self.dim // self.heads))
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        out = torch.softmax(logits, dim=-1) @ vh  # (B, h, Lq, d_k)
        b, _, lq, _ = out.shape
        return out.transpose(1, 2).reshape(b, lq, self.dim)

    @staticmethod
    def _agreement(x: Any, attended: Any, mask: Any) -> Any:
        """Mean over x's valid tokens of cos(x_i, attended_i); x may broadcast against attended."""
        dot = torch.linalg.vecdot(x, attended)
        norms = torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(attended, dim=-1)
        cos = dot / norms.clamp_min(1e-8)
        m = mask.to(cos.dtype)
        return (cos * m).sum(-1) / m.sum(-1).clamp_min(1.0)

    def directions(self, text: Any, text_mask: Any, image: Any, image_mask: Any) -> tuple[Any, Any]:
        """(text->image agreement, image->text agreement), each (B,), for B text/image pairs.

        text (B, Lt, d), text_mask (B, Lt) bool, image (B, Li, d), image_mask (B, Li) bool; a leading
        dimension of 1 on either side broadcasts (one query against many candidates).
        """
        t_att = self._attend(self._proj(text, "w_q_text"), self._proj(image, "w_k_image"),
                             image if self.identity else self._proj(image, "w_v_image"), image_mask)
        i_att = self._attend(self._proj(image, "w_q_image"), self._proj(text, "w_k_text"),
                             text if self.identity else self._proj(text, "w_v_text"), text_mask)
        t_att, i_att = self._proj(t_att, "w_o_text"), self._proj(i_att, "w_o_image")
        b = max(text.shape[0], image.shape[0])
        s_t = self._agreement(text, t_att, text_mask).expand(b)
        s_i = self._agreement(image, i_att, image_mask).expand(b)
        return s_t, s_i

    def coattention(self, text: Any, text_mask: Any, image: Any, image_mask: Any) -> Any:
        s_t, s_i = self.directions(text, text_mask, image, image_mask)
        return 0.5 * (s_t + s_i)

    def forward(self, dense: Any, text: Any, text_mask: Any, image: Any, image_mask: Any) -> Any:
        """s = s_dense + lambda * s_coatt, (B,)."""
        return dense + self.lam * self.coattention(text, text_mask, image, image_mask)


def save_params(scorer: Any, path: str | Path, model: str = "", weights: str = "") -> None:
    """Write learned W's and lambda as safetensors, with the model they were trained for in the metadata."""
    from safetensors.torch import save_file

    tensors = {n: getattr(scorer, n).detach().float().cpu().contiguous() for n in PARAMS}
    tensors["lam"] = scorer.lam.detach().float().cpu().reshape(1)
    meta = {"format": FORMAT, "dim": str(scorer.dim), "heads": str(scorer.heads), "model": model,
            "weights": weights}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_params(path: str | Path, dim: int | None = None, weights: str | None = None) -> Any:
    """A (torch) scorer with the file's parameters; refuses a file made for another model (dim or weights)."""
    from safetensors.torch import load_file

    fdim, heads = checked_meta(path, dim, weights)
    tensors = load_file(str(path))
    scorer = CoAttentionScorer(fdim, heads)
    with torch.no_grad():
        for n in PARAMS:
            getattr(scorer, n).copy_(tensors[n])
        scorer.lam.copy_(tensors["lam"][0])
    scorer.identity = False
    return scorer.eval()

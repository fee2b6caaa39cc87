"""Token-level features from the same open_clip model the index uses, for the co-attention reranker.

Image side: every output token of the vision transformer (class token first, then the patches) through
the model's own final norm (`ln_post`) and projection (`proj`), i.e. in the joint embedding space; the
class-token row is exactly what `encode_image` returns before normalisation. Text side: every token's
output through `ln_final` and `text_projection`; the end-of-text row is what `encode_text` returns.
Both come from ONE forward pass that also yields the pooled vector, so indexing never runs a tower twice.

Only open_clip `CLIP` models with a ViT image tower and the built-in causal text tower qualify; anything
else raises `TokensUnsupported` naming what is supported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.errors import TokensUnsupported

SUPPORTED = ("open_clip CLIP models with a ViT image tower (VisionTransformer with class-token or average "
             "pooling, no attentional pooler) and the built-in causal text transformer, e.g. ViT-B-32, "
             "ViT-B-16, ViT-L-14, ViT-H-14, ViT-S-32")


@dataclass(frozen=True)
class TextTokens:
    """Per-token text features: `tokens` (B, L, d) float32, `mask` (B, L) bool, `pooled` (B, d) float32.

    The mask keeps the word tokens and the end-of-text token; start-of-text is left out (in a causal tower
    its output is the same for every caption, so it carries no signal) and so is the padding.
    """

    tokens: np.ndarray
    mask: np.ndarray
    pooled: np.ndarray


def check_vision(model: Any) -> Any:
    """The model's VisionTransformer, or TokensUnsupported saying why not."""
    visual = getattr(model, "visual", None)
    missing = [a for a in ("transformer", "ln_post", "proj", "_embeds", "conv1") if not hasattr(visual, a)]
    if visual is None or missing:
        kind = type(visual).__name__ if visual is not None else "no image tower"
        raise TokensUnsupported(f"reranking needs a ViT image tower, this model has {kind}; supported: "
                                f"{SUPPORTED}")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
        raise TokensUnsupported(f"this model's ViT pools with an attentional pooler or a norm after pooling; "
                                f"supported: {SUPPORTED}")
    if getattr(visual, "pool_type", "tok") not in ("tok", "avg") or visual.proj is None:
        raise TokensUnsupported(f"this model's ViT has no class-token/average pooling with a projection; "
                                f"supported: {SUPPORTED}")
    return visual


def check_text(model: Any) -> None:
    """Refuse text towers other than open_clip's built-in causal, argmax-pooled transformer."""
    need = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    if any(getattr(model, a, None) is None for a in need) or getattr(model, "text_pool_type", None) != "argmax":
        raise TokensUnsupported(f"reranking needs open_clip's built-in causal text tower; supported: {SUPPORTED}")


def check_token_support(model: Any) -> None:
    """Raise TokensUnsupported unless both towers give token features."""
    check_vision(model)
    check_text(model)


def image_forward(model: Any, pixels: Any) -> tuple[Any, Any]:
    """(pooled (B,d), tokens (B,1+P,d)) from one vision pass; torch tensors, unnormalised.

    `pooled` is computed with the same operations, in the same order, as open_clip's VisionTransformer, so
    it equals `model.encode_image` exactly (not just closely).
    """
    visual = check_vision(model)
    x = visual._embeds(pixels)
    x = visual.transformer(x)
    x = visual.ln_post(x)
    pooled = x[:, 1:].mean(dim=1) if visual.pool_type == "avg" else x[:, 0]
    return pooled @ visual.proj, x @ visual.proj


def text_forward(model: Any, tokens: Any) -> tuple[Any, Any, Any]:
    """(pooled (B,d), tokens (B,L,d), mask (B,L)) for tokenised text, run only up to the longest caption."""
    import torch

    check_text(model)
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    proj = model.text_projection
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]
    if isinstance(proj, torch.nn.Module):
        pooled, feats = proj(pooled), proj(x)
    else:
        pooled, feats = pooled @ proj, x @ proj
    pos = torch.arange(length, device=x.device)[None, :]
    mask = (pos >= 1) & (pos <= eot[:, None])
    return pooled, feats, mask


def batched_text_tokens(n: int, dim: int, lengths: np.ndarray, batch_size: int,
                        run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
                        ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Vectors and per-text valid tokens, encoding texts in batches of similar length (less padding).

    `run(rows)` encodes those rows and returns (unit vectors (b,d), token features (b,L,d), mask (b,L)) as
    numpy; it is the backend's (torch or ONNX Runtime) single text pass.
    """
    out = np.zeros((n, dim), dtype=np.float32)
    toks: list[np.ndarray] = [np.zeros((0, dim), np.float32)] * n
    order = np.argsort(lengths, kind="stable")
    for i in range(0, len(order), batch_size):
        sel = order[i:i + batch_size]
        pooled, feats, mask = run(sel)
        out[sel] = pooled
        for j, row in enumerate(sel):
            toks[row] = feats[j][mask[j]]
    return out, toks

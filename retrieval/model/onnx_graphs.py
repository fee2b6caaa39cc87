"""What the ONNX exporter traces: checks that a model and its tokenizer are of a kind it handles, the
traceable twin of nn.MultiheadAttention, and the text and image tower modules (with token-feature outputs).

Export, verification and installation live in onnx_export.py; the reader in onnx_encoder.py.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from retrieval.errors import ExportUnsupported


def clean_mode(tokenizer: Any) -> str:
    from open_clip import tokenizer as tk

    if type(tokenizer) is not tk.SimpleTokenizer:
        raise ExportUnsupported(f"tokenizer {type(tokenizer).__name__} is not CLIP's BPE tokenizer")
    if getattr(tokenizer, "reduction_fn", None) is not None:
        raise ExportUnsupported("tokenizer uses a reduction mask")
    modes = {tk._clean_lower: "lower", tk._clean_whitespace: "whitespace", tk._clean_canonicalize: "canonicalize"}
    mode = modes.get(tokenizer.clean_fn)
    if mode is None:
        raise ExportUnsupported("tokenizer uses an unknown clean function")
    return mode


def check_exportable(model: Any) -> None:
    import torch

    for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final", "visual"):
        if not hasattr(model, attr):
            raise ExportUnsupported(f"no exportable text tower ({type(model).__name__} has no {attr})")
    if getattr(model, "text_pool_type", None) != "argmax" or getattr(model, "attn_mask", None) is None:
        raise ExportUnsupported("the text tower is not causal with argmax pooling")
    for m in model.modules():
        if isinstance(m, torch.nn.MultiheadAttention) and (
                not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn or m.in_proj_bias is None):
            raise ExportUnsupported("an attention layer has a layout this exporter does not handle")


def extra_special_tokens(tokenizer: Any) -> list[str]:
    """Special tokens past CLIP's 49,408 (start and end of text are the last two of those)."""
    return [t for t, i in sorted(tokenizer.encoder.items(), key=lambda kv: kv[1]) if i >= 49408]


def make_modules() -> tuple[type, type, type]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    class TraceableAttention(torch.nn.Module):
        """nn.MultiheadAttention self-attention with shape-generic reshapes (its own bake the trace shapes)."""

        def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
            super().__init__()
            self.mha = mha
            self.heads = mha.num_heads
            self.head_dim = mha.embed_dim // mha.num_heads
            self.batch_first = mha.batch_first

        def forward(self, q: Any, k: Any = None, v: Any = None, key_padding_mask: Any = None,
                    need_weights: bool = False, attn_mask: Any = None, **_: Any) -> tuple[Any, None]:
            if key_padding_mask is not None or (k is not None and k is not q) or (v is not None and v is not q):
                raise ExportUnsupported("attention with padding masks or cross-attention")
            x = q if self.batch_first else q.transpose(0, 1)
            n, width = x.shape[1], self.mha.embed_dim
            qkv = F.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias)
            qkv = qkv.reshape(-1, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            scores = (qkv[0] * (1.0 / math.sqrt(self.head_dim))) @ qkv[1].transpose(-2, -1)
            if attn_mask is not None:
                if attn_mask.dtype == torch.bool:
                    attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(attn_mask,
                                                                                         float("-inf"))
                scores = scores + attn_mask
            out = (scores.softmax(dim=-1) @ qkv[2]).transpose(1, 2).reshape(-1, n, width)
            out = self.mha.out_proj(out)
            return (out if self.batch_first else out.transpose(0, 1)), None

    class TextTower(torch.nn.Module):
        """encode_text_trimmed over whatever length the caller feeds (the dynamic axis); with `tokens`, also
        every position's features as token_features.text_forward computes them (the mask is the caller's)."""

        def __init__(self, model: Any, tokens: bool = False) -> None:
            super().__init__()
            self.model = model
            self.tokens = tokens

        def forward(self, tokens: Any) -> Any:
            m = self.model
            n = tokens.shape[1]
            cast = m.transformer.get_cast_dtype()
            x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:n].to(cast)
            x = m.transformer(x, attn_mask=m.attn_mask[:n, :n])
            x = m.ln_final(x)
            pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
            proj = m.text_projection
            if proj is not None:
                pooled = proj(pooled) if isinstance(proj, torch.nn.Module) else pooled @ proj
            if not self.tokens:
                return pooled
            return pooled, (proj(x) if isinstance(proj, torch.nn.Module) else x @ proj)

    class ImageTower(torch.nn.Module):
        """encode_image; with `tokens`, token_features.image_forward (the same pooled vector, plus every token)."""

        def __init__(self, model: Any, tokens: bool = False) -> None:
            super().__init__()
            self.model = model
            self.tokens = tokens

        def forward(self, pixels: Any) -> Any:
            if not self.tokens:
                return self.model.encode_image(pixels)
            from retrieval.model.token_features import image_forward

            return image_forward(self.model, pixels)

    return TraceableAttention, TextTower, ImageTower


@contextlib.contextmanager
def traceable_attention(model: Any, wrapper: type) -> Iterator[None]:
    """Swap every nn.MultiheadAttention for the traceable twin (same weights), and back afterwards."""
    import torch

    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, torch.nn.MultiheadAttention)]
    try:
        for parent, name, child in swaps:
            setattr(parent, name, wrapper(child))
        yield
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)


def cpu_fp32_copy(model: Any) -> Any:
    import copy

    import torch

    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32)

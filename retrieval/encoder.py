"""The one front door to the open_clip dual encoder: load once, embed images and texts as unit vectors."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelSpec
from .errors import ModelUnavailable, UserError
from .imageio import Preprocess, decode_for_model, usable_cores
from .weights import (
    check_model,
    check_tag,
    file_sha256,
    hub_offline,
    hub_reachable,
    missing_weights_message,
    tag_is_cached,
)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class Fingerprint:
    """What makes two indexes comparable: architecture, exact weights and embedding width."""

    model: str
    pretrained: str  # the tag, or the checkpoint's absolute path (informational)
    weights: str  # the tag, or "sha256:<hex>" of the checkpoint file (what equality uses)
    dim: int

    def same_model(self, other: Fingerprint) -> bool:
        return (self.model, self.weights, self.dim) == (other.model, other.weights, other.dim)

    def describe(self) -> str:
        return f"{self.model} / {self.pretrained}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        return cls(**json.loads(text))


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls several times faster than fp32; elsewhere bf16 is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def resolve_device(device: str) -> str:
    """auto -> cuda, then mps, then cpu; an explicit device that is absent is a user error."""
    import torch

    if device not in DEVICES:
        raise UserError(f"unknown device '{device}' (choose from {', '.join(DEVICES)})")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but torch sees no MPS device")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """auto -> fp16 on CUDA, bf16 on CPUs with fast bf16, else fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if precision != "auto":
        if precision == "fp16" and device == "cpu":
            raise UserError("fp16 is not supported on the CPU; use bf16 or fp32")
        return precision
    if device == "cuda":
        return "fp16"
    if device == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def _silence_open_clip() -> None:
    # open_clip logs through the root logger; our own messages are the ones users should read.
    logging.getLogger().setLevel(logging.CRITICAL)


def _create(spec: ModelSpec, device: str) -> tuple[Any, Any, Preprocess]:
    import open_clip

    _silence_open_clip()
    kwargs: dict[str, Any] = {"device": device}
    if spec.pretrained_is_file():
        path = Path(spec.pretrained).expanduser()
        if not path.is_file():
            raise ModelUnavailable(f"checkpoint file not found: {path}")
        check_model(spec.name)
        try:
            model, _, _ = open_clip.create_model_and_transforms(spec.name, pretrained=str(path), **kwargs)
        except Exception as e:  # noqa: BLE001 - a wrong file is the user's to fix
            raise ModelUnavailable(
                f"cannot load checkpoint {path} into {spec.name}: {str(e).splitlines()[0][:300]}") from e
    else:
        check_tag(spec.name, spec.pretrained)
        cached = tag_is_cached(spec.name, spec.pretrained)
        if not cached and not hub_reachable():
            raise ModelUnavailable(missing_weights_message(spec.name, spec.pretrained))
        try:
            with hub_offline(cached):
                model, _, _ = open_clip.create_model_and_transforms(spec.name, pretrained=spec.pretrained,
                                                                    **kwargs)
        except Exception as e:  # noqa: BLE001 - download or load failure
            raise ModelUnavailable(missing_weights_message(spec.name, spec.pretrained)
                                   + f" ({str(e).splitlines()[0][:200]})") from e
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    pre = Preprocess(
        size=int(size),
        mean=tuple(cfg.get("mean", Preprocess.mean)),
        std=tuple(cfg.get("std", Preprocess.std)),
        resize_mode=cfg.get("resize_mode", "shortest"),
        interpolation=cfg.get("interpolation", "bicubic"),
        fill_color=int(cfg.get("fill_color", 0)),
    )
    tokenizer = open_clip.get_tokenizer(spec.name)
    return model, tokenizer, pre


class Encoder:
    """A loaded model on one device and precision; all outputs are float32, L2-normalised, numpy."""

    def __init__(self, model: Any, tokenizer: Any, preprocess: Preprocess, device: str, precision: str,
                 fingerprint: Fingerprint) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.device = device
        self.precision = precision
        self.fingerprint = fingerprint
        self.dim = fingerprint.dim

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        import torch

        with torch.inference_mode():
            if self.precision == "fp32":
                yield
            else:
                dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
                with torch.autocast(device_type=self.device, dtype=dtype):
                    yield

    @staticmethod
    def _normalise(x: Any) -> np.ndarray:
        v = x.float().cpu().numpy().astype(np.float32, copy=False)
        n = np.linalg.norm(v, axis=1, keepdims=True)
        return v / np.maximum(n, 1e-12)

    def pixels_to_tensor(self, pixels: np.ndarray | Any) -> Any:
        """uint8 (B,H,W,3) -> normalised float (B,3,H,W) on the model's device, like ToTensor+Normalize.

        `pixels` may already be a uint8 tensor (GPU-decoded images stay on the device)."""
        import torch

        if isinstance(pixels, torch.Tensor):
            t = pixels.to(self.device)
        else:
            t = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        t = t.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.preprocess.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std, device=self.device).view(1, 3, 1, 1)
        return (t - mean) / std

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embed a batch of prepared uint8 images (see imageio.prepare)."""
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._inference():
            return self._normalise(self.model.encode_image(self.pixels_to_tensor(pixels)))

    def encode_image_bytes(self, data: bytes, raw: bool = False) -> np.ndarray:
        """Embed one query image given as file bytes; decode errors surface as DecodeError."""
        decoded = decode_for_model(data, self.preprocess, raw=raw)
        return self.encode_pixels(decoded.pixels[None])[0]

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts in batches; returns (len(texts), dim). Similar lengths are batched together."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        tokens = self.tokenizer(list(texts))
        order = np.argsort(_token_lengths(tokens), kind="stable")
        for i in range(0, len(order), batch_size):
            sel = order[i:i + batch_size]
            with self._inference():
                out[sel] = self._normalise(encode_text_trimmed(self.model, tokens[sel].to(self.device)))
        return out

    # ---- token features for the co-attention reranker (see retrieval/tokens.py) ----------------
    def encode_pixels_with_tokens(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ONE vision pass: (unit pooled vectors (B,d) equal to encode_pixels, token features (B,1+P,d))."""
        from .tokens import image_forward

        with self._inference():
            pooled, tokens = image_forward(self.model, self.pixels_to_tensor(pixels))
            return self._normalise(pooled), tokens.float().cpu().numpy()

    def encode_text_tokens(self, texts: Sequence[str]) -> Any:
        """Per-token text features of one batch of texts (retrieval.tokens.TextTokens, padded to the longest)."""
        from .tokens import TextTokens, text_forward

        with self._inference():
            pooled, feats, mask = text_forward(self.model, self.tokenizer(list(texts)).to(self.device))
            return TextTokens(tokens=feats.float().cpu().numpy(), mask=mask.cpu().numpy(),
                              pooled=self._normalise(pooled))

    def encode_texts_with_tokens(self, texts: Sequence[str], batch_size: int = 64
                                 ) -> tuple[np.ndarray, list[np.ndarray]]:
        """ONE text pass, batched like encode_texts: (its vectors, each text's valid tokens (n_i, d))."""
        from .tokens import batched_text_tokens, text_forward

        tokens = self.tokenizer(list(texts)) if len(texts) else None

        def run(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            with self._inference():
                pooled, feats, mask = text_forward(self.model, tokens[sel].to(self.device))
                return self._normalise(pooled), feats.float().cpu().numpy(), mask.cpu().numpy()

        lengths = _token_lengths(tokens) if tokens is not None else np.zeros(0, np.int64)
        return batched_text_tokens(len(texts), self.dim, lengths, batch_size, run)


def _token_lengths(tokens: Any) -> np.ndarray:
    return (tokens.argmax(dim=-1) + 1).cpu().numpy()


def encode_text_trimmed(model: Any, tokens: Any) -> Any:
    """open_clip's CLIP.encode_text without the padding tail: exact for causal, argmax-pooled towers.

    A causal text tower's end-of-text output never sees the padding after it, so running only up to the
    longest caption in the batch gives the same vector at a fraction of the 77-token cost. Any other text
    tower takes open_clip's own path.
    """
    import torch

    attn_mask = getattr(model, "attn_mask", None)
    if (getattr(model, "text_pool_type", None) != "argmax" or attn_mask is None
            or not hasattr(model, "positional_embedding") or not hasattr(model, "token_embedding")):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Module) else x @ proj
    return x


def fingerprint_for(spec: ModelSpec, dim: int, checkpoint_sha: str | None = None) -> Fingerprint:
    """Build the fingerprint; hashing a checkpoint file is skipped when the caller already knows it."""
    if spec.pretrained_is_file():
        path = str(Path(spec.pretrained).expanduser().resolve())
        sha = checkpoint_sha or file_sha256(path)
        return Fingerprint(model=spec.name, pretrained=path, weights=f"sha256:{sha}", dim=dim)
    return Fingerprint(model=spec.name, pretrained=spec.pretrained, weights=spec.pretrained, dim=dim)


def load_encoder(spec: ModelSpec, checkpoint_sha: str | None = None) -> Encoder:
    """Load the model named by `spec`; raises ModelUnavailable with a fix when weights cannot be had."""
    import torch

    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    if device == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(usable_cores())
    model, tokenizer, pre = _create(spec, device)
    model.eval()
    with torch.inference_mode():
        dim = int(model.encode_text(tokenizer(["x"]).to(device)).shape[-1])
    return Encoder(model, tokenizer, pre, device, precision, fingerprint_for(spec, dim, checkpoint_sha))

"""The open_clip dual encoder on torch: load once, embed images and texts as unit vectors.

Indexing, training and `eval` run here; queries usually run on the model's ONNX export instead
(onnx_encoder.py), which implements the same `Encoder` protocol (protocol.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import ModelUnavailable
from retrieval.hardware import usable_cores
from retrieval.media.decode import Preprocess
from retrieval.model.custom_config import register
from retrieval.model.protocol import Encoder, unit_rows
from retrieval.model.spec import Fingerprint, ModelSpec, fingerprint_for, resolve_device, resolve_precision
from retrieval.model.weights import (
    check_model_name,
    check_tag,
    hub_offline,
    hub_reachable,
    missing_weights_message,
    tag_is_cached,
)


def _silence_open_clip() -> None:
    # open_clip logs through the root logger; our own messages are the ones users should read.
    logging.getLogger().setLevel(logging.CRITICAL)


@contextlib.contextmanager
def loaded_weights_only() -> Iterator[None]:
    """While open_clip builds a model whose every weight is loaded next (its checkpoint loads strictly),
    skip the random initialisation: torch.nn.init's in-place initialisers leave the tensors as they are.
    That init cost ~1 s of a ViT-B-32's 1.7 s load on 2 cores. Buffers open_clip computes (the causal
    mask) do not use these functions, and a missing weight still fails the strict load."""
    import torch.nn.init as init

    with _INIT_LOCK:
        names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
        saved = {n: getattr(init, n) for n in names}
        for n in names:
            setattr(init, n, _keep)
        try:
            yield
        finally:
            for n, f in saved.items():
                setattr(init, n, f)


def _keep(tensor: Any, *args: Any, **kwargs: Any) -> Any:
    return tensor


_INIT_LOCK = threading.Lock()


def _create(spec: ModelSpec, device: str) -> tuple[Any, Any, Preprocess]:
    import open_clip

    _silence_open_clip()
    kwargs: dict[str, Any] = {"device": device}
    label = spec.name
    if spec.config is not None:  # a custom model config: registered under its private name first
        register(spec.config)
        label = spec.config.label
        if not spec.pretrained_is_file():
            raise ModelUnavailable(f"{label} is a custom model config: pass its weights with --pretrained "
                                   f"/path/to/checkpoint.pt ('{spec.pretrained}' is not a file; pretrained "
                                   f"tags name the weights of built-in models)")
    if spec.pretrained_is_file():
        path = Path(spec.pretrained).expanduser()
        if not path.is_file():
            raise ModelUnavailable(f"checkpoint file not found: {path}")
        check_model_name(spec.name)
        try:
            with loaded_weights_only():
                model, _, _ = open_clip.create_model_and_transforms(spec.name, pretrained=str(path), **kwargs)
        except Exception as e:  # noqa: BLE001 - a wrong file (or a config open_clip cannot build) is the user's
            raise ModelUnavailable(
                f"cannot load checkpoint {path} into {label}: {str(e).splitlines()[0][:300]}") from e
    else:
        check_tag(spec.name, spec.pretrained)
        cached = tag_is_cached(spec.name, spec.pretrained)
        if not cached and not hub_reachable():
            raise ModelUnavailable(missing_weights_message(spec.name, spec.pretrained))
        try:
            with hub_offline(cached), loaded_weights_only():
                model, _, _ = open_clip.create_model_and_transforms(spec.name, pretrained=spec.pretrained,
                                                                    **kwargs)
        except Exception as e:  # noqa: BLE001 - download or load failure
            raise ModelUnavailable(missing_weights_message(spec.name, spec.pretrained)
                                   + f" ({str(e).splitlines()[0][:200]})") from e
    pre = preprocess_for(model)
    try:
        tokenizer = open_clip.get_tokenizer(spec.name)
    except Exception as e:  # noqa: BLE001 - built-in names always make one; a custom config's kwargs may not
        if spec.config is None:
            raise
        raise ModelUnavailable(f"cannot make the tokenizer of {label}: {str(e).splitlines()[0][:300]}") from e
    return model, tokenizer, pre


def preprocess_for(model: Any) -> Preprocess:
    """The Preprocess an open_clip model's own preprocess config implies (what index and training decode with)."""
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return Preprocess(
        size=int(size),
        mean=tuple(cfg.get("mean", Preprocess.mean)),
        std=tuple(cfg.get("std", Preprocess.std)),
        resize_mode=cfg.get("resize_mode", "shortest"),
        interpolation=cfg.get("interpolation", "bicubic"),
        fill_color=int(cfg.get("fill_color", 0)),
    )


class TorchEncoder(Encoder):
    """A loaded model on one device and precision; all outputs are float32, L2-normalised, numpy.

    Reduced precision means the weights themselves are bf16 or fp16 (`model.to(dtype)`), not autocast: on
    a CPU with AVX512-BF16, ViT-B-32 ran 89.8 img/s with bf16 weights, 19.8 under autocast (which keeps
    fp32 weights and casts them on every call) and 21.4 in fp32."""

    backend = "torch"

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
            yield

    def _model_input(self, pixels: np.ndarray | Any) -> Any:
        """`pixels_to_tensor` in the dtype of the model's weights."""
        return self.pixels_to_tensor(pixels).to(_weight_dtype(self.model))

    def _tokens(self, texts: Sequence[str]) -> Any:
        """open_clip's token ids of `texts` cut first to what can reach the context (bpe.cap_text): its BPE is
        quadratic in a word's length, and the ONNX path's tokenizer cuts the same way, so the ids stay equal."""
        from retrieval.model.bpe import cap_texts

        return self.tokenizer(cap_texts(texts, int(getattr(self.tokenizer, "context_length", 77) or 77)))

    @staticmethod
    def _normalise(x: Any) -> np.ndarray:
        """A torch batch of vectors -> unit float32 rows in numpy."""
        return unit_rows(x.float().cpu().numpy())

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
        """Embed a batch of prepared uint8 images (see media.decode.prepare)."""
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._inference():
            return self._normalise(self.model.encode_image(self._model_input(pixels)))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts in batches; returns (len(texts), dim). Similar lengths are batched together."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        tokens = self._tokens(texts)
        order = np.argsort(_token_lengths(tokens), kind="stable")
        for i in range(0, len(order), batch_size):
            sel = order[i:i + batch_size]
            with self._inference():
                out[sel] = self._normalise(encode_text_trimmed(self.model, tokens[sel].to(self.device)))
        return out

    def zero_shot_metadata(self) -> tuple[list[str], list[str]]:
        """ImageNet class names and prompt templates ('{}' marks the class), from open_clip."""
        return open_clip_zero_shot()

    # ---- token features for the co-attention reranker (see token_features.py) ----------------
    def check_tokens(self) -> None:
        """Raise TokensUnsupported unless both towers give token features."""
        from retrieval.model.token_features import check_token_support

        check_token_support(self.model)

    def encode_pixels_with_tokens(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ONE vision pass: (unit pooled vectors (B,d) equal to encode_pixels, token features (B,1+P,d))."""
        from retrieval.model.token_features import image_forward

        with self._inference():
            pooled, tokens = image_forward(self.model, self._model_input(pixels))
            return self._normalise(pooled), tokens.float().cpu().numpy()

    def encode_text_tokens(self, texts: Sequence[str]) -> Any:
        """Per-token text features of one batch of texts (token_features.TextTokens, padded to the longest)."""
        from retrieval.model.token_features import TextTokens, text_forward

        with self._inference():
            pooled, feats, mask = text_forward(self.model, self._tokens(texts).to(self.device))
            return TextTokens(tokens=feats.float().cpu().numpy(), mask=mask.cpu().numpy(),
                              pooled=self._normalise(pooled))

    def encode_texts_with_tokens(self, texts: Sequence[str], batch_size: int = 64
                                 ) -> tuple[np.ndarray, list[np.ndarray]]:
        """ONE text pass, batched like encode_texts: (its vectors, each text's valid tokens (n_i, d))."""
        from retrieval.model.token_features import batched_text_tokens, text_forward

        if not len(texts):
            return np.zeros((0, self.dim), np.float32), []
        tokens = self._tokens(texts)

        def run(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            with self._inference():
                pooled, feats, mask = text_forward(self.model, tokens[sel].to(self.device))
                return self._normalise(pooled), feats.float().cpu().numpy(), mask.cpu().numpy()

        return batched_text_tokens(len(texts), self.dim, _token_lengths(tokens), batch_size, run)


def _token_lengths(tokens: Any) -> np.ndarray:
    return np.asarray((tokens.argmax(dim=-1) + 1).cpu().numpy())


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


def open_clip_zero_shot() -> tuple[list[str], list[str]]:
    """open_clip's ImageNet class names and its simple prompt templates as format strings ('{}': the class).

    Raises ExportUnsupported if a template is not a plain format string (then it cannot be stored)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, SIMPLE_IMAGENET_TEMPLATES

    from retrieval.errors import ExportUnsupported

    templates = [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    probe = IMAGENET_CLASSNAMES[0]
    if [t.replace("{}", probe) for t in templates] != [t(probe) for t in SIMPLE_IMAGENET_TEMPLATES]:
        raise ExportUnsupported("prompt templates are not plain format strings")
    return list(IMAGENET_CLASSNAMES), templates


def load_encoder(spec: ModelSpec, checkpoint_sha: str | None = None, purpose: str = "index") -> TorchEncoder:
    """Load the model named by `spec`; raises ModelUnavailable with a fix when weights cannot be had.

    `purpose` picks the precision `auto` means: reduced where the hardware is fast at it for indexing,
    fp32 on the CPU for queries (spec.resolve_precision)."""
    import torch

    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device, purpose)
    if device == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(usable_cores())
    model, tokenizer, pre = _create(spec, device)
    model.eval()
    if precision in ("bf16", "fp16"):
        model = with_weights(model, torch.bfloat16 if precision == "bf16" else torch.float16)
    dim = _embed_dim(model)
    if dim is None:  # a model that does not say: one text through it tells
        with torch.inference_mode():
            dim = int(model.encode_text(tokenizer(["x"]).to(device)).shape[-1])
    return TorchEncoder(model, tokenizer, pre, device, precision, fingerprint_for(spec, dim, checkpoint_sha))


def _weight_dtype(model: Any) -> Any:
    return next(model.parameters()).dtype


def with_weights(model: Any, dtype: Any) -> Any:
    """The model with its weights (and floating buffers, e.g. the causal attention mask) in `dtype`."""
    return model.to(dtype)


def _embed_dim(model: Any) -> int | None:
    """The joint embedding width as the model declares it (the text projection's output), without running
    it: a first call costs seconds in bf16 (kernels are prepared on first use)."""
    proj = getattr(model, "text_projection", None)
    out = getattr(proj, "out_features", None)  # an nn.Linear projection
    if out is not None:
        return int(out)
    shape = getattr(proj, "shape", None)  # a (width, dim) parameter
    return int(shape[-1]) if shape is not None and len(shape) == 2 else None

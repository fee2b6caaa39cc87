"""The pieces of a small CLIP trained in the scene lab: open_clip's own model from a custom config, open_clip's
own loss (extended with hard-negative texts), its optimizer grouping and schedule, and embedding for eval.

Nothing here prints or reads files besides the config; `training/train_clip.py` runs the loop.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import ModelConfigError
from retrieval.media.decode import Preprocess
from retrieval.model.custom_config import CustomConfig, canonical, read_config, recorded_config, register

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "scenes-vit-tiny.json"


def load_config(path: str | Path | None, image_size: int | None = None) -> CustomConfig:
    """The model config to train: a file in open_clip's format (checked by custom_config, ModelConfigError on
    anything wrong), with `image_size` (the model's input side) overriding vision_cfg.image_size."""
    config = read_config(path or DEFAULT_CONFIG)
    cfg = config.model_cfg()
    if image_size is not None:
        patch = int(cfg["vision_cfg"].get("patch_size", 16))
        if image_size < patch or image_size % patch:
            raise ModelConfigError(f"--image-size {image_size} must be a positive multiple of the config's "
                                   f"vision_cfg.patch_size ({patch})")
        cfg["vision_cfg"]["image_size"] = image_size
    text = canonical(cfg)
    return recorded_config(text, "sha256:" + hashlib.sha256(text.encode()).hexdigest(), config.source)


def build_model(config: CustomConfig, seed: int) -> tuple[Any, Any, Preprocess]:
    """(model, tokenizer, Preprocess): open_clip.create_model on the registered config, weights drawn from
    `seed` (open_clip's own initialisation, logit_scale at log(1/0.07) as in CLIP)."""
    import open_clip
    import torch

    from retrieval.model.torch_encoder import preprocess_for

    name = register(config)
    torch.manual_seed(seed)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns through the root logger that no weights were loaded: intended
    try:
        model = open_clip.create_model(name, pretrained=None, device="cpu")
    finally:
        root.setLevel(level)
    return model, open_clip.get_tokenizer(name), preprocess_for(model)


def count_params(model: Any) -> dict[str, int]:
    """Parameters in all, and without the token embedding (which is most of a small model's count)."""
    total = sum(int(p.numel()) for p in model.parameters())
    emb = getattr(model, "token_embedding", None)
    tok = int(emb.weight.numel()) if emb is not None else 0
    return {"total": total, "token_embedding": tok, "rest": total - tok}


def make_loss() -> Any:
    """open_clip's ClipLoss, taking extra text rows (hard negatives) after the B matched pairs.

    Image->text is a cross-entropy over all B + E texts (the negatives compete with each image's caption);
    text->image is open_clip's over the B matched texts only (a hard negative has no image to find). With
    E = 0 this is ClipLoss exactly."""
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    class HardNegativeClipLoss(ClipLoss):  # type: ignore[misc]
        def forward(self, image_features: Any, text_features: Any, logit_scale: Any, logit_bias: Any = None,
                    output_dict: bool = False) -> Any:
            n = image_features.shape[0]
            if text_features.shape[0] == n:
                return super().forward(image_features, text_features, logit_scale, logit_bias, output_dict)
            per_image, per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
            labels = self.get_ground_truth(image_features.device, n)
            loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text[:n], labels)) / 2
            return {"contrastive_loss": loss} if output_dict else loss

    return HardNegativeClipLoss()


def make_optimizer(model: Any, lr: float, weight_decay: float) -> Any:
    """AdamW as open_clip's trainer sets it up: no decay on gains, biases, embeddings' 1-d params and
    logit_scale; betas (0.9, 0.98), eps 1e-6 (its ViT defaults). Fused: one pass over the 6.3M-entry token
    embedding instead of several (measured 6 ms against 145 ms a step on 2 cores)."""
    import torch

    def exclude(n: str, p: Any) -> bool:
        return bool(p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)


def cosine_lr(step: int, base: float, warmup: int, steps: int) -> float:
    """open_clip's schedule: linear warmup to `base`, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return base * (step + 1) / warmup
    e, es = step - warmup, max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(e, es) / es)) * base


def pixels_to_tensor(pixels: np.ndarray, pre: Preprocess) -> Any:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W), as TorchEncoder.pixels_to_tensor does."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    return (t - mean) / std


def encode_texts(model: Any, tokens: Any) -> Any:
    """Unnormalised text features of token rows, run only up to the batch's longest caption (exact: the text
    tower is causal; see torch_encoder.encode_text_trimmed, the path queries take)."""
    from retrieval.model.torch_encoder import encode_text_trimmed

    return encode_text_trimmed(model, tokens)


def tokenize(tokenizer: Any, texts: Sequence[str]) -> Any:
    """open_clip token ids (N, context) of `texts`, each distinct text tokenized once."""
    import torch

    if not texts:
        return torch.zeros((0, int(getattr(tokenizer, "context_length", 77) or 77)), dtype=torch.long)
    unique = list(dict.fromkeys(texts))
    rows = tokenizer(unique)
    where = {t: i for i, t in enumerate(unique)}
    return rows[torch.tensor([where[t] for t in texts], dtype=torch.long)]


def embed(model: Any, pre: Preprocess, pixels: np.ndarray, tokens: Any, batch: int = 256
          ) -> tuple[np.ndarray, np.ndarray]:
    """Unit image and text embeddings (float32 numpy) in eval mode, without gradients."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    imgs, txts = [], []
    with torch.no_grad():
        for s in range(0, len(pixels), batch):
            imgs.append(F.normalize(model.encode_image(pixels_to_tensor(pixels[s:s + batch], pre)), dim=-1))
        for s in range(0, len(tokens), batch):
            txts.append(F.normalize(encode_texts(model, tokens[s:s + batch]), dim=-1))
    model.train(was_training)
    dim = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else 0
    img = torch.cat(imgs).numpy() if imgs else np.zeros((0, dim), np.float32)
    txt = torch.cat(txts).numpy() if txts else np.zeros((0, dim), np.float32)
    return img.astype(np.float32), txt.astype(np.float32)

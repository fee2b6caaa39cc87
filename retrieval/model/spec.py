"""Which model, on which device, in which precision, and the fingerprint that says two indexes agree.

Precision follows the job: indexing takes reduced precision where the hardware is fast at it (fp16 on CUDA,
bf16 on CPUs with AMX or AVX512-BF16); a query embeds one text or one image, where bf16 buys nothing, so
queries on the CPU compute in fp32 whatever the backend (`resolve_precision(..., purpose="query")`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retrieval.config import DEFAULT_MODEL, DEFAULT_PRETRAINED
from retrieval.errors import UserError
from retrieval.hardware import cpu_has_fast_bf16, no_accelerator_possible
from retrieval.model.custom_config import CustomConfig
from retrieval.model.weights import file_sha256

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
PURPOSES = ("index", "query")
_CONFIG_FIELDS = ("config", "config_json", "config_file")


@dataclass(frozen=True)
class ModelSpec:
    """Which open_clip model to run and how; `pretrained` is a published tag or a local checkpoint path.

    A custom model (--model FILE.json) has `config` set and `name` is its private registry name."""

    name: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    device: str = "auto"
    precision: str = "auto"
    config: CustomConfig | None = None

    def pretrained_is_file(self) -> bool:
        """A value naming an existing file (or containing a path separator) is a local checkpoint."""
        return os.sep in self.pretrained or Path(self.pretrained).expanduser().is_file()


@dataclass(frozen=True)
class Fingerprint:
    """What makes two indexes comparable: architecture, exact weights and embedding width.

    A custom model also records its config (model/custom_config.py): the sha256 equality uses, and the
    canonical JSON itself, so the record alone rebuilds the model. Built-in models leave the three empty, and
    their JSON is then what it always was (older versions read it, cache keys stay)."""

    model: str
    pretrained: str  # the tag, or the checkpoint's absolute path (informational)
    weights: str  # the tag, or "sha256:<hex>" of the checkpoint file (what equality uses)
    dim: int
    config: str = ""  # "sha256:<hex>" of a custom model's canonical config JSON (what equality uses)
    config_json: str = ""  # that canonical JSON
    config_file: str = ""  # the file it was read from (informational)

    def key(self) -> tuple[str, str, int, str]:
        """What equality uses."""
        return self.model, self.weights, self.dim, self.config

    def same_model(self, other: Fingerprint) -> bool:
        return self.key() == other.key()

    def matches(self, recorded: dict[str, Any]) -> bool:
        """Whether a fingerprint as stored in JSON (an export's metadata) is of this model."""
        return (recorded.get("model"), recorded.get("weights"), recorded.get("dim"),
                recorded.get("config", "")) == self.key()

    def cache_id(self) -> str:
        """The text cache keys hash: model|weights|dim, then |config for a custom model (so the keys of
        built-in models, and the caches under them, stay what they were)."""
        base = f"{self.model}|{self.weights}|{self.dim}"
        return f"{base}|{self.config}" if self.config else base

    def label(self) -> str:
        """The model as messages name it: the name, or a custom model's config file and sha256 prefix."""
        if self.config:
            return f"{Path(self.config_file).name or self.model} [model config {self.config[:19]}]"
        return self.model

    def describe(self) -> str:
        return f"{self.label()} / {self.pretrained}"

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v != "" or k not in _CONFIG_FIELDS},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        return cls(**json.loads(text))


def resolve_device(device: str) -> str:
    """auto -> cuda, then mps, then cpu; an explicit device that is absent is a user error."""
    if device not in DEVICES:
        raise UserError(f"unknown device '{device}' (choose from {', '.join(DEVICES)})")
    if device == "cpu" or (device == "auto" and no_accelerator_possible()):
        return "cpu"  # decided without importing torch
    import torch

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


def resolve_precision(precision: str, device: str, purpose: str = "index") -> str:
    """auto -> fp16 on CUDA; on the CPU bf16 for indexing where bf16 is fast, fp32 for queries and elsewhere."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    if precision == "int8":
        raise UserError("--precision int8 is only for `crossmodal index` (its images on an int8 ONNX Runtime "
                        "graph); this command runs the model in fp32, bf16 or fp16")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if precision != "auto":
        if precision == "fp16" and device == "cpu":
            raise UserError("fp16 is not supported on the CPU; use bf16 or fp32")
        return precision
    if device == "cuda":
        return "fp16"
    if device == "cpu" and purpose == "index" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def fingerprint_for(spec: ModelSpec, dim: int, checkpoint_sha: str | None = None) -> Fingerprint:
    """Build the fingerprint; hashing a checkpoint file is skipped when the caller already knows it."""
    cfg = spec.config
    custom = {} if cfg is None else {"config": f"sha256:{cfg.sha256}", "config_json": cfg.text,
                                     "config_file": cfg.source}
    if spec.pretrained_is_file():
        path = str(Path(spec.pretrained).expanduser().resolve())
        sha = checkpoint_sha or file_sha256(path)
        return Fingerprint(model=spec.name, pretrained=path, weights=f"sha256:{sha}", dim=dim, **custom)
    return Fingerprint(model=spec.name, pretrained=spec.pretrained, weights=spec.pretrained, dim=dim, **custom)



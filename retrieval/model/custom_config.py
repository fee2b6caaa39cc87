"""Custom open_clip models: `--model FILE.json` names a model-config file in open_clip's own format (its
`model_configs/*.json`: `embed_dim`, `vision_cfg`, `text_cfg`, ...), for people who train their own CLIP.

Registered privately: open_clip's `add_model_config` keys configs by file stem, so a file called ViT-B-32.json
would replace the built-in ViT-B-32 for the whole process. Each config is instead put in open_clip's registry
under `custom-<sha256[:12]>` of its canonical JSON (keys sorted, no whitespace: reformatting a file does not
make another model), a name no built-in has and two different configs never share.

Recorded whole: the index's model fingerprint carries the canonical JSON and its sha256 (spec.Fingerprint), so
the model record alone rebuilds the model. Later commands need neither --model nor the file, which may move or
change; a config of other content is another model, refused on an existing index like any other.

Refused with one line (ModelConfigError), before any weights load: a file that is not JSON or not an object,
`embed_dim`/`vision_cfg`/`text_cfg` missing or of the wrong type, keys or value types open_clip does not take,
an open_clip_config.json wrapper, and towers or tokenizers open_clip would download at run time
(`text_cfg.hf_tokenizer_name`, `text_cfg.hf_model_name`): custom models use CLIP's BPE tokenizer, which ships
inside open_clip. This module imports neither torch nor open_clip until `register` (queries must not).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.errors import ModelConfigError, ModelUnavailable

PREFIX = "custom-"  # no open_clip built-in name starts so
MAX_BYTES = 1 << 20  # open_clip's own configs are under 2 kB
CLIP_VOCAB = 49408  # tokens of CLIP's BPE tokenizer (with start and end of text)
_SHAPES = {  # the fields that decide tensor shapes: checked without open_clip, the rest by `register`
    "vision_cfg": ("width", "head_width", "patch_size"),
    "text_cfg": ("context_length", "vocab_size", "width", "heads", "layers"),
}


@dataclass(frozen=True)
class CustomConfig:
    """One parsed, validated model config: its registry name, sha256 and canonical JSON, and where it was read
    (informational: the text is what counts)."""

    name: str
    sha256: str
    text: str
    source: str = ""

    @property
    def label(self) -> str:
        """What messages call it: the file name, else the registry name."""
        return Path(self.source).name if self.source else self.name

    def model_cfg(self) -> dict[str, Any]:
        cfg: dict[str, Any] = json.loads(self.text)
        return cfg


def is_config_file(value: str) -> bool:
    """Whether a --model value names a model-config file (an existing file whose name ends in .json)."""
    return value.lower().endswith(".json") and Path(value).expanduser().is_file()


def canonical(cfg: dict[str, Any]) -> str:
    """The text the sha256 is of: keys sorted, no whitespace, ASCII only (escapes encode any string)."""
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _from_cfg(cfg: dict[str, Any], source: str) -> CustomConfig:
    text = canonical(cfg)
    sha = hashlib.sha256(text.encode()).hexdigest()
    return CustomConfig(name=PREFIX + sha[:12], sha256=sha, text=text, source=source)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def read_config(path: str | Path) -> CustomConfig:
    """Parse and check a model-config file (ModelConfigError naming the file and what is wrong)."""
    p = Path(path).expanduser().resolve()
    where = f"model config {p}"
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ModelConfigError(f"cannot read {where}: {e.strerror or e}") from e
    if len(raw) > MAX_BYTES:
        raise ModelConfigError(f"{where} is over {MAX_BYTES >> 20} MiB; an open_clip model config is a few kB")
    try:
        cfg = json.loads(raw.decode("utf-8-sig"), parse_constant=_no_constant, parse_float=_finite)
    except UnicodeDecodeError as e:
        raise ModelConfigError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{where} is not JSON ({e.msg}, line {e.lineno} column {e.colno})") from e
    except ValueError as e:
        raise ModelConfigError(f"{where} is not valid JSON ({e})") from e
    except RecursionError as e:
        raise ModelConfigError(f"{where} is not valid JSON (nested too deep)") from e
    check(cfg, where)
    return _from_cfg(cfg, str(p))


def recorded_config(text: str, sha: str, source: str = "") -> CustomConfig:
    """The config an index records (its fingerprint's canonical JSON), checked against the recorded sha256."""
    if not sha.startswith("sha256:") or hashlib.sha256(text.encode()).hexdigest() != sha.split(":", 1)[1]:
        raise ModelUnavailable(f"the index's record of its model config ({sha}) is damaged; pass the config "
                               f"file again with --model FILE.json")
    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise ModelUnavailable(f"the index's record of its model config is not JSON ({e})") from e
    return _from_cfg(cfg, source)


def _show(value: Any) -> str:
    """A JSON value as a message quotes it: as JSON, cut to 60 characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- checks without open_clip -----------------------------------------------------------------------
def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _int_or_list(v: Any, n: int) -> bool:
    return _positive_int(v) or (isinstance(v, list) and len(v) == n and all(_positive_int(x) for x in v))


def check(cfg: Any, where: str) -> None:
    """Structure, shape-deciding values and download-at-run-time keys; ModelConfigError on the first problem."""
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{where} must hold a JSON object, not a {type(cfg).__name__}")
    if "model_cfg" in cfg:
        raise ModelConfigError(f"{where} is an open_clip_config.json wrapper; pass a file holding just its "
                               f"model_cfg object (embed_dim, vision_cfg, text_cfg)")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ModelConfigError(f"{where} lacks {', '.join(missing)} (an open_clip model config has embed_dim, "
                               f"vision_cfg and text_cfg)")
    if not _positive_int(cfg["embed_dim"]):
        raise ModelConfigError(f"{where}: embed_dim must be a positive integer, not {_show(cfg['embed_dim'])}")
    for section in ("vision_cfg", "text_cfg"):
        if not isinstance(cfg[section], dict):
            raise ModelConfigError(f"{where}: {section} must be a JSON object, not {_show(cfg[section])}")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    for section, keys in _SHAPES.items():
        for key in keys:
            if key in cfg[section] and not _positive_int(cfg[section][key]):
                raise ModelConfigError(f"{where}: {section}.{key} must be a positive integer, "
                                       f"not {_show(cfg[section][key])}")
    for section in ("vision_cfg", "text_cfg"):
        if "mlp_ratio" in cfg[section] and not _positive_number(cfg[section]["mlp_ratio"]):
            raise ModelConfigError(f"{where}: {section}.mlp_ratio must be a positive number, "
                                   f"not {_show(cfg[section]['mlp_ratio'])}")
    if "layers" in vision and not _int_or_list(vision["layers"], 4):
        raise ModelConfigError(f"{where}: vision_cfg.layers must be a positive integer (or a list of 4), "
                               f"not {_show(vision['layers'])}")
    if "image_size" in vision and not _int_or_list(vision["image_size"], 2):
        raise ModelConfigError(f"{where}: vision_cfg.image_size must be a positive integer (or [height, width]), "
                               f"not {_show(vision['image_size'])}")
    size = vision.get("image_size")
    if isinstance(size, list) and size[0] != size[1]:
        raise ModelConfigError(f"{where}: vision_cfg.image_size must be square, not {_show(size)} (crossmodal "
                               f"decodes every image to a square input)")
    _check_downloads(text, where)
    extra = _check_tokenizer(text.get("tokenizer_kwargs", {}), where)  # (open_clip takes no null here)
    vocab = text.get("vocab_size", CLIP_VOCAB)  # open_clip's default
    if vocab < CLIP_VOCAB + extra:
        raise ModelConfigError(f"{where}: text_cfg.vocab_size is {vocab}, but CLIP's BPE tokenizer (the one custom "
                               f"models use) has {CLIP_VOCAB + extra} tokens")


def _check_tokenizer(kwargs: Any, where: str) -> int:
    """text_cfg.tokenizer_kwargs as CLIP's BPE tokenizer takes them at query time; returns how many special
    tokens they add. Its vocabulary is the one open_clip ships (what the ONNX export copies), its context is
    text_cfg.context_length, and no training-time token reduction applies to a query."""
    name = "text_cfg.tokenizer_kwargs"
    if not isinstance(kwargs, dict):
        raise ModelConfigError(f"{where}: {name} must be a JSON object, not {_show(kwargs)}")
    unknown = sorted(set(kwargs) - {"clean", "additional_special_tokens", "reduction_mask"})
    if unknown:
        raise ModelConfigError(f"{where}: {name} may set clean and additional_special_tokens, not "
                               f"{', '.join(unknown)} (the BPE vocabulary is open_clip's, the context is "
                               f"text_cfg.context_length)")
    if kwargs.get("clean", "lower") not in ("lower", "whitespace", "canonicalize"):
        raise ModelConfigError(f"{where}: {name}.clean must be lower, whitespace or canonicalize, "
                               f"not {_show(kwargs['clean'])}")
    if kwargs.get("reduction_mask"):
        raise ModelConfigError(f"{where}: {name}.reduction_mask drops tokens while training; a search must not")
    special = kwargs.get("additional_special_tokens") or []
    if not isinstance(special, list) or not all(isinstance(t, str) and t for t in special):
        raise ModelConfigError(f"{where}: {name}.additional_special_tokens must be a list of strings")
    return len(special)


def _check_downloads(text: dict[str, Any], where: str) -> None:
    """Refuse what open_clip would fetch from the Hugging Face hub when the model loads: one line now beats a
    minute of retries (or a tokenizer other than the one the ONNX query path reproduces)."""
    if text.get("hf_model_name"):
        raise ModelConfigError(f"{where}: text_cfg.hf_model_name makes a Hugging Face text tower, which open_clip "
                               f"downloads at run time; custom models need open_clip's own text transformer")
    if text.get("hf_tokenizer_name"):
        raise ModelConfigError(f"{where}: text_cfg.hf_tokenizer_name makes open_clip download a tokenizer at run "
                               f"time; remove it to use CLIP's BPE tokenizer, which ships with open_clip")


# ---- checks against open_clip, and registration ------------------------------------------------------
def _same_kind(value: Any, default: Any) -> bool:
    """Whether a JSON value can stand where open_clip's dataclass has `default` (None defaults take anything)."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (tuple, list)):
        return isinstance(value, list)
    return isinstance(value, type(default))


def _kind(default: Any) -> str:
    """How a message names the type `_same_kind` wants."""
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, (int, float)):
        return "a number"
    if isinstance(default, str):
        return "a string"
    return "a list" if isinstance(default, (tuple, list)) else f"a {type(default).__name__}"


def _check_section(section: dict[str, Any], cls: type, name: str, where: str) -> None:
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ModelConfigError(f"{where}: {name} has key(s) open_clip does not know: {', '.join(unknown)}")
    for key, value in section.items():
        default = fields[key]
        if default is dataclasses.MISSING or key in ("layers", "image_size"):
            continue
        if not _same_kind(value, default):
            raise ModelConfigError(f"{where}: {name}.{key} must be {_kind(default)}, not {_show(value)}")


def check_with_open_clip(cfg: dict[str, Any], where: str) -> None:
    """Keys and value types against the open_clip installed (its CLIPVisionCfg, CLIPTextCfg and the model
    class it will build), so a typo is one line rather than a TypeError deep in open_clip."""
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    _check_section(cfg["vision_cfg"], CLIPVisionCfg, "vision_cfg", where)
    _check_section(cfg["text_cfg"], CLIPTextCfg, "text_cfg", where)
    custom = bool(cfg.get("custom_text"))
    cls = (CoCa if "multimodal_cfg" in cfg else CustomTextCLIP) if custom else CLIP
    params = inspect.signature(cls.__init__).parameters
    allowed = set(params) - {"self", "cast_dtype", "output_dict"} | {"custom_text"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ModelConfigError(f"{where}: key(s) open_clip's {cls.__name__} does not take: {', '.join(unknown)}")
    if not isinstance(cfg.get("multimodal_cfg", {}), dict):
        raise ModelConfigError(f"{where}: multimodal_cfg must be a JSON object, not {_show(cfg['multimodal_cfg'])}")
    for key, value in cfg.items():
        if key in ("embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg"):
            continue
        default = params[key].default if key in params else False  # custom_text: a bool
        if default is not inspect.Parameter.empty and not _same_kind(value, default):
            raise ModelConfigError(f"{where}: {key} must be {_kind(default)}, not {_show(value)}")


def register(config: CustomConfig) -> str:
    """Put `config` in open_clip's registry under its private name (checked against open_clip first); returns the
    name. Built-in configs are never touched: the name is `custom-<sha256[:12]>`, never a file stem."""
    from open_clip import factory

    cfg = config.model_cfg()
    where = f"model config {config.source or config.name}"
    check(cfg, where)
    check_with_open_clip(cfg, where)
    have = factory._MODEL_CONFIGS.get(config.name)  # looked up each time: open_clip rebinds it on rescans
    if have is not None and canonical(have) != config.text:
        raise ModelConfigError(f"{where}: another config is registered as {config.name} in this process")
    factory._MODEL_CONFIGS[config.name] = cfg
    return config.name

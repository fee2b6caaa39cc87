"""Open the model an index records: the one way the CLI, the page, the query path and training do it.

An index records its model's fingerprint (architecture, exact weights, width, and a custom model's whole
config). Every command that embeds for an index goes through `open_model`: it refuses a different model
before loading any weights, finds a moved or changed checkpoint file, and checks the loaded model against the
record.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from retrieval.errors import ModelMismatch, ModelUnavailable
from retrieval.media.decode import Preprocess
from retrieval.model.custom_config import CustomConfig, is_config_file, read_config, recorded_config
from retrieval.model.protocol import Encoder
from retrieval.model.spec import Fingerprint, ModelSpec, resolve_device
from retrieval.model.torch_encoder import TorchEncoder, load_encoder
from retrieval.model.weights import file_sha256

PREPROCESS_KEY = "preprocess"  # the meta entry holding the model's input geometry and normalisation
IMAGE_PRECISION_KEY = "image_precision"  # the precisions (fp32, bf16, fp16, int8) that embedded its images


class ModelRecord(Protocol):
    """What an index tells about its model (a Store, opened read-only or for writing)."""

    fingerprint: Fingerprint | None
    home: Path

    def checkpoint_stat(self) -> dict[str, int] | None: ...

    def get_meta(self, key: str) -> str | None: ...


class _NoIndex:
    """The record of a home without an index: no model yet, so the one asked for (or the default) is used."""

    fingerprint: Fingerprint | None = None
    home = Path(".")

    def checkpoint_stat(self) -> dict[str, int] | None:
        return None

    def get_meta(self, key: str) -> str | None:
        return None


NO_INDEX: ModelRecord = _NoIndex()


class WritableRecord(ModelRecord, Protocol):
    """A store opened for writing: it can record the model of a new index."""

    def bind_model(self, fp: Fingerprint, checkpoint_stat: dict[str, int] | None = None) -> None: ...

    def set_meta(self, key: str, value: str) -> None: ...


def checkpoint_stat(path: str) -> dict[str, int] | None:
    """Size and mtime of a checkpoint, so later runs can skip re-hashing an unchanged file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def asked_model(model: str) -> tuple[str, CustomConfig | None]:
    """A --model value as (open_clip name, custom config): an existing FILE.json is a custom model config
    (custom_config.py), anything else a model name (checked when the model loads)."""
    if is_config_file(model):
        config = read_config(model)
        return config.name, config
    return model, None


def recorded_custom(fp: Fingerprint) -> CustomConfig | None:
    """The custom model config an index records in its fingerprint (None: a built-in model)."""
    return recorded_config(fp.config_json, fp.config, fp.config_file) if fp.config else None


def requested_spec(record: ModelRecord, model: str | None, pretrained: str | None, device: str = "auto",
                   precision: str = "auto") -> tuple[ModelSpec, str | None]:
    """The model a command should run: the recorded one, or the one asked for if it is the same.

    Returns the spec and, for checkpoint files, the already-verified sha256 (None means hash it).
    Raises ModelMismatch before any weights are loaded when the request differs from the record. A recorded
    custom model comes back with the config its record holds: the file need not exist any more.
    """
    name, asked = asked_model(model) if model else (None, None)
    fp = record.fingerprint
    if fp is None:
        if not model and not pretrained:
            return ModelSpec(device=device, precision=precision), None
        spec = ModelSpec(name=name or ModelSpec.name, pretrained=pretrained or ModelSpec.pretrained,
                         device=device, precision=precision, config=asked)
        return spec, None
    name = name or fp.model
    if name != fp.model or (asked is not None and f"sha256:{asked.sha256}" != fp.config):
        what = f"{model} [model config sha256:{asked.sha256[:12]}]" if asked is not None else name
        raise ModelMismatch(f"this index was built with {fp.describe()}, not {what}; "
                            f"queries always use the recorded model, or pick another --home")
    config = asked or recorded_custom(fp)  # the same config (equal sha256): the file, when given, is as good
    if pretrained:
        spec = ModelSpec(name=name, pretrained=pretrained, device=device, precision=precision, config=config)
        if spec.pretrained_is_file():
            path = str(Path(pretrained).expanduser().resolve())
            if not os.path.isfile(path):
                raise ModelUnavailable(f"checkpoint file not found: {path}")
            sha = file_sha256(path)
            if fp.weights != f"sha256:{sha}":
                raise ModelMismatch(f"checkpoint {path} is not the one this index was built with "
                                    f"({fp.describe()})")
            return spec, sha
        if pretrained != fp.weights:
            raise ModelMismatch(f"this index was built with {fp.describe()}, not pretrained '{pretrained}'")
        return spec, None
    spec = ModelSpec(name=fp.model, pretrained=fp.pretrained, device=device, precision=precision, config=config)
    if fp.weights.startswith("sha256:"):
        if not os.path.isfile(fp.pretrained):
            raise ModelUnavailable(f"the checkpoint this index was built with is gone from {fp.pretrained}; "
                                   f"pass its new location with --pretrained PATH")
        if checkpoint_stat(fp.pretrained) == record.checkpoint_stat():
            return spec, fp.weights.split(":", 1)[1]
        sha = file_sha256(fp.pretrained)
        if fp.weights != f"sha256:{sha}":
            raise ModelMismatch(f"the checkpoint at {fp.pretrained} changed since this index was built; "
                                f"restore it or pass the original with --pretrained PATH")
        return spec, sha
    return spec, None


def check_encoder(record: ModelRecord, encoder: Encoder) -> None:
    """Refuse to pair an index with a model whose fingerprint differs (e.g. a different embedding dim)."""
    if record.fingerprint is not None and not record.fingerprint.same_model(encoder.fingerprint):
        raise ModelMismatch(f"this index was built with {record.fingerprint.describe()} and cannot be "
                            f"queried with {encoder.fingerprint.describe()}")


def open_model(record: ModelRecord, model: str | None = None, pretrained: str | None = None,
               device: str = "auto", precision: str = "auto", purpose: str = "index") -> TorchEncoder:
    """The index's model on torch (or the one asked for, when the index has none yet), checked against it.

    `purpose` "query" keeps CPU queries in fp32 whatever the CPU (spec.resolve_precision)."""
    spec, sha = requested_spec(record, model, pretrained, device, precision)
    encoder = load_encoder(spec, checkpoint_sha=sha, purpose=purpose)
    check_encoder(record, encoder)
    return encoder


def record_model(store: WritableRecord, encoder: Encoder) -> None:
    """Record `encoder`'s model in a new index (with the checkpoint's size and mtime, to skip re-hashing it,
    and its preprocessing, so later runs decode without loading it), or refuse one that differs from the
    recorded model."""
    fp = encoder.fingerprint
    store.bind_model(fp, checkpoint_stat(fp.pretrained) if fp.weights.startswith("sha256:") else None)
    pre = json.dumps(encoder.preprocess.to_json(), sort_keys=True)
    if store.get_meta(PREPROCESS_KEY) != pre:
        store.set_meta(PREPROCESS_KEY, pre)


def record_image_precision(store: WritableRecord, precision: str) -> None:
    """Add `precision` to those that embedded the index's images (same model, so the fingerprint stays; int8
    vectors differ from fp32 ones by ~1e-4 in cosine, and a relevance check may want to know)."""
    have = image_precisions(store)
    if precision not in have:
        store.set_meta(IMAGE_PRECISION_KEY, json.dumps(have + [precision]))


def image_precisions(record: ModelRecord) -> list[str]:
    """The precisions that embedded the index's images, first used first ([]: none recorded, an older index)."""
    try:
        got = json.loads(record.get_meta(IMAGE_PRECISION_KEY) or "[]")
    except ValueError:
        return []
    return [str(p) for p in got] if isinstance(got, list) else []


def recorded_preprocess(record: ModelRecord) -> Preprocess | None:
    """The recorded model's input geometry without loading it: from the catalog (recorded since this
    version), else from the model's ONNX export (the shared cache's, or the home's from an earlier version);
    None when neither has it."""
    raw = record.get_meta(PREPROCESS_KEY)
    if raw:
        try:
            return Preprocess.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError):
            return None
    if record.fingerprint is None:
        return None
    from retrieval.model.onnx_encoder import find_export

    found = find_export(record.fingerprint, record.home)
    return Preprocess.from_json(found[1]["preprocess"]) if found is not None else None


def predicted_preprocess(model: str | None, pretrained: str | None) -> Preprocess | None:
    """For a new index: the preprocessing that the shared export cache recorded for the same model name and
    weights (tag, or checkpoint path), so its first photos can decode while the model loads. A guess: the
    loaded model's own preprocessing decides (ModelOnDemand.guessed); None when no export matches."""
    if not model or not pretrained:
        return None
    found = cached_export_of(model, pretrained)
    if found is None:
        return None
    try:
        return Preprocess.from_json(found[1]["preprocess"])
    except (KeyError, TypeError, ValueError):
        return None


def cached_export_of(model: str, pretrained: str) -> tuple[Fingerprint, dict[str, Any]] | None:
    """(fingerprint, export metadata) of the first export in the shared cache made of model name `model` (a
    custom config's registered name for a FILE.json) with weights `pretrained` (tag, or the checkpoint's
    path); None when there is none. Matches by name and path only: callers that trust it check the weights."""
    model = asked_model(model)[0]
    spec = ModelSpec(name=model, pretrained=pretrained)
    if spec.pretrained_is_file():
        path = Path(pretrained).expanduser().resolve()
        if not path.is_file():
            return None
        want = str(path)
    else:
        want = pretrained
    from retrieval.model.export_cache import exports_root

    root = exports_root()
    for meta_file in sorted(root.glob("*/export.json")) if root.is_dir() else []:
        try:
            meta = json.loads(meta_file.read_text())
            fp = meta["fingerprint"]
            if fp["model"] == model and fp["pretrained"] == want:
                Preprocess.from_json(meta["preprocess"])  # a record that cannot say its geometry is no match
                return Fingerprint(**fp), meta
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


class ModelOnDemand:
    """The index's model, loaded when a first image actually needs embedding; what decoding needs before
    that (preprocessing, the device it will run on) comes from the index's record, so a run with nothing
    to embed never loads a model. `prefetch` starts loading in a background thread, so that the first
    images decode while the weights load.

    `ready` runs once on the loaded model in the thread that asks for it (recording the model in the
    catalog happens there, never in the loading thread). With `guessed` the preprocessing is a prediction
    (a new index: `predicted_preprocess`); the loaded model's replaces it, and the pipeline decodes again
    what it decoded with a wrong guess."""

    def __init__(self, load: Callable[[], Encoder], preprocess: Preprocess, device: str = "auto",
                 ready: Callable[[Encoder], Encoder] | None = None, guessed: bool = False) -> None:
        self._load = load
        self._ready = ready
        self.preprocess = preprocess
        self.guessed = guessed
        self._device = device
        self._raw: Encoder | None = None  # loaded, `ready` not yet run
        self._model: Encoder | None = None
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None

    def if_loaded(self) -> Encoder | None:
        """The model if it is in memory and ready already, else None (never loads it)."""
        return self._model

    @property
    def loading(self) -> bool:
        """Whether a `prefetch` is still loading the weights."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def device(self) -> str:
        """Where the model runs (resolving "auto" imports torch, never the model)."""
        if self._model is not None:
            return self._model.device
        self._device = resolve_device(self._device)
        return self._device

    def prefetch(self) -> None:
        """Start loading the model in a background thread (once); `__call__` waits for it."""
        if self._model is None and self._raw is None and self._thread is None:
            self._thread = threading.Thread(target=self._load_in_background, name="crossmodal-model-load",
                                            daemon=True)
            self._thread.start()

    def _load_in_background(self) -> None:
        try:
            self._raw = self._checked(self._load())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by __call__
            self._failed = e

    def _checked(self, model: Encoder) -> Encoder:
        if model.preprocess != self.preprocess and not self.guessed:  # recorded from this model: never expected
            raise ModelMismatch(f"{model.fingerprint.describe()} preprocesses images differently from what this "
                                f"index recorded; index into a new --home")
        return model

    def __call__(self) -> Encoder:
        """The model, loaded on the first call (or waited for, after `prefetch`), made ready once."""
        if self._model is not None:
            return self._model
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._failed is not None:
                failed, self._failed = self._failed, None
                raise failed
        raw = self._raw if self._raw is not None else self._checked(self._load())
        self._raw = None
        model = self._ready(raw) if self._ready is not None else raw
        self.preprocess = model.preprocess
        self._model = model
        return model

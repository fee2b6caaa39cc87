"""Open an index together with the model it was built with: the shared entry for CLI and page."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .config import ModelSpec
from .encoder import Encoder
from .errors import IndexMissing, ModelMismatch, ModelUnavailable
from .search import Searcher
from .store import Store
from .weights import file_sha256


def checkpoint_stat(path: str) -> dict[str, int] | None:
    """Size and mtime of a checkpoint, so later runs can skip re-hashing an unchanged file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def requested_spec(store: Store, model: str | None, pretrained: str | None, device: str = "auto",
                   precision: str = "auto") -> tuple[ModelSpec, str | None]:
    """The model a command should run: the recorded one, or the one asked for if it is the same.

    Returns the spec and, for checkpoint files, the already-verified sha256 (None means hash it).
    Raises ModelMismatch before any weights are loaded when the request differs from the record.
    """
    fp = store.fingerprint
    if fp is None:
        if not model and not pretrained:
            return ModelSpec(device=device, precision=precision), None
        spec = ModelSpec(name=model or ModelSpec.name, pretrained=pretrained or ModelSpec.pretrained,
                         device=device, precision=precision)
        return spec, None
    name = model or fp.model
    if name != fp.model:
        raise ModelMismatch(f"this index was built with {fp.describe()}, not {name}; "
                            f"queries always use the recorded model, or pick another --home")
    if pretrained:
        spec = ModelSpec(name=name, pretrained=pretrained, device=device, precision=precision)
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
    spec = ModelSpec(name=fp.model, pretrained=fp.pretrained, device=device, precision=precision)
    if fp.weights.startswith("sha256:"):
        if not os.path.isfile(fp.pretrained):
            raise ModelUnavailable(f"the checkpoint this index was built with is gone from {fp.pretrained}; "
                                   f"pass its new location with --pretrained PATH")
        if checkpoint_stat(fp.pretrained) == store.checkpoint_stat():
            return spec, fp.weights.split(":", 1)[1]
        sha = file_sha256(fp.pretrained)
        if fp.weights != f"sha256:{sha}":
            raise ModelMismatch(f"the checkpoint at {fp.pretrained} changed since this index was built; "
                                f"restore it or pass the original with --pretrained PATH")
        return spec, sha
    return spec, None


def open_searcher(home: str | Path, model: str | None = None, pretrained: str | None = None,
                  device: str = "auto", precision: str = "auto", backend: str = "auto",
                  notify: Callable[[str], None] | None = None) -> Searcher:
    """Open the index read-only with its recorded model, on ONNX Runtime when it can (see backend.py).

    `notify` receives one line when a query falls back to torch, and why.
    """
    from .backend import query_encoder

    store = Store.open(home)
    if store.fingerprint is None:
        raise IndexMissing(f"the index in {store.home} is empty; run `crossmodal index FOLDER` first")
    return Searcher(store, query_encoder(store, model, pretrained, device, precision, backend, notify))


def check_encoder(store: Store, encoder: Encoder) -> None:
    """Refuse to pair an index with a model whose fingerprint differs (e.g. a different embedding dim)."""
    if store.fingerprint is not None and not store.fingerprint.same_model(encoder.fingerprint):
        raise ModelMismatch(f"this index was built with {store.fingerprint.describe()} and cannot be "
                            f"queried with {encoder.fingerprint.describe()}")

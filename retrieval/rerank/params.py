"""Reranker parameter files (safetensors, written by `train-reranker`) and the one an index records.

Reading needs only safetensors' numpy loader, so a reranked query imports no torch; writing lives with the
torch scorer in training/torch_scorer.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from retrieval.errors import ModelMismatch, UserError
from retrieval.model.spec import Fingerprint
from retrieval.model.weights import file_sha256
from retrieval.rerank.scorer import PARAMS, NumpyCoAttention

FORMAT = "crossmodal-coattention-v1"
META_KEY = "reranker"


class MetaStore(Protocol):
    """The part of a Store that records a reranker (its meta table)."""

    fingerprint: Fingerprint | None

    def set_meta(self, key: str, value: str) -> None: ...

    def get_meta(self, key: str) -> str | None: ...


def read_params_meta(path: str | Path) -> dict[str, str]:
    """The file's metadata (format, dim, heads, the model it was trained for); UserError if it is no reranker."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise UserError(f"{path} is not a reranker file ({str(e).splitlines()[0][:120]})") from e
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a crossmodal reranker file (format {meta.get('format')!r})")
    return meta


def checked_meta(path: str | Path, dim: int | None, weights: str | None) -> tuple[int, int]:
    """(dim, heads) of a reranker file; refuses a file made for another model (dim or weights)."""
    meta = read_params_meta(path)
    fdim, heads = int(meta["dim"]), int(meta["heads"])
    if dim is not None and fdim != dim:
        raise ModelMismatch(f"reranker {path} was trained for {fdim}-d embeddings, this model has {dim}")
    if weights and meta.get("weights") and meta["weights"] != weights:
        raise ModelMismatch(f"reranker {path} was trained on {meta.get('model')} / {meta['weights']}, "
                            f"not on this index's model ({weights})")
    return fdim, heads


def load_scorer(path: str | Path, dim: int | None = None, weights: str | None = None) -> NumpyCoAttention:
    """The query-time (numpy) scorer with the file's parameters; same refusals as training.torch_scorer.load_params."""
    from safetensors.numpy import load_file

    fdim, heads = checked_meta(path, dim, weights)
    tensors = load_file(str(path))
    return NumpyCoAttention(fdim, heads, float(tensors["lam"].reshape(-1)[0]), {n: tensors[n] for n in PARAMS})


def record_reranker(store: MetaStore, path: str | Path | None) -> dict[str, str] | None:
    """Record a reranker file (absolute path + sha256) in the index's meta table; None clears it."""
    if path is None:
        store.set_meta(META_KEY, "")
        return None
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise UserError(f"no such reranker file: {p}")
    fp = store.fingerprint
    checked_meta(p, fp.dim if fp else None, fp.weights if fp else None)
    info = {"path": str(p), "sha256": file_sha256(str(p))}
    store.set_meta(META_KEY, json.dumps(info, sort_keys=True))
    return info


def recorded_reranker(store: MetaStore) -> dict[str, str] | None:
    """The recorded file's path and sha256, or None (the parameter-free scorer)."""
    raw = store.get_meta(META_KEY)
    return json.loads(raw) if raw else None

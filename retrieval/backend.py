"""Which encoder answers a query: ONNX Runtime (no torch import, ~1 s processes) or torch.

auto: ONNX when the index has an export of its model and the query runs on the CPU in fp32 (the default
on CPUs without fast bf16), else torch. A missing export is made on that first query (which torch
answers), so the next one is fast. Every fallback says why in one line through `notify`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .errors import UserError
from .onnx_encoder import OnnxEncoder, older_exports, onnxruntime_problem, unsupported_marker

BACKENDS = ("auto", "onnx", "torch")
BACKEND_ENV = "CROSSMODAL_BACKEND"


def default_backend() -> str:
    return os.environ.get(BACKEND_ENV, "auto") or "auto"


def _cpu_fp32(device: str, precision: str) -> bool:
    return device in ("auto", "cpu") and precision in ("auto", "fp32")


def query_encoder(store: Any, model: str | None, pretrained: str | None, device: str, precision: str,
                  backend: str = "auto", notify: Callable[[str], None] | None = None) -> Any:
    """The encoder for queries on `store` (an Encoder or an OnnxEncoder, same interface)."""
    from .encoder import load_encoder
    from .session import check_encoder, requested_spec

    say = notify or (lambda _msg: None)
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if backend == "onnx" and not _cpu_fp32(device, precision):
        raise UserError("--backend onnx runs on the CPU in fp32; drop --device/--precision or use --backend torch")
    fp = store.fingerprint
    use_onnx = backend == "onnx" or (backend == "auto" and _cpu_fp32(device, precision))
    reason: str | None = None
    if use_onnx:
        if model or pretrained:
            requested_spec(store, model, pretrained, device, precision)  # same refusals as the torch path
        reason = onnxruntime_problem()
        if reason is None:
            enc = OnnxEncoder.open(store.home, fp)
            if enc is not None:
                return enc
            marker = unsupported_marker(store.home, fp)
            if marker.is_file():
                reason = f"{fp.model} has no ONNX export ({_first_line(marker)})"
        if reason and backend == "onnx":
            raise UserError(f"--backend onnx: {reason}")
    spec, sha = requested_spec(store, model, pretrained, device, precision)
    encoder = load_encoder(spec, checkpoint_sha=sha)
    check_encoder(store, encoder)
    if use_onnx and reason is None:
        if older_exports(store.home, fp):
            say("the ONNX export of this index's model is from an older crossmodal (no token outputs for "
                "reranking): this query runs on torch while it is re-exported (once)")
        else:
            say("no ONNX export of this index's model yet: this query runs on torch while it is exported "
                "(once) for fast queries")
        from .onnx_export import ensure_export

        folder = ensure_export(encoder, store.home, say)
        if backend == "onnx":
            enc = OnnxEncoder.open(store.home, fp) if folder is not None else None
            if enc is None:
                raise UserError("--backend onnx: the ONNX export failed (see above)")
            return enc
    elif reason:
        say(f"{reason}; answering with torch")
    return encoder


def _first_line(path: Any) -> str:
    try:
        return path.read_text().strip().splitlines()[0][:200]
    except (OSError, IndexError):
        return "unsupported model"

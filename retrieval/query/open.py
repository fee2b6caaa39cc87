"""Open an index for querying: the one function the CLI, the page and any API use (`open_index`).

It opens the store read-only and picks the encoder that answers its queries:
ONNX Runtime (no torch import, ~1 s processes) when the index has an export of its model and the query runs
on the CPU in fp32 (queries on the CPU always do unless --precision says otherwise), else the recorded model
on torch. A missing export is made on that first query (which torch answers), so the next one is fast.
Every fallback says why in one line through `notify`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from retrieval.errors import IndexMissing, UserError
from retrieval.model.onnx_encoder import OnnxEncoder, older_exports, onnxruntime_problem, unsupported_marker
from retrieval.model.protocol import Encoder
from retrieval.model.recorded import open_model, requested_spec
from retrieval.query.search import Searcher
from retrieval.store import Store

BACKENDS = ("auto", "onnx", "torch")
BACKEND_ENV = "CROSSMODAL_BACKEND"

Notify = Callable[[str], None]


def default_backend() -> str:
    """$CROSSMODAL_BACKEND, else auto."""
    return os.environ.get(BACKEND_ENV, "auto") or "auto"


def _cpu_fp32(device: str, precision: str) -> bool:
    """Whether a query computes on the CPU in fp32 (what the ONNX export does): `auto` means fp32 for queries."""
    return device in ("auto", "cpu") and precision in ("auto", "fp32")


def query_encoder(store: Store, model: str | None = None, pretrained: str | None = None, device: str = "auto",
                  precision: str = "auto", backend: str = "auto", notify: Notify | None = None) -> Encoder:
    """The encoder for queries on `store`: its model's ONNX export where it can, else the model on torch."""
    say = notify or (lambda _msg: None)
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if backend == "onnx" and not _cpu_fp32(device, precision):
        raise UserError("--backend onnx runs on the CPU in fp32; drop --device/--precision or use --backend torch")
    fp = store.fingerprint
    if fp is None:
        raise IndexMissing(f"the index in {store.home} is empty; run `crossmodal index FOLDER` first")
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
    encoder = open_model(store, model, pretrained, device, precision, purpose="query")
    if use_onnx and reason is None:
        if older_exports(store.home, fp):
            say("the ONNX export of this index's model is from an older crossmodal (no token outputs for "
                "reranking): this query runs on torch while it is re-exported (once)")
        else:
            say("no ONNX export of this index's model yet: this query runs on torch while it is exported "
                "(once) for fast queries")
        from retrieval.model.onnx_export import ensure_export

        folder = ensure_export(encoder, store.home, say)
        if backend == "onnx":
            enc = OnnxEncoder.open(store.home, fp) if folder is not None else None
            if enc is None:
                raise UserError("--backend onnx: the ONNX export failed (see above)")
            return enc
    elif reason:
        say(f"{reason}; answering with torch")
    return encoder


def open_index(home: str | Path, model: str | None = None, pretrained: str | None = None, device: str = "auto",
               precision: str = "auto", backend: str = "auto", notify: Notify | None = None,
               reuse: Encoder | None = None) -> Searcher:
    """Open the index in `home` read-only with the encoder that answers its queries (see the module doc).

    `reuse` is an encoder a long-lived caller (the page) already holds: kept when it is of the index's
    model and nothing else was asked for, so a re-index does not reload weights. The caller closes
    `searcher.store`.
    """
    store = Store.open(home)
    try:
        fp = store.fingerprint
        if fp is None:
            raise IndexMissing(f"the index in {store.home} is empty; run `crossmodal index FOLDER` first")
        if reuse is not None and reuse.fingerprint.same_model(fp) and not (model or pretrained):
            encoder = reuse
        else:
            encoder = query_encoder(store, model, pretrained, device, precision, backend, notify)
    except BaseException:
        store.close()
        raise
    return Searcher(store, encoder)


def _first_line(path: Path) -> str:
    try:
        return path.read_text().strip().splitlines()[0][:200]
    except (OSError, IndexError):
        return "unsupported model"

"""Open an index for querying: the one function the CLI, the page and any API use (`open_index`).

It opens the store read-only and picks the encoder that answers its queries:
ONNX Runtime (no torch import, ~1 s processes) when there is an export of its model (in the per-user cache
every home shares, or in the home from an earlier version: model/export_cache.py) and the query runs on the
CPU in fp32 (queries on the CPU always do unless --precision says otherwise), else the recorded model on
torch. A missing export is made on that first query (which torch answers), so the next one is fast, unless
another process is making it right now or the cache cannot be written (the line says which).
A damaged export (files cut short, or one ONNX Runtime cannot load at first use) is removed and made again
the same way; after a failed export, queries stay on torch for a while (onnx_upkeep.export_backoff) rather
than retry a long export each time. Every fallback says why in one line through `notify`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from retrieval.errors import IndexMissing, UserError
from retrieval.model.export_cache import export_busy, unsupported_marker, write_problem
from retrieval.model.onnx_encoder import (
    OnnxEncoder,
    export_candidates,
    inspect_export,
    older_exports,
    onnxruntime_problem,
)
from retrieval.model.onnx_upkeep import drop_export
from retrieval.model.protocol import Encoder
from retrieval.model.recorded import open_model, requested_spec
from retrieval.model.spec import Fingerprint
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
    damaged: str | None = None
    if use_onnx:
        if model or pretrained:
            requested_spec(store, model, pretrained, device, precision)  # same refusals as the torch path
        reason = onnxruntime_problem()
        if reason is None:
            enc = OnnxEncoder.open(store.home, fp)
            if enc is not None:
                return _with_fallback(enc, store.home, model, pretrained, device, precision, say)
            damaged = _drop_if_damaged(store.home, fp)
            marker = unsupported_marker(fp)
            if marker.is_file():
                reason = f"{fp.label()} has no ONNX export ({_first_line(marker)})"
        if reason and backend == "onnx":
            raise UserError(f"--backend onnx: {reason}")
    encoder = open_model(store, model, pretrained, device, precision, purpose="query")
    if use_onnx and reason is None:
        folder = _export_on_torch(encoder, store.home, fp, say, damaged)
        if backend == "onnx":
            enc = OnnxEncoder.open(store.home, fp) if folder is not None else None
            if enc is None:
                raise UserError("--backend onnx: the ONNX export failed (see above)")
            return _with_fallback(enc, store.home, model, pretrained, device, precision, say)
    elif reason:
        say(f"{reason}; answering with torch")
    return encoder


def _drop_if_damaged(home: Path, fp: Fingerprint) -> str | None:
    """What is wrong with the model's export if it is damaged (and whether it could be removed), else None:
    the cache's, else, when the cache has none, the one the home holds from an earlier version."""
    for folder in export_candidates(fp, home):
        problem = inspect_export(folder, fp)[1]
        if problem is not None:
            return f"{problem}; {_drop(folder)}"
        if folder.exists():
            return None
    return None


def _drop(folder: Path) -> str:
    return "removed" if drop_export(folder) else "it cannot be removed (read-only cache or home?)"


def _export_on_torch(encoder: Encoder, home: Path, fp: Fingerprint, say: Notify,
                     damaged: str | None = None) -> Path | None:
    """Say in one line why this query runs on torch, and export for the next queries unless an export failed
    a short while ago (then say when it is tried again), the cache cannot be written, or another process is
    exporting this model right now (the line says which; the query does not wait)."""
    from retrieval.model.onnx_export import ensure_export
    from retrieval.model.onnx_upkeep import export_backoff

    older = older_exports(fp, home)
    what = (f"the ONNX export of this index's model was damaged ({damaged})" if damaged
            else "the ONNX export of this index's model is from an older crossmodal (no token outputs for "
                 "reranking)" if older else "no ONNX export of this index's model yet")
    wait = export_backoff(fp) or write_problem() or export_busy(fp)
    if wait:
        say(f"{what}: this query runs on torch; {wait}")
        return None
    say(f"{what}: this query runs on torch while it is {'re-exported' if older else 'exported'} (once)"
        + ("" if older else " for fast queries"))
    return ensure_export(encoder, home, say, wait_s=0)  # a query answers on torch rather than wait


def _with_fallback(enc: OnnxEncoder, home: Path, model: str | None, pretrained: str | None, device: str,
                   precision: str, say: Notify) -> OnnxEncoder:
    """Arm `enc` for a file of its export that fails to load mid-query: then the model on torch answers
    (opened through the home, so a long-lived encoder outlives the store it came with), and the export is
    removed and made again."""

    def on_torch(why: str) -> Encoder:
        gone = _drop(enc.folder)
        with Store.open(home) as store:
            encoder = open_model(store, model, pretrained, device, precision, purpose="query")
        _export_on_torch(encoder, home, enc.fingerprint, say, f"{why}; {gone}")
        return encoder

    enc.fallback = on_torch
    return enc


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

"""The model behind `index` and `add-texts`: loaded now, on demand, or in the background; recorded; exported.

Why a module of its own: which of the three ways a run gets its model decides what an unchanged re-run
costs (nothing: it never loads), what a new index of a known model costs (its photos decode while the model
loads), and whether queries start without torch (the ONNX export, once per machine).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import typer

from cli.common import err, home
from retrieval.errors import UserError

if TYPE_CHECKING:
    from indexer.pipeline import EmbedFn
    from retrieval.model.protocol import Encoder
    from retrieval.model.recorded import ModelOnDemand
    from retrieval.model.spec import Fingerprint
    from retrieval.store import Store


def check_int8(precision: str, device: str) -> None:
    """--precision int8 is an image tower on ONNX Runtime's CPU kernels: refused with another device."""
    if precision == "int8" and device not in ("auto", "cpu"):
        raise UserError("--precision int8 runs the image tower on the CPU (ONNX Runtime); drop --device")


def check_ray(precision: str, gpu_decode: bool | None, workers: int | None) -> None:
    """--ray decodes and embeds in Ray actors: flags of the local decode path are refused, and a missing Ray
    is one line before any work."""
    from indexer.distributed import import_ray

    for flag, given in (("--precision int8", precision == "int8"), ("--gpu-decode", bool(gpu_decode)),
                        ("--workers", workers is not None)):
        if given:
            raise UserError(f"{flag} applies to a local run; with --ray each actor decodes and embeds")
    import_ray()


def ray_step(store: Store, source: Encoder | ModelOnDemand, asked: tuple[str | None, str | None, str, str],
             address: str, actors: int | None, shard_size: int, batch_size: int | None, commit_every: int,
             quiet: bool) -> EmbedFn:
    """The embed step of a `--ray` run. A new index loads the model here once to record it (fingerprint and
    preprocessing); the actors load the recorded model from its spec."""
    from indexer.distributed import RaySettings
    from indexer.shard_merge import ray_embedder
    from retrieval.model.recorded import ModelOnDemand, requested_spec

    if store.fingerprint is None and isinstance(source, ModelOnDemand):
        source()
    spec, sha = requested_spec(store, *asked)
    settings = RaySettings(address, actors, shard_size, batch_size)  # Ray Data's bars off: our progress line only

    def started(seconds: float) -> None:
        if not quiet:
            err(f"ray: {'started' if address == 'auto' else 'joined'} in {seconds:.1f} s")

    return ray_embedder(settings, spec, sha, commit_every=commit_every, on_start=started)


def model_source(store: Store, model: str | None, pretrained: str | None, device: str, precision: str,
                 quiet: bool, guess: bool = True, local: bool = True) -> Encoder | ModelOnDemand:
    """The encoder an index run embeds with. An index that records its model's preprocessing gets the model
    on demand (an unchanged re-run never loads it); a new index whose model the shared export cache knows
    (and `guess`) starts loading it in the background now and decodes with the export's preprocessing; any
    other new index loads it now. The model is recorded in the index when it is first used.

    A `local` run (not --ray) at `auto` precision on the CPU indexes images on the int8 tower where that
    measured faster than torch (model/int8_auto.py); once measured, such a model loads without torch."""
    from retrieval.model.int8_auto import auto_int8_allowed
    from retrieval.model.recorded import (
        ModelOnDemand,
        open_model,
        predicted_preprocess,
        record_model,
        recorded_preprocess,
    )
    from retrieval.model.spec import resolve_device

    check_int8(precision, device)
    int8 = precision == "int8"  # images on the int8 graph (model/onnx_quant.py); the model itself at auto
    dev, prec = ("cpu", "auto") if int8 else (device, precision)
    may8 = local and precision == "auto" and device in ("auto", "cpu") and auto_int8_allowed()
    say, warn = (None if quiet else err), (lambda m: err(f"warning: {m}"))

    def auto8() -> bool:
        """Whether auto may take the int8 tower: a CPU run (asked when loading: resolving `auto` imports torch
        where GPU device nodes exist, which an unchanged re-run never needs)."""
        return may8 and resolve_device(device) == "cpu"

    def load() -> Encoder:
        """Load the model (a background thread may run this: it records nothing)."""
        if int8 or auto8():
            from retrieval.model.int8_encoder import int8_without_torch

            enc = int8_without_torch(store, model, pretrained, say, warn, measured=not int8)
            if enc is not None:
                return enc
        return open_model(store, model, pretrained, dev, prec)

    def ready(enc: Encoder) -> Encoder:
        """Record the loaded model in the index and say which it is (in the thread that embeds)."""
        from retrieval.model.int8_encoder import Int8ImageEncoder

        record_model(store, enc)
        if (int8 or (may8 and enc.device == "cpu")) and not isinstance(enc, Int8ImageEncoder):
            enc = Int8ImageEncoder(enc, store.home, say, warn, auto=not int8)
        if not quiet:
            typer.echo(f"model {enc.fingerprint.describe()} on {enc.device} ({enc.precision})", err=True)
        return enc

    pre = recorded_preprocess(store) if store.fingerprint is not None else None
    if pre is not None:
        return ModelOnDemand(load, pre, dev, ready)
    guessed = predicted_preprocess(model, pretrained) if guess and store.fingerprint is None else None
    if guessed is None:
        return ready(load())
    source = ModelOnDemand(load, guessed, dev, ready, guessed=True)
    source.prefetch()  # a new index has something to embed: load while the store opens and files decode
    return source


def export_for_queries(fp: Fingerprint, encoder: Callable[[], Encoder], quiet: bool) -> None:
    """Export the model to ONNX once per machine (the per-user cache every home shares) so queries start
    without torch; never fails the command. The model is loaded for it only when there is no export yet, and
    a home whose model another home already exported pays nothing."""
    from retrieval.model.export_cache import unsupported_marker
    from retrieval.model.onnx_encoder import OnnxEncoder
    from retrieval.query.open import default_backend

    if default_backend() == "torch" or unsupported_marker(fp).is_file():
        return
    if OnnxEncoder.open(home(), fp) is not None:
        return
    from retrieval.model.onnx_export import ensure_export

    def start() -> None:
        if not quiet:
            err("exporting the model to ONNX for fast queries (once per model on this machine, shared by every "
                "index)")

    ensure_export(encoder(), home(), lambda msg: err(f"warning: {msg}"), on_start=start,
                  on_wait=None if quiet else err)

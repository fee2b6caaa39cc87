"""The image encoder of an indexing run on the int8 tower: `--precision int8`, and `auto` where the tower
measured faster (int8_auto.py); the tower itself is made and checked by onnx_quant.py.

Why a module of its own: the encoder decides per run (made? checked? faster here?), while onnx_quant knows
how a tower is made and int8_auto what was measured; keeping the three apart keeps the imports one-way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import Int8Refused
from retrieval.hardware import cpu_kind, model_threads
from retrieval.model import int8_auto  # measure and record_speed looked up at call time (tests replace them)
from retrieval.model.export_cache import unsupported_marker
from retrieval.model.int8_auto import MIN_GAIN, int8_wins, speed_key, torchless_int8
from retrieval.model.onnx_encoder import TOKENS_OUT, OnnxEncoder
from retrieval.model.onnx_quant import (
    INT8_FILE,
    MIN_CHECK_PHOTOS,
    PRECISION,
    Notify,
    ensure_int8,
    inspect_int8,
    model_export,
    open_session,
)
from retrieval.model.protocol import Encoder, unit_rows


class Int8ImageEncoder(Encoder):
    """Images through the int8 tower on ONNX Runtime (made and checked on the first batch), texts and the rest
    through `encoder` (torch, or the model's ONNX export), which also embeds the images, at its own precision,
    when int8 is refused.

    With `auto` (`--precision auto`, int8_auto.py) int8 is used only where it measured faster than `encoder`
    on this CPU (measured on the first batch when it never was), and a refusal, or a first batch too small to
    check a new tower, is one progress line (or none), not a warning: the run is at its default precision."""

    device = "cpu"
    backend = "onnx"

    def __init__(self, encoder: Encoder, home: str | Path, notify: Notify | None = None,
                 warn: Notify | None = None, auto: bool = False) -> None:
        self.inner = encoder
        self.home = Path(home)
        self.say = notify or (lambda _msg: None)
        self.warn = warn or self.say
        self.auto = auto
        self.fingerprint = encoder.fingerprint
        self.dim = encoder.dim
        self.preprocess = encoder.preprocess
        self.precision = encoder.precision if auto else PRECISION  # auto: int8 once the first batch decides
        self.refused: str | None = None
        self._session: Any = None
        self._threads = 0
        self._export: OnnxEncoder | None = None

    def prepare(self) -> None:
        """Open a tower that is already made and checked now (a model loading in the background runs this
        while the first photos decode); one still to make waits for the first batch, which checks it."""
        if self._export is not None or self.refused is not None or self.auto:  # auto: the first batch times it
            return
        try:  # no photos: a tower that is not ready is refused here, and made by the first batch
            self._session, self._export = ensure_int8(self.inner, self.home, np.zeros((0,)), model_threads(),
                                                      self.say, self.warn)
        except Int8Refused:
            return
        self._threads = model_threads()
        self.precision = PRECISION

    def _refuse(self, why: str, say: Notify | None) -> None:
        self.refused = why
        self.precision = self.inner.precision
        if say is not None:
            say(f"{why}; indexing at {self.precision} instead")

    def _tower(self, pixels: np.ndarray, tokens: bool = False) -> tuple[Any, OnnxEncoder] | None:
        """The int8 session (opened again when the run changes its thread budget), or None once refused."""
        if self.refused is not None:
            return None
        threads = model_threads()
        if self._export is None:
            verdict = self._recorded() if self.auto else True
            if verdict is False:  # torch is faster here, or there can be no tower: it is not even opened
                return None
            try:
                session, export = ensure_int8(self.inner, self.home, pixels, threads, self.say, self.warn)
            except Int8Refused as e:
                quiet = self.auto and len(pixels) < MIN_CHECK_PHOTOS  # auto on a few photos: nothing to say
                self._refuse(str(e), None if quiet else self.say if self.auto else self.warn)
                return None
            if verdict is None and not self._faster(session, export, pixels, tokens):
                return None
            self._session, self._export, self.precision = session, export, PRECISION
        elif threads != self._threads:
            self._session = open_session(self._export.folder / INT8_FILE, threads)
        self._threads = threads
        return self._session, self._export

    def _recorded(self) -> bool | None:
        """auto: whether int8 is recorded faster than the inner model here (None: not measured yet). False
        also when there can be no tower (the model cannot be exported: said before)."""
        if unsupported_marker(self.fingerprint).is_file():
            self._refuse("this model cannot be exported to ONNX", None)
            return False
        export = model_export(self.home, self.fingerprint)
        if export is None:
            return None
        state, meta, _ = inspect_int8(export.folder, export.fingerprint, deep=False)
        if state != "ok" or meta is None:
            return None
        wins = int8_wins(export.folder, str(meta.get("sha256")), self.inner.precision)
        if wins is False:
            self._refuse(f"torch {self.inner.precision} is faster here than the int8 tower", None)
        return wins

    def _faster(self, session: Any, export: OnnxEncoder, pixels: np.ndarray, tokens: bool) -> bool:
        """auto, never measured here: time the tower against the inner model on `pixels`, record, decide."""
        if len(pixels) < MIN_CHECK_PHOTOS:
            self._refuse("too few photos to time the int8 tower", None)
            return False
        meta = inspect_int8(export.folder, export.fingerprint, deep=False)[1] or {}
        sha, torch_precision = str(meta.get("sha256")), self.inner.precision
        names = ["embedding", TOKENS_OUT] if tokens else ["embedding"]
        entry = int8_auto.measure(self.inner, lambda p: session.run(names, {"pixels": export.pixels_to_array(p)}),
                                  pixels, tokens)
        try:
            int8_auto.record_speed(export.folder, speed_key(torch_precision), {**entry, "int8_sha256": sha})
        except OSError as e:  # a read-only cache: this run follows the measurement, the next measures again
            self.warn(f"cannot record the int8 tower's speed in {export.folder} ({e.strerror or e})")
        wins = bool(entry["int8_img_s"] >= MIN_GAIN * entry["torch_img_s"])
        self.say(f"int8 image tower {entry['int8_img_s']:.1f} img/s, torch {torch_precision} "
                 f"{entry['torch_img_s']:.1f} img/s on this CPU ({cpu_kind()}): images in "
                 f"{PRECISION if wins else torch_precision} (measured once per model)")
        if not wins:
            self._refuse(f"torch {torch_precision} is faster here than the int8 tower", None)
        return wins

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        tower = self._tower(pixels)
        if tower is None:
            return self.inner.encode_pixels(pixels)
        session, export = tower
        return unit_rows(session.run(["embedding"], {"pixels": export.pixels_to_array(pixels)})[0])

    def encode_pixels_with_tokens(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ONE vision pass: (unit vectors, token features), as the fp32 graph gives them."""
        tower = self._tower(pixels, tokens=True)
        if tower is None:
            return self.inner.encode_pixels_with_tokens(pixels)
        session, export = tower
        export.check_tokens()
        pooled, feats = session.run(["embedding", TOKENS_OUT], {"pixels": export.pixels_to_array(pixels)})
        return unit_rows(pooled), np.asarray(feats, dtype=np.float32)

    def __getattr__(self, name: str) -> Any:
        """What only the torch encoder has (its model and tokenizer, which the ONNX exporter reads)."""
        if name == "inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return self.inner.encode_texts(texts, batch_size)

    def encode_texts_with_tokens(self, texts: Sequence[str], batch_size: int = 64
                                 ) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.inner.encode_texts_with_tokens(texts, batch_size)

    def check_tokens(self) -> None:
        self.inner.check_tokens()

    def zero_shot_metadata(self) -> tuple[list[str], list[str]]:
        return self.inner.zero_shot_metadata()


def int8_without_torch(record: Any, model: str | None, pretrained: str | None, notify: Any = None,
                       warn: Any = None, measured: bool = True) -> Encoder | None:
    """The index's model for a run that int8 serves, opened without torch: its int8 image tower, with its ONNX
    export for everything else. None when that does not apply (no export, no checked tower, or with
    `measured` (auto) no measurement saying int8 is faster here): the caller loads the model on torch.

    `record` is the Store (recorded.ModelRecord); the request was already checked against its record."""
    from retrieval.model.recorded import cached_export_of, requested_spec
    from retrieval.model.spec import Fingerprint, resolve_precision
    from retrieval.model.weights import file_sha256

    fp: Fingerprint | None = record.fingerprint
    if fp is None:
        spec, _ = requested_spec(record, model, pretrained)
        found = cached_export_of(spec.name, spec.pretrained)
        if found is None:
            return None
        fp = found[0]
        weights = f"sha256:{file_sha256(fp.pretrained)}" if spec.pretrained_is_file() else spec.pretrained
        config = f"sha256:{spec.config.sha256}" if spec.config is not None else ""
        if (fp.weights, fp.config) != (weights, config):
            return None
    export = OnnxEncoder.open(record.home, fp)
    if export is None or not torchless_int8(export, resolve_precision("auto", "cpu", "index") if measured else None):
        return None
    enc = Int8ImageEncoder(export, record.home, notify, warn)
    enc.prepare()
    return enc

"""The query-time encoder on ONNX Runtime: no torch, torchvision or open_clip on this path.

The export of a model's two towers (written by `onnx_export`, which needs torch) lives in the per-user export
cache that every index home shares (model/export_cache.py: <cache>/onnx/<key>/, <key> derived from the model
fingerprint, so a new model never reads a stale export); homes of earlier versions may hold one under
HOME/onnx/<key>/, read when the cache has none (`find_export`):

  text.onnx   token ids (batch, n) -> text embedding, and per-token features (batch, n, d) for the
              reranker; n is dynamic, so a query runs only up to its length
  image.onnx  normalised pixels (batch, 3, size, size) -> image embedding, and per-token features
              (batch, 1+patches, d) for the reranker
  *.onnx.data their fp32 weights, memory-mapped at load (graphs are stored already optimised)
  bpe_simple_vocab_16e6.txt.gz, zero_shot.json (ImageNet class names and prompt templates)
  export.json fingerprint, preprocessing, tokenizer settings, file sizes, the export's own check

`OnnxEncoder` has the interface `Searcher` and `Reranker` use (encode_texts, encode_image_bytes, the
token-feature methods, dim, fingerprint, preprocess, device, precision), with float32 outputs like
`Encoder`. Token features are those of model/token_features.py (same shapes, masks and dtype); models whose
towers give none (see token_features.check_token_support) are exported without them and say why in `check_tokens`.
Exports of an older EXPORT_VERSION (version 1 had no token outputs) live under another key, so they are
never read; the next export replaces them.

The export is a cache: files whose sizes disagree with export.json (`inspect_export`, at open) or that
ONNX Runtime cannot load (at first use) make it damaged; the query path moves it aside (onnx_upkeep) and
answers on torch through `OnnxEncoder.fallback` while it is made again.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import numpy as np

from retrieval.errors import ExportDamaged
from retrieval.media.decode import Preprocess
from retrieval.model.export_cache import EXPORT_VERSION as EXPORT_VERSION  # the key scheme lives with the layout
from retrieval.model.export_cache import export_dir, exports_root, legacy_dir
from retrieval.model.export_cache import export_key as export_key
from retrieval.model.protocol import Encoder, unit_rows
from retrieval.model.spec import Fingerprint

EXPORT_META = "export.json"
TEXT_FILE = "text.onnx"
IMAGE_FILE = "image.onnx"
ZERO_SHOT_FILE = "zero_shot.json"
TOKENS_OUT = "token_features"  # the graphs' second output (the text graph's input is already "tokens")


def older_exports(fp: Fingerprint, home: str | Path | None = None) -> list[Path]:
    """Exports of this model made by an older EXPORT_VERSION (they lack outputs this version reads), in the
    cache or, from earlier versions, in `home`."""
    roots = [exports_root()] + ([legacy_dir(home, fp).parent] if home is not None else [])
    return [p for root in roots for v in range(1, EXPORT_VERSION) if (p := root / export_key(fp, v)).is_dir()]


def export_candidates(fp: Fingerprint, home: str | Path | None = None) -> list[Path]:
    """Where an export of model `fp` may be, in the order it is looked for: the shared cache, then `home`'s
    own folder from an earlier version (export_cache explains why that one is read in place, not moved)."""
    return [export_dir(fp)] + ([legacy_dir(home, fp)] if home is not None else [])


def find_export(fp: Fingerprint, home: str | Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """(folder, metadata) of the first usable export of model `fp` (`export_candidates`), or None."""
    for folder in export_candidates(fp, home):
        meta = read_export_meta(folder, fp)
        if meta is not None:
            return folder, meta
    return None


def read_export_meta(folder: Path, fp: Fingerprint) -> dict[str, Any] | None:
    """The export's metadata if the folder is a complete, undamaged export of exactly this model, else None."""
    return inspect_export(folder, fp)[0]


def inspect_export(folder: Path, fp: Fingerprint) -> tuple[dict[str, Any] | None, str | None]:
    """(metadata, None) for a usable export of exactly this model; (None, why) for one of this model and version
    that is damaged: a file missing or not of the size export.json records (a full disk, a killed copy);
    (None, None) when there is none, or it was optimised by another onnxruntime (made again, not damaged)."""
    try:
        raw = (folder / EXPORT_META).read_text()
    except OSError:
        return None, None
    try:
        meta: dict[str, Any] = json.loads(raw)
        m = meta.get("fingerprint", {})
        ours = meta.get("version") == EXPORT_VERSION and fp.matches(m)
    except (ValueError, AttributeError):
        return None, f"{EXPORT_META} is unreadable"
    if not ours:
        return None, None
    try:
        sizes = {str(k): int(v) for k, v in meta["bytes"].items() if k != EXPORT_META}  # rewritten after
        files = (TEXT_FILE, IMAGE_FILE, ZERO_SHOT_FILE, meta["tokenizer"]["bpe"], *sizes)
        meta["preprocess"]["size"], meta["tokens"]["supported"]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None, f"{EXPORT_META} lacks what it records"
    for name in files:
        try:
            have = (folder / name).stat().st_size
        except OSError:
            return None, f"{name} is missing"
        if have != sizes.get(name, have):
            return None, f"{name} has {have} bytes, {EXPORT_META} records {sizes[name]}"
    return (meta, None) if _same_runtime(meta) else (None, None)


def _same_runtime(meta: dict[str, Any]) -> bool:
    """Graphs are stored optimised by one onnxruntime; another major.minor re-exports rather than risk it."""
    try:
        import onnxruntime
    except Exception:  # noqa: BLE001 - no runtime, no usable export
        return False
    return bool(str(meta.get("onnxruntime", "")).split(".")[:2] == onnxruntime.__version__.split(".")[:2])


def folder_bytes(folder: Path) -> int:
    """Disk used by the files of an export folder."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def onnxruntime_problem() -> str | None:
    """Why ONNX Runtime cannot be used here (None when it can)."""
    try:
        import onnxruntime  # noqa: F401
    except Exception as e:  # noqa: BLE001 - missing, or a broken install
        return f"onnxruntime is not available ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return None


def session_options() -> Any:
    """All cores for one query's matmuls and full graph optimisation (cheap: the stored graph is already
    fused). Weight prepacking is off: it copies every weight at load, which costs a one-shot CLI query more
    (~0.25 s for ViT-B-32's text tower) than it saves, and batches do not miss it."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    so.intra_op_num_threads = max(1, cores or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "1")
    return so


P = ParamSpec("P")
R = TypeVar("R")


def _or_fallback(method: Callable[Concatenate[OnnxEncoder, P], R]) -> Callable[Concatenate[OnnxEncoder, P], R]:
    """Run on the export; once its files turn out damaged (ExportDamaged), on the encoder `fallback` gives."""

    @functools.wraps(method)
    def run(self: OnnxEncoder, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.instead is None:
            try:
                return method(self, *args, **kwargs)
            except ExportDamaged as e:
                if self.fallback is None:
                    raise
                self.instead = self.fallback(str(e))
        return cast(R, getattr(self.instead, method.__name__)(*args, **kwargs))

    return cast("Callable[Concatenate[OnnxEncoder, P], R]", run)


class OnnxEncoder(Encoder):
    """A model's exported towers on ONNX Runtime (CPU, fp32); sessions open on first use of each tower.

    `fallback(why)`, when set (query.open sets it), gives the encoder that answers instead once a file of the
    export cannot be loaded; without it such a failure raises ExportDamaged.
    """

    device = "cpu"
    precision = "fp32"
    backend = "onnx"

    def __init__(self, folder: Path, fingerprint: Fingerprint, meta: dict[str, Any]) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.dim = int(fingerprint.dim)
        self.meta = meta
        p = meta["preprocess"]
        self.preprocess = Preprocess(size=int(p["size"]), mean=tuple(p["mean"]), std=tuple(p["std"]),
                                     resize_mode=p["resize_mode"], interpolation=p["interpolation"],
                                     fill_color=int(p["fill_color"]))
        self._sessions: dict[str, Any] = {}
        self._tokenizer: Any = None
        self.fallback: Callable[[str], Encoder] | None = None
        self.instead: Encoder | None = None

    @classmethod
    def open(cls, home: str | Path | None, fp: Fingerprint) -> OnnxEncoder | None:
        """The export of model `fp` (the shared cache's, else one `home` holds from an earlier version), or
        None when there is no complete one."""
        found = find_export(fp, home)
        return cls(found[0], fp, found[1]) if found is not None else None

    def _session(self, name: str) -> Any:
        s = self._sessions.get(name)
        if s is None:
            import onnxruntime as ort

            try:
                s = ort.InferenceSession(str(self.folder / name), sess_options=session_options(),
                                         providers=["CPUExecutionProvider"])
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - what ONNX Runtime raises for a corrupt graph varies
                raise ExportDamaged(f"{name} cannot be loaded: {type(e).__name__}: "
                                    f"{(str(e).splitlines() or [''])[0][:160]}") from e
            self._sessions[name] = s
        return s

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from retrieval.model.bpe import BpeTokenizer

            t = self.meta["tokenizer"]
            try:
                self._tokenizer = BpeTokenizer(self.folder / t["bpe"], context_length=int(t["context_length"]),
                                               clean=t["clean"],
                                               additional_special_tokens=t.get("additional_special_tokens") or ())
            except Exception as e:  # noqa: BLE001 - a corrupt BPE file: gzip, unicode or merge-table errors
                raise ExportDamaged(f"{t['bpe']} cannot be read: {type(e).__name__}") from e
        return self._tokenizer

    @_or_fallback
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts; each batch (similar lengths together) runs only up to its longest text."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        tokens = self.tokenizer(list(texts))
        lengths = tokens.argmax(axis=1) + 1
        order = np.argsort(lengths, kind="stable")
        session = self._session(TEXT_FILE)
        for i in range(0, len(order), batch_size):
            sel = order[i:i + batch_size]
            n = int(lengths[sel].max())
            out[sel] = unit_rows(session.run(["embedding"], {"tokens": tokens[sel, :n]})[0])
        return out

    # ---- token features for the co-attention reranker: the twins of Encoder's (model/token_features.py) ----
    @property
    def has_tokens(self) -> bool:
        return bool(self.meta.get("tokens", {}).get("supported"))

    def check_tokens(self) -> None:
        """Raise TokensUnsupported (the reason recorded at export) unless the graphs give token features."""
        if not self.has_tokens:
            from retrieval.errors import TokensUnsupported
            from retrieval.model.token_features import SUPPORTED

            raise TokensUnsupported(self.meta.get("tokens", {}).get("reason")
                                    or f"the export has no token outputs; supported: {SUPPORTED}")

    def _text_pass(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit pooled (B,d), token features (B,n,d), mask (B,n)) of token ids, run up to the longest."""
        self.check_tokens()
        eot = tokens.argmax(axis=1)
        n = int(eot.max()) + 1
        pooled, feats = self._session(TEXT_FILE).run(["embedding", TOKENS_OUT], {"tokens": tokens[:, :n]})
        pos = np.arange(n)[None, :]
        mask = (pos >= 1) & (pos <= eot[:, None])
        return unit_rows(pooled), np.asarray(feats, dtype=np.float32), mask

    @_or_fallback
    def encode_text_tokens(self, texts: Sequence[str]) -> Any:
        """Per-token text features of one batch of texts (token_features.TextTokens, padded to the longest)."""
        from retrieval.model.token_features import TextTokens

        pooled, feats, mask = self._text_pass(self.tokenizer(list(texts)))
        return TextTokens(tokens=feats, mask=mask, pooled=pooled)

    @_or_fallback
    def encode_texts_with_tokens(self, texts: Sequence[str], batch_size: int = 64
                                 ) -> tuple[np.ndarray, list[np.ndarray]]:
        """ONE text pass, batched like encode_texts: (its vectors, each text's valid tokens (n_i, d))."""
        from retrieval.model.token_features import batched_text_tokens

        if not len(texts):
            return np.zeros((0, self.dim), np.float32), []
        tokens = self.tokenizer(list(texts))
        return batched_text_tokens(len(texts), self.dim, tokens.argmax(axis=1) + 1, batch_size,
                                   lambda sel: self._text_pass(tokens[sel]))

    @_or_fallback
    def encode_pixels_with_tokens(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ONE vision pass: (unit pooled vectors (B,d) equal to encode_pixels, token features (B,1+P,d))."""
        self.check_tokens()
        pooled, feats = self._session(IMAGE_FILE).run(["embedding", TOKENS_OUT],
                                                      {"pixels": self.pixels_to_array(pixels)})
        return unit_rows(pooled), np.asarray(feats, dtype=np.float32)

    def pixels_to_array(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (B,H,W,3) -> normalised float32 (B,3,H,W), the numpy twin of Encoder.pixels_to_tensor."""
        x = np.ascontiguousarray(pixels).astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
        mean = np.asarray(self.preprocess.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.preprocess.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    @_or_fallback
    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embed a batch of prepared uint8 images (see media.decode.prepare)."""
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return unit_rows(self._session(IMAGE_FILE).run(["embedding"],
                                                             {"pixels": self.pixels_to_array(pixels)})[0])

    @_or_fallback
    def zero_shot_metadata(self) -> tuple[list[str], list[str]]:
        """ImageNet class names and prompt templates ('{}' marks the class), copied at export time."""
        try:
            data = json.loads((self.folder / ZERO_SHOT_FILE).read_text(encoding="utf-8"))
            return list(data["classnames"]), list(data["templates"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExportDamaged(f"{ZERO_SHOT_FILE} cannot be read: {type(e).__name__}") from e

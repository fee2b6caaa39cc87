"""Export an index's model to ONNX (text and image towers, fp32, CPU) so queries can skip torch.

Needs torch and open_clip (index time, or the first query of a model that has no export yet). The export
goes to the per-user cache every home shares (export_cache), under a lock per model so that two processes
never both make it: it is written to a temporary folder there, checked against torch, then renamed into
place, so readers see either no export or a complete one. Layout and reader: `onnx_encoder`.

The text graph takes token ids with a dynamic sequence axis and computes exactly `encode_text_trimmed`:
a causal, argmax-pooled tower whose end-of-text output never sees the padding, so callers feed only up to
the longest text. Models whose text tower is not of that kind (HF text towers, other pooling) or whose
tokenizer is not CLIP's BPE are marked unsupported and stay on torch.

Both graphs also output the per-token features the co-attention reranker reads (model/token_features.py:
`ln_post(x) @ proj` of every vision token, `ln_final(x) @ text_projection` of every text position), from the
same pass as the embedding, so a reranked query needs no torch either. Models without token features
(token_features.check_token_support) are exported without them and the reason is recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import ExportBusy, ExportUnsupported, TokensUnsupported
from retrieval.fsutil import fsync_dir, fsync_tree, is_disk_full
from retrieval.model.bpe import BPE_FILE
from retrieval.model.export_cache import (
    EXPORT_WAIT_S,
    export_dir,
    export_lock,
    exports_root,
    unsupported_marker,
    write_problem,
)
from retrieval.model.onnx_encoder import (
    EXPORT_META,
    EXPORT_VERSION,
    IMAGE_FILE,
    TEXT_FILE,
    TOKENS_OUT,
    ZERO_SHOT_FILE,
    OnnxEncoder,
    find_export,
    older_exports,
    onnxruntime_problem,
    read_export_meta,
)
from retrieval.model.onnx_graphs import (
    check_exportable,
    clean_mode,
    cpu_fp32_copy,
    extra_special_tokens,
    make_modules,
    traceable_attention,
)
from retrieval.model.onnx_upkeep import clear_failure, record_failure, sweep_exports

OPSET = 17
MIN_COSINE = 0.9999
CHECK_TEXTS = ("", "a dog running on a beach", "Café crème at night, 東京 🐶",
               " ".join(f"word{i}" for i in range(120)))


def _zero_shot_json() -> dict[str, list[str]]:
    from retrieval.model.torch_encoder import open_clip_zero_shot

    names, templates = open_clip_zero_shot()
    return {"classnames": names, "templates": templates}


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def _optimise(raw: Path, dst: Path) -> None:
    """Apply ONNX Runtime's portable (extended) graph fusions once, now, instead of at every query's load,
    and store the weights beside the graph (`dst`.data, page-aligned) so sessions memory-map them."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(raw), so, providers=["CPUExecutionProvider"])
    raw.unlink()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.asarray((a * b).sum(axis=1))


def _token_support(model: Any) -> str | None:
    """None when both towers give token features (token_features.check_token_support), else the reason they do not."""
    from retrieval.model.token_features import check_token_support

    try:
        check_token_support(model)
    except TokensUnsupported as e:
        return str(e)
    return None


def export_onnx(encoder: Any, home: str | Path | None = None) -> Path:
    """Write and check the export of `encoder`'s model in the shared cache; returns its folder. Callers hold
    export_cache.export_lock (ensure_export does).

    Raises ExportUnsupported for models this exporter does not handle, anything else on failure; in every
    failure case nothing is left behind but the previous state. A complete export replaces (removes) the
    model's exports of older EXPORT_VERSIONs, in the cache and in `home` (earlier versions exported there).
    """
    import open_clip
    import torch

    fp = encoder.fingerprint
    clean = clean_mode(encoder.tokenizer)
    model = encoder.model
    check_exportable(model)
    no_tokens = _token_support(model)
    with_tokens = no_tokens is None
    names = ["embedding", TOKENS_OUT] if with_tokens else ["embedding"]
    zero_shot = _zero_shot_json()
    final = export_dir(fp)
    root = exports_root()
    root.mkdir(parents=True, exist_ok=True)
    _sweep(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=root))
    os.chmod(tmp, 0o755)
    started = time.perf_counter()
    try:
        model = cpu_fp32_copy(model)
        attention, text_tower, image_tower = make_modules()
        ctx = int(encoder.tokenizer.context_length)
        size = encoder.preprocess.size
        tokens = encoder.tokenizer(list(CHECK_TEXTS[:2]))
        tokens = tokens[:, :int(tokens.argmax(dim=-1).max()) + 1]
        with warnings.catch_warnings(), torch.no_grad(), traceable_attention(model, attention):
            warnings.simplefilter("ignore")
            torch.onnx.export(text_tower(model, with_tokens).eval(), (tokens,), str(tmp / "text.raw.onnx"),
                              dynamo=False, input_names=["tokens"], output_names=names, opset_version=OPSET,
                              dynamic_axes={"tokens": {0: "batch", 1: "length"}, "embedding": {0: "batch"},
                                            **({TOKENS_OUT: {0: "batch", 1: "length"}} if with_tokens else {})})
            torch.onnx.export(image_tower(model, with_tokens).eval(), (torch.zeros(2, 3, size, size),),
                              str(tmp / "image.raw.onnx"), dynamo=False, input_names=["pixels"],
                              output_names=names, opset_version=OPSET,
                              dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"},
                                            **({TOKENS_OUT: {0: "batch"}} if with_tokens else {})})
        _optimise(tmp / "text.raw.onnx", tmp / TEXT_FILE)
        _optimise(tmp / "image.raw.onnx", tmp / IMAGE_FILE)
        shutil.copyfile(open_clip.tokenizer.default_bpe(), tmp / BPE_FILE)
        (tmp / ZERO_SHOT_FILE).write_text(json.dumps(zero_shot, ensure_ascii=False), encoding="utf-8")
        pre = encoder.preprocess
        meta: dict[str, Any] = {
            "version": EXPORT_VERSION,
            "fingerprint": json.loads(fp.to_json()),
            "preprocess": {"size": pre.size, "mean": list(pre.mean), "std": list(pre.std),
                           "resize_mode": pre.resize_mode, "interpolation": pre.interpolation,
                           "fill_color": pre.fill_color},
            "tokenizer": {"bpe": BPE_FILE, "context_length": ctx, "clean": clean,
                          "additional_special_tokens": extra_special_tokens(encoder.tokenizer)},
            "tokens": {"supported": with_tokens, "output": TOKENS_OUT if with_tokens else None,
                       "reason": no_tokens},
            "opset": OPSET,
            "onnxruntime": _ort_version(),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        }
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1))
        meta["check"] = _verify(encoder, model, tmp, fp)
        meta["bytes"] = {p.name: p.stat().st_size for p in tmp.iterdir()}
        meta["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1))
        fsync_tree(tmp)
        _install(tmp, final, fp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in older_exports(fp, home):  # superseded (queries that have them open keep their mmaps)
        shutil.rmtree(old, ignore_errors=True)
    return final


def _verify(encoder: Any, model: Any, folder: Path, fp: Any) -> dict[str, float]:
    """Same token ids as open_clip, and embeddings within MIN_COSINE of torch fp32, or the export fails."""
    import torch

    from retrieval.model.torch_encoder import encode_text_trimmed

    onnx_enc = OnnxEncoder(folder, fp, json.loads((folder / EXPORT_META).read_text()))
    texts = list(CHECK_TEXTS)
    ref_tokens = encoder.tokenizer(texts)
    if not np.array_equal(onnx_enc.tokenizer(texts), ref_tokens.numpy()):
        raise RuntimeError("the light tokenizer disagrees with open_clip's on the check texts")
    with torch.no_grad():
        ref_text = np.concatenate([encode_text_trimmed(model, ref_tokens[i:i + 1]).float().numpy()
                                   for i in range(len(texts))])
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (2, onnx_enc.preprocess.size, onnx_enc.preprocess.size, 3), np.uint8)
        ref_image = model.encode_image(torch.from_numpy(onnx_enc.pixels_to_array(pixels))).float().numpy()
    text_cos = float(_cosines(onnx_enc.encode_texts(texts), ref_text).min())
    image_cos = float(_cosines(onnx_enc.encode_pixels(pixels), ref_image).min())
    if text_cos < MIN_COSINE or image_cos < MIN_COSINE:
        raise RuntimeError(f"ONNX and torch embeddings disagree (min cosine text {text_cos:.6f}, "
                           f"image {image_cos:.6f})")
    check = {"min_cosine_text": text_cos, "min_cosine_image": image_cos}
    if onnx_enc.has_tokens:
        check.update(_verify_tokens(model, onnx_enc, ref_tokens, pixels))
    return check


def _verify_tokens(model: Any, onnx_enc: OnnxEncoder, ref_tokens: Any, pixels: np.ndarray) -> dict[str, float]:
    """Token features (and the text mask) as token_features.text_forward / image_forward give them, per token."""
    import torch

    from retrieval.model.token_features import image_forward, text_forward

    with torch.no_grad():
        _, ref_feats, ref_mask = text_forward(model, ref_tokens)
        _, ref_image = image_forward(model, torch.from_numpy(onnx_enc.pixels_to_array(pixels)))
    got = onnx_enc._text_pass(ref_tokens.numpy())
    if got[2].shape != tuple(ref_mask.shape) or not np.array_equal(got[2], ref_mask.numpy()):
        raise RuntimeError("ONNX and torch text token masks disagree")
    mask = got[2]
    text_cos = float(_cosines(got[1][mask], ref_feats.float().numpy()[mask]).min())
    _, img = onnx_enc.encode_pixels_with_tokens(pixels)
    ref = ref_image.float().numpy()
    if img.shape != ref.shape:
        raise RuntimeError(f"ONNX image tokens have shape {img.shape}, torch {ref.shape}")
    image_cos = float(_cosines(img.reshape(-1, img.shape[-1]), ref.reshape(-1, ref.shape[-1])).min())
    if text_cos < MIN_COSINE or image_cos < MIN_COSINE:
        raise RuntimeError(f"ONNX and torch token features disagree (min cosine text {text_cos:.6f}, "
                           f"image {image_cos:.6f})")
    return {"min_cosine_text_tokens": text_cos, "min_cosine_image_tokens": image_cos}


def _install(tmp: Path, final: Path, fp: Any) -> None:
    """Rename the checked export into place. A complete export already there (a concurrent exporter won)
    is kept; a stale or broken folder of the same name is moved aside and removed."""
    if read_export_meta(final, fp) is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.{os.getpid()}.old")
        try:
            os.replace(final, old)
        except OSError:
            old = None
    try:
        os.replace(tmp, final)
    except OSError:
        if read_export_meta(final, fp) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)


def _sweep(root: Path) -> None:
    """Remove temporary folders left by exporters that died (killed mid-export): their pid is gone."""
    sweep_exports(root)


def ensure_export(encoder: Any, home: str | Path | None = None, notify: Callable[[str], None] | None = None,
                  on_start: Callable[[], None] | None = None, wait_s: float = EXPORT_WAIT_S,
                  on_wait: Callable[[str], None] | None = None) -> Path | None:
    """The export for `encoder`'s model (the shared cache's, else one `home` holds from an earlier version),
    made now if there is none; None (and one line through `notify`) if it cannot be.

    Never raises (but for interrupts): a failed export costs fast queries, never an index run or a query.
    The export is made under the model's lock: when another process holds it, `on_wait` hears so once and
    this waits up to `wait_s` seconds (0: not at all) for that process's export, then uses it. `on_start` is
    called only when an export actually starts. An unwritable cache is said once; the exports it holds are
    still read. A failure is recorded (onnx_upkeep) so that queries back off for a while; this function
    itself always tries (`crossmodal index` retries).
    """
    say = notify or (lambda _msg: None)
    fp = encoder.fingerprint
    found = find_export(fp, home)
    if found is not None:
        return found[0]
    marker = unsupported_marker(fp)
    if marker.is_file():
        return None
    problem = onnxruntime_problem() or write_problem()
    if problem:
        say(f"{problem}; queries will use torch (slower start)")
        return None
    try:
        with export_lock(fp, wait_s, on_wait):
            found = find_export(fp, home)  # made by the process this one waited for
            if found is not None:
                return found[0]
            if on_start is not None:
                on_start()
            made = export_onnx(encoder, home)
        clear_failure(fp)
        return made
    except ExportBusy as e:
        say(f"{e}; queries will use its export once it is done (torch until then)")
    except ExportUnsupported as e:
        say(f"{fp.label()} cannot be exported to ONNX ({e}); queries will use torch")
        with contextlib.suppress(OSError):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(e) + "\n")
    except Exception as e:  # noqa: BLE001 - a failed export must never fail the command that asked for it
        if is_disk_full(e):
            where = getattr(e, "filename", None) or exports_root()
            what = f"disk full writing {where}"
            say(f"ONNX export failed: {what}; nothing of it was kept and the index is unchanged (the export is "
                f"a cache); queries will use torch, and try again in an hour or after `crossmodal index`")
        else:
            what = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            say(f"ONNX export failed ({what}); queries will use torch, and try again in an hour or after "
                f"`crossmodal index`")
        record_failure(fp, what)
    return None

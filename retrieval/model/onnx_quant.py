"""An int8 image tower for indexing on the CPU: `crossmodal index --precision int8`, and what `auto` takes where
it measures faster than the torch model (int8_auto.py).

Why: ONNX Runtime's int8 kernels ran ViT-B-32's image tower 2.8x torch fp32 and 1.5x torch bf16 on the machine
this was measured on (bench/onnx_quant_bench.py; that CPU has AVX-512 VNNI and BF16, so an AVX2-only CPU gains
less, and one with AMX may run bf16 faster). Embeddings move by about 1e-4 in cosine on the measured
(random-weight) model, and the relevance lab's int8 index is within 0.3 points of fp32 Recall@K.

How: ONNX Runtime's dynamic quantization of the model's fp32 export (`image.onnx`): the weight of every MatMul
with a constant weight (attention projections, MLP, output projection) becomes int8 per output channel, and
activations are quantized per batch at run time, so nothing is fitted to a calibration set. The graph keeps
both outputs, so the embedding and the reranker's token features still come from one pass. Without VNNI, x86
int8 kernels add u8*s8 products pairwise in 16 bits (VPMADDUBSW), which can saturate; there the weights use
7 bits (reduce_range), which cannot.

Check before use: the first photos of the run that makes it (MIN_CHECK_PHOTOS to MAX_CHECK_PHOTOS of the
first batch) go through the int8 graph and the fp32 export (itself checked against torch fp32 at 0.9999; the
torch model in memory may be bf16); the mean cosine of the embeddings and of the token features must reach
MIN_MEAN_COSINE. Otherwise the verdict is recorded (later runs refuse at once), one line says so, and images
are indexed at the default precision.

Files: image-int8.onnx and image-int8.json in the folder of the model's export (`model_export`, the one place
that knows where exports live), so whatever replaces or drops the export drops these too. Made in a temporary
folder beside the export's (swept like the export's when its maker dies), then renamed in: the metadata is
removed first and written last, and records the graph's size and sha256, checked at every open (the graph
writes vectors that stay in the index, and a flipped weight byte loads without error). A file of another
QUANT_VERSION, EXPORT_VERSION or onnxruntime, or full-range on a CPU that needs 7-bit weights, is made again;
a damaged one is made again after one line.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import ExportDamaged, Int8Refused
from retrieval.fsutil import fsync_dir, fsync_tree, sha256_file
from retrieval.hardware import cpu_flags
from retrieval.model.onnx_encoder import EXPORT_VERSION, IMAGE_FILE, TOKENS_OUT, OnnxEncoder
from retrieval.model.protocol import Encoder, unit_rows
from retrieval.model.spec import Fingerprint

QUANT_VERSION = 1
INT8_FILE = "image-int8.onnx"
INT8_META = "image-int8.json"
PRECISION = "int8"
MIN_MEAN_COSINE = 0.99
MIN_CHECK_PHOTOS = 8
MAX_CHECK_PHOTOS = 64
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

Notify = Callable[[str], None]


def model_export(home: str | Path, fp: Fingerprint) -> OnnxEncoder | None:
    """The model's fp32 ONNX export, whose folder holds the int8 tower (None: there is none)."""
    return OnnxEncoder.open(home, fp)


def needs_reduce_range() -> bool:
    """Whether int8 weights must use 7 bits here: a CPU without VNNI could saturate 16-bit pair sums."""
    return not any(f in cpu_flags() for f in VNNI_FLAGS)


def load_graph(src: Path) -> Any:
    """The graph at `src` with its weights in memory, read from the weight files beside it. Not onnx.load's
    reader: it refuses weight files with several hard links (a guard against crafted models), which an export
    linked into another cache has; names that leave the folder are refused here instead."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        name = info.get("location", "")
        if not name or Path(name).name != name or name in (".", ".."):
            raise ExportDamaged(f"{src.name}: weight {t.name} is stored at {name!r}, outside its folder")
        with open(src.parent / name, "rb") as f:
            f.seek(int(info.get("offset", 0)))
            data = f.read(int(info["length"])) if "length" in info else f.read()
        if "length" in info and len(data) != int(info["length"]):
            raise ExportDamaged(f"{name} is shorter than {src.name} records")
        t.raw_data = data
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]
    return model


def quantize_image_graph(src: Path, dst: Path, reduce_range: bool) -> None:
    """Write `dst`, the int8 twin of the fp32 image graph `src` (dynamic, weights per channel, MatMuls only)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The stored graph holds ONNX Runtime's fused ops, whose outputs shape inference cannot type: hence the default.
    quantize_dynamic(load_graph(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=reduce_range, op_types_to_quantize=["MatMul"],
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})


def open_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime session for an indexing run (weights prepacked: they are used for many batches)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - what ONNX Runtime raises for a corrupt graph varies
        raise ExportDamaged(f"{path.name} cannot be loaded: {type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:160]}") from e


def _runtime() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def inspect_int8(folder: Path, fp: Fingerprint, deep: bool = True) -> tuple[str, dict[str, Any] | None, str]:
    """(state, metadata, why) of the int8 tower in an export folder. States: "none" (absent, or made by another
    version or onnxruntime, or full-range where 7 bits are needed: made again), "refused" (its check failed),
    "damaged" (metadata unreadable, or the graph missing or not of the recorded size, or with `deep` sha256),
    "ok"."""
    try:
        meta: dict[str, Any] = json.loads((folder / INT8_META).read_text())
        m = meta["fingerprint"]
        current = (meta["version"] == QUANT_VERSION and meta["export_version"] == EXPORT_VERSION
                   and (m["model"], m["weights"], m["dim"]) == (fp.model, fp.weights, fp.dim) and fp.matches(m)
                   and str(meta["onnxruntime"]).split(".")[:2] == _runtime().split(".")[:2]
                   and (bool(meta["reduce_range"]) or not needs_reduce_range()))
    except FileNotFoundError:
        return "none", None, "there is none"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return "damaged", None, f"{INT8_META} is unreadable ({type(e).__name__})"
    if not current:
        return "none", meta, "it was made by another version"
    if not meta.get("verified"):
        return "refused", meta, str(meta.get("verdict", "its check failed"))
    path = folder / INT8_FILE
    try:
        size = path.stat().st_size
    except OSError:
        return "damaged", meta, f"{INT8_FILE} is missing"
    if size != meta.get("bytes"):
        return "damaged", meta, f"{INT8_FILE} has {size} bytes, {INT8_META} records {meta.get('bytes')}"
    if deep and sha256_file(path) != meta.get("sha256"):
        return "damaged", meta, f"{INT8_FILE} does not match the sha256 {INT8_META} records"
    return "ok", meta, ""


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    return np.asarray((unit_rows(a) * unit_rows(b)).sum(axis=1))


def check_int8(export: OnnxEncoder, path: Path, pixels: np.ndarray, threads: int) -> dict[str, Any]:
    """Cosines (mean, min) of the int8 graph at `path` to the fp32 export on `pixels`, embeddings and tokens."""
    session = open_session(path, threads)
    tokens = export.has_tokens
    names = ["embedding", TOKENS_OUT] if tokens else ["embedding"]
    emb: list[np.ndarray] = []
    tok: list[np.ndarray] = []
    for i in range(0, len(pixels), 16):
        chunk = pixels[i:i + 16]
        got = session.run(names, {"pixels": export.pixels_to_array(chunk)})
        if tokens:
            ref_emb, ref_tok = export.encode_pixels_with_tokens(chunk)
            tok.append(_cosines(np.asarray(got[1]), ref_tok))
        else:
            ref_emb = export.encode_pixels(chunk)
        emb.append(_cosines(np.asarray(got[0]), ref_emb))
    e = np.concatenate(emb)
    check: dict[str, Any] = {"photos": len(pixels), "mean_cosine": float(e.mean()), "min_cosine": float(e.min())}
    if tok:
        t = np.concatenate(tok)
        check.update(mean_cosine_tokens=float(t.mean()), min_cosine_tokens=float(t.min()))
    return check


def _verdict(check: dict[str, Any]) -> str | None:
    """Why the int8 tower fails its check (None: it passes)."""
    for what, key in (("embeddings", "mean_cosine"), ("token features", "mean_cosine_tokens")):
        if key in check and not check[key] >= MIN_MEAN_COSINE:  # `not >=`: a NaN fails
            return (f"int8 refused: its {what} reach mean cosine {check[key]:.4f} to fp32 on {check['photos']} "
                    f"photos, under {MIN_MEAN_COSINE}")
    return None


def make_int8(export: OnnxEncoder, pixels: np.ndarray, threads: int) -> dict[str, Any]:
    """Quantize the export's image graph, check it on `pixels`, and install it beside the export (or, when the
    check fails, only the verdict, and raise Int8Refused). Returns the metadata."""
    folder, fp = export.folder, export.fingerprint
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-int8.{os.getpid()}.", suffix=".tmp", dir=folder.parent))
    try:
        reduce_range = needs_reduce_range()
        quantize_image_graph(folder / IMAGE_FILE, tmp / INT8_FILE, reduce_range)
        check = check_int8(export, tmp / INT8_FILE, pixels[:MAX_CHECK_PHOTOS], threads)
        verdict = _verdict(check)
        meta: dict[str, Any] = {
            "version": QUANT_VERSION, "export_version": EXPORT_VERSION, "fingerprint": json.loads(fp.to_json()),
            "onnxruntime": _runtime(), "method": "dynamic, int8 weights per channel, MatMul with constant weights",
            "reduce_range": reduce_range, "cpu_vnni": not needs_reduce_range(), "verified": verdict is None,
            "min_mean_cosine": MIN_MEAN_COSINE, "check": check, "made": time.time(),
            "seconds": round(time.perf_counter() - started, 1)}
        if verdict is None:
            meta.update(bytes=(tmp / INT8_FILE).stat().st_size, sha256=sha256_file(tmp / INT8_FILE))
        else:
            meta["verdict"] = verdict
            (tmp / INT8_FILE).unlink()
        (tmp / INT8_META).write_text(json.dumps(meta, indent=1))
        fsync_tree(tmp)
        (folder / INT8_META).unlink(missing_ok=True)  # no metadata while the graph changes: readers make it
        if verdict is None:
            os.replace(tmp / INT8_FILE, folder / INT8_FILE)
        else:
            (folder / INT8_FILE).unlink(missing_ok=True)
        os.replace(tmp / INT8_META, folder / INT8_META)
        fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verdict is not None:
        raise Int8Refused(verdict)
    return meta


def ensure_int8(encoder: Encoder, home: str | Path, pixels: np.ndarray, threads: int,
                notify: Notify | None = None, warn: Notify | None = None) -> tuple[Any, OnnxEncoder]:
    """(session, fp32 export) of `encoder`'s model's checked int8 image tower, made now if needed (the model's
    ONNX export too) and checked on `pixels`. Raises Int8Refused with one line when it cannot be had.
    `notify` hears what takes time, `warn` what went wrong (a damaged tower, a failed export)."""
    from retrieval.model.onnx_encoder import onnxruntime_problem

    say = notify or (lambda _msg: None)
    alarm = warn or say
    fp = encoder.fingerprint
    problem = onnxruntime_problem()
    if problem:
        raise Int8Refused(f"int8 needs ONNX Runtime: {problem}")
    export = model_export(home, fp)
    if export is None:
        from retrieval.model.onnx_export import ensure_export

        ensure_export(encoder, home, alarm, on_start=lambda: say("exporting the model to ONNX first (once per model)"))
        export = model_export(home, fp)
        if export is None:
            raise Int8Refused("int8 needs the model's ONNX export, which could not be made")
    state, _, why = inspect_int8(export.folder, fp)
    if state == "refused":
        raise Int8Refused(f"{why} (recorded in {export.folder / INT8_META}; delete it to check again)")
    if state == "ok":
        try:
            return open_session(export.folder / INT8_FILE, threads), export
        except ExportDamaged as e:
            state, why = "damaged", str(e)
    if len(pixels) < MIN_CHECK_PHOTOS:
        raise Int8Refused(f"int8: checking a new int8 image tower against fp32 needs {MIN_CHECK_PHOTOS} photos in "
                          f"the first batch, this run has {len(pixels)}")
    if state == "damaged":
        alarm(f"the int8 image tower is damaged ({why}); making it again")
    say(f"making the int8 image tower (once per model), checked against fp32 on {min(len(pixels), MAX_CHECK_PHOTOS)} "
        f"of these photos")
    try:
        make_int8(export, pixels, threads)
    except (Int8Refused, KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - a failed quantization costs the int8 speed, never the run
        raise Int8Refused(f"int8 image tower could not be made ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:160]})") from e
    return open_session(export.folder / INT8_FILE, threads), export

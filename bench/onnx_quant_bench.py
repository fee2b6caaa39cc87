#!/usr/bin/env python
"""The image tower on ONNX Runtime, fp32 and int8, against torch fp32: speed and cosine on real photos.

A benchmark, not a test (issue 14: CPUs without fast bf16 index in torch fp32). The model is ViT-B-32 with
seeded random weights (speed does not depend on weight values; accuracy does: real CLIP weights have outlier
channels that quantize worse, which is why `index --precision int8` checks its tower on the user's photos).

Rows: torch fp32 (what CPUs without fast bf16 index with), torch bf16 (what auto picks where bf16 is fast),
ONNX Runtime fp32 (the model's export, `image.onnx`), and int8 graphs quantized from it with
onnxruntime.quantization: dynamic (weights per tensor; per channel, crossmodal's; per channel with 7-bit
weights, what crossmodal makes on CPUs without VNNI), static QDQ per channel calibrated (MinMax) on photos
disjoint from the measured ones, and static QOperator (reported when ONNX Runtime cannot make it).

Speed: one batch of photos, every row timed once per round, rounds interleaved so load drifts hit all rows
alike; medians of the rounds and each row's ratio to torch fp32 within the run. Cosine: embeddings and token
features of each row against torch fp32 on --photos-n photos (mean and min). The CPU's real features are
printed (CROSSMODAL_CPU_FLAGS changes crossmodal's choices, not the hardware), with the load meanwhile.

  .venv/bin/python bench/onnx_quant_bench.py                        # ~4 min on 2 cores
  .venv/bin/python bench/onnx_quant_bench.py --repeats 7 --photos-n 200 --threads 2 --batch 32
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout ahead of an installed copy

import numpy as np  # noqa: E402

from bench.index_throughput import make_random_checkpoint  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_s() -> float:
    """CPU seconds all processes have used (from /proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / TICK


def own_s() -> float:
    t = os.times()
    return t.user + t.system


def real_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def photos(root: Path, n: int, skip: int = 0) -> list[Path]:
    """n photos spread over the tiers (40% small, 40% medium, 20% large), after the first `skip` share."""
    shares = {"small": 0.4, "medium": 0.4, "large": 0.2}
    out: list[Path] = []
    left_n, left_skip = n, skip
    for i, (tier, share) in enumerate(shares.items()):
        files = sorted((root / tier).glob("*.jpg"))
        last = i == len(shares) - 1
        k, s = (left_n, left_skip) if last else (round(n * share), round(skip * share))
        left_n, left_skip = left_n - k, left_skip - s
        out += files[s:s + k]
    return out


def decode(files: list[Path], pre: Any) -> np.ndarray:
    from retrieval.media.decode import decode_for_model

    return np.stack([decode_for_model(f.read_bytes(), pre).pixels for f in files])


def quantize_variants(src: Path, out: Path, calib: np.ndarray, to_array: Any) -> tuple[dict[str, Path], dict[str, str]]:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from retrieval.model.onnx_quant import quantize_image_graph

    opts = {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}
    made: dict[str, Path] = {}
    failed: dict[str, str] = {}

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([{"pixels": to_array(calib[i:i + 8])} for i in range(0, len(calib), 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    jobs = {
        "int8 dynamic, per tensor": lambda p: quantize_dynamic(str(src), str(p), weight_type=QuantType.QInt8,
                                                               op_types_to_quantize=["MatMul"], extra_options=opts),
        "int8 dynamic, per channel (crossmodal, VNNI)": lambda p: quantize_image_graph(src, p, reduce_range=False),
        "int8 dynamic, per channel, 7-bit (crossmodal, no VNNI)": lambda p: quantize_image_graph(src, p, True),
        f"int8 static QDQ, per channel ({len(calib)} photos)": lambda p: quantize_static(
            str(src), str(p), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
            calibrate_method=CalibrationMethod.MinMax, extra_options=opts),
        f"int8 static QOperator, per tensor ({len(calib)} photos)": lambda p: quantize_static(
            str(src), str(p), Reader(), quant_format=QuantFormat.QOperator, per_channel=False,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
            calibrate_method=CalibrationMethod.MinMax, extra_options=opts),
    }
    for i, (name, job) in enumerate(jobs.items()):
        path = out / f"variant{i}.onnx"
        t = time.perf_counter()
        try:
            job(path)
            made[name] = path
            print(f"  made {name} in {time.perf_counter() - t:.1f} s, {path.stat().st_size / 1e6:.1f} MB",
                  file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - a variant ONNX Runtime cannot make is reported, not fatal
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            print(f"  {name} failed: {failed[name]}", file=sys.stderr)
    return made, failed


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return np.asarray((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="/tmp/photos", help="folder with small/, medium/, large/ JPEGs")
    ap.add_argument("--photos-n", type=int, default=200, help="photos for the cosine (disjoint from calibration)")
    ap.add_argument("--calib-n", type=int, default=64, help="calibration photos for the static variants")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--checkpoint", default="/tmp/cmq/ViT-B-32.pt", help="made (seeded random) if absent")
    ap.add_argument("--work", default=None, help="folder for the export and the int8 graphs (default: temporary)")
    a = ap.parse_args()

    import onnxruntime as ort
    import torch

    from retrieval.hardware import CPU_FLAGS_ENV
    from retrieval.model.onnx_export import export_onnx
    from retrieval.model.onnx_quant import needs_reduce_range, open_session
    from retrieval.model.protocol import unit_rows
    from retrieval.model.spec import ModelSpec
    from retrieval.model.torch_encoder import load_encoder, with_weights

    work = Path(a.work or tempfile.mkdtemp(prefix="cm-quant-bench-"))
    os.environ.setdefault("CROSSMODAL_CACHE", str(work / "cache"))  # the export goes here, not the user's cache
    ck = Path(a.checkpoint)
    if not ck.is_file():
        print(f"writing seeded random ViT-B-32 weights to {ck}", file=sys.stderr)
        make_random_checkpoint("ViT-B-32", ck)
    enc = load_encoder(ModelSpec(name="ViT-B-32", pretrained=str(ck), device="cpu", precision="fp32"))
    torch.set_num_threads(a.threads)
    from retrieval.model.onnx_encoder import OnnxEncoder

    export = OnnxEncoder.open(work / "home", enc.fingerprint)
    if export is None:
        t = time.perf_counter()
        export_onnx(enc, work / "home")
        export = OnnxEncoder.open(work / "home", enc.fingerprint)
        assert export is not None
        print(f"  fp32 export made in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    root = Path(a.photos)
    meas_files = photos(root, a.photos_n)
    calib_files = photos(root, a.calib_n, skip=a.photos_n)
    meas, calib = decode(meas_files, enc.preprocess), decode(calib_files, enc.preprocess)
    assert not set(meas_files) & set(calib_files)
    made, failed = quantize_variants(export.folder / "image.onnx", work, calib, export.pixels_to_array)

    bf16 = type(enc)(with_weights(copy.deepcopy(enc.model), torch.bfloat16), enc.tokenizer, enc.preprocess, "cpu",
                     "bf16", enc.fingerprint)
    runners: dict[str, Any] = {"torch fp32": enc.encode_pixels_with_tokens,
                               "torch bf16": bf16.encode_pixels_with_tokens}
    for name, path in {"ONNX Runtime fp32": export.folder / "image.onnx", **made}.items():
        s = open_session(path, a.threads)

        def run(px: np.ndarray, s: Any = s) -> tuple[np.ndarray, np.ndarray]:
            e, t = s.run(["embedding", "token_features"], {"pixels": export.pixels_to_array(px)})
            return unit_rows(e), t

        runners[name] = run

    print("  cosine to torch fp32 ...", file=sys.stderr)
    outs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, run in runners.items():
        parts = [run(meas[i:i + a.batch]) for i in range(0, len(meas), a.batch)]
        outs[name] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    ref = outs["torch fp32"]

    print("  timing ...", file=sys.stderr)
    batch = meas[:a.batch]
    for run in runners.values():
        run(batch)  # warm-up: first-call allocations and prepacking
    times: dict[str, list[float]] = {k: [] for k in runners}
    load0, b0, o0, t0 = os.getloadavg(), busy_s(), own_s(), time.perf_counter()
    for _ in range(a.repeats):
        for name, run in runners.items():
            t = time.perf_counter()
            run(batch)
            times[name].append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    others = ((busy_s() - b0) - (own_s() - o0)) / wall
    load1 = os.getloadavg()

    flags = real_flags()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          + next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "?"))
    print("real CPU features: " + " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))))
    print(f"{CPU_FLAGS_ENV}={os.environ.get(CPU_FLAGS_ENV, '(unset)')}: crossmodal would make the "
          f"{'7-bit' if needs_reduce_range() else 'full-range'} int8 graph under these flags")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, ViT-B-32 seeded random weights, batch "
          f"{a.batch}, {a.threads} threads, {a.repeats} interleaved rounds; load average {load0[0]:.2f} before, "
          f"{load1[0]:.2f} after; other processes kept {others:.2f} cores busy meanwhile")
    print(f"cosine on {len(meas)} real photos ({len(meas_files)} files: 40% 0.3 MP, 40% 2 MP, 20% 12 MP), "
          f"static calibration on {len(calib)} other photos\n")
    base = statistics.median(times["torch fp32"])
    print("| image tower | img/s (median) | x torch fp32 | rounds, s | emb cos mean | emb cos min | token cos mean "
          "| token cos min |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        ce, ct = cos(outs[name][0], ref[0]), cos(outs[name][1], ref[1])
        print(f"| {name} | {a.batch / med:.1f} | {base / med:.2f} | {' '.join(f'{t:.2f}' for t in ts)} | "
              f"{ce.mean():.5f} | {ce.min():.5f} | {ct.mean():.5f} | {ct.min():.5f} |")
    for name, why in failed.items():
        print(f"| {name} | not made: {why} | | | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`index --precision auto` on the CPU: images on the int8 tower where it measured faster than torch.

Why: the relevance lab (bench/quality_lab.py) found an int8 index within 0.3 points of fp32 Recall@K (the bound
is 1), and the tower is checked against fp32 on the user's own photos (mean cosine >= 0.99, onnx_quant.py)
before any use. What is left to decide is speed, which depends on the CPU (VNNI, AVX-512 BF16, AMX) and so is
measured, not guessed: the run that first has the tower times it and the torch model `auto` would otherwise
use, on the same photos, and records both per CPU kind in SPEED_FILE beside the tower. Later runs read that
record. Where int8 won, a model whose export and tower are ready opens without torch at all (the export
answers for the rest of the model; int8_encoder.py), which makes a new home of a known model fast: no torch import,
no weights to load.

CROSSMODAL_INT8=off keeps `auto` on torch (an explicit `--precision int8` still works). The test suite sets
it, so that its vectors do not depend on a timing; the tests of this module turn it back on.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import UserError
from retrieval.hardware import cpu_kind
from retrieval.model.onnx_encoder import OnnxEncoder
from retrieval.model.onnx_quant import inspect_int8, model_export
from retrieval.model.protocol import Encoder
from retrieval.model.spec import Fingerprint

INT8_ENV = "CROSSMODAL_INT8"
SPEED_FILE = "image-int8-speed.json"
MIN_GAIN = 1.1  # int8 must beat torch by 10%: below that the exact path is worth its small cost
SPEED_PHOTOS = 16  # photos timed per side; each side runs twice after a warm-up, the faster pass counts


def auto_int8_allowed() -> bool:
    """Whether `--precision auto` may index images on the int8 tower ($CROSSMODAL_INT8: auto, the default, or
    off)."""
    raw = os.environ.get(INT8_ENV, "auto").strip().lower() or "auto"
    if raw not in ("auto", "off"):
        raise UserError(f"{INT8_ENV} must be 'auto' or 'off', not {raw!r}")
    return raw == "auto"


def speed_key(torch_precision: str) -> str:
    """Which measurement applies: the CPU kind and the precision torch would index at there."""
    return f"{cpu_kind()}/{torch_precision}"


def read_speeds(folder: Path) -> dict[str, Any]:
    """The speeds measured beside the tower in export folder `folder` ({} when none, or unreadable)."""
    try:
        got = json.loads((folder / SPEED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def record_speed(folder: Path, key: str, entry: dict[str, Any]) -> None:
    """Add one measurement to SPEED_FILE (rewritten whole, atomically: a reader sees the old or the new)."""
    speeds = read_speeds(folder)
    speeds[key] = entry
    fd, tmp = tempfile.mkstemp(prefix=f".{SPEED_FILE}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(speeds, f, indent=1)
        os.replace(tmp, folder / SPEED_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def measured(folder: Path, tower_sha: str, torch_precision: str) -> tuple[float, float] | None:
    """(int8, torch) images/s measured here for the tower with sha256 `tower_sha` against torch at
    `torch_precision` on this CPU kind; None when never measured (or measured on another tower)."""
    entry = read_speeds(folder).get(speed_key(torch_precision))
    if not isinstance(entry, dict) or entry.get("int8_sha256") != tower_sha:
        return None
    try:
        return float(entry["int8_img_s"]), float(entry["torch_img_s"])
    except (KeyError, TypeError, ValueError):
        return None


def int8_wins(folder: Path, tower_sha: str, torch_precision: str) -> bool | None:
    """Whether the tower ran at least MIN_GAIN times torch here (`measured`); None when that is not known."""
    got = measured(folder, tower_sha, torch_precision)
    return None if got is None else got[0] >= MIN_GAIN * got[1]


def speed_line(folder: Path, tower_sha: str) -> str:
    """What `--precision auto` does with the tower on this CPU, for `crossmodal info`."""
    from retrieval.model.spec import resolve_precision

    torch_precision = resolve_precision("auto", "cpu", "index")
    got = measured(folder, tower_sha, torch_precision)
    if got is None:
        return f"auto: not yet timed against torch {torch_precision} on this CPU ({cpu_kind()})"
    use = "uses it" if got[0] >= MIN_GAIN * got[1] else f"torch {torch_precision}"
    return f"auto: {use} here ({got[0]:.1f} vs {got[1]:.1f} img/s in torch {torch_precision}, {cpu_kind()})"


def _rate(run: Any, pixels: np.ndarray) -> float:
    """Images per second of `run(pixels)`: a warm-up on two photos, then the faster of two passes."""
    run(pixels[:2])
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        run(pixels)
        best = min(best, time.perf_counter() - t0)
    return len(pixels) / max(best, 1e-9)


def measure(torch_model: Encoder, int8_run: Any, pixels: np.ndarray, tokens: bool) -> dict[str, Any]:
    """Time the int8 tower (`int8_run(pixels)`) and `torch_model` on the same photos, the way the index run
    calls them (with token features when it keeps them)."""
    sample = pixels[:SPEED_PHOTOS]
    torch_run = torch_model.encode_pixels_with_tokens if tokens else torch_model.encode_pixels
    int8_s = _rate(int8_run, sample)
    torch_s = _rate(torch_run, sample)
    return {"int8_img_s": round(int8_s, 2), "torch_img_s": round(torch_s, 2), "torch": torch_model.precision,
            "photos": len(sample), "tokens": tokens, "measured": time.time()}


def torchless_int8(export: OnnxEncoder, torch_precision: str | None) -> bool:
    """Whether `export`'s model can index images on its int8 tower without loading torch: the tower is made,
    passed its check, and (unless `torch_precision` is None: int8 was asked for) measured faster here than
    torch at `torch_precision`."""
    state, meta, _ = inspect_int8(export.folder, export.fingerprint, deep=False)  # the session open checks sha256
    if state != "ok" or meta is None:
        return False
    return torch_precision is None or bool(int8_wins(export.folder, str(meta.get("sha256")), torch_precision))


def int8_status(home: str | Path, fp: Fingerprint) -> str | None:
    """One line on the model's int8 image tower for `crossmodal info` (None: there is none)."""
    export = model_export(home, fp)
    if export is None:
        return None
    state, meta, why = inspect_int8(export.folder, fp, deep=False)
    if state == "ok" and meta is not None:
        c = meta["check"]
        return (f"{int(meta['bytes']) / 1e6:.1f} MB, mean cosine {c['mean_cosine']:.4f} to fp32 on {c['photos']} "
                f"photos; {speed_line(export.folder, str(meta.get('sha256')))}")
    return {"none": None, "refused": why, "damaged": f"damaged ({why}); made again by the next int8 run"}[state]

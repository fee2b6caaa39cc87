"""What this machine offers: CPU features, usable cores, CUDA and nvJPEG.

CPU features come from /proc/cpuinfo unless CROSSMODAL_CPU_FLAGS overrides them (a comma- or space-separated
list such as `avx2` or `avx512_bf16,amx_bf16`), so tests can take the fast-bf16 and the fp32 paths on any
machine. torch is imported inside functions, so importing this module costs nothing.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

CPU_FLAGS_ENV = "CROSSMODAL_CPU_FLAGS"
FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: $CROSSMODAL_CPU_FLAGS when set, else the first `flags` line of /proc/cpuinfo."""
    fake = os.environ.get(CPU_FLAGS_ENV)
    if fake is not None:
        return frozenset(f for f in re.split(r"[\s,]+", fake.strip().lower()) if f)
    return _proc_flags()


@functools.lru_cache(maxsize=1)
def _proc_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls several times faster than fp32; elsewhere bf16 is slower."""
    return any(f in cpu_flags() for f in FAST_BF16_FLAGS)


def cpu_kind() -> str:
    """The CPU's class for what runs fast on it, the key of speeds measured once per machine: "amx" (AMX tiles),
    "avx512_bf16", "vnni" (int8 dot products), "avx2", or "other"."""
    flags = cpu_flags()
    if any(f.startswith("amx_") for f in flags):
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if any(f in flags for f in ("avx512_vnni", "avx_vnni")):
        return "vnni"
    return "avx2" if "avx2" in flags else "other"


_model_threads: int | None = None


def set_model_threads(n: int) -> None:
    """The threads an indexing run gives the model (the cores its decode workers leave). Set here, not only in
    torch, so a run whose model is on ONNX Runtime never imports torch to say it."""
    global _model_threads
    _model_threads = max(1, int(n))
    if "torch" in sys.modules and hasattr(sys.modules["torch"], "set_num_threads"):  # a loaded torch model
        sys.modules["torch"].set_num_threads(_model_threads)


def model_threads() -> int:
    """The model's thread budget: what the run set, else $OMP_NUM_THREADS, else every usable core."""
    if _model_threads is not None:
        return _model_threads
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return usable_cores()


def usable_cores() -> int:
    """Cores this process may run on (affinity-aware, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")  # CUDA, ROCm, WSL2's GPU


def no_accelerator_possible() -> bool:
    """True on a Linux machine without GPU device nodes: no CUDA (or ROCm) device can be visible there, so
    `--device auto` means the CPU without importing torch (2-3 s that an index run can spend decoding)."""
    return sys.platform.startswith("linux") and not any(os.path.exists(p) for p in ACCELERATOR_NODES)


def cuda_available() -> bool:
    """True when torch is importable and sees a CUDA device (never raises)."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - a broken torch install just means no CUDA
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - driver problems surface here on some machines
        return False


def cuda_description() -> str:
    """One line naming the device, for reports and benchmarks; says why when there is none."""
    if not cuda_available():
        return "no CUDA device visible to torch"
    import torch

    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}"


def nvjpeg_available() -> bool:
    """torchvision built with nvJPEG and a CUDA device: what GPU JPEG decoding needs."""
    if not cuda_available():
        return False
    try:
        import torch
        import torchvision  # noqa: F401 - registers the image ops

        return hasattr(torch.ops.image, "decode_jpegs_cuda")
    except Exception:  # noqa: BLE001
        return False


def gpu_decode_problem(device: str) -> str | None:
    """Why JPEGs cannot be decoded on the GPU for a model on `device` (None when they can)."""
    if device != "cuda":
        return f"needs the model on a CUDA device (it runs on {device}; torch sees "\
               f"{'a' if cuda_available() else 'no'} CUDA device)"
    if not nvjpeg_available():
        return "this torchvision build has no nvJPEG (GPU JPEG decoding)"
    return None

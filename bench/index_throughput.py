#!/usr/bin/env python
"""Image indexing throughput on real photos: naive loops, crossmodal steady state and whole process.

A benchmark, not a test. Per tier of photos (small ~0.3 MP, medium ~2 MP, large 12 MP) it measures:

  decode      decode_stream (indexer/decode.py) over the files, default worker count and 0 (in-process)
  model       TorchEncoder.encode_pixels on pre-decoded uint8 batches, fp32 and bf16 (where it runs)
  steady      crossmodal steady state: index_paths into a fresh temporary Store home with the model already
              loaded (thumbnails, token features and commits included), --precision (auto: bf16 on CPUs
              with fast bf16, else fp32); the detail table calls it e2e
  naive-user  the loop a user writes on this CPU: open_clip's model with bf16 weights where the CPU is fast
              at bf16 (retrieval.hardware.cpu_has_fast_bf16), else fp32; PIL with draft mode
              (img.draft("RGB", (size, size)) before load); open_clip's preprocess; batch 32; vectors kept
              in a numpy array; no catalog, no thumbnails
  naive-fp32  the same loop with full-size decode and fp32 weights (the earlier baseline)
  whole       `crossmodal index FOLDER --model M --pretrained CKPT --json` as a fresh process into a new
              home: first home on the machine (CROSSMODAL_CACHE a fresh folder: the ONNX export is made),
              then a second home sharing that cache (bench/index_process.py)

and once, over an unchanged library of 10,000 real JPEG files (hard links to all tiers' photos, 25
folders, indexed beforehand with random vectors through the Store API), the whole `crossmodal index ROOT
--json` re-run, median of 3 (target under 1 s).

It prints images/s with e2e / min(decode, model) (how well decode and encode overlap), then a Markdown
table for README.md: naive as a user, naive fp32, steady state, steady / naive, whole process first and
second home, and a line for the 10,000 re-run. `--sweep` adds an end-to-end grid over decode workers x
torch threads (what the defaults should be). Each new part can be skipped: --no-naive-fp32, --no-naive
(both loops), --no-components (decode-only and model-only), --no-whole-process, --no-rerun.

On a shared machine every measurement also records how many cores *other* processes kept busy meanwhile
(from /proc/stat); `--quiet-below 0.3` waits (up to `--quiet-wait` s) for a quiet moment before each one.
Columns measured under different load are flagged, as their ratios mean little. The packages (retrieval/,
indexer/, cli/, webui/, training/) are copied aside at start (`--no-snapshot` to skip), so edits made during
a run cannot mix code versions; the whole-process runs import the same copy (PYTHONPATH).

Examples (no pretrained weights needed; speed does not depend on weight values):

  .venv/bin/python bench/index_throughput.py --random-weights --limit 32 --tiers medium   # smoke run
  .venv/bin/python bench/index_throughput.py --random-weights --json /tmp/bench.json --markdown /tmp/bench.md
  .venv/bin/python bench/index_throughput.py --random-weights --limit 64 --sweep-only --tiers small,large \\
      --workers-grid 0,1,2 --threads-grid 1,2 --repeats 2 --quiet-below 0.3 --json /tmp/bench.json

Workers are spawned processes that re-import this file as __mp_main__: keep top-level imports light.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("retrieval", "indexer", "cli", "webui", "training")  # what pyproject installs
SNAP_ENV = "CM_BENCH_SRC"  # set by main() so spawned decode workers import the same snapshot


def _use_source(root: str) -> None:
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)  # ahead of the editable install's finder, which sits at the end of meta_path


_use_source(os.environ.get(SNAP_ENV) or str(REPO))

TIERS = ("small", "medium", "large")


# ---- setup ------------------------------------------------------------------------------------------
def snapshot_source(keep_dir: Path | None) -> tuple[str, str]:
    """Copy the packages aside and import from the copy: edits made to the working tree while
    the benchmark runs (workers import modules afresh) cannot mix two versions of the code in one run.
    Returns (directory, digest of the copied sources)."""
    import compileall
    import hashlib
    import shutil

    dest = Path(tempfile.mkdtemp(prefix="cm-bench-src-", dir=keep_dir))
    h = hashlib.sha256()
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for f in sorted((dest / pkg).rglob("*.py")):
            h.update(str(f.relative_to(dest)).encode() + b"\0" + f.read_bytes())
    # Byte-compiled now, as an installed package is: else the first whole-process run would pay for it.
    compileall.compile_dir(str(dest), quiet=1)
    return str(dest), h.hexdigest()[:12]


def tier_files(root: Path, tier: str, limit: int | None) -> list[str]:
    from retrieval.config import IMAGE_EXTENSIONS

    folder = root / tier
    if not folder.is_dir():
        sys.exit(f"missing {folder}; build the photos with `bash /work/shared/data/make_photos.sh`")
    files = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return files[:limit] if limit else files


def make_random_checkpoint(model: str, path: Path, seed: int = 0) -> None:
    import open_clip
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    m = open_clip.create_model(model)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(m.state_dict(), tmp)
    os.replace(tmp, path)


RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")


def _version(module: str) -> str:
    """A package's version, or why it cannot be imported (onnxruntime is optional)."""
    import importlib

    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except Exception as e:  # noqa: BLE001 - a missing or broken package is reported, not fatal
        return f"unavailable ({type(e).__name__})"


def machine_info() -> dict:
    """What the numbers depend on. CPU flags come from retrieval.hardware.cpu_flags(), the same source auto
    precision reads (so CROSSMODAL_CPU_FLAGS, when set, shows here as it steers the run)."""
    import PIL
    import torch
    from PIL import features

    from retrieval.hardware import CPU_FLAGS_ENV, cpu_flags, cpu_has_fast_bf16, usable_cores

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name") and model in ("", "x86_64"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    return {
        "cpu": model,
        "nproc": usable_cores(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": {f: f in flags for f in RELEVANT_FLAGS},
        "simd": [f for f in RELEVANT_FLAGS if f in flags],
        "cpu_flags_override": os.environ.get(CPU_FLAGS_ENV),
        "fast_bf16": cpu_has_fast_bf16(),
        "torch": torch.__version__,
        "open_clip": _version("open_clip"),
        "onnxruntime": _version("onnxruntime"),
        "torch_cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        "pillow": PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


def tier_megapixels(files: list[str]) -> float:
    """Median megapixels of a tier's photos, from their headers (for the table's tier label)."""
    from PIL import Image

    mp = []
    for p in files:
        with Image.open(p) as im:
            mp.append(im.size[0] * im.size[1] / 1e6)
    return statistics.median(mp) if mp else 0.0


# ---- measurements -----------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_busy_s() -> float | None:
    """Seconds of CPU time all processes on the machine have used (from /proc/stat), or None."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, _steal = f
    return (user + nice + system + irq + softirq) / _TICK


def _own_cpu_s() -> float:
    t = os.times()  # children: decode workers, counted once the pool has joined them
    return t.user + t.system + t.children_user + t.children_system


LOADED = 0.3  # cores used by other processes above which a measurement is flagged as disturbed
QUIET = {"below": None, "max_wait": 0.0}  # set from --quiet-below / --quiet-wait


def wait_for_quiet() -> float:
    """Wait (at most QUIET['max_wait'] s) until other processes use under QUIET['below'] cores for 1 s."""
    below, deadline = QUIET["below"], time.perf_counter() + QUIET["max_wait"]
    t0 = time.perf_counter()
    while below is not None and time.perf_counter() < deadline:
        b0, o0 = _cpu_busy_s(), _own_cpu_s()
        time.sleep(1.0)
        b1, o1 = _cpu_busy_s(), _own_cpu_s()
        if b0 is None or b1 is None or (b1 - b0) - (o1 - o0) < below:
            break
    return time.perf_counter() - t0


class Clock:
    """Wall time plus how many cores *other* processes kept busy meanwhile (the noise on a shared box)."""

    def __enter__(self) -> Clock:
        self.waited = wait_for_quiet() if QUIET["below"] is not None else 0.0
        self.busy0, self.own0, self.t0 = _cpu_busy_s(), _own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        busy1, own1 = _cpu_busy_s(), _own_cpu_s()
        self.own_cores = (own1 - self.own0) / self.seconds
        self.other_cores = (None if busy1 is None or self.busy0 is None
                            else max(0.0, (busy1 - self.busy0) - (own1 - self.own0)) / self.seconds)

    def result(self, n: int, **extra: object) -> dict:
        return {"ips": n / self.seconds, "seconds": self.seconds, "own_cores": self.own_cores,
                "other_cores": self.other_cores, "waited_for_quiet_s": self.waited, **extra}


def entries_for(files: list[str]):
    from indexer.scan import scan

    found = scan(files)
    assert len(found.files) == len(files), found.skipped
    return found.files


def supports(fn, param: str) -> bool:
    import inspect

    return param in inspect.signature(fn).parameters


def time_decode(files: list[str], pre, workers: int, thumbnails: bool) -> dict:
    """decode_stream alone; with `thumbnails` it also writes them (into a scratch home), as indexing does."""
    from indexer.decode import Failed, decode_stream

    entries = entries_for(files)
    failed = 0
    first = None
    with tempfile.TemporaryDirectory(prefix="cm-bench-thumbs-") as home:
        kw = {"home": home} if thumbnails and supports(decode_stream, "home") else {}
        with Clock() as c:
            for res in decode_stream(entries, pre, workers, **kw):
                if first is None:
                    first = time.perf_counter() - c.t0
                failed += isinstance(res, Failed)
    if failed:
        raise RuntimeError(f"{failed} of {len(files)} files failed to decode")
    return c.result(len(files), first_result_s=first)


def predecode(files: list[str], pre):
    import numpy as np

    from indexer.decode import Decoded, decode_stream

    out = [r.pixels for r in decode_stream(entries_for(files), pre, 0) if isinstance(r, Decoded)]
    return np.stack(out)


def time_model(encoder, pixels, batch_size: int, max_batches: int | None = None) -> dict:
    if max_batches:
        pixels = pixels[:max_batches * batch_size]
    with Clock() as c:
        for i in range(0, len(pixels), batch_size):
            encoder.encode_pixels(pixels[i:i + batch_size])
    return c.result(len(pixels))


def time_e2e(encoder, files: list[str], batch_size: int, workers: int | None, thumbnails: bool,
             tokens: bool = True) -> dict:
    """index_paths into a fresh home (workers None: the run picks its decode workers, as the CLI's does).
    Without `tokens` the run writes no token features (what they cost: --overheads)."""
    import indexer.pipeline as pipeline
    from retrieval.model.recorded import checkpoint_stat
    from retrieval.store import Store

    writer_for = pipeline.token_cache.writer_for
    with tempfile.TemporaryDirectory(prefix="cm-bench-") as home:
        t_open = time.perf_counter()
        with Store.open(home, create=True, writable=True) as store:
            fp = encoder.fingerprint
            store.bind_model(fp, checkpoint_stat(fp.pretrained) if fp.weights.startswith("sha256:") else None)
            kw = {"thumbnails": thumbnails} if supports(pipeline.index_paths, "thumbnails") else {}
            if not tokens:
                pipeline.token_cache.writer_for = lambda *a, **k: None
            try:
                with Clock() as c:
                    rep = pipeline.index_paths(store, encoder, files, batch_size=batch_size, workers=workers, **kw)
            finally:
                pipeline.token_cache.writer_for = writer_for
            count = store.count("image")
        total = time.perf_counter() - t_open
    if rep.added != len(files) or rep.skipped or count != len(files):
        raise RuntimeError(f"index run incomplete: added {rep.added}/{len(files)}, skipped {rep.skipped[:3]}")
    return c.result(len(files), with_store_open_close_s=total, report_ips=rep.images_per_second,
                    precision=encoder.precision, workers=getattr(rep, "workers", workers),
                    stages=getattr(rep, "stages", None))


def time_naive(model, preprocess, files: list[str], batch_size: int, draft: int | None) -> dict:
    """The loop a user writes with open_clip: open each file (with `draft`, Pillow's JPEG draft mode scales
    the DCT decode toward the model's input size; else a full-size decode), open_clip's own preprocess,
    batches through the model in its weights' dtype, unit vectors kept in one numpy array. No catalog, no
    thumbnails, no decode workers."""
    import numpy as np
    import torch
    from PIL import Image

    dtype = next(model.parameters()).dtype
    vectors: list[np.ndarray] = []

    def run(batch: list) -> None:
        with torch.no_grad():
            f = model.encode_image(torch.stack(batch).to(dtype)).float()
            vectors.append((f / f.norm(dim=-1, keepdim=True)).numpy())

    with Clock() as c:
        batch = []
        for p in files:
            img = Image.open(p)
            if draft:
                img.draft("RGB", (draft, draft))
            batch.append(preprocess(img.convert("RGB")))
            if len(batch) == batch_size:
                run(batch)
                batch = []
        if batch:
            run(batch)
        embeddings = np.concatenate(vectors)
    if embeddings.shape[0] != len(files):
        raise RuntimeError(f"naive loop embedded {embeddings.shape[0]} of {len(files)} files")
    return c.result(len(files), precision=precision_name(dtype), draft=draft)


def precision_name(dtype) -> str:
    """A torch dtype as the CLI names precisions."""
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def naive_models(name: str, pretrained: str, batch_size: int, size: int, fp32: bool) -> dict[str, tuple]:
    """open_clip models for the naive loops, made as a user makes them and warmed with one batch:
    "user" (bf16 weights where the CPU is fast at bf16, else fp32) and, with `fp32`, "fp32"."""
    import copy

    import open_clip
    import torch

    from retrieval.hardware import cpu_has_fast_bf16

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    model.eval()
    out: dict[str, tuple] = {}
    if cpu_has_fast_bf16():
        out["user"] = (copy.deepcopy(model).to(torch.bfloat16) if fp32 else model.to(torch.bfloat16), preprocess)
    else:
        out["user"] = (model, preprocess)
    if fp32:
        out["fp32"] = (model, preprocess)
    for m, _ in out.values():
        with torch.no_grad():
            m.encode_image(torch.zeros(batch_size, 3, size, size, dtype=next(m.parameters()).dtype))
    return out


def with_precision(encoder, precision: str):
    """The same loaded model run at another precision, through the real TorchEncoder code path (a copy of
    the weights in that precision, as load_encoder makes them)."""
    import copy

    import torch

    from retrieval.model.torch_encoder import TorchEncoder, with_weights

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return TorchEncoder(with_weights(copy.deepcopy(encoder.model), dtype), encoder.tokenizer, encoder.preprocess,
                        encoder.device, precision, encoder.fingerprint)


def auto_precision(encoder, args, scratch: Path, tiers: list[str]):
    """What `index --precision auto` indexes with on this CPU: the int8 image tower where it measures faster
    than torch (retrieval/model/int8_auto.py), decided here as the CLI's first batch decides, on the first
    tier's photos, with an export cache of the bench's own (made and measured before any timing)."""
    from retrieval.model.int8_auto import auto_int8_allowed
    from retrieval.model.int8_encoder import Int8ImageEncoder

    if args.precision != "auto" or encoder.device != "cpu" or not auto_int8_allowed():
        return encoder
    os.environ["CROSSMODAL_CACHE"] = str(scratch / "cache-steady")  # never the user's own cache
    notes: list[str] = []
    auto = Int8ImageEncoder(encoder, scratch / "home-steady", notes.append, notes.append, auto=True)
    files = tier_files(args.photos, tiers[0], 32)
    auto.encode_pixels_with_tokens(predecode(files, encoder.preprocess))
    auto.measured = "; ".join(n for n in notes if "img/s" in n) or None
    for n in notes:
        print(f"auto precision: {n}", file=sys.stderr)
    return auto if auto.precision == "int8" else encoder


def warm(encoder, batch_size: int) -> None:
    import numpy as np

    s = encoder.preprocess.size
    encoder.encode_pixels(np.zeros((batch_size, s, s, 3), dtype=np.uint8))


def med(xs: list[dict], key: str = "ips") -> float | None:
    vals = [x[key] for x in xs if x and x.get(key) is not None]
    return statistics.median(vals) if vals else None


def top(xs: list[dict], key: str = "ips") -> float | None:
    """Best of the repeats: the least disturbed run on a shared machine."""
    vals = [x[key] for x in xs if x and x.get(key) is not None]
    return max(vals) if vals else None


def fmt(x: float | None, spec: str = "7.1f") -> str:
    return format(x, spec) if x is not None else "n/a".rjust(int(spec.split(".")[0] or 0))


# ---- main -------------------------------------------------------------------------------------------
def parse_int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, default=Path("/tmp/photos"), help="root holding small/ medium/ large/")
    ap.add_argument("--tiers", default=",".join(TIERS), help="comma-separated tiers (default: all)")
    ap.add_argument("--limit", type=int, default=None, help="at most N images per tier")
    ap.add_argument("--batch-size", type=int, default=None, help="encode batch (default: the CLI's, 32)")
    ap.add_argument("--workers", type=int, default=None,
                    help="decode workers for the main table (default: indexer.pipeline.default_workers())")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: what load_encoder sets, i.e. the usable cores); the "
                         "whole-process runs get it as OMP_NUM_THREADS")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint file")
    ap.add_argument("--random-weights", action="store_true",
                    help="write seeded random weights to --pretrained (default /tmp/cm/<model>.pt) if absent")
    ap.add_argument("--precision", default="auto",
                    help="precision of the steady-state and whole-process runs (auto|fp32|bf16)")
    ap.add_argument("--model-precisions", default="fp32,bf16", help="precisions for the model-only column")
    ap.add_argument("--slow-precision-batches", type=int, default=1,
                    help="model-only batches for precisions other than the e2e one (bf16 is emulated, slow, "
                         "on CPUs without AVX512-BF16/AMX); 0 = all")
    ap.add_argument("--repeats", type=int, default=1, help="repeat each measurement, report the median")
    ap.add_argument("--stat", choices=("median", "max"), default="median",
                    help="main-table statistic over repeats (max = least disturbed run on a shared machine)")
    ap.add_argument("--no-naive", action="store_true", help="skip both naive loops")
    ap.add_argument("--overheads", action="store_true",
                    help="also run steady state without thumbnails and without token features (what each costs)")
    ap.add_argument("--no-naive-fp32", action="store_true",
                    help="skip the full-decode fp32 naive loop (keep the user's bf16 + draft one)")
    ap.add_argument("--no-components", action="store_true", help="skip decode-only and model-only")
    ap.add_argument("--no-whole-process", action="store_true",
                    help="skip the `crossmodal index` processes from an empty home (first and second home)")
    ap.add_argument("--no-rerun", action="store_true", help="skip the unchanged re-run of the large library")
    ap.add_argument("--rerun-n", type=int, default=10_000, help="files in the unchanged library")
    ap.add_argument("--rerun-folders", type=int, default=25, help="folders the unchanged library spreads over")
    ap.add_argument("--rerun-repeats", type=int, default=3, help="timed re-runs (the median is reported)")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="folder for temporary homes, export caches and the hard-linked libraries (default: "
                         "the system temp folder; must be on the photos' file system)")
    ap.add_argument("--sweep", action="store_true", help="also sweep end-to-end over workers x threads")
    ap.add_argument("--sweep-only", action="store_true", help="only the sweep (implies --sweep)")
    ap.add_argument("--workers-grid", default="0,1,2")
    ap.add_argument("--threads-grid", default="1,2")
    ap.add_argument("--json", type=Path, default=None, help="write every raw measurement here")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the final Markdown table here")
    ap.add_argument("--quiet-below", type=float, default=None,
                    help="before each measurement wait until other processes use fewer cores than this")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="longest such wait per measurement (s)")
    ap.add_argument("--no-thumbnails", action="store_true",
                    help="index (and decode-only) without writing thumbnails, where the code has them (the "
                         "whole-process runs always write them, as the CLI does)")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="import the packages from the working tree instead of a copy taken at start")
    args = ap.parse_args(argv)
    args.sweep = args.sweep or args.sweep_only

    from bench import index_process  # noqa: F401 - imported now, so a later edit cannot enter this run

    if args.no_snapshot:
        src, digest = str(REPO), "working tree"
    else:
        src, digest = snapshot_source(None)
        os.environ[SNAP_ENV] = src
        _use_source(src)
        for name in [m for m in sys.modules if m.split(".")[0] in PACKAGES]:
            del sys.modules[name]  # nothing imported yet in practice; keep the snapshot authoritative
    try:
        return run(args, src, digest)
    finally:
        if not args.no_snapshot:
            import shutil

            shutil.rmtree(src, ignore_errors=True)


def cli_options(args, pretrained: str) -> list[str]:
    """`crossmodal index` options for the settings the in-process rows ran with (the CLI's defaults else)."""
    opts = ["--model", args.model, "--pretrained", pretrained]
    if args.precision != "auto":
        opts += ["--precision", args.precision]
    if args.batch_size:
        opts += ["--batch-size", str(args.batch_size)]
    if args.workers is not None:
        opts += ["--workers", str(args.workers)]
    return opts


def link_files(files: list[str], folder: Path) -> None:
    """Hard links to `files` under their own names in a new `folder`: a tier (or its first --limit photos)
    as one folder a user would index, at no disk cost."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for f in files:
        try:
            os.link(f, folder / Path(f).name)
        except OSError as e:
            raise SystemExit(f"cannot hard-link {f} into {folder} ({e}); put --scratch on the photos' file "
                             "system") from e


def measure_whole(files: list[str], scratch: Path, src: str, args, pretrained: str) -> dict:
    """`crossmodal index FOLDER` from an empty home, per repeat: the first home on the machine (a fresh
    CROSSMODAL_CACHE, so the ONNX export is made) and a second home sharing that cache."""
    import shutil

    from bench.index_process import index_process

    folder = scratch / "tier"
    link_files(files, folder)
    out: dict = {"first": [], "second": []}
    for i in range(args.repeats):
        cache = scratch / f"cache-{i}"
        for which in ("first", "second"):
            home = scratch / f"home-{which}-{i}"
            res = index_process(Clock, home, [folder], len(files), src, cache, scratch,
                                cli_options(args, pretrained), args.threads)
            if res["report"].get("added") != len(files) or res["report"].get("skipped"):
                raise RuntimeError(f"whole-process run ({which} home) did not add all {len(files)} photos: "
                                   f"{res['report']}")
            out[which].append(res)
            shutil.rmtree(home, ignore_errors=True)  # an export in the home is ~600 MB for ViT-B-32
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    return out


def measure_rerun(encoder, scratch: Path, src: str, args) -> dict:
    """Whole `crossmodal index ROOT --json` re-runs over an unchanged library of --rerun-n real JPEG files
    (hard links to every tier's photos), indexed first with random vectors (index_process.py).

    One untimed run goes first: over a library a real run indexed, the ONNX export is already there, but
    the fast build makes none, so that run makes it (and shows whether the model was loaded for it)."""
    import shutil

    from bench.index_process import build_library, check_unchanged, index_library_fast, index_process

    sources = [f for t in TIERS if (args.photos / t).is_dir() for f in tier_files(args.photos, t, None)]
    if not sources:
        raise SystemExit(f"no photos under {args.photos}")
    root, home, cache = scratch / "library", scratch / "home-library", scratch / "cache-library"
    t0 = time.perf_counter()
    build_library(root, sources, args.rerun_n, args.rerun_folders)
    n = index_library_fast(home, root, encoder)
    build_s = time.perf_counter() - t0
    if n != args.rerun_n:
        raise RuntimeError(f"the library index holds {n} images, not {args.rerun_n}")
    first = index_process(Clock, home, [root], n, src, cache, scratch, threads=args.threads)
    check_unchanged(first, n)
    runs = []
    for _ in range(args.rerun_repeats):
        res = index_process(Clock, home, [root], n, src, cache, scratch, threads=args.threads)
        check_unchanged(res, n)
        runs.append(res)
    for p in (root, home, cache):
        shutil.rmtree(p, ignore_errors=True)
    return {"n": n, "folders": args.rerun_folders, "sources": len(sources), "build_s": round(build_s, 2),
            "first_untimed": first, "runs": runs}


def run(args, src: str, digest: str) -> int:
    QUIET.update(below=args.quiet_below, max_wait=args.quiet_wait)

    import shutil

    import torch

    from bench.index_process import check_source, cli_command
    from indexer.pipeline import default_workers, index_paths
    from retrieval.config import DEFAULT_BATCH_SIZE
    from retrieval.model.spec import ModelSpec, resolve_precision
    from retrieval.model.torch_encoder import load_encoder

    torch_default_threads = torch.get_num_threads()  # what a user's own script gets
    bs = args.batch_size or DEFAULT_BATCH_SIZE
    thumbs = not args.no_thumbnails and supports(index_paths, "thumbnails")
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    pretrained = args.pretrained
    if args.random_weights:
        pretrained = pretrained or f"/tmp/cm/{args.model.lower().replace('-', '')}.pt"
        if not Path(pretrained).is_file():
            print(f"writing seeded random {args.model} weights to {pretrained}", file=sys.stderr)
            make_random_checkpoint(args.model, Path(pretrained))
    if not pretrained:
        sys.exit("give --pretrained TAG|FILE, or --random-weights")
    whole = not args.no_whole_process and not args.sweep_only
    rerun = not args.no_rerun and not args.sweep_only

    t_load = time.perf_counter()
    encoder = load_encoder(ModelSpec(name=args.model, pretrained=pretrained, precision=args.precision))
    load_s = time.perf_counter() - t_load
    threads_after_load = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    main_threads = torch.get_num_threads()
    main_workers = default_workers() if args.workers is None else args.workers

    scratch = Path(tempfile.mkdtemp(prefix="cm-bench-run-", dir=args.scratch))
    torch_encoder, encoder = encoder, auto_precision(encoder, args, scratch, tiers)

    # Precisions for model-only; bf16 only where it runs at all (it is emulated on AVX2-only CPUs).
    encoders = {}
    for p in [] if args.no_components else [x.strip() for x in args.model_precisions.split(",") if x.strip()]:
        enc = with_precision(torch_encoder, p)
        try:
            warm(enc, bs)
            encoders[p] = enc
        except Exception as e:  # noqa: BLE001 - an unsupported precision is a result, not a crash
            print(f"precision {p}: not supported here ({type(e).__name__}: {e})", file=sys.stderr)
    warm(encoder, bs)
    if encoder is not torch_encoder and not args.no_components:
        encoders[encoder.precision] = encoder  # the int8 tower's model-only figure

    naive = {}
    if not args.no_naive and not args.sweep_only:
        naive = naive_models(args.model, pretrained, bs, encoder.preprocess.size, fp32=not args.no_naive_fp32)

    info = machine_info()
    info.update({"torch_default_threads": torch_default_threads,
                 "torch_threads_set_by_load_encoder": threads_after_load, "torch_threads": main_threads,
                 "interop_threads": torch.get_num_interop_threads(), "default_workers": default_workers(),
                 "workers": main_workers, "e2e_precision": encoder.precision, "batch_size": bs,
                 "e2e_torch_precision": torch_encoder.precision if torch_encoder is not encoder else None,
                 "auto_int8": getattr(encoder, "measured", None),
                 "naive_user_precision": precision_name(next(naive["user"][0].parameters()).dtype)
                 if "user" in naive else None, "naive_fp32": "fp32" in naive,
                 "whole_process_precision": encoder.precision if encoder is not torch_encoder
                 else resolve_precision(args.precision, encoder.device, "index"),  # the CLI decides as auto did
                 "whole_process_threads": args.threads or "the CLI's default (usable cores)",
                 "model": args.model, "pretrained": pretrained, "model_load_s": round(load_s, 2),
                 "source": src, "source_digest": digest, "thumbnails": thumbs, "scratch": str(scratch)})
    if whole or rerun:
        info["cli_command"] = " ".join(cli_command())
        info["cli_imports_from"] = check_source(src, scratch)
    print_machine(info)

    results: dict = {"machine": info, "tiers": {}, "sweep": {}, "whole_process": {}, "rerun": None}
    started = time.perf_counter()
    try:
        for tier in tiers:
            files = tier_files(args.photos, tier, args.limit)
            pixels = predecode(files, encoder.preprocess) if encoders or args.sweep else None
            r: dict = {"n": len(files), "megapixels": round(tier_megapixels(files), 2), "decode": [],
                       "decode_w0": [], "model": {p: [] for p in encoders}, "e2e": [], "naive_user": [],
                       "naive": [], "e2e_no_thumbs": [], "e2e_no_tokens": [], "e2e_torch": []}
            if not args.sweep_only:
                torch.set_num_threads(main_threads)
                for _ in range(args.repeats):  # interleaved, so drift from the shared CPUs hits all columns
                    if not args.no_components:
                        r["decode"].append(time_decode(files, encoder.preprocess, main_workers, thumbs))
                        if main_workers != 0:
                            r["decode_w0"].append(time_decode(files, encoder.preprocess, 0, thumbs))
                    for p, enc in encoders.items():
                        cap = None if p == torch_encoder.precision else (args.slow_precision_batches or None)
                        r["model"][p].append(time_model(enc, pixels, bs, cap))
                    r["e2e"].append(time_e2e(encoder, files, bs, args.workers, thumbs))
                    if torch_encoder is not encoder:  # auto took the int8 tower: torch's own figure beside it
                        r["e2e_torch"].append(time_e2e(torch_encoder, files, bs, args.workers, thumbs))
                    if args.overheads:
                        if thumbs:
                            r["e2e_no_thumbs"].append(time_e2e(encoder, files, bs, args.workers, False))
                        r["e2e_no_tokens"].append(time_e2e(encoder, files, bs, args.workers, thumbs, tokens=False))
                    if "user" in naive:
                        r["naive_user"].append(time_naive(*naive["user"], files, bs, draft=encoder.preprocess.size))
                    if "fp32" in naive:
                        r["naive"].append(time_naive(*naive["fp32"], files, bs, draft=None))
                if main_workers == 0:
                    r["decode_w0"] = r["decode"]
            results["tiers"][tier] = r
            print(f"[{tier}: {len(files)} images done, {time.perf_counter() - started:.0f} s elapsed]",
                  file=sys.stderr, flush=True)
            if whole:
                results["whole_process"][tier] = measure_whole(files, scratch, src, args, pretrained)
                print(f"[{tier}: whole-process runs done, {time.perf_counter() - started:.0f} s elapsed]",
                      file=sys.stderr, flush=True)

            if args.sweep:
                results["sweep"][tier] = sweep(encoder, files, pixels, bs, main_threads, thumbs, args)
                print(f"[{tier}: sweep done, {time.perf_counter() - started:.0f} s elapsed]",
                      file=sys.stderr, flush=True)
        if rerun:
            results["rerun"] = measure_rerun(encoder, scratch, src, args)
            print(f"[unchanged re-run done, {time.perf_counter() - started:.0f} s elapsed]",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    info["loadavg_end"] = os.getloadavg()
    info["bench_s"] = round(time.perf_counter() - started, 1)
    report(results, encoder.precision, main_workers, main_threads, args)
    table = final_table(results, args) if not args.sweep_only else ""
    if table:
        print("\n" + table)
        results["markdown"] = table
        if args.markdown:
            args.markdown.write_text(table + "\n")
            print(f"\nMarkdown table: {args.markdown}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"raw measurements: {args.json}")
    return 0


def sweep(encoder, files: list[str], pixels, bs: int, main_threads: int, thumbs: bool, args) -> dict:
    """End-to-end images/s over decode workers x torch threads, decode-only by workers, model-only by threads."""
    import torch

    wg, tg = parse_int_list(args.workers_grid), parse_int_list(args.threads_grid)
    s: dict = {"decode": {w: [] for w in wg}, "model": {t: [] for t in tg},
               "e2e": {f"{w}/{t}": [] for w in wg for t in tg}}
    combos = [(w, t) for w in wg for t in tg]
    for rep in range(args.repeats):
        # Rotate the order each repeat: load from other processes comes and goes, and no cell
        # should always run in the same slot of a round.
        for w in wg[rep % len(wg):] + wg[:rep % len(wg)]:
            s["decode"][w].append(time_decode(files, encoder.preprocess, w, thumbs))
        for t in tg[rep % len(tg):] + tg[:rep % len(tg)]:
            torch.set_num_threads(t)
            s["model"][t].append(time_model(encoder, pixels, bs))
        k = rep % len(combos)
        for w, t in combos[k:] + combos[:k]:
            torch.set_num_threads(t)
            s["e2e"][f"{w}/{t}"].append(time_e2e(encoder, files, bs, w, thumbs))
    torch.set_num_threads(main_threads)
    return s


def print_machine(info: dict) -> None:
    """The facts every figure depends on, readable, then the raw line."""
    flags = info["cpu_flags"]
    print(f"cpu: {info['cpu']}, {info['nproc']} usable cores; flags "
          + " ".join(f"{f}={'yes' if v else 'no'}" for f, v in flags.items())
          + f"; fast bf16: {'yes' if info['fast_bf16'] else 'no'}"
          + (f" (CROSSMODAL_CPU_FLAGS={info['cpu_flags_override']!r})" if info["cpu_flags_override"] else ""))
    print(f"versions: torch {info['torch']} (cpu capability {info['torch_cpu_capability']}), open_clip "
          f"{info['open_clip']}, onnxruntime {info['onnxruntime']}, Pillow {info['pillow']} (libjpeg-turbo "
          f"{'yes' if info['libjpeg_turbo'] else 'no'}), python {info['python']}")
    print(f"threads: torch {info['torch_threads']} in-process (torch's default {info['torch_default_threads']}, "
          f"load_encoder set {info['torch_threads_set_by_load_encoder']}), interop {info['interop_threads']}; "
          f"whole-process runs: {info['whole_process_threads']}; decode workers {info['workers']}")
    print(f"precision: steady state {info['e2e_precision']}, naive as a user "
          f"{info['naive_user_precision'] or 'skipped'}, naive fp32 {'fp32' if info['naive_fp32'] else 'skipped'}, "
          f"whole process {info['whole_process_precision']}; model {info['model']} ({info['pretrained']}), "
          f"batch {info['batch_size']}")
    if "cli_imports_from" in info:
        print(f"whole-process command: {info['cli_command']} (imports {info['cli_imports_from']['cli']})")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)


def report(results: dict, e2e_precision: str, workers: int, threads: int, args) -> None:
    info = results["machine"]
    print(f"\nloadavg start {info['loadavg_start']} end {info['loadavg_end']}; bench {info['bench_s']} s; "
          f"table: {args.stat} of {args.repeats} run(s)")
    agg = top if args.stat == "max" else med
    if not args.sweep_only:
        precs = list(next(iter(results["tiers"].values()))["model"]) if results["tiers"] else []
        user_p = info["naive_user_precision"] or "-"
        print(f"\nimages/s: decode with {workers} worker(s) and in-process (w0); model-only batch "
              f"{info['batch_size']} at {threads} torch thread(s); e2e = crossmodal steady state, index_paths "
              f"({e2e_precision}, {workers} worker(s), {threads} thread(s)); naive-u = as a user ({user_p} "
              "weights, PIL draft decode, open_clip preprocess); naive = full-size PIL decode, fp32")
        head = (f"{'tier':<7}{'n':>4} {'decode':>7} {'dec w0':>7} "
                + " ".join(f"{'mdl ' + p:>9}" for p in precs)
                + f" {'e2e':>7} {'naive-u':>7} {'naive':>7} {'e2e/min(dec,mdl)':>17} {'e2e/naive-u':>12}"
                  f" {'e2e/naive':>10}")
        print(head)
        print("-" * len(head))
        for tier, r in results["tiers"].items():
            dec, dec0, e2e = agg(r["decode"]), agg(r["decode_w0"]), agg(r["e2e"])
            nu, nv = agg(r["naive_user"]), agg(r["naive"])
            mdl = {p: agg(v) for p, v in r["model"].items()}
            m_e2e = mdl.get(e2e_precision)
            bound = min(dec, m_e2e) if dec and m_e2e else None

            def busy(xs: list[dict]) -> str:  # '!': other processes kept > LOADED cores busy meanwhile
                o = med(xs, "other_cores")
                return "!" if o is not None and o > LOADED else " "

            print(f"{tier:<7}{r['n']:>4} {fmt(dec, '6.1f')}{busy(r['decode'])} {fmt(dec0, '6.1f')}"
                  f"{busy(r['decode_w0'])} "
                  + " ".join(f"{fmt(mdl[p], '8.1f')}{busy(r['model'][p])}" for p in precs)
                  + f" {fmt(e2e, '6.1f')}{busy(r['e2e'])} {fmt(nu, '6.1f')}{busy(r['naive_user'])}"
                  f" {fmt(nv, '6.1f')}{busy(r['naive'])}"
                  f" {fmt(e2e / bound if e2e and bound else None, '17.2f')}"
                  f" {fmt(e2e / nu if e2e and nu else None, '12.2f')}"
                  f" {fmt(e2e / nv if e2e and nv else None, '10.2f')}")
        print(f"'!' = measured while other processes kept more than {LOADED} cores busy; ratios between "
              "columns measured under different load are not meaningful")
        print("other processes' CPU load during each column (median cores busy, of "
              f"{info['nproc']}): " + "; ".join(
                  f"{tier}: dec {fmt(med(r['decode'], 'other_cores'), '.1f')} "
                  + " ".join(f"mdl-{p} {fmt(med(v, 'other_cores'), '.1f')}" for p, v in r["model"].items())
                  + f" e2e {fmt(med(r['e2e'], 'other_cores'), '.1f')}"
                  + f" naive-u {fmt(med(r['naive_user'], 'other_cores'), '.1f')}"
                  + f" naive {fmt(med(r['naive'], 'other_cores'), '.1f')}"
                  for tier, r in results["tiers"].items()))
        if not args.no_components:
            print("decode-pool start-up (first result after, s): " + "; ".join(
                f"{tier} {fmt(med(r['decode'], 'first_result_s'), '.2f')}"
                for tier, r in results["tiers"].items()))
        if "fp32" in precs and "bf16" in precs:
            for tier, r in results["tiers"].items():
                f32, b16 = agg(r["model"]["fp32"]), agg(r["model"]["bf16"])
                if f32 and b16:
                    print(f"  {tier}: bf16 / fp32 model-only speed = {b16 / f32:.2f}")
    if results["whole_process"]:
        print(f"\nwhole process from an empty home ({info['whole_process_precision']}): `crossmodal index FOLDER "
              "--json` wall time; index = the command's own report; export = the ONNX export's own timing; "
              "rest = imports, model load, store open/close (the export counts in index when auto's int8 tower "
              "needed it)")
        for tier, w in results["whole_process"].items():
            for which in ("first", "second"):
                for x in w[which]:
                    rep = x["report"]
                    rest = x["seconds"] - rep.get("seconds", 0) - (x["export_seconds"] or 0)
                    if rest < 0:  # auto's int8 tower needs the export first: made inside the index run
                        rest += x["export_seconds"] or 0
                    print(f"  {tier:<7}{which:<7} wall {x['seconds']:6.1f} s ({x['ips']:5.1f} images/s): index "
                          f"{rep.get('seconds', 0):5.1f} s ({rep.get('images_per_second', 0):5.1f} images/s), "
                          f"export {fmt(x['export_seconds'], '5.1f')} s, rest {rest:5.1f} s; "
                          f"{export_status(x)}; other processes {fmt(x['other_cores'], '.1f')} cores"
                          + (f"; {'; '.join(x['warnings'])}" if x["warnings"] else ""))
    if results["rerun"]:
        rr = results["rerun"]
        first = rr["first_untimed"]
        print(f"\nunchanged re-run: {rr['n']:,} files in {rr['folders']} folders (hard links to {rr['sources']} "
              f"photos), built in {rr['build_s']} s; untimed first run {first['seconds']:.1f} s "
              f"({export_status(first)}; heavy imports: {first['heavy_imports']})")
        for x in rr["runs"]:
            print(f"  wall {x['seconds']:.2f} s (CPU {x['own_cores'] * x['seconds']:.2f} s); the command's report "
                  f"{x['report'].get('seconds')} s; heavy imports: {x['heavy_imports']}; other processes "
                  f"{fmt(x['other_cores'], '.1f')} cores")


def export_status(run: dict) -> str:
    """Whether a `crossmodal index` process made the ONNX export for queries, or found one."""
    if run["export_made"]:
        where = "CROSSMODAL_CACHE" if run["export_where"] == "cache" else "the home (CROSSMODAL_CACHE not used)"
        return f"export made in {where}"
    if run["exports_in_cache"]:
        return "export reused from CROSSMODAL_CACHE"
    if run["exports_in_home"]:
        return "export already in the home"
    return "no export"


def overhead_lines(results: dict, agg) -> list[str]:
    """Per tier, what writing thumbnails and token features costs the steady state: 1 - with / without."""
    out = []
    for tier, r in results["tiers"].items():
        e2e = agg(r["e2e"])
        parts = []
        for key, what in (("e2e_no_thumbs", "thumbnails"), ("e2e_no_tokens", "token features")):
            v = agg(r.get(key, []))
            if e2e and v:
                parts.append(f"{what} {100 * (1 - e2e / v):.1f}% (without: {v:.1f})")
        if parts:
            out.append(f"{tier} {', '.join(parts)}")
    return out


def final_table(results: dict, args) -> str:
    """The README table: per tier naive (as a user, and fp32), steady state, their ratio, whole process;
    then one line for the unchanged re-run."""
    agg = top if args.stat == "max" else med
    info = results["machine"]

    def mark(xs: list[dict]) -> str:
        o = med(xs, "other_cores")
        return "!" if o is not None and o > LOADED else ""

    def ips(xs: list[dict]) -> str:
        v = agg(xs)
        return f"{v:.1f}{mark(xs)}" if v is not None else "-"

    def whole(xs: list[dict]) -> str:
        if not xs:
            return "-"
        statuses = {export_status(x) for x in xs}
        short = ("export made" if all(x["export_made"] for x in xs)
                 else "export reused" if statuses == {"export reused from CROSSMODAL_CACHE"}
                 else "; ".join(sorted(statuses)))
        return f"{med(xs, 'seconds'):.1f} s{mark(xs)} ({med(xs):.1f} images/s, {short})"

    user_p = info["naive_user_precision"] or "-"
    lines = [f"Indexing, images/s unless marked (model {info['model']}, {info['cpu']}, {info['nproc']} cores, "
             f"flags {' '.join(info['simd']) or 'none of ' + '/'.join(RELEVANT_FLAGS)}; torch "
             f"{info['torch']}, open_clip {info['open_clip']}, onnxruntime {info['onnxruntime']}; "
             f"{info['torch_threads']} threads; {args.stat} of {args.repeats} run(s)):", "",
             f"| tier | naive as a user ({user_p}, draft decode) | naive (fp32, full decode) | crossmodal steady state "
             f"({info['e2e_precision']}) | steady / naive | whole process, first home "
             f"({info['whole_process_precision']}) | whole process, second home |",
             "|---|---|---|---|---|---|---|"]
    for tier, r in results["tiers"].items():
        nu, st = agg(r["naive_user"]), agg(r["e2e"])
        w = results["whole_process"].get(tier, {})
        lines.append(f"| {r['megapixels']:.1f} MP ({tier}, {r['n']} photos) | {ips(r['naive_user'])} | "
                     f"{ips(r['naive'])} | {ips(r['e2e'])} | {f'{st / nu:.2f}' if st and nu else '-'} | "
                     f"{whole(w.get('first', []))} | {whole(w.get('second', []))} |")
    torch_p = info.get("e2e_torch_precision")
    if torch_p:
        lines += ["", f"auto precision: {info.get('auto_int8') or 'int8'}. The same steady state on torch "
                  f"({torch_p}): " + "; ".join(f"{tier} {ips(r['e2e_torch'])} images/s"
                                               for tier, r in results["tiers"].items() if r.get("e2e_torch")) + "."]
    lines.append("")
    lines.append("Steady state: `index_paths` with the model loaded (thumbnails, token features, commits); "
                 "steady / naive divides it by the user's naive loop."
                 + (" Whole process: `crossmodal index FOLDER --model M --pretrained CKPT --json` as a new process "
                    "into an empty home, wall time (imports, model load, indexing, ONNX export); the first home "
                    "starts with an empty CROSSMODAL_CACHE, the second shares it." if results["whole_process"] else ""))
    costs = overhead_lines(results, agg)
    if costs:
        lines += ["", "What thumbnails and token features cost the steady state (images/s without them, and the "
                  "share of the time they take): " + "; ".join(costs) + "."]
    workers = {tier: sorted({x.get("workers") for x in r["e2e"]}, key=str) for tier, r in results["tiers"].items()}
    if any(w != [None] for w in workers.values()):
        lines += ["", "Decode workers the steady-state runs chose (measured on their first batch): "
                  + "; ".join(f"{tier} {', '.join(str(x) for x in w)}" for tier, w in workers.items()) + "."]
    if any(mark(x) for r in results["tiers"].values() for x in (r["naive_user"], r["naive"], r["e2e"])):
        lines.append(f"'!': other processes kept more than {LOADED} cores busy during that measurement.")
    rr = results["rerun"]
    if rr:
        walls = [x["seconds"] for x in rr["runs"]]
        m = statistics.median(walls)
        lines.append("")
        lines.append(f"Unchanged re-run of {rr['n']:,} photos ({rr['folders']} folders): whole `crossmodal index "
                     f"ROOT --json` process {m:.2f} s, median of {len(walls)} "
                     f"({', '.join(f'{w:.2f}' for w in walls)}; the command's own report "
                     f"{statistics.median(x['report'].get('seconds', 0) for x in rr['runs']):.2f} s; heavy "
                     f"imports: {rr['runs'][0]['heavy_imports']}); target under 1 s: {'met' if m < 1 else 'missed'}.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

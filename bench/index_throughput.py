#!/usr/bin/env python
"""Image indexing throughput on real photos: decode-only, model-only, end-to-end and a naive baseline.

A benchmark, not a test. Per tier of photos (small ~0.3 MP, medium ~2 MP, large 12 MP) it measures:

  decode    decode_stream (indexer/decode.py) over the files, default worker count and 0 (in-process)
  model     TorchEncoder.encode_pixels on pre-decoded uint8 batches, fp32 and bf16 (where it runs)
  e2e       index_paths into a fresh temporary Store home, opened and bound as `crossmodal index` does
  naive     one process: Image.open().convert('RGB') at full size, open_clip's own preprocess, fp32

and prints images/s plus e2e / min(decode, model) (how well decode and encode overlap) and e2e / naive.
`--sweep` adds an end-to-end grid over decode workers x torch threads (what the defaults should be).

On a shared machine every measurement also records how many cores *other* processes kept busy meanwhile
(from /proc/stat); `--quiet-below 0.3` waits (up to `--quiet-wait` s) for a quiet moment before each one.
Columns measured under different load are flagged, as their ratios mean little. retrieval/ and indexer/
are copied aside at start (`--no-snapshot` to skip), so edits made during a run cannot mix code versions.

Examples (no pretrained weights needed; speed does not depend on weight values):

  .venv/bin/python bench/index_throughput.py --random-weights --limit 64
  .venv/bin/python bench/index_throughput.py --random-weights --limit 64 --sweep-only --tiers small,large \
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
PACKAGES = ("retrieval", "indexer")
SNAP_ENV = "CM_BENCH_SRC"  # set by main() so spawned decode workers import the same snapshot


def _use_source(root: str) -> None:
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)  # ahead of the editable install's finder, which sits at the end of meta_path


_use_source(os.environ.get(SNAP_ENV) or str(REPO))

TIERS = ("small", "medium", "large")


# ---- setup ------------------------------------------------------------------------------------------
def snapshot_source(keep_dir: Path | None) -> tuple[str, str]:
    """Copy retrieval/ and indexer/ aside and import from the copy: edits made to the working tree while
    the benchmark runs (workers import modules afresh) cannot mix two versions of the code in one run.
    Returns (directory, digest of the copied sources)."""
    import hashlib
    import shutil

    dest = Path(tempfile.mkdtemp(prefix="cm-bench-src-", dir=keep_dir))
    h = hashlib.sha256()
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for f in sorted((dest / pkg).rglob("*.py")):
            h.update(str(f.relative_to(dest)).encode() + b"\0" + f.read_bytes())
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


def machine_info() -> dict:
    import PIL
    import torch
    from PIL import features

    flags = ""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name") and model in ("", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    fl = set(flags.split())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
            if f in fl]
    return {
        "cpu": model,
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "simd": simd,
        "torch": torch.__version__,
        "torch_cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        "pillow": PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


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


def time_e2e(encoder, files: list[str], batch_size: int, workers: int | None, thumbnails: bool) -> dict:
    from indexer.pipeline import index_paths
    from retrieval.model.recorded import checkpoint_stat
    from retrieval.store import Store

    with tempfile.TemporaryDirectory(prefix="cm-bench-") as home:
        t_open = time.perf_counter()
        with Store.open(home, create=True, writable=True) as store:
            fp = encoder.fingerprint
            store.bind_model(fp, checkpoint_stat(fp.pretrained) if fp.weights.startswith("sha256:") else None)
            kw = {"thumbnails": thumbnails} if supports(index_paths, "thumbnails") else {}
            with Clock() as c:
                rep = index_paths(store, encoder, files, batch_size=batch_size, workers=workers, **kw)
            count = store.count("image")
        total = time.perf_counter() - t_open
    if rep.added != len(files) or rep.skipped or count != len(files):
        raise RuntimeError(f"index run incomplete: added {rep.added}/{len(files)}, skipped {rep.skipped[:3]}")
    return c.result(len(files), with_store_open_close_s=total, report_ips=rep.images_per_second)


def time_naive(model, preprocess, files: list[str], batch_size: int) -> dict:
    import torch
    from PIL import Image

    def run(batch):
        with torch.no_grad():
            f = model.encode_image(torch.stack(batch))
            (f / f.norm(dim=-1, keepdim=True)).numpy()

    with Clock() as c:
        batch = []
        for p in files:
            batch.append(preprocess(Image.open(p).convert("RGB")))
            if len(batch) == batch_size:
                run(batch)
                batch = []
        if batch:
            run(batch)
    return c.result(len(files))


def with_precision(encoder, precision: str):
    """The same loaded model run at another precision, through the real TorchEncoder code path (a copy of
    the weights in that precision, as load_encoder makes them)."""
    import copy

    import torch

    from retrieval.model.torch_encoder import TorchEncoder, with_weights

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return TorchEncoder(with_weights(copy.deepcopy(encoder.model), dtype), encoder.tokenizer, encoder.preprocess,
                        encoder.device, precision, encoder.fingerprint)


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
                    help="torch threads (default: what load_encoder sets, i.e. os.cpu_count())")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint file")
    ap.add_argument("--random-weights", action="store_true",
                    help="write seeded random weights to --pretrained (default /tmp/cm/<model>.pt) if absent")
    ap.add_argument("--precision", default="auto", help="precision of the end-to-end run (auto|fp32|bf16)")
    ap.add_argument("--model-precisions", default="fp32,bf16", help="precisions for the model-only column")
    ap.add_argument("--slow-precision-batches", type=int, default=1,
                    help="model-only batches for precisions other than the e2e one (bf16 is emulated, slow, "
                         "on CPUs without AVX512-BF16/AMX); 0 = all")
    ap.add_argument("--repeats", type=int, default=1, help="repeat each measurement, report the median")
    ap.add_argument("--stat", choices=("median", "max"), default="median",
                    help="main-table statistic over repeats (max = least disturbed run on a shared machine)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    ap.add_argument("--sweep", action="store_true", help="also sweep end-to-end over workers x threads")
    ap.add_argument("--sweep-only", action="store_true", help="only the sweep (implies --sweep)")
    ap.add_argument("--workers-grid", default="0,1,2")
    ap.add_argument("--threads-grid", default="1,2")
    ap.add_argument("--json", type=Path, default=None, help="write every raw measurement here")
    ap.add_argument("--quiet-below", type=float, default=None,
                    help="before each measurement wait until other processes use fewer cores than this")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="longest such wait per measurement (s)")
    ap.add_argument("--no-thumbnails", action="store_true",
                    help="index (and decode-only) without writing thumbnails, where the code has them")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="import retrieval/indexer from the working tree instead of a copy taken at start")
    args = ap.parse_args(argv)
    args.sweep = args.sweep or args.sweep_only

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


def run(args, src: str, digest: str) -> int:
    QUIET.update(below=args.quiet_below, max_wait=args.quiet_wait)

    import torch

    from indexer.pipeline import default_workers, index_paths
    from retrieval.config import DEFAULT_BATCH_SIZE
    from retrieval.model.spec import ModelSpec
    from retrieval.model.torch_encoder import load_encoder

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

    t_load = time.perf_counter()
    encoder = load_encoder(ModelSpec(name=args.model, pretrained=pretrained, precision=args.precision))
    load_s = time.perf_counter() - t_load
    threads_after_load = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    main_threads = torch.get_num_threads()
    main_workers = default_workers() if args.workers is None else args.workers

    info = machine_info()
    info.update({"torch_threads_set_by_load_encoder": threads_after_load, "torch_threads": main_threads,
                 "interop_threads": torch.get_num_interop_threads(), "default_workers": default_workers(),
                 "workers": main_workers, "e2e_precision": encoder.precision, "batch_size": bs,
                 "model": args.model, "pretrained": pretrained, "model_load_s": round(load_s, 2),
                 "source": src, "source_digest": digest, "thumbnails": thumbs})
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    # Precisions for model-only; bf16 only where it runs at all (it is emulated on AVX2-only CPUs).
    encoders = {}
    for p in [x.strip() for x in args.model_precisions.split(",") if x.strip()]:
        enc = with_precision(encoder, p)
        try:
            warm(enc, bs)
            encoders[p] = enc
        except Exception as e:  # noqa: BLE001 - an unsupported precision is a result, not a crash
            print(f"precision {p}: not supported here ({type(e).__name__}: {e})", file=sys.stderr)
    warm(encoder, bs)

    naive = None
    if not args.no_naive and not args.sweep_only:
        import open_clip

        nmodel, _, npre = open_clip.create_model_and_transforms(args.model, pretrained=pretrained)
        nmodel.eval()
        naive = (nmodel, npre)
        with torch.no_grad():
            nmodel.encode_image(torch.zeros(bs, 3, encoder.preprocess.size, encoder.preprocess.size))

    results: dict = {"machine": info, "tiers": {}, "sweep": {}}
    started = time.perf_counter()
    for tier in tiers:
        files = tier_files(args.photos, tier, args.limit)
        pixels = predecode(files, encoder.preprocess)
        r: dict = {"n": len(files), "decode": [], "decode_w0": [], "model": {p: [] for p in encoders},
                   "e2e": [], "naive": []}
        if not args.sweep_only:
            torch.set_num_threads(main_threads)
            for _ in range(args.repeats):  # interleaved, so drift from the shared CPUs hits all columns
                r["decode"].append(time_decode(files, encoder.preprocess, main_workers, thumbs))
                if main_workers != 0:
                    r["decode_w0"].append(time_decode(files, encoder.preprocess, 0, thumbs))
                for p, enc in encoders.items():
                    cap = None if p == encoder.precision else (args.slow_precision_batches or None)
                    r["model"][p].append(time_model(enc, pixels, bs, cap))
                r["e2e"].append(time_e2e(encoder, files, bs, main_workers, thumbs))
                if naive:
                    r["naive"].append(time_naive(naive[0], naive[1], files, bs))
            if main_workers == 0:
                r["decode_w0"] = r["decode"]
        results["tiers"][tier] = r
        print(f"[{tier}: {len(files)} images done, {time.perf_counter() - started:.0f} s elapsed]",
              file=sys.stderr, flush=True)

        if args.sweep:
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
            results["sweep"][tier] = s
            print(f"[{tier}: sweep done, {time.perf_counter() - started:.0f} s elapsed]",
                  file=sys.stderr, flush=True)

    info["loadavg_end"] = os.getloadavg()
    info["bench_s"] = round(time.perf_counter() - started, 1)
    report(results, encoder.precision, main_workers, main_threads, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"raw measurements: {args.json}")
    return 0


def report(results: dict, e2e_precision: str, workers: int, threads: int, args) -> None:
    info = results["machine"]
    print(f"\nloadavg start {info['loadavg_start']} end {info['loadavg_end']}; bench {info['bench_s']} s; "
          f"table: {args.stat} of {args.repeats} run(s)")
    if not args.sweep_only:
        precs = list(next(iter(results["tiers"].values()))["model"]) if results["tiers"] else []
        print(f"\nimages/s: decode with {workers} worker(s) and in-process (w0); model-only batch "
              f"{info['batch_size']} at {threads} torch thread(s); end-to-end index_paths ({e2e_precision}, "
              f"{workers} worker(s), {threads} thread(s)); naive = full-size PIL + open_clip preprocess, fp32")
        head = (f"{'tier':<7}{'n':>4} {'decode':>7} {'dec w0':>7} "
                + " ".join(f"{'mdl ' + p:>9}" for p in precs)
                + f" {'e2e':>7} {'naive':>7} {'e2e/min(dec,mdl)':>17} {'e2e/naive':>10}")
        print(head)
        print("-" * len(head))
        agg = top if args.stat == "max" else med
        for tier, r in results["tiers"].items():
            dec, dec0, e2e, nv = agg(r["decode"]), agg(r["decode_w0"]), agg(r["e2e"]), agg(r["naive"])
            mdl = {p: agg(v) for p, v in r["model"].items()}
            m_e2e = mdl.get(e2e_precision)
            bound = min(dec, m_e2e) if dec and m_e2e else None
            def busy(xs: list[dict]) -> str:  # '!': other processes kept > LOADED cores busy meanwhile
                o = med(xs, "other_cores")
                return "!" if o is not None and o > LOADED else " "

            print(f"{tier:<7}{r['n']:>4} {fmt(dec, '6.1f')}{busy(r['decode'])} {fmt(dec0, '6.1f')}"
                  f"{busy(r['decode_w0'])} "
                  + " ".join(f"{fmt(mdl[p], '8.1f')}{busy(r['model'][p])}" for p in precs)
                  + f" {fmt(e2e, '6.1f')}{busy(r['e2e'])} {fmt(nv, '6.1f')}{busy(r['naive'])}"
                  f" {fmt(e2e / bound if e2e and bound else None, '17.2f')}"
                  f" {fmt(e2e / nv if e2e and nv else None, '10.2f')}")
        print(f"'!' = measured while other processes kept more than {LOADED} cores busy; ratios between "
              "columns measured under different load are not meaningful")
        print("other processes' CPU load during each column (median cores busy, of "
              f"{info['nproc']}): " + "; ".join(
                  f"{tier}: dec {fmt(med(r['decode'], 'other_cores'), '.1f')} "
                  + " ".join(f"mdl-{p} {fmt(med(v, 'other_cores'), '.1f')}" for p, v in r["model"].items())
                  + f" e2e {fmt(med(r['e2e'], 'other_cores'), '.1f')}"
                  + f" naive {fmt(med(r['naive'], 'other_cores'), '.1f')}"
                  for tier, r in results["tiers"].items()))
        print("decode-pool start-up (first result after, s): " + "; ".join(
            f"{tier} {fmt(med(r['decode'], 'first_result_s'), '.2f')}" for tier, r in results["tiers"].items()))
        if "fp32" in precs and "bf16" in precs:
            for tier, r in results["tiers"].items():
                f32, b16 = agg(r["model"]["fp32"]), agg(r["model"]["bf16"])
                if f32 and b16:
                    print(f"  {tier}: bf16 / fp32 model-only speed = {b16 / f32:.2f}")
    if results["sweep"]:
        print(f"\nsweep: end-to-end images/s by decode workers (rows) x torch threads (columns); "
              f"decode-only by workers; model-only ({e2e_precision}) by threads; each as median/max of repeats")
        for tier, s in results["sweep"].items():
            tg = list(s["model"])
            wg = list(s["decode"])
            best = max(s["e2e"], key=lambda k: med(s["e2e"][k]) or 0)
            print(f"\n[{tier}, n={results['tiers'][tier]['n']}, precision {e2e_precision}]  "
                  "model-only: " + ", ".join(f"t{t}={fmt(med(s['model'][t]), '.1f')}/{fmt(top(s['model'][t]), '.1f')}"
                                              f"[{fmt(med(s['model'][t], 'other_cores'), '.1f')}]" for t in tg)
                  + "   decode-only: " + ", ".join(f"w{w}={fmt(med(s['decode'][w]), '.1f')}/"
                                                   f"{fmt(top(s['decode'][w]), '.1f')}" for w in wg))
            print(f"{'workers':>8} " + " ".join(f"{'threads=' + str(t):>16}" for t in tg)
                  + "   (median/max images/s, * best median, [other processes' median busy cores])")
            for w in wg:
                cells = []
                for t in tg:
                    xs = s["e2e"][f"{w}/{t}"]
                    o = med(xs, "other_cores")
                    cells.append(fmt(med(xs), "5.1f") + "/" + fmt(top(xs), "4.1f")
                                 + ("*" if f"{w}/{t}" == best else " ") + f"[{fmt(o, '.1f')}]")
                print(f"{w:>8} " + " ".join(cells))
            bv = med(s["e2e"][best])
            rel = {k: (med(v) or 0) / bv for k, v in s["e2e"].items()}
            print("  relative to best (*): " + ", ".join(f"w{k.split('/')[0]}/t{k.split('/')[1]}={v:.2f}"
                                                          for k, v in rel.items()))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Indexing on Ray Data against a local run: images/s, Ray's start-up cost, and a paper estimate at scale.

A benchmark, not a test. On the same folder of real photos (hard links to the first --limit files of
--photos) it runs the whole `crossmodal index FOLDER --json` process into a fresh home per run:

  local     the local pipeline (decode workers chosen by the run, model in the process)
  ray-1     --ray auto --actors 1   (a local Ray instance started by the run, one model actor)
  ray-2     --ray auto --actors 2

interleaved, --repeats times, and reports medians: images/s over the run's own clock (the report's
`seconds`, which includes Ray's start-up), the ratio of each Ray mode to the local run, Ray's start-up cost
(`ray.init` + shutdown alone, and the fixed cost of a --ray run on a 2-photo folder over a local one), and
the steady images/s with that fixed cost taken out, and one core's decode rate on the same photos. From
those it prints a paper estimate of wall time and machines for 100M and 1B images (CPU actors as measured
here; GPU actors at --gpu-ips, an assumption, stated as such, since no GPU was measured, bounded by the
decode cores that feed them).

  .venv/bin/python bench/ray_index.py --random-weights --limit 48 --repeats 3 --json /tmp/ray_bench.json

The model has seeded random weights (--random-weights; speed does not depend on their values). The ONNX
export is skipped (CROSSMODAL_BACKEND=torch) so that only indexing is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = {"local": [], "ray-1": ["--ray", "auto", "--actors", "1"], "ray-2": ["--ray", "auto", "--actors", "2"]}


def link_folder(src: Path, dst: Path, limit: int) -> int:
    """Hard links to the first `limit` photos of `src` (the same bytes for every mode)."""
    dst.mkdir(parents=True)
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))[:limit]
    for p in files:
        os.link(p, dst / p.name)
    return len(files)


def run_index(folder: Path, home: Path, model: str, pretrained: str, extra: list[str], env: dict[str, str]
              ) -> dict[str, float]:
    cmd = [sys.executable, "-m", "cli", "--home", str(home), "index", str(folder), "--model", model,
           "--pretrained", pretrained, "--json", "--quiet", *extra]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=3600)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    report = json.loads(res.stdout)
    return {"wall_s": wall, "seconds": float(report["seconds"]), "added": float(report["added"])}


def ray_init_cost(env: dict[str, str]) -> float:
    """Seconds for ray.init() of a local instance and its shutdown, in a fresh process."""
    code = ("import time,ray;t=time.perf_counter();ray.init(include_dashboard=False,log_to_driver=False,"
            "logging_level='ERROR');ray.shutdown();print(time.perf_counter()-t)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    return float(res.stdout.strip().splitlines()[-1])


def decode_rate(folder: Path, limit: int = 16) -> float:
    """Images/s one core decodes (the project's decode path, thumbnails included) on these photos."""
    from indexer.decode import decode_entry
    from indexer.scan import scan
    from retrieval.media.decode import Preprocess

    files = scan([folder]).files[:limit]
    with tempfile.TemporaryDirectory() as thumbs:
        t0 = time.perf_counter()
        for f in files:
            decode_entry(f, Preprocess(), thumbs)
        return len(files) / (time.perf_counter() - t0)


def estimate(cpu_ips: float, decode_ips: float, gpu_ips: float, cores: int) -> list[dict[str, object]]:
    """Days on one machine, and machines for a one-day run, for 100M and 1B images: CPU actors as measured;
    a GPU actor as built (it decodes on its own core, so it runs at the slower of the GPU and one core's
    decode); and the GPU fed by enough decode cores (a decode stage on CPU tasks, not built)."""
    out: list[dict[str, object]] = []
    fed_cores = -(-gpu_ips // decode_ips)
    for n in (100_000_000, 1_000_000_000):
        for kind, ips, per in (
                ("cpu", cpu_ips, f"{cores}-core machine, 1 actor (measured)"),
                ("gpu, decode in the actor", min(gpu_ips, decode_ips), "1 GPU actor + 1 core (decode-bound)"),
                ("gpu, fed", gpu_ips, f"1 GPU + {int(fed_cores)} decode cores (GPU rate assumed)")):
            days = n / ips / 86400
            out.append({"images": n, "actor": kind, "per": per, "images_per_s": round(ips, 1),
                        "days_on_one": round(days, 1), "for_one_day": int(-(-days // 1)),
                        "decode_core_hours": round(n / decode_ips / 3600)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, default=Path("/tmp/photos/large"))
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--gpu-ips", type=float, default=2000.0,
                    help="images/s of one GPU actor for the paper estimate (an assumption: none was measured)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    pretrained = args.pretrained
    if args.random_weights:
        from bench.index_throughput import make_random_checkpoint

        pretrained = pretrained or f"/tmp/cm/{args.model.lower().replace('-', '')}.pt"
        if not Path(pretrained).is_file():
            make_random_checkpoint(args.model, Path(pretrained))
    if not pretrained:
        raise SystemExit("give --pretrained FILE, or --random-weights")
    work = Path(tempfile.mkdtemp(prefix="cm-ray-bench-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "CROSSMODAL_BACKEND": "torch", "RAY_AUTH_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "CROSSMODAL_CACHE": str(work / "cache")}
    n = link_folder(args.photos, work / "photos", args.limit)
    link_folder(args.photos, work / "tiny", 2)
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    tiny: dict[str, list[float]] = {"local": [], "ray-1": []}
    init: list[float] = []
    for r in range(args.repeats):
        for mode, extra in MODES.items():
            res = run_index(work / "photos", work / f"home-{mode}-{r}", args.model, pretrained, extra, env)
            runs[mode].append(res)
            print(f"repeat {r} {mode}: {n / res['seconds']:.2f} images/s ({res['seconds']:.1f} s, wall "
                  f"{res['wall_s']:.1f} s)", file=sys.stderr, flush=True)
        for mode in tiny:
            tiny[mode].append(run_index(work / "tiny", work / f"tiny-{mode}-{r}", args.model, pretrained,
                                        MODES[mode], env)["seconds"])
        init.append(ray_init_cost(env))
    med = {m: statistics.median(x["seconds"] for x in v) for m, v in runs.items()}
    fixed = statistics.median(tiny["ray-1"]) - statistics.median(tiny["local"])
    out = {
        "images": n, "photos": str(args.photos), "model": args.model, "repeats": args.repeats,
        "cores": os.cpu_count(),
        "images_per_s": {m: round(n / s, 2) for m, s in med.items()},
        "ratio_to_local": {m: round(med["local"] / s, 2) for m, s in med.items()},
        "ray_init_s": round(statistics.median(init), 2),
        "ray_fixed_cost_s": round(fixed, 2),
        "steady_images_per_s": {m: round(n / max(1e-9, s - (fixed if m != "local" else 0.0)), 2)
                                for m, s in med.items()},
    }
    out["decode_images_per_s_per_core"] = round(decode_rate(work / "photos"), 1)
    out["estimate"] = estimate(out["steady_images_per_s"]["ray-1"], out["decode_images_per_s_per_core"],
                               args.gpu_ips, os.cpu_count() or 1)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()

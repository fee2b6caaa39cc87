"""The quality lab (issue 15): one seeded command that measures relevance with a CLIP trained here.

    python -m bench.quality_lab --work /tmp/quality-lab --backgrounds /tmp/photos/medium --backgrounds /tmp/photos/large

Stages, each reused from WORK when its inputs are unchanged: generate the scenes (training/scenes.py),
train the small CLIP (training/train_clip.py), then through the real CLI: `index` the test photos into one
home per precision (fp32, bf16, int8), `add-texts` their captions, `train-reranker` on the train split,
`eval` the test split; through the query path the CLI calls (`open_index`): both directions on each home and
backend, with and without reranking; in-process: rerank-k and lambda sweeps, draft vs full decode, the
binding set, and the relevance cutoff fitted on val and checked on test. Last, the large collection: the
test scenes among 200,000+ distractor scenes (embedded once, training/distractors.py) in one home, `reindex`ed
to each index type, searched at the tuned setting. Prints the tables (Markdown) and writes WORK/quality.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
INDEX_TYPES = ("flat", "hnsw", "ivfsq", "ivfpq")


def log(msg: str) -> None:
    print(f"[lab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(home: Path, *args: str) -> Any:
    """Run `crossmodal --home HOME ARGS --json` in a child process (the real CLI); its JSON, or exit."""
    cmd = [sys.executable, "-m", "cli", "--home", str(home), *args, "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"quality_lab: `{' '.join(cmd[2:])}` failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    log(f"crossmodal {' '.join(args[:2])}: {time.perf_counter() - t0:.1f} s")
    return json.loads(done.stdout) if done.stdout.strip() else None


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- data and model -----------------------------------------------------------------------------------
def scenes_stage(work: Path, n: int, seed: int, backgrounds: list[str]) -> Path:
    from training.scenes import DATASET, generate

    out = work / "scenes"
    doc = out / DATASET
    if doc.is_file():
        gen = json.loads(doc.read_text())["generator"]
        if gen["n"] == n and gen["seed"] == seed:
            return out
    t0 = time.perf_counter()
    generate(out, n, seed=seed, backgrounds=backgrounds)
    log(f"scenes: {n} generated in {time.perf_counter() - t0:.0f} s")
    return out


def model_stage(work: Path, scenes: Path, steps: int, seed: int) -> tuple[Path, Path, dict[str, Any]]:
    from training.scenes import DATASET

    out = work / "model"
    key = {"data": sha256_file(scenes / DATASET), "steps": steps, "seed": seed}
    marker = out / "lab.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == key and (out / "model.pt").is_file()):
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-m", "training.train_clip", str(scenes), str(out), "--steps",
                               str(steps), "--seed", str(seed)], env=env, cwd=ROOT)
        if done.returncode:
            sys.exit("quality_lab: training failed")
        marker.write_text(json.dumps(key))
        log(f"model: trained in {time.perf_counter() - t0:.0f} s")
    return out / "model.json", out / "model.pt", json.loads((out / "train_log.json").read_text())


def test_folder(work: Path, scenes: Path) -> tuple[Path, Path]:
    """Hard links of the test photos in a folder of their own (what `index` gets) and their captions file."""
    from training.scenes import DATASET

    doc = json.loads((scenes / DATASET).read_text())
    folder, captions = work / "test-images", work / "test-captions.txt"
    folder.mkdir(exist_ok=True)
    lines = []
    for e in doc["images"]:
        if e["split"] != "test":
            continue
        dst = folder / e["filename"]
        if not dst.exists():
            os.link(scenes / "images" / e["filename"], dst)
        lines += [s["raw"] for s in e["sentences"]]
    captions.write_text("\n".join(dict.fromkeys(lines)) + "\n")
    return folder, captions


def home_stage(work: Path, name: str, images: Path, captions: Path, model: list[str], precision: str) -> Path:
    home = work / "homes" / name
    if not (home / ".lab-done").is_file():
        cli(home, "index", str(images), *model, "--precision", precision)
        cli(home, "add-texts", str(captions), "--corpus", "test")
        (home / ".lab-done").write_text("ok\n")
    return home


# ---- tables -------------------------------------------------------------------------------------------
def fmt(r: dict[str, float]) -> str:
    return " / ".join(f"{100 * r[k]:.1f}" for k in ("R@1", "R@5", "R@10"))


def recall_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    out = ["| setting | t2i by scene | i2t by scene | t2i by own image | i2t by own captions |",
           "|---|---|---|---|---|"]
    for name, r in rows:
        out.append(f"| {name} | {fmt(r['scene']['t2i'])} | {fmt(r['scene']['i2t'])} | {fmt(r['own']['t2i'])} | "
                   f"{fmt(r['own']['i2t'])} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from bench.lab_stages import measure

    ap = argparse.ArgumentParser(prog="python -m bench.quality_lab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/quality-lab"), help="cache and output folder")
    ap.add_argument("--scenes", type=int, default=4000, help="scenes to generate (80/10/10 train/val/test)")
    ap.add_argument("--steps", type=int, default=800, help="training steps of the small CLIP")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backgrounds", action="append", default=[], help="photo folders for backgrounds")
    ap.add_argument("--reranker-epochs", type=int, default=3, help="train-reranker --epochs")
    ap.add_argument("--reranker-images", type=int, default=1600, help="train-reranker --max-images (its train "
                    "split pictures, 5 captions each)")
    ap.add_argument("--distractors", type=int, default=200_000, help="distractor scenes of the large collection "
                    "(0: skip it)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads crawl on a busy machine
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scenes = scenes_stage(a.work, a.scenes, a.seed, a.backgrounds)
    model_json, model_pt, train_log = model_stage(a.work, scenes, a.steps, a.seed)
    result = measure(a, scenes, model_json, model_pt, train_log)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    (a.work / "quality.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(result["markdown"])
    print(f"\nwall time {result['wall_s']:.0f} s (stages already in --work are reused); figures in "
          f"{a.work / 'quality.json'}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())

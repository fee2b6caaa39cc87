"""Whole-process query latency: `crossmodal search/caption` as users run it, ONNX Runtime vs torch.

Builds (once) a 10,000-image index cheaply: the real ViT-B-32 architecture with seeded random weights
saved to a file, 10,000 catalog rows pointing at hard links to real JPEGs (bash /work/shared/data/make_photos.sh
makes /tmp/photos/small) with random unit vectors, a 1,000-caption corpus (random vectors), and the ONNX
export (with token outputs). Then times each query kind as a fresh process, reranked (the default for text
queries and captions) and with --no-rerank, alternating backends within each round so both see the same
machine load, and prints medians, the torch/onnx ratio and the issue's targets. The bench index has no token
cache from indexing; the warm-up run of each kind computes and caches its top-32 candidates' tokens, as
`crossmodal index` / `add-texts` would have.

  .venv/bin/python bench/query_latency.py                      # 5 rounds
  .venv/bin/python bench/query_latency.py --repeat 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def export_metas(home: Path) -> list[Path]:
    """export.json of every export the bench index may use: the shared cache's, and the home's (earlier versions)."""
    from retrieval.model.export_cache import exports_root, legacy_root

    return [*exports_root().glob("*/export.json"), *legacy_root(home).glob("*/export.json")]


def has_current_export(home: Path) -> bool:
    from retrieval.model.onnx_encoder import EXPORT_VERSION

    for meta in export_metas(home):
        try:
            if json.loads(meta.read_text()).get("version") == EXPORT_VERSION:
                return True
        except (OSError, ValueError):
            continue
    return False


def build(home: Path, checkpoint: Path, photos: Path, n: int, captions: int) -> None:
    """The bench index: real model file and JPEGs, random vectors, plus the ONNX export."""
    import numpy as np

    from retrieval.fsutil import sha256_hex
    from retrieval.model.onnx_export import ensure_export
    from retrieval.model.recorded import checkpoint_stat
    from retrieval.model.spec import ModelSpec
    from retrieval.model.torch_encoder import load_encoder
    from retrieval.store import ImageRecord, Store, TextRecord

    if not checkpoint.is_file():
        import open_clip
        import torch

        torch.manual_seed(0)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(open_clip.create_model("ViT-B-32").state_dict(), checkpoint)
    encoder = load_encoder(ModelSpec(name="ViT-B-32", pretrained=str(checkpoint), device="cpu", precision="fp32"))
    if not (home / "catalog.sqlite").is_file():
        sources = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        if not sources:
            raise SystemExit(f"no JPEGs in {photos}; run: bash /work/shared/data/make_photos.sh")
        links = home.parent / (home.name + "-photos")
        links.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        records = []
        for i in range(n):
            src = sources[i % len(sources)]
            dst = links / f"{i:05d}{src.suffix}"
            if not dst.exists():
                os.link(src, dst)
            st = dst.stat()
            records.append(ImageRecord(path=str(dst), sha256=f"{i:064x}", bytes=st.st_size, mtime=st.st_mtime,
                                       width=640, height=480))
        vectors = rng.standard_normal((n, encoder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        texts = [f"caption {i}: a photo of something" for i in range(captions)]
        tvec = rng.standard_normal((captions, encoder.dim)).astype(np.float32)
        tvec /= np.linalg.norm(tvec, axis=1, keepdims=True)
        with Store.open(home, create=True, writable=True) as store:
            store.bind_model(encoder.fingerprint, checkpoint_stat(str(checkpoint)))
            store.add_images(records, vectors)
            store.add_texts([TextRecord(corpus="bench", row=i, text=t, sha256=sha256_hex(t.encode()))
                             for i, t in enumerate(texts)], tvec)
    t = time.perf_counter()
    folder = ensure_export(encoder, home, notify=lambda m: print("export:", m, file=sys.stderr))
    print(f"export: {folder} ({time.perf_counter() - t:.1f} s if it was made now)", file=sys.stderr)


def run_once(cli: str, home: Path, args: list[str], backend: str) -> tuple[float, str]:
    env = dict(os.environ, CROSSMODAL_BACKEND=backend, CROSSMODAL_DEBUG_IMPORTS="1")
    env.pop("CROSSMODAL_HOME", None)
    t = time.perf_counter()
    r = subprocess.run([cli, "--home", str(home), *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{backend} {args} failed ({r.returncode}): {r.stderr}")
    heavy = next((ln.split(":", 2)[2].strip() for ln in r.stderr.splitlines() if "heavy imports" in ln), "?")
    return wall, heavy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=Path("/tmp/cm6/bench10k"))
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/cm/vitb32.pt"))
    ap.add_argument("--photos", type=Path, default=Path("/tmp/photos/small"))
    ap.add_argument("-n", type=int, default=10_000)
    ap.add_argument("--captions", type=int, default=1_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backends", default="onnx,torch")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--build-only", action="store_true", help="make the index and export, time nothing")
    a = ap.parse_args()

    if not (a.home / "catalog.sqlite").is_file() or not has_current_export(a.home):
        build(a.home, a.checkpoint, a.photos, a.n, a.captions)
    if a.build_only:
        return
    photo = sorted(a.photos.glob("*.jpg"))[0]
    cli = str(Path(sys.executable).with_name("crossmodal"))
    kinds = {  # name -> (arguments, target in s from issue 6)
        'search "text" --no-rerank': (["search", "a dog running on a beach", "-k", "10", "--no-rerank"], 1.0),
        'search "text" (reranked)': (["search", "a dog running on a beach", "-k", "10"], 1.5),
        "search --image": (["search", "--image", str(photo), "-k", "10"], 1.5),  # no words: never reranked
        "caption --no-rerank": (["caption", str(photo), "-k", "5", "--no-rerank"], 1.5),
        "caption (reranked)": (["caption", str(photo), "-k", "5"], 2.0),
    }
    backends = a.backends.split(",")
    for b in backends:  # warm the page cache (and the token cache) once per backend and kind
        for args, _ in kinds.values():
            run_once(cli, a.home, args, b)
    times: dict[str, dict[str, list[float]]] = {k: {b: [] for b in backends} for k in kinds}
    heavy: dict[str, str] = {}
    load = os.getloadavg()[0]
    for _ in range(a.repeat):
        for kind, (args, _) in kinds.items():
            for b in backends:
                wall, h = run_once(cli, a.home, args, b)
                times[kind][b].append(wall)
                heavy[f"{b}, {kind}"] = h
    med = {k: {b: statistics.median(v) for b, v in d.items()} for k, d in times.items()}
    print(f"\nwhole-process wall time, median of {a.repeat} (s); {a.n:,} images, ViT-B-32, "
          f"{os.cpu_count()} cores, load avg {load:.1f} -> {os.getloadavg()[0]:.1f}")
    both = {"onnx", "torch"} <= set(backends)
    head = f"{'query':<28}" + "".join(f"{b:>9}" for b in backends) + (f"{'torch/onnx':>12}" if both else "")
    print(head + f"{'target':>9}")
    for kind, (_, target) in kinds.items():
        row = f"{kind:<28}" + "".join(f"{med[kind][b]:>9.2f}" for b in backends)
        if both:
            row += f"{med[kind]['torch'] / med[kind]['onnx']:>11.1f}x"
        print(row + f"{'<= ' + format(target, '.1f'):>9}")
    for b in backends:
        found = sorted({h for k, h in heavy.items() if k.startswith(f"{b}, ")})
        print(f"heavy modules imported ({b}): {' | '.join(found)}")
    from retrieval.model.onnx_encoder import EXPORT_VERSION

    meta = next(m for p in export_metas(a.home)
                if (m := json.loads(p.read_text())).get("version") == EXPORT_VERSION)
    print("export on disk: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(meta["bytes"].items()))
          + f"; total {sum(meta['bytes'].values()) / 1e6:.0f} MB; made in {meta['seconds']} s")
    if a.json:
        a.json.write_text(json.dumps({"times": times, "median": med, "heavy": heavy}, indent=1))


if __name__ == "__main__":
    main()

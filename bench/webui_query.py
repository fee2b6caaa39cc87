#!/usr/bin/env python
"""Warm text-query latency of the web page on a 10k-image index. A benchmark, not a test.

Builds (once, into --home) an index of N random unit vectors whose catalog rows point at real JPEGs
(symlinks to the photos in --photos, so every row has its own path and thumbnail), then times the code
path the page runs for a new text query, in one warm process (model and index already loaded):

  encode   services.query_vector: tokenize + text tower (a new query: cache miss)
  search   services.image_pages: exact FAISS top-k (first page)
  thumbs   services.cells: 256 px JPEG thumbnails of the first page (thumbnail cache cleared: cold)
  total    the three together
  repeat   the same query again, everything cached (what a rerun such as a click costs)
  filtered total with a date filter (catalog query for the allowed ids + restricted search)

Streamlit's own rendering and websocket time are not included. Example:

  .venv/bin/python bench/webui_query.py --queries 20
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUERIES = [
    "a dog running on a beach", "a red car in the city", "mountains at sunset", "a bowl of fruit",
    "children playing football", "an astronaut in space", "a yellow flower", "a cat sleeping on a sofa",
    "a plate of pasta", "snow on the trees", "a crowded market", "an old church", "a boat on a lake",
    "a bird on a branch", "a bicycle against a wall", "fireworks at night", "a laptop on a desk",
    "a horse in a field", "a bridge over a river", "a birthday cake with candles", "a kite in the sky",
    "a person reading a book", "a train station", "a forest path in autumn",
]


def make_checkpoint(path: Path, model: str) -> Path:
    import open_clip
    import torch

    torch.manual_seed(0)
    m = open_clip.create_model(model)
    torch.save({k: v.half() for k, v in m.state_dict().items()}, path)
    return path


def build(home: Path, photos: Path, n: int, model: str, pretrained: str) -> None:
    """N catalog rows (symlinks to real photos) with random unit vectors, plus 1,000 captions."""
    from retrieval.model.recorded import checkpoint_stat
    from retrieval.model.spec import ModelSpec
    from retrieval.model.torch_encoder import load_encoder
    from retrieval.store import ImageRecord, Store, TextRecord

    sources = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not sources:
        sys.exit(f"no JPEGs in {photos}")
    links = home / "photos"
    links.mkdir(parents=True, exist_ok=True)
    encoder = load_encoder(ModelSpec(name=model, pretrained=pretrained, device="cpu"))
    dim = encoder.dim
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        src = sources[i % len(sources)]
        link = links / f"{i // 1000:02d}" / f"p{i:05d}{src.suffix}"
        link.parent.mkdir(exist_ok=True)
        if not link.exists():
            link.symlink_to(src)
        st = link.stat()
        day = 1_500_000_000 + int(rng.integers(0, 8 * 365 * 86400))  # spread over 2017-2025
        records.append(ImageRecord(path=str(link), sha256=hashlib.sha256(str(link).encode()).hexdigest(),
                                   bytes=st.st_size, mtime=float(day), width=640, height=480))
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    tv = rng.normal(size=(1000, dim)).astype(np.float32)
    tv /= np.linalg.norm(tv, axis=1, keepdims=True)
    with Store.open(home, create=True, writable=True) as store:
        store.bind_model(encoder.fingerprint, checkpoint_stat(pretrained))
        for start in range(0, n, 2000):
            store.add_images(records[start:start + 2000], vecs[start:start + 2000])
        store.add_texts([TextRecord("bench", i, f"caption {i}", f"{i:064x}") for i in range(1000)], tv)


def stats(xs: list[float]) -> str:
    xs = sorted(x * 1000 for x in xs)
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return f"median {statistics.median(xs):7.1f} ms   p90 {p90:7.1f} ms   (n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=None, help="index home (default: a temporary folder)")
    ap.add_argument("--photos", type=Path, default=Path("/tmp/photos/small"))
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--model", default="ViT-S-32")
    ap.add_argument("--pretrained", default=None, help="checkpoint file (default: a seeded random one)")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("-k", type=int, default=12, help="results per page (the page's default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: what load_encoder sets)")
    args = ap.parse_args()
    logging.getLogger("streamlit").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    tmp = Path(tempfile.mkdtemp(prefix="webui-bench-"))
    try:
        pretrained = args.pretrained
        if pretrained is None:
            cached = Path("/tmp/cm/vits32.pt")
            pretrained = str(cached if cached.is_file() and args.model == "ViT-S-32"
                             else make_checkpoint(tmp / "model.pt", args.model))
        home = args.home or tmp / "home"
        if not (home / "catalog.sqlite").is_file():
            t = time.perf_counter()
            build(home, args.photos, args.images, args.model, pretrained)
            print(f"built {args.images:,}-image index in {home} in {time.perf_counter() - t:.1f}s")

        from retrieval.store import ImageFilter
        from webui import services

        t = time.perf_counter()
        index = services.open_index(home)
        s, sig = index.searcher, index.signature
        assert s is not None, index.problem
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(f"open (model + index, once per server): {time.perf_counter() - t:.2f}s; "
              f"{s.store.count('image'):,} images, dim {s.encoder.dim}, {s.encoder.device}/{s.encoder.precision}, "
              f"{__import__('torch').get_num_threads()} torch threads")

        def run(text: str, flt: ImageFilter | None = None) -> tuple[float, float, float]:
            t0 = time.perf_counter()
            q = services.query_vector(s, sig, text=text)
            t1 = time.perf_counter()
            hits = services.image_pages(s, q, args.k, flt, 1)
            t2 = time.perf_counter()
            cells = services.cells(hits)
            t3 = time.perf_counter()
            assert len(cells) == args.k and not any(c.missing for c in cells)
            return t1 - t0, t2 - t1, t3 - t2

        for w in ("warm up one", "warm up two", "warm up three"):
            run(w)
        queries = [QUERIES[i % len(QUERIES)] + ("" if i < len(QUERIES) else f" {i}") for i in range(args.queries)]
        enc, search, thumbs, total, repeat, filtered = [], [], [], [], [], []
        for qtext in queries:
            services._rendition.clear()
            a, b, c = run(qtext)
            enc.append(a)
            search.append(b)
            thumbs.append(c)
            total.append(a + b + c)
            repeat.append(sum(run(qtext)))
        flt = ImageFilter(after="2019-01-01", before="2022-01-01")
        for qtext in queries:
            services._rendition.clear()
            filtered.append(sum(run(qtext + " (filtered)", flt)))
        print(f"warm text query, k={args.k}, {args.images:,} images, {os.cpu_count()} CPUs:")
        for name, xs in (("encode", enc), ("search", search), ("thumbs", thumbs), ("total", total),
                         ("repeat", repeat), ("filtered", filtered)):
            print(f"  {name:<9}{stats(xs)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Added latency of co-attention reranking of the dense top 32, text->image and image->text (not a test).

    .venv/bin/python bench/rerank_latency.py [--model ViT-B-32] [--checkpoint /tmp/cm/vitb32.pt] [--reps 30]

Builds a throwaway index (generated photos, a caption corpus) with seeded random weights saved to a file,
then times, per query, only what reranking adds on top of the dense search:
- text->image: (query vector and query tokens from one text pass + dense search + rerank) minus (the plain
  dense query); and the rerank step alone (32 images' tokens from the token cache + the scorer). Both the
  torch and the ONNX query paths take the query tokens from the same text pass as the query vector;
- image->text: the 32 captions' token pass + the scorer, plus what the query's vision pass costs extra
  when it also returns tokens (it is the same pass the dense query needs).
Prints p50/p90 (ms) and the cache's disk cost per image. Numbers are medians within this run. On a CPU
shared with other work, --threads 1 avoids OpenMP oversubscription (2 threads on 2 busy cores can be 10x slower).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def ensure_checkpoint(model: str, path: Path) -> Path:
    if path.is_file():
        return path
    import open_clip
    import torch

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(open_clip.create_model(model).state_dict(), path)
    return path


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--checkpoint", default="/tmp/cm/vitb32.pt")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from indexer.pipeline import index_paths
    from indexer.texts import add_corpus
    from retrieval.media.decode import decode_for_model
    from retrieval.model.spec import ModelSpec
    from retrieval.model.torch_encoder import load_encoder
    from retrieval.query.search import Searcher
    from retrieval.rerank.reranker import Reranker
    from retrieval.rerank.token_cache import TokenCache
    from retrieval.store import Store
    from tests.conftest import _pattern

    ckpt = ensure_checkpoint(args.model, Path(args.checkpoint))
    enc = load_encoder(ModelSpec(name=args.model, pretrained=str(ckpt), device="cpu", precision="auto"))
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "photos").mkdir()
        for i in range(args.images):
            _pattern(i, (320 + 8 * i, 240 + 4 * i)).save(tmp / "photos" / f"p{i:03d}.jpg", quality=90)
        (tmp / "caps.txt").write_text("\n".join(
            f"a photo of {w} number {i} on a sunny afternoon near the old harbour" for i, w in
            enumerate(["a dog", "a red car", "two people", "a mountain lake", "a bowl of soup"] * 60)))
        home = tmp / "home"
        t0 = time.perf_counter()
        with Store.open(home, create=True, writable=True) as store:
            store.bind_model(enc.fingerprint)
            index_paths(store, enc, [str(tmp / "photos")], batch_size=16, workers=0)
            add_corpus(store, enc, tmp / "caps.txt", corpus="caps")
        index_s = time.perf_counter() - t0
        store = Store.open(home)
        searcher = Searcher(store, enc)
        rr = Reranker.open(searcher)
        cache = TokenCache.open(home, enc.fingerprint)
        per_image = cache.disk_bytes() / max(len(cache), 1)

        queries = ["a dog running on a beach", "a red car parked at night", "two people hiking up a mountain"]
        t2i, t2i_dense, t2i_total = [], [], []
        for r in range(args.reps + 2):
            text = queries[r % len(queries)]
            a = time.perf_counter()
            hits = searcher.search_images(searcher.query_vector(text=text), args.k)  # the dense query alone
            b = time.perf_counter()
            q = rr.query_vector(text=text)  # one text pass: query vector and query tokens
            hits = searcher.search_images(q, args.k)
            c = time.perf_counter()
            out = rr.rerank_images(text, hits)
            d = time.perf_counter()
            assert sorted(h.id for h in out) == sorted(h.id for h in hits) and rr.stats.cached == len(hits)
            if r >= 2:  # warm-up
                t2i_dense.append(b - a)
                t2i_total.append(d - b)
                t2i.append(d - c)

        photo = (tmp / "photos" / "p005.jpg").read_bytes()
        i2t, i2t_dense = [], []
        for r in range(args.reps + 2):
            a = time.perf_counter()
            pixels = decode_for_model(photo, enc.preprocess).pixels[None]
            enc.encode_pixels(pixels)
            b = time.perf_counter()
            pooled2, tokens = enc.encode_pixels_with_tokens(pixels)
            c = time.perf_counter()
            hits = searcher.search_texts(pooled2[0], args.k)
            d = time.perf_counter()
            out = rr.rerank_texts(tokens[0], hits)
            e = time.perf_counter()
            assert sorted(h.id for h in out) == sorted(h.id for h in hits)
            if r >= 2:
                i2t_dense.append((b - a) + (d - c))
                i2t.append(e - d)
        # the extra cost of returning tokens from the (shared) vision pass, measured directly
        vis_plain, vis_tok = [], []
        for r in range(max(5, args.reps // 3) + 2):
            a = time.perf_counter()
            enc.encode_pixels(pixels)
            b = time.perf_counter()
            enc.encode_pixels_with_tokens(pixels)
            c = time.perf_counter()
            if r >= 2:  # warm-up
                vis_plain.append(b - a)
                vis_tok.append(c - b)
        store.close()

    print(f"model {args.model} (seeded random weights), CPU threads {args.threads}, top {args.k}, "
          f"{args.reps} queries each; index of {args.images} images built in {index_s:.1f} s")
    print(f"token cache: {per_image / 1000:.1f} KB per image (int8 + per-token fp32 scale)")
    print(f"text->image  dense query p50 {pct(t2i_dense, .5):6.1f} ms | with rerank p50 {pct(t2i_total, .5):6.1f} ms"
          f" -> added {pct(t2i_total, .5) - pct(t2i_dense, .5):+6.1f} ms | rerank step alone p50 {pct(t2i, .5):6.1f}"
          f" ms p90 {pct(t2i, .9):6.1f} ms")
    print(f"image->text  dense query p50 {pct(i2t_dense, .5):6.1f} ms | rerank added p50 {pct(i2t, .5):6.1f} ms"
          f"  p90 {pct(i2t, .9):6.1f} ms  (+ tokens from the shared vision pass: "
          f"{pct(vis_tok, .5) - pct(vis_plain, .5):+.1f} ms p50)")
    print(f"ratio added/dense p50: text->image "
          f"{(statistics.median(t2i_total) - statistics.median(t2i_dense)) / statistics.median(t2i_dense):.2f}, "
          f"image->text {statistics.median(i2t) / statistics.median(i2t_dense):.2f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

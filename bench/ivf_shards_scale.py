#!/usr/bin/env python
"""IVF built from shards and merged on disk, at the largest size this machine holds in the time given:
build cost per stage, peak memory, recall@10 and latency of the memory-mapped merged index, with exact
re-scoring from an fp16 sharded store and without any re-scoring (8-bit codes alone).

A benchmark, not a test. Vectors come from bench/ann_scale.py's generator (clustered, unit-norm, 512-d,
low intrinsic dimension like CLIP embeddings), written once to --workdir and reused. The IVF is trained once
on a sample (retrieval/store/ivf_shards.py); each shard adds its vectors to a copy of the trained index and
writes it (the part every embedding machine does); the shards are merged with faiss's merge_ondisk into one
`.ivfdata` file that the query side memory-maps. Tuning is `ann.tune`, as for every landed index type, with
the fp16 store as the exact vectors; recall is then measured on other fresh queries against fp32 exact
search.

  .venv/bin/python bench/ivf_shards_scale.py --n 2M --shards 8 --json /tmp/ivf_shards.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ann_scale import DIM, Generator, exact_search, generate, parse_size  # noqa: E402
from retrieval.store import ann, ivf_shards  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="2M")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--codes", default="ivfsq", choices=("ivfsq", "ivfpq"))
    ap.add_argument("--train", type=int, default=100_000, help="training sample")
    ap.add_argument("--queries", type=int, default=400, help="tuning queries, and as many evaluation queries")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cm-ivf-shards"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import faiss

    n = parse_size(args.n)
    args.workdir.mkdir(parents=True, exist_ok=True)
    gen = Generator()
    t0 = time.perf_counter()
    data = generate(args.workdir / f"vectors-{n}.f32", n, gen)
    out: dict[str, object] = {"n": n, "shards": args.shards, "generate_s": round(time.perf_counter() - t0, 1)}
    factory = ann.resolve(args.codes, n, DIM, None)
    out["factory"] = factory
    rng = np.random.default_rng(7)

    t0 = time.perf_counter()
    sample = np.ascontiguousarray(data[np.sort(rng.choice(n, min(args.train, n), replace=False))])
    trained = ivf_shards.train(factory, sample)
    out["train_s"] = round(time.perf_counter() - t0, 1)

    folder = args.workdir / f"run-{n}"
    folder.mkdir(exist_ok=True)
    bounds = np.linspace(0, n, args.shards + 1).astype(np.int64)
    paths, halves = [], []
    t0 = time.perf_counter()
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        part = np.ascontiguousarray(data[a:b])
        shard = ivf_shards.build_shard(trained, np.arange(a, b, dtype=np.int64), part)
        paths.append(ivf_shards.write(shard, folder / f"shard-{i}.faiss"))
        halves.append(ivf_shards.HalfVectors.write(folder / f"exact-{i}.npy", part))
        del shard, part
    out["add_shards_s"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_gb_building"] = round(peak_rss_gb(), 2)

    t0 = time.perf_counter()
    merged_path = ivf_shards.merge_on_disk(trained, paths, folder / "image-ann-1.faiss")
    out["merge_on_disk_s"] = round(time.perf_counter() - t0, 1)
    for p in paths:
        p.unlink()
    index = ivf_shards.open_merged(merged_path)
    half = ivf_shards.HalfVectors(halves)
    out["index_file_mb"] = round(merged_path.stat().st_size / 1e6, 1)
    out["ivfdata_mb"] = round(merged_path.with_name(merged_path.name + ".ivfdata").stat().st_size / 1e6, 1)
    out["fp16_exact_store_mb"] = round(sum(p.stat().st_size for p in halves) / 1e6, 1)

    q_rng = np.random.default_rng(12345)
    q = gen.draw(2 * args.queries, q_rng).astype(np.float32)
    t0 = time.perf_counter()
    _, truth = exact_search(data, q, 10)
    out["exact_truth_s"] = round(time.perf_counter() - t0, 1)
    tune_q, eval_q, eval_truth = q[:args.queries], q[args.queries:], truth[args.queries:]
    t0 = time.perf_counter()
    state = ann.tune(index, ann.AnnState(requested=args.codes, factory=factory, built_n=n),
                     np.zeros(0, np.int64), np.zeros((0, DIM), np.float32),
                     lambda x, k: exact_search(data, x, k), half, cross={"image": tune_q})
    out["tune_s"] = round(time.perf_counter() - t0, 1)
    out["tuned"] = {"nprobe": state.value, "refine": state.refine, "recall_tuning": state.recall}

    def timed(refine: int) -> tuple[float, float, float]:
        found = ann.ann_search(index, eval_q, 10, state.param, state.value, refine, None, half)[1]
        times = []
        for row in eval_q[:100]:
            t = time.perf_counter()
            ann.ann_search(index, row[None], 10, state.param, state.value, refine, None, half)
            times.append((time.perf_counter() - t) * 1000)
        return ann.recall_at(found, eval_truth, 10), float(np.median(times)), float(np.percentile(times, 99))

    r, p50, p99 = timed(state.refine)
    out["tuned_setting"] = {"recall_at_10": round(r, 4), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}
    r1, p50_1, p99_1 = timed(1)
    out["codes_alone_no_rescoring"] = {"recall_at_10": round(r1, 4), "p50_ms": round(p50_1, 2),
                                       "p99_ms": round(p99_1, 2)}
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    out["lists_on_disk"] = isinstance(lists, faiss.OnDiskInvertedLists)
    out["peak_rss_gb"] = round(peak_rss_gb(), 2)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()

"""ANN index types at 1M and 10M vectors: build time, bytes per vector, latency, QPS and recall@10.

Vectors are generated (clustered, unit-norm, 512-d like ViT-B-32 embeddings) into a memory-mapped file
under --workdir and reused by later runs. Each index type is built and tuned with the same code the
store uses (retrieval/store/ann.py); recall is measured against exact search on fresh queries drawn from
the same distribution (never stored).

  python bench/ann_scale.py --sizes 1M --types flat,hnsw,ivfpq
  python bench/ann_scale.py --sizes 10M --types flat,ivfpq --single 50
  python bench/ann_scale.py --sizes 1M --types "ivfsq;IVF2048_HNSW32,PQ128np"   # ';' when factories have ','

Not a timed test: numbers depend on the machine; run it on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.store import ann  # noqa: E402

DIM = 512


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1_000, "M": 1_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if text[-1] in "KM" else text) * mult)


LATENT = 64  # CLIP embeddings vary along far fewer directions than their 512 coordinates


class Generator:
    """Clustered unit vectors of low intrinsic dimension; cluster sizes skewed like photo libraries."""

    def __init__(self, dim: int = DIM, clusters: int = 4096, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centres = rng.standard_normal((clusters, LATENT), dtype=np.float32)
        self.basis = np.linalg.qr(rng.standard_normal((dim, LATENT)))[0].T.astype(np.float32)
        weights = rng.pareto(1.2, clusters) + 1
        self.weights = weights / weights.sum()
        self.spread = rng.uniform(0.4, 0.9, clusters).astype(np.float32)  # some tight, some loose

    def draw(self, m: int, rng: np.random.Generator) -> np.ndarray:
        c = rng.choice(len(self.centres), size=m, p=self.weights)
        z = self.centres[c] + self.spread[c, None] * rng.standard_normal((m, LATENT), dtype=np.float32)
        x = z @ self.basis
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += 0.15 * rng.standard_normal((m, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def generate(path: Path, n: int, gen: Generator, seed: int = 1, chunk: int = 250_000) -> np.ndarray:
    """n vectors written once to a file, then memory-mapped (10M x 512 floats is 20 GB)."""
    if path.exists() and path.stat().st_size == n * gen.dim * 4:
        return np.memmap(path, dtype=np.float32, mode="r", shape=(n, gen.dim))
    rng = np.random.default_rng(seed)
    out = np.memmap(path.with_suffix(".tmp"), dtype=np.float32, mode="w+", shape=(n, gen.dim))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        out[start:start + m] = gen.draw(m, rng)
    out.flush()
    del out
    path.with_suffix(".tmp").rename(path)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n, gen.dim))


def exact_search(data: np.ndarray, q: np.ndarray, k: int, chunk: int = 500_000) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k over a (mapped) array, chunk by chunk."""
    import faiss

    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for start in range(0, len(data), chunk):
        block = np.ascontiguousarray(data[start:start + chunk])
        s, i = faiss.knn(q, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, i + start], axis=1)
        top = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(s_all, top, axis=1)
        best_i = np.take_along_axis(i_all, top, axis=1)
    return best_s, best_i


def index_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def measure(search, q: np.ndarray, single: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms) over `single` one-query calls, and QPS of one batch call over all queries."""
    times = []
    for row in q[:single]:
        t0 = time.perf_counter()
        search(row[None])
        times.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    search(q)
    qps = len(q) / (time.perf_counter() - t0)
    return float(np.median(times)), float(np.percentile(times, 99)), qps


def run_type(kind: str, data: np.ndarray, ids: np.ndarray, q: np.ndarray, truth: np.ndarray,
             budget: int, single: int) -> dict:
    n = len(data)
    factory = ann.resolve(kind, n, DIM, budget)
    row = {"n": n, "type": kind, "factory": factory}
    if factory == ann.FLAT:
        def flat(x: np.ndarray) -> np.ndarray:
            return exact_search(data, np.ascontiguousarray(x, dtype=np.float32), 10)[1]

        p50, p99, qps = measure(flat, q, min(single, 20) if n > 2_000_000 else single)
        return row | {"build_s": 0.0, "bytes_per_vector": DIM * 4 + 8, "param": "-", "p50_ms": p50,
                      "p99_ms": p99, "qps": qps, "recall_at_10": 1.0}
    if ann.family(factory) == "hnsw" and ann.hnsw_bytes(DIM, n) > budget:
        return row | {"skipped": f"needs {ann.hnsw_bytes(DIM, n) / 1e9:.1f} GB > budget {budget / 1e9:.1f} GB"}
    t0 = time.perf_counter()
    def vectors_of(sel: np.ndarray) -> np.ndarray:
        return np.asarray(data[sel], dtype=np.float32)

    state = ann.AnnState(requested=kind, gen=1)
    index, state = ann.build(factory, ids, data, state, lambda x, k: exact_search(data, x, k), vectors_of,
                             log=lambda m: print("  " + m, flush=True))
    build_s = time.perf_counter() - t0

    def approx(x: np.ndarray) -> np.ndarray:
        return ann.ann_search(index, x, 10, state.param, state.value, state.refine, None, vectors_of)[1]

    p50, p99, qps = measure(approx, q, single)
    recall = ann.recall_at(approx(q), truth, 10)
    return row | {"build_s": build_s, "bytes_per_vector": index_bytes(index) / n,
                  "param": f"{state.param}={state.value}" + (f" refine x{state.refine}" if state.refine > 1 else ""),
                  "tuned_recall": state.recall, "p50_ms": p50, "p99_ms": p99, "qps": qps, "recall_at_10": recall}


def table(rows: list[dict]) -> str:
    head = ("| vectors | type | faiss index | build s | bytes/vector | setting | p50 ms | p99 ms | batch QPS "
            "| recall@10 |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['n']:,} | {r['type']} | {r['factory']} | skipped: {r['skipped']} ||||||")
            continue
        lines.append(f"| {r['n']:,} | {r['type']} | {r['factory']} | {r['build_s']:.0f} | "
                     f"{r['bytes_per_vector']:.0f} | {r['param']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['qps']:.0f} | {r['recall_at_10']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1M", help="comma-separated, e.g. 1M,10M")
    ap.add_argument("--types", default="flat,hnsw,ivfpq",
                    help="auto, flat, hnsw, ivfsq, ivfpq or factory strings; separated by ';' if any holds a ','")
    ap.add_argument("--queries", type=int, default=1000, help="queries for recall and batch QPS")
    ap.add_argument("--single", type=int, default=200, help="one-at-a-time queries for p50/p99")
    ap.add_argument("--memory-budget", default=None, help="as for `crossmodal index` (default: half of RAM)")
    ap.add_argument("--workdir", default="/tmp/crossmodal-ann-bench")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    budget = ann.parse_budget(args.memory_budget) or ann.default_budget()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for size in args.sizes.split(","):
        n = parse_size(size)
        t0 = time.perf_counter()
        gen = Generator()
        data = generate(work / f"vectors-{n}x{DIM}-v2.f32", n, gen)
        print(f"{n:,} vectors ready in {time.perf_counter() - t0:.0f} s", flush=True)
        ids = np.arange(n, dtype=np.int64)
        q = gen.draw(args.queries, np.random.default_rng(123))  # fresh: never stored
        t0 = time.perf_counter()
        _, truth = exact_search(data, q, 10)
        print(f"exact top-10 of {len(q)} queries in {time.perf_counter() - t0:.0f} s", flush=True)
        for kind in args.types.split(";" if ";" in args.types else ","):
            print(f"-- {n:,} {kind}", flush=True)
            rows.append(run_type(kind.strip(), data, ids, q, truth, budget, args.single))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()

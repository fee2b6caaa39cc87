#!/usr/bin/env python
"""A collection through the Store's own commit path at the largest size this machine holds in the time
given: the writer's memory while the exact store grows (segments, retrieval/store/exact_segments.py), the
IVF built with its lists on disk once they exceed the memory budget (retrieval/store/ann_disk.py), and a
reader process's memory, latency and recall@10 against exact search.

A benchmark, not a test. Vectors come from bench/ann_scale.py's generator (clustered, unit-norm, 512-d, low
intrinsic dimension like CLIP embeddings), rows from bench/pg_catalog_size.py's archive-like records; both go
through the indexer's committer (indexer/pipeline.py `_Committer`: chunks that grow with the index, capped at
COMMIT_MAX_BYTES of vectors), inside `ann_built_once` as a first `index --ray` over an archive runs, so the
ANN index is built once at the end, with the type and budget given (default: `ivfsq` under a 1 GB budget,
whose 8-bit lists at 2M vectors, 1.04 GB, exceed 80% of it and go on disk).

  .venv/bin/python bench/store_scale.py --n 2M --budget 1G --json /tmp/store_scale.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) in sys.path:
    sys.path.remove(str(REPO))
sys.path.insert(0, str(REPO))

from bench.ann_scale import DIM, Generator, exact_search, generate, parse_size  # noqa: E402
from bench.pg_catalog_size import BATCH, make_records  # noqa: E402
from indexer.pipeline import _Committer  # noqa: E402 - the committer a real run uses
from retrieval.model.spec import Fingerprint  # noqa: E402
from retrieval.store import Store, ann  # noqa: E402
from retrieval.store.bulk import ann_built_once  # noqa: E402

READER = """
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from retrieval.store import Store
from retrieval.store.records import QueryOptions
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
q = np.load(sys.argv[3])
base = anon()
t0 = time.perf_counter()
st = Store.open(sys.argv[2])
open_s = time.perf_counter() - t0
after_open = anon() - base
found, times = [], []
for row in q:
    t0 = time.perf_counter()
    found.append(st.search('image', row[None], 10)[1][0])
    times.append((time.perf_counter() - t0) * 1000)
after_queries = anon() - base
st.query_options = QueryOptions(exact=True)
t0 = time.perf_counter()
exact = st.search('image', q, 10)[1]
exact_ms = (time.perf_counter() - t0) * 1000 / len(q)
print(json.dumps({'open_s': open_s, 'anon_after_open': after_open, 'anon_after_queries': after_queries,
                  'found': np.asarray(found).tolist(), 'exact': exact.tolist(), 'ms': times,
                  'exact_ms_per_query': exact_ms, 'ann': st.ann_info('image')}))
"""


class AnonPeak(threading.Thread):
    """The process's anonymous memory (RssAnon: not the page cache of mapped files), sampled every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = False

    @staticmethod
    def now() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.now())
            time.sleep(0.05)


def dir_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="2M")
    ap.add_argument("--budget", default="1G", help="--memory-budget of the run")
    ap.add_argument("--index-type", default="ivfsq")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cm-store-scale"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n = parse_size(args.n)
    budget = ann.parse_budget(args.budget)
    args.workdir.mkdir(parents=True, exist_ok=True)
    gen = Generator()
    data = generate(args.workdir / f"vectors-{n}.f32", n, gen)
    q = gen.draw(args.queries, np.random.default_rng(99)).astype(np.float32)
    home = args.workdir / f"home-{n}"
    shutil.rmtree(home, ignore_errors=True)
    out: dict[str, object] = {"n": n, "budget": budget, "index_type": args.index_type}
    sampler = AnonPeak()
    sampler.start()
    base = AnonPeak.now()
    rng = np.random.default_rng(5)
    checkpoints: list[dict[str, object]] = []
    logs: list[str] = []
    t_start = time.perf_counter()
    with Store.open(home, create=True, writable=True) as st:
        st.bind_model(Fingerprint("bench", "bench", "sha256:bench", DIM))
        st.set_index_type(args.index_type, budget, rebuild=False)
        import retrieval.store.schema  # noqa: F401 - what every writer imports, before the baseline
        import retrieval.store.writes  # noqa: F401
        base = AnonPeak.now()
        sampler.peak = base
        committer = _Committer(st)
        commits: list[float] = []
        real = st.add_images

        def timed(*a: object, **k: object) -> list[int]:
            t0 = time.perf_counter()
            ids = real(*a, **k)  # type: ignore[arg-type]
            commits.append(time.perf_counter() - t0)
            return ids

        st.add_images = timed  # type: ignore[method-assign]
        marks = {n // 4, n // 2, n}
        with ann_built_once(st, log=logs.append):
            for start in range(0, n, BATCH):
                m = min(BATCH, n - start)
                committer.add(make_records(start, m, rng), np.ascontiguousarray(data[start:start + m]), [None] * m)
                if start + m in marks or any(start < mk <= start + m for mk in marks):
                    committer.flush()
                    checkpoints.append({"vectors": st.count("image"),
                                        "store_bytes": sum(s.path.stat().st_size for s in st.indexes["image"].segments
                                                           if s.path is not None),
                                        "segments": len(st.indexes["image"].segments),
                                        "peak_anon_mb": round((sampler.peak - base) / 2 ** 20, 1),
                                        "commits": len(commits),
                                        "commit_s_median": round(float(np.median(commits)), 3),
                                        "seconds": round(time.perf_counter() - t_start, 1)})
                    print(json.dumps(checkpoints[-1]), flush=True)
            committer.flush()
            t_build = time.perf_counter()
        out["build_s"] = round(time.perf_counter() - t_build, 1)
        out["build_log"] = logs
        out["peak_anon_mb_with_build"] = round((sampler.peak - base) / 2 ** 20, 1)
        out["ann"] = st.ann_info("image")
    sampler.stop = True
    out["checkpoints"] = checkpoints
    out["lists_bytes"] = dir_bytes(home / "vectors", "*.ivfdata")
    out["catalog_bytes"] = (home / "catalog.sqlite").stat().st_size
    qpath = args.workdir / "queries.npy"
    np.save(qpath, q)
    r = subprocess.run([sys.executable, "-c", READER, str(REPO), str(home), str(qpath)], capture_output=True,
                       text=True, check=True)
    got = json.loads(r.stdout)
    found, exact = np.asarray(got["found"]), np.asarray(got["exact"])
    truth_ids = np.asarray(Store.open(home).vectors("image")[0])
    oracle = truth_ids[exact_search(data, q, 10)[1]]  # numpy-side brute force over the generated vectors
    out["reader"] = {"open_s": round(got["open_s"], 2),
                     "anon_after_open_mb": round(got["anon_after_open"] / 2 ** 20, 1),
                     "anon_after_queries_mb": round(got["anon_after_queries"] / 2 ** 20, 1),
                     "p50_ms": round(float(np.median(got["ms"])), 2),
                     "p99_ms": round(float(np.percentile(got["ms"], 99)), 2),
                     "recall_at_10": round(ann.recall_at(found, exact), 4),
                     "exact_equals_oracle": float(np.mean([set(a) == set(b)
                                                           for a, b in zip(exact, oracle, strict=True)])),
                     "exact_ms_per_query": round(got["exact_ms_per_query"], 1)}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

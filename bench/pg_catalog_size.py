#!/usr/bin/env python
"""The PostgreSQL catalog's size per image, measured: bytes per table (heap, TOAST, each index), per image,
and extrapolated to 1M, 100M and 1B images; the SQLite catalog of the same rows beside it.

A benchmark, not a test. It starts a throwaway PostgreSQL cluster on loopback (tests/pg_cluster.py, as the
`postgres` tests do), makes one database per size, and writes N image rows through the writer a real
`crossmodal index --catalog postgresql+psycopg://...` run uses: `Store.open(..., catalog=URL)` makes the
schema, and the indexer's own committer (indexer/pipeline.py `_Committer`: chunks of COMMIT_EVERY that grow
with the index, each one `Store.add_images` commit) inserts the rows. Per image a run writes one `items` row
and nothing else in the catalog (thumbnails, vectors and token features are files in the home; `skipped`
holds only failures; `meta` is a few keys whatever the size), so `items` is what grows.

The rows are what the indexer stores for camera and phone photos: paths such as
`/archive/2019/06/IMG_20190614_153012.jpg` (four folder layouts, 45-75 bytes), sha256 in hex, sizes of
1-12 MB, sub-second mtimes, 4032x3024-like sizes, and EXIF facts (date on 95%, make and model on 90%, GPS
on 45% of rows). The vectors are 8-dimensional (the catalog does not depend on their size; the exact store's
2 KB per 512-d image is counted in README) and the ANN upkeep is set to flat, so only the catalog is timed.

  .venv/bin/python bench/pg_catalog_size.py --n 200000 --check 50000 --json /tmp/pg_catalog_size.json

The per-image figure is given for each size and as the slope between the two sizes (which takes out the
fixed cost of empty tables and the meta rows); the two agreeing says the figure is stable. For comparison it
also measures the unique B-tree on the path that schema 3 had, on the same paths in commit order (schema 4
keeps one row per path with a hash index instead).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) in sys.path:
    sys.path.remove(str(REPO))
sys.path.insert(0, str(REPO))  # ahead of bench/ (whose tests/ package would shadow the repo's) and any install

from indexer.pipeline import _Committer  # noqa: E402 - the committer a real run uses
from retrieval.media.photo_meta import PhotoMeta  # noqa: E402
from retrieval.model.spec import Fingerprint  # noqa: E402
from retrieval.store import ImageRecord, Store  # noqa: E402

DIM = 8
BATCH = 256  # images handed to the committer at a time (an encoder batch)
CAMERAS = [("Apple", "iPhone 12 Pro"), ("Apple", "iPhone 8"), ("samsung", "SM-G991B"), ("Google", "Pixel 7"),
           ("Canon", "Canon EOS 5D Mark IV"), ("NIKON CORPORATION", "NIKON D750"), ("SONY", "ILCE-7M3"),
           ("FUJIFILM", "X-T3"), ("OLYMPUS IMAGING CORP.", "E-M10"), ("HUAWEI", "ELE-L29")]
EVENTS = ["Holiday", "Birthday Anna", "Hiking Alps", "Christmas", "Garden", "Beach", "Wedding Tom and Eva",
          "Zoo", "School trip", "New Year"]
SIZES = [(4032, 3024), (3024, 4032), (6000, 4000), (4000, 3000), (1920, 1080), (5472, 3648)]


def make_records(start: int, n: int, rng: np.random.Generator) -> list[ImageRecord]:
    """`n` image rows as a real archive's photos would give (see the module docstring)."""
    out = []
    for i in range(start, start + n):
        t = 1_230_000_000 + int(rng.integers(0, 500_000_000))
        lt = time.gmtime(t)
        y, mo, d, hh, mm, ss = lt.tm_year, lt.tm_mon, lt.tm_mday, lt.tm_hour, lt.tm_min, lt.tm_sec
        layout = i % 4
        if layout == 0:
            path = f"/archive/{y}/{mo:02d}/IMG_{y}{mo:02d}{d:02d}_{hh:02d}{mm:02d}{ss:02d}_{i}.jpg"
        elif layout == 1:
            path = f"/archive/{y}/{y}-{mo:02d}-{d:02d} {EVENTS[i % len(EVENTS)]}/DSC{i % 100000:05d}_{i}.JPG"
        elif layout == 2:
            path = f"/home/maria/Pictures/{y}/{mo:02d}/PXL_{y}{mo:02d}{d:02d}_{hh:02d}{mm:02d}{ss:02d}{i % 1000:03d}" \
                   f"_{i}.jpg"
        else:
            path = f"/mnt/nas/photos/Family/{y}/{EVENTS[i % len(EVENTS)]}/IMG_{i % 10000:04d}_{i}.HEIC"
        w, h = SIZES[i % len(SIZES)]
        make, model = CAMERAS[int(rng.integers(0, len(CAMERAS)))]
        has_cam = rng.random() < 0.9
        gps = rng.random() < 0.45
        meta = PhotoMeta(taken_at=f"{y}-{mo:02d}-{d:02d}T{hh:02d}:{mm:02d}:{ss:02d}" if rng.random() < 0.95 else None,
                         camera_make=make if has_cam else None, camera_model=model if has_cam else None,
                         gps_lat=float(rng.uniform(-60, 70)) if gps else None,
                         gps_lon=float(rng.uniform(-180, 180)) if gps else None)
        out.append(ImageRecord(path=path, sha256=rng.bytes(32).hex(), bytes=int(rng.integers(1_000_000, 12_000_000)),
                               mtime=t + float(rng.integers(0, 1000)) / 1000, width=w, height=h, meta=meta))
    return out


def fill(home: Path, catalog: str | None, n: int, seed: int) -> tuple[float, float]:
    """Write `n` rows through the indexer's committer; returns (seconds, mean path bytes)."""
    rng = np.random.default_rng(seed)
    fp = Fingerprint(model="ViT-B-32", pretrained="bench", weights="sha256:" + "0" * 64, dim=DIM)
    path_bytes = 0
    t0 = time.perf_counter()
    with Store.open(home, create=True, writable=True, catalog=catalog) as store:
        store.bind_model(fp)
        store.set_index_type("flat", rebuild=False)  # only the catalog is measured: no ANN index to keep
        committer = _Committer(store)
        for start in range(0, n, BATCH):
            recs = make_records(start, min(BATCH, n - start), rng)
            path_bytes += sum(len(r.path.encode()) for r in recs)
            v = rng.normal(size=(len(recs), DIM)).astype(np.float32)
            committer.add(recs, v / np.linalg.norm(v, axis=1, keepdims=True), [None] * len(recs))
        committer.flush()
        assert store.count("image") == n
    return time.perf_counter() - t0, path_bytes / n


def pg_sizes(url: str) -> dict[str, dict[str, int]]:
    """Per table: heap (main fork), fsm+vm, TOAST (with its index), each index, and the total."""
    import psycopg

    out: dict[str, dict[str, int]] = {}
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        for table in ("items", "meta", "skipped"):
            row = conn.execute(
                "SELECT pg_relation_size(c.oid, 'main'), pg_relation_size(c.oid, 'fsm') + "
                "pg_relation_size(c.oid, 'vm'), COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0), "
                "pg_indexes_size(c.oid), pg_total_relation_size(c.oid) FROM pg_class c WHERE c.oid = %s::regclass",
                (table,)).fetchone()
            assert row is not None
            sizes = dict(zip(("heap", "fsm_vm", "toast", "indexes", "total"), (int(x) for x in row), strict=True))
            for name, size in conn.execute(
                    "SELECT i.relname, pg_relation_size(i.oid) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
                    "WHERE x.indrelid = %s::regclass ORDER BY i.relname", (table,)):
                sizes[f"index {name}"] = int(size)
            out[table] = sizes
    return out


def btree_path_bytes(url: str) -> int:
    """What schema 3's unique B-tree on the path took for the same paths: they are inserted in commit order
    (by id, as the commits built that index) into a scratch table with that index; its size, then dropped."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("CREATE TABLE scratch_paths (path text, CONSTRAINT scratch_uq UNIQUE (path))")
        conn.execute("INSERT INTO scratch_paths SELECT path FROM items WHERE path IS NOT NULL ORDER BY id")
        row = conn.execute("SELECT pg_relation_size('scratch_uq')").fetchone()
        conn.execute("DROP TABLE scratch_paths")
    assert row is not None
    return int(row[0])


def sqlite_size(home: Path) -> int:
    """The SQLite catalog's bytes on disk (the file; the WAL is checkpointed when the writer closes)."""
    return sum(p.stat().st_size for p in home.glob("catalog.sqlite*"))


def measure(cluster: Any, n: int, seed: int, work: Path, with_sqlite: bool) -> dict[str, Any]:
    url = cluster.createdb(f"size_{n}")
    seconds, path_mean = fill(work / f"pg-{n}", url, n, seed)
    tables = pg_sizes(url)
    btree = btree_path_bytes(url)
    total = sum(t["total"] for t in tables.values())
    res: dict[str, Any] = {"n": n, "insert_s": round(seconds, 1), "rows_per_s": round(n / seconds),
                           "mean_path_bytes": round(path_mean, 1), "tables": tables, "pg_total_bytes": total,
                           "pg_bytes_per_image": total / n, "pg_items_bytes_per_image": tables["items"]["total"] / n,
                           "schema3_btree_path_bytes_per_image": btree / n}
    if with_sqlite:
        seconds, _ = fill(work / f"lite-{n}", None, n, seed)
        size = sqlite_size(work / f"lite-{n}")
        res.update(sqlite_insert_s=round(seconds, 1), sqlite_bytes=size, sqlite_bytes_per_image=size / n)
    return res


def human(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1000 or unit == "TB":
            return f"{b:,.0f} {unit}" if unit == "B" else f"{b:,.1f} {unit}"
        b /= 1000
    return f"{b:.1f} TB"


def report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Print the tables; returns the summary (per image: the largest run, and the slope between two runs)."""
    for r in runs:
        print(f"\nN = {r['n']:,} images (mean path {r['mean_path_bytes']} bytes): {r['insert_s']} s through the "
              f"committer ({r['rows_per_s']:,} rows/s)")
        print(f"{'table / part':34} {'bytes':>14} {'per image':>10}")
        for table, sizes in r["tables"].items():
            for part, b in sizes.items():
                label = f"{table} {part}" if part != "total" else f"{table} TOTAL"
                print(f"{label:34} {b:>14,} {b / r['n']:>10.1f}")
        print(f"{'all tables (PostgreSQL)':34} {r['pg_total_bytes']:>14,} {r['pg_bytes_per_image']:>10.1f}")
        b3 = r["schema3_btree_path_bytes_per_image"]
        print(f"{'(schema 3 B-tree on path, instead)':34} {b3 * r['n']:>14,.0f} {b3:>10.1f}")
        if "sqlite_bytes" in r:
            print(f"{'SQLite catalog.sqlite, same rows':34} {r['sqlite_bytes']:>14,} "
                  f"{r['sqlite_bytes_per_image']:>10.1f}   ({r['sqlite_insert_s']} s)")
    big = max(runs, key=lambda r: r["n"])
    summary: dict[str, Any] = {"pg_bytes_per_image": big["pg_bytes_per_image"]}
    if len(runs) > 1:
        small = min(runs, key=lambda r: r["n"])
        summary["pg_slope_bytes_per_image"] = ((big["pg_total_bytes"] - small["pg_total_bytes"])
                                               / (big["n"] - small["n"]))
        if "sqlite_bytes" in big and "sqlite_bytes" in small:
            summary["sqlite_slope_bytes_per_image"] = ((big["sqlite_bytes"] - small["sqlite_bytes"])
                                                       / (big["n"] - small["n"]))
    if "sqlite_bytes_per_image" in big:
        summary["sqlite_bytes_per_image"] = big["sqlite_bytes_per_image"]
    print("\nper image: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.items()))
    per = summary.get("pg_slope_bytes_per_image", summary["pg_bytes_per_image"])
    lite = summary.get("sqlite_slope_bytes_per_image", summary.get("sqlite_bytes_per_image"))
    print(f"\n{'images':>8} {'PostgreSQL catalog':>20}" + (f" {'SQLite catalog':>16}" if lite else ""))
    summary["extrapolated"] = {}
    for label, count in (("1M", 10**6), ("100M", 10**8), ("1B", 10**9)):
        summary["extrapolated"][label] = {"pg_bytes": per * count, **({"sqlite_bytes": lite * count} if lite else {})}
        print(f"{label:>8} {human(per * count):>20}" + (f" {human(lite * count):>16}" if lite else ""))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="images in the main run")
    ap.add_argument("--check", type=int, default=50_000, help="a second, smaller run (0: none)")
    ap.add_argument("--no-sqlite", action="store_true", help="skip the SQLite catalog of the same rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from tests import pg_cluster

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="cm-pg-size-"))
    cluster = pg_cluster.start()
    try:
        sizes = [n for n in (args.check, args.n) if n > 0]
        runs = [measure(cluster, n, args.seed, work, not args.no_sqlite) for n in sorted(set(sizes))]
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = report(runs)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

"""Whole-process `crossmodal index` runs for bench/index_throughput.py, timed as users meet them.

Two measurements need a fresh process rather than index_paths in a warm one:

  from empty   `crossmodal index FOLDER --model M --pretrained CKPT --json` into a new home: imports, model
               load, indexing and the ONNX export for queries. The export cache ($CROSSMODAL_CACHE) is a
               fresh folder for the first home on the machine and shared by the second, so the second run
               shows what the cache saves. Whether (and where) an export was made is read off the disk
               (new export.json files), so it stays true whichever folder this code version exports to.
  re-run       `crossmodal index ROOT --json` over an unchanged library of 10,000 real JPEG files (hard
               links to the benchmark photos under distinct names), indexed beforehand through the Store API
               with random vectors, as bench/query_latency.py builds its index.

Every process runs the `crossmodal` console script next to this interpreter with PYTHONPATH set to the
benchmark's source snapshot (check_source proves it), so it runs the code the in-process rows measured, not
the editable install's. Standard library only at import time: spawned decode workers re-import the
benchmark, and index_throughput imports this module before it starts measuring.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

CACHE_ENV = "CROSSMODAL_CACHE"  # the per-user export cache (being introduced; older code ignores it)
EXPORT_META = "export.json"  # written last into a finished ONNX export folder
CLEARED_ENV = ("CROSSMODAL_HOME", "CROSSMODAL_BACKEND", "CM_BENCH_SRC")  # users running the CLI have none

Clock = Callable[[], AbstractContextManager[Any]]  # index_throughput.Clock: .seconds and .result(n, ...)


def cli_command() -> list[str]:
    """The `crossmodal` console script beside this interpreter (what users run), else `python -m cli`."""
    script = Path(sys.executable).with_name("crossmodal")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cli"]


def cli_env(src: str, cache: Path | None, threads: int | None = None) -> dict[str, str]:
    """The environment of a user's shell, but importing crossmodal from `src` and exporting into `cache`."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env["PYTHONPATH"] = os.pathsep.join([src, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["CROSSMODAL_DEBUG_IMPORTS"] = "1"  # the process names torch/open_clip on stderr if it imported them
    if cache is not None:
        env[CACHE_ENV] = str(cache)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # load_encoder and the indexer leave torch's threads alone then
    return env


def check_source(src: str, cwd: Path) -> dict[str, str]:
    """Where a process started like the timed ones imports crossmodal from; raises unless it is `src`."""
    probe = ("import json, cli, indexer, retrieval; "
             "print(json.dumps({m.__name__: m.__file__ for m in (cli, indexer, retrieval)}))")
    r = subprocess.run([sys.executable, "-c", probe], env=cli_env(src, None), cwd=cwd, capture_output=True,
                       text=True, check=True)
    where = json.loads(r.stdout)
    wrong = {k: v for k, v in where.items() if not Path(v).resolve().is_relative_to(Path(src).resolve())}
    if wrong:
        raise RuntimeError(f"the crossmodal subprocess would import {wrong}, not the code under {src}")
    return where


def exports_under(*roots: Path) -> dict[str, int]:
    """Finished ONNX exports (their export.json) under `roots` -> mtime_ns: a new or rewritten one was made."""
    found: dict[str, int] = {}
    for root in roots:
        if root.is_dir():
            for meta in root.rglob(EXPORT_META):
                try:
                    found[str(meta)] = meta.stat().st_mtime_ns
                except OSError:
                    continue
    return found


def _export_seconds(meta: str) -> float | None:
    try:
        return float(json.loads(Path(meta).read_text()).get("seconds"))
    except (OSError, ValueError, TypeError):
        return None


def index_process(clock: Clock, home: Path, roots: Sequence[Path], n: int, src: str, cache: Path, cwd: Path,
                  options: Sequence[str] = (), threads: int | None = None) -> dict:
    """Time one `crossmodal --home HOME index ROOTS... OPTIONS --json` process; raises if it fails.

    Returns clock.result (images/s = n / wall time) with the command's own JSON report, the heavy modules it
    imported, its warnings, and whether it made an ONNX export (where, in how many seconds)."""
    cmd = [*cli_command(), "--home", str(home), "index", *map(str, roots), *options, "--json"]
    before = exports_under(cache, home)
    with clock() as c:
        r = subprocess.run(cmd, env=cli_env(src, cache, threads), cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    report = next((json.loads(ln) for ln in reversed(r.stdout.splitlines()) if ln.startswith("{")), None)
    if report is None:
        raise RuntimeError(f"`{' '.join(cmd)}` printed no JSON report: {r.stdout[-500:]!r}")
    after = exports_under(cache, home)
    made = sorted(p for p, m in after.items() if before.get(p) != m)
    in_cache = [p for p in made if Path(p).is_relative_to(cache)]
    heavy = next((ln.split(":", 2)[2].strip() for ln in r.stderr.splitlines() if "heavy imports:" in ln), "?")
    warnings = [ln for ln in r.stderr.splitlines() if ln.lower().startswith(("warning", "error"))]
    return c.result(n, command=cmd, report=report, heavy_imports=heavy, warnings=warnings,
                    export_made=bool(made), export_where=("cache" if in_cache else "home") if made else None,
                    export_seconds=_export_seconds(made[0]) if made else None,
                    exports_in_cache=sum(Path(p).is_relative_to(cache) for p in after),
                    exports_in_home=sum(Path(p).is_relative_to(home) for p in after))


# ---- the unchanged 10,000-file library ----------------------------------------------------------------
def build_library(root: Path, sources: Sequence[str], n: int, folders: int) -> None:
    """`n` distinct file names in `folders` sub-folders, hard links to `sources` taken in turn (a library
    of real JPEG files at no disk cost); raises with a fix when `root` is on another file system."""
    for i in range(n):
        src = sources[i % len(sources)]
        dst = root / f"f{i % folders:02d}" / f"IMG_{i:05d}{Path(src).suffix.lower()}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError as e:
            raise SystemExit(f"cannot hard-link {src} into {root} ({e}); put --scratch on the photos' file "
                             f"system") from e


def index_library_fast(home: Path, root: Path, encoder: Any, seed: int = 0) -> int:
    """Index every file under `root` without running the model: the catalog rows the indexer would write
    (path, size and mtime as its scan reads them, real pixel sizes) with random unit vectors, and the model
    recorded with its preprocessing, so a re-run knows the model without loading it. Returns the count."""
    import numpy as np
    from PIL import Image

    from indexer.scan import scan
    from retrieval.model.recorded import record_model
    from retrieval.store import ImageRecord, Store
    from retrieval.store.paths import to_catalog

    found = scan([str(root)])
    if found.skipped:
        raise RuntimeError(f"the library scan skipped files: {found.skipped[:3]}")
    sizes: dict[tuple[int, int], tuple[int, int]] = {}  # (device, inode) -> pixel size: each photo read once
    records = []
    for i, f in enumerate(found.files):
        st = os.stat(f.path)
        key = (st.st_dev, st.st_ino)
        if key not in sizes:
            with Image.open(f.path) as im:
                sizes[key] = im.size
        w, h = sizes[key]
        records.append(ImageRecord(path=to_catalog(f.path), sha256=f"{i:064x}", bytes=f.size, mtime=f.mtime,
                                   width=w, height=h))
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((len(records), encoder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with Store.open(home, create=True, writable=True) as store:
        record_model(store, encoder)
        store.add_images(records, vectors)
        return store.count("image")


def check_unchanged(run: dict, n: int) -> None:
    """A re-run over the unchanged library must find all `n` files unchanged and change nothing."""
    rep = run["report"]
    changed = {k: rep.get(k) for k in ("added", "updated", "moved", "removed") if rep.get(k)}
    if rep.get("unchanged") != n or changed or rep.get("skipped"):
        raise RuntimeError(f"re-run over the unchanged library did work: unchanged {rep.get('unchanged')} of "
                           f"{n}, {changed}, skipped {rep.get('skipped', [])[:3]}")

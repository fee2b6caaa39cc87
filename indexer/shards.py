"""Shard files: what embedding workers (Ray actors) hand the driver, one file per batch of images.

Why files and not Ray objects: a killed run must resume without embedding again what its workers finished,
and the driver must be able to merge a shard long after the worker that wrote it is gone. A shard holds
everything a local run commits for its images (vectors, rerank token features, catalog rows) plus the
files it could not use and why. It is written atomically (temp file, fsync, rename), so a half-written one
is never seen under its final name; leftover temp files are swept by the next run.

A shard's name is the hash of its files' (path, size, mtime): a retried task rewrites the same file, and a
later run matches shards to its plan by those three values, so a file changed since is embedded again.
Shards live under `<home>/shards/<model key>/` (shared storage on a cluster) until merged.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from retrieval.fsutil import atomic_write
from retrieval.media.photo_meta import PhotoMeta
from retrieval.model.spec import Fingerprint

SHARDS = "shards"
SUFFIX = ".shard.npz"
FORMAT = 1


@dataclass(frozen=True)
class ShardRow:
    """One embedded image: the catalog facts a local run records for it."""

    path: str  # as os functions take it (a name that is not UTF-8 keeps its surrogates; JSON escapes them)
    size: int
    mtime: float
    sha256: str
    width: int
    height: int
    meta: PhotoMeta = PhotoMeta()


@dataclass(frozen=True)
class ShardFailure:
    """A file the worker could not embed, with the same one-line reason a local run gives."""

    path: str
    size: int
    mtime: float
    reason: str


@dataclass
class Shard:
    """Rows i of `rows` have vectors[i] and (when the model has them) tokens[i]."""

    rows: list[ShardRow]
    vectors: np.ndarray  # (n, dim) float32, unit rows
    failed: list[ShardFailure] = field(default_factory=list)
    tokens: np.ndarray | None = None  # (n, 1+P, dim) float32, or None
    precision: str = "fp32"

    def key(self) -> str:
        """The content name: a hash of every file's (path, size, mtime), good and failed alike."""
        return shard_key([(r.path, r.size, r.mtime) for r in self.rows] +
                         [(f.path, f.size, f.mtime) for f in self.failed])


def shard_key(files: list[tuple[str, int, float]]) -> str:
    h = hashlib.sha256()
    for path, size, mtime in sorted(files):
        h.update(f"{path}\0{size}\0{mtime!r}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def folder_for(home: str | Path, fp: Fingerprint) -> Path:
    """The shard folder of one model (shards of another model can never be merged into this index)."""
    model = hashlib.sha256(fp.cache_id().encode()).hexdigest()[:16]
    return Path(home) / SHARDS / model


def write_shard(folder: Path, shard: Shard) -> Path:
    """Write `shard` atomically under its content name; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    head = {"format": FORMAT, "precision": shard.precision,
            "rows": [{**asdict(r), "meta": asdict(r.meta)} for r in shard.rows],
            "failed": [asdict(f) for f in shard.failed]}
    arrays = {"head": np.frombuffer(json.dumps(head).encode(), dtype=np.uint8),
              "vectors": np.ascontiguousarray(shard.vectors, dtype=np.float32)}
    if shard.tokens is not None:
        arrays["tokens"] = np.ascontiguousarray(shard.tokens, dtype=np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = folder / f"{shard.key()}{SUFFIX}"
    atomic_write(path, buf.getvalue())
    return path


def read_shard(path: Path) -> Shard | None:
    """The shard at `path`, or None when it is unreadable or of another format (then it is embedded again)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            head = json.loads(bytes(z["head"]).decode())
            vectors = np.asarray(z["vectors"], dtype=np.float32)
            tokens = np.asarray(z["tokens"], dtype=np.float32) if "tokens" in z.files else None
        if head.get("format") != FORMAT:
            return None
        rows = [ShardRow(**{**r, "meta": PhotoMeta(**r["meta"])}) for r in head["rows"]]
        failed = [ShardFailure(**f) for f in head["failed"]]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None
    if len(rows) != len(vectors) or (tokens is not None and len(tokens) != len(rows)):
        return None
    return Shard(rows, vectors, failed, tokens, str(head.get("precision", "fp32")))


def complete_shards(folder: Path) -> Iterator[Path]:
    """Shards under their final names, oldest first; temp files (a worker killed mid-write) are left out."""
    if not folder.is_dir():
        return iter(())
    return iter(sorted(folder.glob(f"*{SUFFIX}"), key=lambda p: (p.stat().st_mtime, p.name)))


def sweep_temp(folder: Path) -> int:
    """Remove half-written shards (temp files of killed workers); call only while no worker runs."""
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                n += 1
    return n

"""Index folders: scan -> decode in workers -> encode in batches -> commit in chunks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from retrieval.config import COMMIT_EVERY, DEFAULT_BATCH_SIZE
from retrieval.encoder import Encoder
from retrieval.store import ImageRecord, Store

from .decode import Decoded, Failed, decode_stream
from .scan import FileEntry, plan, scan

ProgressFn = Callable[[int, int], None]


@dataclass
class IndexReport:
    """What a run did; `images_per_second` counts files processed (embedded or skipped) per second."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    total: int = 0

    def to_json(self) -> dict:
        return {
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
        }


def default_workers() -> int:
    """Decode processes: leave a core to the encoder on small machines."""
    n = os.cpu_count() or 1
    return max(1, min(8, n - 1)) if n > 2 else 1


class _Committer:
    """Buffers encoded images and commits them in chunks that grow with the index (amortised O(n) I/O)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.records: list[ImageRecord] = []
        self.vectors: list[np.ndarray] = []
        self.replace: list[int] = []
        self.added = 0
        self.updated = 0

    def add(self, records: list[ImageRecord], vectors: np.ndarray, replace: list[int | None]) -> None:
        self.records += records
        self.vectors.append(vectors)
        self.replace += [r for r in replace if r is not None]
        self.updated += sum(r is not None for r in replace)
        self.added += sum(r is None for r in replace)
        if len(self.records) >= max(COMMIT_EVERY, self.store.count("image") // 4):
            self.flush()

    def flush(self) -> None:
        if not self.records:
            return
        self.store.add_images(self.records, np.concatenate(self.vectors), replace=self.replace)
        self.records, self.vectors, self.replace = [], [], []


def index_paths(store: Store, encoder: Encoder, roots: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
                workers: int | None = None, progress: ProgressFn | None = None,
                on_plan: Callable[[int, int], None] | None = None) -> IndexReport:
    """Embed every new or changed image under `roots` into `store`. Re-runs only stat unchanged files."""
    started = time.perf_counter()
    found = scan(roots)
    todo = plan(found.files, store.image_files())
    work: list[tuple[FileEntry, int | None]] = [(f, None) for f in todo.new] + list(todo.changed)
    report = IndexReport(unchanged=todo.unchanged, skipped=list(found.skipped), total=len(work))
    if on_plan:
        on_plan(len(work), todo.unchanged)
    replaces = {f.path: old for f, old in work}
    committer = _Committer(store)
    batch: list[Decoded] = []
    done = 0

    def encode_batch() -> None:
        if not batch:
            return
        vectors = encoder.encode_pixels(np.stack([d.pixels for d in batch]))
        records = [ImageRecord(path=d.entry.path, sha256=d.sha256, bytes=d.entry.size, mtime=d.entry.mtime,
                               width=d.width, height=d.height, taken_at=d.taken_at) for d in batch]
        committer.add(records, vectors, [replaces[d.entry.path] for d in batch])
        batch.clear()

    nworkers = default_workers() if workers is None else workers
    try:
        for res in decode_stream([f for f, _ in work], encoder.preprocess, nworkers):
            if isinstance(res, Failed):
                report.skipped.append((res.entry.path, res.reason))
                done += 1
            else:
                batch.append(res)
                if len(batch) >= batch_size:
                    n = len(batch)
                    encode_batch()
                    done += n
            if progress:
                progress(done, len(work))
        encode_batch()
        done = len(work)
    finally:
        # Whatever was embedded is committed, also on Ctrl-C: the next run resumes after it.
        committer.flush()
        store.record_skipped(report.skipped)
    if progress:
        progress(done, len(work))
    report.added, report.updated = committer.added, committer.updated
    report.seconds = time.perf_counter() - started
    report.images_per_second = len(work) / report.seconds if report.seconds > 0 and work else 0.0
    return report

"""Index folders: scan -> decode in workers -> encode in batches -> commit in chunks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from indexer.scan import FileEntry, plan, scan
from retrieval.config import COMMIT_EVERY, COMMIT_MAX_BYTES, DEFAULT_BATCH_SIZE, DEFAULT_CUDA_BATCH_SIZE
from retrieval.fsutil import sha256_file
from retrieval.hardware import set_model_threads, usable_cores
from retrieval.media.thumbnails import prune_thumbs
from retrieval.model.protocol import Encoder
from retrieval.model.recorded import ModelOnDemand, record_image_precision
from retrieval.rerank import token_cache
from retrieval.store import ImageRecord, Store
from retrieval.store.paths import from_catalog, path_json, to_catalog

if TYPE_CHECKING:  # decoding is imported when there is something to decode: an unchanged re-run never is
    from indexer.decode import Decoded, Failed

ProgressFn = Callable[[int, int], None]
# Embeds and commits a run's work (files, and the id each replaces) in place of the local decode workers
# (indexer/shard_merge.py: on Ray); it fills the report's added, updated and skipped and records skipped files.
EmbedFn = Callable[["Store", "list[tuple[FileEntry, int | None]]", "IndexReport", "ProgressFn | None"], None]


@dataclass
class IndexReport:
    """What a run did; `images_per_second` counts files processed (embedded or skipped) per second.
    `skipped` holds catalog paths (retrieval.store.paths): show them with `display_path`."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, int]] = field(default_factory=list)  # empty roots whose images were kept
    seconds: float = 0.0
    images_per_second: float = 0.0
    total: int = 0
    workers: int | None = None  # decode processes the run used (None: nothing was decoded)
    stages: dict[str, float] = field(default_factory=dict)  # decode and model time per image, where measured

    def to_json(self) -> dict:
        return {
            "added": self.added,
            "updated": self.updated,
            "moved": self.moved,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "skipped": [{**path_json(p), "reason": r} for p, r in self.skipped],
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            **({"decode_workers": self.workers} if self.workers is not None else {}),
            **({"stage_ms_per_image": self.stages} if self.stages else {}),
        }


def default_workers() -> int:
    """A fixed decode-process count for callers that do not let a run measure it (index_paths picks its own
    from the first batch, see choose_workers): one per four cores, none on two or fewer."""
    n = usable_cores()
    return 0 if n <= 2 else max(1, min(8, n // 4))


def _share_cores(device: str, workers: int) -> None:
    """Give the model's threads the cores the decode workers leave (unless OMP_NUM_THREADS says otherwise)."""
    if device != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    set_model_threads(usable_cores() - workers)  # torch's too, when the model is on torch


class _Committer:
    """Buffers encoded images and commits them in chunks that grow with the index (fewer commits, fewer ANN
    file rewrites), up to COMMIT_MAX_BYTES of vectors: the buffer never holds a large part of a big index."""

    def __init__(self, store: Store, commit_every: int = COMMIT_EVERY,
                 before_flush: Callable[[], None] | None = None) -> None:
        self.store = store
        self.before_flush = before_flush  # rerank token cache: its segment is durable before the commit
        self.commit_every = max(1, commit_every)
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
        cap = COMMIT_MAX_BYTES // max(1, vectors.shape[1] * 4) if vectors.ndim == 2 else self.commit_every
        if len(self.records) >= max(self.commit_every, min(self.store.count("image") // 4, cap)):
            self.flush()

    def flush(self) -> None:
        if not self.records:
            return
        if self.before_flush:
            self.before_flush()
        self.store.add_images(self.records, np.concatenate(self.vectors), replace=self.replace)
        self.records, self.vectors, self.replace = [], [], []


def _find_moves(new: list[FileEntry], missing: dict[int, str],
                known: dict[str, tuple[int, int | None, float | None]], shas: dict[int, str]
                ) -> list[tuple[FileEntry, int]]:
    """Pair new files with vanished ones of the same content: hash only new files whose size matches."""
    if not missing or not new:
        return []
    by_key: dict[tuple[int | None, str], list[int]] = {}
    for item_id, old_path in missing.items():
        if item_id in shas:
            by_key.setdefault((known[old_path][1], shas[item_id]), []).append(item_id)
    sizes = {k[0] for k in by_key}
    moves = []
    for f in new:
        if f.size not in sizes:
            continue
        try:
            digest = sha256_file(f.path)
        except OSError:
            continue  # the decode step will report it
        ids = by_key.get((f.size, digest))
        if ids:
            moves.append((f, ids.pop()))
    return moves


def _indexed_files(store: Store) -> dict[str, tuple[int, int | None, float | None]]:
    """The catalog's images keyed like the scan's files: by the path os functions take (catalog paths with
    escapes, i.e. names that are not UTF-8 or hold a backslash, decoded)."""
    known = store.image_files()
    if any("\\" in p for p in known):
        known = {from_catalog(p): v for p, v in known.items()}
    return known


def default_batch_size(device: str) -> int:
    return DEFAULT_CUDA_BATCH_SIZE if device == "cuda" else DEFAULT_BATCH_SIZE


def index_paths(store: Store, encoder: Encoder | ModelOnDemand, roots: Sequence[str],
                batch_size: int | None = None, workers: int | None = None, progress: ProgressFn | None = None,
                commit_every: int = COMMIT_EVERY, thumbnails: bool = True,
                gpu_decode: bool | None = None, embed: EmbedFn | None = None) -> IndexReport:
    """Bring the index in line with `roots`: embed new and changed images, re-path moved ones (same content:
    the vector is kept), drop deleted ones. A re-run over an unchanged library only stats files.

    `encoder` may be a ModelOnDemand: the model is loaded only when a first image is decoded for embedding,
    so an unchanged re-run (or one whose only new files are broken) never loads it. `gpu_decode` None
    decodes JPEGs with nvJPEG when the model runs on CUDA; True forces that batched path on the encoder's
    device whatever it is (on the CPU only to test it), False never uses it. `embed` (e.g. on Ray) replaces
    the local decode-and-embed step; the scan, the diff, moves and removals stay the same.
    """
    started = time.perf_counter()
    found = scan(roots)
    known = _indexed_files(store)
    todo = plan(found.files, known, roots)
    old_shas = store.image_shas([old for _, old in todo.changed] + list(todo.missing))
    moves = _find_moves(todo.new, todo.missing, known, old_shas)
    if moves:
        store.move_images([(old_id, to_catalog(f.path), f.size, f.mtime) for f, old_id in moves])
        moved_paths = {f.path for f, _ in moves}
        todo.new = [f for f in todo.new if f.path not in moved_paths]
        for _, old_id in moves:
            todo.missing.pop(old_id, None)
    work: list[tuple[FileEntry, int | None]] = [(f, None) for f in todo.new] + list(todo.changed)
    report = IndexReport(unchanged=todo.unchanged, skipped=list(found.skipped), total=len(work),
                         moved=len(moves), kept=todo.kept)
    if work:
        # Files that failed before are retried; when nothing else is new, the model loads only if one of
        # them now decodes (no background load that a run of broken files would pay for).
        failed_before = {p for p, _ in store.skipped()}
        if embed is not None:
            embed(store, work, report, progress)
        else:
            if isinstance(encoder, ModelOnDemand) and any(to_catalog(f.path) not in failed_before for f, _ in work):
                encoder.prefetch()  # the first images decode while the weights load
            _embed(store, encoder, work, report, batch_size or default_batch_size(encoder.device), workers,
                   progress, commit_every, thumbnails, gpu_decode)
    else:
        store.record_skipped(report.skipped)
    report.removed = store.remove_images(todo.missing)
    stale = set(old_shas.values())
    prune_thumbs(store.home, stale - store.shas_in_use(stale))
    if stale:
        compact_tokens(store)
    if progress:
        progress(len(work), len(work))
    report.seconds = time.perf_counter() - started
    report.images_per_second = len(work) / report.seconds if report.seconds > 0 and work else 0.0
    return report


DECODE_SAMPLE = 8  # decodes timed on their own before a run picks its decode workers


def choose_workers(decode_s: float, model_s: float, cores: int) -> int:
    """Decode processes for the rest of a run, from one image's measured decode time (one core) and model
    time (all cores' threads): in-process decoding costs decode + model per image; w workers decode w at a
    time while the model runs on the cores they leave (its time assumed to grow as cores / threads, which
    is pessimistic, and decoding 10% slower for the hand-over), so a worker pays only when decoding would
    otherwise hold the model up. Ties keep the fewer processes."""
    best, best_rate = 0, 1.0 / max(decode_s + model_s, 1e-9)
    for w in range(1, min(8, cores - 1) + 1):
        model_w = model_s * cores / (cores - w)
        rate = min(w / max(1.1 * decode_s, 1e-9), 1.0 / max(model_w, 1e-9))
        if rate > best_rate * 1.05:
            best, best_rate = w, rate
    return best


def _embed(store: Store, source: Encoder | ModelOnDemand, work: list[tuple[FileEntry, int | None]],
           report: IndexReport, batch_size: int, workers: int | None, progress: ProgressFn | None,
           commit_every: int, thumbnails: bool, gpu_decode: bool | None) -> None:
    """Decode, embed and commit `work` (files, and the id each replaces), filling `report` as it goes.

    Without a worker count (the default, on the CPU) the first batch is decoded in this process and
    embedded with every core, timing both stages, and the rest of the run uses the worker count
    `choose_workers` predicts to be fastest; a model still loading (ModelOnDemand) loads meanwhile."""
    from indexer.decode import Failed, decode_entry, decode_stream
    from indexer.gpu_stream import default_gpu_workers, gpu_decode_stream, stack_pixels, wants_gpu_decode

    replaces = {f.path: old for f, old in work}
    device, pre = source.device, source.preprocess
    use_gpu = wants_gpu_decode(device, gpu_decode)
    nworkers: int | None = default_gpu_workers() if use_gpu and workers is None else workers
    ready: list[tuple[Encoder, token_cache.TokenCacheWriter | None]] = []

    def model() -> tuple[Encoder, token_cache.TokenCacheWriter | None]:
        """The encoder and the reranker's token-cache writer, made when the first batch needs them."""
        if not ready:
            encoder = source if isinstance(source, Encoder) else source()
            if not use_gpu and nworkers is not None:
                _share_cores(device, nworkers)  # after loading: loading sets the model's threads
            ready.append((encoder, token_cache.writer_for(store.home, encoder, "image", commit_every)))
        return ready[0]

    if isinstance(source, ModelOnDemand) and source.guessed and nworkers is not None:
        model()  # a guessed preprocessing is settled before workers decode with it
        pre = ready[0][0].preprocess

    def flush_tokens() -> None:  # the token segment is durable before the catalog commit of its images
        if ready and ready[0][1] is not None:
            ready[0][1].flush()

    committer = _Committer(store, commit_every, before_flush=flush_tokens)
    batch: list[Decoded] = []
    done = 0

    def encode_batch() -> None:
        nonlocal done
        if not batch:
            return
        encoder, tokens = model()
        pixels = stack_pixels([d.pixels for d in batch])
        if tokens is not None:  # one vision pass gives the vectors and the reranker's tokens
            vectors, toks = encoder.encode_pixels_with_tokens(pixels)
            tokens.add([d.sha256 for d in batch], toks)
        else:
            vectors = encoder.encode_pixels(pixels)
        record_image_precision(store, encoder.precision)  # recorded before the commit of what it embedded
        records = [ImageRecord(path=to_catalog(d.entry.path), sha256=d.sha256, bytes=d.entry.size,
                               mtime=d.entry.mtime, width=d.width, height=d.height, meta=d.meta) for d in batch]
        committer.add(records, vectors, [replaces[d.entry.path] for d in batch])
        done += len(batch)
        batch.clear()

    def take(res: Decoded | Failed, encode: bool = True) -> None:
        nonlocal done
        if isinstance(res, Failed):
            report.skipped.append((to_catalog(res.entry.path), res.reason))
            done += 1
        else:
            batch.append(res)
            if encode and len(batch) >= batch_size:
                encode_batch()
        if progress:
            progress(done, len(work))

    home = str(store.home) if thumbnails else None
    files = [f for f, _ in work]
    stream: Iterator[Decoded | Failed] | None = None
    try:
        if nworkers is None:  # measure both stages on the first batch, then pick the worker count
            clean = [0.0, 0.0]  # seconds and count of decodes timed while no model was loading beside them

            def timed(f: FileEntry) -> None:
                busy = isinstance(source, ModelOnDemand) and source.loading
                t0 = time.perf_counter()
                take(decode_entry(f, pre, home), encode=False)
                if not busy and not (isinstance(source, ModelOnDemand) and source.loading):
                    clean[0] += time.perf_counter() - t0
                    clean[1] += 1

            head, files = files[:batch_size], files[batch_size:]
            for f in head:
                timed(f)
            ahead = 0  # while the weights still load, decoding goes on: that time is not lost
            while isinstance(source, ModelOnDemand) and source.loading and ahead < len(files):
                timed(files[ahead])
                ahead += 1
            files = files[ahead:]
            model()  # waits for the weights, so the timing below is the model's alone
            if ready[0][0].preprocess != pre:  # a new index's guessed preprocessing was wrong: decode again
                pre = ready[0][0].preprocess
                redo, batch[:], clean[:] = [d.entry for d in batch], [], [0.0, 0.0]
                for f in redo:
                    timed(f)
            extra = min(DECODE_SAMPLE, len(files)) if clean[1] < DECODE_SAMPLE else 0
            for f in files[:extra]:  # decoding beside a loading model ran slow: time a few on their own
                timed(f)
            files = files[extra:]
            decode_s = clean[0] / clean[1] if clean[1] else 0.0
            decoded, batch[:] = list(batch), batch[:batch_size]
            n = len(batch)
            t1 = time.perf_counter()
            encode_batch()
            model_s = (time.perf_counter() - t1) / max(1, n)
            for start in range(batch_size, len(decoded), batch_size):  # what was decoded while loading
                batch[:] = decoded[start:start + batch_size]
                encode_batch()
            nworkers = choose_workers(decode_s, model_s, usable_cores()) if files and n else 0
            report.stages = {**({"decode_ms": round(decode_s * 1000, 2)} if clean[1] else {}),
                             "model_ms": round(model_s * 1000, 2)}  # decode_ms: unless all decoded beside the load
            _share_cores(device, nworkers)
        report.workers = nworkers
        if use_gpu:
            stream = gpu_decode_stream(files, pre, device, nworkers, home=home, batch=batch_size)
        else:
            if ready:
                _share_cores(device, nworkers)
            lookahead = max(4, batch_size // (4 * max(1, nworkers)) + 2)  # a batch decoded ahead of the model
            stream = decode_stream(files, pre, nworkers, home=home, lookahead=lookahead)
        for res in stream:
            take(res)
        encode_batch()
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stops decode workers (and the GPU decoder thread) before committing
        # Whatever was embedded is committed, also on Ctrl-C: the next run resumes after it.
        committer.flush()
        store.record_skipped(report.skipped)
        report.added, report.updated = committer.added, committer.updated


def compact_tokens(store: Store, min_dead: int = 64) -> int:
    """Drop rerank-token entries of images no longer indexed once they are a quarter of the cache or more
    (a rewrite is O(cache), so it is not done for every deletion). Returns how many entries went."""
    from retrieval.rerank.token_cache import TokenCache, compact

    fp = store.fingerprint
    if fp is None:
        return 0
    cache = TokenCache.open(store.home, fp, "image")
    total = len(cache)
    if total == 0:
        return 0
    live = store.all_image_shas()
    dead = total - sum(1 for k in live if k in cache)
    if dead < max(min_dead, total // 4):
        return 0
    return total - compact(store.home, fp, "image", live)


def ids_at(store: Store, paths: Sequence[str]) -> set[int]:
    """Ids of the indexed images at or under the given paths: what `remove_paths` drops (for a preview)."""
    ids: set[int] = set()
    for p in paths:
        ids.update(store.ids_under(to_catalog(os.path.abspath(os.path.expanduser(p)))))
    return ids


def remove_paths(store: Store, paths: Sequence[str]) -> int:
    """Drop every indexed image at or under the given paths (files need not exist any more; names that are
    not UTF-8 come as os.fsdecode gives them, and are matched by their catalog path)."""
    ids = ids_at(store, paths)
    shas = set(store.image_shas(ids).values())
    n = store.remove_images(ids)
    prune_thumbs(store.home, shas - store.shas_in_use(shas))
    compact_tokens(store)
    return n


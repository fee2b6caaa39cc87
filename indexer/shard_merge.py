"""The driver side of a `--ray` run: reuse the shards a killed run left, embed the rest on Ray, and merge
every shard into the store through the same committer (and so the same commit point) as a local run.

Resume rules: a shard whose files the plan still wants, with the same size and mtime, is merged instead of
embedded again; a shard none of whose files are wanted any more was merged before (its images are in the
catalog now) and is deleted; temp files of workers killed mid-write are swept. A shard is deleted only
after the commit that holds its images, so a kill at any moment loses at most work, never data.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from indexer import distributed
from indexer.distributed import RaySettings
from indexer.pipeline import EmbedFn, IndexReport, ProgressFn, _Committer
from indexer.scan import FileEntry
from indexer.shards import complete_shards, folder_for, read_shard, sweep_temp
from retrieval.config import COMMIT_EVERY
from retrieval.model.recorded import record_image_precision
from retrieval.model.spec import ModelSpec
from retrieval.rerank.token_cache import TokenCacheWriter
from retrieval.store import ImageRecord, Store
from retrieval.store.bulk import ann_built_once
from retrieval.store.paths import to_catalog

VANISHED = "file vanished during the run"


def _read_problem(path: str) -> str | None:
    """Why this file cannot be read (before anything is sent to Ray), or None."""
    if not os.access(path, os.R_OK):
        return "permission denied" if os.path.exists(path) else VANISHED
    return None


def _ray_can_carry(path: str) -> bool:
    """Whether Ray Data can be handed this path: its file reader takes text paths, so a name that is not
    valid UTF-8 (lone surrogates from os.fsdecode) cannot go; the driver embeds those itself."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Merger:
    """Folds shards into the store: rows the plan wants become catalog rows and vectors, failures become
    skipped files; merged shard files are deleted once a commit holds their images."""

    def __init__(self, store: Store, work: list[tuple[FileEntry, int | None]], report: IndexReport,
                 commit_every: int) -> None:
        self.store = store
        self.report = report
        self.todo = {f.path: (f, old) for f, old in work}
        self.pending = set(self.todo)
        self.tokens: TokenCacheWriter | None = None
        self.committer = _Committer(store, commit_every, before_flush=self._flush_tokens)
        self.merged: list[Path] = []  # shard files whose images wait for the next commit

    def _flush_tokens(self) -> None:
        if self.tokens is not None:
            self.tokens.flush()

    def take(self, path: Path, fresh: bool) -> int:
        """Merge the wanted part of one shard; `fresh` shards (written by this run) match by path alone, as
        the scan's size and mtime are recorded whatever the worker saw. Returns files accounted for."""
        shard = read_shard(path)
        if shard is None:
            path.unlink(missing_ok=True)  # damaged: its files are embedded again
            return 0

        def wanted(p: str, size: int, mtime: float) -> bool:
            hit = self.todo.get(p)
            return p in self.pending and hit is not None and (fresh or (hit[0].size, hit[0].mtime) == (size, mtime))

        use = [i for i, r in enumerate(shard.rows) if wanted(r.path, r.size, r.mtime)]
        bad = [f for f in shard.failed if wanted(f.path, f.size, f.mtime)]
        if not use and not bad:
            path.unlink(missing_ok=True)  # merged by an earlier run (or wholly stale)
            return 0
        self.report.skipped += [(to_catalog(f.path), f.reason) for f in bad]
        self.pending -= {f.path for f in bad}
        self.merged.append(path)
        if use:
            rows = [shard.rows[i] for i in use]
            entries = [self.todo[r.path][0] for r in rows]
            records = [ImageRecord(path=to_catalog(e.path), sha256=r.sha256, bytes=e.size, mtime=e.mtime,
                                   width=r.width, height=r.height, meta=r.meta) for e, r in zip(entries, rows,
                                                                                               strict=True)]
            fp = self.store.fingerprint
            if shard.tokens is not None and fp is not None:
                if self.tokens is None:
                    self.tokens = TokenCacheWriter(self.store.home, fp, "image", self.committer.commit_every)
                self.tokens.add([r.sha256 for r in rows], shard.tokens[use])
            record_image_precision(self.store, shard.precision)  # before the commit of what it embedded
            self.pending -= {r.path for r in rows}
            self.committer.add(records, shard.vectors[use], [self.todo[r.path][1] for r in rows])
            if not self.committer.records:  # that add committed: its shards are no longer needed
                self._drop_merged()
        return len(use) + len(bad)

    def _drop_merged(self) -> None:
        for p in self.merged:
            p.unlink(missing_ok=True)
        self.merged = []

    def finish(self) -> None:
        """Commit what is merged, then delete its shards (also after an interruption)."""
        self.committer.flush()
        self._drop_merged()
        self.report.added, self.report.updated = self.committer.added, self.committer.updated


def ray_embedder(settings: RaySettings, spec: ModelSpec, checkpoint_sha: str | None, thumbnails: bool = True,
                 commit_every: int = COMMIT_EVERY,
                 on_start: Callable[[float], None] | None = None) -> EmbedFn:
    """An `index_paths` embed step that runs on Ray. `on_start` gets Ray's start-up (or join) time in seconds.

    A run that at least doubles the index holds the ANN upkeep and builds the ANN index once at the end
    (retrieval/store/bulk.py): trained once on a sample of everything merged, instead of at every stage."""

    def embed(store: Store, work: list[tuple[FileEntry, int | None]], report: IndexReport,
              progress: ProgressFn | None) -> None:
        fp = store.fingerprint
        if fp is None:
            raise RuntimeError("record the model before embedding on Ray")
        folder = folder_for(store.home, fp)
        sweep_temp(folder)  # no worker of this run has started: every temp file is a dead one's
        merger = _Merger(store, work, report, commit_every)
        bulk = ann_built_once(store) if len(work) >= store.count("image") else nullcontext()
        with bulk:
            try:
                _merge_all(merger, folder, settings, spec, checkpoint_sha, thumbnails, on_start, progress)
            finally:
                merger.finish()
                store.record_skipped(report.skipped)
                report.workers = None
        _remove_if_empty(folder)

    return embed


def _merge_all(merger: _Merger, folder: Path, settings: RaySettings, spec: ModelSpec, checkpoint_sha: str | None,
               thumbnails: bool, on_start: Callable[[float], None] | None, progress: ProgressFn | None) -> None:
    """Merge a killed run's shards, then embed the rest on Ray and merge its shards as they come."""
    store, report = merger.store, merger.report
    total = len(merger.todo)
    done = sum(merger.take(path, fresh=False) for path in list(complete_shards(folder)))
    send: list[FileEntry] = []
    here: list[FileEntry] = []
    for p in sorted(merger.pending):
        why = _read_problem(p)
        if why:
            report.skipped.append((to_catalog(p), why))
            merger.pending.discard(p)
            done += 1
        else:
            (send if _ray_can_carry(p) else here).append(merger.todo[p][0])
    if progress:
        progress(done, total)
    home = str(store.home) if thumbnails else None
    if here and store.fingerprint is not None:  # a few names Ray cannot carry: the actors' code, in this process
        for path in distributed.embed_here(here, settings, spec, checkpoint_sha, store.fingerprint, folder, home):
            done += merger.take(path, fresh=True)
            if progress:
                progress(done, total)
    if send and store.fingerprint is not None:
        t0 = time.perf_counter()
        started = distributed.connect(settings.address)
        try:
            if on_start:
                on_start(time.perf_counter() - t0)
            stream = distributed.embed_files(send, settings, spec, checkpoint_sha, store.fingerprint, folder, home)
            try:
                for path in stream:
                    done += merger.take(path, fresh=True)
                    if progress:
                        progress(done, total)
            finally:
                stream.close()  # stops the Ray Data execution (and its actors) now, also on an error
        finally:
            if started:
                import ray

                ray.shutdown()
    for p in sorted(merger.pending):  # Ray (or the driver) found no such file any more
        report.skipped.append((to_catalog(p), VANISHED))
    merger.pending.clear()


def _remove_if_empty(folder: Path) -> None:
    for p in (folder, folder.parent):
        try:
            p.rmdir()
        except OSError:
            return

"""Decoding in worker processes: bounded look-ahead, one failure per file, never a crashed run.

Workers import only Pillow and numpy (through retrieval.media.decode), so they start fast and stay small.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexer.scan import FileEntry
from retrieval.errors import DecodeError
from retrieval.fsutil import sha256_hex
from retrieval.media.decode import Preprocess, decode_for_model, is_raw_name
from retrieval.media.photo_meta import PhotoMeta
from retrieval.media.thumbnails import write_thumb


@dataclass(frozen=True)
class Decoded:
    entry: FileEntry
    pixels: np.ndarray  # or a uint8 torch tensor on the GPU (GPU decode path)
    width: int
    height: int
    meta: PhotoMeta
    sha256: str


@dataclass(frozen=True)
class Failed:
    entry: FileEntry
    reason: str


def decode_entry(entry: FileEntry, pre: Preprocess, home: str | None = None) -> Decoded | Failed:
    """Read, hash and decode one file; every problem becomes a Failed with a one-line reason.

    With `home`, the file's thumbnail is written there too (from the same decode).
    """
    try:
        with open(entry.path, "rb") as f:
            data = f.read()
    except PermissionError:
        return Failed(entry, "permission denied")
    except OSError as e:
        return Failed(entry, f"cannot read: {e.strerror or e}")
    if not data:
        return Failed(entry, "empty file (0 bytes)")
    return decode_data(entry, data, pre, home)


def decode_data(entry: FileEntry, data: bytes, pre: Preprocess, home: str | None = None) -> Decoded | Failed:
    """The decode half of `decode_entry`, for callers that already read the file (the GPU path)."""
    sha = sha256_hex(data)
    try:
        d = decode_for_model(data, pre, raw=is_raw_name(entry.path), thumbnail=home is not None)
    except DecodeError as e:
        return Failed(entry, str(e))
    except MemoryError:
        return Failed(entry, "out of memory while decoding")
    except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not stop the run
        return Failed(entry, f"cannot decode: {type(e).__name__}: {e}")
    if home is not None and d.thumbnail:
        try:
            write_thumb(home, sha, d.thumbnail)
        except OSError:
            pass  # thumbnails are a cache: the page and the reranker make one from the original
    return Decoded(entry, d.pixels, d.width, d.height, d.meta, sha)


Task = Callable[[FileEntry, Preprocess, "str | None"], Any]


def _decode_chunk(entries: Sequence[FileEntry], pre: Preprocess, home: str | None,
                  task: Task = decode_entry) -> list:
    return [task(e, pre, home) for e in entries]


def _chunks(items: Sequence[FileEntry], size: int) -> Iterator[list[FileEntry]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def decode_stream(entries: Sequence[FileEntry], pre: Preprocess, workers: int, chunk: int = 4,
                  lookahead: int = 4, home: str | None = None, task: Task = decode_entry
                  ) -> Iterator[Decoded | Failed]:
    """Yield decode results in input order; `workers=0` decodes in this process.

    `task` (a module-level function, as workers import it) replaces `decode_entry` per file; the GPU path
    runs its header probe this way and keeps the same crash handling.

    At most workers*lookahead chunks are in flight, so memory stays bounded however fast decoding is.
    A worker that dies (a decoder crash on a hostile file) costs only the files of its chunk, which are
    retried one by one; a file that kills a worker again is reported as failed.
    """
    if workers <= 0:
        for e in entries:
            yield task(e, pre, home)
        return
    ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    todo = _chunks(entries, chunk)
    pending: deque[tuple[list[FileEntry], Future]] = deque()

    def submit_next() -> None:
        nxt = next(todo, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(_decode_chunk, nxt, pre, home, task)))

    try:
        for _ in range(workers * lookahead):
            submit_next()
        while pending:
            group, fut = pending.popleft()
            try:
                results = fut.result()
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
                results = list(_retry_alone(group, pre, ctx, home, task))
                pool, pending = _resubmit(pool, pending, pre, home, task)
            yield from results
            submit_next()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _retry_alone(group: Iterable[FileEntry], pre: Preprocess, ctx, home: str | None,
                 task: Task = decode_entry) -> Iterator[Decoded | Failed]:
    for e in group:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as solo:
            try:
                yield solo.submit(task, e, pre, home).result()
            except BrokenProcessPool:
                yield Failed(e, "the image decoder crashed on this file")


def _resubmit(pool: ProcessPoolExecutor, pending: deque, pre: Preprocess, home: str | None,
              task: Task = decode_entry) -> tuple[ProcessPoolExecutor, deque]:
    fresh: deque = deque()
    for group, _ in pending:
        fresh.append((group, pool.submit(_decode_chunk, group, pre, home, task)))
    return pool, fresh

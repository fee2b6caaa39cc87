"""Decoding for indexing on a GPU: probe in worker processes, decode JPEGs in batches on the GPU.

Worker processes read, hash and probe each file (headers and EXIF: the CPU-heavy part) and fully decode
on the CPU whatever the GPU must not take (see retrieval/gpu_decode.py). A decoder thread re-reads the
JPEGs (page cache), decodes them in batches with nvJPEG on its own CUDA stream, and hands ordered results
to the indexing loop, so decoding overlaps the model's work on the default stream. A file the GPU fails
on goes through the CPU decoder, so bad files are skipped with the CPU path's reasons.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexer.decode import Decoded, Failed, decode_data, decode_entry, decode_stream
from indexer.scan import FileEntry
from retrieval.config import MAX_IMAGE_PIXELS
from retrieval.fsutil import sha256_hex
from retrieval.hardware import usable_cores
from retrieval.media.decode import Preprocess, is_raw_name
from retrieval.media.gpu_decode import DEFAULT_BATCH_PIXELS, JpegProbe, decode_jpegs, probe_jpeg
from retrieval.media.thumbnails import write_thumb

PROBE_CHUNK = 16  # files per worker task: probing is fast, so IPC is amortised over several


@dataclass(frozen=True)
class GpuJob:
    """A file the GPU will decode: what the worker learnt from it (the bytes are read again later)."""

    entry: FileEntry
    sha256: str
    nbytes: int
    probe: JpegProbe


@dataclass
class GpuStats:
    """Where files were decoded; the benchmark and tests read it."""

    gpu: int = 0
    cpu: int = 0
    gpu_failed: int = 0  # taken by the GPU path, then decoded (or refused) by the CPU path


def probe_entry(entry: FileEntry, pre: Preprocess, home: str | None = None) -> Decoded | Failed | GpuJob:
    """Worker task: a GpuJob for a JPEG the GPU can take, else the CPU path's own result for the file."""
    try:
        with open(entry.path, "rb") as f:
            data = f.read()
    except OSError:
        return decode_entry(entry, pre, home)  # gives the CPU path's exact reason
    if not data or is_raw_name(entry.path):
        return decode_data(entry, data, pre, home) if data else decode_entry(entry, pre, home)
    probe = probe_jpeg(data, pre, MAX_IMAGE_PIXELS)
    if probe is None:
        return decode_data(entry, data, pre, home)
    return GpuJob(entry, sha256_hex(data), len(data), probe)


def default_gpu_workers() -> int:
    """Probe processes: EXIF parsing costs 0.1-0.5 ms a file in Python, so thousands of files a second need
    most cores; two are left for the decoder thread and the model's launch loop."""
    return max(1, min(16, usable_cores() - 2))


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class _Decoder:
    """The decoder thread's state: turns the ordered probe stream into ordered lists of results."""

    def __init__(self, pre: Preprocess, device: Any, home: str | None, batch_pixels: int,
                 stats: GpuStats) -> None:
        import torch

        self.pre, self.home, self.stats = pre, home, stats
        self.device = torch.device(device)
        self.batch_pixels = batch_pixels
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.readers = ThreadPoolExecutor(max(2, min(8, usable_cores())), thread_name_prefix="crossmodal-read")

    def close(self) -> None:
        self.readers.shutdown(wait=True, cancel_futures=True)

    def flush(self, buf: list[Any]) -> list[Decoded | Failed]:
        import torch

        slots = [k for k, x in enumerate(buf) if isinstance(x, tuple)]
        jobs: list[GpuJob] = [buf[k][0] for k in slots]
        datas = [buf[k][1].result() for k in slots]
        ok = [k for k, (job, data) in enumerate(zip(jobs, datas, strict=True))
              if data is not None and len(data) == job.nbytes]  # changed since probed: CPU path re-reads
        imgs: list[Any] = [None] * len(jobs)
        if ok:
            ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
            with ctx:
                got = decode_jpegs([datas[k] for k in ok], [jobs[k].probe for k in ok], self.pre, self.device,
                                   thumbnails=self.home is not None, batch_pixels=self.batch_pixels)
            if self.stream is not None:
                self.stream.synchronize()  # results are complete before another stream reads them
            for k, img in zip(ok, got, strict=True):
                imgs[k] = img
        out: list[Decoded | Failed] = []
        by_slot = dict(zip(slots, zip(jobs, imgs, strict=True), strict=True))
        for k, x in enumerate(buf):
            if k not in by_slot:
                self.stats.cpu += 1
                out.append(x)
                continue
            job, img = by_slot[k]
            if img is None:
                self.stats.gpu_failed += 1
                out.append(decode_entry(job.entry, self.pre, self.home))
                continue
            self.stats.gpu += 1
            if self.home is not None and img.thumbnail:
                try:
                    write_thumb(self.home, job.sha256, img.thumbnail)
                except OSError:
                    pass  # a cache: remade from the original when missing
            w, h = job.probe.upright
            out.append(Decoded(job.entry, img.pixels, w, h, job.probe.meta, job.sha256))
        return out


_END = object()


def gpu_decode_stream(entries: Sequence[FileEntry], pre: Preprocess, device: Any, workers: int,
                      home: str | None = None, batch: int = 512, batch_pixels: int = DEFAULT_BATCH_PIXELS,
                      stats: GpuStats | None = None, prefetch: int = 2) -> Iterator[Decoded | Failed]:
    """Yield decode results in input order, like decode_stream; GPU-decoded pixels are device tensors.

    At most `prefetch` decoded batches wait for the consumer, and one batch of file bytes is in memory,
    so memory stays bounded. Stopping early (an exception or Ctrl-C in the consumer) stops the thread and
    the worker processes before this returns.
    """
    stats = stats if stats is not None else GpuStats()
    out: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    lookahead = max(4, batch // (PROBE_CHUNK * max(1, workers)) + 2)

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        dec = None
        try:
            dec = _Decoder(pre, device, home, batch_pixels, stats)
            buf: list[Any] = []
            pixels = 0
            probes = decode_stream(entries, pre, workers, chunk=PROBE_CHUNK, lookahead=lookahead, home=home,
                                   task=probe_entry)
            try:
                for item in probes:
                    if stop.is_set():
                        return
                    if isinstance(item, GpuJob):
                        buf.append((item, dec.readers.submit(_read, item.entry.path)))
                        pixels += item.probe.width * item.probe.height
                    else:
                        buf.append(item)
                    if len(buf) >= batch or pixels >= batch_pixels:
                        if not put(dec.flush(buf)):
                            return
                        buf, pixels = [], 0
            finally:
                probes.close()  # shuts the worker pool down, also when stopping early
            if buf and not put(dec.flush(buf)):
                return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(e)
        finally:
            if dec is not None:
                dec.close()

    thread = threading.Thread(target=produce, name="crossmodal-gpu-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            for res in item:
                if isinstance(res, Decoded) and not isinstance(res.pixels, np.ndarray):
                    _hold_for_current_stream(res.pixels)
                yield res
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                out.get_nowait()
        thread.join()


def _hold_for_current_stream(t: Any) -> None:
    """The tensor was made on the decoder's stream; tell the allocator the consumer's stream uses it too,
    or its memory could be handed back to the decoder while the model still reads it."""
    if getattr(t, "is_cuda", False):
        import torch

        t.record_stream(torch.cuda.current_stream(t.device))


def stack_pixels(pixels: Sequence[Any]) -> Any:
    """Stack a batch of (H, W, 3) uint8 images: numpy when all are numpy (the CPU path), else one tensor on
    the GPU images' device (CPU-decoded fallbacks are copied up)."""
    if all(isinstance(p, np.ndarray) for p in pixels):
        return np.stack(pixels)
    import torch

    device = next(p.device for p in pixels if not isinstance(p, np.ndarray))
    return torch.stack([torch.from_numpy(p).to(device) if isinstance(p, np.ndarray) else p for p in pixels])


def wants_gpu_decode(device: str, requested: bool | None) -> bool:
    """None (auto): on when the model runs on CUDA and torchvision has nvJPEG; True/False as asked."""
    if requested is not None:
        return requested
    if device != "cuda":
        return False
    from retrieval.hardware import nvjpeg_available

    return nvjpeg_available()

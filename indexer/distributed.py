"""Embedding on Ray Data: files read as bytes, decoded and embedded in actors that hold the model, written
as shard files (indexer/shards.py) that the driver merges at the index's one commit point.

Why `read_binary_files` and not `read_images`: Ray's image reader skips WebP/HEIC/RAW and ignores EXIF
rotation; here each actor decodes with the project's own decode path (retrieval/media/decode.py through
indexer/decode.py), so formats, pixel caps and bad-file reasons are those of a local run. A bad file becomes
a failure row in its shard, never an exception: Ray's retries are left for lost workers and machines.

Ray is an optional extra (`pip install 'crossmodal[cluster]'`), imported only here and only when `--ray` is
given.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.scan import FileEntry
from indexer.shards import Shard, ShardFailure, ShardRow, write_shard
from retrieval.errors import UserError
from retrieval.model.spec import Fingerprint, ModelSpec

INSTALL = "pip install 'crossmodal[cluster]'"
READ_CPUS = 0.25  # a read task mostly waits on I/O; it must not hold a core an actor needs


class RayMissing(UserError):
    """--ray was given but Ray Data (or pyarrow) is not installed."""


def import_ray() -> Any:
    """Ray and Ray Data, or one actionable line."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayMissing(f"--ray needs Ray Data and pyarrow: {INSTALL}") from None
    return ray


@dataclass(frozen=True)
class RaySettings:
    """How a `--ray` run embeds: where Ray runs, how many model actors, and the batch sizes."""

    address: str = "auto"  # "auto": start a local Ray instance; else a cluster address (ray://host:10001, ...)
    actors: int | None = None  # model actors (None: one per GPU, else one)
    shard_size: int = 256  # images per shard file (one actor call)
    batch_size: int | None = None  # images per model call inside an actor (None: the device's default)
    progress: bool = False  # Ray Data's progress bars on stderr


def connect(address: str) -> bool:
    """Join the cluster at `address`, or start a local Ray for "auto"; True when this call started Ray.

    An already initialised Ray (a test session, a notebook) is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance on loopback needs no token
    # Ray's C++ core logs a warning per actor pool that Ray Data puts constructor arguments in the object
    # store (ray#53727): harmless here (the arguments are small and re-sent), and noise on a user's terminal.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    if address == "auto":
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    else:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    return True


class ShardEmbedder:
    """The callable class each Ray actor holds: loads the model once, then turns a batch of file bytes into
    one shard file. Constructed by Ray Data from `fn_constructor_kwargs`."""

    def __init__(self, spec: ModelSpec, checkpoint_sha: str | None, fingerprint: str, folder: str,
                 thumbs_home: str | None, batch_size: int | None, threads: int) -> None:
        import torch

        from retrieval.config import DEFAULT_BATCH_SIZE, DEFAULT_CUDA_BATCH_SIZE
        from retrieval.model.torch_encoder import load_encoder

        if spec.device in ("auto", "cpu") and threads > 0:
            torch.set_num_threads(threads)
        self.encoder = load_encoder(spec, checkpoint_sha=checkpoint_sha)
        recorded = Fingerprint.from_json(fingerprint)
        if not recorded.same_model(self.encoder.fingerprint):
            raise UserError(f"the actor loaded {self.encoder.fingerprint.describe()}, not the index's "
                            f"{recorded.describe()}")
        self.folder = Path(folder)
        self.home = thumbs_home
        default = DEFAULT_CUDA_BATCH_SIZE if self.encoder.device == "cuda" else DEFAULT_BATCH_SIZE
        self.batch_size = max(1, batch_size or default)
        try:
            self.encoder.check_tokens()
            self.tokens = True
        except UserError:
            self.tokens = False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from indexer.decode import Decoded, decode_data

        good: list[Decoded] = []
        failed: list[ShardFailure] = []
        pre = self.encoder.preprocess
        for data, path in zip(batch["bytes"], batch["path"], strict=True):
            entry = _entry(str(path), len(data))
            res = decode_data(entry, bytes(data), pre, self.home) if len(data) else None
            if isinstance(res, Decoded):
                good.append(res)
            else:
                reason = "empty file (0 bytes)" if res is None else res.reason
                failed.append(ShardFailure(entry.path, entry.size, entry.mtime, reason))
        shard = self._embed(good, failed)
        path = write_shard(self.folder, shard)
        return {"shard": np.array([str(path)]), "images": np.array([len(good)]), "failed": np.array([len(failed)])}

    def _embed(self, good: Sequence[Any], failed: list[ShardFailure]) -> Shard:
        from indexer.gpu_stream import stack_pixels

        dim = self.encoder.dim
        vecs, toks = [np.zeros((0, dim), np.float32)], []
        for start in range(0, len(good), self.batch_size):
            part = good[start:start + self.batch_size]
            pixels = stack_pixels([d.pixels for d in part])
            if self.tokens:
                v, t = self.encoder.encode_pixels_with_tokens(pixels)
                toks.append(np.asarray(t, dtype=np.float32))
            else:
                v = self.encoder.encode_pixels(pixels)
            vecs.append(np.asarray(v, dtype=np.float32))
        rows = [ShardRow(d.entry.path, d.entry.size, d.entry.mtime, d.sha256, d.width, d.height, d.meta)
                for d in good]
        tokens = np.concatenate(toks) if toks else None
        return Shard(rows, np.concatenate(vecs), failed, tokens, self.encoder.precision)


def embed_here(files: Sequence[FileEntry], settings: RaySettings, spec: ModelSpec, checkpoint_sha: str | None,
               fp: Fingerprint, folder: Path, thumbs_home: str | None) -> Iterator[Path]:
    """Embed `files` in this process with the actors' own code (ShardEmbedder) and yield each shard file.

    Why: Ray Data's file reader takes text paths, so a name that is not valid UTF-8 cannot be handed to it;
    the driver embeds those few files itself (loading the model once more, only when there are any), and
    they are merged like any shard, with what a local run commits for them. Files gone since the scan are
    left out of every shard: the caller reports them."""
    embedder = ShardEmbedder(spec, checkpoint_sha, fp.to_json(), str(folder), thumbs_home, settings.batch_size,
                             threads=0)
    for start in range(0, len(files), max(1, settings.shard_size)):
        datas, paths = [], []
        for f in files[start:start + max(1, settings.shard_size)]:
            try:
                with open(f.path, "rb") as fh:
                    datas.append(fh.read())
            except OSError:
                continue
            paths.append(f.path)
        if paths:
            out = embedder({"bytes": np.array(datas, dtype=object), "path": np.array(paths, dtype=object)})
            yield Path(str(out["shard"][0]))


def _entry(path: str, nbytes: int) -> FileEntry:
    """The file as the actor found it (size and mtime after the read; the driver records the scan's)."""
    try:
        st = os.stat(path)
        return FileEntry(path, st.st_size, st.st_mtime)
    except OSError:
        return FileEntry(path, nbytes, 0.0)


def _resources(ray: Any, actors: int | None) -> tuple[int, float, float, int]:
    """(actors, GPUs per actor, CPUs per actor, torch threads per actor) for the cluster Ray sees."""
    total = ray.cluster_resources()
    gpus, cpus = int(total.get("GPU", 0)), float(total.get("CPU", 1))
    n = actors or max(1, gpus)
    if gpus:
        return n, 1.0, 1.0, 0
    per = max(0.25, min(1.0, (cpus - READ_CPUS) / n))  # reads keep a slot: actors never starve them
    nodes = max(1, len([x for x in ray.nodes() if x.get("Alive")]))
    return n, 0.0, per, max(1, int(cpus / nodes) // max(1, -(-n // nodes)))


def embed_files(files: Sequence[FileEntry], settings: RaySettings, spec: ModelSpec, checkpoint_sha: str | None,
                fp: Fingerprint, folder: Path, thumbs_home: str | None) -> Iterator[Path]:
    """Embed `files` on Ray and yield each shard file as it is written (the driver merges while actors work).

    Files Ray cannot read (vanished since the scan) are left out of every shard: the caller reports them."""
    ray = import_ray()
    import pyarrow.fs as pafs
    from ray.data import ActorPoolStrategy, DataContext

    if not files:
        return
    if not settings.progress:
        import logging

        logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = settings.progress
    ctx.print_on_execution_start = settings.progress
    n, gpus, cpus, threads = _resources(ray, settings.actors)
    ds = ray.data.read_binary_files([f.path for f in files], include_paths=True, ignore_missing_paths=True,
                                    filesystem=pafs.LocalFileSystem(), num_cpus=READ_CPUS)
    kwargs = {"spec": spec, "checkpoint_sha": checkpoint_sha, "fingerprint": fp.to_json(), "folder": str(folder),
              "thumbs_home": thumbs_home, "batch_size": settings.batch_size, "threads": threads}
    out = ds.map_batches(ShardEmbedder, fn_constructor_kwargs=kwargs, batch_size=settings.shard_size,
                         compute=ActorPoolStrategy(size=n), num_gpus=gpus, num_cpus=cpus, batch_format="numpy")
    for row in out.iter_rows():
        yield Path(str(row["shard"]))

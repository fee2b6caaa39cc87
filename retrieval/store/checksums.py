"""Checksums of the exact vector files (`vectors/<modality>-<gen>.faiss`), kept in the catalog's meta table.

Why blocks and not one hash: a whole-file hash proves damage but cannot say where, and hashing a 20 GB
memory-mapped store at every open would take seconds. Each file is cut into at most MAX_BLOCKS equal blocks
with a CRC32 each, computed while the file is written (exact.py) and recorded (`sums.<modality>`) by the same
commit that names it. Opening checks the size and every block of a small file, or the first, the last and
a few random blocks of a large one (milliseconds); `repair` checks every block, and the file's layout
(`flat_layout`) says which vectors and ids a damaged block held, so only those are dropped.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_BLOCK = 4 << 10  # a damaged block costs two 512-d vectors (files over 64 MB: size / MAX_BLOCKS)
MAX_BLOCKS = 16384
FULL_CHECK_BYTES = 16 << 20  # files up to this size are checked whole at open (a few ms)
SAMPLES = 4  # random blocks checked at open beyond the first and the last


@dataclass(frozen=True)
class FileSums:
    """What a commit recorded about the vector file it named: generation, size, block size, CRC32 per block."""

    gen: int
    size: int
    block: int
    crcs: tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps({"gen": self.gen, "size": self.size, "block": self.block,
                           "crc32": "".join(f"{c:08x}" for c in self.crcs)})

    @classmethod
    def from_json(cls, text: str | None) -> FileSums | None:
        """The recorded sums, or None (a catalog from before checksums, or a garbled value)."""
        if not text:
            return None
        try:
            raw = json.loads(text)
            hexes = raw["crc32"]
            crcs = tuple(int(hexes[i:i + 8], 16) for i in range(0, len(hexes), 8))
            return cls(int(raw["gen"]), int(raw["size"]), int(raw["block"]), crcs)
        except (ValueError, KeyError, TypeError):
            return None


def block_size(size: int) -> int:
    """Blocks of MIN_BLOCK, grown (in MIN_BLOCK steps) so a file of `size` bytes has at most MAX_BLOCKS."""
    per = -(-max(size, 1) // MAX_BLOCKS)
    return max(MIN_BLOCK, -(-per // MIN_BLOCK) * MIN_BLOCK)


class Summer:
    """CRC32 per block of a byte stream fed in arbitrary pieces."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.crcs: list[int] = []
        self.crc = 0
        self.fill = 0
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self.size += len(view)
        while len(view):
            take = min(len(view), self.block - self.fill)
            self.crc = zlib.crc32(view[:take], self.crc)
            self.fill += take
            view = view[take:]
            if self.fill == self.block:
                self.crcs.append(self.crc)
                self.crc, self.fill = 0, 0

    def done(self) -> tuple[int, ...]:
        return tuple(self.crcs + ([self.crc] if self.fill else []))


def _bad_blocks(path: Path, sums: FileSums, blocks: list[int]) -> list[int]:
    bad = []
    with open(path, "rb") as f:
        for b in blocks:
            f.seek(b * sums.block)
            if zlib.crc32(f.read(sums.block)) != sums.crcs[b]:
                bad.append(b)
    return bad


def problem_at_open(path: Path, sums: FileSums | None) -> str | None:
    """What a cheap check finds wrong with the file the catalog names (None: nothing, or nothing recorded).

    Size, then every block of a file up to FULL_CHECK_BYTES, else the first, last and SAMPLES random
    blocks, so a 20 GB store still opens in milliseconds; `repair` checks every block."""
    if sums is None:
        return None
    size = path.stat().st_size
    if size != sums.size:
        return f"is {size} bytes where {sums.size} were written"
    n = len(sums.crcs)
    if size <= FULL_CHECK_BYTES:
        blocks = list(range(n))
    else:
        blocks = sorted({0, n - 1, *random.sample(range(n), min(SAMPLES, n))})
    bad = _bad_blocks(path, sums, blocks)
    if bad:
        return f"fails its checksum (block {bad[0]} of {n}, {sums.block} bytes each)"
    return None


def damaged_spans(path: Path, sums: FileSums) -> list[tuple[int, int]] | None:
    """Byte ranges [start, end) of every block whose checksum fails; None when the size itself is wrong
    (bytes were cut off or added, so nothing in the file is where it was)."""
    if path.stat().st_size != sums.size:
        return None
    bad = _bad_blocks(path, sums, list(range(len(sums.crcs))))
    return [(b * sums.block, min((b + 1) * sums.block, sums.size)) for b in bad]


def flat_layout(size: int, d: int) -> tuple[int, int, int] | None:
    """(n, first byte of the vectors, first byte of the ids) of an exact-store file of `size` bytes.

    The faiss format of IndexIDMap2(IndexFlatIP(d)) is a header, the vector count field and n*d float32,
    then the id count field and n int64: measured from an empty index, so no faiss constant is copied.
    None when the size fits no n (a truncated or foreign file)."""
    import faiss

    empty = len(faiss.serialize_index(faiss.IndexIDMap2(faiss.IndexFlatIP(d))))
    n, rest = divmod(size - empty, 4 * d + 8)
    if size < empty or rest:
        return None
    return n, empty - 8, empty + 4 * d * n


def read_flat(path: Path, d: int) -> tuple[np.ndarray, np.ndarray, int, int] | None:
    """(ids, vectors, vectors offset, ids offset) read straight from the file's layout, without faiss: a
    file whose header faiss rejects still yields the vectors and ids its intact blocks hold."""
    layout = flat_layout(path.stat().st_size, d)
    if layout is None:
        return None
    n, at_vectors, at_ids = layout
    vectors = np.fromfile(path, dtype="<f4", count=n * d, offset=at_vectors).reshape(n, d)
    ids = np.fromfile(path, dtype="<i8", count=n, offset=at_ids)
    return ids.astype(np.int64), vectors.astype(np.float32), at_vectors, at_ids

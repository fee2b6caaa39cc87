"""A compact, content-addressed cache of token features for the reranker, written at index time.

Why: reranking looks at every candidate's tokens; re-decoding and re-encoding 32 originals (or running the
text tower over 32 captions) per query would cost far more than the 150 ms budget on a CPU. So `index` and
`add-texts` keep the tokens their one forward pass already computed, as int8 with one float32 scale per
token (symmetric absmax), cosine to the original > 0.9999:
- images: (1+P) * (d + 4) bytes, e.g. ViT-B-32: 50 * 516 = 25.8 KB; ViT-B-16: 197 * 516 = 101.7 KB;
  ViT-L-14: 257 * 772 = 198 KB per image;
- captions: (words + 1) * (d + 4) bytes, about 8 KB for a 15-token caption with ViT-B-32.

Layout: `<home>/tokens/<model key>/<image|text>/seg-<time_ns>-<pid>.data.npy` (a structured array,
memory-mapped on read) and `.keys.npy` (sha256 of the image file / of the caption text, 32 raw bytes each).
Content keys mean the cache survives moves and renames and identical items share one entry. Each file is
written as a unique `.tmp`, fsynced and renamed; the keys file goes last and is the segment's commit
marker, so a crash leaves a whole segment or none. Segment names are unique, so query processes may add
segments for entries they had to compute (older indexes, the built-in vocabulary) without the writer lock.
The indexer writes an image segment before the catalog commit of the same images. Entries of deleted
items stay until `compact`.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from retrieval.errors import TokensUnsupported
from retrieval.fsutil import atomic_file, fsync_dir
from retrieval.model.protocol import Encoder
from retrieval.model.spec import Fingerprint

_SEG = re.compile(r"^seg-(\d+)-(\d+)\.(data|keys)\.npy$")
VERSION = "v1"
KINDS = ("image", "text")


def cache_dir(home: str | Path, fp: Fingerprint, kind: str = "image") -> Path:
    """Per model and kind, so tokens of another model can never be mixed in."""
    if kind not in KINDS:
        raise ValueError(kind)
    key = hashlib.sha256(f"{fp.model}|{fp.weights}|{fp.dim}|{VERSION}".encode()).hexdigest()[:16]
    return Path(home) / "tokens" / key / kind


def text_key(text: str) -> str:
    """The key of a caption: sha256 of its UTF-8 text (what the catalog stores for captions)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def quantize(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float (..., L, d) -> (int8 (..., L, d), float32 scale (..., L)), symmetric per token."""
    tokens = np.asarray(tokens, dtype=np.float32)
    scale = np.abs(tokens).max(axis=-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(tokens / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[..., None].astype(np.float32)


def _fsync_write(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as f:
        np.save(f, array, allow_pickle=False)


def _segments(folder: Path) -> dict[tuple[int, int], set[str]]:
    """(time_ns, pid) -> {'data', 'keys'} present; sorted keys give the write order."""
    found: dict[tuple[int, int], set[str]] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _SEG.match(p.name)
            if m:
                found.setdefault((int(m.group(1)), int(m.group(2))), set()).add(m.group(3))
    return found


def _name(seg: tuple[int, int], part: str) -> str:
    return f"seg-{seg[0]}-{seg[1]}.{part}.npy"


def write_segment(folder: Path, keys: Sequence[str], tokens: Sequence[np.ndarray]) -> tuple[int, int] | None:
    """Write one segment of (n_i, d) token arrays (padded inside to the longest; `n` records the length)."""
    if not keys:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    length = max(len(t) for t in tokens)
    dim = tokens[0].shape[-1]
    rec = np.zeros(len(keys), dtype=np.dtype([("n", "<i4"), ("s", "<f4", (length,)),
                                              ("q", "i1", (length, dim))]))
    for i, t in enumerate(tokens):
        q, s = quantize(t)
        rec["n"][i] = len(t)
        rec["s"][i, :len(t)] = s
        rec["q"][i, :len(t)] = q
    seg = (time.time_ns(), os.getpid())
    _fsync_write(folder / _name(seg, "data"), rec)
    raw = np.frombuffer(b"".join(bytes.fromhex(k) for k in keys), dtype=np.uint8).reshape(-1, 32)
    _fsync_write(folder / _name(seg, "keys"), raw)
    fsync_dir(folder)
    return seg


class TokenCache:
    """Read side: key -> dequantised token features (n, d) float32; memory-mapped, opened once per process."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._where: dict[bytes, tuple[tuple[int, int], int]] = {}
        self._data: dict[tuple[int, int], np.ndarray] = {}
        for seg, kinds in sorted(_segments(folder).items()):
            if kinds != {"data", "keys"}:
                continue  # not committed (yet)
            try:
                keys = np.load(folder / _name(seg, "keys"), allow_pickle=False)
            except (OSError, ValueError):
                continue
            for row, k in enumerate(keys):
                self._where[k.tobytes()] = (seg, row)  # later segments win

    @classmethod
    def open(cls, home: str | Path, fp: Fingerprint, kind: str = "image") -> TokenCache:
        return cls(cache_dir(home, fp, kind))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return bytes.fromhex(key) in self._where

    def _segment(self, seg: tuple[int, int]) -> np.ndarray:
        if seg not in self._data:
            self._data[seg] = np.load(self.folder / _name(seg, "data"), mmap_mode="r", allow_pickle=False)
        return self._data[seg]

    def get(self, keys: Sequence[str | None]) -> list[np.ndarray | None]:
        """Token features (n, d) float32 per key, None where absent."""
        out: list[np.ndarray | None] = []
        for key in keys:
            where = self._where.get(bytes.fromhex(key)) if key else None
            if where is None:
                out.append(None)
                continue
            rec = self._segment(where[0])[where[1]]
            n = int(rec["n"])
            out.append(dequantize(np.asarray(rec["q"][:n]), np.asarray(rec["s"][:n])))
        return out

    def put(self, keys: Sequence[str], tokens: Sequence[np.ndarray]) -> bool:
        """Add computed entries as a new segment (best effort: False when the folder is not writable)."""
        fresh = [(k, t) for k, t in zip(keys, tokens, strict=True) if k and k not in self]
        if not fresh:
            return True
        try:
            seg = write_segment(self.folder, [k for k, _ in fresh], [t for _, t in fresh])
        except OSError:
            return False
        for row, (k, _) in enumerate(fresh):
            self._where[bytes.fromhex(k)] = (seg, row)  # type: ignore[assignment]
        return True

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("seg-*.npy")) if self.folder.is_dir() else 0


class TokenCacheWriter:
    """Write side used by the indexer (under the index's writer lock) and by add-texts.

    `add` buffers token arrays; `flush` writes them as one segment. The pipeline flushes it before each
    catalog commit, and it flushes itself every `flush_every` entries to bound memory.
    """

    def __init__(self, home: str | Path, fp: Fingerprint, kind: str = "image", flush_every: int = 512) -> None:
        self.folder = cache_dir(home, fp, kind)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.flush_every = max(1, flush_every)
        stale = time.time_ns() - 3600 * 10**9
        for seg, kinds in _segments(self.folder).items():
            if "keys" not in kinds and seg[0] < stale:  # data of a writer that crashed long ago
                (self.folder / _name(seg, "data")).unlink(missing_ok=True)
        self._known = set(TokenCache(self.folder)._where)
        self._keys: list[str] = []
        self._tokens: list[np.ndarray] = []
        self.written = 0

    def add(self, keys: Sequence[str], tokens: Sequence[np.ndarray] | np.ndarray) -> None:
        """Buffer one (n_i, d) array per key (a (B, L, d) array is B entries of L tokens); known keys skip."""
        for key, t in zip(keys, tokens, strict=True):
            k = bytes.fromhex(key)
            if k in self._known:
                continue
            self._known.add(k)
            self._keys.append(key)
            self._tokens.append(np.asarray(t, dtype=np.float32))
        if len(self._keys) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the buffered entries as one segment."""
        if not self._keys:
            return
        write_segment(self.folder, self._keys, self._tokens)
        self.written += len(self._keys)
        self._keys, self._tokens = [], []


def compact(home: str | Path, fp: Fingerprint, kind: str, live: Iterable[str]) -> int:
    """Rewrite a cache keeping only the entries whose keys are in `live`; returns how many were kept.

    Run under the index's writer lock. The new segment is committed before the old ones go.
    """
    cache = TokenCache.open(home, fp, kind)
    old = sorted(_segments(cache.folder))
    live = sorted(k for k in set(live) if k in cache)
    tokens = cache.get(live)
    cache._data.clear()
    write_segment(cache.folder, live, [t for t in tokens if t is not None])
    for seg in old:
        (cache.folder / _name(seg, "keys")).unlink(missing_ok=True)
        (cache.folder / _name(seg, "data")).unlink(missing_ok=True)
    fsync_dir(cache.folder)
    return len(live)


def writer_for(home: str | Path, encoder: Encoder, kind: str = "image",
               flush_every: int = 512) -> TokenCacheWriter | None:
    """A cache writer for this encoder's model, or None when the model has no token features: then the
    index simply has no token cache."""
    try:
        encoder.check_tokens()
    except TokensUnsupported:
        return None
    return TokenCacheWriter(home, encoder.fingerprint, kind, flush_every)

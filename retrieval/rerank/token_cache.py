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

The cache is a cache: a segment whose files disagree with their own .npy headers (cut short by a full disk
or a copy) is removed at open, or at first read when mapping it fails, with one line through `notify`; its
entries are computed again when a query needs them. Writers remove the `.tmp` files and uncommitted data of
writers that died, and a full disk is a DiskFull naming the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import DiskFull, TokensUnsupported
from retrieval.fsutil import atomic_file, fsync_dir, is_disk_full, pid_alive
from retrieval.model.protocol import Encoder
from retrieval.model.spec import Fingerprint

_SEG = re.compile(r"^seg-(\d+)-(\d+)\.(data|keys)\.npy$")
_TMP = re.compile(r"^seg-\d+-\d+\.(?:data|keys)\.npy\.(\d+)\.tmp$")  # fsutil.atomic_file's temporary names
VERSION = "v1"
KINDS = ("image", "text")
STALE_S = 3600  # a writer finishes a segment in seconds: files of unfinished ones older than this are orphans
Notify = Callable[[str], None]


def cache_dir(home: str | Path, fp: Fingerprint, kind: str = "image") -> Path:
    """Per model and kind, so tokens of another model can never be mixed in."""
    if kind not in KINDS:
        raise ValueError(kind)
    key = hashlib.sha256(f"{fp.cache_id()}|{VERSION}".encode()).hexdigest()[:16]
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


def _npy_size(path: Path) -> tuple[int, tuple[int, ...], Any]:
    """(bytes the .npy header says the file holds, shape, dtype), reading only the header: a file cut short
    by a full disk or an interrupted copy shows up as fewer bytes than that."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        major, _ = fmt.read_magic(f)
        if major not in (1, 2):
            raise ValueError(f"unexpected .npy format version {major}")
        read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
        offset = f.tell()
    return offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, tuple(shape), dtype


def _check_segment(folder: Path, seg: tuple[int, int]) -> str | None:
    """Why a committed segment is damaged (sizes against headers, keys against data), None when it looks whole."""
    rows: list[int] = []
    for part in ("keys", "data"):
        path = folder / _name(seg, part)
        want, shape, dtype = _npy_size(path)
        have = path.stat().st_size
        if have != want:
            return f"{path.name} has {have} bytes, its header says {want}"
        if part == "keys" and (len(shape) != 2 or shape[1] != 32 or dtype != np.uint8):
            return f"{path.name} holds {dtype}{list(shape)}, not 32-byte keys"
        if part == "data" and (len(shape) != 1 or dtype.names != ("n", "s", "q")):
            return f"{path.name} holds {dtype}{list(shape)}, not token records"
        rows.append(shape[0])
    return None if rows[0] == rows[1] else f"{rows[0]} keys for {rows[1]} records"


def sweep_orphans(folder: Path) -> int:
    """Remove what writers that died left in a cache folder: `.tmp` files, and data files their keys file
    never committed (pid gone, or older than STALE_S for a reused pid). Returns how many files went."""
    removed = 0
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        try:
            if m and (not pid_alive(int(m.group(1))) or now - p.stat().st_mtime > STALE_S):
                p.unlink()
                removed += 1
        except OSError:
            continue
    for seg, kinds in _segments(folder).items():
        if "keys" not in kinds and (not pid_alive(seg[1]) or seg[0] < (now - STALE_S) * 1e9):
            try:
                (folder / _name(seg, "data")).unlink()
                removed += 1
            except OSError:
                continue
    return removed


def _raise_if_full(e: OSError, folder: Path, kept: str) -> None:
    """Raise a DiskFull naming `folder` and what was kept when `e` says the disk is full."""
    if is_disk_full(e):
        raise DiskFull(f"disk full writing the token cache in {folder}: {kept}; free some space and run the "
                       f"command again") from e


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
    try:
        _fsync_write(folder / _name(seg, "keys"), raw)
    except BaseException:
        (folder / _name(seg, "data")).unlink(missing_ok=True)  # never committed: leave nothing behind
        raise
    fsync_dir(folder)
    return seg


class TokenCache:
    """Read side: key -> dequantised token features (n, d) float32; memory-mapped, opened once per process.

    Damaged segments are removed (see the module doc) and said once each through `notify`."""

    def __init__(self, folder: Path, notify: Notify | None = None) -> None:
        self.folder = folder
        self.notify = notify
        self._where: dict[bytes, tuple[tuple[int, int], int]] = {}
        self._data: dict[tuple[int, int], np.ndarray] = {}
        for seg, kinds in sorted(_segments(folder).items()):
            if kinds != {"data", "keys"}:
                continue  # not committed (yet)
            try:
                problem = _check_segment(folder, seg)
                keys = None if problem else np.load(folder / _name(seg, "keys"), allow_pickle=False)
            except FileNotFoundError:
                continue  # compacted away meanwhile
            except Exception as e:  # noqa: BLE001 - whatever a damaged file raises, the cache must not fail a query
                problem, keys = f"unreadable: {type(e).__name__}: {str(e)[:120]}", None
            if keys is None:
                self._drop(seg, problem or "unreadable")
                continue
            for row, k in enumerate(keys):
                self._where[k.tobytes()] = (seg, row)  # later segments win

    @classmethod
    def open(cls, home: str | Path, fp: Fingerprint, kind: str = "image", notify: Notify | None = None) -> TokenCache:
        return cls(cache_dir(home, fp, kind), notify)

    def _drop(self, seg: tuple[int, int], why: str) -> None:
        """Forget a damaged segment and remove its files (keys first: the segment is then uncommitted)."""
        removed = True
        for part in ("keys", "data"):
            try:
                (self.folder / _name(seg, part)).unlink(missing_ok=True)
            except OSError:
                removed = False
        self._data.pop(seg, None)
        self._where = {k: v for k, v in self._where.items() if v[0] != seg}
        if self.notify is not None:
            done = "removed" if removed else "ignoring (cannot remove it)"
            self.notify(f"token cache: {done} damaged segment seg-{seg[0]}-{seg[1]} in {self.folder} ({why}); "
                        f"its entries are computed again when needed")

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return bytes.fromhex(key) in self._where

    def _segment(self, seg: tuple[int, int]) -> np.ndarray | None:
        """The segment's records, memory-mapped; None (and the segment dropped) when they cannot be mapped."""
        if seg not in self._data:
            try:
                self._data[seg] = np.load(self.folder / _name(seg, "data"), mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:  # compacted away meanwhile: its entries now live in a segment we never saw
                self._where = {k: v for k, v in self._where.items() if v[0] != seg}
                return None
            except Exception as e:  # noqa: BLE001 - whatever a damaged file raises, the cache must not fail a query
                self._drop(seg, f"cannot be mapped: {type(e).__name__}: {str(e)[:120]}")
                return None
        return self._data[seg]

    def get(self, keys: Sequence[str | None]) -> list[np.ndarray | None]:
        """Token features (n, d) float32 per key, None where absent (or in a segment found damaged now)."""
        out: list[np.ndarray | None] = []
        for key in keys:
            where = self._where.get(bytes.fromhex(key)) if key else None
            records = self._segment(where[0]) if where is not None else None
            if where is None or records is None:
                out.append(None)
                continue
            rec = records[where[1]]
            n = int(rec["n"])
            if not 0 <= n <= rec["q"].shape[0]:
                self._drop(where[0], f"a record says it holds {n} tokens")
                out.append(None)
                continue
            out.append(dequantize(np.asarray(rec["q"][:n]), np.asarray(rec["s"][:n])))
        return out

    def put(self, keys: Sequence[str], tokens: Sequence[np.ndarray]) -> bool:
        """Add computed entries as a new segment (best effort: False when the folder is not writable)."""
        fresh = [(k, t) for k, t in zip(keys, tokens, strict=True) if k and k not in self]
        if not fresh:
            return True
        try:
            seg = write_segment(self.folder, [k for k, _ in fresh], [t for _, t in fresh])
        except OSError as e:
            if is_disk_full(e) and self.notify is not None:
                self.notify(f"disk full: {len(fresh)} computed token entries were not added to {self.folder} "
                            f"(results are unaffected; nothing stored was lost)")
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

    def __init__(self, home: str | Path, fp: Fingerprint, kind: str = "image", flush_every: int = 512,
                 notify: Notify | None = None) -> None:
        self.folder = cache_dir(home, fp, kind)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _raise_if_full(e, self.folder, "nothing was changed")
            raise
        self.flush_every = max(1, flush_every)
        sweep_orphans(self.folder)
        self._known = set(TokenCache(self.folder, notify)._where)  # damaged segments go here too
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
        try:
            write_segment(self.folder, self._keys, self._tokens)
        except OSError as e:
            _raise_if_full(e, self.folder, "everything committed before is kept (the token cache is a cache: "
                                           "missing entries are computed again when a query needs them)")
            raise
        self.written += len(self._keys)
        self._keys, self._tokens = [], []


def compact(home: str | Path, fp: Fingerprint, kind: str, live: Iterable[str]) -> int:
    """Rewrite a cache keeping only the entries whose keys are in `live`; returns how many were kept.

    Run under the index's writer lock. The new segment is committed before the old ones go.
    """
    cache = TokenCache.open(home, fp, kind)
    old = sorted(_segments(cache.folder))
    wanted = sorted(k for k in set(live) if k in cache)
    kept = [(k, t) for k, t in zip(wanted, cache.get(wanted), strict=True) if t is not None]  # damaged: dropped
    cache._data.clear()
    try:
        write_segment(cache.folder, [k for k, _ in kept], [t for _, t in kept])
    except OSError as e:
        _raise_if_full(e, cache.folder, "the cache was not compacted and everything in it is kept")
        raise
    for seg in old:
        (cache.folder / _name(seg, "keys")).unlink(missing_ok=True)
        (cache.folder / _name(seg, "data")).unlink(missing_ok=True)
    fsync_dir(cache.folder)
    return len(kept)


def writer_for(home: str | Path, encoder: Encoder, kind: str = "image", flush_every: int = 512,
               notify: Notify | None = None) -> TokenCacheWriter | None:
    """A cache writer for this encoder's model, or None when the model has no token features: then the
    index simply has no token cache."""
    try:
        encoder.check_tokens()
    except TokensUnsupported:
        return None
    return TokenCacheWriter(home, encoder.fingerprint, kind, flush_every, notify)

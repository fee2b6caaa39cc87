"""FAISS vector files (ANN indexes; the exact store's segments are read by exact.py), ids equal to catalog
primary keys.

Files are never written in place: `fsutil.atomic_write_with` writes `name.tmp`, fsyncs, renames and fsyncs
the folder, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import IndexMismatch
from retrieval.fsutil import atomic_write_with


def _faiss() -> Any:
    import faiss

    return faiss


def write_atomic(index: Any, path: Path) -> None:
    """Write `index` to `path` through a temp file, fsync and rename (fsutil's one durable-write recipe)."""
    faiss = _faiss()
    atomic_write_with(path, lambda tmp: faiss.write_index(index, tmp))


def read_index(path: Path, mmap: bool = False, ivf: bool = False) -> Any:
    """Load a vector file; a damaged file is an IndexMismatch the user can repair.

    With `mmap`, flat codes and inverted lists stay in the file (memory-mapped), so an index larger
    than RAM opens and answers queries from the page cache. Such an index must never be added to:
    faiss aborts the process when a mapped array is resized, so only read-only stores map.
    """
    faiss = _faiss()
    flags = 0
    if mmap:  # inverted lists and flat codes are mapped by different faiss readers
        flags = faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise IndexMismatch(f"vector file {path} is unreadable ({str(e).splitlines()[0][:120]}); "
                            f"run `crossmodal repair` to rebuild the index state") from e


def ids_of(index: Any) -> np.ndarray:
    """The ids held by an id-mapped faiss index or the exact store (exact.ExactVectors), as int64."""
    if not hasattr(index, "id_map"):
        return np.asarray(index.ids, dtype=np.int64)
    ids: np.ndarray = _faiss().vector_to_array(index.id_map).astype(np.int64)
    return ids


def vectors_of(index: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of the exact store, in storage order (mapped: rows are read when indexed)."""
    return ids_of(index), index.vectors


def cleanup(folder: Path, modality: str, keep: set[int]) -> None:
    """Drop a modality's vector files of generations other than `keep`, and leftover temp files."""
    pattern = re.compile(rf"^{modality}-(\d+)\.faiss(\.tmp)?$")
    for p in folder.glob(f"{modality}-*.faiss*"):
        m = pattern.match(p.name)
        if m and (m.group(2) or int(m.group(1)) not in keep):
            p.unlink(missing_ok=True)


def _meminfo(key: str, fallback: int) -> int:
    """One /proc/meminfo figure in bytes (Linux); `fallback` elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return fallback


def memory_available() -> int:
    """Free memory (MemAvailable), else a conservative 4 GiB; decides when to map files."""
    return _meminfo("MemAvailable", 4 * 1024 ** 3)


def memory_total() -> int:
    """Physical memory, else 16 GiB; the default ANN memory budget is half of it."""
    return _meminfo("MemTotal", 16 * 1024 ** 3)

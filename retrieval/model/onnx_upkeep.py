"""Upkeep of ONNX exports, which are caches: damaged ones dropped, folders of dead exporters swept, failed
exports backed off.

Why: an export is ~600 MB made in tens of seconds. A damaged one must not block queries (`drop_export`, and
the query path answers on torch while it is made again); a killed exporter's temporary folder must not stay
for good (`sweep_exports`, run by the next export and by `crossmodal info`); and a failed export (a full
disk) must not be retried by every query: `record_failure` writes <key>.failed beside the exports in the
shared cache (export_cache) with the time and the library versions, and `export_backoff` keeps queries on
torch for BACKOFF_S after it, unless a version changed. `crossmodal index` (ensure_export) always tries
again; a success clears the marker.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from retrieval.fsutil import atomic_write, pid_alive
from retrieval.model.export_cache import EXPORT_VERSION
from retrieval.model.export_cache import failure_marker as failure_marker
from retrieval.model.spec import Fingerprint

BACKOFF_S = 3600


def drop_export(folder: Path) -> bool:
    """Move a damaged export aside and remove it (a cache: made again from the model); False when it cannot be
    moved (a read-only cache or home). Sessions that have it open keep their memory maps."""
    aside = folder.with_name(f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.old")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:
        return True  # another query dropped it first
    except OSError:
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


@dataclass(frozen=True)
class Leftover:
    """A temporary or moved-aside export folder whose exporter died, its size, and whether it was removed."""

    path: Path
    bytes: int
    removed: bool


def _tree_bytes(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size
    return sum((Path(d) / f).stat().st_size for d, _, names in os.walk(path) for f in names
               if not (Path(d) / f).is_symlink())


def sweep_exports(root: Path, remove: bool = True) -> list[Leftover]:
    """Folders `.<key>.<pid>.*.tmp` / `.<key>.<pid>.old` of exporters that died (killed mid-export: their pid
    is gone), removed when `remove` and the folder allows it. A live process's folders are never touched."""
    found: list[Leftover] = []
    for p in sorted(root.glob(".*.*.*")) if root.is_dir() else []:
        parts = p.name.split(".")
        if len(parts) < 4 or parts[-1] not in ("tmp", "old") or not parts[2].isdigit() or pid_alive(int(parts[2])):
            continue
        try:
            size = _tree_bytes(p)
        except OSError:
            size = 0
        if remove:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        found.append(Leftover(p, size, remove and not p.exists()))
    return found


def _versions() -> dict[str, str]:
    """What an export depends on besides the model (its key): a change here deserves a new try."""
    import onnxruntime
    import open_clip
    import torch

    return {"export": str(EXPORT_VERSION), "onnxruntime": str(onnxruntime.__version__),
            "torch": str(torch.__version__), "open_clip": str(open_clip.__version__)}


def record_failure(fp: Fingerprint, error: str) -> None:
    """Remember a failed export so queries do not retry it at once (best effort: a full disk may refuse it)."""
    try:
        marker = failure_marker(fp)
        marker.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": time.time(), "error": error, "versions": _versions()}
        atomic_write(marker, json.dumps(record).encode(), durable=False)
    except Exception:  # noqa: BLE001, S110 - without the marker the next query simply tries again
        pass


def clear_failure(fp: Fingerprint) -> None:
    try:
        failure_marker(fp).unlink(missing_ok=True)
    except OSError:
        pass


def export_backoff(fp: Fingerprint) -> str | None:
    """Why a query should not export now (a failure less than BACKOFF_S ago, same versions), or None."""
    try:
        record = json.loads(failure_marker(fp).read_text())
        age = time.time() - float(record["time"])
        if not 0 <= age < BACKOFF_S or record.get("versions") != _versions():
            return None
        retry = time.strftime("%H:%M", time.localtime(float(record["time"]) + BACKOFF_S))
        return (f"the ONNX export failed {age / 60:.0f} min ago ({str(record.get('error'))[:200]}); it is tried "
                f"again after {retry} or by `crossmodal index`")
    except Exception:  # noqa: BLE001 - no marker, or an unreadable one: go ahead and export
        return None

"""Rebuilding a catalog SQLite cannot read (`crossmodal repair`), from what can still be read.

Why: the vector files hold every id and vector, and a damaged catalog usually still yields most of its rows
(SQLite reads a row by its id around damaged pages). A catalog that fails SQLite's quick_check, or that is
empty or missing while vector files exist, is moved aside as `catalog.sqlite.damaged-<time>` (with its WAL,
never written to: it is read with mode=ro) and a new one is written with the meta and the rows that could
be read. The Store's repair then drops vectors without a row, and says so: the next `crossmodal index`
re-embeds those images from their files. Only repair calls this, holding the writer lock.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import IndexMismatch
from retrieval.fsutil import fsync_dir
from retrieval.model.spec import Fingerprint
from retrieval.store import checksums, exact_segments
from retrieval.store import vectors as vec
from retrieval.store.guards import vector_files
from retrieval.store.records import CATALOG, MODALITIES, SCHEMA_VERSION

_KEYS = ("model", "checkpoint_stat", *(f"{k}.{m}" for k in ("gen", "maxgen", "sums", "ann", "annmax")
                                     for m in MODALITIES))
_RESET = ("gen.", "maxgen.", "sums.", "segs.")  # recomputed from the files on disk


def _read_only(path: Path, salvage: bool = False) -> sqlite3.Connection:
    """A connection that can never change the damaged file (no checkpoint of its WAL on close).

    With `salvage`, writable_schema lifts SQLite's refusal to read a file shorter than its header says
    (a truncated catalog): every page still there can then be read (harmless: the connection is mode=ro)."""
    db = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    if salvage:
        db.execute("PRAGMA writable_schema=ON")
    return db


def damage(home: Path) -> str | None:
    """Why the catalog cannot be used as it is (None: it can, or the home is simply new)."""
    path = home / CATALOG
    files = any(vector_files(home).values())
    if not path.is_file():
        return "is missing" if files else None
    try:
        with closing(_read_only(path)) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"meta", "items"} <= tables:
                if not files:
                    return None
                return "is empty (0 bytes)" if path.stat().st_size == 0 else "holds no catalog tables"
            found = [str(r[0]) for r in db.execute("PRAGMA quick_check(3)")]
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            raise
        return f"is unreadable ({e})"
    except sqlite3.DatabaseError as e:
        return f"is unreadable ({e})"
    return None if found == ["ok"] else f"fails SQLite's integrity check ({found[0]})"


def _meta(db: sqlite3.Connection) -> dict[str, str]:
    try:
        return {str(k): str(v) for k, v in db.execute("SELECT key, value FROM meta")}
    except sqlite3.DatabaseError:
        pass
    out = {}
    for key in _KEYS:  # the table's own pages may be readable where a scan is not
        try:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row:
            out[key] = str(row[0])
    return out


def _model(meta: dict[str, str], home: Path) -> tuple[Fingerprint | None, str | None]:
    """The index's model: the catalog's record, else the one model an ONNX export in the home names (earlier
    versions exported there), else the one model of the shared export cache whose token features this home
    holds (tokens/<key>/ is per model: the cache alone would name every home's models)."""
    try:
        return Fingerprint.from_json(meta["model"]), None
    except (KeyError, ValueError, TypeError):
        pass
    from retrieval.model.export_cache import exports_root, fingerprints_under, legacy_root

    found = set(fingerprints_under(legacy_root(home)))
    if not found:
        from retrieval.rerank.token_cache import cache_dir

        found = {fp for fp in fingerprints_under(exports_root()) if cache_dir(home, fp).parent.is_dir()}
    if len(found) == 1:
        fp = found.pop()
        return fp, f"the model record was lost; recovered from the ONNX export ({fp.describe()})"
    return None, "the model record is lost (and no single ONNX export names it): no vector can be used"


def _ids_in(path: Path, dim: int) -> np.ndarray | None:
    """The ids a vector file holds: through faiss, else straight from the file's layout."""
    try:
        index = vec.read_index(path)
        if int(index.d) == dim:
            return vec.ids_of(index)
    except IndexMismatch:
        pass
    flat = checksums.read_flat(path, dim)
    return flat[0] if flat is not None else None


def _pick(home: Path, modality: str, meta: dict[str, str], dim: int) -> tuple[list[int], np.ndarray] | None:
    """(segments, ids) of the vector files to keep: the segments the catalog named when every one reads, else
    the newest readable file (the other segments' rows are then re-embedded by the next index run)."""
    gens = vector_files(home)[modality]
    named = exact_segments.named(meta, modality)
    if named and set(named) <= set(gens):
        parts = [_ids_in(home / "vectors" / f"{modality}-{g}.faiss", dim) for g in named]
        if all(p is not None for p in parts):
            return named, np.concatenate([p for p in parts if p is not None])
    for gen in reversed(gens):
        ids = _ids_in(home / "vectors" / f"{modality}-{gen}.faiss", dim)
        if ids is not None:
            return [gen], ids
    return None


def _rows(db: sqlite3.Connection, columns: list[str], wanted: set[int]
          ) -> tuple[list[str], dict[int, tuple[Any, ...]]]:
    """(columns read, rows): every row a scan reads, then each wanted id the scan missed, looked up by id."""
    try:
        have = {str(r[1]) for r in db.execute("PRAGMA table_info(items)")}
        columns = [c for c in columns if c in have or not have]  # an older schema lacks some
    except sqlite3.DatabaseError:
        pass
    select = f"SELECT {', '.join(columns)} FROM items"
    got: dict[int, tuple[Any, ...]] = {}
    try:
        for row in db.execute(select):
            got[int(row[0])] = tuple(row)
        return columns, got
    except sqlite3.DatabaseError:
        pass
    for i in sorted(wanted - got.keys()):
        try:
            row = db.execute(select + " WHERE id = ?", (i,)).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row:
            got[int(row[0])] = tuple(row)
    return columns, got


def _optional(db: sqlite3.Connection, sql: str) -> list[tuple[Any, ...]]:
    try:
        return [tuple(r) for r in db.execute(sql)]
    except sqlite3.DatabaseError:
        return []


def rebuild(home: Path, why: str) -> list[str]:
    """Write a new catalog from what the damaged one and the vector files still hold; returns notes."""
    from retrieval.store.schema import Item

    path = home / CATALOG
    columns = ["id"] + [c.name for c in Item.__table__.columns if c.name != "id"]
    meta: dict[str, str] = {}
    found: dict[int, tuple[Any, ...]] = {}
    skipped: list[tuple[Any, ...]] = []
    seq = 0
    picks: dict[str, tuple[list[int], np.ndarray]] = {}
    db = _read_only(path, salvage=True) if path.is_file() else None
    try:
        meta = _meta(db) if db else {}
        fp, model_note = _model(meta, home)
        for m in MODALITIES:
            pick = _pick(home, m, meta, fp.dim) if fp else None
            if pick:
                picks[m] = pick
        wanted = {int(i) for _, ids in picks.values() for i in ids}
        if db and fp:
            columns, found = _rows(db, columns, wanted)
            skipped = _optional(db, "SELECT path, reason, at FROM skipped")
        seq_rows = _optional(db, "SELECT seq FROM sqlite_sequence WHERE name = 'items'") if db else []
        seq = max([int(r[0]) for r in seq_rows if r[0] is not None]
                  + [max(wanted, default=0), max(found, default=0)])
    finally:
        if db:
            db.close()
    new_meta = {k: v for k, v in meta.items() if not k.startswith(_RESET)}
    new_meta["schema_version"] = str(SCHEMA_VERSION)
    if fp:
        new_meta["model"] = fp.to_json()
    for m in MODALITIES:
        gens = vector_files(home)[m]
        if gens:
            new_meta[f"maxgen.{m}"] = str(max(gens + [int(meta.get(f"maxgen.{m}", "0") or 0)]))
        if m in picks:
            new_meta[f"segs.{m}"] = json.dumps(picks[m][0])
            new_meta[f"gen.{m}"] = str(max(picks[m][0]))
            for g in picks[m][0]:
                sums = exact_segments.sums_of(meta, m, g)
                if sums:
                    new_meta[f"sums.{m}.{g}"] = sums.to_json()
    tmp = home / f"{CATALOG}.rebuilt.tmp"
    kept = _write(tmp, new_meta, columns, list(found.values()), skipped, seq)
    aside = _move_aside(home)
    os.replace(tmp, path)
    fsync_dir(home)
    at = columns.index("modality")
    notes = [f"{CATALOG} {why}" + (f"; kept aside as {aside.name}" if aside else "")
             + f"; a new catalog was written from what could be read ({kept} rows)"]
    if model_note:
        notes.append(model_note + ("" if fp else _unusable(home)))
    for m in MODALITIES:
        held = picks[m][1] if m in picks else np.zeros(0, np.int64)
        lost = int(len(held)) - sum(1 for i in held.tolist() if i in found and found[i][at] == m)
        if lost:
            notes.append(f"{m}: {lost} of {len(held)} vectors have no readable row (their "
                         f"{'file paths' if m == 'image' else 'captions'} were in the damaged part) and are dropped")
    return notes


def _unusable(home: Path) -> str:
    """How many vectors the newest file of each modality holds, now that no model says what they mean."""
    held = []
    for m, gens in vector_files(home).items():
        for gen in reversed(gens):
            try:
                held.append(f"{int(vec.read_index(home / 'vectors' / f'{m}-{gen}.faiss').ntotal)} {m}")
                break
            except IndexMismatch:
                continue
    return f" ({' and '.join(held)} vectors; their files stay in vectors/ until the next index run)" if held else ""


def _write(tmp: Path, meta: dict[str, str], columns: list[str], rows: list[tuple[Any, ...]],
           skipped: list[tuple[Any, ...]], seq: int) -> int:
    """The new catalog at `tmp`: tables made by the schema (SQLAlchemy), rows copied as stored (sqlite3)."""
    from sqlalchemy.engine import URL

    from retrieval.store.schema import Base, make_engine

    for p in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        p.unlink(missing_ok=True)
    engine = make_engine(URL.create("sqlite", database=str(tmp)))
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()
    with closing(sqlite3.connect(tmp)) as db:
        db.execute("PRAGMA synchronous=FULL")
        with db:
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", sorted(meta.items()))
            before = db.total_changes
            db.executemany(f"INSERT OR IGNORE INTO items ({', '.join(columns)}) "
                           f"VALUES ({', '.join('?' * len(columns))})", rows)
            kept = db.total_changes - before
            db.executemany("INSERT OR IGNORE INTO skipped (path, reason, at) VALUES (?, ?, ?)", skipped)
            db.execute("DELETE FROM sqlite_sequence WHERE name = 'items'")
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('items', ?)", (seq,))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    return kept


def _move_aside(home: Path) -> Path | None:
    """Rename the damaged catalog (and its WAL, which belongs to it) to catalog.sqlite.damaged-<time>."""
    path = home / CATALOG
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = home / f"{CATALOG}.damaged-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = home / f"{CATALOG}.damaged-{stamp}-{n}"
    # First: a new catalog must never meet the old one's WAL. A WAL with frames goes with its file (they are
    # one database); an empty one and the shared-memory index hold nothing and go.
    wal, shm = path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")
    if wal.exists() and wal.stat().st_size > 0:
        os.replace(wal, aside.with_name(aside.name + "-wal"))
    wal.unlink(missing_ok=True)
    shm.unlink(missing_ok=True)
    os.replace(path, aside)
    return aside

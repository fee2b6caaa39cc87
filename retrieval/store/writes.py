"""The catalog's writes (SQLAlchemy ORM), each run inside a transaction the Store opens.

Why separate from the Store: the facade decides *when* rows change (its single commit point, repair,
small metadata updates); these helpers say *how* a change is written, so the commit protocol reads as a
list of steps. Only writers import this module (it loads SQLAlchemy); reads go through a CatalogReader,
except the ids repair must read inside its own write transaction (`ids`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy import insert as sql_insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from retrieval.store.records import ImageRecord, TextRecord
from retrieval.store.schema import Item, Meta, Skipped, utcnow

_CHUNK = 900  # bound parameters per statement, below SQLite's default limit


@contextlib.contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """One write transaction: committed when the block ends, rolled back if it raises.

    Objects stay readable after the commit (`expire_on_commit=False`), so new ids can be returned.
    """
    with Session(engine, expire_on_commit=False) as s, s.begin():
        yield s


def image_items(records: Sequence[ImageRecord]) -> list[Item]:
    """New image rows (ids are assigned when the commit flushes them)."""
    now = utcnow()
    return [Item(modality="image", path=r.path, sha256=r.sha256, bytes=r.bytes, mtime=r.mtime, width=r.width,
                 height=r.height, added_at=now, **asdict(r.meta)) for r in records]


def text_items(records: Sequence[TextRecord]) -> list[Item]:
    """New caption rows."""
    now = utcnow()
    return [Item(modality="text", corpus=r.corpus, row=r.row, text=r.text, sha256=r.sha256, added_at=now)
            for r in records]


def insert(s: Session, items: Sequence[Item]) -> np.ndarray:
    """Add rows and flush, so their ids (also their vector ids) are known inside the transaction."""
    s.add_all(items)
    s.flush()
    return np.asarray([it.id for it in items], dtype=np.int64)


def delete_ids(s: Session, ids: Iterable[int]) -> None:
    """Drop rows by id."""
    ids = [int(i) for i in ids]
    for start in range(0, len(ids), _CHUNK):
        s.execute(delete(Item).where(Item.id.in_(ids[start:start + _CHUNK])))


def delete_modality(s: Session, modality: str) -> None:
    """Drop every row of a modality (repair, when its vectors are gone)."""
    s.execute(delete(Item).where(Item.modality == modality))


def ids(s: Session, modality: str) -> np.ndarray:
    """Every id of a modality as the transaction sees it (repair reads and deletes in one transaction)."""
    return np.asarray(s.scalars(select(Item.id).where(Item.modality == modality)).all(), dtype=np.int64)


def paths_of(s: Session, ids: Sequence[int]) -> list[str]:
    """The file paths of these rows (images; captions have none), sorted: what repair says it dropped."""
    out: list[str] = []
    for start in range(0, len(ids), _CHUNK):
        chunk = [int(i) for i in ids[start:start + _CHUNK]]
        out += [p for p in s.scalars(select(Item.path).where(Item.id.in_(chunk))) if p is not None]
    return sorted(out)


def put_meta(s: Session, key: str, value: str) -> None:
    """Set one meta value (insert or replace)."""
    s.merge(Meta(key=key, value=value))


def set_meta(s: Session, values: dict[str, str | None], meta: dict[str, str]) -> None:
    """Set (or, for None, delete) meta values, and mirror them in `meta` (the Store's copy)."""
    for key, value in values.items():
        if value is None:
            s.execute(delete(Meta).where(Meta.key == key))
            meta.pop(key, None)
        else:
            put_meta(s, key, value)
            meta[key] = value


def move(s: Session, moves: Sequence[tuple[int, str, int, float]]) -> None:
    """New (path, bytes, mtime) for rows whose content did not change; their vectors stay.

    One executemany (an ORM bulk update by primary key): a moved folder of 40,000 photos is one statement
    run 40,000 times, not 40,000 round trips through the ORM."""
    if moves:
        s.execute(update(Item), [{"id": int(i), "path": p, "bytes": b, "mtime": m} for i, p, b, m in moves])
    forget_skipped(s, [m[1] for m in moves])


def record_skipped(s: Session, skipped: Sequence[tuple[str, str]]) -> None:
    """Remember files that could not be indexed and why (latest reason wins): the old entries of these
    paths go, then one bulk insert (a merge per row took 30 s for 40,000 skips)."""
    latest = dict(skipped)
    forget_skipped(s, list(latest))
    if latest:
        now = utcnow()
        s.execute(sql_insert(Skipped), [{"path": p, "reason": r, "at": now} for p, r in latest.items()])


def forget_skipped(s: Session, paths: Sequence[str]) -> None:
    """Files now indexed (or moved into place) are no longer skipped."""
    paths = list(paths)
    for start in range(0, len(paths), _CHUNK):
        s.execute(delete(Skipped).where(Skipped.path.in_(paths[start:start + _CHUNK])))

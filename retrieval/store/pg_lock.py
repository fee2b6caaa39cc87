"""One writer per PostgreSQL catalog: a session-level advisory lock, held on a connection of its own.

Why besides the home's file lock: writers on other machines share the catalog (and the vectors on a shared
filesystem, where a file lock may not reach). `pg_try_advisory_lock` never waits: a second writer is refused at
once, told which process on which host holds it (from pg_stat_activity, where every crossmodal connection
names itself). The server drops the lock when the holder's connection ends, so a killed writer leaves none.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from retrieval.errors import IndexLocked
from retrieval.store.catalog_url import mask
from retrieval.store.pg_reader import connect

KEY = zlib.crc32(b"crossmodal catalog writer")  # one catalog per database: one key


def _holder(db: Any) -> str:
    """Who holds the lock, as that connection named itself ("crossmodal writer pid N on HOST")."""
    rows = db.execute("SELECT a.application_name, host(a.client_addr) FROM pg_locks l JOIN pg_stat_activity a "
                      "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 "
                      "AND l.objid = %s", (KEY,)).fetchall()
    if not rows:
        return "another crossmodal process"
    name, addr = rows[0]
    return (name or "another process") + (f" (from {addr})" if addr else "")


def advisory_lock(url: str) -> Callable[[], None]:
    """Take the catalog's writer lock or raise IndexLocked; returns the release (unlocks, closes the connection)."""
    db = connect(url, "writer")
    try:
        got = db.execute("SELECT pg_try_advisory_lock(%s)", (KEY,)).fetchone()[0]
        if not got:
            who = _holder(db)
            raise IndexLocked(f"{who} is writing to the catalog {mask(url)}; wait for it to finish, then run "
                              f"this again")
    except BaseException:
        db.close()
        raise

    def release() -> None:
        """Unlock, then close: the server answers the unlock before this returns, whereas after a bare close
        it drops the lock only once it has read the goodbye, and the next writer may come first."""
        try:
            db.execute("SELECT pg_advisory_unlock(%s)", (KEY,))
        except Exception:  # noqa: BLE001 - a lost connection: the server has dropped the lock already
            pass
        db.close()

    return release

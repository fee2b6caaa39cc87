"""The held snapshot both catalog readers offer (reader.py's `hold` / `release`), written once.

A reader keeps one committed state for every read until `release`, or until `hold_s` seconds pass (a held
SQLite snapshot stops WAL checkpoints; an open PostgreSQL transaction holds back VACUUM). Each backend only
says how a snapshot opens and closes. Standard library only, like every reader.
"""

from __future__ import annotations

import threading


class TimedHold:
    """`hold` / `release` / `held` over a backend's `_open_snapshot` / `_close_snapshot`."""

    _guard: threading.RLock
    _held: bool
    _timer: threading.Timer | None

    def _open_snapshot(self) -> None:
        raise NotImplementedError

    def _close_snapshot(self) -> None:
        raise NotImplementedError

    @property
    def held(self) -> bool:
        return self._held

    def hold(self, hold_s: float | None = None) -> None:
        """Keep one committed state for every later read until `release` (or `hold_s` seconds, None: never)."""
        with self._guard:
            self.release()
            self._open_snapshot()
            self._held = True
            if hold_s is not None:
                self._timer = threading.Timer(hold_s, self.release)
                self._timer.daemon = True
                self._timer.start()

    def release(self) -> None:
        """End the held snapshot (reads see the latest commit from now on); idempotent."""
        with self._guard:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._held:
                self._held = False
                self._close_snapshot()

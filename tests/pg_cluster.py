"""A throwaway PostgreSQL cluster on loopback for the `postgres`-marked tests (fixture `pg_server` in
tests/fixtures.py).

Why by hand and not pytest-postgresql: it is a few commands (initdb, pg_ctl start/stop, createdb) and the one
twist, that initdb refuses to run as root, needs the `postgres` user anyway. The cluster listens on 127.0.0.1
at a free port with trust authentication (nothing outside this machine can reach it) and lives in a temporary
folder removed at the end. Debian's binaries live under /usr/lib/postgresql/<version>/bin; `.ci/run` installs
the `postgresql` package when they are missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's binaries folder (None: PostgreSQL is not installed)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A running cluster: `url(db)` is the catalog URL crossmodal takes."""

    bin: Path
    data: Path
    port: int
    run_as: list[str]

    def _run(self, *args: str) -> None:
        subprocess.run([*self.run_as, *args], check=True, capture_output=True, timeout=120)

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def createdb(self, db: str) -> str:
        """A new empty database; returns its crossmodal catalog URL."""
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", db)
        return self.url(db)

    def stop(self) -> None:
        subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.data.parent, ignore_errors=True)


def start() -> Cluster:
    """initdb + start a cluster as the `postgres` user (as this user when not root); raises when it cannot."""
    bin_dir = pg_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="crossmodal-pg-"))
    data = root / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        root.chmod(0o700)
    port = _free_port()
    cluster = Cluster(bin_dir, data, port, run_as)
    try:
        cluster._run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                     "--no-sync", "--locale=C")
        opts = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=60 -c shared_buffers=32MB")
        cluster._run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w",
                     "-t", "60", "start")
    except BaseException:
        cluster.stop()
        raise
    return cluster

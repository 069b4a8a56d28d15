"""A throwaway PostgreSQL cluster for tests: initdb + pg_ctl from Debian's `postgresql` package, on 127.0.0.1.

The server refuses to run as root, so as root the cluster belongs to the `postgres` system user (created by
the package) and is started through `runuser`. fsync is off (a test cluster, thrown away afterwards).
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ADMIN = "t2s_admin"


def pg_bindir() -> Path | None:
    """Where initdb / pg_ctl live: Debian's /usr/lib/postgresql/<version>/bin, else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    def __init__(self):
        bindir = pg_bindir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL binaries not found: `apt-get install -y postgresql` (Debian).")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="t2s_pg_"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run([str(bindir / "initdb"), "-D", str(self.data), "-U", ADMIN, "-A", "trust", "--no-sync",
                   "-E", "UTF8", "--locale=C"])
        self._run([str(bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-s",
                   "-o", f"-h 127.0.0.1 -p {self.port} -k {self.root} -F -c max_connections=20", "start"])
        self.url = f"postgresql://{ADMIN}@127.0.0.1:{self.port}/postgres"
        self.stopped = False
        atexit.register(self.stop)  # also when the session ends without fixture teardown

    def _run(self, cmd: list[str]) -> None:
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        subprocess.run(cmd, check=True, capture_output=True, timeout=120, cwd=self.root)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-s", "stop"])
        finally:
            time.sleep(0.1)
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg():
    """A real PostgreSQL server for the session (import this fixture into a test module)."""
    if pg_bindir() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql; .ci/run does it)")
    cluster = PgCluster()
    yield cluster
    cluster.stop()

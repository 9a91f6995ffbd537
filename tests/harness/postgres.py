"""A real PostgreSQL server for tests: initdb + pg_ctl in a temporary directory, on 127.0.0.1 and a free port.

Debian's `postgresql` package (installed by `scripts/setup.sh --test` where it can) puts the binaries under
/usr/lib/postgresql/<version>/bin. PostgreSQL refuses to run as root, so under root the server runs as the
`postgres` system user (`runuser`), in a directory of its own under the system temp dir (pytest's tmp_path is
readable by root only); the directory is removed afterwards.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

USER = "qlora"
DATABASE = "optuna"


def postgres_bindir() -> Path | None:
    """The folder with initdb/pg_ctl, or None when PostgreSQL is not installed."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))  # Debian: none of them on PATH
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found and Path(found).with_name("pg_ctl").exists() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(args: list[str], server_user: str | None) -> list[str]:
    return ["runuser", "-u", server_user, "--", *args] if server_user else args


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """`postgresql+psycopg2://qlora@127.0.0.1:<port>/optuna` of a server running for the test session."""
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install -e '.[test]')")
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    server_user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run the server as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and no runuser to start the server as 'postgres'")
        server_user = "postgres"
    root = Path(tempfile.mkdtemp(prefix="qlora-postgres-"))
    if server_user:
        entry = pwd.getpwnam(server_user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    data, log = root / "data", root / "server.log"
    port = free_port()

    def run(*args: str) -> None:
        proc = subprocess.run(
            _as_server_user(list(args), server_user), capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "--no-sync", "-E", "UTF8")
        run(
            str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
            "-o", f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off", "start",
        )  # fmt: skip
        try:
            run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE)
            yield f"postgresql+psycopg2://{USER}@127.0.0.1:{port}/{DATABASE}"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)

"""A throwaway PostgreSQL 15 server (tests, `bench storage`, `bench scale`): initdb and pg_ctl in a temp directory.

It listens on a free port and on a unix socket in its own directory and trusts local connections.
Tests run it with fsync off (the server dies with the session); the benchmarks run it `durable`, with
PostgreSQL's defaults (fsync, synchronous_commit, full_page_writes on), so that a commit costs what it
costs a production server and the comparison with SQLite's synchronous=FULL is like for like. As root
(CI containers) it runs as the `postgres` user, since initdb refuses root.
Every test gets a database of its own (`fresh`).
Nothing is downloaded: the Debian package's binaries (X402_ESCROW_PG_BIN to point elsewhere).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_BIN = Path(os.environ.get("X402_ESCROW_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable
        self._as: list[str] = []
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL binaries not found in {PG_BIN} (set X402_ESCROW_PG_BIN)")
        self.dir = Path(tempfile.mkdtemp(prefix="x402-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._names = itertools.count()
        self._run(PG_BIN / "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=300"
        if not durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(PG_BIN / "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start")
        self.url = self.url_of("postgres")

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _run(self, *argv: object) -> None:
        result = subprocess.run([*self._as, *map(str, argv)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({result.returncode}): {result.stdout}{result.stderr}")

    def url_of(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def fresh(self, prefix: str = "t") -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_of(name)

    def backend_cpu(self) -> dict[int, float]:
        """CPU seconds (user + system) each backend serving a client connection has used so far, by pid (Linux
        /proc; the checkpointer, WAL writer and autovacuum are left out). What queries cost the server, however
        busy the machine is. By pid, because a pooled connection's backend may exit between two readings: a sum
        would then go down, and a difference of sums could be negative."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        used: dict[int, float] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) != postmaster:
                    continue
                command = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue  # exited meanwhile
            if b"127.0.0.1(" in command or b"[local]" in command:  # "postgres: user db 127.0.0.1(port) idle"
                used[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return used

    def stop(self) -> None:
        self._run(PG_BIN / "pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

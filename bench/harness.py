"""A fresh embedded PostgreSQL and a fresh `tally serve` per scenario, and their resource use."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from server.auth.tokens import mint_token
from server.domain.access import ALL_TENANTS, SCOPES
from server.storage.embedded import EmbeddedPostgres

TALLY = str(Path(sys.executable).parent / "tally")


SECRET = b"tally-benchmark-secret-0123456789abcdef"
UNLIMITED = [
    f"--{name}-per-second=0"
    for name in ("tenant-events", "principal-events", "tenant-requests", "principal-requests")
]


@dataclass
class Stack:
    """A running benchmark stack: PostgreSQL and, unless started without it, `tally serve`.

    `dsn` reaches the database, `address` and `token` the server; the processes are there to
    meter their CPU and memory.
    """

    dsn: str
    address: str
    server: psutil.Process | None
    postgres: psutil.Process
    token: str = ""


def _tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(process: psutil.Process | None) -> float:
    """User + system CPU of a process and its children (PostgreSQL backends are children)."""
    if process is None:
        return 0.0
    total = 0.0
    for p in _tree(process):
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    try:  # backends that already exited are counted in their parent's children times
        root = process.cpu_times()
        total += root.children_user + root.children_system
    except psutil.NoSuchProcess:
        pass
    return total


def peak_rss_mb(process: psutil.Process | None) -> float:
    """Peak resident memory (VmHWM) of the server process, in MB."""
    if process is None:
        return 0.0
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def postgres() -> Iterator[tuple[str, psutil.Process]]:
    """A fresh embedded PostgreSQL in a temporary directory, removed on exit: its DSN and process."""
    directory = Path(tempfile.mkdtemp(prefix="tally-bench-"))
    embedded = EmbeddedPostgres(directory)
    dsn = embedded.start()
    pid = int((directory / "postgres" / "postmaster.pid").read_text().split()[0])
    try:
        yield dsn, psutil.Process(pid)
    finally:
        embedded.stop()
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def stack(extra_args: list[str] | None = None, *, with_server: bool = True) -> Iterator[Stack]:
    """A fresh PostgreSQL and `tally serve` on it (with `extra_args`), with rate limits off.

    The server is stopped with SIGTERM on exit (killed if it takes over 30 s). `with_server`
    False starts PostgreSQL alone.
    """
    with postgres() as (dsn, pg):
        if not with_server:
            yield Stack(dsn, "", None, pg)
            return
        env = {**os.environ, "DATABASE_URL": dsn}
        secret = Path(tempfile.mkdtemp(prefix="tally-bench-key-")) / "jwt-secret"
        secret.write_bytes(SECRET)
        # Rate limits off: the benchmark measures capacity, not the default quotas.
        flags = ["--jwt-secret-file", str(secret), "--max-streams-per-principal=0", *UNLIMITED]
        process = subprocess.Popen(
            [TALLY, "serve", "--port", "0", "--log-level", "WARNING", *flags, *(extra_args or [])],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("tally listening on "):
            process.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        try:
            token = mint_token(
                SECRET,
                subject="bench",
                tenants=ALL_TENANTS,
                scopes=SCOPES,
                ttl_seconds=24 * 3600,
                audience="tally",
            )
            yield Stack(dsn, line.split()[3], psutil.Process(process.pid), pg, token)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


class Meter:
    """CPU of the server and of PostgreSQL over a timed section."""

    def __init__(self, s: Stack) -> None:
        self._stack = s

    def __enter__(self) -> Meter:
        self.started = time.perf_counter()
        self._server0 = cpu_seconds(self._stack.server)
        self._pg0 = cpu_seconds(self._stack.postgres)
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.started
        self.server_cpu = (cpu_seconds(self._stack.server) - self._server0) / self.elapsed
        self.postgres_cpu = (cpu_seconds(self._stack.postgres) - self._pg0) / self.elapsed

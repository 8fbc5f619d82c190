"""Server settings, from command-line flags with TALLY_* environment variables as defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tally"


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = None  # None: start the embedded PostgreSQL under data_dir
    max_batch_size: int = 10_000
    max_future_seconds: int = 300
    max_message_bytes: int = 16 * 1024 * 1024
    pool_size: int = 8
    read_pool_size: int = 4
    grace_seconds: float = 10.0
    health_interval_seconds: float = 2.0

"""The development key: an HS256 secret that `tally serve` creates when no key is configured.

It keeps the one-command start working while the server still refuses unauthenticated
calls. The secret lives in <data-dir>/dev-jwt-secret, readable by its owner only, and
`tally token` signs with it. It is meant for a developer's machine, never for production.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

DEV_SECRET_NAME = "dev-jwt-secret"


def dev_secret_path(data_dir: Path) -> Path:
    """Where the development secret of a data directory lives."""
    return data_dir / DEV_SECRET_NAME


def ensure_dev_secret(data_dir: Path) -> tuple[Path, bool]:
    """The path of the development secret, creating it if needed; True if it was created now."""
    path = dev_secret_path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two servers starting at once on one data directory create it once.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path, False
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32) + "\n")
    return path, True

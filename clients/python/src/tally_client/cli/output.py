"""How the CLI prints: rich tables for people, JSON for programs, typed errors on stderr.

Exact numbers are printed as their decimal strings (JSON strings, never JSON numbers,
which most readers parse as floats); times as RFC 3339 in UTC. Values are put in
tables as plain Text, so that a tenant id with [brackets] is not read as rich markup,
and cells never wrap or cut an amount: off a terminal the console is as wide as the
widest row.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tally_client.errors import TallyError

WIDE = 100_000  # columns of a console that is not a terminal: tables are only as wide as their rows


def console(*, stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr) that never wraps or cuts a cell.

    Off a terminal it is WIDE columns wide, so a table is as wide as its widest row.
    """
    probe = Console(stderr=stderr)
    width = None if probe.is_terminal else WIDE
    return Console(stderr=stderr, highlight=False, width=width, soft_wrap=not probe.is_terminal)


def text(value: object) -> str:
    """A value as printed in a table or a line: exact decimals, UTC times, enum values."""
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def plain(value: Any) -> Any:
    """`value` (dataclasses, Decimals, datetimes, enums, containers) as JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Decimal | datetime | enum.Enum):
        return text(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def print_json(value: Any) -> None:
    """Print `value` as indented JSON (decimals as strings, times as RFC 3339 in UTC)."""
    print(json.dumps(plain(value), indent=2, ensure_ascii=False))


def print_table(
    columns: Sequence[str], rows: Iterable[Sequence[object]], *, title: str | None = None
) -> None:
    """Print `rows` as a table under `columns`; numeric columns are right-aligned."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        numeric = column in NUMERIC_COLUMNS
        table.add_column(column, justify="right" if numeric else "left", no_wrap=True, overflow="fold")
    for row in rows:
        table.add_row(*(Text(text(cell)) for cell in row))
    console().print(table)


NUMERIC_COLUMNS = frozenset({"quantity", "events", "unit price", "amount", "total", "value", "attempts"})


def print_error(error: TallyError) -> None:
    """The error's code, reason, message, field and quota violations and request id, on stderr."""
    code = error.code.name if error.code is not None else "ERROR"
    head = f"tally: {code}"
    if error.reason:
        head += f" ({error.reason})"
    lines = [f"{head}: {error.message}"]
    lines += [f"  {v.field}: {v.description}" for v in error.field_violations]
    lines += [f"  quota {v.subject}: {v.description}" for v in error.quota_violations]
    if error.retry_delay is not None:
        lines.append(f"  retry after {error.retry_delay.total_seconds():g} s")
    if error.request_id:
        lines.append(f"  request id {error.request_id}")
    print("\n".join(lines), file=sys.stderr)

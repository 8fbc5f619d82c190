"""Usage events read from JSON Lines or CSV, each with its line number; bad lines say what is wrong.

The fields are those of tally.v1.UsageEvent: tenant_id, event_id, service, usage_type,
quantity, event_time and dimensions (a JSON object, or `dimensions.KEY` columns in
CSV). Quantities are read exactly: a JSON number is parsed as a Decimal, never a
float. A time without an offset is UTC. The event_id is required, so that reading
the same file again resends the same events, which the server counts once.

Only what the client must know to build an event is checked here; the server checks
the rest (lengths, signs, the time window) and rejects the event with its reason.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from tally_client.models import UsageEvent

REQUIRED = ("event_id", "service", "usage_type", "quantity")
FIELDS = frozenset({"tenant_id", *REQUIRED, "event_time", "dimensions"})
DIMENSION_PREFIX = "dimensions."


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A line that is not a usage event; it is not sent."""

    line: int
    problem: str


Record = tuple[int, UsageEvent] | BadRecord


class _Invalid(ValueError):
    pass


def _string(fields: Mapping[str, Any], name: str) -> str:
    value = fields[name]
    if not isinstance(value, str):
        raise _Invalid(f"{name} must be a string, not {json.dumps(value, default=str)}")
    return value


def _quantity(value: object) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise _Invalid(f"quantity must be a decimal number or string, not {value!r}")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise _Invalid(f"quantity {value!r} is not a decimal number") from None
    if not number.is_finite():
        raise _Invalid(f"quantity {value!r} is not finite")
    return number


def _time(value: object) -> datetime:
    if not isinstance(value, str):
        raise _Invalid(f"event_time must be an ISO 8601 string, not {value!r}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _Invalid(f"event_time {value!r} is not an ISO 8601 time") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _dimensions(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _Invalid("dimensions must be an object of string values")
    return value


def event(fields: Mapping[str, Any], default_tenant: str | None) -> UsageEvent:
    """The event of one record's fields; ValueError says what is wrong."""
    unknown = sorted(set(fields) - FIELDS)
    if unknown:
        raise _Invalid(f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(FIELDS))})")
    missing = [name for name in REQUIRED if fields.get(name) in (None, "")]
    if missing:
        raise _Invalid(f"{missing[0]} is missing")
    tenant = _string(fields, "tenant_id") if fields.get("tenant_id") not in (None, "") else default_tenant
    if tenant is None:
        raise _Invalid("tenant_id is missing (or give --tenant)")
    moment = fields.get("event_time")
    return UsageEvent(
        tenant_id=tenant,
        event_id=_string(fields, "event_id"),
        service=_string(fields, "service"),
        usage_type=_string(fields, "usage_type"),
        quantity=_quantity(fields["quantity"]),
        event_time=None if moment in (None, "") else _time(moment),
        dimensions=_dimensions(fields.get("dimensions") or {}),
    )


def read_jsonl(lines: Iterable[str], default_tenant: str | None) -> Iterator[Record]:
    """One record per non-blank line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line, parse_float=Decimal)
        except ValueError as exc:
            yield BadRecord(number, f"not JSON: {exc}")
            continue
        if not isinstance(fields, dict):
            yield BadRecord(number, "not a JSON object")
            continue
        try:
            yield number, event(fields, default_tenant)
        except ValueError as exc:
            yield BadRecord(number, str(exc))


def read_csv(lines: Iterable[str], default_tenant: str | None) -> Iterator[Record]:
    """One record per row after the header; empty cells are absent fields."""
    reader = csv.DictReader(lines, strict=True)
    try:
        for row in reader:
            fields: dict[str, Any] = {}
            dimensions: dict[str, str] = {}
            for name, value in row.items():
                if name is None:  # more cells than header names
                    yield BadRecord(reader.line_num, "more cells than the header has columns")
                    break
                if name.startswith(DIMENSION_PREFIX):
                    if value:
                        dimensions[name.removeprefix(DIMENSION_PREFIX)] = value
                elif value not in (None, ""):
                    fields[name] = value
            else:
                if dimensions:
                    fields["dimensions"] = dimensions
                try:
                    yield reader.line_num, event(fields, default_tenant)
                except ValueError as exc:
                    yield BadRecord(reader.line_num, str(exc))
    except csv.Error as exc:
        yield BadRecord(reader.line_num, f"not CSV: {exc}")

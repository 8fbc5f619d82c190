"""The benchmark's events: 100 tenants, the 7 default usage types, 4 regions, 1% resent.

Event times are spread over the 10 minutes before the workload is built, as in live
reporting: every batch then hits the same few hourly rollup rows, the hardest case for
concurrent writers.

Batches are generated once per (events, batch size, seed), serialized to the exact bytes
of the request messages and cached on disk, so that the clients spend their CPU sending,
not building protobufs, while the server is measured.
"""

from __future__ import annotations

import json
import pickle
import random
import time
from dataclasses import dataclass
from pathlib import Path

from tally.v1 import resources_pb2, usage_service_pb2

USAGE_TYPES = [
    ("marketplace", "wpk_upload"),
    ("marketplace", "wpk_review"),
    ("analytics", "query"),
    ("analytics", "report"),
    ("storage", "gb_hour"),
    ("compute", "cpu_hour"),
    ("compute", "memory_gb_hour"),
]
REGIONS = ["eu-west-1", "us-east-1", "us-west-2", "ap-south-1"]
TENANTS = [f"tenant-{i:03d}" for i in range(100)]
CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass(frozen=True, slots=True)
class Workload:
    """Serialized batches, and the number of distinct events among them."""

    batches: list[bytes]
    sent: int
    distinct: int


def _events(
    count: int, duplicate_fraction: float, seed: int, now: float
) -> tuple[list[resources_pb2.UsageEvent], int]:
    rng = random.Random(seed)
    events: list[resources_pb2.UsageEvent] = []
    distinct = 0
    for i in range(count):
        if events and rng.random() < duplicate_fraction:
            events.append(events[rng.randrange(len(events))])  # a resend of an earlier event
            continue
        service, usage_type = USAGE_TYPES[rng.randrange(len(USAGE_TYPES))]
        event = resources_pb2.UsageEvent(
            tenant_id=TENANTS[rng.randrange(len(TENANTS))],
            event_id=f"evt-{seed}-{i:09d}",
            service=service,
            usage_type=usage_type,
            quantity=f"{rng.randrange(1, 100_000) / 1000:.3f}",
            dimensions={"region": REGIONS[rng.randrange(len(REGIONS))]},
        )
        event.event_time.FromMicroseconds(int((now - rng.random() * 600) * 1_000_000))
        events.append(event)
        distinct += 1
    return events, distinct


def build(
    count: int, batch_size: int, *, stream: bool, seed: int = 1, duplicate_fraction: float = 0.01
) -> Workload:
    """The workload as serialized IngestUsageRequest or StreamUsageRequest messages."""
    kind = "stream" if stream else "ingest"
    CACHE.mkdir(exist_ok=True)
    # The events are live (their times within the 10 minutes before the workload is built):
    # a workload cached on another day would send only late events, which cost more than
    # live ones where a meter marks the hours they reach back into (time-weighted readings).
    # So a cached workload serves within the UTC hour it was built in.
    hour = int(time.time()) // 3600
    path = CACHE / f"{kind}-{count}-{batch_size}-{seed}-h{hour}.pickle"
    for stale in CACHE.glob(f"{kind}-{count}-{batch_size}-{seed}*.pickle"):
        if stale != path:
            stale.unlink()
    if path.exists():
        cached: Workload = pickle.loads(path.read_bytes())
        return cached
    events, distinct = _events(count, duplicate_fraction, seed, time.time())
    batches = []
    for sequence, start in enumerate(range(0, count, batch_size)):
        chunk = events[start : start + batch_size]
        message = (
            usage_service_pb2.StreamUsageRequest(sequence=sequence, events=chunk)
            if stream
            else usage_service_pb2.IngestUsageRequest(events=chunk)
        )
        batches.append(message.SerializeToString())
    workload = Workload(batches, count, distinct)
    path.write_bytes(pickle.dumps(workload))
    return workload


def rows(
    count: int, seed: int = 1, duplicate_fraction: float = 0.01
) -> list[tuple[str, str, str, str, str, int, str]]:
    """The same events as plain rows (tenant, id, service, type, quantity, time µs, dimensions JSON)."""
    events, _ = _events(count, duplicate_fraction, seed, time.time())
    return [
        (
            e.tenant_id,
            e.event_id,
            e.service,
            e.usage_type,
            e.quantity,
            e.event_time.ToMicroseconds(),
            json.dumps({"region": e.dimensions["region"]}),
        )
        for e in events
    ]

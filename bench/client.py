"""Load generator, run as its own process so that it does not share the server's CPU accounting.

It prepares its work, prints "ready", waits for "go" on stdin, runs, and prints one JSON
line of results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid

import grpc

from bench.workload import build
from tally.v1 import billing_service_pb2, usage_service_pb2

USAGE = "/tally.v1.UsageService/"
METADATA: tuple[tuple[str, str], ...] = ()  # the bearer token, set from --token


def _channels(address: str, count: int, options: list[tuple[str, int]]) -> list[grpc.aio.Channel]:
    """`count` channels with a connection each.

    With `tally serve --workers N` the kernel spreads connections (not calls) over the workers,
    and gRPC would otherwise share one connection.
    """
    return [
        grpc.aio.insecure_channel(address, options=[*options, ("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)
    ]


def _wait_for_go() -> None:
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected go")


async def ingest(
    address: str, method: str, batch: int, streams: int, events: int, connections: int = 1
) -> dict[str, object]:
    """Send `events` events in batches of `batch` over `streams` concurrent calls of `method`.

    `method` is "stream" (StreamUsage) or "ingest" (IngestUsage); the streams take turns on
    `connections` connections. Times from "go" to the last response and returns the elapsed
    seconds, the events sent and distinct, and what the server acknowledged.
    """
    workload = build(events, batch, stream=method == "stream")
    shares = [workload.batches[i::streams] for i in range(streams)]
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    channels = _channels(address, connections, options)
    try:
        for channel in channels:
            await channel.channel_ready()
        _wait_for_go()
        started = time.perf_counter()
        if method == "stream":
            calls = [
                channel.stream_stream(
                    USAGE + "StreamUsage",
                    request_serializer=None,
                    response_deserializer=usage_service_pb2.StreamUsageResponse.FromString,
                )
                for channel in channels
            ]

            async def run(index: int, share: list[bytes]) -> tuple[int, int, int]:
                call = calls[index % len(calls)]

                async def requests():  # type: ignore[no-untyped-def]
                    for message in share:
                        yield message

                accepted = duplicates = acks = 0
                async for ack in call(requests(), metadata=METADATA):
                    accepted += ack.accepted_count
                    duplicates += ack.duplicate_count
                    acks += 1
                return accepted, duplicates, acks
        else:
            client_streams = [
                channel.stream_unary(
                    USAGE + "IngestUsage",
                    request_serializer=None,
                    response_deserializer=usage_service_pb2.IngestUsageResponse.FromString,
                )
                for channel in channels
            ]

            async def run(index: int, share: list[bytes]) -> tuple[int, int, int]:
                client_stream = client_streams[index % len(client_streams)]

                async def requests():  # type: ignore[no-untyped-def]
                    for message in share:
                        yield message

                response = await client_stream(requests(), metadata=METADATA)
                return response.accepted_count, response.duplicate_count, response.batch_count

        results = await asyncio.gather(*[run(i, share) for i, share in enumerate(shares)])
        elapsed = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close()
    return {
        "elapsed": elapsed,
        "sent": workload.sent,
        "distinct": workload.distinct,
        "accepted": sum(r[0] for r in results),
        "duplicates": sum(r[1] for r in results),
        "batches": sum(r[2] for r in results),
    }


def _event(i: int) -> bytes:
    event = usage_service_pb2.ReportUsageRequest()
    e = event.event
    e.tenant_id = f"tenant-{i % 100:03d}"
    e.event_id = f"unary-{uuid.uuid4().hex}"
    e.service, e.usage_type, e.quantity = "analytics", "query", "1"
    return event.SerializeToString()


async def unary_max(
    address: str, concurrency: int, duration: float, connections: int = 1
) -> dict[str, object]:
    """ReportUsage as fast as it goes: `concurrency` calls in flight for `duration` seconds.

    Returns the elapsed seconds, the requests completed and requests per second.
    """
    requests = [_event(i) for i in range(400_000)]
    channels = _channels(address, connections, [])
    try:
        for channel in channels:
            await channel.channel_ready()
        calls = [
            channel.unary_unary(USAGE + "ReportUsage", request_serializer=None, response_deserializer=None)
            for channel in channels
        ]
        _wait_for_go()
        done = 0
        deadline = time.perf_counter() + duration
        started = time.perf_counter()

        async def worker(offset: int) -> None:
            nonlocal done
            i = offset
            call = calls[offset % len(calls)]
            while time.perf_counter() < deadline:
                await call(requests[i % len(requests)], metadata=METADATA)
                done += 1
                i += concurrency

        await asyncio.gather(*[worker(k) for k in range(concurrency)])
        elapsed = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close()
    return {"elapsed": elapsed, "requests": done, "rps": done / elapsed}


async def unary_rate(address: str, rate: float, duration: float) -> dict[str, object]:
    """ReportUsage in an open loop at `rate` requests per second for `duration` seconds.

    Requests start on schedule whatever the latency of earlier ones, so a slow server shows as
    latency rather than a lower rate. Returns the achieved rate and the p50 and p99 latency.
    """
    total = int(rate * duration)
    requests = [_event(i) for i in range(total)]
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        await channel.channel_ready()
        call = channel.unary_unary(USAGE + "ReportUsage", request_serializer=None, response_deserializer=None)
        for warm in requests[:200]:  # warm the connection pool and code paths
            await call(warm.replace(b"unary-", b"warmu-"), metadata=METADATA)
        _wait_for_go()
        started = time.perf_counter()
        tasks = set()

        async def one(message: bytes) -> None:
            sent = time.perf_counter()
            await call(message, metadata=METADATA)
            latencies.append(time.perf_counter() - sent)

        # Open loop: requests start on schedule whatever the latency of earlier ones.
        for i, message in enumerate(requests):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "elapsed": elapsed,
        "requests": len(latencies),
        "achieved_rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


_BUCKETS = {"summary-total": 0, "summary-hour": 1, "summary-day": 2, "summary-month": 3}


async def query(
    address: str,
    kind: str,
    tenant: str,
    start: int,
    end: int,
    count: int,
    meters: list[str] | None = None,
    fields: list[str] | None = None,
) -> dict[str, object]:
    """`count` sequential reads of `tenant`'s usage over [start, end) (seconds since the epoch).

    `kind` is a summary bucket ("summary-hour"...), "invoice" (GenerateInvoice) or "preview"
    (PreviewInvoice of the open period); a summary's `fields` are its read_mask. Returns
    the p50 and p99 latency and the response size.
    """
    from google.protobuf.timestamp_pb2 import Timestamp

    def ts(seconds: int) -> Timestamp:
        return Timestamp(seconds=seconds)

    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        await channel.channel_ready()
        if kind == "preview":
            call = channel.unary_unary(
                "/tally.v1.BillingService/PreviewInvoice",
                request_serializer=billing_service_pb2.PreviewInvoiceRequest.SerializeToString,
                response_deserializer=billing_service_pb2.PreviewInvoiceResponse.FromString,
            )
            request: object = billing_service_pb2.PreviewInvoiceRequest(parent=f"tenants/{tenant}")
        elif kind == "invoice":
            call = channel.unary_unary(
                "/tally.v1.BillingService/GenerateInvoice",
                request_serializer=billing_service_pb2.GenerateInvoiceRequest.SerializeToString,
                response_deserializer=billing_service_pb2.GenerateInvoiceResponse.FromString,
            )
            request = billing_service_pb2.GenerateInvoiceRequest(
                parent=f"tenants/{tenant}", period_start_time=ts(start), period_end_time=ts(end)
            )
        else:
            call = channel.unary_unary(
                USAGE + "GetUsageSummary",
                request_serializer=usage_service_pb2.GetUsageSummaryRequest.SerializeToString,
                response_deserializer=usage_service_pb2.GetUsageSummaryResponse.FromString,
            )
            request = usage_service_pb2.GetUsageSummaryRequest(
                name=f"tenants/{tenant}/usageSummary",
                start_time=ts(start),
                end_time=ts(end),
                bucket=_BUCKETS[kind],  # type: ignore[arg-type]
                meters=meters or [],
            )
            if fields:
                request.read_mask.paths.extend(fields)
        await call(request, metadata=METADATA)  # warm up
        _wait_for_go()
        latencies = []
        size = 0
        for _ in range(count):
            sent = time.perf_counter()
            response = await call(request, metadata=METADATA)
            latencies.append(time.perf_counter() - sent)
            size = response.ByteSize()
    latencies.sort()
    return {
        "count": count,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
        "response_bytes": size,
    }


def main() -> None:
    """Parse the command line, run one load and print its results as one JSON line."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ingest")
    p.add_argument("--address", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--method", choices=["stream", "ingest"], required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--streams", type=int, required=True)
    p.add_argument("--events", type=int, required=True)
    p.add_argument("--connections", type=int, default=1, help="streams take turns on this many connections")
    p = sub.add_parser("unary-max")
    p.add_argument("--address", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--duration", type=float, default=10)
    p = sub.add_parser("unary-rate")
    p.add_argument("--address", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--rate", type=float, default=1000)
    p.add_argument("--duration", type=float, default=10)
    p = sub.add_parser("query")
    p.add_argument("--address", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--kind", choices=[*_BUCKETS, "invoice", "preview"], required=True)
    p.add_argument("--tenant", required=True)
    p.add_argument("--start", type=int, required=True)
    p.add_argument("--end", type=int, required=True)
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--meters", default="", help="comma-separated meter names to report")
    p.add_argument("--fields", default="", help="comma-separated read_mask paths of a summary (default: all)")
    args = parser.parse_args()
    global METADATA
    METADATA = (("authorization", f"Bearer {args.token}"),)
    if args.command == "ingest":
        result = asyncio.run(
            ingest(args.address, args.method, args.batch, args.streams, args.events, args.connections)
        )
    elif args.command == "unary-max":
        result = asyncio.run(unary_max(args.address, args.concurrency, args.duration, args.connections))
    elif args.command == "unary-rate":
        result = asyncio.run(unary_rate(args.address, args.rate, args.duration))
    else:
        meters = [m for m in args.meters.split(",") if m]
        fields = [f for f in args.fields.split(",") if f]
        result = asyncio.run(
            query(args.address, args.kind, args.tenant, args.start, args.end, args.count, meters, fields)
        )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

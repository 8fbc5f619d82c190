"""Commands for meters (MeterService) and for cancelling an event (UsageService.CancelEvent).

Over the generated stubs through the client's call path, as tally_client.cli.lifecycle;
a change sends one request_id on every attempt, so a retry never applies it twice.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tally.v1 import meter_service_pb2, resources_pb2, usage_service_pb2
from tally_client import convert
from tally_client.cli.billing import pages
from tally_client.cli.commands import connect
from tally_client.cli.lifecycle import call, plain_proto
from tally_client.cli.output import print_json, print_table, text
from tally_client.connection import new_request_id

METERS = "meters/"
AGGREGATION = "METER_AGGREGATION_"
# The --aggregation choices: the MeterAggregation values, in lower case.
AGGREGATIONS = [
    name.removeprefix(AGGREGATION).lower()
    for name in resources_pb2.MeterAggregation.keys()
    if name != f"{AGGREGATION}UNSPECIFIED"
]


def meter_name(text: str) -> str:
    return text if text.startswith(METERS) else METERS + text


def _aggregation(meter: resources_pb2.Meter) -> str:
    return resources_pb2.MeterAggregation.Name(meter.aggregation).removeprefix(AGGREGATION).lower()


def _show_meters(meters: Sequence[resources_pb2.Meter], output: str, *, title: str | None = None) -> None:
    print_table(
        ["meter", "service", "usage type", "aggregation", "filter", "group by", "state", "created"],
        [
            [
                meter.meter_id,
                meter.service,
                meter.usage_type,
                _aggregation(meter) + (f"({meter.value_dimension})" if meter.value_dimension else ""),
                ", ".join(f"{key}={value}" for key, value in sorted(meter.filter.items())),
                ", ".join(meter.group_by_dimensions),
                resources_pb2.MeterState.Name(meter.state).removeprefix("METER_STATE_").lower(),
                convert.from_timestamp(meter.create_time),
            ]
            for meter in meters
        ],
        title=title,
    )


def _show_meter(meter: resources_pb2.Meter, output: str) -> None:
    if output == "json":
        print_json(plain_proto(meter))
        return
    _show_meters([meter], output, title=meter.name + (f": {meter.description}" if meter.description else ""))


def meters_create(args: argparse.Namespace) -> None:
    meter = resources_pb2.Meter(
        meter_id=args.meter.removeprefix(METERS),
        description=args.description,
        service=args.service,
        usage_type=args.usage_type,
        filter=dict(args.filter),
        aggregation=resources_pb2.MeterAggregation.Value(AGGREGATION + args.aggregation.upper()),
        value_dimension=args.value_dimension,
        group_by_dimensions=args.group_by,
    )
    request = meter_service_pb2.CreateMeterRequest(meter=meter, request_id=new_request_id())
    with connect(args) as client:
        _show_meter(call(client, "CreateMeter", request, "meters").meter, args.output)


def meters_list(args: argparse.Namespace) -> None:
    with connect(args) as client:
        meters = list(pages(client, "ListMeters", meter_service_pb2.ListMetersRequest(), "meters", "meters"))
    if args.output == "json":
        print_json([plain_proto(meter) for meter in meters])
        return
    _show_meters(meters, args.output)


def meters_show(args: argparse.Namespace) -> None:
    request = meter_service_pb2.GetMeterRequest(name=meter_name(args.meter))
    with connect(args) as client:
        _show_meter(call(client, "GetMeter", request, "meters").meter, args.output)


def meters_archive(args: argparse.Namespace) -> None:
    request = meter_service_pb2.ArchiveMeterRequest(name=meter_name(args.meter), request_id=new_request_id())
    with connect(args) as client:
        _show_meter(call(client, "ArchiveMeter", request, "meters").meter, args.output)


def cancel(args: argparse.Namespace) -> None:
    request = usage_service_pb2.CancelEventRequest(
        tenant_id=args.tenant, event_id=args.event_id, request_id=new_request_id()
    )
    with connect(args) as client:
        response = call(client, "CancelEvent", request, "usage")
    cancel_time = convert.from_timestamp(response.cancel_time)
    if args.output == "json":
        print_json(
            {"tenant_id": response.tenant_id, "event_id": response.event_id, "cancel_time": cancel_time}
        )
    else:
        print(f"cancelled: tenant {response.tenant_id}, event {response.event_id}, at {text(cancel_time)}")

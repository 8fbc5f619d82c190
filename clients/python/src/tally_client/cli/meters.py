"""Commands for meters (MeterService) and for cancelling an event (UsageService.CancelEvent).

`cancel` is the typed client's cancel_event. The meter commands print the protos
themselves (their JSON form), so they call the generated stubs through the client's call
path, as tally_client.cli.lifecycle does; a change sends one request_id on every attempt,
so a retry never applies it twice.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tally.v1 import meter_service_pb2, resources_pb2
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
    """The resource name of a meter given by id or by name ("meters/{meter}")."""
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
    """`tally meters create`: a meter over one usage type, printed as the server stored it."""
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
    """`tally meters list`: every meter, active and archived."""
    with connect(args) as client:
        meters = list(pages(client, "ListMeters", meter_service_pb2.ListMetersRequest(), "meters", "meters"))
    if args.output == "json":
        print_json([plain_proto(meter) for meter in meters])
        return
    _show_meters(meters, args.output)


def meters_show(args: argparse.Namespace) -> None:
    """`tally meters show`: one meter."""
    request = meter_service_pb2.GetMeterRequest(name=meter_name(args.meter))
    with connect(args) as client:
        _show_meter(call(client, "GetMeter", request, "meters").meter, args.output)


def meters_archive(args: argparse.Namespace) -> None:
    """`tally meters archive`: stop a meter counting new events; what it counted stays readable."""
    request = meter_service_pb2.ArchiveMeterRequest(name=meter_name(args.meter), request_id=new_request_id())
    with connect(args) as client:
        _show_meter(call(client, "ArchiveMeter", request, "meters").meter, args.output)


def cancel(args: argparse.Namespace) -> None:
    """`tally cancel`: cancel a recorded event; cancelling again answers the first cancellation's time."""
    with connect(args) as client:
        cancelled = client.cancel_event(args.tenant, args.event_id)
    if args.output == "json":
        print_json(cancelled)
    else:
        print(
            f"cancelled: tenant {cancelled.tenant_id}, event {cancelled.event_id}, "
            f"at {text(cancelled.cancel_time)}"
        )

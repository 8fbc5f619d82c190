"""Commands for the invoice lifecycle actions and for plans.

Through `call` and `plain_proto`, this module also serves tally_client.cli.billing and .meters.

The invoice actions are the typed client's (finalize_invoice, void_invoice...): one
request_id on every attempt, so a retry never applies an action twice. Plans are printed
from their protos, so that `plans show -o json` is the proto's JSON form that `--charges`
files take back and exact decimal strings stay strings: those commands call the generated
stubs through the client's own call path (its deadline, retries and typed errors).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from tally.v1 import billing_service_pb2, resources_pb2
from tally_client import convert
from tally_client.cli.commands import connect, invoice_ref, show_invoice
from tally_client.cli.output import print_json, print_table
from tally_client.client import TallyClient
from tally_client.models import Invoice

PLANS = "plans/"

# The INVOICE ACTION commands: the client's method for each, taking the tenant and invoice ids.
INVOICE_ACTIONS: dict[str, Callable[[TallyClient, str, str], Invoice]] = {
    "finalize": TallyClient.finalize_invoice,
    "void": TallyClient.void_invoice,
    "mark-paid": TallyClient.mark_invoice_paid,
    "mark-uncollectible": TallyClient.mark_invoice_uncollectible,
}


def call(client: TallyClient, method: str, request: Message, service: str = "billing") -> Any:
    """Call BillingService (or `service` "meters"/"usage") `method` through the client's call path.

    That path brings its deadline, retries and typed errors to the commands that print the
    protos themselves (plans, profiles, credit notes, meters).
    """
    stubs: dict[str, Any] = {"billing": client._billing, "usage": client._usage, "meters": client._meters}
    return client._call(getattr(stubs[service], method), request)


def invoice_action(action: str) -> Callable[[argparse.Namespace], None]:
    """The handler of `tally invoices <action>` (finalize, void, mark-paid, mark-uncollectible)."""
    act = INVOICE_ACTIONS[action]

    def handler(args: argparse.Namespace) -> None:
        tenant, invoice_id = invoice_ref(args)
        with connect(args) as client:
            invoice = act(client, tenant, invoice_id)
        show_invoice(invoice, args.output)

    return handler


def plain_proto(message: Message) -> dict[str, Any]:
    """A proto message as JSON-ready values, with the proto's field names (decimal strings stay strings)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _plans(client: TallyClient) -> Iterator[resources_pb2.Plan]:
    request = billing_service_pb2.ListPlansRequest()
    while True:
        response = call(client, "ListPlans", request)
        yield from response.plans
        if not response.next_page_token:
            return
        request.page_token = response.next_page_token


def plans_list(args: argparse.Namespace) -> None:
    """`tally plans list`: every plan, "default" first, with its number of versions."""
    with connect(args) as client:
        plans = list(_plans(client))
    if args.output == "json":
        print_json([plain_proto(plan) for plan in plans])
        return
    print_table(
        ["plan", "display name", "currency", "versions", "latest from"],
        [
            [
                plan.name.removeprefix(PLANS),
                plan.display_name,
                plan.currency_code,
                len(plan.versions),
                convert.from_timestamp(plan.versions[-1].effective_time) if plan.versions else None,
            ]
            for plan in plans
        ],
    )


def plans_show(args: argparse.Namespace) -> None:
    """`tally plans show`: one plan's versions and charges."""
    name = args.plan if args.plan.startswith(PLANS) else PLANS + args.plan
    with connect(args) as client:
        plan = call(client, "GetPlan", billing_service_pb2.GetPlanRequest(name=name)).plan
    plans_show_plan(plan, args.output)


def plans_show_plan(plan: resources_pb2.Plan, output: str) -> None:
    """A plan's versions and charges (or the plan as JSON)."""
    if output == "json":
        print_json(plain_proto(plan))
        return
    title = f"{plan.name}: {plan.display_name} ({plan.currency_code})"
    rows = []
    for version in plan.versions:
        effective = convert.from_timestamp(version.effective_time)
        for charge in version.charges:
            price = charge.WhichOneof("model") or ""
            measures = charge.WhichOneof("measures")
            if measures == "usage_type":
                target = f"{charge.usage_type.service}/{charge.usage_type.usage_type}"
            else:  # a meter's name, or nothing (a flat fee)
                target = charge.meter
            rows.append([version.version, effective, charge.key, target, price, charge.included_quantity])
    print_table(["version", "effective from", "charge", "measures", "price", "included"], rows, title=title)
    print("prices in full: --output json")

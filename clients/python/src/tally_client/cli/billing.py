"""Commands for credit notes, billing profiles, invoice preview, period close and plan changes.

Preview and period close are the typed client's calls. The others print the protos
themselves, so like tally_client.cli.lifecycle they call the generated stubs through the
client's call path (deadline, retries, typed errors). Every change sends one request_id on
every attempt, so a retry never applies it twice. Prices and amounts stay the exact
decimal strings of the protos; charges and price overrides are read from JSON files in
the protos' JSON form (the same shape that `--output json` prints).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from tally.v1 import billing_service_pb2, resources_pb2
from tally_client import convert
from tally_client.cli import UsageError
from tally_client.cli.commands import connect, invoice_ref, show_invoice
from tally_client.cli.lifecycle import PLANS, call, plain_proto, plans_show_plan
from tally_client.cli.output import print_json, print_table, text
from tally_client.client import TallyClient
from tally_client.connection import new_request_id
from tally_client.names import invoice_name, tenant_name

CREDIT_NOTES = "/creditNotes/"


def pages(
    client: TallyClient, method: str, request: Any, field: str, service: str = "billing"
) -> Iterator[Any]:
    """Every item of a List call, page after page."""
    while True:
        response = call(client, method, request, service)
        yield from getattr(response, field)
        if not response.next_page_token:
            return
        request.page_token = response.next_page_token


def read_json_messages(path: str, message_type: type[Message], what: str) -> list[Any]:
    """A JSON file holding a list of `message_type` in the protos' JSON form; UsageError if it is not."""
    try:
        with open(path, encoding="utf-8") as file:
            items = json.load(file)
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{what}: cannot read {path}: {exc}") from None
    if not isinstance(items, list):
        raise UsageError(f"{what}: {path} must hold a JSON list")
    messages = []
    for index, item in enumerate(items):
        try:
            messages.append(json_format.ParseDict(item, message_type()))
        except json_format.ParseError as exc:
            raise UsageError(f"{what}: item {index} of {path}: {exc}") from None
    return messages


# -- credit notes ------------------------------------------------------------------------


def _credit_note_rows(notes: Sequence[resources_pb2.CreditNote]) -> list[list[object]]:
    return [
        [
            note.name.rpartition(CREDIT_NOTES)[2],
            note.number,
            note.invoice.rpartition("/")[2],
            note.amount,
            note.currency_code,
            note.reason,
            convert.from_timestamp(note.create_time),
        ]
        for note in notes
    ]


CREDIT_NOTE_COLUMNS = ["credit note", "number", "invoice", "amount", "currency", "reason", "created"]


def credit_notes_create(args: argparse.Namespace) -> None:
    """`tally credit-notes create`: credit part or all of an invoice and print the credit note."""
    tenant, invoice_id = invoice_ref(args)
    request = billing_service_pb2.CreateCreditNoteRequest(
        invoice=invoice_name(tenant, invoice_id),
        amount=text(args.amount),
        reason=args.reason,
        request_id=new_request_id(),
    )
    with connect(args) as client:
        note = call(client, "CreateCreditNote", request).credit_note
    if args.output == "json":
        print_json(plain_proto(note))
        return
    print(f"created {note.name}")
    print_table(CREDIT_NOTE_COLUMNS, _credit_note_rows([note]))


def credit_notes_list(args: argparse.Namespace) -> None:
    """`tally credit-notes list`: a tenant's credit notes, every page of them."""
    request = billing_service_pb2.ListCreditNotesRequest(parent=tenant_name(args.tenant))
    with connect(args) as client:
        notes = list(pages(client, "ListCreditNotes", request, "credit_notes"))
    if args.output == "json":
        print_json([plain_proto(note) for note in notes])
        return
    print_table(CREDIT_NOTE_COLUMNS, _credit_note_rows(notes), title=f"credit notes of {args.tenant}")


# -- billing profiles --------------------------------------------------------------------


def _profile_name(tenant: str) -> str:
    return f"{tenant_name(tenant)}/billingProfile"


def _show_profile(profile: resources_pb2.BillingProfile, output: str) -> None:
    if output == "json":
        print_json(plain_proto(profile))
        return
    times = ("billing_start_time", "closed_until_time", "create_time", "update_time")
    rows: list[list[object]] = [
        ["display name", profile.display_name],
        ["email", profile.email],
        ["currency", profile.currency_code],
        ["plan", profile.plan.removeprefix(PLANS)],
        ["anchor day", profile.billing_anchor_day],
        ["tax percentage", profile.tax_percentage],
        ["spend threshold", profile.spend_threshold],
        ["price overrides", ", ".join(o.charge_key for o in profile.price_overrides)],
        *[
            [name.removesuffix("_time").replace("_", " "), convert.from_timestamp(getattr(profile, name))]
            for name in times
            if profile.HasField(name)  # type: ignore[arg-type]
        ],
    ]
    print_table(["field", "value"], rows, title=profile.name)


def profiles_show(args: argparse.Namespace) -> None:
    """`tally profiles show`: a tenant's billing profile."""
    request = billing_service_pb2.GetBillingProfileRequest(name=_profile_name(args.tenant))
    with connect(args) as client:
        profile = call(client, "GetBillingProfile", request).billing_profile
    _show_profile(profile, args.output)


def profiles_set(args: argparse.Namespace) -> None:
    """`tally profiles set`: create or replace a tenant's billing profile, then print it.

    A plan given by id is sent as its name ("plans/{plan}").
    """
    profile = resources_pb2.BillingProfile(
        name=_profile_name(args.tenant),
        display_name=args.display_name,
        email=args.email,
        currency_code=args.currency,
        plan=args.plan if not args.plan or args.plan.startswith(PLANS) else PLANS + args.plan,
        billing_anchor_day=args.anchor_day,
        tax_percentage="" if args.tax_percentage is None else text(args.tax_percentage),
        spend_threshold="" if args.spend_threshold is None else text(args.spend_threshold),
    )
    if args.plan_effective is not None:
        profile.plan_effective_time.CopyFrom(convert.timestamp(args.plan_effective, "--plan-effective"))
    if args.billing_start is not None:
        profile.billing_start_time.CopyFrom(convert.timestamp(args.billing_start, "--billing-start"))
    if args.price_overrides:
        profile.price_overrides.extend(
            read_json_messages(args.price_overrides, resources_pb2.PriceOverride, "--price-overrides")
        )
    request = billing_service_pb2.SetBillingProfileRequest(
        billing_profile=profile, request_id=new_request_id()
    )
    with connect(args) as client:
        stored = call(client, "SetBillingProfile", request).billing_profile
    _show_profile(stored, args.output)


# -- the open period ---------------------------------------------------------------------


def invoices_preview(args: argparse.Namespace) -> None:
    """`tally invoices preview`: the open period's invoice priced now (not stored)."""
    with connect(args) as client:
        invoice = client.preview_invoice(args.tenant)
    if args.output != "json":
        print(f"open period of {args.tenant} so far (a preview: not stored)")
    show_invoice(invoice, args.output)


def invoices_close_period(args: argparse.Namespace) -> None:
    """`tally invoices close-period`: close the tenant's oldest open period and print its invoice."""
    with connect(args) as client:
        invoice = client.close_period(args.tenant)
    show_invoice(invoice, args.output)


# -- plans -------------------------------------------------------------------------------


def _charges(args: argparse.Namespace) -> list[resources_pb2.Charge]:
    if not args.charges:
        return []
    return read_json_messages(args.charges, resources_pb2.Charge, "--charges")


def plans_create(args: argparse.Namespace) -> None:
    """`tally plans create`: a plan with its first version, printed as the server stored it."""
    request = billing_service_pb2.CreatePlanRequest(
        plan_id=args.plan.removeprefix(PLANS),
        display_name=args.display_name,
        currency_code=args.currency,
        charges=_charges(args),
        minimum_amount="" if args.minimum is None else text(args.minimum),
        request_id=new_request_id(),
    )
    if args.effective is not None:
        request.effective_time.CopyFrom(convert.timestamp(args.effective, "--effective"))
    with connect(args) as client:
        plan = call(client, "CreatePlan", request).plan
    plans_show_plan(plan, args.output)


def plans_add_version(args: argparse.Namespace) -> None:
    """`tally plans add-version`: new charges for a plan from an effective time on."""
    name = args.plan if args.plan.startswith(PLANS) else PLANS + args.plan
    request = billing_service_pb2.CreatePlanVersionRequest(
        parent=name,
        charges=_charges(args),
        minimum_amount="" if args.minimum is None else text(args.minimum),
        request_id=new_request_id(),
    )
    if args.effective is not None:
        request.effective_time.CopyFrom(convert.timestamp(args.effective, "--effective"))
    with connect(args) as client:
        plan = call(client, "CreatePlanVersion", request).plan
    plans_show_plan(plan, args.output)

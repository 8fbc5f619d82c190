"""The `tally` command line: the client commands' flags, and the other distributions' commands.

Only the standard library is imported here, so `tally --help` is quick: each command's
handler imports the client (and gRPC) when it runs. Commands of other distributions
(the server's `serve`, `token` and `retention`) are found through the `tally.commands`
entry point group: each entry point is a function that adds its subcommands to the
subparsers it is given, with a `handler` default taking the parsed arguments.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from importlib.metadata import entry_points

COMMANDS_GROUP = "tally.commands"
TENANT_ENV = "TALLY_TENANT"

Handler = Callable[[argparse.Namespace], int | None]


def _lazy(function: str, module: str = "commands", *arguments: str) -> Handler:
    """The handler `function` of tally_client.cli.<module>, imported when the command runs.

    If `arguments` are given, `function` is a factory of handlers, called with them first.
    """

    def handler(args: argparse.Namespace) -> int | None:
        found = getattr(importlib.import_module(f"tally_client.cli.{module}"), function)
        result: int | None = (found(*arguments) if arguments else found)(args)
        return result

    return handler


# The invoice lifecycle actions (tally_client.cli.lifecycle.INVOICE_ACTIONS) and what each does.
INVOICE_ACTIONS = {
    "finalize": "freeze a draft invoice and give it its number (FinalizeInvoice)",
    "void": "void a draft, finalized or uncollectible invoice (VoidInvoice)",
    "mark-paid": "mark a finalized or uncollectible invoice paid (MarkInvoicePaid)",
    "mark-uncollectible": "mark a finalized invoice uncollectible (MarkInvoiceUncollectible)",
}


def utc_time(text: str) -> datetime:
    """An ISO 8601 time or date; without an offset it is UTC (e.g. 2026-11-01 or 2026-11-01T10:00)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time like 2026-11-01T10:00:00Z or a date like 2026-11-01"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def exact_number(text: str) -> Decimal:
    """A decimal number, read exactly (never through a float)."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a decimal number") from None
    if not value.is_finite():
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def dimension(text: str) -> tuple[str, str]:
    """An argparse type: KEY=VALUE as (key, value); the value may be empty, the key may not."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dimension like region=eu")
    return key, value


def _common() -> argparse.ArgumentParser:
    """The flags of every client command: where the server is, who is calling, how to print."""
    common = argparse.ArgumentParser(add_help=False)
    server = common.add_argument_group("server")
    server.add_argument(
        "--addr",
        help="the server's host:port (env TALLY_ADDR; default localhost:50051)",
    )
    server.add_argument(
        "--token", help="bearer token, e.g. from `tally token` (env TALLY_TOKEN); unset: calls carry none"
    )
    server.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's root certificates"
    )
    server.add_argument(
        "--ca-cert",
        metavar="FILE",
        help="PEM root certificates to trust instead of the system's; implies --tls",
    )
    server.add_argument(
        "--timeout", type=float, default=30.0, help="deadline of each call in seconds (default 30)"
    )
    common.add_argument(
        "--output",
        "-o",
        choices=("table", "json"),
        default="table",
        help="table (or text) for people, json for programs: exact numbers as strings, times in UTC",
    )
    return common


def _tenant(parser: argparse.ArgumentParser, what: str) -> None:
    default = os.environ.get(TENANT_ENV) or None
    parser.add_argument(
        "--tenant",
        default=default,
        required=default is None,
        metavar="TENANT_ID",
        help=f"{what} (env {TENANT_ENV})",
    )


def _period(parser: argparse.ArgumentParser, start_default: str, end_default: str) -> None:
    parser.add_argument(
        "--start",
        type=utc_time,
        metavar="TIME",
        help=f"start, inclusive, a whole UTC hour: ISO 8601 time or date, UTC unless it has an offset "
        f"(default {start_default})",
    )
    parser.add_argument(
        "--end",
        type=utc_time,
        metavar="TIME",
        help=f"end, exclusive, a whole UTC hour (default {end_default})",
    )


def _add_report(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    report = commands.add_parser(
        "report",
        parents=[common],
        help="record one usage event",
        description="Record one usage event (ReportUsage). Sending the same tenant and event id again is "
        "safe: the answer is `duplicate` and nothing is counted twice.",
    )
    _tenant(report, "the tenant that used it")
    report.add_argument(
        "--event-id",
        help="idempotency key of the event; default: a random one, printed so that a retry can reuse it",
    )
    report.add_argument("--service", required=True, help="the metered service, e.g. analytics")
    report.add_argument("--usage-type", required=True, help="what was used, e.g. query")
    report.add_argument("--quantity", required=True, type=exact_number, help="how much, an exact decimal")
    report.add_argument(
        "--time",
        type=utc_time,
        metavar="TIME",
        help="when it was used, ISO 8601, UTC unless it has an offset (default: when the server receives it)",
    )
    report.add_argument(
        "-d",
        "--dimension",
        type=dimension,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dimension of the event, e.g. -d region=eu (repeatable)",
    )
    report.set_defaults(handler=_lazy("report"))


def _add_ingest(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    ingest = commands.add_parser(
        "ingest",
        parents=[common],
        help="stream a file of usage events to the server",
        description="Send the events of a JSON Lines or CSV file (or stdin) through the batching ingester "
        "(StreamUsage), then print how many were accepted, duplicate and rejected. A JSON line is an "
        'object like {"tenant_id": "acme", "event_id": "e-1", "service": "analytics", "usage_type": '
        '"query", "quantity": "2.5", "event_time": "2026-11-01T10:00:00Z", "dimensions": {"region": "eu"}}; '
        "a CSV file has a header row with those names, dimensions as dimensions.KEY columns. Every event "
        "needs its event_id, so that running the same file again counts nothing twice. Exits 1 if any "
        "event was rejected or not acknowledged.",
    )
    ingest.add_argument("file", metavar="FILE", help="the events; - reads stdin")
    ingest.add_argument(
        "--format",
        choices=("jsonl", "csv"),
        help="the file's format (default: csv for a .csv file, else jsonl)",
    )
    ingest.add_argument(
        "--tenant",
        default=os.environ.get(TENANT_ENV) or None,
        metavar="TENANT_ID",
        help=f"tenant of events that name none (env {TENANT_ENV})",
    )
    ingest.add_argument("--batch-size", type=int, default=500, help="events per batch (default 500)")
    ingest.add_argument(
        "--wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="give up when the server acknowledges nothing for this long (default 120); the events not "
        "acknowledged are counted, and running the same file again is safe",
    )
    ingest.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )
    ingest.set_defaults(handler=_lazy("ingest"))


def _add_summary(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    summary = commands.add_parser(
        "summary",
        parents=[common],
        help="a tenant's usage over a period, as a table",
        description="A tenant's usage per service and usage type (GetUsageSummary), optionally per time "
        "bucket and per value of one dimension.",
    )
    _tenant(summary, "whose usage")
    _period(summary, "the start of this UTC month", "the next whole UTC hour")
    summary.add_argument(
        "--bucket", choices=("hour", "day", "month"), help="one row per UTC hour, day or month"
    )
    summary.add_argument(
        "--group-by", metavar="DIMENSION", default="", help="one row per value of a dimension"
    )
    summary.add_argument(
        "--meter",
        action="append",
        default=[],
        metavar="METER",
        help="also the value of this meter, in a table of its own (repeatable, at most 20)",
    )
    summary.set_defaults(handler=_lazy("summary"))


def _add_invoices(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    invoices = commands.add_parser(
        "invoices",
        help="list, show, generate and preview invoices; finalize, void, mark paid or uncollectible; "
        "close a period",
    )
    actions = invoices.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="a tenant's invoices, newest period first")
    _tenant(listing, "whose invoices")
    listing.set_defaults(handler=_lazy("invoices_list"))
    show = actions.add_parser("show", parents=[common], help="one invoice with its line items")
    show.add_argument("invoice", metavar="INVOICE", help="invoice id, or name tenants/T/invoices/I")
    show.add_argument(
        "--tenant",
        default=os.environ.get(TENANT_ENV) or None,
        metavar="TENANT_ID",
        help=f"whose invoice, unless INVOICE is a full name (env {TENANT_ENV})",
    )
    show.set_defaults(handler=_lazy("invoices_show"))
    show.description = "GetInvoice: the invoice, its line items and, once finalized, its payment state."
    for action, what in INVOICE_ACTIONS.items():
        acting = actions.add_parser(
            action, parents=[common], help=what, description=what[0].upper() + what[1:] + "."
        )
        acting.add_argument("invoice", metavar="INVOICE", help="invoice id, or name tenants/T/invoices/I")
        acting.add_argument(
            "--tenant",
            default=os.environ.get(TENANT_ENV) or None,
            metavar="TENANT_ID",
            help=f"whose invoice, unless INVOICE is a full name (env {TENANT_ENV})",
        )
        acting.set_defaults(handler=_lazy("invoice_action", "lifecycle", action))
    generate = actions.add_parser(
        "generate",
        parents=[common],
        help="create (or recompute) a tenant's invoice for a period",
        description="Create the tenant's invoice for the period, or recompute the draft that covers it "
        "(GenerateInvoice).",
    )
    _tenant(generate, "whose invoice")
    _period(generate, "the start of last UTC month", "the start of this UTC month")
    generate.set_defaults(handler=_lazy("invoices_generate"))
    preview = actions.add_parser(
        "preview",
        parents=[common],
        help="what a tenant owes so far in its open period (not stored)",
        description="The open period's invoice as it stands now, priced live and not stored "
        "(PreviewInvoice).",
    )
    _tenant(preview, "whose open period")
    preview.set_defaults(handler=_lazy("invoices_preview", "billing"))
    close = actions.add_parser(
        "close-period",
        parents=[common],
        help="close a tenant's oldest open period now: its invoice, finalized",
        description="Close the tenant's oldest open period now, even before it ends: its invoice is "
        "generated and finalized (ClosePeriod); later usage for it goes on the next invoice. Needs a "
        "billing profile.",
    )
    _tenant(close, "whose period")
    close.set_defaults(handler=_lazy("invoices_close_period", "billing"))


def _add_rates(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    rates = commands.add_parser("rates", help="list and set prices")
    actions = rates.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="the rate card")
    listing.add_argument(
        "--as-of", type=utc_time, metavar="TIME", help="the card in effect then (default now)"
    )
    listing.add_argument(
        "--history", action="store_true", help="every rate ever set, not only those in effect"
    )
    listing.set_defaults(handler=_lazy("rates_list"))
    setting = actions.add_parser(
        "set", parents=[common], help="set a unit price from a time on", description="Set a price (SetRate)."
    )
    setting.add_argument("service")
    setting.add_argument("usage_type", metavar="USAGE_TYPE")
    setting.add_argument("unit_price", metavar="UNIT_PRICE", type=exact_number, help="an exact decimal")
    setting.add_argument("--currency", default="", help="ISO 4217 code (default: the server's currency)")
    setting.add_argument(
        "--effective", type=utc_time, metavar="TIME", help="from when (default: the next whole UTC hour)"
    )
    setting.set_defaults(handler=_lazy("rates_set"))


def _add_plans(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    plans = commands.add_parser("plans", help="list, show and create price plans and their versions")
    actions = plans.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help='the plans, "default" first (ListPlans)')
    listing.set_defaults(handler=_lazy("plans_list", "lifecycle"))
    show = actions.add_parser("show", parents=[common], help="one plan's versions and charges (GetPlan)")
    show.add_argument("plan", metavar="PLAN", help="plan id, or name plans/P")
    show.set_defaults(handler=_lazy("plans_show", "lifecycle"))
    charges_help = (
        "JSON list of charges, as Charge in the protos' JSON form, e.g. "
        '[{"key": "api/requests", "usage_type": {"service": "api", "usage_type": "requests"}, '
        '"per_unit": {"unit_price": "0.01"}}] (the shape `plans show -o json` prints); a charge on a meter '
        'names it instead of a usage type: "meter": "meters/active-users"'
    )
    create = actions.add_parser(
        "create",
        parents=[common],
        help="a plan with its first version (CreatePlan)",
        description="Create a plan with its first version (CreatePlan); plans are shared by all tenants.",
    )
    create.add_argument("plan", metavar="PLAN", help="its id: a-z, 0-9 and -, starting with a letter")
    create.add_argument("--display-name", required=True, help="name for people")
    create.add_argument("--currency", required=True, help="ISO 4217 code of every price")
    version = actions.add_parser(
        "add-version",
        parents=[common],
        help="new charges for a plan from a time on (CreatePlanVersion)",
        description="Add a version to a plan from an effective time on (CreatePlanVersion).",
    )
    version.add_argument("plan", metavar="PLAN", help="plan id, or name plans/P")
    for parser, effective in ((create, "this hour"), (version, "the next hour")):
        parser.add_argument("--charges", metavar="FILE", help=charges_help)
        parser.add_argument(
            "--minimum", type=exact_number, metavar="AMOUNT", help="minimum commitment per period (default 0)"
        )
        parser.add_argument(
            "--effective",
            type=utc_time,
            metavar="TIME",
            help=f"from when, a whole UTC hour (default {effective})",
        )
    create.set_defaults(handler=_lazy("plans_create", "billing"))
    version.set_defaults(handler=_lazy("plans_add_version", "billing"))


def _invoice_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("invoice", metavar="INVOICE", help="invoice id, or name tenants/T/invoices/I")
    parser.add_argument(
        "--tenant",
        default=os.environ.get(TENANT_ENV) or None,
        metavar="TENANT_ID",
        help=f"whose invoice, unless INVOICE is a full name (env {TENANT_ENV})",
    )


def _add_credit_notes(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    notes = commands.add_parser("credit-notes", help="credit an invoice; list a tenant's credit notes")
    actions = notes.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        parents=[common],
        help="credit part or all of a finalized invoice",
        description="Credit part or all of a finalized, paid or uncollectible invoice (CreateCreditNote). "
        "The credit notes of an invoice never exceed its total.",
    )
    _invoice_argument(create)
    create.add_argument(
        "--amount",
        required=True,
        type=exact_number,
        help="amount to credit in the invoice's currency, an exact decimal",
    )
    create.add_argument("--reason", required=True, help="why, printed on the credit note")
    create.set_defaults(handler=_lazy("credit_notes_create", "billing"))
    listing = actions.add_parser(
        "list", parents=[common], help="a tenant's credit notes, oldest first (ListCreditNotes)"
    )
    _tenant(listing, "whose credit notes")
    listing.set_defaults(handler=_lazy("credit_notes_list", "billing"))


def _add_profiles(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    profiles = commands.add_parser("profiles", help="show and set tenants' billing profiles")
    actions = profiles.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", parents=[common], help="a tenant's billing profile (GetBillingProfile)")
    _tenant(show, "whose profile")
    show.set_defaults(handler=_lazy("profiles_show", "billing"))
    setting = actions.add_parser(
        "set",
        parents=[common],
        help="create or replace a tenant's billing profile",
        description="Create or replace a tenant's billing profile (SetBillingProfile). The profile is "
        "replaced whole: a setting not given takes its default (no e-mail, the plan's currency, the "
        "default plan, no tax, no threshold, no price overrides). The anchor day and the billing start "
        "are fixed when the profile is created.",
    )
    _tenant(setting, "whose profile")
    setting.add_argument("--display-name", required=True, help="the customer's name on invoices")
    setting.add_argument("--email", default="", help="the customer's billing e-mail address")
    setting.add_argument("--currency", default="", help="ISO 4217 code (default: the plan's)")
    setting.add_argument("--plan", default="", help="plan id or plans/P (default: the default plan)")
    setting.add_argument(
        "--plan-effective",
        type=utc_time,
        metavar="TIME",
        help="when a change of plan takes effect, a whole UTC hour (default: the next hour)",
    )
    setting.add_argument(
        "--anchor-day",
        type=int,
        default=0,
        metavar="DAY",
        help="day of month on which periods start (default 1: calendar months)",
    )
    setting.add_argument(
        "--billing-start",
        type=utc_time,
        metavar="TIME",
        help="from when the tenant is billed under the profile, a whole UTC hour (default: this hour)",
    )
    setting.add_argument(
        "--tax-percentage", type=exact_number, metavar="PERCENT", help="tax rate in percent, e.g. 20"
    )
    setting.add_argument(
        "--spend-threshold",
        type=exact_number,
        metavar="AMOUNT",
        help="an interim invoice is finalized when the open period's amount reaches it",
    )
    setting.add_argument(
        "--price-overrides",
        metavar="FILE",
        help="JSON list of the tenant's own prices, as PriceOverride in the protos' JSON form, e.g. "
        '[{"charge_key": "api/requests", "per_unit": {"unit_price": "0.008"}}]',
    )
    setting.set_defaults(handler=_lazy("profiles_set", "billing"))


def _add_meters(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    # The choices of MeterAggregation (tally_client.cli.meters.AGGREGATIONS, kept equal by a test).
    aggregations = ("sum", "count", "max", "min", "latest", "unique_count", "time_weighted")
    meters = commands.add_parser("meters", help="create, list, show and archive meters")
    actions = meters.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        parents=[common],
        help="a meter over one usage type",
        description="Create a meter (CreateMeter): it counts the events of one usage type recorded from now "
        "on, aggregated one way. Everything but the description is fixed once created.",
    )
    create.add_argument("meter", metavar="METER", help="its id: lower-case letters, digits and hyphens")
    create.add_argument("--service", required=True, help="the service of the events read")
    create.add_argument("--usage-type", required=True, help="the usage type of the events read")
    create.add_argument("--aggregation", required=True, choices=aggregations, help="how events are combined")
    create.add_argument("--description", default="", help="what it measures, for people")
    create.add_argument(
        "--filter",
        type=dimension,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="read only events with this dimension value (repeatable)",
    )
    create.add_argument(
        "--value-dimension",
        default="",
        metavar="DIMENSION",
        help="unique_count: the dimension whose distinct values are counted (default: distinct quantities)",
    )
    create.add_argument(
        "--group-by",
        action="append",
        default=[],
        metavar="DIMENSION",
        help="a dimension summaries may group it by (repeatable, at most 4)",
    )
    create.set_defaults(handler=_lazy("meters_create", "meters"))
    listing = actions.add_parser(
        "list", parents=[common], help="every meter, active and archived (ListMeters)"
    )
    listing.set_defaults(handler=_lazy("meters_list", "meters"))
    for action, what, handler in (
        ("show", "one meter (GetMeter)", "meters_show"),
        (
            "archive",
            "stop a meter counting new events; what it counted stays readable (ArchiveMeter)",
            "meters_archive",
        ),
    ):
        acting = actions.add_parser(action, parents=[common], help=what)
        acting.add_argument("meter", metavar="METER", help="meter id, or name meters/M")
        acting.set_defaults(handler=_lazy(handler, "meters"))


def _add_cancel(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    cancel = commands.add_parser(
        "cancel",
        parents=[common],
        help="cancel a recorded usage event",
        description="Cancel a recorded event (CancelEvent): it no longer counts in summaries and invoices "
        "not yet finalized. Cancelling again is safe and answers the first cancellation's time.",
    )
    cancel.add_argument("event_id", metavar="EVENT_ID", help="the event's event_id")
    _tenant(cancel, "the event's tenant")
    cancel.set_defaults(handler=_lazy("cancel", "meters"))


def _add_audit(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    audit = commands.add_parser(
        "audit", parents=[common], help="the audit trail, oldest first", description="ListAuditEvents."
    )
    audit.add_argument("--tenant", default="", metavar="TENANT_ID", help="only entries about this tenant")
    audit.add_argument("--start", type=utc_time, metavar="TIME", help="entries from this time on")
    audit.add_argument("--end", type=utc_time, metavar="TIME", help="entries before this time")
    audit.add_argument("--limit", type=int, default=0, help="at most this many entries (default: all)")
    audit.set_defaults(handler=_lazy("audit"))


def _add_collection_status(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    status = commands.add_parser(
        "collection-status",
        parents=[common],
        help="how a tenant stands in collections: good standing, past due or delinquent",
        description="GetCollectionStatus: the tenant's standing from its invoices' payments, with the "
        "invoices whose payment is being retried (past due) or was given up (uncollectible).",
    )
    status.add_argument("tenant", metavar="TENANT", help="the tenant id")
    status.set_defaults(handler=_lazy("collection_status", "payments"))


# The event types a webhook subscription may ask for (tally.v1.WebhookSubscription.event_types).
WEBHOOK_EVENT_TYPES = (
    "invoice.finalized",
    "invoice.paid",
    "invoice.payment_failed",
    "invoice.uncollectible",
    "threshold.crossed",
)


def _add_webhooks(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    webhooks = commands.add_parser(
        "webhooks",
        help="create, list and delete webhook subscriptions; list their deliveries",
        description="Outbound webhooks (NotificationService). Every command needs a token for all "
        "tenants with the scope notifications:admin.",
    )
    actions = webhooks.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        parents=[common],
        help="subscribe a URL to event types (CreateWebhookSubscription)",
        description="Subscribe a URL: every event of the listed types, of every tenant, is POSTed to it "
        "signed with the secret (HMAC-SHA256, header Tally-Signature). The secret is never shown again.",
    )
    create.add_argument("--url", required=True, help="where events are POSTed: an http:// or https:// URL")
    create.add_argument(
        "--secret-file",
        required=True,
        metavar="FILE",
        help="file holding the signing secret (16 to 256 printable ASCII characters; a final newline is "
        "ignored)",
    )
    create.add_argument(
        "--event",
        required=True,
        action="append",
        metavar="TYPE",
        help=f"an event type to deliver (repeatable): {', '.join(WEBHOOK_EVENT_TYPES)}",
    )
    create.add_argument("--description", default="", help="what the subscription is for, for people")
    create.set_defaults(handler=_lazy("webhooks_create", "payments"))
    listing = actions.add_parser(
        "list", parents=[common], help="every subscription, oldest first (ListWebhookSubscriptions)"
    )
    listing.set_defaults(handler=_lazy("webhooks_list", "payments"))
    for action, what, handler in (
        (
            "delete",
            "delete a subscription and its pending deliveries (DeleteWebhookSubscription)",
            "webhooks_delete",
        ),
        (
            "deliveries",
            "a subscription's deliveries, newest first (ListWebhookDeliveries)",
            "webhooks_deliveries",
        ),
    ):
        acting = actions.add_parser(action, parents=[common], help=what)
        acting.add_argument(
            "subscription", metavar="NAME", help="subscription id, or name webhookSubscriptions/ID"
        )
        acting.set_defaults(handler=_lazy(handler, "payments"))


def _add_extensions(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The commands other installed distributions register (the server's serve, token, retention)."""
    for point in entry_points(group=COMMANDS_GROUP):
        try:
            register = point.load()
        except ImportError as exc:  # a broken installation of the other distribution; ours still work
            print(f"tally: the {point.name!r} commands cannot be loaded: {exc}", file=sys.stderr)
            continue
        register(commands)


def build_parser() -> argparse.ArgumentParser:
    """The `tally` argument parser: the client's commands and those of other installed distributions.

    The others (the server's serve, token, retention) come through the `tally.commands` entry points.
    """
    parser = argparse.ArgumentParser(
        prog="tally",
        description="Tally: usage metering and billing over gRPC. The client commands reach the server at "
        "--addr (TALLY_ADDR) with --token (TALLY_TOKEN).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()
    _add_report(commands, common)
    _add_cancel(commands, common)
    _add_ingest(commands, common)
    _add_summary(commands, common)
    _add_invoices(commands, common)
    _add_credit_notes(commands, common)
    _add_rates(commands, common)
    _add_plans(commands, common)
    _add_profiles(commands, common)
    _add_meters(commands, common)
    _add_collection_status(commands, common)
    _add_webhooks(commands, common)
    _add_audit(commands, common)
    _add_extensions(commands)
    return parser

"""The client commands: each takes the parsed arguments, makes its calls and prints the answer.

Imported only when a client command runs (it loads gRPC). A failed call raises a
TallyError, which tally_client.cli.main prints and turns into exit status 1.
"""

from __future__ import annotations

import argparse
import itertools
from datetime import UTC, datetime, timedelta

from tally_client.cli import UsageError
from tally_client.cli.output import print_json, print_table, text
from tally_client.client import TallyClient
from tally_client.connection import Connection
from tally_client.models import Invoice, TimeBucket, UsageEvent
from tally_client.names import parse_invoice_name


def connect(args: argparse.Namespace) -> TallyClient:
    """A client of the server named by --addr/TALLY_ADDR, with --token/TALLY_TOKEN and TLS if asked."""
    credentials = None
    if args.tls or args.ca_cert:
        import grpc

        roots = None
        if args.ca_cert:
            try:
                with open(args.ca_cert, "rb") as file:
                    roots = file.read()
            except OSError as exc:
                raise UsageError(f"--ca-cert: {exc}") from None
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    return TallyClient(
        Connection.create(args.addr, token=args.token, credentials=credentials, timeout=args.timeout)
    )


def _hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _month_start(moment: datetime, months_back: int = 0) -> datetime:
    index = moment.year * 12 + moment.month - 1 - months_back
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def report(args: argparse.Namespace) -> None:
    """`tally report`: record one usage event and print whether it was recorded or a duplicate."""
    fields = {"event_id": args.event_id} if args.event_id else {}
    event = UsageEvent(
        args.tenant,
        args.service,
        args.usage_type,
        args.quantity,
        event_time=args.time,
        dimensions=dict(args.dimension),
        **fields,
    )
    with connect(args) as client:
        result = client.report_usage(event)
    if args.output == "json":
        print_json(result)
    else:
        print(f"{result.outcome.value}: tenant {result.tenant_id}, event {result.event_id}")


def ingest(args: argparse.Namespace) -> int:
    """`tally ingest`: stream a file of events; the exit status is 1 unless every event was settled."""
    from tally_client.cli.ingest import ingest_file

    with connect(args) as client:
        return ingest_file(client, args)


def summary(args: argparse.Namespace) -> None:
    """`tally summary`: a tenant's usage (and any meters asked for) as a table or JSON.

    The period defaults to the start of this UTC month up to the end of the current hour.
    """
    now = datetime.now(UTC)
    start = args.start or _month_start(now)
    end = args.end or _hour(now) + timedelta(hours=1)
    bucket = TimeBucket(args.bucket) if args.bucket else None
    with connect(args) as client:
        result = client.get_usage_summary(
            args.tenant, start, end, bucket=bucket, group_by_dimension=args.group_by, meters=args.meter
        )
    if args.output == "json":
        print_json(result)
        return
    columns = ["service", "usage type", "quantity", "events"]
    if args.group_by:
        columns.insert(2, args.group_by)
    if bucket is not None:
        columns.insert(0, bucket.value)
    rows = []
    for aggregate in result.aggregates:
        row: list[object] = [
            aggregate.service,
            aggregate.usage_type,
            aggregate.quantity,
            aggregate.event_count,
        ]
        if args.group_by:
            row.insert(2, aggregate.dimension_value)
        if bucket is not None:
            row.insert(0, aggregate.bucket_start_time)
        rows.append(row)
    title = f"usage of {result.tenant_id}, {text(result.start_time)} to {text(result.end_time)}"
    print_table(columns, rows, title=title)
    if args.meter:
        meter_columns = ["meter", "aggregation", "value"]
        if args.group_by:
            meter_columns.insert(1, args.group_by)
        if bucket is not None:
            meter_columns.insert(0, bucket.value)
        meter_rows = []
        for meter in result.meter_aggregates:
            meter_row: list[object] = [meter.meter.removeprefix("meters/"), meter.aggregation, meter.value]
            if args.group_by:
                meter_row.insert(1, meter.dimension_value)
            if bucket is not None:
                meter_row.insert(0, meter.bucket_start_time)
            meter_rows.append(meter_row)
        print_table(meter_columns, meter_rows, title="meters")


def _invoice_rows(invoices: list[Invoice]) -> list[list[object]]:
    return [
        [i.invoice_id, i.period_start_time, i.period_end_time, i.status, i.total, i.currency_code]
        for i in invoices
    ]


INVOICE_COLUMNS = ["invoice", "period start", "period end", "status", "total", "currency"]


def invoices_list(args: argparse.Namespace) -> None:
    """`tally invoices list`: a tenant's invoices, newest period first."""
    with connect(args) as client:
        invoices = list(client.list_invoices(args.tenant))
    if args.output == "json":
        print_json(invoices)
    else:
        print_table(INVOICE_COLUMNS, _invoice_rows(invoices), title=f"invoices of {args.tenant}")


def show_invoice(invoice: Invoice, output: str, created: bool | None = None) -> None:
    """Print an invoice: its header row and its line items, or the invoice as JSON.

    `created` (from GenerateInvoice) says whether it was created or an existing draft was
    recomputed; None when the invoice was only read.
    """
    if output == "json":
        print_json(invoice if created is None else {"invoice": invoice, "created": created})
        return
    if created is not None:
        print(f"{'created' if created else 'recomputed'} {invoice.name}")
    print_table(
        INVOICE_COLUMNS, _invoice_rows([invoice]), title=None if created is not None else invoice.name
    )
    columns = ["service", "usage type", "quantity", "unit price", "amount", "events"]
    rows: list[list[object]] = [
        [line.service, line.usage_type, line.quantity, line.unit_price, line.amount, line.event_count]
        for line in invoice.line_items
    ]
    # Plan invoices have lines that are not one usage type's (fees, minimums, tax, adjustments).
    if any(line.description or line.kind != "usage" for line in invoice.line_items):
        columns.insert(0, "line")
        for row, line in zip(rows, invoice.line_items, strict=True):
            row.insert(0, line.description or line.charge_key or line.kind)
    print_table(columns, rows, title="line items")
    payment = invoice.payment
    if payment is not None:  # a draft, or an invoice finalized before payments existed, has none
        print_table(
            ["state", "attempts", "next attempt", "stripe invoice", "last failure"],
            [
                [
                    payment.state,
                    payment.attempt_count,
                    payment.next_attempt_time,
                    payment.stripe_invoice_id,
                    payment.last_failure,
                ]
            ],
            title="payment",
        )


def invoice_ref(args: argparse.Namespace) -> tuple[str, str]:
    """(tenant id, invoice id) of the INVOICE argument: a full name, or an id with --tenant."""
    if args.invoice.startswith("tenants/"):
        try:
            return parse_invoice_name(args.invoice)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.tenant:
        return args.tenant, args.invoice
    raise UsageError("give --tenant (or TALLY_TENANT), or the invoice's full name tenants/T/invoices/I")


def invoices_show(args: argparse.Namespace) -> None:
    """`tally invoices show`: one invoice with its line items."""
    tenant, invoice_id = invoice_ref(args)
    with connect(args) as client:
        invoice = client.get_invoice(tenant, invoice_id)
    show_invoice(invoice, args.output)


def invoices_generate(args: argparse.Namespace) -> None:
    """`tally invoices generate`: create or recompute a tenant's invoice for a period.

    The period defaults to last UTC month.
    """
    now = datetime.now(UTC)
    start = args.start or _month_start(now, 1)
    end = args.end or _month_start(now)
    with connect(args) as client:
        generated = client.generate_invoice(args.tenant, start, end)
    show_invoice(generated.invoice, args.output, generated.created)


def rates_list(args: argparse.Namespace) -> None:
    """`tally rates list`: the rate card as of a time, or with `--history` every price ever set."""
    with connect(args) as client:
        rates = list(client.list_rates(as_of_time=args.as_of, show_history=args.history))
    if args.output == "json":
        print_json(rates)
        return
    print_table(
        ["service", "usage type", "unit price", "currency", "effective from", "set at"],
        [
            [r.service, r.usage_type, r.unit_price, r.currency_code, r.effective_time, r.create_time]
            for r in rates
        ],
    )


def rates_set(args: argparse.Namespace) -> None:
    """`tally rates set`: set a unit price from an effective time on."""
    with connect(args) as client:
        rate = client.set_rate(
            args.service,
            args.usage_type,
            args.unit_price,
            effective_time=args.effective,
            currency_code=args.currency,
        )
    if args.output == "json":
        print_json(rate)
    else:
        print(
            f"{rate.service}/{rate.usage_type}: {text(rate.unit_price)} {rate.currency_code} "
            f"from {text(rate.effective_time)}"
        )


def audit(args: argparse.Namespace) -> None:
    """`tally audit`: the audit trail, oldest first, at most `--limit` entries (0: all)."""
    if args.limit < 0:
        raise UsageError("--limit must be 0 (all) or more")
    with connect(args) as client:
        entries = client.list_audit_events(tenant_id=args.tenant, start_time=args.start, end_time=args.end)
        chosen = list(itertools.islice(entries, args.limit) if args.limit else entries)
    if args.output == "json":
        print_json(chosen)
        return
    print_table(
        ["time", "principal", "action", "tenant", "resource", "request id"],
        [[e.create_time, e.principal, e.action, e.tenant_id, e.resource, e.request_id] for e in chosen],
    )

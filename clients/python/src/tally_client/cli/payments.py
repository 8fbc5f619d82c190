"""Commands for collections (PaymentService) and outbound webhooks (NotificationService).

They use the typed client (tally_client.client): its deadline, retries and typed errors,
and one request_id on every attempt of a change, so a retried create makes one
subscription. The webhook commands need a token for all tenants with the scope
notifications:admin. A subscription's secret is read from a file (never a flag, which
would show in `ps` and the shell's history) and is never printed: the server never
returns it.
"""

from __future__ import annotations

import argparse

from tally_client.cli import UsageError
from tally_client.cli.commands import connect
from tally_client.cli.output import print_json, print_table
from tally_client.models import WebhookSubscription
from tally_client.names import webhook_subscription_name


def collection_status(args: argparse.Namespace) -> None:
    """`tally collection-status`: how a tenant stands in collections, with the invoices behind it."""
    with connect(args) as client:
        status = client.get_collection_status(args.tenant)
    if args.output == "json":
        print_json(status)
        return
    print_table(
        ["tenant", "state", "past due invoices", "uncollectible invoices", "since"],
        [
            [
                status.tenant_id,
                status.state,
                ", ".join(status.past_due_invoices),
                ", ".join(status.uncollectible_invoices),
                status.update_time,
            ]
        ],
    )


def _read_secret(path: str) -> str:
    """The secret in the file, without the line end an editor or `echo` leaves after it."""
    try:
        with open(path, encoding="utf-8") as file:
            secret = file.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--secret-file: {exc}") from None
    if not secret:
        raise UsageError(f"--secret-file: {path} is empty")
    return secret


def _show_subscriptions(subscriptions: list[WebhookSubscription], output: str) -> None:
    if output == "json":
        print_json(subscriptions)
        return
    print_table(
        ["subscription", "url", "event types", "description", "created"],
        [
            [s.subscription_id, s.url, ", ".join(s.event_types), s.description, s.create_time]
            for s in subscriptions
        ],
    )


def webhooks_create(args: argparse.Namespace) -> None:
    """`tally webhooks create`: subscribe a URL to event types; prints the subscription (no secret)."""
    secret = _read_secret(args.secret_file)
    with connect(args) as client:
        created = client.create_webhook_subscription(
            args.url, secret, args.event, description=args.description
        )
    if args.output == "json":
        print_json(created)
    else:
        _show_subscriptions([created], args.output)


def webhooks_list(args: argparse.Namespace) -> None:
    """`tally webhooks list`: every subscription, oldest first."""
    with connect(args) as client:
        subscriptions = list(client.list_webhook_subscriptions())
    _show_subscriptions(subscriptions, args.output)


def webhooks_delete(args: argparse.Namespace) -> None:
    """`tally webhooks delete`: delete a subscription; deliveries not yet made are not made."""
    name = webhook_subscription_name(args.subscription)
    with connect(args) as client:
        client.delete_webhook_subscription(name)
    if args.output == "json":
        print_json({"deleted": name})
    else:
        print(f"deleted {name}")


def webhooks_deliveries(args: argparse.Namespace) -> None:
    """`tally webhooks deliveries`: a subscription's deliveries, newest first."""
    with connect(args) as client:
        deliveries = list(client.list_webhook_deliveries(args.subscription))
    if args.output == "json":
        print_json(deliveries)
        return
    print_table(
        ["delivery", "event type", "event id", "state", "attempts", "last status", "next attempt", "created"],
        [
            [
                d.name.rpartition("/")[2],
                d.event_type,
                d.event_id,
                d.state,
                d.attempt_count,
                d.attempts[-1].status_code if d.attempts else None,
                d.next_attempt_time,
                d.create_time,
            ]
            for d in deliveries
        ],
        title=webhook_subscription_name(args.subscription),
    )

"""Page tokens: only tokens a Tally server issued for the same request are accepted, by any server
process on the same database; everything else is INVALID_ARGUMENT on page_token, never INTERNAL."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message

from server.app import TallyServer
from server.config import Config
from server.domain.pagination import PageTokens
from server.storage.shared_keys import shared_key
from tally.v1 import billing_service_pb2, billing_service_pb2_grpc
from tests.conftest import make_token
from tests.helpers import channel_with_token, field_violations, hour_start, server_page_tokens, ts

Stub = billing_service_pb2_grpc.BillingServiceStub


@dataclass(frozen=True)
class Listing:
    """One List method with fixed filters: how to call it with a page token, and the key it pages by."""

    name: str
    call: Callable[[Stub, str], Awaitable[Any]]
    filter_key: str
    out_of_range: list[list[Any]]  # validly signed keys that must still be refused


def listings(tenant: str) -> list[Listing]:
    as_of = hour_start(-1)
    as_of_micros = int(as_of.timestamp()) * 1_000_000
    return [
        Listing(
            "ListRates history",
            lambda stub, token: stub.ListRates(
                billing_service_pb2.ListRatesRequest(show_history=True, page_size=1, page_token=token)
            ),
            "history",
            [["a", "b", -(10**18)], ["a", "b", 10**20], ["a" * 65, "b", 0], ["a", 1, 0]],
        ),
        Listing(
            "ListRates as of",
            lambda stub, token: stub.ListRates(
                billing_service_pb2.ListRatesRequest(as_of_time=ts(as_of), page_size=1, page_token=token)
            ),
            f"in_effect:{as_of_micros}",
            [[10**20, "a", "b"], [-(10**18), "a", "b"], [0, "a\n", "b"]],
        ),
        Listing(
            "ListInvoices",
            lambda stub, token: stub.ListInvoices(
                billing_service_pb2.ListInvoicesRequest(
                    parent=f"tenants/{tenant}", page_size=1, page_token=token
                )
            ),
            f"invoices:{tenant}",
            [[10**20, "x"], [-(10**18), "x"], [0, "x" * 129], [0.5, "x"]],
        ),
        Listing(
            "ListAuditEvents",
            lambda stub, token: stub.ListAuditEvents(
                billing_service_pb2.ListAuditEventsRequest(tenant_id=tenant, page_size=1, page_token=token)
            ),
            f"audit:{tenant}:None:None",
            [[2**63], [-1], [10**30], ["1"]],
        ),
    ]


async def two_invoices(billing: Stub, tenant: str) -> None:
    """Two invoices, and so two audit entries, so that every listing has a second page."""
    for n in (1, 2):
        await billing.GenerateInvoice(
            billing_service_pb2.GenerateInvoiceRequest(
                parent=f"tenants/{tenant}",
                period_start_time=ts(hour_start(-n - 1)),
                period_end_time=ts(hour_start(-n)),
            )
        )


def unsigned(filter_key: str, key: list[Any]) -> str:
    """A token in the format of Tally 0.1, which had no signature."""
    body = json.dumps({"f": hashlib.sha256(filter_key.encode()).hexdigest()[:16], "k": key})
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def flip(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1 :]


async def assert_invalid_page_token(call: Awaitable[Any], what: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, raised.value.details())
    assert "page_token" in field_violations(raised.value), what


async def test_forged_truncated_edited_and_overflowing_tokens_are_invalid_for_every_listing(
    billing: Stub, db: asyncpg.Pool, tenant: str
) -> None:
    await two_invoices(billing, tenant)
    signer = await server_page_tokens(db)
    for listing in listings(tenant):
        token = (await listing.call(billing, "")).next_page_token
        assert token, listing.name
        await listing.call(billing, token)  # the real token works
        body, mac = token.split(".")
        bad = {
            "forged unsigned": unsigned(
                listing.filter_key, json.loads(base64.urlsafe_b64decode(body + "==="))["k"]
            ),
            "no signature": body,
            "empty signature": body + ".",
            "truncated": token[: len(token) // 2],
            "truncated signature": token[:-4],
            "signature flipped": f"{body}.{flip(mac, 10)}",
            "body flipped": f"{flip(body, 10)}.{mac}",
            "signed with another key": PageTokens(b"x" * 32).encode(listing.filter_key, [0]),
            "not base64": "%%%.%%%",
            "huge": "A" * 100_000 + "." + mac,
        }
        for n, key in enumerate(listing.out_of_range):
            bad[f"validly signed, out of range {n}"] = signer.encode(listing.filter_key, key)
        for what, bad_token in bad.items():
            await assert_invalid_page_token(listing.call(billing, bad_token), f"{listing.name}: {what}")


async def test_a_token_of_another_listing_or_other_filters_is_invalid(
    billing: Stub, tenant: str, db: asyncpg.Pool
) -> None:
    await two_invoices(billing, tenant)
    other_tenant = f"{tenant}-other"
    await two_invoices(billing, other_tenant)
    mine = listings(tenant)
    tokens = {listing.name: (await listing.call(billing, "")).next_page_token for listing in mine}
    other = {
        listing.name: (await listing.call(billing, "")).next_page_token for listing in listings(other_tenant)
    }
    for listing in mine:
        for name, token in tokens.items():
            if name != listing.name:
                await assert_invalid_page_token(
                    listing.call(billing, token), f"{listing.name} given {name}'s"
                )
        if other[listing.name] != tokens[listing.name]:  # the rate card is the same for every tenant
            await assert_invalid_page_token(
                listing.call(billing, other[listing.name]), f"{listing.name} given another tenant's"
            )
    assert set(tokens) == {"ListRates history", "ListRates as of", "ListInvoices", "ListAuditEvents"}
    # An as-of listing's token does not page a listing as of another time.
    token = tokens["ListRates as of"]
    later = billing_service_pb2.ListRatesRequest(as_of_time=ts(hour_start(0)), page_token=token)
    await assert_invalid_page_token(billing.ListRates(later), "as of another time")


def without_compute_time(page: Message) -> Message:
    """A page with drafts' compute_time cleared: drafts are priced afresh on every read."""
    copy = type(page)()
    copy.CopyFrom(page)
    for invoice in getattr(copy, "invoices", ()):
        invoice.ClearField("compute_time")
    return copy


async def test_a_token_from_one_server_process_pages_on_another_of_the_same_database(
    tally: TallyServer, server_config: Config, billing: Stub, db: asyncpg.Pool, tenant: str
) -> None:
    await two_invoices(billing, tenant)
    second = TallyServer(replace(server_config, port=0))
    await second.start()
    try:
        async with channel_with_token(f"127.0.0.1:{second.port}", make_token()) as channel:
            other: Stub = billing_service_pb2_grpc.BillingServiceStub(channel)
            for listing in listings(tenant):
                first_page = await listing.call(billing, "")
                on_this = await listing.call(billing, first_page.next_page_token)
                on_other = await listing.call(other, first_page.next_page_token)
                assert without_compute_time(on_other) == without_compute_time(on_this), listing.name
                back = await listing.call(billing, (await listing.call(other, "")).next_page_token)
                assert without_compute_time(back) == without_compute_time(on_this), listing.name
    finally:
        await second.stop()
    assert await db.fetchval("SELECT count(*) FROM shared_keys WHERE name = 'page_token'") == 1


async def test_the_first_key_stored_is_the_one_every_process_reads(db: asyncpg.Pool, tenant: str) -> None:
    name = f"test-{tenant}"
    first = await shared_key(db, name, lambda: b"a" * 32)
    second = await shared_key(db, name, lambda: b"b" * 32)
    assert first == second == b"a" * 32

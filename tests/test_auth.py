"""Authentication and tenant isolation on every RPC: the right status, and nothing written or revealed."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.app import TallyServer
from server.auth.devkey import ensure_dev_secret
from server.auth.keys import KeyFileError, load_public_keys, load_secret
from server.auth.tokens import TokenVerifier
from server.cli import main
from server.domain.access import ALL_TENANTS, SCOPES
from server.domain.errors import Unauthenticated
from tally.v1 import billing_service_pb2, usage_service_pb2
from tests.conftest import AUDIENCE, ISSUER, make_token, new_tenant
from tests.helpers import event, hour_start, ts
from tests.rpcs import PERMISSION_CAUSE, RPCS, Rpc, invoke, rejected_causes

Code = grpc.StatusCode


@pytest_asyncio.fixture
async def victim(usage: Any, billing: Any, tenant: str) -> tuple[str, str]:
    """A tenant with usage and an invoice (made with the all-tenants test token): (tenant, invoice id)."""
    await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant, time=hour_start(-2))))
    generated = await billing.GenerateInvoice(
        billing_service_pb2.GenerateInvoiceRequest(
            parent=f"tenants/{tenant}",
            period_start_time=ts(hour_start(-24)),
            period_end_time=ts(hour_start(-4)),
        )
    )
    return tenant, generated.invoice.name.rpartition("/")[2]


async def snapshot(db: asyncpg.Pool, tenant: str) -> tuple[Any, ...]:
    """Everything a call could have written: the tenant's events and rollups, invoices, rates, audit."""
    return tuple(
        [
            await db.fetchval("SELECT count(*) FROM usage_events WHERE tenant_id = $1", tenant),
            await db.fetchval(
                "SELECT coalesce(sum(event_count), 0) FROM usage_rollups WHERE tenant_id = $1", tenant
            ),
            await db.fetchval("SELECT count(*) FROM invoices WHERE tenant_id = $1", tenant),
            await db.fetchval("SELECT max(updated_at) FROM invoices WHERE tenant_id = $1", tenant),
            await db.fetchval("SELECT count(*) FROM rates"),
            await db.fetchval("SELECT count(*) FROM audit_events"),
        ]
    )


def without(scope: str) -> tuple[str, ...]:
    return tuple(s for s in SCOPES if s != scope)


BAD_TOKENS = {
    "no token": lambda tenant, rpc: None,
    "not a jwt": lambda tenant, rpc: "not-a-jwt-at-all",
    "expired": lambda tenant, rpc: make_token([tenant], now=lambda: time.time() - 7200),
    "not yet valid": lambda tenant, rpc: make_token([tenant], now=lambda: time.time() + 3600),
    "wrong signature": lambda tenant, rpc: make_token(
        [tenant], secret=b"another-secret-of-at-least-32-bytes!!"
    ),
    "wrong issuer": lambda tenant, rpc: make_token([tenant], issuer="someone-else"),
    "wrong audience": lambda tenant, rpc: make_token([tenant], audience="another-service"),
    "'*' mixed with tenant ids": lambda tenant, rpc: make_token([tenant, "*"]),
    "alg none": lambda tenant, rpc: jwt.encode(
        {
            "sub": "x",
            "tenants": tenant,
            "scope": " ".join(SCOPES),
            "exp": time.time() + 60,
            "iss": ISSUER,
            "aud": AUDIENCE,
        },
        None,
        algorithm="none",
    ),
}


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name.split("/")[1])
@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_bad_or_missing_token_is_unauthenticated_and_writes_nothing(
    bare_channel: grpc.aio.Channel, db: asyncpg.Pool, victim: tuple[str, str], rpc: Rpc, case: str
) -> None:
    tenant, invoice_id = victim
    before = await snapshot(db, tenant)
    token = BAD_TOKENS[case](tenant, rpc)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await invoke(bare_channel, rpc, [rpc.example(tenant, invoice_id)], token=token)
    assert raised.value.code() == Code.UNAUTHENTICATED
    if token:
        assert token not in (raised.value.details() or "")
    assert await snapshot(db, tenant) == before


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name.split("/")[1])
async def test_missing_scope_is_permission_denied_and_writes_nothing(
    bare_channel: grpc.aio.Channel, db: asyncpg.Pool, victim: tuple[str, str], rpc: Rpc
) -> None:
    tenant, invoice_id = victim
    before = await snapshot(db, tenant)
    token = make_token(ALL_TENANTS, without(rpc.scope))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await invoke(bare_channel, rpc, [rpc.example(tenant, invoice_id)], token=token)
    assert raised.value.code() == Code.PERMISSION_DENIED
    assert rpc.scope in (raised.value.details() or "")
    assert await snapshot(db, tenant) == before


# What a token for another tenant, with every scope, gets from each RPC about the victim.
OTHER_TENANT = {
    "ReportUsage": Code.PERMISSION_DENIED,
    "IngestUsage": "rejected",  # the stream goes on; the event is rejected with PERMISSION_DENIED
    "StreamUsage": "rejected",
    "GetUsageSummary": Code.PERMISSION_DENIED,
    "StreamUsageSummaries": Code.PERMISSION_DENIED,
    "ListRates": Code.OK,  # the rate card is shared by every tenant
    "SetRate": Code.PERMISSION_DENIED,  # ... so only an all-tenants token may change it
    "GenerateInvoice": Code.PERMISSION_DENIED,
    "GetInvoice": Code.NOT_FOUND,  # exactly as for an invoice that does not exist
    "ListInvoices": Code.PERMISSION_DENIED,
    "ListAuditEvents": Code.PERMISSION_DENIED,
    "CancelEvent": Code.PERMISSION_DENIED,
    "CreateMeter": Code.PERMISSION_DENIED,  # meters are shared by every tenant, like the rate card
    "GetMeter": Code.OK,
    "ListMeters": Code.OK,
    "ArchiveMeter": Code.PERMISSION_DENIED,
    # The lifecycle of an invoice: as GetInvoice, another tenant's invoice does not exist.
    "FinalizeInvoice": Code.NOT_FOUND,
    "VoidInvoice": Code.NOT_FOUND,
    "MarkInvoicePaid": Code.NOT_FOUND,
    "MarkInvoiceUncollectible": Code.NOT_FOUND,
    "CreateCreditNote": Code.NOT_FOUND,
    "ListCreditNotes": Code.PERMISSION_DENIED,
    "CreatePlan": Code.PERMISSION_DENIED,  # plans are shared: only an all-tenants token may change them
    "GetPlan": Code.OK,
    "ListPlans": Code.OK,
    "CreatePlanVersion": Code.PERMISSION_DENIED,
    "SetBillingProfile": Code.PERMISSION_DENIED,
    "GetBillingProfile": Code.PERMISSION_DENIED,
    "PreviewInvoice": Code.PERMISSION_DENIED,
    "ClosePeriod": Code.PERMISSION_DENIED,
    # Subscriptions receive every tenant's events: only an all-tenants token may see or change them.
    "CreateWebhookSubscription": Code.PERMISSION_DENIED,
    "GetWebhookSubscription": Code.PERMISSION_DENIED,
    "ListWebhookSubscriptions": Code.PERMISSION_DENIED,
    "DeleteWebhookSubscription": Code.PERMISSION_DENIED,
    "ListWebhookDeliveries": Code.PERMISSION_DENIED,
    "GetCollectionStatus": Code.PERMISSION_DENIED,
}


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name.split("/")[1])
async def test_token_for_another_tenant_is_refused_and_writes_nothing(
    bare_channel: grpc.aio.Channel, db: asyncpg.Pool, victim: tuple[str, str], rpc: Rpc
) -> None:
    tenant, invoice_id = victim
    before = await snapshot(db, tenant)
    token = make_token([new_tenant()], SCOPES)
    expected = OTHER_TENANT[rpc.name.split("/")[1]]
    if expected in (Code.OK, "rejected"):
        responses = await invoke(bare_channel, rpc, [rpc.example(tenant, invoice_id)], token=token)
        if expected == "rejected":
            assert rejected_causes(responses) == [PERMISSION_CAUSE]
    else:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await invoke(bare_channel, rpc, [rpc.example(tenant, invoice_id)], token=token)
        assert raised.value.code() == expected
        assert tenant not in (raised.value.details() or "")
    assert await snapshot(db, tenant) == before


async def test_other_tenants_look_the_same_whether_they_exist_or_not(
    bare_channel: grpc.aio.Channel, victim: tuple[str, str]
) -> None:
    tenant, invoice_id = victim
    token = make_token([new_tenant()], SCOPES)
    answers = []
    for target, invoice in ((tenant, invoice_id), (new_tenant(), "inv_" + uuid.uuid4().hex)):
        for rpc in RPCS:
            try:
                await invoke(bare_channel, rpc, [rpc.example(target, invoice)], token=token)
                answers.append((rpc.name, "OK"))
            except grpc.aio.AioRpcError as error:
                answers.append((rpc.name, error.code(), (error.details() or "").replace(invoice, "<id>")))
    half = len(answers) // 2
    assert answers[:half] == answers[half:]


async def test_batch_with_another_tenants_events_records_the_rest(
    bare_channel: grpc.aio.Channel, db: asyncpg.Pool, tenant: str
) -> None:
    other = new_tenant()
    token = make_token([tenant], (SCOPES[0],))
    rpc = next(r for r in RPCS if r.name.endswith("/IngestUsage"))
    batch = usage_service_pb2.IngestUsageRequest(
        events=[event(tenant, "a1"), event(other, "b1"), event(tenant, "a2"), event("", "c1")]
    )
    [response] = await invoke(bare_channel, rpc, [batch], token=token)
    assert (response.accepted_count, response.rejected_count) == (2, 2)
    by_index = {r.event_index: (r.field, r.cause, r.reason) for r in response.rejections}
    assert by_index[1] == ("tenant_id", PERMISSION_CAUSE, "the caller may not report usage for this tenant")
    assert by_index[3][:2] == ("tenant_id", 1)  # an empty tenant id is invalid, not someone else's
    assert await db.fetchval("SELECT count(*) FROM usage_events WHERE tenant_id = $1", other) == 0


async def test_summaries_stream_only_the_callers_tenants(
    usage: Any, bare_channel: grpc.aio.Channel, tenant: str
) -> None:
    mine, theirs = tenant, new_tenant()
    for who in (mine, theirs):
        await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(who, time=hour_start(-1))))
    rpc = next(r for r in RPCS if r.name.endswith("/StreamUsageSummaries"))
    request = usage_service_pb2.StreamUsageSummariesRequest(
        start_time=ts(hour_start(-2)), end_time=ts(hour_start(1))
    )
    quiet = new_tenant()  # a tenant of the token without usage: left out, like for an all-tenants token
    responses = await invoke(bare_channel, rpc, [request], token=make_token([mine, quiet], SCOPES))
    assert [r.summary.tenant_id for r in responses] == [mine]
    everyone = await invoke(bare_channel, rpc, [request], token=make_token(ALL_TENANTS, SCOPES))
    assert {mine, theirs} <= {r.summary.tenant_id for r in everyone}


async def test_token_with_a_single_tenant_string_and_scope_list_is_accepted(
    bare_channel: grpc.aio.Channel, tenant: str
) -> None:
    claims = {
        "sub": "svc",
        "tenants": tenant,
        "scope": ["usage:read"],
        "exp": time.time() + 60,
        "iss": ISSUER,
        "aud": AUDIENCE,
    }
    token = jwt.encode(claims, b"test-secret-for-tally-tests-only-0123456789", algorithm="HS256")
    rpc = next(r for r in RPCS if r.name.endswith("/GetUsageSummary"))
    [response] = await invoke(bare_channel, rpc, [rpc.example(tenant, "")], token=token)
    assert response.summary.tenant_id == tenant


async def test_request_id_is_echoed_or_generated(bare_channel: grpc.aio.Channel, tenant: str) -> None:
    rpc = next(r for r in RPCS if r.name.endswith("/ListRates"))
    stub = bare_channel.unary_unary(
        rpc.path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=rpc.response_type.FromString,
    )
    auth = ("authorization", f"Bearer {make_token()}")
    call = stub(rpc.example(tenant, ""), metadata=(("x-request-id", "req-42"), auth))
    await call
    assert ("x-request-id", "req-42") in list(await call.trailing_metadata())
    call = stub(rpc.example(tenant, ""), metadata=(auth,))
    await call
    generated = dict(await call.trailing_metadata())["x-request-id"]
    assert len(generated) == 32


async def test_token_text_never_appears_in_errors_or_logs(
    bare_channel: grpc.aio.Channel, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    forged = make_token([tenant], secret=b"forged-secret-forged-secret-forged-secret")
    garbage = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQtdGV4dA.c2lnbmF0dXJl-SECRETISH"
    rpc = next(r for r in RPCS if r.name.endswith("/GetUsageSummary"))
    for token in (forged, garbage, forged[:-5]):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await invoke(bare_channel, rpc, [rpc.example(tenant, "")], token=token)
        assert raised.value.code() == Code.UNAUTHENTICATED
        text = (
            f"{raised.value.details()} {raised.value.debug_error_string()} {raised.value.trailing_metadata()}"
        )
        for part in token.split("."):
            assert part not in text
            assert part not in caplog.text
    assert "refused: UNAUTHENTICATED" in caplog.text  # the refusals are logged, without the tokens


# --- keys and tokens, without a server ---------------------------------------------------------


def _rsa_and_ec() -> tuple[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]:
    return rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1())


def _pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _claims(**extra: Any) -> dict[str, Any]:
    return {
        "sub": "billing-job",
        "tenants": ["acme", "globex"],
        "scope": "billing:read usage:read",
        "exp": int(time.time()) + 60,
        **extra,
    }


def test_rs256_and_es256_tokens_verify_with_pem_public_keys(tmp_path: Path) -> None:
    rsa_key, ec_key = _rsa_and_ec()
    path = tmp_path / "keys.pem"
    path.write_bytes(_pem(rsa_key) + _pem(ec_key))
    verifier = TokenVerifier(load_public_keys(path), audience=None)
    for key, algorithm in ((rsa_key, "RS256"), (ec_key, "ES256")):
        principal = verifier.verify(jwt.encode(_claims(), key, algorithm=algorithm))
        assert principal.subject == "billing-job"
        assert principal.tenants == frozenset({"acme", "globex"})
        assert principal.scopes == frozenset({"billing:read", "usage:read"})
    # HS256 "signed" with the public key as the secret (algorithm confusion) is refused.
    confused = jwt.encode(_claims(), b"x" * 32, algorithm="HS256")
    with pytest.raises(Unauthenticated):
        verifier.verify(confused)


def test_jwks_keys_are_chosen_by_key_id(tmp_path: Path) -> None:
    old, new = rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048)
    jwks = {"keys": []}
    for kid, key in (("old", old), ("new", new)):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwks["keys"].append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    verifier = TokenVerifier(load_public_keys(path), issuer="https://idp.example", audience="tally")
    claims = _claims(iss="https://idp.example", aud="tally", tenants="*")
    token = jwt.encode(claims, new, algorithm="RS256", headers={"kid": "new"})
    assert verifier.verify(token).tenants == ALL_TENANTS
    mislabelled = jwt.encode(claims, new, algorithm="RS256", headers={"kid": "old"})
    with pytest.raises(Unauthenticated, match="signature"):
        verifier.verify(mislabelled)


def test_private_keys_and_short_secrets_are_refused_without_echoing_them(tmp_path: Path) -> None:
    rsa_key, _ = _rsa_and_ec()
    private = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path / "private.pem"
    path.write_bytes(private)
    with pytest.raises(KeyFileError) as raised:
        load_public_keys(path)
    assert "never a private key" in str(raised.value)
    assert private.decode().splitlines()[1] not in str(raised.value)


def test_dev_secret_is_created_once_and_private(tmp_path: Path) -> None:
    path, created = ensure_dev_secret(tmp_path / "data")
    assert created and path.stat().st_mode & 0o777 == 0o600
    content = path.read_bytes()
    assert ensure_dev_secret(tmp_path / "data") == (path, False)
    assert path.read_bytes() == content


def test_tally_token_mints_what_the_server_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = ensure_dev_secret(tmp_path)
    main(
        [
            "token",
            "--data-dir",
            str(tmp_path),
            "--tenant",
            "acme",
            "--tenant",
            "globex",
            "--scope",
            "usage:write",
            "--subject",
            "ingestor",
            "--ttl",
            "10m",
        ]
    )
    token = capsys.readouterr().out.strip()
    verifier = TokenVerifier([load_secret(path)], audience="tally")
    principal = verifier.verify(token)
    assert (principal.subject, principal.tenants, principal.scopes) == (
        "ingestor",
        frozenset({"acme", "globex"}),
        frozenset({"usage:write"}),
    )
    assert jwt.decode(token, options={"verify_signature": False})["exp"] - time.time() <= 600


async def test_server_refuses_to_start_with_an_unreadable_key(server_config: Any, tmp_path: Path) -> None:
    from dataclasses import replace

    server = TallyServer(replace(server_config, jwt_secret_file=tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot read the JWT secret file"):
        await server.start()


def test_a_cached_token_stops_working_when_it_expires() -> None:
    from server.auth.keys import HS256, VerificationKey
    from server.domain.errors import Unauthenticated

    clock = [time.time()]
    secret = b"cache-test-secret-0123456789abcdef"
    verifier = TokenVerifier([VerificationKey(HS256, secret)], now=lambda: clock[0], leeway_seconds=0)
    token = jwt.encode(
        {"sub": "svc", "tenants": "*", "scope": "usage:read", "exp": int(clock[0]) + 60},
        secret,
        algorithm="HS256",
    )
    first = verifier.verify(token)
    assert verifier.verify(token) is first  # served from the cache
    clock[0] += 61
    with pytest.raises(Unauthenticated):
        verifier.verify(token)


@pytest.mark.parametrize("tenants", [["acme", "*"], ["*", "acme"], ["*", "*"]])
def test_tenants_claim_mixing_every_tenant_with_names_is_refused(tenants: list[str]) -> None:
    from server.auth.keys import HS256, VerificationKey

    secret = b"mixed-claim-secret-0123456789abcdef"
    verifier = TokenVerifier([VerificationKey(HS256, secret)], audience=None)
    token = jwt.encode(
        {"sub": "svc", "tenants": tenants, "scope": "usage:read", "exp": int(time.time()) + 60},
        secret,
        algorithm="HS256",
    )
    with pytest.raises(Unauthenticated) as raised:
        verifier.verify(token)
    assert str(raised.value) == "the token's 'tenants' claim must be '*' alone, or tenant ids without '*'"
    # '*' alone, as a string or a one-element list, still means every tenant.
    for claim in ("*", ["*"]):
        alone = jwt.encode(
            {"sub": "svc", "tenants": claim, "scope": "usage:read", "exp": int(time.time()) + 60},
            secret,
            algorithm="HS256",
        )
        assert verifier.verify(alone).tenants == ALL_TENANTS

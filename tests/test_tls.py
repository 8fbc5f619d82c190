"""TLS and mutual TLS, with a certificate authority and certificates made by the test."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.app import TallyServer
from server.config import Config
from tally.v1 import billing_service_pb2, billing_service_pb2_grpc
from tests.conftest import make_token
from tests.helpers import bearer_interceptors


@dataclass(frozen=True)
class Pki:
    ca: bytes
    server_cert: Path
    server_key: Path
    client_cert: bytes
    client_key: bytes
    ca_file: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    usage: list[x509.ObjectIdentifier] | None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0] if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        assert usage is not None
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _issue("Tally test CA", ca_key, None, None)
    server = _issue("localhost", server_key, (ca.subject, ca_key), [ExtendedKeyUsageOID.SERVER_AUTH])
    client = _issue("ingestor", client_key, (ca.subject, ca_key), [ExtendedKeyUsageOID.CLIENT_AUTH])
    pem = serialization.Encoding.PEM
    (directory / "server.pem").write_bytes(server.public_bytes(pem))
    (directory / "server.key").write_bytes(_pem_key(server_key))
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    return Pki(
        ca=ca.public_bytes(pem),
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=client.public_bytes(pem),
        client_key=_pem_key(client_key),
        ca_file=directory / "ca.pem",
    )


async def list_rates(port: int, credentials: grpc.ChannelCredentials | None) -> int:
    address = f"127.0.0.1:{port}"
    interceptors = bearer_interceptors(make_token())
    channel = (
        grpc.aio.insecure_channel(address, interceptors=interceptors)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials, interceptors=interceptors)
    )
    async with channel:
        stub = billing_service_pb2_grpc.BillingServiceStub(channel)
        response = await stub.ListRates(billing_service_pb2.ListRatesRequest(), timeout=60)
        return len(response.rates)


@pytest.fixture
def tls_config(server_config: Config, pki: Pki) -> Iterator[Config]:
    yield replace(server_config, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)


async def test_tls_serves_clients_that_trust_the_ca_and_refuses_plaintext(
    tls_config: Config, pki: Pki
) -> None:
    server = TallyServer(tls_config)
    await server.start()
    try:
        assert await list_rates(server.port, grpc.ssl_channel_credentials(root_certificates=pki.ca)) >= 7
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await list_rates(server.port, None)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop()


async def test_mutual_tls_requires_a_client_certificate_signed_by_the_client_ca(
    tls_config: Config, pki: Pki
) -> None:
    server = TallyServer(replace(tls_config, tls_client_ca_file=pki.ca_file))
    await server.start()
    try:
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=pki.ca, private_key=pki.client_key, certificate_chain=pki.client_cert
        )
        assert await list_rates(server.port, with_cert) >= 7
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await list_rates(server.port, grpc.ssl_channel_credentials(root_certificates=pki.ca))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop()


async def test_tls_key_without_certificate_is_refused_at_start(server_config: Config, pki: Pki) -> None:
    server = TallyServer(replace(server_config, tls_key_file=pki.server_key))
    with pytest.raises(ValueError, match="--tls-cert"):
        await server.start()

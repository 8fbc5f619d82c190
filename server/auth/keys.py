"""Loading the keys that verify bearer tokens: an HS256 secret, or RS256/ES256 public keys.

Public keys come from a PEM file (one or more public keys or certificates) or a JWKS file
(the JSON an identity provider publishes). Each key is bound to one algorithm, so a token
can never choose how it is checked (no "none", no HS256 signed with a public key).
Errors name the file, never its contents.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

HS256 = "HS256"
PUBLIC_KEY_ALGORITHMS = ("RS256", "ES256")
MIN_SECRET_BYTES = 32

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.DOTALL)


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One key and the one algorithm it verifies; key_id matches a token's `kid` header if set."""

    algorithm: str
    key: object  # bytes for HS256, a cryptography public key otherwise
    key_id: str | None = None


def load_secret(path: Path) -> VerificationKey:
    """An HS256 secret: the file's bytes with surrounding white space removed."""
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise KeyFileError(f"cannot read the JWT secret file {path}: {exc.strerror}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise KeyFileError(f"the JWT secret in {path} is shorter than {MIN_SECRET_BYTES} bytes")
    return VerificationKey(HS256, secret)


def _algorithm_of(key: object, source: str) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise KeyFileError(f"{source}: RSA keys must have at least 2048 bits")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise KeyFileError(f"{source}: only RSA (RS256) and P-256 (ES256) public keys are supported")


def _load_pem(data: bytes, path: Path) -> list[VerificationKey]:
    keys: list[VerificationKey] = []
    for match in _PEM_BLOCK.finditer(data):
        kind, block = match.group(1), match.group(0)
        source = f"{path} ({kind.decode()} #{len(keys) + 1})"
        public: object
        try:
            if kind == b"CERTIFICATE":
                public = x509.load_pem_x509_certificate(block).public_key()
            elif kind == b"PUBLIC KEY":
                public = load_pem_public_key(block)
            else:
                raise KeyFileError(
                    f"{source}: expected PUBLIC KEY or CERTIFICATE blocks (never a private key)"
                )
        except ValueError as exc:
            if isinstance(exc, KeyFileError):
                raise
            raise KeyFileError(f"{source}: not a valid PEM public key") from None
        keys.append(VerificationKey(_algorithm_of(public, source), public))
    return keys


def _load_jwks(text: str, path: Path) -> list[VerificationKey]:
    try:
        document = json.loads(text)
        entries = document["keys"]
        assert isinstance(entries, list)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise KeyFileError(f"{path}: not a JWKS document (a JSON object with a 'keys' list)") from None
    keys = []
    for index, entry in enumerate(entries):
        source = f"{path} (key #{index + 1})"
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue  # encryption keys are not ours to use
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            raise KeyFileError(f"{source}: not a usable RS256 or ES256 public key") from None
        if jwk.algorithm_name not in PUBLIC_KEY_ALGORITHMS or "d" in entry:
            raise KeyFileError(f"{source}: only RS256 and ES256 public keys are accepted")
        if _algorithm_of(jwk.key, source) != jwk.algorithm_name:
            raise KeyFileError(f"{source}: its 'alg' does not match its key type")
        keys.append(VerificationKey(jwk.algorithm_name, jwk.key, entry.get("kid")))
    return keys


def load_public_keys(path: Path) -> list[VerificationKey]:
    """RS256/ES256 verification keys from a PEM or JWKS file (told apart by content)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the JWT public key file {path}: {exc.strerror}") from None
    if data.lstrip().startswith(b"{"):
        keys = _load_jwks(data.decode("utf-8", errors="replace"), path)
    else:
        keys = _load_pem(data, path)
    if not keys:
        raise KeyFileError(f"{path}: holds no RS256 or ES256 public key")
    return keys

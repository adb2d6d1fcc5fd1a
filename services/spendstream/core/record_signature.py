"""Signatures on the records that govern spend, so that writing to the broker is not enough to forge them.

Every service that emits usage (an instrumented application, a gateway) may write to the broker, and where its
credentials reach ``spendstream.enforcement`` too, a decision of its own making (an ``allow`` with a version far
ahead) would lift its shutoff at every gateway. Kafka ACLs are the first line (docs/architecture.md §7); this is
the second: the processor signs each decision, heartbeat and tombstone it publishes (Ed25519, in the
``spendstream-signature`` header), and edges that hold the public key apply only what verifies. Policy records are
signed by whoever applies a policy with the same key and verified by the processor and the edges.

The signature covers the topic, the key and the value (or that the record is a tombstone), so a signed record
cannot be replayed under another key or topic. ``spendstream keygen`` writes a key pair; ``spendstream dev``
makes one in its data directory at first start.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

K = TypeVar("K", Ed25519PrivateKey, Ed25519PublicKey)
SIGNATURE_HEADER = "spendstream-signature"
SIGNING_KEY_FILE, VERIFY_KEY_FILE = "signing-key.pem", "verify-key.pem"
_NO_ENCRYPTION = serialization.NoEncryption()


class SignatureKeyError(ValueError):
    """A key file that cannot be read as the key it should hold."""


def signed_bytes(topic: str, key: bytes | None, value: bytes | None) -> bytes:
    """What a signature covers: topic, key and value, each length-prefixed (a tombstone is marked as one)."""
    topic_bytes, key_bytes = topic.encode(), key or b""
    body = b"\x00" if value is None else b"\x01" + value
    return struct.pack(">HI", len(topic_bytes), len(key_bytes)) + topic_bytes + key_bytes + body


class RecordSigner:
    """Signs records with the private key; its headers go with the record to the broker."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def from_file(cls, path: Path) -> RecordSigner:
        load = partial(serialization.load_pem_private_key, password=None)
        return cls(_key_file(path, load, Ed25519PrivateKey, "private"))

    def headers(self, topic: str, key: bytes | None, value: bytes | None) -> list[tuple[str, bytes]]:
        return [(SIGNATURE_HEADER, self._key.sign(signed_bytes(topic, key, value)))]

    def derived_secret(self, purpose: bytes) -> bytes:
        """A secret only holders of the private key can compute, one per ``purpose`` (a MAC key)."""
        raw = self._key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, _NO_ENCRYPTION)
        return hmac.digest(raw, b"spendstream derived secret: " + purpose, "sha256")


class RecordVerifier:
    """Tells records signed by the private key of its public key from every other record."""

    def __init__(self, public_key: Ed25519PublicKey) -> None:
        self._key = public_key

    @classmethod
    def from_file(cls, path: Path) -> RecordVerifier:
        return cls(_key_file(path, serialization.load_pem_public_key, Ed25519PublicKey, "public"))

    def verifies(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes]] | None
    ) -> bool:
        """True if one of the record's signature headers is this key's signature of it."""
        message = signed_bytes(topic, key, value)
        for name, signature in headers or ():
            if name != SIGNATURE_HEADER or not signature:
                continue
            try:
                self._key.verify(signature, message)
            except InvalidSignature:
                continue
            return True
        return False


def signature_headers(
    signer: RecordSigner | None, topic: str, key: bytes | None, value: bytes | None
) -> list[tuple[str, bytes]] | None:
    """The headers a record is produced with: its signature, or none without a signing key."""
    return signer.headers(topic, key, value) if signer is not None else None


def vouched_for(verifier: RecordVerifier | None, topic: str, message: Any) -> bool:
    """Whether a consumed message may be applied: any without a verify key, else only one signed with its pair."""
    return verifier is None or verifier.verifies(topic, message.key(), message.value(), message.headers())


def _key_file(path: Path, load: Callable[[bytes], object], kind: type[K], what: str) -> K:
    """The key a PEM file holds, if it is of ``kind``; ``SignatureKeyError`` naming the file otherwise."""
    try:
        key = load(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureKeyError(f"{path}: not a readable Ed25519 {what} key in PEM ({exc})") from None
    if not isinstance(key, kind):
        raise SignatureKeyError(f"{path}: a {type(key).__name__}, not an Ed25519 {what} key")
    return key


def write_key_pair(directory: Path, public_directory: Path | None = None) -> tuple[Path, Path]:
    """A new key pair: the private key in ``directory``, readable by its owner only, the public key in
    ``public_directory`` (default the same), readable by all."""
    public_directory = public_directory or directory
    for folder in (directory, public_directory):
        folder.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    signing, verify = directory / SIGNING_KEY_FILE, public_directory / VERIFY_KEY_FILE
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(signing, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(pem)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    verify.write_bytes(public)
    return signing, verify

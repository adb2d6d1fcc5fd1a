"""Seals on the processor's internal messages: only a processor can tell stage 2 what a window totals.

Stage 2 merges the window totals it reads on ``spendstream.processor.partials``, decides on them and signs the
decision it publishes. Every service that emits usage may write to the broker, so without this a client could
publish a total of its own making there: an attacker session shut off another team's month with one message
(and lifted its own shutoff with another), each decision signed by the processor. Every processor holds the
signing key (``SPENDSTREAM_SIGNING_KEY``), so a MAC keyed by a secret derived from it vouches for a message at
the cost of a hash, where an Ed25519 signature would cost ~50 µs per message on the hot path. The MAC covers the
partition the message was written to and its value, so a sealed message cannot be replayed on another partition.
Without a signing key nothing is sealed and stage 2 takes every message, as edges apply unsigned decisions then
(the processor warns at start).
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Mapping
from typing import Any

from spendstream.core.record_signature import RecordSigner

SEAL_HEADER = "spendstream-seal"
_PURPOSE = b"spendstream.processor.partials"


class InternalSeal:
    """Seals and checks the internal topic's messages with a secret derived from the processor's signing key."""

    def __init__(self, signer: RecordSigner) -> None:
        self._secret = signer.derived_secret(_PURPOSE)

    def _mac(self, partition: int, value: bytes) -> bytes:
        return hmac.digest(self._secret, struct.pack(">I", partition) + value, "sha256")

    def headers(self, partition: int, value: bytes) -> list[tuple[str, bytes]]:
        return [(SEAL_HEADER, self._mac(partition, value))]

    def vouches_for(self, partition: int, value: bytes | None, headers: Any) -> bool:
        """True if a message read from ``partition`` carries this processor's seal over ``value``."""
        if value is None:
            return False
        pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
        seal = next((v for k, v in pairs if k == SEAL_HEADER), None)
        return isinstance(seal, bytes) and hmac.compare_digest(seal, self._mac(partition, value))


def seal_headers(seal: InternalSeal | None, partition: int, value: bytes) -> list[tuple[str, bytes]] | None:
    """The headers of an internal message (None without a signing key: nothing to seal with)."""
    return None if seal is None else seal.headers(partition, value)

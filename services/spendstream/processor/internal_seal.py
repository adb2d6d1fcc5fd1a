"""Seals on the processor's internal messages: only a processor can tell stage 2 what a window totals.

Stage 2 merges the window totals it reads on ``spendstream.processor.partials``, decides on them and signs the
decision it publishes. Every service that emits usage may write to the broker, so without this a client could
publish a total of its own making there: an attacker session shut off another team's month with one message
(and lifted its own shutoff with another), each decision signed by the processor. Every processor holds the
signing key (``SPENDSTREAM_SIGNING_KEY``), so a MAC keyed by a secret derived from it vouches for a message at
the cost of a hash, where an Ed25519 signature would cost ~50 µs per message on the hot path. The MAC covers the
partition the message was written to and its value, so a sealed message cannot be replayed on another partition,
and the usage topic's id (its ``epoch``): a window total names the usage offsets it includes, and stage 2 keeps the
highest, so a sealed total captured before the embedded broker restarted (its topics recreated, offsets from 0
again) would outrank every total after it (an attacker session replayed one: the next events of the team went
uncounted). A recreated topic has another id, and such a replay no longer verifies.
Without a signing key nothing is sealed and stage 2 takes every message, as edges apply unsigned decisions then
(the processor warns at start).
"""

from __future__ import annotations

import hmac
import logging
import struct
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient

from spendstream.core.record_signature import RecordSigner
from spendstream.core.topics import USAGE

log = logging.getLogger(__name__)

SEAL_HEADER = "spendstream-seal"
_PURPOSE = b"spendstream.processor.partials"


class InternalSeal:
    """Seals and checks the internal topic's messages with a secret derived from the processor's signing key, for
    one incarnation of the usage topic (``epoch``: ``usage_epoch``)."""

    def __init__(self, signer: RecordSigner, epoch: bytes) -> None:
        self._secret = signer.derived_secret(_PURPOSE)
        self._prefix = struct.pack(">H", len(epoch)) + epoch

    def _mac(self, partition: int, value: bytes) -> bytes:
        return hmac.digest(self._secret, self._prefix + struct.pack(">I", partition) + value, "sha256")

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


def usage_epoch(kafka_conf: dict[str, Any], timeout: float = 30.0) -> bytes:
    """The usage topic's id (Kafka topic ids, which the broker gives a topic when it is created), or b"" from a broker
    that has none: every worker of a deployment reads the same, and a recreated topic reads another. Raises
    ``RuntimeError`` when the broker cannot say: workers that sealed with different epochs would ignore each other."""
    try:
        admin = AdminClient(kafka_conf)  # held until the answer is in: a client destroyed first cancels it
        topic_id = admin.describe_topics(TopicCollection([USAGE]), request_timeout=timeout)[USAGE].result().topic_id
    except KafkaException as exc:
        raise RuntimeError(f"cannot read the id of {USAGE}, which seals the processor's messages: {exc}") from exc
    return str(topic_id).encode() if topic_id is not None else b""


class UnsealedLog:
    """Says that stage 2 ignored messages without the seal: the first at once, then how many more at most once per
    ``interval_s``, so that a client flooding the internal topic cannot flood the processor's log and its disk."""

    def __init__(self, interval_s: float = 60.0, clock: Any = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.ignored = 0  # since the last line
        self._next_line_at = 0.0

    def ignored_one(self, partition: int, offset: int) -> None:
        self.ignored += 1
        now = self.clock()
        if now < self._next_line_at:
            return
        log.error(
            "ignored %d message(s) on the processor's internal topic without this processor's seal, the last on "
            "partition %d at offset %d: only a processor may tell stage 2 a window's total (a client that can write "
            "to the broker tried; restrict writes to that topic with Kafka ACLs)",
            self.ignored, partition, offset,
        )  # fmt: skip
        self.ignored = 0
        self._next_line_at = now + self.interval_s

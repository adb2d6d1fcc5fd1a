"""The decision in force of every scope stays the last record of its key on the compacted enforcement topic.

Compaction keeps a key's last record. A client that may write to ``spendstream.enforcement`` (every edge, with
shared credentials) can put a record after a scope's decision in force: a forged decision or a tombstone, which
edges that verify ignore, or an older signed decision replayed, which a live edge outranks with the newer one it
holds. But once compaction has dropped the decision in force, an edge that starts (or restarts) reads only that
record, and a shut-off scope would be served until the processor's next decision of it, which an unchanged
shutoff never sends. ``DecisionGuard`` follows the topic and, after any record of a scope that is not a signed
decision at least as new as the one in force, publishes the one in force again, as it was (its signature
still holds). Heartbeat keys are left alone: each worker writes its own again every second.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any, NamedTuple

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from spendstream.core.codec import AvroCodec, DecodeError
from spendstream.core.events import Decision
from spendstream.core.record_signature import RecordVerifier
from spendstream.core.topics import ENFORCEMENT, HEARTBEAT_KEY_PREFIX

log = logging.getLogger(__name__)


class InForce(NamedTuple):
    """A scope's newest signed decision, as it was published."""

    version: int
    expires_at: datetime | None
    value: bytes
    headers: list[tuple[str, bytes]]


class DecisionGuard(threading.Thread):
    """Publishes a scope's decision in force again after a record that would displace it under compaction."""

    def __init__(self, kafka_conf: dict[str, Any], verifier: RecordVerifier, topic: str = ENFORCEMENT) -> None:
        super().__init__(name="decision-guard", daemon=True)
        self.kafka_conf = kafka_conf
        self.verifier = verifier
        self.topic = topic
        self.in_force: dict[bytes, InForce] = {}
        self.displaced: set[bytes] = set()  # keys whose last record read is not their decision in force
        self.caught_up = threading.Event()
        self.stopping = threading.Event()
        self.restored = 0
        self._codec = AvroCodec("decision")

    def run(self) -> None:
        consumer = Consumer({**self.kafka_conf, "group.id": "spendstream-decision-guard", "enable.auto.commit": False})
        producer = Producer(self.kafka_conf)
        try:
            partitions = self._partitions(consumer)
            high = {p: consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1] for p in partitions}
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
            read = dict.fromkeys(partitions, 0)
            while not self.stopping.is_set():
                for message in consumer.consume(num_messages=1000, timeout=0.5):
                    if message.error() is None:
                        read[message.partition()] = message.offset() + 1
                        self.observe(message.key(), message.value(), message.headers())
                if not self.caught_up.is_set() and all(read[p] >= high[p] for p in partitions):
                    self.caught_up.set()  # the history read: from now on what it displaced is restored at once
                if self.caught_up.is_set() and self.displaced:
                    self._restore(producer)
        except KafkaException as exc:
            log.error("decision guard stopped: %s; decisions displaced on %s are not restored", exc, self.topic)
        finally:
            consumer.close()
            producer.flush(5)

    def _partitions(self, consumer: Consumer) -> list[int]:
        """The topic's partitions, once it exists (the processor creates it at start)."""
        while not self.stopping.is_set():
            found = consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
            if found is not None and found.error is None and found.partitions:
                return sorted(found.partitions)
            self.stopping.wait(0.5)
        return []

    def observe(self, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]] | None) -> None:
        """Take one record of the topic: a signed decision at least as new as the scope's in force becomes it;
        anything else under a scope's key displaces it."""
        if not key or key.startswith(HEARTBEAT_KEY_PREFIX):
            return
        current = self.in_force.get(key)
        if value is not None and self.verifier.verifies(self.topic, key, value, headers):
            try:
                decision = Decision.from_avro(self._codec.decode(value))
            except (DecodeError, ValueError):
                decision = None
            if decision is not None and (current is None or decision.version >= current.version):
                self.in_force[key] = InForce(decision.version, decision.expires_at, value, list(headers or ()))
                self.displaced.discard(key)
                return
        elif value is None and self.verifier.verifies(self.topic, key, None, headers):
            self.in_force.pop(key, None)  # deleted by a signed tombstone
            self.displaced.discard(key)
            return
        if current is not None:
            self.displaced.add(key)

    def _restore(self, producer: Producer) -> None:
        now = datetime.now(UTC)
        for key in sorted(self.displaced):
            current = self.in_force[key]
            if current.expires_at is not None and current.expires_at <= now:
                continue  # ended with its period: edges drop it anyway
            producer.produce(self.topic, current.value, key=key, headers=current.headers)
            self.restored += 1
            log.warning(
                "a record on %s displaced the decision in force of %s (version %d): published it again, so that "
                "compaction keeps it; a client that may write to the topic forged or replayed a decision",
                self.topic, key.decode("utf-8", "replace"), current.version,
            )  # fmt: skip
        self.displaced.clear()
        deadline = time.monotonic() + 5
        while producer.flush(1) and time.monotonic() < deadline and not self.stopping.is_set():
            pass

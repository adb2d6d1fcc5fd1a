"""The policy in force, for an edge: follows ``spendstream.policy`` in a background thread.

The newest valid record on the topic is the policy in force, whatever its name (records are read in order
from the beginning, with no consumer group, so every edge sees every record); an invalid record is logged
and skipped, and the last valid policy stays. Each adopted policy is handed to ``on_policy``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from spendstream.core.codec import AvroCodec
from spendstream.core.events import PolicyRecord
from spendstream.core.policy import Policy
from spendstream.core.policy_log import read_policy_record
from spendstream.core.record_signature import RecordVerifier
from spendstream.core.topics import POLICY
from spendstream.edge.topic_follower import follow_with_retries, topic_partitions

log = logging.getLogger(__name__)


class PolicyFollower:
    """Calls ``on_policy`` with every newer valid policy on the topic; ``ready`` once the topic is read to its end."""

    def __init__(
        self,
        kafka_conf: dict[str, Any],
        on_policy: Callable[[Policy], None],
        *,
        topic: str = POLICY,
        schema_registry_url: str | None = None,
        poll_interval_s: float = 0.2,
        verifier: RecordVerifier | None = None,
    ) -> None:
        self._conf = {
            **kafka_conf,
            "group.id": f"spendstream-edge-policy-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
        }
        self._on_policy = on_policy
        self._verifier = verifier  # None: every valid policy record is adopted
        self._topic = topic
        self._codec = AvroCodec("policy", schema_registry_url)
        self._poll_interval_s = poll_interval_s
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.version = ""  # of the policy in force, "" before the first one
        self._record: PolicyRecord | None = None  # the record in force: an older one (a replay) is not adopted
        self.stats = {"adopted": 0, "invalid": 0, "unsigned": 0, "replay": 0, "errors": 0}

    def start(self) -> PolicyFollower:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spendstream-edge-policy", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def _run(self) -> None:
        follow_with_retries(self._conf, self._follow, self._stop, self._on_consumer_error)

    def _on_consumer_error(self, exc: KafkaException) -> None:
        self.stats["errors"] += 1
        log.warning("policy consumer: %s; retrying", exc)

    def _follow(self, consumer: Consumer) -> None:
        partitions = topic_partitions(consumer, self._topic, self._stop)
        if partitions is None:
            return
        high_at_start = {
            p: consumer.get_watermark_offsets(TopicPartition(self._topic, p), timeout=2)[1] for p in partitions
        }
        next_offset = dict.fromkeys(partitions, 0)
        consumer.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions])
        while not self._stop.is_set():
            messages = consumer.consume(num_messages=100, timeout=self._poll_interval_s)
            for message in messages:
                if message.error() is not None:
                    continue
                next_offset[message.partition()] = message.offset() + 1
                if message.value() is not None:  # a tombstone removes an old name's record; the policy stays
                    self._on_record(message)
            caught_up = all(next_offset[p] >= high_at_start[p] for p in partitions)
            if not self._ready.is_set() and not messages and caught_up:
                self._ready.set()
                log.info("edge policy view ready: %s", self.version or "no policy published")

    def _on_record(self, message: Any) -> None:
        read = read_policy_record(self._codec, message, self._verifier, self._record)
        if read.outcome != "adopt":
            if read.problem:
                self.stats[read.outcome] += 1  # unsigned, replay or invalid
                kept = self.version or "none"
                log.error("ignoring a policy record (keeping %s): %s", kept, read.problem.splitlines()[0])
            return
        self._record, policy = read.record, read.policy
        assert policy is not None
        if policy.version == self.version:
            return
        self.version = policy.version
        self.stats["adopted"] += 1
        self._on_policy(policy)

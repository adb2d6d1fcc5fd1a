"""Approved budget adjustments into the processor's policy, and the decisions they change (docs/architecture.md §3).

Every worker follows ``spendstream.budget_adjustments`` from the beginning with a group-less consumer (the newest
record per request id is its state, ``core.budget_lifecycle``). When a record arrives, or when an adjustment
starts or reaches its expiry, the thread puts the adjustments in force at that instant on top of the applied policy
(``PolicyHolder.readjust``) and asks the stage-2 partition that owns each changed scope to re-evaluate it: an
approved increase lifts a shutoff, an expired one restores it, without a policy change. The limits are a pure
function of time, so an expiry needs no record to take effect; the ``expired`` record this thread publishes is the
audit entry that says it happened (every worker may publish it; the audit sink keeps one).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from spendstream.core.budget_lifecycle import BudgetRequest, Status, expire, next_expiry, supersedes_step
from spendstream.core.record_signature import RecordSigner, RecordVerifier, signature_headers, vouched_for
from spendstream.core.topics import BUDGET_ADJUSTMENTS
from spendstream.processor.internal_seal import InternalSeal, seal_headers
from spendstream.processor.internal_topics import PARTIALS_TOPIC, ReevaluateMessage, stage2_partition
from spendstream.processor.policy_in_force import PolicyHolder

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.1  # how long one poll waits: the bound on how late an approval or an expiry is applied


class BudgetAdjustmentFollower(threading.Thread):
    def __init__(
        self,
        holder: PolicyHolder,
        kafka_conf: dict[str, Any],
        partitions: int,
        signer: RecordSigner | None = None,
        verifier: RecordVerifier | None = None,
        seal: InternalSeal | None = None,
    ) -> None:
        super().__init__(name="budget-adjustments", daemon=True)
        self.signer = signer  # signs the expiries this follower publishes
        self.seal = seal  # seals its requests to stage 2
        self.verifier = verifier  # None: every step on the topic counts
        self.holder = holder
        self.kafka_conf = kafka_conf
        self.partitions = partitions
        self.stopping = threading.Event()
        self.requests: dict[str, BudgetRequest] = {}
        self._expiring: set[str] = set()  # expired records sent, not yet read back

    def run(self) -> None:
        consumer = Consumer(
            {**self.kafka_conf, "group.id": "spendstream-budget-adjustments", "enable.auto.commit": False}
        )
        producer = Producer(self.kafka_conf)
        consumer.assign([TopicPartition(BUDGET_ADJUSTMENTS, 0, OFFSET_BEGINNING)])
        checked = datetime.now(UTC)
        try:
            while not self.stopping.is_set():
                changed = self._read(consumer.consume(500, _IDLE_POLL_S))
                now = datetime.now(UTC)
                due = next_expiry(self.requests.values(), checked)
                if due is not None and due <= now:
                    changed |= self._boundaries_between(checked, now)
                if changed:  # also what ended while no worker ran, found on the catch-up read
                    self._publish_expiries(producer, now)
                checked = now
                if changed:
                    self.holder.readjust([r for r in self.requests.values() if r.status is not Status.expired], now)
                    self._reevaluate(producer, changed)
        finally:
            consumer.close()
            producer.flush(5)

    def _read(self, messages: Iterable[Any]) -> set[str]:
        changed: set[str] = set()
        for message in messages:
            if message.error() or message.value() is None:
                continue
            if not vouched_for(self.verifier, BUDGET_ADJUSTMENTS, message):
                log.error(
                    "ignoring a budget adjustment at offset %d not signed with the signing key (key %r): only the "
                    "API (and this processor, for expiries) may change a budget",
                    message.offset(), message.key(),
                )  # fmt: skip
                continue
            try:
                request = BudgetRequest.from_json(message.value())
            except (ValueError, KeyError, TypeError) as exc:
                log.error("undecodable budget adjustment at offset %d: %s", message.offset(), exc)
                continue
            if not supersedes_step(request, self.requests.get(request.id)):
                log.error(
                    "ignoring budget adjustment %s at offset %d: its step %s (%s) is older than the one applied (a "
                    "replay)", request.id, message.offset(), request.step, request.step_at.isoformat(),
                )  # fmt: skip
                continue
            self.requests[request.id] = request
            if request.status is Status.expired:
                self._expiring.discard(request.id)
            changed.add(request.scope)
        return changed

    def _boundaries_between(self, after: datetime, until: datetime) -> set[str]:
        """Scopes of approved adjustments that started or ended in ``(after, until]``."""
        return {
            r.scope
            for r in self.requests.values()
            if r.status is Status.approved
            and any(t is not None and after < t <= until for t in (r.starts_at, r.expires_at))
        }

    def _publish_expiries(self, producer: Producer, now: datetime) -> None:
        for request in self.requests.values():
            ended = request.expires_at is not None and request.expires_at <= now
            if request.status is Status.approved and ended and request.id not in self._expiring:
                self._expiring.add(request.id)
                key, value = request.id.encode(), expire(request).to_json()
                signed = signature_headers(self.signer, BUDGET_ADJUSTMENTS, key, value)
                producer.produce(BUDGET_ADJUSTMENTS, value, key=key, headers=signed)
                log.info("budget adjustment %s on %s expired", request.id, request.scope)
        producer.poll(0)

    def _reevaluate(self, producer: Producer, scopes: set[str]) -> None:
        by_partition: dict[int, list[str]] = {}
        for scope in sorted(scopes):
            by_partition.setdefault(stage2_partition(scope, self.partitions), []).append(scope)
        for partition, named in sorted(by_partition.items()):
            message = ReevaluateMessage(self.holder.policy.version, tuple(named)).encode()
            sealed = seal_headers(self.seal, partition, message)
            producer.produce(PARTIALS_TOPIC, message, partition=partition, headers=sealed)
        producer.flush(5)

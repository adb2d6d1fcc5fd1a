"""The policy a worker enforces: held for both stages, and followed on ``spendstream.policy`` by every worker.

The newest valid record on ``spendstream.policy`` is in force, whatever its name (``core.policy_log``). Every
worker follows the topic with its own group-less consumer thread (a consumer group would give the single
partition to one worker only). A valid record replaces the policy at once; an invalid one is rejected with a
``policy`` alert and the last good policy stays. After a change the follower asks stage 2 to re-evaluate every
scope (a ``ReevaluateMessage`` to each internal partition), which is how a raised budget lifts a shutoff
mid-period.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from spendstream.core.budget_lifecycle import BudgetRequest, adjusted_policy
from spendstream.core.codec import AvroCodec
from spendstream.core.events import Alert, AlertKind, Severity
from spendstream.core.policy import Policy
from spendstream.core.policy_log import PolicyInForce, read_policy_record
from spendstream.core.record_signature import RecordSigner, RecordVerifier, signature_headers
from spendstream.core.topics import ALERTS, POLICY
from spendstream.processor.internal_seal import InternalSeal, seal_headers
from spendstream.processor.internal_topics import PARTIALS_TOPIC, ReevaluateMessage
from spendstream.processor.spend_accounting import Retention, WindowCalendar

log = logging.getLogger(__name__)

EXIT_NEW_TIMEZONE = 75  # EX_TEMPFAIL: started again, the worker rebuilds its windows in the new timezone


def history_days(policy: Policy) -> int:
    """Local days of history the policy's daily spike rules read before the current day."""
    return max((rule.window_days for rule in policy.spike_rules if rule.kind == "daily"), default=0)


class PolicyHolder:
    """The policy in force, swapped atomically by the policy thread and read by both stages, with the window
    calendar and retention that follow from it (timezone, daily spike history).

    ``policy`` is the applied policy (``base``) with the approved budget adjustments in force now
    (``core.budget_lifecycle.adjusted_policy``, kept current by ``budget_adjustments``); it keeps its version."""

    def __init__(self, policy: Policy, allowed_lateness: timedelta) -> None:
        self.base = self.policy = policy
        self.adjustments: list[BudgetRequest] = []
        # called with (the policy before, the policy now) in the thread that swapped them, once ``policy`` is the
        # new one (stage 1 announces the windows the new rules read: ``StageOne.announce_newly_watched``)
        self.on_swap: list[Callable[[Policy, Policy], object]] = []
        self._lock = threading.Lock()
        self.calendar = WindowCalendar(policy.tz)
        self.lateness_s = int(allowed_lateness.total_seconds())
        self.retention = Retention(policy.tz, self.lateness_s, history_days(policy))

    def adopt(self, policy: Policy) -> bool:
        with self._lock:
            if policy.version == self.base.version:
                return False
            if policy.timezone != self.base.timezone:
                self.calendar = WindowCalendar(policy.tz)
            if policy.timezone != self.base.timezone or history_days(policy) != self.retention.history_days:
                self.retention = Retention(policy.tz, self.lateness_s, history_days(policy))
            self.base = policy
            before = self.policy
            after = self.policy = adjusted_policy(policy, self.adjustments, datetime.now(UTC))
        self._swapped(before, after)
        return True

    def readjust(self, adjustments: list[BudgetRequest], at: datetime) -> None:
        """Put the budget adjustments in force at ``at`` on top of the applied policy."""
        with self._lock:
            self.adjustments = adjustments
            before = self.policy
            after = self.policy = adjusted_policy(self.base, adjustments, at)
        self._swapped(before, after)

    def _swapped(self, before: Policy, after: Policy) -> None:
        if before is not after:
            for listener in self.on_swap:
                listener(before, after)


class PolicyFollower(threading.Thread):
    """Follows ``spendstream.policy`` from ``start_offset`` (where the startup read ended), without a consumer group,
    and hot-swaps the policy to every valid record published after the one in force, whatever its name. An older
    one (a replayed record) is refused, and the record in force is published again as it was, so that compaction,
    which keeps a key's last record, keeps it and not the replay; so is it after a record it refuses under its
    name (unsigned, invalid, a tombstone).

    A policy in another timezone cuts days, weeks, months and quarters elsewhere, so the windows kept so far are not
    its windows (an attacker session: a budget applied with the new timezone saw $0.00006 of $5 spent). With
    ``restart_on_new_timezone`` (a ledger to rebuild from) the worker exits with ``EXIT_NEW_TIMEZONE`` instead of
    adopting it; its supervisor (``dev``, the orchestrator) starts it again, with that policy in force, and the
    restore rebuilds the windows from the ledger in the new timezone (``StageOne.restore``)."""

    def __init__(
        self,
        holder: PolicyHolder,
        kafka_conf: dict[str, Any],
        partitions: int,
        start_offset: int = 0,
        verifier: RecordVerifier | None = None,
        in_force: PolicyInForce | None = None,
        signer: RecordSigner | None = None,
        seal: InternalSeal | None = None,
        restart_on_new_timezone: bool = False,
    ) -> None:
        super().__init__(name="policy-follower", daemon=True)
        self.restart_on_new_timezone = restart_on_new_timezone
        self.in_force = in_force  # the record in force as read (None: the seed or the defaults, until one is read)
        self.verifier = verifier  # None: every valid record is adopted
        self.signer = signer  # signs the alerts it raises
        self.seal = seal  # seals its requests to stage 2
        self.holder = holder
        self.kafka_conf = kafka_conf
        self.partitions = partitions
        self.start_offset = start_offset
        self.stopping = threading.Event()
        self.codec = AvroCodec("policy")
        self.alert_codec = AvroCodec("alert")

    def run(self) -> None:
        consumer = Consumer({**self.kafka_conf, "group.id": "spendstream-policy-follower", "enable.auto.commit": False})
        producer = Producer(self.kafka_conf)
        consumer.assign([TopicPartition(POLICY, 0, self.start_offset or OFFSET_BEGINNING)])
        try:
            while not self.stopping.is_set():
                message = consumer.poll(0.5)
                if message is None or message.error():
                    continue
                self._handle(message, producer)
        finally:
            consumer.close()
            producer.flush(5)

    def _handle(self, message: Any, producer: Producer) -> None:
        current = self.in_force
        read = read_policy_record(self.codec, message, self.verifier, current.record if current else None)
        if read.outcome == "same":
            return
        if read.outcome != "adopt":
            name = read.record.name if read.record else (message.key() or b"?").decode("utf-8", "replace")
            self._reject(name, f"{read.problem}; keeping {self.holder.policy.version}", producer)
            # so that compaction, which keeps a key's last record, keeps the record in force: after a replay, and
            # after any record (unsigned, invalid, a tombstone) under the name of the one in force
            if current is not None and (read.outcome == "replay" or message.key() == current.record.name.encode()):
                producer.produce(POLICY, current.value, key=current.record.name.encode(), headers=list(current.headers))
                producer.flush(5)
            return
        in_force = read.in_force(message)
        policy = in_force.policy
        if policy.timezone != self.holder.base.timezone and not self.restart_on_new_timezone:
            log.error(
                "policy %s version %s cuts days, weeks, months and quarters in %s, not %s, and there is no ledger to "
                "rebuild the windows from: calendar budgets count from the windows of %s onwards",
                policy.name, policy.version, policy.timezone, self.holder.base.timezone, policy.timezone,
            )  # fmt: skip
        elif policy.timezone != self.holder.base.timezone:
            log.warning(
                "policy %s version %s cuts days, weeks, months and quarters in %s, not %s: this worker restarts to "
                "rebuild its windows from the ledger in %s",
                policy.name, policy.version, policy.timezone, self.holder.base.timezone, policy.timezone,
            )  # fmt: skip
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(EXIT_NEW_TIMEZONE)
        self.in_force = in_force
        if self.holder.adopt(policy):
            log.info("policy %s version %s in force", policy.name, policy.version)
            reevaluate = ReevaluateMessage(policy.version).encode()
            for partition in range(self.partitions):
                sealed = seal_headers(self.seal, partition, reevaluate)
                producer.produce(PARTIALS_TOPIC, reevaluate, partition=partition, headers=sealed)
            producer.flush(5)

    def _reject(self, name: str, message: str, producer: Producer) -> None:
        log.error("%s", message)
        alert = Alert(
            scope=f"policy:{name}",
            kind=AlertKind.policy,
            severity=Severity.critical,
            message=message,
            policy_version=self.holder.policy.version,
        )
        key, value = alert.scope.encode(), self.alert_codec.encode(alert.to_avro())
        producer.produce(ALERTS, value, key=key, headers=signature_headers(self.signer, ALERTS, key, value))
        producer.flush(5)

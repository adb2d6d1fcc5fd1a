"""The ledger's ``budgets`` table (and the usage sink's prices) follow the policy in force (``core.policy_log``).

Runs beside the ledger sinks: at start it loads the budgets of the policy in force for the current month (UTC),
then follows ``spendstream.policy`` and reloads them, with the new version, whenever another valid policy comes
into force, and again when a month begins. Chargeback, forecast, the weekly report and the dashboard then
compare spend with the budgets the processors enforce. A month's rows are replaced only when the version
differs from the one already loaded, so a restart rewrites nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from spendstream.analytics.budgets import load_budgets, policy_budget_lines
from spendstream.core.codec import AvroCodec
from spendstream.core.config import Settings
from spendstream.core.policy import Policy
from spendstream.core.policy_log import PolicyLogUnreadable, read_policy_log, read_policy_record
from spendstream.core.topics import POLICY

log = logging.getLogger(__name__)


class PolicyBudgets:
    """Keeps ``budgets`` equal to the policy in force's budgets for the current month."""

    def __init__(
        self,
        settings: Settings,
        client: Any,
        today: Callable[[], date] | None = None,
        on_policy: Callable[[Policy], None] | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.on_policy = on_policy  # e.g. the usage sink's price table follows the policy in force too
        self.db = settings.clickhouse_database
        self.today = today or (lambda: datetime.now(UTC).date())
        self.policy: Policy | None = None
        self.loaded: tuple[date, str] | None = None  # (month, policy version) in the table

    def run(self, stop: threading.Event) -> None:
        conf = self.settings.kafka_client_config()
        verifier = self.settings.record_verifier()
        while True:
            try:
                found = read_policy_log(conf, self.settings.schema_registry_url, verifier=verifier)
                break
            except (KafkaException, PolicyLogUnreadable) as exc:
                log.warning("cannot read %s yet (%s); retrying", POLICY, exc)
                if stop.wait(2.0):
                    return
        in_force = found.in_force.record if found.in_force is not None else None
        if found.in_force is not None:
            self.adopt(found.in_force.policy)
        codec = AvroCodec("policy", self.settings.schema_registry_url)
        consumer = Consumer({**conf, "group.id": "spendstream-ledger-budgets", "enable.auto.commit": False})
        consumer.assign([TopicPartition(POLICY, 0, found.next_offset)])
        try:
            while not stop.is_set():
                message = consumer.poll(0.5)
                if message is not None and not message.error():
                    read = read_policy_record(codec, message, verifier, in_force)
                    if read.outcome == "adopt" and read.policy is not None:
                        in_force = read.record
                        self.adopt(read.policy)
                    elif read.problem:
                        log.warning("ledger budgets unchanged: %s", read.problem)
                self.sync()
        finally:
            consumer.close()

    def adopt(self, policy: Policy) -> None:
        self.policy = policy
        if self.on_policy is not None:
            self.on_policy(policy)
        self.sync()

    def sync(self) -> None:
        """Load this month's budgets if the table does not hold the policy in force's yet."""
        if self.policy is None:
            return
        month = self.today().replace(day=1)
        wanted = (month, self.policy.version)
        if self.loaded == wanted:
            return
        try:
            loaded = self.client.query(
                f"SELECT groupUniqArray(policy_version) FROM {self.db}.budgets FINAL WHERE month = {{m:Date}}",
                parameters={"m": month},
            ).result_rows[0][0]
            if loaded != [self.policy.version]:
                lines = policy_budget_lines(self.policy)
                rows = load_budgets(self.client, self.db, lines, month, self.policy.version)
                log.info("ledger budgets for %s: %d of policy %s", month, rows, self.policy.version)
        except Exception:  # the ledger is unavailable for a moment: the next poll tries again
            log.warning("cannot load the budgets of policy %s into the ledger yet", self.policy.version, exc_info=True)
            return
        self.loaded = wanted

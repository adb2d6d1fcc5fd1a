"""The audit sink: Decisions (``spendstream.enforcement``) and Alerts (``spendstream.alerts``) into
the ledger's ``decisions`` and ``alerts`` tables.

Idempotent by construction: both tables are ReplacingMergeTree keyed on the record's identity
((scope, version) and alert_id), so a redelivery after a crash collapses. Offsets are committed
only after the insert lands (at-least-once into an idempotent table = exactly once in FINAL).
Values that do not decode go to ``audit_rejects`` with their reason and bytes, never dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message

from spendstream.core import topics
from spendstream.core.codec import AvroCodec, DecodeError
from spendstream.core.config import Settings
from spendstream.core.metrics import AUDIT_SINK_RECORDS

log = logging.getLogger(__name__)

DECISION_COLUMNS = [
    "scope", "action", "fallback_models", "throttle_rps", "allowed_models", "reason", "spend_nanos", "limit_nanos",
    "period", "period_start", "expires_at", "version", "issued_at", "policy_version", "critical_throttle_rps",
]  # fmt: skip
ALERT_COLUMNS = [
    "alert_id", "scope", "kind", "severity", "message", "spend_nanos", "limit_nanos", "period", "occurred_at",
    "policy_version",
]  # fmt: skip
REJECT_COLUMNS = ["topic", "partition", "offset", "reason", "raw"]


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def decision_row(record: dict[str, Any]) -> list[Any]:
    row = [record[c] for c in DECISION_COLUMNS]
    for name in ("period_start", "expires_at", "issued_at"):
        i = DECISION_COLUMNS.index(name)
        row[i] = _utc(row[i])
    return row


def alert_row(record: dict[str, Any]) -> list[Any]:
    row = [record[c] for c in ALERT_COLUMNS]
    row[ALERT_COLUMNS.index("occurred_at")] = _utc(record["occurred_at"])
    return row


class AuditSink:
    """Consume decisions and alerts in batches; ``run_once`` for tests, ``run`` beside the usage sink."""

    def __init__(self, settings: Settings, client: Any, group: str = "spendstream-audit-sink") -> None:
        self.settings = settings
        self.client = client
        self.db = settings.clickhouse_database
        self.codecs = {
            topics.ENFORCEMENT: AvroCodec("decision", settings.schema_registry_url),
            topics.ALERTS: AvroCodec("alert", settings.schema_registry_url),
        }
        self.consumer = Consumer(
            {
                **settings.kafka_client_config(),
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                # A crashed sink's partitions move within seconds; the embedded broker also completes
                # a group join after about half the session timeout.
                "session.timeout.ms": 6_000,
                "heartbeat.interval.ms": 1_000,
            }
        )
        self.consumer.subscribe([topics.ENFORCEMENT, topics.ALERTS])
        self.counts = {"decisions": 0, "alerts": 0, "rejected": 0}

    def run_once(self, max_messages: int = 10_000, timeout: float = 1.0) -> int:
        """Poll one batch, write it, commit its offsets; returns the number of messages handled."""
        messages = [m for m in self.consumer.consume(max_messages, timeout) if not self._is_eof(m)]
        if not messages:
            return 0
        self.write(messages)
        self.consumer.commit(asynchronous=False)
        return len(messages)

    def run(self, stop_event: threading.Event) -> None:
        try:
            while not stop_event.is_set():
                self.run_once(timeout=self.settings.sink_batch_ms / 1000)
        finally:
            self.close()

    def close(self) -> None:
        self.consumer.close()

    @staticmethod
    def _is_eof(message: Message) -> bool:
        error = message.error()
        if error is None:
            return False
        if error.code() == KafkaError._PARTITION_EOF:
            return True
        raise RuntimeError(f"audit sink consumer error: {error}")

    def write(self, messages: Iterable[Message]) -> None:
        """Decode and insert one batch (each table in one insert)."""
        decisions, alerts, rejects = [], [], []
        for message in messages:
            topic, value = message.topic(), message.value() or b""
            if topic == topics.ENFORCEMENT and (message.key() or b"").startswith(topics.HEARTBEAT_KEY_PREFIX):
                continue  # a processor's proof of life, not a decision
            try:
                record = self.codecs[topic].decode(value)
                (decisions if topic == topics.ENFORCEMENT else alerts).append(
                    decision_row(record) if topic == topics.ENFORCEMENT else alert_row(record)
                )
            except (DecodeError, KeyError) as exc:
                rejects.append([topic, message.partition(), message.offset(), str(exc), value])
        if decisions:
            self.client.insert(f"{self.db}.decisions", decisions, column_names=DECISION_COLUMNS)
        if alerts:
            self.client.insert(f"{self.db}.alerts", alerts, column_names=ALERT_COLUMNS)
        if rejects:
            log.warning("audit sink: %d undecodable records kept in audit_rejects", len(rejects))
            self.client.insert(f"{self.db}.audit_rejects", rejects, column_names=REJECT_COLUMNS)
        self.counts["decisions"] += len(decisions)
        self.counts["alerts"] += len(alerts)
        self.counts["rejected"] += len(rejects)
        for kind, rows in (("decision", decisions), ("alert", alerts), ("rejected", rejects)):
            if rows:
                AUDIT_SINK_RECORDS.labels(kind).inc(len(rows))

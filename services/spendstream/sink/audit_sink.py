"""The audit sink: the ledger's audit trail, one hash chain per stream (``core.audit_chain``).

| topic | table | identity |
|---|---|---|
| ``spendstream.enforcement`` | ``decisions`` | (scope, version) |
| ``spendstream.alerts`` | ``alerts`` | alert_id |
| ``spendstream.policy`` | ``policy_versions`` | (version, published_at) |
| ``spendstream.budget_adjustments`` | ``budget_events`` | (id, step, step_at) |

Each of these topics has one partition, and the sink's consumer group gives it to one sink: that sink is the
single writer of the stream, so it appends each record to the chain as it inserts it (``chain_seq``,
``prev_hash``, ``record_hash``). The chain heads are read back from the ledger when partitions are assigned (a
restart, a rebalance) or after a failed insert, with the identities of the newest records: a record the ledger
holds already (a redelivery after a crash, an expiry every processor worker announced) is skipped, so each is
chained once. After each batch the heads are published to ``spendstream.audit.heads``, the anchor that shows a
truncated chain. Offsets are committed only after the inserts land. Values that do not decode go to
``audit_rejects`` with their reason and bytes, never dropped; so do decisions, alerts, policies and budget steps
the verify key does not vouch for (no service applied them, and the ledger's restores republish the trail signed).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from spendstream.core import topics
from spendstream.core.audit_chain import Head, normalised
from spendstream.core.budget_lifecycle import BudgetRequest
from spendstream.core.codec import AvroCodec, DecodeError
from spendstream.core.config import Settings
from spendstream.core.metrics import AUDIT_SINK_RECORDS
from spendstream.core.record_signature import signature_headers, vouched_for

log = logging.getLogger(__name__)

DECISION_COLUMNS = [
    "scope", "action", "fallback_models", "throttle_rps", "allowed_models", "reason", "spend_nanos", "limit_nanos",
    "period", "period_start", "expires_at", "version", "issued_at", "policy_version", "critical_throttle_rps",
]  # fmt: skip
ALERT_COLUMNS = [
    "alert_id", "scope", "kind", "severity", "message", "spend_nanos", "limit_nanos", "period", "occurred_at",
    "policy_version",
]  # fmt: skip
POLICY_COLUMNS = ["name", "version", "document", "published_at", "published_by"]
BUDGET_EVENT_COLUMNS = [
    "id", "kind", "scope", "period", "amount_nanos", "starts_at", "expires_at", "status", "requested_by",
    "requested_at", "reason", "step", "step_by", "step_at", "step_reason", "approver_level",
]  # fmt: skip
CHAIN_COLUMNS = ["chain_seq", "prev_hash", "record_hash"]
REJECT_COLUMNS = ["topic", "partition", "offset", "reason", "raw"]
RECENT_IDENTITIES = 100_000  # per stream: how far back a redelivered record is recognised
# how long a decision restored to a restarted broker stays in force: the processor decides again within seconds
RESTORED_DECISION_S = timedelta(minutes=2)


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


def policy_row(record: dict[str, Any]) -> list[Any]:
    return [*(record[c] for c in POLICY_COLUMNS[:3]), _utc(record["published_at"]), record["published_by"]]


def budget_event_row(request: BudgetRequest) -> list[Any]:
    data = asdict(request)
    return [_utc(v) if isinstance(v, datetime) else str(v) if c in ("kind", "status") else v
            for c, v in ((c, data[c]) for c in BUDGET_EVENT_COLUMNS)]  # fmt: skip


@dataclass(frozen=True)
class Stream:
    """One audited topic: its table, columns, what identifies a record, and how a value becomes a row."""

    table: str
    columns: list[str]
    identity: tuple[str, ...]
    row: Callable[[bytes], list[Any]]
    metric: str

    def record_id(self, record: dict[str, Any]) -> str:
        return "/".join(str(normalised(record[c])) for c in self.identity)


@dataclass
class Chain:
    head: Head = field(default_factory=Head)
    recent: dict[tuple[Any, ...], None] = field(default_factory=dict)  # identities of the newest records, in order

    def remember(self, identity: tuple[Any, ...]) -> None:
        self.recent[identity] = None
        if len(self.recent) > RECENT_IDENTITIES:
            del self.recent[next(iter(self.recent))]


def audit_streams(registry_url: str | None = None) -> dict[str, Stream]:
    """Audited topic -> its stream."""
    decode_decision = AvroCodec("decision", registry_url).decode
    decode_alert = AvroCodec("alert", registry_url).decode
    decode_policy = AvroCodec("policy", registry_url).decode
    return {
        topics.ENFORCEMENT: Stream(
            "decisions", DECISION_COLUMNS, ("scope", "version"), lambda v: decision_row(decode_decision(v)), "decision"
        ),
        topics.ALERTS: Stream("alerts", ALERT_COLUMNS, ("alert_id",), lambda v: alert_row(decode_alert(v)), "alert"),
        topics.POLICY: Stream(
            "policy_versions", POLICY_COLUMNS, ("version", "published_at"), lambda v: policy_row(decode_policy(v)),
            "policy_version",
        ),
        topics.BUDGET_ADJUSTMENTS: Stream(
            "budget_events", BUDGET_EVENT_COLUMNS, ("id", "step", "step_at"),
            lambda v: budget_event_row(BudgetRequest.from_json(v)), "budget_event",
        ),
    }  # fmt: skip


# Topics whose records the services apply only when signed: a record the verify key does not vouch for is not
# part of the trail (a restore would republish it signed, and a forged approval would become a real one).
SIGNED_TOPICS = frozenset({topics.ENFORCEMENT, topics.ALERTS, topics.POLICY, topics.BUDGET_ADJUSTMENTS})
NOT_SIGNED = (
    "not signed with the signing key that SPENDSTREAM_VERIFY_KEY pairs with (forged by a client that may write to "
    "the topic, or published by a service without the key): no service applied it, so it is not in the trail"
)


class AuditSink:
    """Consume the audited topics in batches; ``run_once`` for tests, ``run`` beside the usage sink."""

    def __init__(self, settings: Settings, client: Any, group: str = "spendstream-audit-sink") -> None:
        self.settings = settings
        self.client = client
        self.db = settings.clickhouse_database
        self.streams = audit_streams(settings.schema_registry_url)
        self._chains: dict[str, Chain] | None = None  # None: read the heads from the ledger before the next write
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
        self.consumer.subscribe(list(self.streams), on_assign=self._assigned)
        self.anchors = Producer(settings.kafka_client_config())
        self.counts = {"decisions": 0, "alerts": 0, "policy_versions": 0, "budget_events": 0, "rejected": 0}
        self.verifier = settings.record_verifier()  # None: every record is chained (no keys in this deployment)

    def _assigned(self, _consumer: Consumer, _partitions: list[Any]) -> None:
        self._chains = None  # another sink may have extended the chains meanwhile

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
        self.anchors.flush(5)

    @staticmethod
    def _is_eof(message: Message) -> bool:
        error = message.error()
        if error is None:
            return False
        if error.code() == KafkaError._PARTITION_EOF:
            return True
        raise RuntimeError(f"audit sink consumer error: {error}")

    def chains(self) -> dict[str, Chain]:
        """Each stream's head and newest identities, as the ledger holds them."""
        if self._chains is None:
            self._chains = {stream.table: self._read_chain(stream) for stream in self.streams.values()}
        return self._chains

    def _read_chain(self, stream: Stream) -> Chain:
        table = f"{self.db}.{stream.table}"
        rows = self.client.query(
            f"SELECT chain_seq, record_hash, {', '.join(stream.identity)} FROM {table} "
            f"WHERE record_hash != '' ORDER BY chain_seq DESC LIMIT {RECENT_IDENTITIES}"
        ).result_rows
        chain = Chain(Head(rows[0][0], rows[0][1]) if rows else Head())
        for row in reversed(rows):
            chain.remember(tuple(normalised(v) for v in row[2:]))
        return chain

    def write(self, messages: Iterable[Message]) -> None:
        """Decode, chain and insert one batch (each table in one insert); duplicates of chained records are skipped."""
        chains = self.chains()
        rows: dict[str, list[list[Any]]] = {stream.table: [] for stream in self.streams.values()}
        rejects = []
        for message in messages:
            topic, value = message.topic(), message.value() or b""
            if topic == topics.ENFORCEMENT and (message.key() or b"").startswith(topics.HEARTBEAT_KEY_PREFIX):
                continue  # a processor's proof of life, not a decision
            stream = self.streams[topic]
            if topic in SIGNED_TOPICS and not vouched_for(self.verifier, topic, message):
                rejects.append([topic, message.partition(), message.offset(), NOT_SIGNED, value])
                continue
            try:
                row = stream.row(value)
            except (DecodeError, KeyError, ValueError, TypeError) as exc:
                rejects.append([topic, message.partition(), message.offset(), str(exc), value])
                continue
            record = dict(zip(stream.columns, row, strict=True))
            chain = chains[stream.table]
            identity = tuple(normalised(record[c]) for c in stream.identity)
            if identity in chain.recent:
                continue
            chain.head, prev_hash = chain.head.next(record)
            chain.remember(identity)
            rows[stream.table].append([*row, chain.head.position, prev_hash, chain.head.hash])
        try:
            for stream in self.streams.values():
                if rows[stream.table]:
                    self.client.insert(
                        f"{self.db}.{stream.table}", rows[stream.table], column_names=stream.columns + CHAIN_COLUMNS
                    )
        except BaseException:
            self._chains = None  # what landed is in the ledger; the heads are read from there again
            raise
        if rejects:
            log.warning("audit sink: %d undecodable or unsigned records kept in audit_rejects", len(rejects))
            self.client.insert(f"{self.db}.audit_rejects", rejects, column_names=REJECT_COLUMNS)
        self._anchor([stream.table for stream in self.streams.values() if rows[stream.table]], chains)
        for stream in self.streams.values():
            if rows[stream.table]:
                self.counts[stream.table] += len(rows[stream.table])
                AUDIT_SINK_RECORDS.labels(stream.metric).inc(len(rows[stream.table]))
        if rejects:
            self.counts["rejected"] += len(rejects)
            AUDIT_SINK_RECORDS.labels("rejected").inc(len(rejects))

    def _anchor(self, tables: list[str], chains: dict[str, Chain]) -> None:
        """Publish the new heads outside the ledger (best effort: a missed anchor is replaced by the next one)."""
        for table in tables:
            head = chains[table].head
            value = {"stream": table, "position": head.position, "hash": head.hash, "at": datetime.now(UTC).isoformat()}
            self.anchors.produce(topics.AUDIT_HEADS, json.dumps(value).encode(), key=table.encode())
        self.anchors.poll(0)


def _audited_topic_is_empty(settings: Settings, topic: str, timeout: float) -> bool:
    """Whether an audited topic (one partition) holds nothing: a memory-only broker that restarted."""
    conf = settings.kafka_client_config()
    consumer = Consumer({**conf, "group.id": "spendstream-ledger-restore", "enable.auto.commit": False})
    try:
        return consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=timeout)[1] <= 0
    finally:
        consumer.close()


def restore_decisions(settings: Settings, client: Any, now: datetime | None = None, timeout: float = 5.0) -> int:
    """Republish the newest decision of every scope that still restricts it (not ``allow``, its period not over)
    from the ``decisions`` table to an EMPTY ``spendstream.enforcement`` (a memory-only broker that restarted), with
    their versions: edges refuse a shut-off team, or a feature whose registration waits for approval, from their
    start, instead of serving it for the seconds until a processor has rebuilt its windows and decided again (the
    processor's next decisions carry higher versions). Each lasts at most ``RESTORED_DECISION_S`` from now: a
    processor that starts with no state of a scope publishes nothing while it allows it (edges assume ``allow``), so
    a restriction lifted meanwhile (an increase approved during the restart) would otherwise stay in force.
    Returns the decisions republished."""
    conf = settings.kafka_client_config()
    if not _audited_topic_is_empty(settings, topics.ENFORCEMENT, timeout):
        return 0
    db, now = settings.clickhouse_database, now or datetime.now(UTC)
    rows = client.query(
        f"SELECT {', '.join(DECISION_COLUMNS)} FROM {db}.decisions "
        f"WHERE (scope, version) IN (SELECT scope, max(version) FROM {db}.decisions GROUP BY scope)"
    ).result_rows
    codec = AvroCodec("decision")
    producer = Producer(conf)
    signer = settings.record_signer()  # edges that verify decisions apply only signed ones
    restored = 0
    for row in rows:
        record = dict(zip(DECISION_COLUMNS, row, strict=True))
        for name in ("period_start", "expires_at", "issued_at"):
            if record[name] is not None and record[name].tzinfo is None:
                record[name] = record[name].replace(tzinfo=UTC)
        if record["action"] == "allow" or (record["expires_at"] is not None and record["expires_at"] <= now):
            continue
        bridge = now + RESTORED_DECISION_S
        record["expires_at"] = bridge if record["expires_at"] is None else min(record["expires_at"], bridge)
        key, value = record["scope"].encode(), codec.encode(record)
        signed = signature_headers(signer, topics.ENFORCEMENT, key, value)
        producer.produce(topics.ENFORCEMENT, value, key=key, headers=signed)
        restored += 1
    if producer.flush(timeout):
        raise RuntimeError(f"the broker did not acknowledge the {restored} restored decisions")
    return restored


def restore_budget_requests(settings: Settings, client: Any, timeout: float = 5.0) -> int:
    """Republish the newest step of every budget request from ``budget_events`` to an EMPTY
    ``spendstream.budget_adjustments`` (a memory-only broker that restarted): the ledger is the durable truth, and
    an approved increase must outlive the broker (docs/architecture.md §7.6). Returns the requests republished.

    The audit sink recognises the republished steps as chained already, so they are not recorded twice.
    """
    conf = settings.kafka_client_config()
    if not _audited_topic_is_empty(settings, topics.BUDGET_ADJUSTMENTS, timeout):
        return 0
    rows = client.query(
        f"SELECT {', '.join(BUDGET_EVENT_COLUMNS)} FROM {settings.clickhouse_database}.budget_events "
        "WHERE record_hash != '' ORDER BY chain_seq"
    ).result_rows
    newest = {row[0]: dict(zip(BUDGET_EVENT_COLUMNS, row, strict=True)) for row in rows}  # the last step wins
    producer = Producer(conf)
    signer = settings.record_signer()  # the processor and the API apply only signed steps
    for request_id, row in newest.items():
        request = BudgetRequest.from_json(json.dumps(normalised(row)))
        key, value = request_id.encode(), request.to_json()
        signed = signature_headers(signer, topics.BUDGET_ADJUSTMENTS, key, value)
        producer.produce(topics.BUDGET_ADJUSTMENTS, value, key=key, headers=signed)
    if producer.flush(timeout):
        raise RuntimeError(f"the broker did not acknowledge the {len(newest)} restored budget requests")
    return len(newest)

"""The audit sink writes Decisions and Alerts from the real broker into chDB, once each, bad bytes kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import Producer

from spendstream.analytics import reports
from spendstream.core import topics
from spendstream.core.codec import AvroCodec
from spendstream.core.config import Settings
from spendstream.core.events import Action, Alert, AlertKind, Decision, Severity
from spendstream.core.ledger_store import connect, migrate
from spendstream.sink.audit_sink import AuditSink


def drain(sink: AuditSink, want: int) -> int:
    seen = 0
    for _ in range(60):
        seen += sink.run_once(max_messages=1000, timeout=0.5)
        if seen >= want:
            break
    return seen


def test_decisions_and_alerts_land_once_with_policy_version(settings: Settings) -> None:
    now = datetime.now(UTC)
    decision = Decision(
        scope="team:marketing", action=Action.fallback, fallback_models={"gpt-4o": "gpt-4o-mini"}, version=7,
        spend_nanos=7_200_000_000_000, limit_nanos=8_000_000_000_000, period="month", reason="90% of budget",
        expires_at=now + timedelta(hours=1), policy_version="pv-abc",
    )  # fmt: skip
    expired = Decision(scope="team:sales", action=Action.shutoff, version=3, expires_at=now - timedelta(minutes=1))
    alert = Alert(scope="team:marketing", kind=AlertKind.threshold, severity=Severity.warning,
                  message="marketing at 90%", policy_version="pv-abc")  # fmt: skip
    producer = Producer(settings.kafka_client_config())
    dcodec, acodec = AvroCodec("decision"), AvroCodec("alert")
    for _ in range(2):  # every record delivered twice: the tables must hold each once
        producer.produce(topics.ENFORCEMENT, dcodec.encode(decision.to_avro()), key=decision.scope)
        producer.produce(topics.ENFORCEMENT, dcodec.encode(expired.to_avro()), key=expired.scope)
        producer.produce(topics.ALERTS, acodec.encode(alert.to_avro()), key=alert.scope)
    producer.produce(topics.ALERTS, b"not avro", key="team:x")
    assert producer.flush(10) == 0

    client = connect(settings)
    try:
        migrate(client, settings)
        sink = AuditSink(settings, client)
        try:
            assert drain(sink, 7) == 7
        finally:
            sink.close()
        # each record once: a redelivered copy is recognised and not chained twice
        assert sink.counts == {"decisions": 2, "alerts": 1, "policy_versions": 0, "budget_events": 0, "rejected": 1}
        ledger = reports.Ledger(client, settings.clickhouse_database)
        q = client.query
        assert q("SELECT count() FROM spendstream.decisions FINAL").result_rows == [(2,)]
        assert q("SELECT count() FROM spendstream.alerts FINAL").result_rows == [(1,)]
        active = reports.active_decisions(ledger, now)
        assert [(d["scope"], d["action"], d["policy"], d["version"]) for d in active] == [
            ("team:marketing", "fallback", "pv-abc", 7)
        ]
        (recent,) = reports.recent_alerts(ledger)
        assert (recent["message"], recent["severity"], recent["policy"]) == ("marketing at 90%", "warning", "pv-abc")
        rejects: Any = q("SELECT topic, reason, raw FROM spendstream.audit_rejects").result_rows
        assert rejects[0][0] == topics.ALERTS and "single-object" in rejects[0][1] and rejects[0][2] == "not avro"
    finally:
        client.close()

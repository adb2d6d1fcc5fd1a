"""One record the ledger refuses never stalls the sink: it goes to the DLQ with a reason, the rest lands."""

from __future__ import annotations

import signal
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from confluent_kafka import Producer

from spendstream.core.config import Settings
from spendstream.core.ledger_store import connect, migrate
from spendstream.core.topics import DLQ_REASON_HEADER, DLQ_STAGE_HEADER, USAGE, USAGE_DLQ
from spendstream.sink.dead_letters import dlq_headers
from test_sink import consume_all, raw_value, wait_until
from test_sink_faults import committed_total, sink_process


def usage_record(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "event_id": str(uuid.uuid4()),
        "occurred_at": datetime.now(UTC) - timedelta(minutes=5),
        "org": "acme",
        "division": "",
        "team": "search",
        "project": "",
        "feature": "",
        "user": "",
        "customer": "",
        "environment": "",
        "tags": {},
        "provider": "openai",
        "model_requested": "gpt-4o-mini",
        "model_served": "",
        "input_tokens": 10,
        "output_tokens": 5,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "cost_nanos": 1_000,
        "price_source": "",
        "latency_ms": 12,
        "status": "ok",
        "decision_applied": "",
        "cache_hit": False,
    }
    return {**base, **fields}


def produce(bootstrap: str, records: list[dict[str, object]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50})
    for record in records:
        producer.produce(USAGE, raw_value(record), key=b"acme/search", partition=0)
    assert producer.flush(10) == 0


def test_a_record_the_ledger_refuses_goes_to_the_dlq_and_the_rest_keeps_landing(
    settings: Settings, tmp_path: Path
) -> None:
    """Every check before the insert passes; the ledger itself refuses one record (here a constraint an operator
    added), so the sink isolates it by splitting the batch instead of retrying it forever."""
    client = connect(settings)
    migrate(client, settings)
    client.command("ALTER TABLE spendstream.usage_ledger ADD CONSTRAINT no_poison CHECK team != 'poison'")
    client.close()  # chDB: one process owns the ledger directory at a time, and the sink is the next
    poison = usage_record(team="poison")
    before = [usage_record(cost_nanos=1_000 + i) for i in range(40)]
    after = [usage_record(cost_nanos=5_000 + i) for i in range(10)]
    produce(settings.kafka_bootstrap, [*before[:20], poison, *before[20:]])
    sink = sink_process(settings, tmp_path / "sink.log")
    try:
        wait_until(lambda: committed_total(settings.kafka_bootstrap, settings.sink_group) == 41, 90, "first commit")
        produce(settings.kafka_bootstrap, after)
        wait_until(lambda: committed_total(settings.kafka_bootstrap, settings.sink_group) == 51, 60, "later commit")
    finally:
        sink.send_signal(signal.SIGINT)
        assert sink.wait(60) == 0, (tmp_path / "sink.log").read_text()

    letters = consume_all(settings.kafka_bootstrap, USAGE_DLQ, 1)
    assert [letter.value() for letter in letters] == [raw_value(poison)]
    headers = dlq_headers(letters[0].headers())
    assert headers[DLQ_STAGE_HEADER] == "insert"
    assert "no_poison" in headers[DLQ_REASON_HEADER]
    client = connect(settings)
    try:
        landed = client.query("SELECT event_id, cost_nanos FROM spendstream.usage_ledger FINAL").result_rows
    finally:
        client.close()
    expected = {uuid.UUID(str(r["event_id"])): r["cost_nanos"] for r in [*before, *after]}
    assert dict(landed) == expected

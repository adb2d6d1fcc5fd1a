"""Ledger sink under faults: SIGKILL mid-batch, a ClickHouse outage, SIGTERM. The ledger stays exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from spendstream.core.config import Settings, load_settings
from spendstream.core.events import UsageEvent
from spendstream.core.ledger_store import connect
from spendstream.core.topics import USAGE
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics
from spendstream.sink.ledger_sink import LedgerSink
from test_sink import CODEC, REPO, ledger_ids, ledger_totals, wait_until


def produce_events(bootstrap: str, count: int, seed: int) -> dict[uuid.UUID, int]:
    """Pre-encoded events spread over the 6 partitions; returns event_id -> cost_nanos."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    start = datetime.now(UTC) - timedelta(hours=2)
    costs = {}
    for i in range(count):
        ev = UsageEvent(
            event_id=uuid.UUID(int=(seed << 64) | i),
            occurred_at=start + timedelta(milliseconds=i),
            org="acme",
            team=f"team{i % 4}",
            provider="anthropic",
            model_requested="claude-3-haiku",
            input_tokens=10 + i % 100,
            cost_nanos=750 + i,
        )
        costs[ev.event_id] = 750 + i
        while True:
            try:
                producer.produce(USAGE, CODEC.encode(ev.to_avro()), key=f"acme/team{i % 4}".encode())
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(30) == 0
    return costs


def committed_total(bootstrap: str, group: str) -> int:
    """Sum of the group's committed offsets over the usage partitions (no group join needed)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        committed = consumer.committed([TopicPartition(USAGE, p) for p in range(6)], timeout=10)
    finally:
        consumer.close()
    return sum(max(tp.offset, 0) for tp in committed)


def sink_process(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SPENDSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SPENDSTREAM_DATA_DIR": str(settings.data_dir),
        "SPENDSTREAM_SINK_BATCH_SIZE": "300",
        "SPENDSTREAM_SINK_BATCH_MS": "50",
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "spendstream.cli", "sink"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )


@pytest.mark.slow
def test_sigkill_mid_batch_three_times_loses_and_duplicates_nothing(settings: Settings, tmp_path: Path) -> None:
    total = 24_000
    costs = produce_events(settings.kafka_bootstrap, total, seed=7)
    log = tmp_path / "sink.log"
    group = settings.sink_group
    for _ in range(3):
        before = committed_total(settings.kafka_bootstrap, group)
        proc = sink_process(settings, log)
        # Kill once this incarnation has committed something: it is then in the middle of its stream.
        wait_until(lambda b=before: committed_total(settings.kafka_bootstrap, group) > b, 90, "progress")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert committed_total(settings.kafka_bootstrap, group) < total, "the kills should land before the end"

    proc = sink_process(settings, log)
    wait_until(lambda: committed_total(settings.kafka_bootstrap, group) == total, 120, "the rest")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()[-3000:]

    client = connect(settings)  # the sink process has exited: this process may open its directory now
    try:
        assert ledger_totals(client) == (total, total, sum(costs.values()))
        assert sorted(ledger_ids(client)) == sorted(costs)
    finally:
        client.close()


def test_clickhouse_outage_is_retried_and_offsets_wait_for_the_insert(settings: Settings) -> None:
    """With the ledger table detached, the sink retries the same batch and commits nothing until it lands."""
    client = connect(settings)
    sink = LedgerSink(settings, client=client)
    ready = threading.Event()
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(sink.run(ready.set)), daemon=True)
    thread.start()
    try:
        assert ready.wait(60)
        costs = produce_events(settings.kafka_bootstrap, 2_000, seed=1)
        wait_until(lambda: sink.stats.inserted == 2_000, 60, "first inserts")
        committed_before = committed_total(settings.kafka_bootstrap, settings.sink_group)

        client.command("DETACH TABLE spendstream.usage_ledger")
        costs |= produce_events(settings.kafka_bootstrap, 3_000, seed=2)
        wait_until(lambda: sink.stats.insert_retries >= 2, 60, "failed inserts")
        assert committed_total(settings.kafka_bootstrap, settings.sink_group) == committed_before
        assert sink.stats.inserted == 2_000

        client.command("ATTACH TABLE spendstream.usage_ledger")
        wait_until(lambda: sink.stats.inserted == 5_000, 60, "inserts after the outage")
        wait_until(lambda: committed_total(settings.kafka_bootstrap, settings.sink_group) == 5_000, 30, "commit")
    finally:
        sink.stop()
        thread.join(60)
    assert outcome == [0]
    try:
        assert ledger_totals(client) == (5_000, 5_000, sum(costs.values()))
    finally:
        client.close()


def test_events_at_offsets_a_previous_broker_life_used_still_land(tmp_path: Path) -> None:
    """`spendstream dev` restarts its memory-only broker, so offsets start from 0 again over the same ledger: the
    first event of the new life (partition p, offset 0, like the old life's first) must land, not pass for a retry."""
    data_dir = tmp_path / "data"
    costs: dict[uuid.UUID, int] = {}
    for life in (1, 2):
        with EmbeddedBroker() as broker:
            create_topics({"bootstrap.servers": broker.bootstrap}, 6)
            settings = load_settings(kafka_bootstrap=broker.bootstrap, data_dir=data_dir)
            costs |= produce_events(broker.bootstrap, 1, seed=life)  # both lives: one event at offset 0
            proc = sink_process(settings, tmp_path / "sink.log")
            wait_until(lambda b=broker.bootstrap, g=settings.sink_group: committed_total(b, g) == 1, 90, f"life {life}")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, (tmp_path / "sink.log").read_text()[-3000:]
    client = connect(load_settings(data_dir=data_dir))
    try:
        assert sorted(ledger_ids(client)) == sorted(costs)
    finally:
        client.close()


def test_a_thread_beside_the_sink_that_fails_ends_the_process_with_code_70(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After a broker outage the audit sink's thread died on a commit error while the process went on without it,
    so decisions and alerts stopped reaching the audit tables unseen. Now the process ends, saying which thread
    failed, and what runs it (dev, systemd, Kubernetes) restarts it whole."""
    from spendstream.runtime.ledger_process import EXIT_WORKER_FAILED, run_ledger_process
    from spendstream.sink.audit_sink import AuditSink

    def fail(self: AuditSink, stop: object) -> None:
        raise RuntimeError("Commit failed: Waiting for coordinator")

    monkeypatch.setattr(AuditSink, "run", fail)
    with caplog.at_level("ERROR"):
        assert run_ledger_process(settings) == EXIT_WORKER_FAILED
    assert any("audit-sink stopped on an error" in r.getMessage() and r.exc_info for r in caplog.records)

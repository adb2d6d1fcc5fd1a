"""The processor after restarts and against hostile input: topics ready before the worker, costs bounded to Int64,
windows rebuilt from the ledger when their state is gone, one version of an event_id."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from confluent_kafka.admin import AdminClient

from spendstream.core.topics import USAGE_DLQ
from spendstream.processor.periods import period_window
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics
from test_processor import ROOT, USD, TopicReader, event, now, produce, start_worker, stop_worker, wait_totals

POLICY_YAML = """
name: default
timezone: UTC
org: acme
divisions: {eng: [ovf]}
budgets:
  - {scope: "team:ovf", period: month, amount_usd: 100}
"""


def test_internal_topics_exist_with_every_partition_when_the_processor_announces_itself(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
    env = {
        **os.environ,
        "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap,
        "SPENDSTREAM_DATA_DIR": str(tmp_path / "data"),
        "SPENDSTREAM_USAGE_PARTITIONS": "6",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "processor", "--app-id", "topics-first"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        assert "processor topics-first: policy" in line, line
        topics = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics
        for name in (
            "spendstream.processor.partials",
            "topics-first-partials-changelog",
            "topics-first-windows-changelog",
            "topics-first-scopes-changelog",
        ):
            assert name in topics and len(topics[name].partitions) == 6, name
    finally:
        worker.terminate()
        worker.wait(30)


def test_an_event_whose_cost_overflows_int64_goes_to_the_dlq_and_the_rest_counts(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY_YAML)
    worker = start_worker(broker.bootstrap, tmp_path / "worker", policy)
    dlq = TopicReader(broker.bootstrap, USAGE_DLQ, None)
    try:
        poison = event(
            org="acme", team="ovf", provider="acme-internal", model_requested="unknown-x",
            input_tokens=10_000_000_000_000_000, output_tokens=0,
        )  # fmt: skip
        fine = event(org="acme", team="ovf", cost_nanos=7 * USD)
        produce(broker.bootstrap, [poison, fine])
        _, headers = dlq.wait(lambda r: str(poison.event_id).encode() in r[0], timeout=90)
        assert headers["spendstream.dlq.reason"].startswith(b"cost overflow")
        start = int(period_window("month", now(), "UTC")[0].timestamp())
        wait_totals(broker.bootstrap, {("team:ovf", "month", start): (7 * USD, 1, 15)}, "spendstream-processor")
        assert worker.poll() is None
    finally:
        dlq.close()
        stop_worker(worker)

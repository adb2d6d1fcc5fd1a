"""Budget adjustments: how fast an approved increase lifts a shutoff, and how close to its expiry the shutoff returns.

Real embedded broker, real processor process (`spendstream processor`). Each round spends a team's whole $10
budget, waits for its shutoff, then publishes an approved temporary increase on `spendstream.budget_adjustments`
(what the API publishes after an approval) expiring ``--expiry-s`` later, and measures, from a consumer of
`spendstream.enforcement`: approval acknowledged by the broker -> allow decision read, and expiry -> shutoff read.
Target (issue: "the processor applies an approved change within 1 s").
Run: .venv/bin/python bench/bench_budget_adjustment.py [--rounds 10] [--expiry-s 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition

from spendstream.core.budget_lifecycle import Kind, Status, new_request
from spendstream.core.codec import AvroCodec
from spendstream.core.events import UsageEvent
from spendstream.core.topics import BUDGET_ADJUSTMENTS, ENFORCEMENT, HEARTBEAT_KEY_PREFIX, USAGE
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics

USD = 1_000_000_000


def wait_decision(consumer: Consumer, codec: AvroCodec, scope: str, action: str, timeout: float = 60.0) -> float:
    """Wall-clock time at which a decision ``action`` for ``scope`` was read."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in consumer.consume(100, 0.01):
            if message.error() or (message.key() or b"").startswith(HEARTBEAT_KEY_PREFIX):
                continue
            decision = codec.decode(message.value())
            if decision["scope"] == scope and decision["action"] == action:
                return time.time()
    raise TimeoutError(f"no {action} for {scope}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--expiry-s", type=float, default=3.0)
    args = parser.parse_args()
    teams = [f"t{i}" for i in range(args.rounds)]
    root = Path(tempfile.mkdtemp(prefix="bench-adjust-"))
    policy = root / "policy.yaml"
    policy.write_text(
        "budgets:\n" + "".join(f'  - {{scope: "team:{t}", period: month, amount_usd: 10}}\n' for t in teams)
    )
    with EmbeddedBroker(log_path=root / "broker.log") as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        create_topics(conf, usage_partitions=6)
        env = {**os.environ, "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap, "SPENDSTREAM_DATA_DIR": str(root),
               "SPENDSTREAM_POLICY": str(policy)}  # fmt: skip
        with (root / "processor.log").open("wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "spendstream.cli", "processor"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT)  # fmt: skip
        producer = Producer(conf)
        usage, decisions = AvroCodec("usage_event"), AvroCodec("decision")
        consumer = Consumer({**conf, "group.id": f"bench-{uuid.uuid4()}"})
        consumer.assign([TopicPartition(ENFORCEMENT, 0, OFFSET_END)])
        lift, restore = [], []
        try:
            for team in teams:
                scope = f"team:{team}"
                event = UsageEvent(team=team, provider="openai", model_requested="gpt-4o", cost_nanos=10 * USD)
                producer.produce(USAGE, usage.encode(event.to_avro()), key=f"/{team}".encode())
                producer.flush(10)
                wait_decision(consumer, decisions, scope, "shutoff", timeout=120)
                now = datetime.now(UTC)
                expires = now + timedelta(seconds=args.expiry_s)
                asked = new_request(Kind.increase, scope, "month", 5 * USD, now, expires, "bench", "bench", now)
                approved = replace(asked, status=Status.approved, step="approved", step_by="bench-approver")
                producer.produce(BUDGET_ADJUSTMENTS, approved.to_json(), key=approved.id.encode())
                producer.flush(10)
                acknowledged = time.time()
                lift.append(wait_decision(consumer, decisions, scope, "allow") - acknowledged)
                restore.append(wait_decision(consumer, decisions, scope, "shutoff") - expires.timestamp())
        finally:
            worker.terminate()
            worker.wait(30)
            consumer.close()
    for name, values in (("approval acknowledged -> allow read", lift), ("expiry -> shutoff read", restore)):
        ms = sorted(v * 1000 for v in values)
        print(f"{name}: p50 {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms over {len(ms)} rounds")


if __name__ == "__main__":
    main()

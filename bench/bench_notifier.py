"""Notifier figures with real components (embedded broker, chDB ledger, a local aiohttp receiver):

1. alert -> delivered latency: one alert at a time produced on ``spendstream.alerts``, timed until the signed
   webhook reaches the receiver (p50/p99);
2. notifications per second one notifier sustains: a burst of alerts, timed until the receiver has them all
   (each delivery is recorded pending, then sent, in the ledger);
3. a receiver that hangs (default 60 s) delays no other channel: one alert to a hanging and a healthy channel,
   the healthy one's latency while the other is still held.

Usage: ``python bench/bench_notifier.py [--samples 100] [--burst 1000] [--hang-s 60]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import quantiles

from confluent_kafka import Producer

from machine_facts import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from notify_receivers import HttpReceiver, MailReceiver, wait_for
from spendstream.core import topics
from spendstream.core.codec import AvroCodec
from spendstream.core.config import load_settings
from spendstream.core.events import Alert, AlertKind, Severity
from spendstream.core.ledger_store import connect, migrate
from spendstream.core.policy import parse_policy
from spendstream.notifier.service import Notifier
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics


def policy_text(http: HttpReceiver, mail: MailReceiver, hang_s: float) -> str:
    return f"""\
name: bench
org: acme
notifications:
  smtp: {{host: 127.0.0.1, port: {mail.port}, starttls: false, sender: bench@acme.example}}
  channels:
    fast: {{kind: webhook, url: "{http.url("/fast")}", secret_env: BENCH_SECRET}}
    hang: {{kind: webhook, url: "{http.url("/hang")}", secret_env: BENCH_SECRET}}
  people:
    owner: [fast]
    both: [fast, hang]
  scopes:
    "team:bench": {{owners: [owner]}}
    "team:hang": {{owners: [both]}}
  retry: {{max_attempts: 3, first_backoff_s: 1, timeout_s: {hang_s + 30}}}
"""


def alert(scope: str) -> Alert:
    return Alert(scope=scope, kind=AlertKind.threshold, severity=Severity.warning, message=f"alert: {scope} at 80%",
                 spend_nanos=80 * 10**9, limit_nanos=100 * 10**9, period="month")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="alerts timed one at a time")
    parser.add_argument("--burst", type=int, default=1000, help="alerts in the throughput burst")
    parser.add_argument("--hang-s", type=float, default=60.0, help="how long the hanging receiver holds a request")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()} x {os.cpu_count()}; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    codec = AvroCodec("alert")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=1)
        settings = load_settings(kafka_bootstrap=broker.bootstrap, data_dir=Path(tmp) / "data")
        with HttpReceiver() as http, MailReceiver() as mail:
            fast, hang = http.endpoint("/fast"), http.endpoint("/hang", hang=True)
            client = connect(settings)
            migrate(client, settings)
            notifier = Notifier(settings, client, policy=parse_policy(policy_text(http, mail, args.hang_s)),
                                env={"BENCH_SECRET": "s3cret"})  # fmt: skip
            halt = threading.Event()
            thread = threading.Thread(target=notifier.run, args=(halt,), daemon=True)
            thread.start()
            wait_for(notifier.ready.is_set, what="the consumer group")
            producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})

            def send(record: Alert) -> float:
                producer.produce(topics.ALERTS, codec.encode(record.to_avro()), key=record.scope)
                producer.flush(10)
                return time.monotonic()

            # 1. latency, one alert at a time
            latencies = []
            for _ in range(args.samples):
                before = len(fast.accepted)
                sent = send(alert("team:bench"))
                wait_for(lambda n=before: len(fast.accepted) > n, what="a delivery")
                latencies.append((fast.accepted[-1].received_at - sent) * 1000)
            cuts = quantiles(latencies, n=100)
            print(f"alert -> delivered webhook: p50 {cuts[49]:.1f} ms, p99 {cuts[98]:.1f} ms ({args.samples} alerts)")

            # 2. throughput, a burst
            before, recorded = len(fast.accepted), notifier.counts["recorded"] + args.burst
            start = time.monotonic()
            failures: list[str] = []
            for _ in range(args.burst):
                value = codec.encode(alert("team:bench").to_avro())
                producer.produce(
                    topics.ALERTS, value, key=b"team:bench", on_delivery=lambda e, _m: e and failures.append(str(e))
                )
                producer.poll(0)
            assert producer.flush(30) == 0 and not failures, failures[:3]
            wait_for(lambda: notifier.counts["recorded"] >= recorded, timeout=600, what="the burst recorded")
            recorded_s = time.monotonic() - start
            wait_for(lambda: len(fast.accepted) >= before + args.burst, timeout=600, what="the burst")
            elapsed = time.monotonic() - start
            print(f"burst of {args.burst} notifications delivered in {elapsed:.2f} s: {args.burst / elapsed:.0f}/s "
                  f"(all recorded pending in the ledger after {recorded_s:.2f} s)")  # fmt: skip

            # 3. a hanging receiver
            before = len(fast.accepted)
            sent = send(alert("team:hang"))
            wait_for(lambda: len(fast.accepted) > before, what="the healthy channel")
            healthy_ms = (fast.accepted[-1].received_at - sent) * 1000
            held = len(hang.requests) == 1 and not hang.accepted
            print(f"receiver hanging {args.hang_s:.0f} s: the other channel delivered after {healthy_ms:.1f} ms "
                  f"while the hanging one still held its request: {held}")  # fmt: skip
            time.sleep(max(args.hang_s - (time.monotonic() - hang.requests[0].received_at), 0))
            hang.release.set()
            wait_for(lambda: hang.accepted, what="the hanging channel after its release")
            print(f"hanging channel accepted after {time.monotonic() - sent:.1f} s (released then); rows sent in "
                  f"the ledger: {len(notifier.store.listing(args.burst + args.samples + 10, 'sent'))}")  # fmt: skip
            print(f"notifier counts: {notifier.counts}")
            halt.set()
            thread.join(30)
            client.close()
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

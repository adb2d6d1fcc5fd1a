"""Ledger sink throughput, end to end (topic -> chDB ledger), with same-run baselines.

Run: ``.venv/bin/python bench/bench_sink.py [--events 500000]``. Starts its own broker and a
chDB ledger in a temp dir, pre-fills ``spendstream.usage`` with encoded events, then prints:
raw confluent-kafka consume rate of that topic, raw chDB column insert rate of the same rows,
and the sink's rows/s from start of consumption to the last commit.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from confluent_kafka import Consumer, Producer

from spendstream.core.codec import AvroCodec
from spendstream.core.config import load_settings
from spendstream.core.events import UsageEvent
from spendstream.core.ledger_store import connect, migrate
from spendstream.core.topics import USAGE
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics
from spendstream.sink.ledger_sink import LEDGER_COLUMNS, LedgerSink, UsageDecoder, columns_of


def prefill(bootstrap: str, count: int) -> list[bytes]:
    codec = AvroCodec("usage_event")
    start = datetime.now(UTC) - timedelta(days=3)
    # 1,000 distinct encoded events, reused with a fresh event_id spliced in (same length, same fingerprint).
    templates = [
        codec.encode(
            UsageEvent(
                occurred_at=start + timedelta(seconds=i),
                org="acme",
                team=f"team{i % 9}",
                user=f"user{i % 97}",
                feature="ai_chatbot",
                provider="openai",
                model_requested="gpt-4o-mini",
                input_tokens=100 + i,
                output_tokens=i % 50,
                cost_nanos=15_000 + i,
                latency_ms=i % 900,
            ).to_avro()
        )
        for i in range(1000)
    ]
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.num.messages": 10_000})
    values = []
    for i in range(count):
        template = templates[i % 1000]
        value = template[:11] + str(uuid.UUID(int=i)).encode() + template[47:]  # 10-byte header, 1-byte length
        values.append(value)
        while True:
            try:
                producer.produce(USAGE, value, key=b"acme", partition=i % 6)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)
    return values


def raw_consume_rate(bootstrap: str, count: int) -> float:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "bench-raw", "auto.offset.reset": "earliest",
         "session.timeout.ms": 10_000, "heartbeat.interval.ms": 1_000}
    )  # fmt: skip
    consumer.subscribe([USAGE])
    got, started = 0, None
    while got < count:
        batch = consumer.consume(20_000, 1.0)
        if batch and started is None:
            started = time.perf_counter()
        got += sum(1 for m in batch if m.error() is None)
    rate = count / (time.perf_counter() - (started or time.perf_counter()))
    consumer.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--batch-size", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
        settings = load_settings(kafka_bootstrap=broker.bootstrap, data_dir=Path(tmp), sink_batch_size=args.batch_size)
        t = time.perf_counter()
        values = prefill(broker.bootstrap, args.events)
        print(f"prefill: {args.events:,} events in {time.perf_counter() - t:.1f}s")

        print(f"raw confluent-kafka consume:  {raw_consume_rate(broker.bootstrap, args.events):>10,.0f} msg/s")

        client = connect(settings)
        migrate(client, settings)
        decoder = UsageDecoder(timedelta(seconds=300))
        sample = values[: args.batch_size]
        t = time.perf_counter()
        decoded = decoder.decode(sample, datetime.now(UTC))
        print(f"decode + validate (1 thread): {len(sample) / (time.perf_counter() - t):>10,.0f} rows/s")
        columns = columns_of(decoded.records)
        types = dict(row[:2] for row in client.query("DESCRIBE TABLE spendstream.usage_ledger").result_rows)
        t = time.perf_counter()
        client.insert(
            "spendstream.usage_ledger",
            columns,
            column_names=LEDGER_COLUMNS,
            column_type_names=[types[c] for c in LEDGER_COLUMNS],
            column_oriented=True,
        )
        print(f"raw chDB column insert:       {len(sample) / (time.perf_counter() - t):>10,.0f} rows/s")
        client.command("TRUNCATE TABLE spendstream.usage_ledger")

        sink = LedgerSink(settings, client=client)
        ready = threading.Event()
        thread = threading.Thread(target=sink.run, args=(ready.set,), daemon=True)
        thread.start()
        ready.wait(60)
        while sink.stats.consumed == 0:
            time.sleep(0.01)
        t = time.perf_counter()
        while sink.stats.inserted < args.events:
            time.sleep(0.01)
        elapsed = time.perf_counter() - t
        sink.stop()
        thread.join()
        (count,) = client.query("SELECT count() FROM spendstream.usage_ledger FINAL").result_rows[0]
        first_batch = args.batch_size
        print(
            f"sink end to end (consume -> decode -> chDB, commits): {(args.events - first_batch) / elapsed:>10,.0f} "
            f"rows/s  ({args.events:,} rows, {sink.stats.batches} batches, ledger FINAL count {count:,})"
        )
        client.close()


if __name__ == "__main__":
    main()

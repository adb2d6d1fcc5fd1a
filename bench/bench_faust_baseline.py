"""How fast can faust-streaming move ``spendstream.usage`` events on this machine?

Produces N Avro UsageEvents to a fresh embedded broker, then measures events/s (first event
seen -> last event decoded) for:

* ``confluent``  - a plain confluent-kafka consumer, ``consume(1000)`` + decode (the ceiling);
* ``faust-event`` - a faust agent iterating ``async for value in stream`` (one event per step);
* ``faust-take``  - a faust agent iterating ``stream.take(1000, within=0.2)`` batches.

Each mode runs in its own process (faust owns the event loop of its process) with its own
consumer group. Run: ``.venv/bin/python bench/bench_faust_baseline.py [--events 50000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Consumer, Producer

from spendstream.core.codec import AvroCodec
from spendstream.core.events import UsageEvent
from spendstream.core.topics import USAGE
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics

PARTITIONS = 6


def produce(bootstrap: str, count: int) -> None:
    codec = AvroCodec("usage_event")
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10_000})
    now = datetime.now(UTC)
    for i in range(count):
        team = f"team{i % 12}"
        event = UsageEvent(
            event_id=uuid.uuid4(),
            occurred_at=now,
            org="acme",
            division="eng",
            team=team,
            project=f"p{i % 5}",
            feature=f"f{i % 4}",
            user=f"u{i % 50}",
            environment="prod",
            provider="openai",
            model_requested="gpt-4o-mini",
            model_served="gpt-4o-mini",
            input_tokens=200,
            output_tokens=50,
            cost_nanos=60_000,
        )
        producer.produce(USAGE, codec.encode(event.to_avro()), key=f"acme/{team}".encode())
        if i % 10_000 == 0:
            producer.poll(0)
    producer.flush(30)


def run_confluent(bootstrap: str, count: int) -> float:
    codec = AvroCodec("usage_event")
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
        }
    )
    consumer.subscribe([USAGE])
    seen = 0
    start = 0.0
    while seen < count:
        for msg in consumer.consume(1000, timeout=1.0):
            if msg.error():
                continue
            if not start:
                start = time.perf_counter()
            codec.decode(msg.value())
            seen += 1
    elapsed = time.perf_counter() - start
    consumer.close()
    return count / elapsed


def run_faust(bootstrap: str, count: int, mode: str) -> None:
    """Runs in a child process; prints ``{"rate": ...}`` and exits when ``count`` events were seen."""
    import faust

    codec = AvroCodec("usage_event")
    datadir = tempfile.mkdtemp(prefix="bench-faust-")
    app = faust.App(
        f"bench-{mode}-{uuid.uuid4().hex[:8]}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=datadir,
        web_enabled=False,
        topic_partitions=PARTITIONS,
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=5000,
        # the embedded broker completes a group join after about half the session timeout
        broker_session_timeout=6.0,
        broker_rebalance_timeout=6.0,
        broker_heartbeat_interval=1.0,
        stream_buffer_maxsize=20_000,
    )
    topic = app.topic(USAGE, key_serializer="raw", value_serializer="raw", partitions=PARTITIONS)
    state = {"seen": 0, "start": 0.0, "born": time.perf_counter()}

    def progress(n: int) -> None:
        if not state["start"]:
            state["start"] = time.perf_counter()
        state["seen"] += n
        if state["seen"] >= count:
            rate = count / (time.perf_counter() - state["start"])
            print(json.dumps({"rate": rate, "startup_s": state["start"] - state["born"]}), flush=True)
            os._exit(0)

    if mode == "faust-event":

        @app.agent(topic)
        async def per_event(stream):  # type: ignore[no-untyped-def]
            async for value in stream:
                codec.decode(value)
                progress(1)

    else:

        @app.agent(topic)
        async def batched(stream):  # type: ignore[no-untyped-def]
            async for values in stream.take(1000, within=0.2):
                for value in values:
                    codec.decode(value)
                progress(len(values))

    sys.argv = ["bench", "worker", "--loglevel", "warn", "--without-web"]
    app.main()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--child", choices=["faust-event", "faust-take"], help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_faust(args.bootstrap, args.events, args.child)
        return
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
        create_topics({"bootstrap.servers": broker.bootstrap}, PARTITIONS)
        t0 = time.perf_counter()
        produce(broker.bootstrap, args.events)
        print(f"produced {args.events} events in {time.perf_counter() - t0:.2f}s")
        print(f"{'confluent consume+decode':28} {run_confluent(broker.bootstrap, args.events):>10,.0f} events/s")
        for mode in ("faust-take", "faust-event"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--bootstrap",
                    broker.bootstrap,
                    "--events",
                    str(args.events),
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            # faust routes a worker's stdout into its log (stderr)
            found = [line[line.index("{") :] for line in (out.stdout + out.stderr).splitlines() if '{"rate"' in line]
            if not found:
                print(f"{mode}: failed\n{out.stderr[-2000:]}")
                continue
            figures = json.loads(found[-1])
            print(
                f"{mode + ' + decode':28} {figures['rate']:>10,.0f} events/s"
                f"  (worker start to first event {figures['startup_s']:.1f}s)"
            )


if __name__ == "__main__":
    main()

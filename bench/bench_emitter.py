"""Emitter throughput: emit() call rate and per-call latency, delivered rate, raw producer baseline.

Run: .venv/bin/python bench/bench_emitter.py [--events 500000] [--rounds 3]

Starts its own embedded broker. Rows:
- emit(), deque has room: the request-path cost (max_queue above the burst size).
- emit(), default max_queue=100k: a burst larger than the queue, so the overflow is
  handed to the background thread, which encodes and spools it; once that inbox is full too the caller
  encodes and hands over the record (it never writes the spool unless both inboxes are full).
- raw produce(): confluent-kafka Producer.produce() of pre-encoded bytes, same producer settings.
"delivered/s" is events acked by the broker per second, from the first call until flush() returned;
"CPU us/event" is this process's CPU time (every thread, librdkafka's included) per event.
The three rows run in turn, ``--rounds`` times (load from other work spreads over all of them): the table
shows medians and the range of delivered/s. Then the per-event CPU cost of encoding on one thread: the
Emitter's encoder against the generic path (``AvroCodec.encode(event.to_avro())``: model copy, logical
types, fastavro).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from array import array
from pathlib import Path

from confluent_kafka import Producer

from figures import figure, machine
from spendstream.core.codec import AvroCodec
from spendstream.core.config import load_settings
from spendstream.core.events import UsageEvent, usage_bounds_problem
from spendstream.core.topics import USAGE
from spendstream.edge.emitter import DEFAULT_PRODUCER_CONFIG, Emitter, attribution_key
from spendstream.edge.usage_encoding import UsageEncoder
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics

DISTINCT = 50_000  # events are built once and emitted repeatedly: building 500k pydantic models would dominate


def _events() -> list[UsageEvent]:
    return [
        UsageEvent(
            org="acme",
            team=f"team{i % 11}",
            feature="ai_chatbot",
            user=f"u{i % 997}",
            provider="openai",
            model_requested="gpt-4o-mini",
            input_tokens=812,
            output_tokens=213,
            cost_nanos=249_600,
            latency_ms=420,
        )
        for i in range(DISTINCT)
    ]


def _percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000


def bench_emitter(bootstrap: str, events: list[UsageEvent], total: int, max_queue: int, spool: Path) -> dict:
    settings = load_settings(kafka_bootstrap=bootstrap, data_dir=spool)
    em = Emitter(settings=settings, max_queue=max_queue)
    em.flush(5)  # connected and idle
    lat = array("q", bytes(8 * total))
    clock = time.perf_counter_ns
    emit = em.emit
    cpu_start = time.process_time()
    start = time.perf_counter()
    for i in range(total):
        event = events[i % DISTINCT]
        t0 = clock()
        emit(event)
        lat[i] = clock() - t0
    calls_s = total / (time.perf_counter() - start)
    left = em.flush(120)
    delivered_s = total / (time.perf_counter() - start)
    cpu_us = (time.process_time() - cpu_start) / total * 1e6
    stats = em.stats
    em.close(5)
    ordered = sorted(lat)
    return {
        "calls/s": calls_s,
        "p50 us": _percentile(ordered, 0.50),
        "p99 us": _percentile(ordered, 0.99),
        "p99.9 us": _percentile(ordered, 0.999),
        "mean us": statistics.fmean(lat) / 1000,
        "delivered/s": delivered_s,
        "CPU us/event": cpu_us,
        "note": f"sent={stats.sent} spooled={stats.spooled} failed={stats.failed} undelivered={left}",
    }


def bench_raw(bootstrap: str, events: list[UsageEvent], total: int) -> dict:
    codec = AvroCodec("usage_event")
    encoded = [(attribution_key(e), codec.encode(e.to_avro())) for e in events]
    failed = 0

    def on_delivery(err: object, _msg: object) -> None:  # failures only (delivery.report.only.error)
        nonlocal failed
        failed += err is not None

    conf = {**DEFAULT_PRODUCER_CONFIG, "bootstrap.servers": bootstrap, "on_delivery": on_delivery}
    producer = Producer(conf)
    producer.list_topics(USAGE, timeout=5)
    lat = array("q", bytes(8 * total))
    clock = time.perf_counter_ns
    produce = producer.produce
    cpu_start = time.process_time()
    start = time.perf_counter()
    for i in range(total):
        key, value = encoded[i % DISTINCT]
        t0 = clock()
        while True:
            try:
                produce(USAGE, value, key)
                break
            except BufferError:
                producer.poll(0.001)
        lat[i] = clock() - t0
        if i % 1000 == 0:
            producer.poll(0)
    calls_s = total / (time.perf_counter() - start)
    left = producer.flush(120)
    delivered_s = total / (time.perf_counter() - start)
    cpu_us = (time.process_time() - cpu_start) / total * 1e6
    ordered = sorted(lat)
    return {
        "calls/s": calls_s,
        "p50 us": _percentile(ordered, 0.50),
        "p99 us": _percentile(ordered, 0.99),
        "p99.9 us": _percentile(ordered, 0.999),
        "mean us": statistics.fmean(lat) / 1000,
        "delivered/s": delivered_s,
        "CPU us/event": cpu_us,
        "note": f"acked={total - failed - left} undelivered={left} (encoding not included)",
    }


def bench_encoding(events: list[UsageEvent], rounds: int = 5) -> dict[str, float]:
    """CPU microseconds per event (best of ``rounds``, alternating the two paths): bounds check, key, value."""
    codec = AvroCodec("usage_event")
    encoder = UsageEncoder(codec)

    def generic(event: UsageEvent) -> object:
        record = event.to_avro()
        return usage_bounds_problem(record), attribution_key(event), codec.encode(record)

    def emitter(event: UsageEvent) -> object:
        return usage_bounds_problem(event.__dict__), *encoder.record(event)

    for event in events[:1000]:
        if generic(event)[1:] != emitter(event)[1:]:
            raise SystemExit("the two encoders disagree")
    best = {"generic (to_avro + fastavro)": float("inf"), "Emitter's UsageEncoder": float("inf")}
    paths = dict(zip(best, (generic, emitter), strict=True))
    for _ in range(rounds):
        for name, path in paths.items():
            start = time.process_time()
            for event in events:
                path(event)
            best[name] = min(best[name], (time.process_time() - start) / len(events) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    machine("emitter")
    events = _events()
    rounds: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
        for n in range(args.rounds):
            room, burst = Path(tmp) / f"room{n}", Path(tmp) / f"burst{n}"
            for name, row in (
                ("emit(), queue has room", bench_emitter(broker.bootstrap, events, args.events, args.events + 1, room)),
                ("emit(), max_queue=100k", bench_emitter(broker.bootstrap, events, args.events, 100_000, burst)),
                ("raw produce() baseline", bench_raw(broker.bootstrap, events, args.events)),
            ):
                rounds.setdefault(name, []).append(row)
    cols = ["calls/s", "p50 us", "p99 us", "p99.9 us", "mean us", "delivered/s", "CPU us/event"]
    encoding = bench_encoding(events)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"load average after: {load}; {when}")
    print(f"{args.events} events, one emitting thread, {args.rounds} rounds (medians), broker {broker.bootstrap}")
    print(f"{'':26}" + "".join(f"{c:>13}" for c in cols) + "  delivered/s range; last round")
    for name, rows in rounds.items():
        median = {c: statistics.median(row[c] for row in rows) for c in cols}
        figures = "".join(f"{median[c]:>13,.0f}" if median[c] >= 100 else f"{median[c]:>13.2f}" for c in cols)
        spread = f"{min(r['delivered/s'] for r in rows):,.0f}-{max(r['delivered/s'] for r in rows):,.0f}"
        print(f"{name:26}{figures}  {spread}; {rows[-1]['note']}")
        if name == "emit(), queue has room":
            raw = statistics.median(row["delivered/s"] for row in rounds["raw produce() baseline"])
            figure("emitter", "delivered events/s, one process", median["delivered/s"], "events/s", baseline=raw,
                   baseline_of="raw produce() of pre-encoded bytes", target=">= 100000")  # fmt: skip
        if name == "emit(), max_queue=100k":
            figure("emitter", "emit() p99 during a burst beyond the queue", median["p99 us"], "us", target="< 20")
    print("encoding, CPU us per event (best of 5; bounds check + key + value):")
    for name, us in encoding.items():
        print(f"  {name:30} {us:6.2f}   ({1e6 / us:,.0f} events/s per core)")


if __name__ == "__main__":
    main()

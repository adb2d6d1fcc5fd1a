"""Soak: N usage events through emitter -> broker -> processor + sink -> ledger, then an exactness check.

The processor (`spendstream processor`) and the sink (`spendstream sink`) run as real processes against a real
embedded broker and a chDB ledger; the Emitter runs in this process. Reported: emit rate, end-to-end
throughput (first emit until both services committed everything), how long each service trailed the last emit,
ledger lag (ingested_at - occurred_at, p50/p99/max), peak RSS (VmHWM) of every process, and whether the
processor's window totals equal the ledger's sums per scope and period, to the nano-dollar. The figures are also
printed as ``FIGURE`` lines (``bench/readme_table.py``).
With ``--rate`` the events are emitted at that many per second (paced every 10 ms) instead of as fast as the
Emitter takes them: ``--events 27000000 --rate 30000`` is the processor's sizing case, 15 minutes of traffic at
30 k/s, so the whole default dedup horizon (15 minutes of arrivals) is full at the end.
Run: .venv/bin/python bench/bench_soak.py [--events 5000000] [--rate EVENTS_PER_S] [--name soak]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from figures import figure, machine
from spendstream.core.config import load_settings
from spendstream.core.events import UsageEvent
from spendstream.core.ledger_store import connect
from spendstream.core.topics import USAGE
from spendstream.edge.emitter import Emitter
from spendstream.processor.recovery import read_window_totals
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics

PARTITIONS = 6
TEAMS = [f"t{i}" for i in range(8)]
CHECKED = [
    (dim, period, fn)
    for dim in ("org", "team", "user")
    for period, fn in (("day", "toStartOfDay"), ("month", "toStartOfMonth"), ("hour", "toStartOfHour"))
]


def committed(bootstrap: str, group: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        found = consumer.committed([TopicPartition(USAGE, p) for p in range(PARTITIONS)], timeout=10)
    finally:
        consumer.close()
    return sum(max(tp.offset, 0) for tp in found)


def counted(bootstrap: str) -> int:
    """Requests the processor has counted in the org's month window(s) (its committed state, read back)."""
    totals = read_window_totals({"bootstrap.servers": bootstrap}, timeout=120)
    return sum(v[1] for (scope, period, _), v in totals.items() if scope == "org:acme" and period == "month")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ledger_windows(client) -> dict:  # type: ignore[no-untyped-def]
    out = {}
    for dim, period, fn in CHECKED:
        rows = client.query(
            f"SELECT `{dim}`, toUnixTimestamp(toDateTime({fn}(occurred_at, 'UTC'), 'UTC')), "
            "sum(ifNull(cost_nanos, 0)), count(), sum(input_tokens + output_tokens) "
            "FROM spendstream.usage_ledger FINAL GROUP BY 1, 2"
        ).result_rows
        for value, start, nanos, requests, tokens in rows:
            out[(f"{dim}:{value}", period, int(start))] = (int(nanos), int(requests), int(tokens))
    return out


def emit_all(emitter: Emitter, count: int, rate: float | None = None) -> float:
    """Emit ``count`` events built on the fly (a pool of attributions, fresh ids and times), ``rate`` a second if
    given; returns seconds."""
    rng = random.Random(1)
    templates = [
        UsageEvent(
            org="acme",
            team=rng.choice(TEAMS),
            feature=f"f{rng.randrange(6)}",
            user=f"u{rng.randrange(200)}",
            provider="openai",
            model_requested="gpt-4o-mini",
            input_tokens=rng.randrange(1, 4000),
            output_tokens=rng.randrange(800),
            cost_nanos=rng.randrange(1, 5_000_000),
        )
        for _ in range(1000)
    ]
    started = time.perf_counter()
    for i in range(count):
        template = templates[i % 1000]
        emitter.emit(template.model_copy(update={"event_id": uuid.uuid4(), "occurred_at": datetime.now(UTC)}))
        if rate is not None and i % 100 == 99 and (ahead := (i + 1) / rate - (time.perf_counter() - started)) > 0.01:
            time.sleep(ahead)
        if i % 50_000 == 49_999:
            while emitter.stats.queued > 200_000:  # keep memory bounded: the deque would spill to the spool
                time.sleep(0.01)
    return time.perf_counter() - started


def wait_for(what: str, progress, target: int, timeout: float) -> float:  # type: ignore[no-untyped-def]
    """Wait until ``progress()`` reaches ``target``; return the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while (done := progress()) < target:
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not catch up within {timeout:.0f}s: {done:,} of {target:,}")
        time.sleep(0.5)
    return time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--rate", type=float, help="events emitted per second (default: as fast as possible)")
    parser.add_argument("--name", default="soak", help="the benchmark's name in its FIGURE lines")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the services to catch up")
    args = parser.parse_args()
    machine(args.name)
    with tempfile.TemporaryDirectory() as tmp_name, EmbeddedBroker(log_path=Path(tmp_name) / "broker.log") as broker:
        tmp = Path(tmp_name)
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=PARTITIONS)
        (tmp / "policy.yaml").write_text("name: default\ntimezone: UTC\norg: acme\n")
        settings = load_settings(kafka_bootstrap=broker.bootstrap, data_dir=tmp / "data")
        env = {
            **os.environ,
            "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap,
            "SPENDSTREAM_DATA_DIR": str(settings.data_dir),
            "SPENDSTREAM_POLICY": str(tmp / "policy.yaml"),
        }
        log = open(tmp / "services.log", "ab")  # noqa: SIM115
        cli = [sys.executable, "-m", "spendstream.cli"]
        processor = subprocess.Popen([*cli, "processor"], env=env, stdout=log, stderr=log)
        sink = subprocess.Popen([*cli, "sink"], env=env, stdout=log, stderr=log)
        try:
            time.sleep(8)  # both join their consumer groups
            print(f"soak: {args.events:,} usage events, {PARTITIONS} partitions, policy timezone UTC")
            started = time.monotonic()
            with Emitter(settings=settings) as emitter:
                emit_s = emit_all(emitter, args.events, args.rate)
                assert emitter.flush(600) == 0, "the emitter could not deliver everything"
                stats = emitter.stats
            emitted_at = time.monotonic()
            print(
                f"emit: {args.events / emit_s:,.0f} events/s into the Emitter; "
                f"all acked after {emitted_at - started:.1f} s"
            )
            on_topic = stats.sent
            sink_done = wait_for(
                "sink", lambda: committed(broker.bootstrap, settings.sink_group), on_topic, args.timeout
            )
            proc_done = wait_for("processor", lambda: counted(broker.bootstrap), args.events, args.timeout)
            end = max(sink_done, proc_done)
            print(f"end to end: {args.events / (end - started):,.0f} events/s ({end - started:.1f} s)")
            print(
                f"sink caught up {sink_done - emitted_at:.1f} s after the last ack; "
                f"processor {proc_done - emitted_at:.1f} s"
            )
            rss = {
                "processor": peak_rss_mb(processor.pid),
                "sink": peak_rss_mb(sink.pid),
                "emitter (this process)": peak_rss_mb(os.getpid()),
            }
            print("peak RSS (VmHWM): " + ", ".join(f"{name} {mb:,.0f} MB" for name, mb in rss.items()))
            rate = args.events / emit_s
            horizon_min = settings.processor_dedup_horizon_s / 60
            name = f"processor peak RSS, {args.events:,} events emitted at {rate / 1000:.0f} k/s"
            figure(args.name, name, rss["processor"], "MB", target="<= 400", dedup_horizon_min=horizon_min)
            figure(args.name, "end to end, emitter -> processor + sink", args.events / (end - started), "events/s")
            figure(args.name, f"sink peak RSS, {args.events:,} events", rss["sink"], "MB")
            sink.send_signal(signal.SIGTERM)
            sink.wait(120)
            time.sleep(3)  # the processor's last changelog writes
            totals = read_window_totals({"bootstrap.servers": broker.bootstrap}, timeout=120)
            wanted = {(d, p) for d, p, _ in CHECKED}
            processor_windows = {k: tuple(v) for k, v in totals.items() if (k[0].split(":", 1)[0], k[1]) in wanted}
            client = connect(settings)
            try:
                count, unique = client.query(
                    "SELECT count(), uniqExact(event_id) FROM spendstream.usage_ledger FINAL"
                ).result_rows[0]
                p50, p99 = client.query(
                    "SELECT quantiles(0.5, 0.99)(dateDiff('millisecond', occurred_at, ingested_at)) "
                    "FROM spendstream.usage_ledger"
                ).result_rows[0][0]
                worst = client.query(
                    "SELECT max(dateDiff('millisecond', occurred_at, ingested_at)) FROM spendstream.usage_ledger"
                ).result_rows[0][0]
                ledger = ledger_windows(client)
            finally:
                client.close()
            print(f"ledger lag (ingested_at - occurred_at): p50 {p50:,.0f} ms, p99 {p99:,.0f} ms, max {worst:,} ms")
            print(f"ledger: count {count:,}, unique event_ids {unique:,} (emitted {args.events:,})")
            same = ledger == processor_windows
            print(f"processor window totals == ledger sums ({len(ledger):,} windows): {'yes' if same else 'NO'}")
            if not same or count != args.events or unique != args.events:
                raise SystemExit(1)
        finally:
            for proc in (sink, processor):
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(60)


if __name__ == "__main__":
    main()

"""Processor throughput and decision latency through one worker on the embedded broker.

* Throughput: N usage events (8 scopes per event: org, division, team, project, feature, user,
  environment, model; 5 tracked periods each) are produced first, then one worker starts; events/s is
  measured from the moment stage 1 starts reading its partitions to the moment every event is counted in
  the changelog.
* Latency: with the worker warm (and a background load of ``--load`` events/s), single events that each
  cross a fresh team's budget are emitted; latency = emit -> the shutoff Decision read from
  ``spendstream.enforcement``. p50/p99 are printed.
* ``--profile`` runs the worker under cProfile and prints where its time went.

Run: ``.venv/bin/python bench/bench_processor.py [--events 60000] [--samples 60] [--load 2000] [--fetch-wait-ms 100]
[--profile]``.
"""

from __future__ import annotations

import argparse
import os
import pstats
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition

from spendstream.core.codec import AvroCodec
from spendstream.core.events import UsageEvent
from spendstream.core.topics import ENFORCEMENT, HEARTBEAT_KEY_PREFIX, USAGE
from spendstream.processor.recovery import read_window_totals
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics

TEAMS = [f"team{i}" for i in range(12)]
LAT_TEAMS = [f"lat{i}" for i in range(400)]
POLICY = f"""
name: default
timezone: Europe/Berlin
org: acme
divisions: {{eng: [{", ".join(TEAMS[:6])}], biz: [{", ".join(TEAMS[6:])}], lat: [{", ".join(LAT_TEAMS)}]}}
budgets:
{chr(10).join(f'  - {{scope: "team:{t}", period: month, amount_usd: 100000}}' for t in TEAMS)}
{chr(10).join(f'  - {{scope: "team:{t}", period: month, amount_usd: 1}}' for t in LAT_TEAMS)}
  - {{scope: "user:*", period: day, amount_usd: 500}}
  - {{scope: "feature:*", period: month, amount_usd: 50000}}
  - {{scope: "org:acme", period: quarter, amount_usd: 10000000}}
quotas:
  - {{scope: "user:*", requests_per_day: 1000000}}
"""


def usage(rng: random.Random, team: str, cost: int) -> UsageEvent:
    return UsageEvent(
        org="acme",
        team=team,
        project=f"p{rng.randrange(20)}",
        feature=f"f{rng.randrange(8)}",
        user=f"u{rng.randrange(200)}",
        environment="prod",
        provider="openai",
        model_requested="gpt-4o-mini",
        model_served="gpt-4o-mini",
        input_tokens=rng.randrange(3000),
        output_tokens=rng.randrange(800),
        cost_nanos=cost,
    )


def produce(producer: Producer, codec: AvroCodec, events: list[UsageEvent]) -> None:
    for ev in events:
        producer.produce(USAGE, codec.encode(ev.to_avro()), key=f"acme/{ev.team}".encode())
        producer.poll(0)
    producer.flush(30)


PROFILED_WORKER = """
import cProfile, sys
from spendstream.processor import app
main_out, stage1_out = sys.argv[1], sys.argv[2]
run = app.UsageReader._run

def profiled_run(self, partitions):
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        run(self, partitions)
    finally:
        profiler.disable()
        profiler.dump_stats(stage1_out)

app.UsageReader._run = profiled_run
sys.argv = ["spendstream", "processor"]
from spendstream.cli import main
cProfile.run("main()", main_out)
"""


def start_worker(bootstrap: str, root: Path, profile: Path | None) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SPENDSTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "SPENDSTREAM_DATA_DIR": str(root),
        "SPENDSTREAM_POLICY": str(root / "policy.yaml"),
    }
    command = [sys.executable, "-m", "spendstream.cli", "processor"]
    if profile:  # the event loop (faust, stage 2) and the stage-1 thread, each into its own profile
        command = [sys.executable, "-c", PROFILED_WORKER, str(profile), str(profile.with_suffix(".stage1"))]
    return subprocess.Popen(
        command,
        env=env,
        stdout=open(root / "worker.log", "ab"),
        stderr=subprocess.STDOUT,
    )


def org_requests(bootstrap: str) -> int:
    totals = read_window_totals({"bootstrap.servers": bootstrap})
    return sum(v[1] for (scope, period, _), v in totals.items() if scope == "org:acme" and period == "quarter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--load", type=int, default=2000, help="background events/s during the latency phase")
    parser.add_argument(
        "--fetch-wait-ms", type=int, default=100, help="the decision reader's fetch.wait.max.ms (the Enforcer's: 100)"
    )
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    rng = random.Random(1)
    codec = AvroCodec("usage_event")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
        root = Path(tmp)
        (root / "policy.yaml").write_text(POLICY)
        create_topics({"bootstrap.servers": broker.bootstrap}, 6)
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
        produce(producer, codec, [usage(rng, rng.choice(TEAMS), 1000) for _ in range(args.events)])
        profile = root / "worker.prof" if args.profile else None
        worker = start_worker(broker.bootstrap, root, profile)
        try:
            while b"stage 1 reads" not in (root / "worker.log").read_bytes():  # the worker owns its partitions
                time.sleep(0.01)
            started = time.perf_counter()
            while (done := org_requests(broker.bootstrap)) < args.events:
                time.sleep(0.2)
            elapsed = time.perf_counter() - started
            print(f"throughput: {done:,} events in {elapsed:.2f}s = {done / elapsed:,.0f} events/s (one worker)")
            latencies = measure_latency(broker.bootstrap, producer, codec, rng, args)
            latencies.sort()
            p50 = latencies[len(latencies) // 2]
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
            print(
                f"emit -> decision latency ({len(latencies)} samples, background load {args.load}/s): "
                f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
            )
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        if profile:
            for title, path in (("event loop (faust, stage 2)", profile), ("stage 1", profile.with_suffix(".stage1"))):
                if path.exists():
                    print(f"--- profile: {title}")
                    pstats.Stats(str(path)).sort_stats("tottime").print_stats(22)


def measure_latency(
    bootstrap: str, producer: Producer, codec: AvroCodec, rng: random.Random, args: argparse.Namespace
) -> list[float]:
    # read decisions the way the Enforcer does (the embedded broker holds a fetch for the whole wait)
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}", "fetch.wait.max.ms": args.fetch_wait_ms}
    )
    consumer.assign([TopicPartition(ENFORCEMENT, 0, OFFSET_END)])
    consumer.poll(0.5)
    stop = threading.Event()

    def background() -> None:
        bg = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        while not stop.is_set():
            t0 = time.perf_counter()
            produce(bg, codec, [usage(rng, rng.choice(TEAMS), 1000) for _ in range(args.load // 10)])
            time.sleep(max(0.0, 0.1 - (time.perf_counter() - t0)))

    loader = threading.Thread(target=background, daemon=True)
    if args.load:
        loader.start()
    decisions = AvroCodec("decision")
    latencies = []
    try:
        for team in LAT_TEAMS[: args.samples]:
            ev = usage(random.Random(), team, 10**9).model_copy(update={"occurred_at": datetime.now(UTC)})
            sent = time.perf_counter()
            produce(producer, codec, [ev])
            deadline = sent + 30
            while time.perf_counter() < deadline:
                message = consumer.poll(0.05)
                if message is None or message.error() or (message.key() or b"").startswith(HEARTBEAT_KEY_PREFIX):
                    continue
                decision = decisions.decode(message.value())
                if decision["scope"] == f"team:{team}" and decision["action"] == "shutoff":
                    latencies.append(time.perf_counter() - sent)
                    break
            time.sleep(0.1)
    finally:
        stop.set()
        consumer.close()
    return latencies


if __name__ == "__main__":
    main()

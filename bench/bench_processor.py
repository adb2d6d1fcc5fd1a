"""Processor throughput and decision latency through one worker on the embedded broker.

* Throughput: N usage events (8 scopes per event: org, division, team, project, feature, user,
  environment, model; 5 tracked periods each) are produced first, then one worker starts; events/s is
  measured from the moment stage 1 starts reading its partitions to the moment every event is counted in
  the changelog. Also printed: the worker's CPU time (every thread) per event over that interval, the figure
  that load from other work on the machine disturbs least, and its peak RSS (catching up on a backlog fills
  every round: up to ``SPENDSTREAM_PROCESSOR_BATCH_SIZE`` x partitions events in hand).
* Every round starts on an empty internal topic (``spendstream.processor.partials``, which every app id shares):
  a new app id's stage 2 would otherwise read all the earlier rounds' messages too, and each round would be
  slower than the one before.
* ``--baseline-services DIR``: the same measurement, in the same run, of another checkout's ``services``
  directory (e.g. ``git archive <commit> services schemas | tar -x -C /tmp/old``); rounds alternate
  between the two, and the medians are compared.
* Latency: with the worker warm (and a background load of ``--load`` events/s), single events that each
  cross a fresh team's budget are emitted; latency = emit -> the shutoff Decision read from
  ``spendstream.enforcement``. p50/p99 are printed (with the last worker, after every throughput round).
* ``--profile`` runs the worker under cProfile and prints where its time went.

Run: ``.venv/bin/python bench/bench_processor.py [--events 300000] [--rounds 3] [--samples 60] [--load 2000]
[--fetch-wait-ms 100] [--baseline-services /tmp/old/services | --baseline-rev REV] [--profile] [--unique-labels]``.
* ``--unique-labels``: every event names its own user, feature, customer and project, as one client flooding new
  names would; the figures are events/s and the worker's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import pstats
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from figures import checkout_services, figure, machine
from spendstream.core.codec import AvroCodec
from spendstream.core.events import UsageEvent
from spendstream.core.record_signature import write_key_pair
from spendstream.core.topics import ENFORCEMENT, HEARTBEAT_KEY_PREFIX, USAGE
from spendstream.processor.internal_topics import DEFAULT_APP_ID, PARTIALS_TOPIC
from spendstream.processor.recovery import read_window_totals
from spendstream.processor.usage_reader import usage_group
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


def usage(rng: random.Random, team: str, cost: int, unique: int | None = None) -> UsageEvent:
    """An event of ``team``; with ``unique``, its user, feature, customer and project are that event's own."""
    return UsageEvent(
        org="acme",
        team=team,
        project=f"p{rng.randrange(20) if unique is None else unique}",
        feature=f"f{rng.randrange(8) if unique is None else unique}",
        user=f"u{rng.randrange(200) if unique is None else unique}",
        customer="" if unique is None else f"c{unique}",
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
main_out, stage1_out, app_id = sys.argv[1], sys.argv[2], sys.argv[3]
run = app.UsageReader._run

def profiled_run(self, partitions, starts):
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        run(self, partitions, starts)
    finally:
        profiler.disable()
        profiler.dump_stats(stage1_out)

app.UsageReader._run = profiled_run
sys.argv = ["spendstream", "processor", "--app-id", app_id]
from spendstream.cli import main
cProfile.run("main()", main_out)
"""


PARTITIONS = 6


def start_worker(
    bootstrap: str, root: Path, app_id: str, profile: Path | None, services: Path | None
) -> subprocess.Popen[bytes]:
    signing_key, _ = write_key_pair(root / "keys")  # as deployed: it signs decisions and seals what stage 2 reads
    env = {
        **os.environ,
        "SPENDSTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "SPENDSTREAM_DATA_DIR": str(root),
        "SPENDSTREAM_POLICY": str(root.parent / "policy.yaml"),
        "SPENDSTREAM_SIGNING_KEY": str(signing_key),
    }
    if services is not None:  # another checkout's code
        env["PYTHONPATH"] = os.pathsep.join([str(services), *filter(None, [os.environ.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "spendstream.cli", "processor", "--app-id", app_id]
    if profile:  # the event loop (faust, stage 2) and the stage-1 thread, each into its own profile
        command = [sys.executable, "-c", PROFILED_WORKER, str(profile), str(profile.with_suffix(".stage1")), app_id]
    return subprocess.Popen(
        command,
        env=env,
        stdout=open(root / "worker.log", "ab"),
        stderr=subprocess.STDOUT,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, every thread included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM): what catching up on a backlog costs in memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stage1_read(consumer: Consumer) -> int:
    """Usage events stage 1 has folded, flushed and committed (cheap to ask, unlike reading the changelog)."""
    found = consumer.committed([TopicPartition(USAGE, p) for p in range(PARTITIONS)], timeout=10)
    return sum(max(tp.offset, 0) for tp in found)


def empty_internal_topic(bootstrap: str) -> None:
    """Delete the internal topic the earlier rounds' workers wrote; the next worker creates it again, empty."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if PARTIALS_TOPIC not in admin.list_topics(timeout=10).topics:
        return
    admin.delete_topics([PARTIALS_TOPIC])[PARTIALS_TOPIC].result(timeout=30)
    while PARTIALS_TOPIC in admin.list_topics(timeout=10).topics:
        time.sleep(0.1)


def throughput_round(
    bootstrap: str, root: Path, events: int, app_id: str, services: Path | None, profile: Path | None
) -> tuple[float, float, subprocess.Popen[bytes]]:
    """One fresh worker (its own app id and usage group) reads every event; (events/s, CPU us per event, worker)."""
    root.mkdir()
    empty_internal_topic(bootstrap)
    worker = start_worker(bootstrap, root, app_id, profile, services)
    progress = Consumer({"bootstrap.servers": bootstrap, "group.id": usage_group(app_id)})
    try:
        while b"stage 1 reads" not in (root / "worker.log").read_bytes():  # the worker owns its partitions
            if worker.poll() is not None:
                raise SystemExit(f"the worker exited: {(root / 'worker.log').read_text()[-2000:]}")
            time.sleep(0.01)
        started, cpu_started = time.perf_counter(), cpu_seconds(worker.pid)
        while stage1_read(progress) < events:
            time.sleep(0.05)
        while org_requests_of(bootstrap, app_id) < events:  # stage 2 counted them too
            time.sleep(0.05)
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(worker.pid) - cpu_started
    finally:
        progress.close()
    return events / elapsed, cpu / events * 1e6, worker


def org_requests_of(bootstrap: str, app_id: str) -> int:
    totals = read_window_totals({"bootstrap.servers": bootstrap}, app_id=app_id)
    return sum(v[1] for (scope, period, _), v in totals.items() if scope == "org:acme" and period == "quarter")


def stop(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    worker.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--load", type=int, default=2000, help="background events/s during the latency phase")
    parser.add_argument(
        "--fetch-wait-ms", type=int, default=100, help="the decision reader's fetch.wait.max.ms (the Enforcer's: 100)"
    )
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument("--baseline-services", type=Path, help="another checkout's services/ to compare with")
    baseline.add_argument("--baseline-rev", help="a git revision of this repository, compared as --baseline-services")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--unique-labels",
        action="store_true",
        help="every event names its own user, feature, customer and project (one client flooding new names)",
    )
    args = parser.parse_args()
    bench = "processor_flood" if args.unique_labels else "processor"
    machine(bench)
    rng = random.Random(1)
    codec = AvroCodec("usage_event")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
        base = Path(tmp)
        if args.baseline_rev:
            args.baseline_services = checkout_services(args.baseline_rev, base / "baseline")
        (base / "policy.yaml").write_text(POLICY)
        create_topics({"bootstrap.servers": broker.bootstrap}, PARTITIONS)
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
        unique = range(args.events) if args.unique_labels else [None] * args.events
        produce(producer, codec, [usage(rng, rng.choice(TEAMS), 1000, i) for i in unique])
        variants: list[tuple[str, Path | None]] = [("this checkout", None)]
        if args.baseline_services:
            variants.insert(0, ("baseline", args.baseline_services.resolve()))
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in variants}
        for round_ in range(args.rounds):
            for name, services in variants:
                root = base / f"{name.replace(' ', '-')}-{round_}"
                last = round_ == args.rounds - 1 and services is None
                profile = root / "worker.prof" if args.profile and last else None
                app_id = f"{DEFAULT_APP_ID}-{name.replace(' ', '-')}-{round_}"
                rate, cpu_us, worker = throughput_round(broker.bootstrap, root, args.events, app_id, services, profile)
                rss = peak_rss_mb(worker.pid)
                results[name].append((rate, cpu_us, rss))
                print(
                    f"{name}, round {round_ + 1}: {args.events:,} events at {rate:,.0f} events/s "
                    f"({cpu_us:.1f} us worker CPU per event, worker peak RSS {rss:,.0f} MB)",
                    flush=True,
                )
                try:
                    if last and args.samples:  # after every throughput round: its load reaches no other round
                        report_latency(broker.bootstrap, producer, codec, rng, args)
                finally:
                    stop(worker)
                if profile:
                    for title, path in (
                        ("event loop (faust, stage 2)", profile),
                        ("stage 1", profile.with_suffix(".stage1")),
                    ):
                        if path.exists():
                            print(f"--- profile: {title}")
                            pstats.Stats(str(path)).sort_stats("tottime").print_stats(22)
        medians = {name: tuple(map(statistics.median, zip(*runs, strict=True))) for name, runs in results.items()}
        for name, (rate, cpu_us, rss) in medians.items():
            print(f"median, {name}: {rate:,.0f} events/s, {cpu_us:.1f} us worker CPU per event, peak RSS {rss:,.0f} MB")
        rate, cpu_us, rss = medians["this checkout"]
        baseline = medians.get("baseline")
        extra: dict[str, object] = {"cpu_us_per_event": round(cpu_us, 1)}
        if baseline:
            version = f"revision {args.baseline_rev}" if args.baseline_rev else str(args.baseline_services)
            extra |= {"baseline_of": version, "baseline_cpu_us_per_event": round(baseline[1], 1)}
        if args.unique_labels:
            flood = f"{args.events:,} events, each with its own user, feature, customer and project"
            figure(bench, f"usage events/s through one worker, {flood}", rate, "events/s",
                   baseline=baseline[0] if baseline else None, **extra)  # fmt: skip
            figure(bench, f"worker peak RSS, {flood}", rss, "MB", baseline=baseline[2] if baseline else None,
                   baseline_of=extra.get("baseline_of"))  # fmt: skip
            return
        figure(
            "processor",
            "usage events/s through one worker (reference policy, 8 scopes x 5 periods)",
            rate,
            "events/s",
            baseline=baseline[0] if baseline else None,
            target=">= 50k",
            **extra,
        )


def report_latency(
    bootstrap: str, producer: Producer, codec: AvroCodec, rng: random.Random, args: argparse.Namespace
) -> None:
    latencies = sorted(measure_latency(bootstrap, producer, codec, rng, args))
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"emit -> decision latency ({len(latencies)} samples, background load {args.load}/s): "
        f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
    )


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

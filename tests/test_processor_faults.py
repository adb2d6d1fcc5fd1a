"""Crash and scale-out: window totals stay exact to the nano-dollar (docs/architecture.md §7.2)."""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from spendstream.core.events import UsageEvent
from spendstream.core.periods import period_window
from spendstream.core.policy import Policy, parse_policy
from spendstream.core.topics import ENFORCEMENT, USAGE
from spendstream.processor.checkpoint import json_key, json_value
from spendstream.processor.internal_topics import PARTIALS_TOPIC, changelog_topic
from spendstream.processor.recovery import read_scope_totals, read_to_end
from spendstream.processor.scopes import scopes_for
from spendstream.processor.spend_accounting import (
    IDS_PER_RECORD,
    WindowCalendar,
    dedup_id,
    ids_key,
    owner_prefix,
    pack_ids,
    split_window_key,
)
from spendstream.processor.usage_reader import usage_group
from spendstream.processor.watched_windows import watched
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from stub_upstream import wait_for
from test_processor import (
    ROOT,
    TopicReader,
    event,
    produce,
    start_worker,
    stop_worker,
    wait_totals,
    worker_report,
)

TEAMS = [f"t{i}" for i in range(6)]
CHANGELOG = changelog_topic("spendstream-processor", "partials")
SPIKE_RULES = "\n".join(
    f'  - {{name: {kind}-{dimension}, kind: {kind}, scope: "{dimension}:*"}}'
    for dimension in ("org", "division", "team", "project", "feature", "user", "environment", "model")
    for kind in ("daily", "hourly_ewma")
)
POLICY_YAML = f"""
name: default
timezone: America/New_York
org: acme
divisions: {{eng: [{", ".join(TEAMS)}]}}
budgets:
  - {{scope: "team:t0", period: month, amount_usd: 1}}
  - {{scope: "user:*", period: day, amount_usd: 1000}}
  - {{scope: "team:*", period: week, amount_usd: 1000}}
  - {{scope: "team:*", period: quarter, amount_usd: 1000}}
spike_rules:  # every scope's days and hours are read: stage 2 holds them (``watched_windows``)
{SPIKE_RULES}
"""


def make_stream(count: int, seed: int) -> list[UsageEvent]:
    rng = random.Random(seed)
    now = datetime.now(UTC)
    return [
        event(
            org="acme",
            team=rng.choice(TEAMS),
            project=f"p{rng.randrange(5)}",
            feature=f"f{rng.randrange(4)}",
            user=f"u{rng.randrange(30)}",
            environment="prod",
            occurred_at=now - timedelta(seconds=rng.randrange(7200)),
            cost_nanos=rng.randrange(1, 5_000_000),
            input_tokens=rng.randrange(2000),
            output_tokens=rng.randrange(500),
        )
        for _ in range(count)
    ]


def exact_totals(events: list[UsageEvent], policy: Policy) -> dict[tuple[str, str, int], tuple[int, int, int]]:
    """The truth, summed straight from the produced events."""
    calendar = WindowCalendar(policy.tz)
    acc: dict[tuple[str, str, int], list[int]] = {}
    for ev in events:
        record = ev.to_avro()
        for wkey in calendar.window_keys(scopes_for(record, policy), int(ev.occurred_at.timestamp())):
            row = acc.setdefault(split_window_key(wkey), [0, 0, 0])
            row[0] += ev.cost_nanos or 0
            row[1] += 1
            row[2] += ev.input_tokens + ev.output_tokens
    return {k: (v[0], v[1], v[2]) for k, v in acc.items()}


def read_by_stage_two(totals: dict, policy: Policy) -> dict:
    """The windows of ``totals`` that stage 2 holds: those some rule of ``policy`` reads (``watched_windows``)."""
    series = watched(policy).series
    return {key: value for key, value in totals.items() if key[1] in series(key[0])}


def window_differences(windows: dict, expected: dict) -> str:
    """Which windows stage 2 holds differently from the exact sums, and how (a failure must say which)."""
    wrong = sorted(key for key in set(windows) | set(expected) if windows.get(key) != expected.get(key))
    shown = "; ".join(f"{key}: {windows.get(key)} != exact {expected.get(key)}" for key in wrong[:5])
    return f"stage-2 window totals differ from the exact sums in {len(wrong)} of {len(expected)} windows: {shown}"


def progress(broker: EmbeddedBroker) -> str:
    """How far each stage committed its source against the end (stage 1: the usage partitions, stage 2: the
    internal topic), and the broker log's end: whether a stuck stage never read, or read and stopped."""
    lines = []
    for stage, group, topic in (
        ("stage 1", usage_group("spendstream-processor"), USAGE),
        ("stage 2", "spendstream-processor", PARTIALS_TOPIC),
    ):
        consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
        try:
            partitions = [TopicPartition(topic, p) for p in range(6)]
            committed = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10)}
            ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in partitions}
        finally:
            consumer.close()
        lines.append(f"{stage}: {topic} partitions (committed, end): { {p: (committed[p], ends[p]) for p in ends} }")
    log = broker.log_path.read_text(errors="replace").splitlines()[-20:] if broker.log_path else []
    return "\n".join(lines) + "\nbroker log:\n" + "\n".join(log)


def has_joined(worker_log: Path, pid: int) -> bool:
    return f"[{pid}] [INFO] Joined group" in worker_log.read_text(errors="replace")


def timeline(worker_log: Path) -> str:
    """What every worker of a log did to its partitions (joins, assignments, restores, crashes), in order."""
    marks = ("Joined group", "stage 1 reads", "stage 1 announced", "rebuilt", "ignored", "Signal", "CRITICAL")
    lines = [line for line in worker_log.read_text(errors="replace").splitlines() if any(m in line for m in marks)]
    return "timeline of the workers:\n" + "\n".join(lines)


def paced_producer(bootstrap: str, events: list[UsageEvent], seconds: float) -> threading.Thread:
    chunks = [events[i : i + 500] for i in range(0, len(events), 500)]

    def run() -> None:
        for chunk in chunks:
            produce(bootstrap, chunk)
            time.sleep(seconds / len(chunks))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def cli_env(bootstrap: str, data_dir: Path) -> dict[str, str]:
    return {**os.environ, "SPENDSTREAM_KAFKA_BOOTSTRAP": bootstrap, "SPENDSTREAM_DATA_DIR": str(data_dir)}


@pytest.mark.slow
def test_kill_9_at_five_random_points_keeps_every_window_exact(tmp_path: Path, broker: EmbeddedBroker) -> None:
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY_YAML)
    policy = parse_policy(POLICY_YAML)
    events = make_stream(20_000, seed=7)
    expected = exact_totals(events, policy)

    sink_dir = tmp_path / "sink"
    subprocess.run(
        [sys.executable, "-m", "spendstream.cli", "ledger", "migrate"],
        env=cli_env(broker.bootstrap, sink_dir),
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    sink = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "sink"],
        env=cli_env(broker.bootstrap, sink_dir),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rng = random.Random(11)
    producer = paced_producer(broker.bootstrap, events, seconds=25)
    worker = start_worker(broker.bootstrap, tmp_path / "w", policy_path)
    worker_log = tmp_path / "w" / "worker.log"
    try:
        for _ in range(5):
            # a crash once the worker is a group member: sometimes before its first batch, sometimes amid them; the
            # next worker joins beside its ghost (half the partitions, then all once the session times out)
            wait_for(functools.partial(has_joined, worker_log, worker.pid), 60, 0.05)
            time.sleep(rng.uniform(0.5, 4.0))
            worker.kill()
            worker.wait()
            worker = start_worker(broker.bootstrap, tmp_path / "w", policy_path)
        producer.join()
        try:
            wait_totals(broker.bootstrap, expected, "spendstream-processor", timeout=90, workers=[worker])
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{progress(broker)}") from None
        deadline = time.monotonic() + 30
        held = read_by_stage_two(expected, policy)
        while (windows := read_scope_totals({"bootstrap.servers": broker.bootstrap})) != held:
            if time.monotonic() > deadline:
                report = f"{timeline(worker_log)}\n{worker_report([worker], lines=20)}\n{progress(broker)}"
                raise AssertionError(f"{window_differences(windows, held)}\n{report}")
            time.sleep(0.5)
    finally:
        stop_worker(worker)
        sink.terminate()
        sink.wait(30)

    from spendstream.core.config import load_settings
    from spendstream.core.ledger_store import connect

    client = connect(load_settings(data_dir=sink_dir))
    try:
        rows = client.query(
            "SELECT team, sum(cost_nanos), count() FROM spendstream.usage_ledger FINAL GROUP BY team"
        ).result_rows
    finally:
        client.close()
    ledger = {f"team:{team}": (int(nanos), int(count)) for team, nanos, count in rows}
    by_team: dict[str, list[int]] = {}
    for (scope, period, _), (nanos, requests, _) in expected.items():
        if period == "month" and scope.startswith("team:"):
            row = by_team.setdefault(scope, [0, 0])
            row[0] += nanos
            row[1] += requests
    assert ledger == {scope: (v[0], v[1]) for scope, v in by_team.items()}


@pytest.mark.slow
def test_two_workers_then_one_killed_stay_exact_and_keep_deciding(tmp_path: Path, broker: EmbeddedBroker) -> None:
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY_YAML)
    events = make_stream(10_000, seed=3)
    expected = exact_totals(events, parse_policy(POLICY_YAML))
    decisions = TopicReader(broker.bootstrap, ENFORCEMENT, "decision")
    first = start_worker(broker.bootstrap, tmp_path / "a", policy_path)
    second = start_worker(broker.bootstrap, tmp_path / "b", policy_path)
    try:
        producer = paced_producer(broker.bootstrap, events, seconds=15)
        second_log = tmp_path / "b" / "worker.log"
        # Kill the second worker only once it has joined the group and owns partitions (on a loaded
        # machine joining can take longer than the producer's pace).
        deadline = time.monotonic() + 90
        while "Ready" not in second_log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "Ready" in second_log.read_text(errors="replace")
        time.sleep(1)
        second.kill()
        second.wait()
        producer.join()
        wait_totals(broker.bootstrap, expected, "spendstream-processor", timeout=90)
        decisions.wait(lambda d: d["scope"] == "team:t0" and d["action"] == "shutoff", timeout=30)
    finally:
        stop_worker(first)
        stop_worker(second)
        decisions.close()


def _scope_records_consumed(metrics_port: int) -> float:
    """Stage-2 records this worker has consumed (0 until its metrics are served)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    except OSError:
        return 0.0
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "spendstream_processor_consumed_total" and sample.labels.get("stage") == "scopes"
    )


def test_a_second_worker_joining_a_running_one_keeps_both_alive_and_exact(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    """Scaling out revokes stage-2 partitions from the running worker; it must hand them over, not exit."""
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY_YAML)
    events = make_stream(10_000, seed=5)
    expected = exact_totals(events, parse_policy(POLICY_YAML))
    port_a, port_b = free_port(), free_port()
    first = start_worker(broker.bootstrap, tmp_path / "a", policy_path, metrics_port=port_a)
    second: subprocess.Popen[bytes] | None = None
    try:
        # Most events flow while the second worker joins; the rest follow once both run, so each worker has some
        # of its own to count however long the join took.
        producer = paced_producer(broker.bootstrap, events[:7_000], seconds=20)
        consumed = wait_for(lambda: _scope_records_consumed(port_a) > 0, timeout=60, interval=0.5)
        assert consumed, "the first worker never consumed"
        second = start_worker(broker.bootstrap, tmp_path / "b", policy_path, metrics_port=port_b)
        second_log = tmp_path / "b" / "worker.log"
        assert wait_for(lambda: "Ready" in second_log.read_text(errors="replace"), timeout=90, interval=0.2)
        time.sleep(5)  # the revoked actors' crash loop ends the first worker within a second or two
        assert first.poll() is None, "the first worker exited when the second joined"
        consumed_by_first = _scope_records_consumed(port_a)
        producer.join()
        produce(broker.bootstrap, events[7_000:])
        wait_totals(broker.bootstrap, expected, "spendstream-processor", timeout=90)
        assert first.poll() is None and second.poll() is None
        assert _scope_records_consumed(port_b) > 0, "the second worker owns no stage-2 partition"
        assert _scope_records_consumed(port_a) > consumed_by_first, "the first worker kept no stage-2 partition"
    finally:
        stop_worker(first)
        if second is not None:
            stop_worker(second)


@pytest.mark.slow
def test_a_copy_sent_after_a_crash_still_counts_once(tmp_path: Path, broker: EmbeddedBroker) -> None:
    """The applied event ids survive a SIGKILL in the changelog, so a re-send after the restart is skipped."""
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY_YAML)
    at = datetime.now(UTC)
    original = event(org="acme", team="t2", user="copied", occurred_at=at, cost_nanos=7)
    worker = start_worker(broker.bootstrap, tmp_path / "w", policy_path)
    try:
        produce(broker.bootstrap, [original])
        day = ("user:copied", "day", int(period_window("day", at, "America/New_York")[0].timestamp()))
        wait_totals(broker.bootstrap, {day: (7, 1, 15)}, "spendstream-processor")
        worker.kill()
        worker.wait()
        worker = start_worker(broker.bootstrap, tmp_path / "w", policy_path)
        marker = event(org="acme", team="t2", user="copied", occurred_at=at, cost_nanos=11)
        produce(broker.bootstrap, [original, marker], arrival=datetime.now(UTC))
        wait_totals(broker.bootstrap, {day: (18, 2, 30)}, "spendstream-processor", timeout=60)
    finally:
        stop_worker(worker)


def test_windows_stage_two_lost_come_back_from_stage_one_on_restart(tmp_path: Path, broker: EmbeddedBroker) -> None:
    """Stage 2's windows are derived from stage 1's announcements: with every window of its changelog gone (what a
    stage-2 owner that missed announcements across a crash and a rebalance amounts to) and nothing left for stage 1
    to read, the next start announces the restored totals again and every window comes back exact."""
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY_YAML)
    events = make_stream(600, seed=3)
    expected = exact_totals(events, parse_policy(POLICY_YAML))
    held = read_by_stage_two(expected, parse_policy(POLICY_YAML))
    assert len(held) > len(expected) / 2  # the spike rules read every scope's days and hours
    worker = start_worker(broker.bootstrap, tmp_path / "w", policy_path)
    try:
        produce(broker.bootstrap, events)
        wait_totals(broker.bootstrap, expected, "spendstream-processor", timeout=60)
        assert wait_for(lambda: read_scope_totals({"bootstrap.servers": broker.bootstrap}) == held, 30, 0.5)
    finally:
        stop_worker(worker)
    topic = changelog_topic("spendstream-processor", "windows")
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "test-wipe", "enable.auto.commit": False})
    try:
        records = list(read_to_end(consumer, topic, range(6), 15.0))
    finally:
        consumer.close()
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for partition, key in {(partition, key) for partition, key, _ in records}:
        producer.produce(topic, None, json_key(key), partition)
    producer.flush(10)
    assert read_scope_totals({"bootstrap.servers": broker.bootstrap}) == {}
    worker = start_worker(broker.bootstrap, tmp_path / "w", policy_path)
    try:
        deadline = time.monotonic() + 60
        while (windows := read_scope_totals({"bootstrap.servers": broker.bootstrap})) != held:
            if time.monotonic() > deadline:
                raise AssertionError(f"{window_differences(windows, held)}\n{worker_report([worker], lines=40)}")
            time.sleep(0.5)
        assert "stage 1 announced" in (tmp_path / "w" / "worker.log").read_text()
    finally:
        stop_worker(worker)


def _budget_scopes(metrics_port: int) -> dict[str, float]:
    """scope -> spendstream_budget_spent_usd{period="month"}, scraped as Prometheus does (empty until served)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    return {
        sample.labels["scope"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "spendstream_budget_spent_usd" and sample.labels["period"] == "month"
    }


def test_budget_gauges_leave_the_worker_that_lost_the_scope(tmp_path: Path, broker: EmbeddedBroker) -> None:
    """Each scope's gauges are shown once across the group: the worker that lost its partition forgets them
    rather than showing a frozen copy beside the live one until the month ends."""
    teams = [f"g{i}" for i in range(12)]
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(
        f"name: default\ntimezone: UTC\norg: acme\ndivisions: {{eng: [{', '.join(teams)}]}}\nbudgets:\n"
        + "".join(f'  - {{scope: "team:{team}", period: month, amount_usd: 100}}\n' for team in teams)
    )
    ports = free_port(), free_port()
    first = start_worker(broker.bootstrap, tmp_path / "a", policy_path, metrics_port=ports[0])
    second: subprocess.Popen[bytes] | None = None
    scopes = {f"team:{team}" for team in teams}
    try:
        produce(broker.bootstrap, [event(org="acme", team=team, cost_nanos=1_000_000_000) for team in teams])
        assert wait_for(lambda: set(_budget_scopes(ports[0])) == scopes, 90, 0.5), _budget_scopes(ports[0])
        second = start_worker(broker.bootstrap, tmp_path / "b", policy_path, metrics_port=ports[1])
        second_log = tmp_path / "b" / "worker.log"
        assert wait_for(lambda: "Ready" in second_log.read_text(errors="replace"), 90, 0.2)
        time.sleep(2)  # the first worker's side of the rebalance
        produce(broker.bootstrap, [event(org="acme", team=team, cost_nanos=1_000_000_000) for team in teams])

        def both() -> tuple[dict[str, float], dict[str, float]]:
            return _budget_scopes(ports[0]), _budget_scopes(ports[1])

        def all_live() -> bool:
            shown = both()
            return {scope for gauges in shown for scope, spent in gauges.items() if spent == 2.0} == scopes

        assert wait_for(all_live, 90, 0.5), both()
        first_shows, second_shows = both()
        assert second_shows, "the second worker took partitions"
        assert set(first_shows) & set(second_shows) == set(), "a moved scope lingers on the worker that lost it"
    finally:
        stop_worker(first)
        if second is not None:
            stop_worker(second)


def _spilled_files(pid: int, directory: Path) -> list[str]:
    """The unlinked files under ``directory`` a process holds open (where the dedup horizon spills its runs)."""
    links = (os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    return [link for link in links if link.startswith(str(directory)) and link.endswith("(deleted)")]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads a process's open files in /proc")
def test_a_copy_of_an_event_whose_id_moved_to_disk_is_skipped_before_and_after_a_crash(
    tmp_path: Path, broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every id moves to disk at once (memory ids 1): a copy is found there; after a SIGKILL the horizon comes back
    from the changelog, although the worker's table kept only the newest arrival of each ids record."""
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY_YAML)
    monkeypatch.setenv("SPENDSTREAM_PROCESSOR_DEDUP_MEMORY_IDS", "1")
    at = datetime.now(UTC)
    day = ("user:spilled", "day", int(period_window("day", at, "America/New_York")[0].timestamp()))
    original, first, second, third = (
        event(org="acme", team="t3", user="spilled", occurred_at=at, cost_nanos=cost) for cost in (7, 11, 13, 17)
    )
    worker = start_worker(broker.bootstrap, tmp_path / "w", policy_path)
    try:
        horizon = (tmp_path / "w" / "processor" / "spendstream-processor" / "horizon").resolve()
        produce(broker.bootstrap, [original])
        wait_totals(broker.bootstrap, {day: (7, 1, 15)}, "spendstream-processor")
        assert _spilled_files(worker.pid, horizon) and list(horizon.iterdir()) == []
        produce(broker.bootstrap, [original, first], arrival=datetime.now(UTC))
        wait_totals(broker.bootstrap, {day: (18, 2, 30)}, "spendstream-processor", timeout=60)
        worker.kill()
        worker.wait()
        worker = start_worker(broker.bootstrap, tmp_path / "w", policy_path)
        produce(broker.bootstrap, [original, second], arrival=datetime.now(UTC))
        wait_totals(broker.bootstrap, {day: (31, 3, 45)}, "spendstream-processor", timeout=60)
        produce(broker.bootstrap, [original, first, second, third], arrival=datetime.now(UTC))
        wait_totals(broker.bootstrap, {day: (48, 4, 60)}, "spendstream-processor", timeout=60)
    finally:
        stop_worker(worker)


def _peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads a process's peak memory in /proc")
def test_a_restart_with_a_large_horizon_adopts_ids_records_as_they_are_restored(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    """A worker restarted over 1.5 M applied ids (64 MB of ids records in the changelog, as a long run leaves
    them) adopts each record as faust restores it, so its peak grows by less than the whole records would take
    twice (measured: 166 MB when the table kept them whole until stage 1 adopted them, 93 MB with adoption as
    they are applied), and it still skips a copy of any of them."""
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY_YAML)
    at = datetime.now(UTC)
    day = ("user:restored", "day", int(period_window("day", at, "America/New_York")[0].timestamp()))
    first, marker = (event(org="acme", team="t4", user="restored", occurred_at=at, cost_nanos=c) for c in (7, 11))
    worker = start_worker(broker.bootstrap, tmp_path / "w", policy_path)
    try:
        produce(broker.bootstrap, [first])
        wait_totals(broker.bootstrap, {day: (7, 1, 15)}, "spendstream-processor")
        baseline = _peak_rss_bytes(worker.pid)
        worker.kill()
        worker.wait()
        # the ids records a worker writes in a long run: 16 of 16,384 ids per source partition, arrived just now
        copied, owner = uuid.uuid4(), owner_prefix("acme", "t4")
        changelog = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20, "message.max.bytes": 2_000_000})
        written = 0
        newest_ms = int(time.time() * 1000)
        for partition in range(6):
            for record in range(16):
                first_offset = 1_000_000 + record * IDS_PER_RECORD
                ids = [os.urandom(16) for _ in range(IDS_PER_RECORD - 1)] + [dedup_id(copied.bytes, owner)]
                entries = [(event_id, first_offset + n) for n, event_id in enumerate(ids)]
                value = json_value(pack_ids(newest_ms, entries, [1] * len(entries)))
                changelog.produce(CHANGELOG, value, json_key(ids_key(partition, first_offset)), partition=partition)
                changelog.poll(0)
                written += len(value)
        assert changelog.flush(60) == 0
        worker = start_worker(broker.bootstrap, tmp_path / "w", policy_path)
        copy = event(org="acme", team="t4", user="restored", occurred_at=at, cost_nanos=13, event_id=copied)
        produce(broker.bootstrap, [copy, marker], arrival=datetime.now(UTC))
        wait_totals(broker.bootstrap, {day: (18, 2, 30)}, "spendstream-processor", timeout=90)
        grown = _peak_rss_bytes(worker.pid) - baseline
        assert grown < 2 * written, f"peak grew by {grown >> 20} MB over {written >> 20} MB of ids records"
    finally:
        stop_worker(worker)

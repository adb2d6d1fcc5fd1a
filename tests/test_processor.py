"""Processor scenarios against a real broker and real faust workers (one worker shared per module).

Every scenario uses its own teams/features/users, so they do not disturb each other, and event time in the
past or future where a rule needs another period (no test waits for a real midnight).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from spendstream.core.codec import AvroCodec
from spendstream.core.events import PolicyRecord, UsageEvent
from spendstream.core.periods import period_window
from spendstream.core.policy import parse_policy
from spendstream.core.record_signature import write_key_pair
from spendstream.core.topics import ALERTS, ENFORCEMENT, HEARTBEAT_KEY_PREFIX, POLICY, USAGE, USAGE_DLQ
from spendstream.processor.decision_publisher import SPEND_REFRESH_S
from spendstream.processor.internal_topics import PARTIALS_TOPIC, stage2_partition
from spendstream.processor.recovery import read_to_end, read_window_totals
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics

ROOT = Path(__file__).resolve().parents[1]
USD = 1_000_000_000

POLICY_YAML = """
name: default
timezone: Europe/Berlin
org: acme
divisions:
  eng: [alpha, beta, gamma, delta, roll, raise, late, gauge]
  sales: [omega]
thresholds: {alert: 0.80, fallback: 0.90, shutoff: 1.00}
fallback_models: {gpt-4o: gpt-4o-mini, claude-3-5-sonnet: claude-3-haiku}
budgets:
  - {scope: "team:alpha", period: month, amount_usd: 100}
  - {scope: "team:beta", period: month, amount_usd: 100}
  - {scope: "team:gamma", period: month, amount_usd: 100}
  - {scope: "team:refresh", period: month, amount_usd: 100}
  - {scope: "team:capped", period: month, amount_usd: 100, hard_cap: true}
  - {scope: "feature:support_bot", period: month, amount_usd: 10}
  - {scope: "team:roll", period: day, amount_usd: 10}
  - {scope: "team:raise", period: month, amount_usd: 10}
  - {scope: "team:delta", period: month, amount_usd: 3000}
  - {scope: "team:gauge", period: month, amount_usd: 200}
  - {scope: "team:gauge", period: day, amount_usd: 50}
  - {scope: "team:forged", period: month, amount_usd: 100}
quotas:
  - {scope: "user:*", requests_per_day: 5}
allowed_models:
  "environment:dev": [llama-3.2-1b, gpt-4o-mini]
features:
  support_bot: {critical: true, throttle_rps: 2.5}
pricing: {unknown_model: reject}
spike_rules:
  - {name: daily3x, kind: daily, scope: "project:*", factor: 3, window_days: 7, min_history_days: 3}
  - {name: runaway, kind: hourly_ewma, scope: "customer:*", factor: 4, min_history_hours: 3}
"""


# -- helpers shared with the fault tests -----------------------------------------------------------------------


def event(**fields: Any) -> UsageEvent:
    base: dict[str, Any] = {"provider": "openai", "model_requested": "gpt-4o", "input_tokens": 10, "output_tokens": 5}
    base.update(fields)
    return UsageEvent(**base)


def produce(bootstrap: str, events: Iterable[UsageEvent], arrival: datetime | None = None) -> None:
    """Produce usage events keyed by org/team; ``arrival`` sets the Kafka timestamp (default: occurred_at)."""
    codec = AvroCodec("usage_event")
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for ev in events:
        stamp = arrival or ev.occurred_at
        producer.produce(
            USAGE,
            codec.encode(ev.to_avro()),
            key=f"{ev.org}/{ev.team}".encode(),
            timestamp=int(stamp.timestamp() * 1000),
        )
        producer.poll(0)
    assert producer.flush(30) == 0


def publish_policy(bootstrap: str, name: str, document: str) -> None:
    record = PolicyRecord(name=name, version=uuid.uuid4().hex[:16], document=document, published_by="test")
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(POLICY, AvroCodec("policy").encode(record.to_avro()), key=name.encode())
    assert producer.flush(15) == 0


class TopicReader:
    """Reads a topic from the beginning and keeps every decoded record (value plus headers)."""

    def __init__(self, bootstrap: str, topic: str, schema: str | None) -> None:
        self.codec = AvroCodec(schema) if schema else None
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}"})
        self.consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        self.records: list[Any] = []

    def poll(self) -> list[Any]:
        for message in self.consumer.consume(1000, timeout=0.2):
            if message.error() or (message.key() or b"").startswith(HEARTBEAT_KEY_PREFIX):
                continue
            if self.codec:
                self.records.append(self.codec.decode(message.value()))
            else:
                self.records.append((message.value(), dict(message.headers() or [])))
        return self.records

    def wait(self, predicate: Callable[[Any], bool], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.poll():
                if predicate(record):
                    return record
        raise AssertionError(f"no matching record within {timeout}s; have {self.records[-5:]}")

    def close(self) -> None:
        self.consumer.close()


def start_worker(
    bootstrap: str,
    data_dir: Path,
    policy_path: Path | None,
    *extra: str,
    app_id: str = "spendstream-processor",
    metrics_port: int | None = None,
    signing_key: Path | None = None,
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SPENDSTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "SPENDSTREAM_DATA_DIR": str(data_dir),
        "SPENDSTREAM_USAGE_PARTITIONS": "6",
    }
    if signing_key is not None:
        env["SPENDSTREAM_SIGNING_KEY"] = str(signing_key)
    if metrics_port is not None:
        env["SPENDSTREAM_METRICS_PORT"] = str(metrics_port)
    if policy_path is not None:
        env["SPENDSTREAM_POLICY"] = str(policy_path)
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "worker.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "processor", "--app-id", app_id, *extra],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    proc.log_path = data_dir / "worker.log"  # type: ignore[attr-defined]  # for ``worker_report``
    return proc


def worker_report(workers: Sequence[subprocess.Popen[bytes]], lines: int = 30) -> str:
    """Whether each worker still runs, and the end of its log: what a failed wait needs to be diagnosed."""
    parts = []
    for proc in workers:
        state = "running" if proc.poll() is None else f"exited {proc.returncode}"
        tail = proc.log_path.read_text(errors="replace").splitlines()[-lines:]  # type: ignore[attr-defined]
        parts.append(f"worker pid {proc.pid} ({state}), last lines of {proc.log_path}:\n" + "\n".join(tail))  # type: ignore[attr-defined]
    return "\n".join(parts)


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_totals(
    bootstrap: str,
    expected: dict[tuple[str, str, int], tuple[int, int, int]],
    app_id: str,
    timeout: float = 60.0,
    workers: Sequence[subprocess.Popen[bytes]] = (),
) -> dict:
    """Wait until the changelog shows ``expected`` for each of its windows; return the totals last read.

    On failure the message carries ``workers``' state and log ends."""
    deadline = time.monotonic() + timeout
    totals: dict = {}
    while time.monotonic() < deadline:
        totals = read_window_totals({"bootstrap.servers": bootstrap}, app_id)
        if all(totals.get(key) == value for key, value in expected.items()):
            return totals
        time.sleep(0.5)
    wrong = {k: (totals.get(k), v) for k, v in expected.items() if totals.get(k) != v}
    raise AssertionError(
        f"{len(wrong)} windows differ (got, want), e.g. {list(wrong.items())[:5]}\n{worker_report(workers)}"
    )


# -- shared worker ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Stack:
    def __init__(self, broker: EmbeddedBroker, root: Path) -> None:
        self.broker = broker
        self.bootstrap = broker.bootstrap
        self.policy_path = root / "policy.yaml"
        self.policy_path.write_text(POLICY_YAML)
        self.metrics_port = free_port()
        signing_key, _ = write_key_pair(root / "keys")  # it signs and seals; no verify key: policies here are unsigned
        self.worker = start_worker(
            self.bootstrap,
            root / "worker",
            self.policy_path,
            "--allowed-lateness-s",
            "3600",
            metrics_port=self.metrics_port,
            signing_key=signing_key,
        )
        self.decisions = TopicReader(self.bootstrap, ENFORCEMENT, "decision")
        self.alerts = TopicReader(self.bootstrap, ALERTS, "alert")
        self.dlq = TopicReader(self.bootstrap, USAGE_DLQ, None)

    def decision(self, scope: str, action: str, timeout: float = 45.0, **match: Any) -> dict[str, Any]:
        def ok(d: dict[str, Any]) -> bool:
            return d["scope"] == scope and d["action"] == action and all(d[k] == v for k, v in match.items())

        return self.decisions.wait(ok, timeout)

    def latest_decision(self, scope: str) -> dict[str, Any] | None:
        mine = [d for d in self.decisions.poll() if d["scope"] == scope]
        return max(mine, key=lambda d: d["version"]) if mine else None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("processor")
    with EmbeddedBroker(log_path=root / "broker.log") as broker:
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
        running = Stack(broker, root)
        try:
            yield running
        finally:
            stop_worker(running.worker)
            for reader in (running.decisions, running.alerts, running.dlq):
                reader.close()


def now() -> datetime:
    return datetime.now(UTC)


def spend(stack: Stack, team: str, usd_each: float, count: int, at: datetime | None = None, **fields: Any) -> None:
    at = at or now()
    produce(
        stack.bootstrap,
        [event(team=team, occurred_at=at, cost_nanos=int(usd_each * USD), **fields) for _ in range(count)],
    )


# -- scenarios ----------------------------------------------------------------------------------------------------


def test_thresholds_alert_fallback_shutoff_in_order(stack: Stack) -> None:
    spend(stack, "alpha", 10, 8)  # $80 of $100
    stack.decision("team:alpha", "alert", spend_nanos=80 * USD, limit_nanos=100 * USD, period="month")
    stack.alerts.wait(lambda a: a["scope"] == "team:alpha" and a["kind"] == "threshold" and "alert" in a["message"])
    spend(stack, "alpha", 10, 1)  # $90
    fallback = stack.decision("team:alpha", "fallback")
    assert fallback["fallback_models"] == {"gpt-4o": "gpt-4o-mini", "claude-3-5-sonnet": "claude-3-haiku"}
    spend(stack, "alpha", 10, 1)  # $100
    shutoff = stack.decision("team:alpha", "shutoff")
    assert shutoff["version"] > fallback["version"]
    assert shutoff["expires_at"] is not None  # the end of the month in Europe/Berlin
    assert shutoff["policy_version"] == parse_policy(POLICY_YAML).version
    for level in ("alert", "fallback", "shutoff"):
        stack.alerts.wait(lambda a, lv=level: a["scope"] == "team:alpha" and a["message"].startswith(lv))


def test_window_totals_without_the_processors_seal_change_nothing(stack: Stack) -> None:
    """Stage 2 decides on the window totals it reads on its internal topic and signs what follows: a client that
    may write to the broker published totals there, shut off another team's month and lifted its own shutoff, each
    decision signed by the processor. Only messages sealed with a secret of the processor's signing key count."""
    scope = "team:forged"
    start = int(period_window("month", now(), "Europe/Berlin")[0].timestamp())
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    for source in range(6):  # every source partition's total, at an offset no real one reaches
        total = {"p": source, "at": int(time.time()), "w": int(time.time() * 1000),
                 "s": {scope: [[f"{scope}|month|{start}", 150 * USD, 1, 1, 10**12]]}}  # fmt: skip
        producer.produce(PARTIALS_TOPIC, json.dumps(total).encode(), partition=stage2_partition(scope, 6))
    assert producer.flush(10) == 0
    spend(stack, "forged", 10, 8)  # $80 of $100
    alert = stack.decision(scope, "alert", spend_nanos=80 * USD)
    assert stack.latest_decision(scope) == alert  # never shut off


def test_an_alert_is_republished_while_its_scope_has_traffic(stack: Stack) -> None:
    """Edges reserve against the spend an alert carried: the processor refreshes it (at most every
    SPEND_REFRESH_S) while the scope has traffic, even requests an edge refused (they cost nothing)."""
    spend(stack, "refresh", 10, 8)  # $80 of $100
    first = stack.decision("team:refresh", "alert", spend_nanos=80 * USD)
    time.sleep(SPEND_REFRESH_S)
    spend(stack, "refresh", 0, 3, status="blocked", decision_applied="shutoff")  # refused at an edge
    again = stack.decisions.wait(lambda d: d["scope"] == "team:refresh" and d["version"] > first["version"], 20)
    assert again["action"] == "alert" and again["spend_nanos"] == 80 * USD
    assert again["issued_at"] > first["issued_at"]


def test_a_hard_cap_is_published_from_its_scopes_first_traffic(stack: Stack) -> None:
    """Far below its alert, a hard-capped team's standing reaches the edges (an allow with its spend, limit and
    period end), so they hold a burst to what remains; refreshed like an alert while the team has traffic, once
    half of it is spent."""
    spend(stack, "capped", 60, 1)  # $60 of $100: over half, so refreshed like an alert
    first = stack.decision("team:capped", "allow", spend_nanos=60 * USD, limit_nanos=100 * USD, period="month")
    assert first["expires_at"] is not None
    time.sleep(SPEND_REFRESH_S)
    spend(stack, "capped", 1, 1)
    again = stack.decisions.wait(lambda d: d["scope"] == "team:capped" and d["version"] > first["version"], 20)
    assert again["action"] == "allow" and again["spend_nanos"] == 61 * USD


def test_critical_feature_is_throttled_instead_of_shut_off(stack: Stack) -> None:
    spend(stack, "omega", 5, 2, feature="support_bot")  # $10 of $10
    throttle = stack.decision("feature:support_bot", "throttle")
    assert throttle["throttle_rps"] == 2.5
    assert stack.latest_decision("feature:support_bot")["action"] == "throttle"


def test_per_user_daily_quota(stack: Stack) -> None:
    spend(stack, "omega", 0.001, 4, user="quota-user")
    spend(stack, "omega", 0.001, 1, user="quota-user")  # the 5th of 5 requests per day
    shutoff = stack.decision("user:quota-user", "shutoff")
    assert "requests quota used up: 5/5" in shutoff["reason"]
    stack.alerts.wait(lambda a: a["scope"] == "user:quota-user" and a["kind"] == "quota")


def test_allowed_model_list_is_published_for_the_scope(stack: Stack) -> None:
    spend(stack, "omega", 0.01, 1, environment="dev", model_requested="llama-3.2-1b")
    decision = stack.decision("environment:dev", "allow")
    assert decision["allowed_models"] == ["llama-3.2-1b", "gpt-4o-mini"]


def local_noon_days_ago(days: int) -> datetime:
    """Noon of the local day ``days`` before today in the policy's timezone: 24-hour steps back from the last hour of
    a 25-hour day (the autumn clock change) are still on the same local day."""
    start = period_window("day", now(), "Europe/Berlin")[0]
    for _ in range(days):
        start = period_window("day", start - timedelta(seconds=1), "Europe/Berlin")[0]
    return start + timedelta(hours=12)


def test_period_rollover_lifts_the_decision(stack: Stack) -> None:
    spend(stack, "roll", 5, 2, at=local_noon_days_ago(1))  # $10 of a $10 daily budget, yesterday (Berlin)
    shutoff = stack.decision("team:roll", "shutoff", period="day")
    spend(stack, "roll", 1, 1)  # first event of today
    lifted = stack.decision("team:roll", "allow")
    assert lifted["version"] > shutoff["version"]


def test_budget_raised_mid_period_lifts_shutoff_and_bad_policy_is_rejected(stack: Stack) -> None:
    spend(stack, "raise", 5, 2)  # $10 of $10
    shutoff = stack.decision("team:raise", "shutoff")
    bad = {"name": "default", "budgets": [{"scope": "team:raise", "period": "fortnight", "amount_usd": 1}]}
    publish_policy(stack.bootstrap, "default", json.dumps(bad))
    rejected = stack.alerts.wait(lambda a: a["kind"] == "policy")
    assert "budgets.0.period" in rejected["message"]
    raised = POLICY_YAML.replace(
        '{scope: "team:raise", period: month, amount_usd: 10}', '{scope: "team:raise", period: month, amount_usd: 1000}'
    )
    new_version = parse_policy(raised).version
    publish_policy(stack.bootstrap, "default", parse_policy(raised).to_json())
    lifted = stack.decision("team:raise", "allow", policy_version=new_version)
    assert lifted["version"] > shutoff["version"]
    assert (lifted["spend_nanos"], lifted["limit_nanos"]) == (10 * USD, 1000 * USD)


def test_late_events_inside_lateness_count_and_later_ones_go_to_the_dlq(stack: Stack) -> None:
    occurred = now() - timedelta(hours=3)
    on_time = event(team="late", occurred_at=occurred, cost_nanos=7 * USD)
    too_late = event(team="late", occurred_at=occurred, cost_nanos=1_000 * USD)
    produce(stack.bootstrap, [on_time], arrival=occurred + timedelta(minutes=30))  # allowed lateness is 1 h
    produce(stack.bootstrap, [too_late], arrival=occurred + timedelta(hours=2))
    _, headers = stack.dlq.wait(lambda r: str(too_late.event_id).encode() in r[0])
    assert headers["spendstream.dlq.reason"].startswith(b"late event")
    start = int(period_window("month", occurred, "Europe/Berlin")[0].timestamp())
    wait_totals(stack.bootstrap, {("team:late", "month", start): (7 * USD, 1, 15)}, "spendstream-processor")


def test_names_that_cannot_make_scopes_go_to_the_dlq_and_the_processor_keeps_counting(stack: Stack) -> None:
    """An edge that does not check its events (the pydantic model refuses these) must not stop the budgets: a
    user of ``*`` would be counted as the ``user:*`` template (one call's spend shutting off every user) and a
    feature of 900 kB made a scope key larger than the processor's own messages may be (it crash-looped)."""

    def unchecked(**fields: Any) -> UsageEvent:
        base = {"provider": "openai", "model_requested": "gpt-4o", "input_tokens": 10, "output_tokens": 5}
        return UsageEvent.model_construct(**{**base, **fields})

    template, huge = unchecked(team="names", user="*"), unchecked(team="names", feature="f" * 900_000)
    produce(stack.bootstrap, [template, huge, event(team="names", project="after-them")])
    _, headers = stack.dlq.wait(lambda r: str(template.event_id).encode() in r[0] or b"user '*'" in r[0])
    assert b"names every user (a policy template)" in headers["spendstream.dlq.reason"]
    _, headers = stack.dlq.wait(lambda r: len(r[0]) > 800_000)
    assert b"feature is longer than 256 characters (900000)" in headers["spendstream.dlq.reason"]
    start = int(period_window("month", now(), "Europe/Berlin")[0].timestamp())
    deadline, totals = time.monotonic() + 30, {}
    while ("project:after-them", "month", start) not in totals and time.monotonic() < deadline:
        totals = read_window_totals({"bootstrap.servers": stack.bootstrap}, "spendstream-processor")
    assert totals[("project:after-them", "month", start)][1] == 1  # counted: the processor kept running
    assert not any(key[0] in ("user:*", "feature:" + "f" * 900_000) for key in totals)


def test_unknown_model_is_rejected_to_the_dlq_and_known_models_are_priced(stack: Stack) -> None:
    unknown = event(team="omega", project="pricing", model_requested="no-such-model-x")
    known = event(team="omega", project="pricing", model_requested="gpt-4o-mini", input_tokens=1_000_000)
    produce(stack.bootstrap, [unknown, known])
    _, headers = stack.dlq.wait(lambda r: b"no-such-model-x" in r[0])
    assert b"unknown model" in headers["spendstream.dlq.reason"]
    start = int(period_window("month", now(), "Europe/Berlin")[0].timestamp())
    key = ("project:pricing", "month", start)
    deadline = time.monotonic() + 30
    totals: dict = {}
    while key not in totals and time.monotonic() < deadline:
        totals = read_window_totals({"bootstrap.servers": stack.bootstrap}, "spendstream-processor")
    nanos, requests, _ = totals[("project:pricing", "month", start)]
    assert requests == 1 and nanos > 0  # gpt-4o-mini, 1M input tokens, from genai-prices


def test_daily_spike_three_times_the_trailing_average(stack: Stack) -> None:
    for days_ago in (3, 2, 1):
        spend(stack, "omega", 1, 1, at=local_noon_days_ago(days_ago), project="spiky")
    spend(stack, "omega", 4, 1, project="spiky")  # $4 today > 3 x $1
    alert = stack.alerts.wait(lambda a: a["scope"] == "project:spiky" and a["kind"] == "spike")
    assert "daily3x" in alert["message"]
    stack.decision("project:spiky", "alert")


def test_hourly_runaway_against_the_ewma(stack: Stack) -> None:
    for hours_ago in (4, 3, 2, 1):
        spend(stack, "omega", 1, 1, at=now() - timedelta(hours=hours_ago), customer="runaway")
    spend(stack, "omega", 5, 1, customer="runaway")  # $5 this hour > 4 x $1
    alert = stack.alerts.wait(lambda a: a["scope"] == "customer:runaway" and a["kind"] == "spike")
    assert "runaway" in alert["message"]


def test_forecast_alert_before_the_threshold(stack: Stack) -> None:
    start, _ = period_window("month", now(), "Europe/Berlin")
    at = start + timedelta(days=2, hours=1)
    if at > now() - timedelta(minutes=5):  # early in the month: use the previous one
        start, _ = period_window("month", start - timedelta(seconds=1), "Europe/Berlin")
        at = start + timedelta(days=2, hours=1)
    spend(stack, "delta", 1000, 1, at=at)  # $1,000 after two days: on course for ~$15,000 of $3,000
    alert = stack.alerts.wait(lambda a: a["scope"] == "team:delta" and a["kind"] == "forecast")
    assert alert["limit_nanos"] == 3000 * USD
    assert not [a for a in stack.alerts.poll() if a["scope"] == "team:delta" and a["kind"] == "threshold"]


def test_bad_policy_file_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbudgets:\n  - scope: team:a\n    period: fortnight\n    amount_usd: 5\n")
    out = subprocess.run(
        [sys.executable, "-m", "spendstream.cli", "policy", "validate", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert "budgets.0.period" in out.stderr and "bad.yaml:4" in out.stderr


def test_policy_apply_of_another_name_is_confirmed_by_the_worker_and_shown(stack: Stack, tmp_path: Path) -> None:
    env = {**os.environ, "SPENDSTREAM_KAFKA_BOOTSTRAP": stack.bootstrap}
    env.pop("SPENDSTREAM_POLICY", None)
    policy_file = tmp_path / "other.yaml"
    policy_file.write_text(POLICY_YAML.replace("name: default", "name: other"))  # same budgets, another name
    version = parse_policy(policy_file.read_text()).version
    cli = [sys.executable, "-m", "spendstream.cli", "policy"]
    applied = subprocess.run([*cli, "apply", str(policy_file)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert (
        "in force: processor spendstream-processor@" in applied.stdout
        and f"confirmed version {version}" in applied.stdout
    )
    shown = subprocess.run([*cli, "show"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert shown.returncode == 0, shown.stderr
    assert f"policy other version {version}" in shown.stdout


def test_an_event_id_sent_again_at_a_later_offset_counts_once(stack: Stack) -> None:
    """Edges publish at least once: a send whose delivery timed out although it landed is sent again (same
    event_id, same key, a later offset), in the same stage-1 batch or a later one."""
    at = now()
    original = event(team="omega", user="twice", occurred_at=at, cost_nanos=3 * USD)
    other = event(team="omega", user="twice", occurred_at=at, cost_nanos=5 * USD)
    produce(stack.bootstrap, [original, original, other])
    day = ("user:twice", "day", int(period_window("day", at, "Europe/Berlin")[0].timestamp()))
    wait_totals(stack.bootstrap, {day: (8 * USD, 2, 30)}, "spendstream-processor")
    marker = event(team="omega", user="twice", occurred_at=at, cost_nanos=1)
    produce(stack.bootstrap, [original], arrival=now())  # the re-send, seconds later
    produce(stack.bootstrap, [marker])  # same key, so same partition: counted after the re-send was handled
    wait_totals(stack.bootstrap, {day: (8 * USD + 1, 3, 45)}, "spendstream-processor")


def test_changelog_reads_go_past_the_reported_end(broker: EmbeddedBroker) -> None:
    """The embedded broker reports the high watermark as the last record batch's base offset + 1; a restore or
    a totals read that stopped there would miss the rest of that batch (the newest values of its keys)."""
    topic = "spendstream-processor-partials-changelog"
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 50})
    for i in range(10):  # one record batch
        producer.produce(topic, json.dumps([i, 1, 1, i]).encode(), json.dumps(f"k{i}").encode(), partition=1)
    assert producer.flush(15) == 0
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"t-{uuid.uuid4()}"})
    try:
        _, reported = consumer.get_watermark_offsets(TopicPartition(topic, 1), timeout=10)
        assert reported < 10  # the broker's quirk
        assert [key for _, key, _ in read_to_end(consumer, topic, [1], 15.0)] == [f"k{i}" for i in range(10)]
        tail = [key for _, key, _ in read_to_end(consumer, topic, [1], 15.0, last_batch_only=True)]
        assert tail == [f"k{i}" for i in range(reported - 1, 10)]
    finally:
        consumer.close()


def test_metrics_count_consumed_events_dead_letters_and_decisions(stack: Stack) -> None:
    spend(stack, "gamma", 60, 2)  # $120 of $100: a shutoff
    stack.decision("team:gamma", "shutoff")
    produce(stack.bootstrap, [event(team="gamma", cost_nanos=1, input_tokens=1, cached_input_tokens=5)])
    stack.dlq.wait(lambda r: r[1].get("spendstream.dlq.reason", b"").startswith(b"cached_input_tokens"))

    def scrape() -> dict[str, float]:
        url = f"http://127.0.0.1:{stack.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return {m[0]: float(m[1]) for m in re.findall(r"^(spendstream_processor_\S+) (\S+)$", text, re.M)}

    deadline = time.monotonic() + 15
    while True:
        metrics = scrape()
        if metrics.get('spendstream_processor_dead_lettered_total{reason="invalid"}', 0) >= 1:
            break
        assert time.monotonic() < deadline, metrics
        time.sleep(0.2)
    assert metrics['spendstream_processor_consumed_total{stage="usage"}'] >= 3
    assert metrics['spendstream_processor_consumed_total{stage="scopes"}'] >= 1
    assert metrics['spendstream_processor_decisions_total{action="shutoff"}'] >= 1
    assert metrics['spendstream_processor_batch_duration_seconds_count{stage="usage"}'] >= 1


def test_budget_gauges_show_limit_spend_remaining_ratio_and_hours_to_exhaustion(stack: Stack) -> None:
    """Scraped from the worker's /metrics, as Prometheus reads them: per scope and period."""

    def budget(samples: list[tuple[str, dict[str, str], float]], name: str, period: str) -> float | None:
        found = [v for n, labels, v in samples if n == f"spendstream_budget_{name}"
                 and labels == {"scope": "team:gauge", "period": period}]  # fmt: skip
        return found[0] if found else None

    def scrape_until(spent_usd: float) -> list[tuple[str, dict[str, str], float]]:
        deadline = time.monotonic() + 45
        while True:
            url = f"http://127.0.0.1:{stack.metrics_port}/metrics"
            try:  # run alone, this test may scrape before the worker serves /metrics
                text = urllib.request.urlopen(url, timeout=5).read().decode()
            except OSError:
                text = ""
            samples = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]
            if budget(samples, "spent_usd", "month") == spent_usd:
                return samples
            assert time.monotonic() < deadline, [s for s in samples if s[0].startswith("spendstream_budget_")]
            time.sleep(0.2)

    spend(stack, "gauge", 10, 3)  # $30: of $200 this month, of $50 today
    scraped_at = now()
    samples = scrape_until(30.0)
    figures = {(name, period): budget(samples, name, period) for name in
               ("limit_usd", "spent_usd", "remaining_usd", "used_ratio") for period in ("month", "day")}  # fmt: skip
    assert figures == {
        ("limit_usd", "month"): 200.0, ("spent_usd", "month"): 30.0, ("remaining_usd", "month"): 170.0,
        ("used_ratio", "month"): 0.15, ("limit_usd", "day"): 50.0, ("spent_usd", "day"): 30.0,
        ("remaining_usd", "day"): 20.0, ("used_ratio", "day"): 0.6,
    }  # fmt: skip
    # At the month's average rate so far ($30 over the time since the month began in Berlin), $170 more takes
    # 170/30 of that time; the day's $20 more takes 20/30 of the time since the day began.
    for period, more in (("month", 170 / 30), ("day", 20 / 30)):
        start, _ = period_window(period, scraped_at, "Europe/Berlin")
        elapsed_h = (scraped_at - start).total_seconds() / 3600
        hours = budget(samples, "hours_to_exhaustion", period)
        assert hours is not None and abs(hours - elapsed_h * more) < 60 * more / 3600 + 0.001, (period, hours)
    assert budget(samples, "limit_usd", "week") is None, "no budget, no series"
    assert not [s for s in samples if s[0] == "spendstream_budget_limit_usd" and s[1]["scope"] == "org:acme"]

    spend(stack, "gauge", 10, 2)  # $50: the day's budget is spent
    samples = scrape_until(50.0)
    assert budget(samples, "remaining_usd", "day") == 0.0 and budget(samples, "used_ratio", "day") == 1.0
    assert budget(samples, "hours_to_exhaustion", "day") == 0.0
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5).read().decode()
    [hours_help] = [f.documentation for f in text_string_to_metric_families(text)
                    if f.name == "spendstream_budget_hours_to_exhaustion"]  # fmt: skip
    assert "not within a century" in hours_help, "a small spend's +Inf is explained, not read as no spend"
    assert budget(samples, "remaining_usd", "month") == 150.0


def test_a_budget_applied_after_the_spend_starts_from_the_month_so_far(stack: Stack) -> None:
    """Stage 2 hears only of the windows some rule reads (``watched_windows``), so no rule read this feature's month
    while it spent $60; a policy that then budgets it at $50 shuts it off at once, from the $60 stage 1 kept."""
    at = now()
    spend(stack, "late", 30, 2, at, feature="afterthought", user="u-afterthought")
    month = ("feature:afterthought", "month", int(period_window("month", at, "Europe/Berlin")[0].timestamp()))
    wait_totals(stack.bootstrap, {month: (60 * USD, 2, 30)}, "spendstream-processor", workers=[stack.worker])
    assert stack.latest_decision("feature:afterthought") is None
    budgeted = POLICY_YAML.replace(
        "quotas:", '  - {scope: "feature:afterthought", period: month, amount_usd: 50}\nquotas:'
    )
    publish_policy(stack.bootstrap, "default", parse_policy(budgeted).to_json())
    shutoff = stack.decision("feature:afterthought", "shutoff", policy_version=parse_policy(budgeted).version)
    assert (shutoff["spend_nanos"], shutoff["limit_nanos"]) == (60 * USD, 50 * USD)

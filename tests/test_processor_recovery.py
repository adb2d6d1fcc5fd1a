"""The processor after restarts and against hostile input: topics ready before the worker, costs bounded to Int64,
windows rebuilt from the ledger when their state is gone, one version of an event_id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from spendstream.api.tokens import add_token
from spendstream.core.config import load_settings
from spendstream.core.ledger_store import connect
from spendstream.core.periods import period_window
from spendstream.core.policy import parse_policy
from spendstream.core.topics import USAGE_DLQ
from spendstream.edge.enforcer import Enforcer
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from spendstream.runtime.topic_admin import create_topics
from test_dev_stack import _wait_for_line
from test_faults import sink_lag
from test_processor import ROOT, USD, TopicReader, event, now, produce, start_worker, stop_worker, wait_totals
from test_processor_faults import POLICY_YAML as FAULTS_POLICY
from test_processor_faults import exact_totals, make_stream

POLICY_YAML = """
name: default
timezone: UTC
org: acme
divisions: {eng: [ovf]}
budgets:
  - {scope: "team:ovf", period: month, amount_usd: 100}
"""


def test_internal_topics_exist_with_every_partition_when_the_processor_announces_itself(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
    env = {
        **os.environ,
        "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap,
        "SPENDSTREAM_DATA_DIR": str(tmp_path / "data"),
        "SPENDSTREAM_USAGE_PARTITIONS": "6",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "processor", "--app-id", "topics-first"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        assert "processor topics-first: policy" in line, line
        topics = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics
        for name in (
            "spendstream.processor.partials",
            "topics-first-partials-changelog",
            "topics-first-windows-changelog",
            "topics-first-scopes-changelog",
        ):
            assert name in topics and len(topics[name].partitions) == 6, name
    finally:
        worker.terminate()
        worker.wait(30)


def test_an_event_whose_cost_overflows_int64_goes_to_the_dlq_and_the_rest_counts(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY_YAML)
    worker = start_worker(broker.bootstrap, tmp_path / "worker", policy)
    dlq = TopicReader(broker.bootstrap, USAGE_DLQ, None)
    try:
        # A producer in another language writes what UsageEvent's bounds would refuse: the processor's own guard.
        poison = event(org="acme", team="ovf", provider="acme-internal", model_requested="unknown-x").model_copy(
            update={"input_tokens": 10_000_000_000_000_000, "output_tokens": 0}
        )
        fine = event(org="acme", team="ovf", cost_nanos=7 * USD)
        produce(broker.bootstrap, [poison, fine])
        _, headers = dlq.wait(lambda r: str(poison.event_id).encode() in r[0], timeout=90)
        assert headers["spendstream.dlq.reason"].startswith(b"cost overflow")
        start = int(period_window("month", now(), "UTC")[0].timestamp())
        wait_totals(broker.bootstrap, {("team:ovf", "month", start): (7 * USD, 1, 15)}, "spendstream-processor")
        assert worker.poll() is None
    finally:
        dlq.close()
        stop_worker(worker)


RESTART_POLICY = """
name: default
timezone: UTC
org: acme
divisions: {{eng: [restart]}}
thresholds: {{alert: 0.80, fallback: 0.90, shutoff: 1.00}}
fallback_models: {{gpt-4o: gpt-4o-mini}}
budgets:
  - {{scope: "team:restart", period: day, amount_usd: {amount}}}
"""


def _dev_env(data_dir: Path) -> tuple[dict[str, str], str, int]:
    """The environment of a `dev` stack of its own (data directory, broker, ports), its bootstrap and API port."""
    bootstrap, api_port = f"127.0.0.1:{free_port()}", free_port()
    env = {
        **os.environ,
        "SPENDSTREAM_DATA_DIR": str(data_dir),
        "SPENDSTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "SPENDSTREAM_GATEWAY_PORT": str(free_port()),
        "SPENDSTREAM_API_PORT": str(api_port),
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("SPENDSTREAM_GATEWAY_CONFIG", "SPENDSTREAM_POLICY", "SPENDSTREAM_CLICKHOUSE_DSN"):
        env.pop(name, None)
    return env, bootstrap, api_port


def _dev(env: dict[str, str], policy: Path) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "dev", "--policy", str(policy)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    seen: list[str] = []
    _wait_for_line(proc, "ready; Ctrl-C stops everything", 120, seen)
    return proc, seen


def _stop_dev(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _ingest_token(env: dict[str, str]) -> str:
    """An ingest token in the stack's tokens file, as `spendstream api token create --role ingest` makes one."""
    path = load_settings(data_dir=Path(env["SPENDSTREAM_DATA_DIR"])).api_tokens_path
    return add_token(path, "ingest", "recovery-test", replace=True)


def _post_usage(api_port: int, token: str, usd: float, event_id: str | None = None) -> None:
    body = {
        "event_id": event_id or str(uuid.uuid4()),
        "org": "acme",
        "team": "restart",
        "provider": "openai",
        "model_requested": "gpt-4o",
        "input_tokens": 10,
        "output_tokens": 5,
        "cost_nanos": int(usd * USD),
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{api_port}/v1/usage",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202


def _wait_action(bootstrap: str, action: str, timeout: float = 90.0) -> None:
    with Enforcer(bootstrap) as enforcer:
        deadline = time.monotonic() + timeout
        verdict = None
        while time.monotonic() < deadline:
            verdict = enforcer.check(team="restart", model="gpt-4o")
            if verdict.action == action:
                return
            time.sleep(0.2)
    raise AssertionError(f"team:restart is {verdict} after {timeout}s, expected {action}")


@pytest.mark.slow
def test_a_dev_restart_keeps_the_budget_spent_and_the_applied_policy(tmp_path: Path) -> None:
    """$9.50 of a $10 daily budget (applied over the $1000 of the startup file): fallback; the whole stack stops and
    starts again on the same data directory: still fallback; the next $1 shuts the team off."""
    startup, applied = tmp_path / "startup.yaml", tmp_path / "applied.yaml"
    startup.write_text(RESTART_POLICY.format(amount=1000))
    applied.write_text(RESTART_POLICY.format(amount=10))
    env, bootstrap, api_port = _dev_env(tmp_path / "data")
    token = _ingest_token(env)
    proc, _ = _dev(env, startup)
    try:
        subprocess.run(
            [sys.executable, "-m", "spendstream.cli", "policy", "apply", "--wait", "30", str(applied)],
            env=env, cwd=ROOT, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for _ in range(19):
            _post_usage(api_port, token, 0.50)
        _wait_action(bootstrap, "fallback")
    finally:
        _stop_dev(proc)

    proc, seen = _dev(env, startup)
    try:
        assert any("restored (the last applied)" in line for line in seen), "".join(seen)
        assert any(f"{startup} (version " in line and "not applied" in line for line in seen), "".join(seen)
        _wait_action(bootstrap, "fallback")
        _post_usage(api_port, token, 1.00)
        _wait_action(bootstrap, "shutoff")
    finally:
        _stop_dev(proc)


def test_an_event_id_sent_again_with_other_content_keeps_the_first_version_in_ledger_and_windows(
    tmp_path: Path,
) -> None:
    """$3,700 then the same event_id with $0: the ledger and the windows both keep $3,700; the copy is a dead letter."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(RESTART_POLICY.format(amount=1_000_000))
    data_dir = tmp_path / "data"
    env, bootstrap, api_port = _dev_env(data_dir)
    event_id = str(uuid.uuid4())
    token = _ingest_token(env)
    proc, _ = _dev(env, policy)
    try:
        dlq = TopicReader(bootstrap, USAGE_DLQ, None)
        _post_usage(api_port, token, 3_700, event_id=event_id)
        _post_usage(api_port, token, 0, event_id=event_id)
        _, headers = dlq.wait(lambda r: event_id.encode() in r[0], timeout=90)
        dlq.close()
        assert headers["spendstream.dlq.reason"].startswith(b"conflicting_duplicate")
        start = int(period_window("day", now(), "UTC")[0].timestamp())
        wait_totals(bootstrap, {("team:restart", "day", start): (3_700 * USD, 1, 15)}, "spendstream-processor")
    finally:
        _stop_dev(proc)
    client = connect(load_settings(data_dir=data_dir))
    try:
        rows = client.query(
            "SELECT count(), sum(cost_nanos) FROM spendstream.usage_ledger FINAL WHERE event_id = {e:UUID}",
            parameters={"e": event_id},
        ).result_rows
    finally:
        client.close()
    assert rows == [(1, 3_700 * USD)]


@pytest.mark.slow
def test_a_processor_with_a_new_app_id_rebuilds_its_windows_from_the_ledger(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    """Events in the ledger AND still on the topic, then new events and re-sent copies: each counted once."""
    create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(FAULTS_POLICY)
    data_dir, api_port = tmp_path / "data", free_port()
    env = {
        **os.environ,
        "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap,
        "SPENDSTREAM_DATA_DIR": str(data_dir),
        "SPENDSTREAM_USAGE_PARTITIONS": "6",
        "SPENDSTREAM_API_PORT": str(api_port),
        "SPENDSTREAM_POLICY": str(policy_path),
    }
    env.pop("SPENDSTREAM_CLICKHOUSE_DSN", None)
    data_dir.mkdir()
    sink = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "sink", "--with-api"],
        env=env,
        cwd=ROOT,
        stdout=(data_dir / "sink.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    worker = None
    try:
        before = make_stream(3_000, seed=21)
        produce(broker.bootstrap, before)
        deadline = time.monotonic() + 90
        while sink_lag(broker.bootstrap, "spendstream-sink") and time.monotonic() < deadline:
            time.sleep(0.5)
        worker = subprocess.Popen(
            [sys.executable, "-m", "spendstream.cli", "processor", "--app-id", "brand-new"],
            env=env,
            cwd=ROOT,
            stdout=(data_dir / "worker.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        after = make_stream(500, seed=22)
        produce(broker.bootstrap, [*after, *before[:50]], arrival=datetime.now(UTC))  # 50 copies re-sent
        expected = exact_totals(before + after, parse_policy(FAULTS_POLICY))
        wait_totals(broker.bootstrap, expected, "brand-new", timeout=120)
        assert "rebuilt from the ledger" in (data_dir / "worker.log").read_text(errors="replace")
    finally:
        if worker is not None:
            stop_worker(worker)
        sink.send_signal(signal.SIGINT)
        sink.wait(60)


@pytest.mark.slow
def test_a_policy_in_another_timezone_restarts_the_processor_which_rebuilds_its_windows(tmp_path: Path) -> None:
    """An attacker session: spend under an Asia/Kolkata policy, then a UTC policy budgeting it: the windows were
    keyed by Kolkata's day and month starts, the new budget read $0 of them and every request passed. The worker
    exits instead, `dev` starts it again, it rebuilds its windows from the ledger in UTC, and `policy apply` says
    the policy is in force."""
    kolkata, utc = tmp_path / "kolkata.yaml", tmp_path / "utc.yaml"
    kolkata.write_text(RESTART_POLICY.format(amount=1000).replace("timezone: UTC", "timezone: Asia/Kolkata"))
    utc.write_text(RESTART_POLICY.format(amount=1))
    env, bootstrap, api_port = _dev_env(tmp_path / "data")
    token = _ingest_token(env)
    proc, _ = _dev(env, kolkata)
    try:
        for _ in range(4):
            _post_usage(api_port, token, 1.25)  # $5 today
        _wait_action(bootstrap, "allow")
        time.sleep(3)  # into the ledger
        applied = subprocess.run(
            [sys.executable, "-m", "spendstream.cli", "policy", "apply", "--wait", "60", str(utc)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert applied.returncode == 0, applied.stdout + applied.stderr
        _wait_action(bootstrap, "shutoff")  # $5 of $1 today, in UTC
    finally:
        _stop_dev(proc)
    log = (tmp_path / "data" / "processor.log").read_text()
    assert "restarts to rebuild its windows from the ledger in UTC" in log and "rebuilding them from the ledger" in log

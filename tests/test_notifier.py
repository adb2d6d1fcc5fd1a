"""The notifier against a real broker, a real chDB ledger and real local receivers (aiohttp, aiosmtpd): payloads
and signatures, retries with one accepted delivery per notification, dead letters, a hanging receiver that
delays no other channel, scheduled reports with their CSV that a restart never sends twice, and the delivery
state through the API, the dashboard and ``spendstream notifications list``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from confluent_kafka import Producer
from pydantic import SecretStr

from notify_receivers import HttpReceiver, MailReceiver, free_port, wait_for
from spendstream.analytics.budgets import load_budgets
from spendstream.core import topics
from spendstream.core.codec import AvroCodec
from spendstream.core.config import Settings
from spendstream.core.events import Action, Alert, AlertKind, Decision, Heartbeat, Severity
from spendstream.core.ledger_store import connect, migrate
from spendstream.core.policy import Policy, parse_policy
from spendstream.notifier.service import Notifier

ROOT = Path(__file__).resolve().parents[1]
B = 1_000_000_000
SECRET = "whsec-test-0123456789"
SLACK_PATH = "/services/T000/B000/sl4ck-t0ken-secret"


REPORT_SCHEDULES = """\
  reports:
    - {report: weekly, weekday: monday, at: "08:00", to: [cfo]}
    - {report: chargeback, day_of_month: 1, at: "08:00", to: [cfo]}
"""


def policy_yaml(http: HttpReceiver, mail: MailReceiver, extra: str = "", retry: str = "", reports: bool = False) -> str:
    """The test policy; report schedules only on request, since tests on the wall clock would otherwise receive a
    real weekly report every Monday morning and a chargeback on the first of each month."""
    return f"""\
name: notify
org: acme
timezone: Europe/Berlin
divisions: {{go_to_market: [marketing, sales]}}
budgets:
  - {{scope: "team:marketing", period: month, amount_usd: 8000}}
  - {{scope: "team:sales", period: month, amount_usd: 6000}}
notifications:
  dashboard_url: http://dashboard.example/
  smtp: {{host: 127.0.0.1, port: {mail.port}, starttls: false, sender: spendstream@acme.example}}
  channels:
    hook: {{kind: webhook, url: "{http.url("/hook")}", secret_env: TEST_HOOK_SECRET}}
    slack: {{kind: slack, url_env: TEST_SLACK_URL}}
    mail: {{kind: email, to: [lead@acme.example]}}
    cfo-mail: {{kind: email, to: [cfo@acme.example]}}
{extra}
  people:
    lead: [hook, slack, mail]
    cfo: [cfo-mail]
  scopes:
    "team:marketing": {{owners: [lead]}}
  retry: {retry or "{max_attempts: 3, first_backoff_s: 0.05, max_backoff_s: 0.2, timeout_s: 30}"}
{REPORT_SCHEDULES if reports else ""}"""


class Running:
    """A Notifier on a thread with its own chDB client; ``stop()`` joins it."""

    def __init__(self, settings: Settings, policy: Policy, env: dict[str, str], **kwargs: Any) -> None:
        self.client = connect(settings)
        migrate(self.client, settings)
        self.notifier = Notifier(settings, self.client, policy=policy, env=env, **kwargs)
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self.notifier.run, args=(self.halt,), daemon=True)
        self.thread.start()
        wait_for(self.notifier.ready.is_set, what="the notifier's consumer group")

    def rows(self) -> list[dict[str, Any]]:
        return self.notifier.store.listing(100)

    def row(self, channel: str, source: str | None = None) -> dict[str, Any] | None:
        found = [
            r for r in self.client.query(
                "SELECT channel, status, attempts, last_error, source_id, notification_id "
                "FROM spendstream.notifications FINAL WHERE channel = {c:String}", parameters={"c": channel}
            ).result_rows if source is None or r[4] == source
        ]  # fmt: skip
        keys = ("channel", "status", "attempts", "last_error", "source_id", "notification_id")
        return dict(zip(keys, found[0], strict=True)) if found else None

    def stop(self, close: bool = True) -> None:
        self.halt.set()
        self.thread.join(30)
        if close:
            self.client.close()


@pytest.fixture
def receivers() -> Iterator[tuple[HttpReceiver, MailReceiver]]:
    with HttpReceiver() as http, MailReceiver() as mail:
        yield http, mail


def env_for(http: HttpReceiver) -> dict[str, str]:
    return {"TEST_HOOK_SECRET": SECRET, "TEST_SLACK_URL": http.url(SLACK_PATH)}


def publish(settings: Settings, *records: Alert | Decision) -> None:
    producer = Producer(settings.kafka_client_config())
    for record in records:
        if isinstance(record, Alert):
            producer.produce(topics.ALERTS, AvroCodec("alert").encode(record.to_avro()), key=record.scope)
        else:
            producer.produce(topics.ENFORCEMENT, AvroCodec("decision").encode(record.to_avro()), key=record.scope)
    assert producer.flush(10) == 0


def marketing_alert(**fields: Any) -> Alert:
    base: dict[str, Any] = {
        "scope": "team:marketing",
        "kind": AlertKind.threshold,
        "severity": Severity.warning,
        "message": "alert: team:marketing spent 80% of its month budget",
        "spend_nanos": 6_400 * B + 7,
        "limit_nanos": 8_000 * B,
        "period": "month",
    }
    return Alert(**{**base, **fields})


def test_webhook_slack_and_email_payloads_signature_and_delivery_state(
    settings: Settings, receivers: tuple[HttpReceiver, MailReceiver], tmp_path: Path
) -> None:
    http, mail = receivers
    hook, slack = http.endpoint("/hook"), http.endpoint(SLACK_PATH)
    policy = parse_policy(policy_yaml(http, mail), "notify.yaml")
    running = Running(settings, policy, env_for(http))
    try:
        decision = Decision(scope="team:marketing", action=Action.alert, version=1, reason="80% of budget")
        alert = marketing_alert()
        publish(settings, decision, alert)
        wait_for(lambda: hook.accepted and slack.accepted and mail.to("lead@acme.example"), what="three deliveries")
        wait_for(lambda: len([r for r in running.rows() if r["status"] == "sent"]) == 3, what="three sent rows")
        rows = {r["channel"]: r for r in running.rows()}
    finally:
        running.stop()

    (request,) = hook.accepted
    body = request.body
    expected = hmac.new(SECRET.encode(), request.headers["X-Spendstream-Timestamp"].encode() + b"." + body,
                        hashlib.sha256).hexdigest()  # fmt: skip
    assert request.headers["X-Spendstream-Signature"] == f"v1={expected}"
    doc = json.loads(body)
    assert request.headers["Idempotency-Key"] == doc["notification_id"]
    assert doc["source_id"] == f"alert:{alert.alert_id}" and doc["kind"] == "threshold"
    assert (doc["spend_nanos"], doc["spend_usd"], doc["limit_usd"]) == (
        6_400 * B + 7,
        "6400.000000007",
        "8000.000000000",
    )
    assert doc["edges"] == "requests pass unchanged (alert only)"
    assert "spendstream budget request team:" in doc["act"] and "http://dashboard.example/" in doc["act"]
    assert "Spend: $6,400.000000007 of a $8,000.00 limit (80.0%)" in doc["text"]

    (posted,) = slack.accepted
    message = json.loads(posted.body)
    assert set(message) == {"text", "blocks"} and "team:marketing" in message["text"]
    assert SECRET not in message["text"] and "sl4ck" not in message["text"]

    (email,) = mail.to("lead@acme.example")
    assert email["Message-ID"] == f"<{rows['mail']['notification_id']}@spendstream>"
    assert "budget threshold: team:marketing" in email["Subject"]
    assert "$6,400.000000007" in email.get_content()
    assert {(r["status"], r["attempts"], r["audience"][0]) for r in rows.values()} == {("sent", 1, "lead")}

    # the delivery state as a user reads it: the CLI (opening the ledger), the API and the dashboard
    env = {**os.environ, "SPENDSTREAM_DATA_DIR": str(settings.data_dir), "PYTHONPATH": str(ROOT / "services")}
    listed = subprocess.run([sys.executable, "-m", "spendstream.cli", "notifications", "list", "--format", "json"],
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert sorted(n["channel"] for n in json.loads(listed.stdout)["notifications"]) == ["hook", "mail", "slack"]
    table = subprocess.run([sys.executable, "-m", "spendstream.cli", "notifications", "list", "--status", "dead"],
                           env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert table.returncode == 2 and "invalid choice" in table.stderr
    api_json, page = asyncio.run(_api_reads(settings))
    assert [n["status"] for n in api_json["notifications"]] == ["sent"] * 3
    assert "<h2>Notifications</h2>" in page and "lead@acme.example" not in page and ">hook<" in page


async def _api_reads(settings: Settings) -> tuple[dict[str, Any], str]:
    from spendstream.api.app import create_app

    port = free_port()
    configured = settings.model_copy(update={"admin_token": SecretStr("adm1n-token"), "api_port": port})
    client = connect(configured)
    runner = web.AppRunner(create_app(configured, ledger_client=client))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        headers = {"Authorization": "Bearer adm1n-token"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(f"http://127.0.0.1:{port}/v1/notifications?limit=10") as response:
                assert response.status == 200
                listing = await response.json()
            async with session.get(f"http://127.0.0.1:{port}/v1/notifications?status=nope") as response:
                assert response.status == 400
            async with session.get(f"http://127.0.0.1:{port}/") as response:
                page = await response.text()
        return listing, page
    finally:
        await runner.cleanup()
        client.close()


def test_retries_until_the_receiver_recovers_then_exactly_one_delivery_and_dead_letters_after_n(
    settings: Settings, receivers: tuple[HttpReceiver, MailReceiver]
) -> None:
    http, mail = receivers
    flaky = http.endpoint("/hook", fail_first=2)
    http.endpoint(SLACK_PATH, fail_always=True)
    policy = parse_policy(policy_yaml(http, mail), "notify.yaml")
    env = env_for(http)
    running = Running(settings, policy, env)
    alert = marketing_alert()
    try:
        publish(settings, alert, alert)  # the same alert delivered twice by the broker: one notification
        wait_for(lambda: (running.row("hook") or {}).get("status") == "sent", what="the webhook delivered")
        wait_for(lambda: (running.row("slack") or {}).get("status") == "dead_letter", what="a dead letter")
        wait_for(lambda: mail.to("lead@acme.example"), what="the e-mail")
        hook_row, slack_row = running.row("hook"), running.row("slack")
    finally:
        running.stop()
    assert len(flaky.requests) == 3 and len(flaky.accepted) == 1
    assert len({r.headers["Idempotency-Key"] for r in flaky.requests}) == 1  # one key on every attempt
    assert len(mail.to("lead@acme.example")) == 1
    assert hook_row is not None and slack_row is not None
    assert (hook_row["status"], hook_row["attempts"], hook_row["last_error"]) == ("sent", 3, "")
    assert (slack_row["status"], slack_row["attempts"]) == ("dead_letter", 3)
    assert slack_row["last_error"] == "HTTP 500: receiver unavailable"

    # a restart with the same consumer group and ledger sends nothing again: a new alert after the restart is the
    # next thing each receiver gets (a channel's queue is first in, first out; resumed rows would come first)
    again = Running(settings, policy, env)
    try:
        publish(settings, marketing_alert(message="alert: after the restart"))
        wait_for(lambda: len(flaky.accepted) == 2 and len(mail.to("lead@acme.example")) == 2, what="the new alert")
    finally:
        again.stop()
    assert json.loads(flaky.accepted[1].body)["happened"] == "alert: after the restart"
    assert len(flaky.requests) == 4


def test_secrets_never_reach_the_ledger_or_logs(
    settings: Settings, receivers: tuple[HttpReceiver, MailReceiver], caplog: pytest.LogCaptureFixture
) -> None:
    http, mail = receivers
    closed = f"http://127.0.0.1:{free_port()}/services/T1/B2/unreachable-t0ken"
    policy = parse_policy(policy_yaml(http, mail), "notify.yaml")
    env = {"TEST_HOOK_SECRET": SECRET, "TEST_SLACK_URL": closed}
    running = Running(settings, policy, env)
    http.endpoint("/hook")
    try:
        publish(settings, marketing_alert())
        wait_for(lambda: (running.row("slack") or {}).get("status") == "dead_letter", what="a dead letter")
        dump = running.client.query("SELECT * FROM spendstream.notifications").result_rows
    finally:
        running.stop()
    text = repr(dump) + caplog.text
    assert "unreachable-t0ken" not in text and SECRET not in text
    slack_row = [r for r in dump if "slack" in r]
    assert slack_row and "connection failed" in repr(slack_row)


def test_a_hanging_receiver_delays_no_other_channel(
    settings: Settings, receivers: tuple[HttpReceiver, MailReceiver]
) -> None:
    http, mail = receivers
    slow = http.endpoint("/hook", hang=True)
    fast = http.endpoint(SLACK_PATH)
    policy = parse_policy(policy_yaml(http, mail), "notify.yaml")
    running = Running(settings, policy, env_for(http))
    first, second = marketing_alert(message="alert: first"), marketing_alert(message="alert: second")
    try:
        publish(settings, first)
        wait_for(lambda: slow.requests, what="the hanging receiver to hold the first notification")
        publish(settings, second)
        # both notifications reach Slack and e-mail while the webhook still holds the first
        wait_for(lambda: len(fast.accepted) == 2 and len(mail.to("lead@acme.example")) == 2, what="other channels")
        assert len(slow.requests) == 1 and not slow.accepted
        hook_rows = [r for r in running.rows() if r["channel"] == "hook"]
        assert sorted((r["status"], r["attempts"]) for r in hook_rows) == [("pending", 0), ("pending", 0)]
        slow.release.set()
        wait_for(lambda: len(slow.accepted) == 2, what="the webhook after it recovers")
    finally:
        slow.release.set()
        running.stop()
    assert ["alert: first" in json.loads(r.body)["text"] for r in fast.accepted] == [True, False]
    assert [json.loads(r.body)["happened"] for r in slow.accepted] == ["alert: first", "alert: second"]


def test_scheduled_reports_arrive_once_with_their_csv_across_restarts(
    settings: Settings, receivers: tuple[HttpReceiver, MailReceiver]
) -> None:
    http, mail = receivers
    policy = parse_policy(policy_yaml(http, mail, reports=True), "notify.yaml")
    client = connect(settings)
    migrate(client, settings)
    columns = ["event_id", "occurred_at", "org", "team", "feature", "provider", "model_requested", "cost_nanos"]
    rows = [  # Monday 2026-03-02 .. Sunday 03-08 is the week reported on Monday 03-09
        [uuid.uuid4(), datetime(2026, 3, 3, 10, tzinfo=UTC), "acme", "marketing", "ai_chatbot", "openai", "gpt-4o",
         120 * B + 5],
        [uuid.uuid4(), datetime(2026, 3, 5, 10, tzinfo=UTC), "acme", "sales", "ai_lead_scorer", "openai",
         "gpt-4o-mini", 30 * B],
        [uuid.uuid4(), datetime(2026, 2, 10, 10, tzinfo=UTC), "acme", "marketing", "ai_chatbot", "openai", "gpt-4o",
         700 * B],
    ]  # fmt: skip
    client.insert("spendstream.usage_ledger", rows, column_names=columns)
    for month in (date(2026, 2, 1), date(2026, 3, 1)):
        load_budgets(
            client, "spendstream", [("team:marketing", "month", 8_000 * B), ("team:sales", "month", 6_000 * B)], month
        )
    client.close()

    # Monday 2026-03-09 08:00 Berlin is 07:00 UTC; the chargeback of February was due 2026-03-01 08:00 (too old)
    monday = datetime(2026, 3, 9, 7, 0, 30, tzinfo=UTC)
    running = Running(settings, policy, env_for(http), clock=lambda: monday)
    try:
        wait_for(lambda: (running.row("cfo-mail") or {}).get("status") == "sent", what="the weekly report")
    finally:
        running.stop()
    (weekly,) = mail.to("cfo@acme.example")
    assert "CFO weekly report, week of 2026-03-02" in weekly["Subject"]
    assert "Spend: $150.000000005" in weekly.get_body(("plain",)).get_content()
    # the week's share of the monthly budgets is an allocation: to the cent, not $3,161.290322575
    assert "Budget (pro rata): $3,161.29, used 4.7%" in weekly.get_body(("plain",)).get_content()
    # the command that prints it again, as a user can paste it (a user session ran `spendstream report`: usage error)
    assert "`spendstream report weekly --as-of 2026-03-02` prints it again" in weekly.get_body(("plain",)).get_content()
    (csv,) = list(weekly.iter_attachments())
    assert csv.get_filename() == "cfo-weekly-2026-03-02.csv" and csv.get_content_type() == "text/csv"
    lines = csv.get_content().splitlines()
    assert lines[0].startswith("week,spend_usd,previous_usd") and lines[1].startswith("2026-03-02,150.000000005,")

    # restarted (same ledger) at the same moment and later the same day: the report is not sent again; nor under a
    # policy in another timezone, due at another instant, for the week already reported (a user session)
    elsewhere = parse_policy(policy_yaml(http, mail, reports=True).replace("Europe/Berlin", "America/New_York"))
    assert elsewhere.timezone == "America/New_York"
    for later, in_force in ((monday, policy), (monday + timedelta(hours=3), policy), (monday, elsewhere)):
        again = Running(settings, in_force, env_for(http), clock=lambda at=later + timedelta(hours=6): at)
        try:
            assert again.notifier.due_reports() == []
        finally:
            again.stop()
    # the first of April: the chargeback of March, to the CFO, with its CSV
    april = datetime(2026, 4, 1, 6, 30, tzinfo=UTC)  # 08:30 in Berlin (summer time)
    running = Running(settings, policy, env_for(http), clock=lambda: april)
    try:
        wait_for(lambda: len(mail.to("cfo@acme.example")) == 2, what="the chargeback")
        assert running.notifier.due_reports() == []
    finally:
        running.stop()
    chargeback = mail.to("cfo@acme.example")[1]
    assert "Chargeback March 2026" in chargeback["Subject"]
    text = chargeback.get_body(("plain",)).get_content()
    assert "marketing: $120.000000005 of $8,000.00" in text and "sales: $30.00 of $6,000.00" in text
    (csv,) = list(chargeback.iter_attachments())
    assert (
        csv.get_filename() == "chargeback-2026-03.csv" and "marketing,8000.000000000,120.000000005" in csv.get_content()
    )


def test_reference_scenario_owner_alert_and_emergency_stop_escalation(
    settings: Settings, receivers: tuple[HttpReceiver, MailReceiver], tmp_path: Path
) -> None:
    """With the reference policy and a real processor: marketing crossing 80 % reaches its owner once; an
    emergency stop of a non-critical feature reaches the CFO and the VP Engineering at once."""
    _, mail = receivers
    reference = (ROOT / "infra/policy/default.yaml").read_text()
    assert "port: 1025" in reference
    schedules = reference[reference.index("  reports:\n") :]
    assert schedules.count("\n") == 3  # the schedules end the file
    policy_path = tmp_path / "policy.yaml"
    # without its report schedules: on the wall clock they mail the CFO on Monday mornings and on the 1st
    policy_path.write_text(reference.removesuffix(schedules).replace("port: 1025", f"port: {mail.port}"))
    env = {
        **os.environ,
        "SPENDSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SPENDSTREAM_DATA_DIR": str(tmp_path / "processor"),
        "SPENDSTREAM_POLICY": str(policy_path),
        "PYTHONPATH": str(ROOT / "services"),
    }
    log = (tmp_path / "processor.log").open("ab")
    processor = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "processor", "--allowed-lateness-s", "400000"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = connect(settings)
    migrate(client, settings)
    notifier = Notifier(settings, client, env={})  # follows the policy the processor seeds on spendstream.policy
    halt = threading.Event()
    thread = threading.Thread(target=notifier.run, args=(halt,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: notifier.policy is not None and notifier.ready.is_set(), what="the policy in force")
        now = datetime.now(UTC)
        events = [
            _usage(team="marketing", feature="", cost=3_200 * B, at=now),
            _usage(team="marketing", feature="", cost=3_200 * B, at=now),  # $6,400 of $8,000: 80 %
            *[_usage(team="engineering", feature="ai_code_review", cost=20 * B, at=now - timedelta(days=d))
              for d in (3, 2, 1)],
            _usage(team="engineering", feature="ai_code_review", cost=100 * B, at=now),  # 5x the daily average
        ]  # fmt: skip
        _produce_usage(settings, events)
        wait_for(lambda: _subjects(mail, "cfo@") and _subjects(mail, "vp-engineering@"), 120, "the emergency stop")
        wait_for(lambda: _subjects(mail, "marketing-lead@"), 60, "the marketing alert")

        def sent() -> list[tuple[str, str, str]]:
            query = "SELECT kind, scope, channel FROM spendstream.notifications FINAL WHERE status = 'sent'"
            return [tuple(row) for row in client.query(query).result_rows]

        # the notifier writes delivery states in batches, after the mail has left
        wait_for(lambda: ("threshold", "team:marketing", "marketing-mail") in sent(), 30, "the sent state")
        rows = sent()
    finally:
        halt.set()
        thread.join(30)
        client.close()
        processor.terminate()
        processor.wait(30)
        log.close()
    stop = "[spendstream] EMERGENCY STOP: feature:ai_code_review"
    assert stop in _subjects(mail, "cfo@") and stop in _subjects(mail, "vp-engineering@")
    (cfo_stop,) = [m for m in mail.to("cfo@acme.example") if m["Subject"] == stop]
    assert "Edges now: the feature's requests are refused" in cfo_stop.get_content()
    assert "budget" not in cfo_stop.get_content().partition("Act:")[2]  # more budget does not lift a spike stop
    marketing = [m for m in mail.to("marketing-lead@acme.example") if "budget threshold" in m["Subject"]]
    assert len(marketing) == 1 and "Spend: $6,400.00 of a $8,000.00 limit (80.0%)" in marketing[0].get_content()
    assert "`spendstream budget request team:marketing AMOUNT --until" in marketing[0].get_content()
    assert [(k, c) for k, s, c in rows if k == "threshold" and s == "team:marketing"] == [
        ("threshold", "marketing-mail")
    ]
    assert not any("team:marketing" in s for s in _subjects(mail, "cfo@"))


def _usage(team: str, feature: str, cost: int, at: datetime) -> Any:
    from spendstream.core.events import UsageEvent

    return UsageEvent(org="acme", team=team, feature=feature, provider="openai", model_requested="gpt-4o-mini",
                      input_tokens=10, output_tokens=5, cost_nanos=cost, occurred_at=at)  # fmt: skip


def _produce_usage(settings: Settings, events: list[Any]) -> None:
    codec = AvroCodec("usage_event")
    producer = Producer(settings.kafka_client_config())
    for event in events:
        producer.produce(topics.USAGE, codec.encode(event.to_avro()), key=f"{event.org}/{event.team}".encode(),
                         timestamp=int(event.occurred_at.timestamp() * 1000))  # fmt: skip
    assert producer.flush(10) == 0


def _subjects(mail: MailReceiver, prefix: str) -> list[str]:
    return [str(m["Subject"]) for m in mail.mails if str(m["To"]).startswith(prefix)]


def test_processor_silence_is_a_pipeline_unhealthy_notification_once(
    settings: Settings, receivers: tuple[HttpReceiver, MailReceiver]
) -> None:
    http, mail = receivers
    extra = "  kinds: {pipeline_unhealthy: {owners: false, escalate: [cfo]}}"
    text = policy_yaml(http, mail).replace("  retry:", extra + "\n  retry:")
    policy = parse_policy(text, "notify.yaml")
    last = datetime.now(UTC) - timedelta(minutes=5)
    beat = Heartbeat(worker="spendstream-processor@host", policy_version=policy.version, interval_s=1.0, issued_at=last)
    producer = Producer(settings.kafka_client_config())
    producer.produce(topics.ENFORCEMENT, AvroCodec("heartbeat").encode(beat.to_avro()), key=b"heartbeat:p@host")
    assert producer.flush(10) == 0
    running = Running(settings, policy, env_for(http))
    try:
        wait_for(lambda: mail.to("cfo@acme.example"), what="the pipeline alarm")
        assert running.notifier.pipeline_alarm() == []  # the same silence is reported once
    finally:
        running.stop()
    (alarm,) = mail.to("cfo@acme.example")
    assert alarm["Subject"] == "[spendstream] pipeline unhealthy: no processor heartbeat"
    assert "last from spendstream-processor@host" in alarm.get_content()


def test_notifier_refuses_to_start_without_a_secret_the_policy_names(tmp_path: Path) -> None:
    reference = (ROOT / "infra/policy/default.yaml").read_text()
    slack = "    marketing-slack: {kind: slack, url_env: SLACK_MARKETING_URL}\n"
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(reference.replace("  people:\n", slack + "  people:\n", 1))
    env = {k: v for k, v in os.environ.items() if k != "SLACK_MARKETING_URL"}
    env.update({"SPENDSTREAM_POLICY": str(policy_path), "SPENDSTREAM_DATA_DIR": str(tmp_path / "data"),
                "PYTHONPATH": str(ROOT / "services")})  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "spendstream.cli", "notifier"], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "notifications.channels.marketing-slack.url_env: environment variable SLACK_MARKETING_URL is not set" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr


def test_a_policy_adopted_while_running_that_names_an_unset_secret_is_logged_as_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At start such a policy is refused (above); one applied while the notifier runs is adopted, and said loudly."""
    from spendstream.core.config import load_settings
    from spendstream.core.policy import parse_policy

    reference = (ROOT / "infra/policy/default.yaml").read_text()
    slack = "    marketing-slack: {kind: slack, url_env: SLACK_MARKETING_URL}\n"
    policy = parse_policy(reference.replace("  people:\n", slack + "  people:\n", 1))
    notifier = Notifier(load_settings(data_dir=tmp_path), None, env={"OTHER": "x"})
    with caplog.at_level("ERROR", logger="spendstream.notifier.service"):
        notifier._adopt(policy)
    assert notifier.policy is policy
    [record] = [r for r in caplog.records if "SLACK_MARKETING_URL" in r.getMessage()]
    assert record.levelname == "ERROR" and "marketing-slack.url_env" in record.getMessage()


def test_a_deployment_with_keys_pages_nobody_with_a_forged_alert_nor_trusts_a_forged_heartbeat(
    settings: Settings, receivers: tuple[HttpReceiver, MailReceiver], tmp_path: Path
) -> None:
    """Alerts were not signed: a client that may write to the broker could page the owners with any text (a link to
    follow, say), and keep a forged heartbeat coming so that a dead processor raised no alarm."""
    from spendstream.core.record_signature import RecordSigner, write_key_pair

    http, mail = receivers
    hook, _ = http.endpoint("/hook"), http.endpoint(SLACK_PATH)
    signing, _ = write_key_pair(tmp_path / "keys")
    signer = RecordSigner.from_file(signing)
    keyed = settings.model_copy(update={"verify_key": tmp_path / "keys" / "verify-key.pem"})
    extra = "  kinds: {pipeline_unhealthy: {owners: false, escalate: [cfo]}}"
    policy = parse_policy(policy_yaml(http, mail).replace("  retry:", extra + "\n  retry:"), "notify.yaml")
    stale = Heartbeat(worker="p@host", policy_version=policy.version, interval_s=1.0,
                      issued_at=datetime.now(UTC) - timedelta(minutes=5))  # fmt: skip
    forged_beat = Heartbeat(worker="p@host", policy_version=policy.version, interval_s=1.0, issued_at=datetime.now(UTC))
    genuine, forged = marketing_alert(), marketing_alert(message="urgent: re-enter your API key at http://evil.example")
    producer = Producer(keyed.kafka_client_config())
    records = [
        (topics.ENFORCEMENT, b"heartbeat:p@host", AvroCodec("heartbeat").encode(stale.to_avro()), signer),
        (topics.ENFORCEMENT, b"heartbeat:p@host", AvroCodec("heartbeat").encode(forged_beat.to_avro()), None),
        (topics.ALERTS, b"team:marketing", AvroCodec("alert").encode(forged.to_avro()), None),
        (topics.ALERTS, b"team:marketing", AvroCodec("alert").encode(genuine.to_avro()), signer),
    ]
    for topic, key, value, signing_key in records:
        headers = signing_key.headers(topic, key, value) if signing_key else None
        producer.produce(topic, value, key=key, headers=headers)
    assert producer.flush(10) == 0
    running = Running(keyed, policy, env_for(http))
    try:
        wait_for(lambda: mail.to("cfo@acme.example"), what="the pipeline alarm despite the forged heartbeat")
        wait_for(lambda: hook.accepted and mail.to("lead@acme.example"), what="the genuine alert")
        assert running.notifier.counts["unsigned"] == 2
    finally:
        running.stop()
    assert all("evil.example" not in m.get_content() for m in mail.to("lead@acme.example"))
    assert [json.loads(r.body)["source_id"] for r in hook.accepted] == [f"alert:{genuine.alert_id}"]

"""The budget lifecycle as users meet it: the CLI against a running API, a real processor and broker.

One stack per module: a broker, a processor worker, and ``spendstream sink --with-api`` (ledger, audit sink, API).
Each scenario uses its own team or feature.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spendstream.core.topics import ENFORCEMENT
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics
from test_api_access import base_env, call, create_token
from test_processor import TopicReader, event, free_port, produce, start_worker, stop_worker

USD = 1_000_000_000
POLICY_YAML = """
name: lifecycle
org: acme
divisions: {growth: [marketing, sales, support, product]}
budgets:
  - {scope: "team:marketing", period: month, amount_usd: 100}
  - {scope: "team:sales", period: month, amount_usd: 60}
  - {scope: "team:support", period: month, amount_usd: 50}
  - {scope: "team:product", period: month, amount_usd: 40}
  - {scope: "team:finance", period: month, amount_usd: 1000}
  - {scope: "feature:ai_writer", period: month, amount_usd: 30}
approvals:
  feature_threshold_usd: 2000
  levels:
    - {name: manager, dimensions: [team, feature], max_usd: 20}
    - {name: director, dimensions: [division, team, feature], max_usd: 100}
    - {name: vp, max_usd: 5000}
"""


@dataclass
class Stack:
    bootstrap: str
    env: dict[str, str]
    port: int
    data_dir: Path
    decisions: TopicReader
    tokens: dict[str, str]

    def cli(self, who: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "SPENDSTREAM_API_TOKEN": self.tokens[who]} if who else self.env
        return subprocess.run(
            [sys.executable, "-m", "spendstream.cli", *args], env=env, capture_output=True, text=True, timeout=120
        )

    def ok(self, who: str, *args: str) -> str:
        done = self.cli(who, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def refused(self, who: str, *args: str) -> str:
        done = self.cli(who, *args)
        assert done.returncode == 1, done.stdout
        return done.stderr

    def latest(self, rid: str) -> str:
        listed = [line.split("\t") for line in self.ok("alice", "budget", "list").splitlines()]
        return next(columns[1] for columns in listed if columns[0] == rid)

    def decision(self, scope: str, action: str, after: int = 0, timeout: float = 45.0) -> dict[str, Any]:
        return self.decisions.wait(
            lambda d: d["scope"] == scope and d["action"] == action and d["version"] > after, timeout
        )

    def spend(self, team: str, usd: int, **fields: Any) -> None:
        produce(self.bootstrap, [event(team=team, org="acme", cost_nanos=usd * USD, **fields)])


def wait_for_api(process: subprocess.Popen[bytes], port: int, data_dir: Path, log: Path) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if call(port, "GET", "/healthz").status == 200 and (data_dir / "api.json").exists():
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.2)


LATER = (datetime.now(UTC) + timedelta(days=200)).date().isoformat()  # within the 366 days an increase may last


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("lifecycle")
    policy = root / "policy.yaml"
    policy.write_text(POLICY_YAML)
    with EmbeddedBroker(log_path=root / "broker.log") as broker:
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
        worker = start_worker(broker.bootstrap, root / "worker", policy)  # seeds the policy topic
        port, data_dir = free_port(), root / "ledger"
        env = base_env(data_dir, SPENDSTREAM_KAFKA_BOOTSTRAP=broker.bootstrap, SPENDSTREAM_API_PORT=str(port))
        log = root / "ledger.log"
        with log.open("wb") as out:
            ledger = subprocess.Popen(
                [sys.executable, "-m", "spendstream.cli", "sink", "--with-api"], env=env, stdout=out, stderr=out
            )
        decisions = TopicReader(broker.bootstrap, ENFORCEMENT, "decision")
        try:
            wait_for_api(ledger, port, data_dir, log)
            tokens = {
                "alice": create_token(env, "--role", "viewer", "--name", "alice"),
                "mike": create_token(env, "--role", "approver", "--level", "manager", "--name", "mike"),
                "dana": create_token(env, "--role", "approver", "--level", "director", "--name", "dana"),
                "vera": create_token(env, "--role", "approver", "--level", "vp", "--name", "vera"),
            }
            yield Stack(broker.bootstrap, env, port, data_dir, decisions, tokens)
        finally:
            decisions.close()
            for process in (ledger, worker):
                stop_worker(process)


def request_id(line: str) -> str:
    return line.split("\t")[0]


def test_a_temporary_increase_lifts_the_shutoff_and_expires_on_time(stack: Stack) -> None:
    stack.spend("marketing", 100)  # $100 of $100
    shutoff = stack.decision("team:marketing", "shutoff")
    until = datetime.now(UTC) + timedelta(seconds=8)
    line = stack.ok(
        "dana", "budget", "increase", "team:marketing", "50", "--until", until.isoformat(), "--reason", "launch week"
    )
    acknowledged = datetime.now(UTC)  # the API answered: the broker holds the approved record
    assert "\tapproved\t" in line and "approved by dana (director): launch week" in line
    lifted = stack.decision("team:marketing", "allow", after=shutoff["version"])
    issued = datetime.fromisoformat(str(lifted["issued_at"]))
    lag = (issued - acknowledged).total_seconds()
    print(f"\nincrease acknowledged -> allow decision issued: {lag:.3f} s")
    assert (lifted["spend_nanos"], lifted["limit_nanos"]) == (100 * USD, 150 * USD)
    restored = stack.decision("team:marketing", "shutoff", after=lifted["version"])
    assert restored["limit_nanos"] == 100 * USD
    assert datetime.fromisoformat(str(restored["issued_at"])) >= until  # not before its expiry
    listed = stack.ok("alice", "budget", "list", "--status", "expired")
    assert request_id(line) in listed and "expired by spendstream processor: the adjustment reached" in listed
    deadline = time.monotonic() + 30  # the grant and the expiry are chained audit records in the ledger
    while "budget_events: 2 records, chain intact" not in (verified := stack.ok("alice", "audit", "verify")):
        assert time.monotonic() < deadline, verified
        time.sleep(1)


def test_an_overage_is_denied_then_approved_by_the_right_role_and_a_wrong_role_is_refused(stack: Stack) -> None:
    stack.spend("sales", 60)
    shutoff = stack.decision("team:sales", "shutoff")
    line = stack.ok("alice", "budget", "request", "team:sales", "30", "--overage", "--reason", "quarter-end push")
    rid = request_id(line)
    assert "\tpending\t" in line and "requested by alice" in line
    assert "role viewer" in stack.refused("alice", "budget", "approve", rid, "--reason", "mine")
    assert "at most $20.00" in stack.refused("mike", "budget", "approve", rid, "--reason", "fine by me")
    assert "role viewer" in stack.refused(
        "alice", "budget", "increase", "team:sales", "1", "--until", LATER, "--reason", "x"
    )
    assert "no month budget for team:nowhere" in stack.refused(
        "alice", "budget", "request", "team:nowhere", "5", "--reason", "x"
    )
    bad_amount = ("budget", "request", "team:sales", "lots", "--overage", "--reason", "x")
    assert "amount_usd: a number of USD" in stack.refused("alice", *bad_amount)
    own = request_id(stack.ok("mike", "budget", "request", "team:sales", "5", "--overage", "--reason", "mine"))
    assert "may not also decide" in stack.refused("mike", "budget", "approve", own, "--reason", "self-service")
    denied = stack.ok("dana", "budget", "deny", rid, "--reason", "not before the review")
    assert "\tdenied\t" in denied and "denied by dana (director)" in denied
    assert stack.latest(rid) == "denied"
    approved = stack.ok("vera", "budget", "approve", rid, "--reason", "the review agreed")
    assert "approved by vera (vp)" in approved
    lifted = stack.decision("team:sales", "allow", after=shutoff["version"])
    assert lifted["limit_nanos"] == 90 * USD
    assert "cannot be approved" in stack.refused("vera", "budget", "approve", rid, "--reason", "again")


def test_a_feature_above_the_threshold_waits_for_approval(stack: Stack) -> None:
    # "*" is the policy's template for every feature: registered at $0, it stopped every feature without a budget
    assert "'*' names every feature" in stack.refused("alice", "feature", "register", "*", "2500", "--reason", "x")
    cheap = stack.ok("alice", "feature", "register", "ai_tagger", "1500", "--reason", "tags tickets")
    assert "\tapproved\t" in cheap and "policy: at or below" in cheap
    line = stack.ok("alice", "feature", "register", "ai_summarizer", "2500", "--reason", "summaries")
    assert "\tpending\t" in line
    blocked = stack.decision("feature:ai_summarizer", "shutoff")  # budgeted at zero until approved: before any call
    assert (blocked["limit_nanos"], blocked["spend_nanos"]) == (0, 0)
    assert "at most $100.00" in stack.refused("dana", "budget", "approve", request_id(line), "--reason", "ok")
    # the approver is the token that calls, whatever the body claims
    forged = json.dumps({"reason": "worth it", "step_by": "ceo", "approved_by": "ceo", "approver_level": "board"})
    reply = call(stack.port, "POST", f"/v1/budget/requests/{request_id(line)}/approve", forged.encode(),
                 Authorization=f"Bearer {stack.tokens['vera']}", Content_Type="application/json")  # fmt: skip
    assert reply.status == 201, reply.body
    assert (reply.json()["step_by"], reply.json()["approver_level"]) == ("vera", "vp")
    stack.decision("feature:ai_summarizer", "allow", after=blocked["version"])  # lifted at once, before any spend
    assert "ai_summarizer" in stack.ok("alice", "feature", "list", "--status", "approved")


def test_an_approver_can_neither_split_past_its_ceiling_nor_overturn_a_higher_denial(stack: Stack) -> None:
    """The ceiling bounds what a budget's approved increases add up to, not each request alone; a denial is
    overturned only on appeal to a higher level."""
    increase = ("budget", "increase", "team:product", "15", "--until", LATER)
    assert "\tapproved\t" in stack.ok("mike", *increase, "--reason", "first half")
    split = stack.refused("mike", *increase, "--reason", "second half")
    assert "at most $20.00 on team:product, which already has $15.00" in split and "$30.00" in split
    asked = request_id(stack.ok("alice", "budget", "request", "team:product", "10", *increase[4:], "--reason", "more"))
    assert "already has $15.00" in stack.refused("mike", "budget", "approve", asked, "--reason", "in two steps")
    assert "\tdenied\t" in stack.ok("dana", "budget", "deny", asked, "--reason", "not this month")
    overturn = stack.refused("dana", "budget", "approve", asked, "--reason", "changed my mind")
    assert "an appeal needs a level above director" in overturn
    assert "approved by vera (vp)" in stack.ok("vera", "budget", "approve", asked, "--reason", "the appeal")


def test_a_feature_in_use_cannot_be_held_at_zero_by_a_registration(stack: Stack) -> None:
    """A pending registration budgets its feature at $0: any viewer could stop a feature a team already runs (its
    calls refused until an approver denied the registration)."""
    stack.spend("marketing", 1, feature="ai_campaign_writer")
    deadline = time.monotonic() + 60
    while "ai_campaign_writer" not in stack.ok("alice", "report", "top", "--by", "feature"):
        assert time.monotonic() < deadline, "the call never reached the ledger"
        time.sleep(0.5)
    refused = stack.refused("alice", "feature", "register", "ai_campaign_writer", "2500", "--reason", "mine now")
    assert "team marketing: 1 requests, $1.00 in the last 35 days" in refused
    assert 'scope: "feature:ai_campaign_writer", period: month' in refused
    assert "feature:ai_campaign_writer" not in stack.ok("alice", "feature", "list")
    below = stack.refused("dana", "feature", "register", "ai_campaign_writer", "100", "--reason", "a small cap")
    assert "in use already" in below  # granted at once, it would have capped marketing's writer at $100


def test_registering_a_budgeted_feature_does_not_raise_its_budget(stack: Stack) -> None:
    """Below the threshold a registration is approved by the policy alone: it must not add to a budget the policy
    already sets, or any token could raise a feature's budget without an approver."""
    refused = stack.refused("alice", "feature", "register", "ai_writer", "1500", "--reason", "more for my feature")
    assert "ai_writer has a budget in the policy in force already" in refused
    assert "spendstream budget request feature:ai_writer" in refused
    assert "feature:ai_writer" not in stack.ok("alice", "feature", "list")


def test_an_amount_is_listed_in_plain_dollars(stack: Stack) -> None:
    one_nano = ("team:support", "0.000000001", "--until", LATER, "--reason", "the smallest amount")
    line = stack.ok("alice", "budget", "request", *one_nano)
    assert "\t$0.000000001\t" in line


def test_amounts_read_as_the_reports_write_them(stack: Stack) -> None:
    """``$2,000.00`` as in ``spendstream report``, not ``$2000``; an amount that is not whole cents keeps its nanos."""
    asked = ("team:support", "2000", "--until", LATER, "--reason", "a launch")
    rid = request_id(line := stack.ok("alice", "budget", "request", *asked))
    assert "\tpending\tteam:support\tmonth\t$2,000.00\t" in line
    odd = ("team:support", "1500.000000001", "--until", LATER, "--reason", "to the nano-dollar")
    assert "\t$1,500.000000001\t" in stack.ok("alice", "budget", "request", *odd)
    listed = stack.ok("alice", "budget", "list", "--status", "pending")
    assert f"{rid}\tpending\tteam:support\tmonth\t$2,000.00\t" in listed


def test_reports_show_the_budget_an_approved_increase_raised(stack: Stack) -> None:
    """``spendstream report chargeback`` and ``forecast`` (through the API that owns the ledger) show the limit the
    processor enforces, the policy's amount and the increase; a pending or denied request adds nothing."""
    now = datetime.now(UTC)
    next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    until = ("--until", next_month.isoformat())
    assert "\tapproved\t" in stack.ok("vera", "budget", "increase", "team:finance", "500", *until, "--reason", "audit")
    stack.ok("alice", "budget", "request", "team:finance", "70", *until, "--reason", "pending")
    denied = request_id(stack.ok("alice", "budget", "request", "team:finance", "80", *until, "--reason", "denied"))
    stack.ok("dana", "budget", "deny", denied, "--reason", "no")
    deadline = time.monotonic() + 60  # the audit sink writes the approval to budget_events
    while True:
        chargeback = json.loads(stack.ok("alice", "report", "chargeback", "--format", "json"))
        finance = next((r for r in chargeback["rows"] if r["department"] == "finance"), None)
        if (finance and finance["budget_nanos"] != 1000 * USD) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert finance is not None
    assert finance["budget_nanos"] == 1500 * USD
    assert (finance["policy_budget_nanos"], finance["increase_nanos"]) == (1000 * USD, 500 * USD)
    assert any("approved increases in force now" in note for note in chargeback["notes"])
    forecast = json.loads(stack.ok("alice", "report", "forecast", "--format", "json"))
    row = next(r for r in forecast["rows"] if r["team"] == "finance")
    assert (row["budget_nanos"], row["increase_nanos"]) == (1500 * USD, 500 * USD)

"""``spendstream demo`` tells the scripted story, and what it tells is what the pipeline did.

The demo replays yesterday on a clock of its own; that rests on the Enforcer and the gateway taking an
injected clock, tested here without the demo too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from spendstream.core.events import Action, Decision
from spendstream.core.policy import load_policy
from spendstream.edge.enforcer import Enforcer
from spendstream.runtime.demo import demo_policy_path
from spendstream.runtime.embedded_broker import free_port

MIDNIGHT = datetime(2025, 3, 2, tzinfo=UTC)


def _shutoff(expires_at: datetime) -> Decision:
    return Decision(scope="team:marketing", action=Action.shutoff, reason="budget", expires_at=expires_at, version=1)


@pytest.mark.parametrize(
    ("now", "blocked"),
    [(MIDNIGHT - timedelta(hours=14), True), (MIDNIGHT - timedelta(microseconds=1), True), (MIDNIGHT, False)],
)
def test_enforcer_judges_expiry_by_its_clock(now: datetime, blocked: bool) -> None:
    """A decision that expired long ago in real time still holds while the injected clock is before its end."""
    enforcer = Enforcer(bootstrap_servers="127.0.0.1:1", clock=lambda: now)
    enforcer.apply("team:marketing", _shutoff(MIDNIGHT))
    assert enforcer.check(team="marketing", model="gpt-4o").blocked is blocked


def test_enforcer_without_a_clock_uses_real_time() -> None:
    enforcer = Enforcer(bootstrap_servers="127.0.0.1:1")
    enforcer.apply("team:marketing", _shutoff(MIDNIGHT))
    assert not enforcer.check(team="marketing").blocked
    enforcer.apply("team:marketing", _shutoff(datetime.now(UTC) + timedelta(hours=1)).model_copy(update={"version": 2}))
    assert enforcer.check(team="marketing").blocked


def test_demo_policy_has_daily_department_budgets_and_a_stopping_spike_rule() -> None:
    policy = load_policy(demo_policy_path())
    teams = {b.scope for b in policy.budgets if b.scope.startswith("team:")}
    assert teams == {"team:engineering", "team:product", "team:marketing", "team:sales", "team:support"}
    assert {str(b.period) for b in policy.budgets} == {"day"}
    assert [r.action for r in policy.spike_rules] == ["emergency_stop"]
    assert not policy.is_critical("ai_lead_scorer") and policy.is_critical("ai_chatbot")


@pytest.mark.slow
def test_demo_tells_the_story_and_the_ledger_matches_what_it_sent(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    env = {
        **os.environ,
        "SPENDSTREAM_DATA_DIR": str(tmp_path / "data"),
        "SPENDSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "SPENDSTREAM_API_PORT": str(free_port()),
        "SPENDSTREAM_GATEWAY_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "spendstream.cli", "demo", "--json-summary", str(summary_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    acts = [out.index(f"Act {n}.") for n in range(1, 6)]
    assert acts == sorted(acts)
    assert "What just happened" in out and "CFO weekly report" in out and "Chargeback" in out

    summary = json.loads(summary_path.read_text())
    steps = summary["steps"]
    assert [s["step"] for s in steps] == ["alert", "fallback", "shutoff", "spike_stop", "lift"]
    alert, fallback, shutoff, spike, lift = steps
    budget = alert["limit_nanos"]
    # each decision came at its threshold: the spend that triggered it is at or above it, below the next one
    assert budget * 8 // 10 <= alert["spend_nanos"] < budget * 9 // 10
    assert (alert["status"], alert["decision_header"]) == (200, "alert")
    assert budget * 9 // 10 <= fallback["spend_nanos"] < budget
    assert (fallback["requested"], fallback["served"], fallback["model_header"]) == (
        "claude-3-5-sonnet",
        "claude-3-5-haiku",
        "claude-3-5-haiku",
    )
    # the comparison is between the metered fallback call and the same tokens on the requested model
    assert 0 < fallback["served_cost_nanos"] < fallback["requested_cost_nanos"]
    assert not re.search(r"(\$[\d.]+) instead of \1 ", out), "the cost comparison compares a cost with itself"
    # timings come from the records themselves, in causal order: crossing call -> issued_at -> held at the edge
    for step in (alert, fallback, shutoff):
        assert 0 <= step["decided_ms"] <= step["applied_ms"], step
        assert f"decided {step['decided_ms']} ms after the crossing call" in out
    assert shutoff["spend_nanos"] >= budget
    assert (shutoff["status"], shutoff["code"], shutoff["blocked_scope"]) == (402, "budget_exceeded", "team:marketing")
    assert "team:marketing" in shutoff["message"]
    assert (spike["status"], spike["code"], spike["blocked_scope"]) == (
        402,
        "budget_exceeded",
        "feature:ai_lead_scorer",
    )
    assert spike["other_feature_status"] == 200 and "hourly_runaway" in spike["alert"]
    assert (lift["marketing_status"], lift["lead_scorer_status"]) == (200, 200)
    assert set(lift["decisions"]) == {"team:marketing", "feature:ai_lead_scorer"}

    sent = summary["sent_nanos_by_team"]
    assert set(sent) == {"engineering", "product", "marketing", "sales", "support"}
    assert summary["chargeback_actual_nanos_by_team"] == sent
    assert summary["weekly_spend_nanos"] == sum(sent.values())

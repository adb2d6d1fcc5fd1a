"""Budget actions: thresholds, criticality, state changes, quotas, allowed models."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.events import Action
from spendstream.core.policy import Quota, Thresholds, load_policy, parse_policy
from spendstream.processor.budget_rules import (
    action_for_spend,
    evaluate_budget,
    most_restrictive,
    quota_action,
    reached,
    should_emit,
)
from spendstream.processor.decision_publisher import evaluate_scope
from spendstream.processor.spend_accounting import window_key

DEFAULT = load_policy(Path(__file__).resolve().parents[1] / "infra" / "policy" / "default.yaml")
T = Thresholds()
USD = 10**9


@pytest.mark.parametrize(
    ("spend", "critical", "expected"),
    [
        (0, False, Action.allow),
        (799_999_999_999, False, Action.allow),
        (800 * USD, False, Action.alert),
        (900 * USD - 1, False, Action.alert),
        (900 * USD, False, Action.fallback),
        (1000 * USD - 1, False, Action.fallback),
        (1000 * USD, False, Action.shutoff),
        (1000 * USD, True, Action.throttle),
        (5000 * USD, True, Action.throttle),
    ],
)
def test_threshold_edges_are_exact(spend: int, critical: bool, expected: Action) -> None:
    assert action_for_spend(spend, 1000 * USD, T, critical) is expected


def test_disabled_steps_are_skipped() -> None:
    only_shutoff = Thresholds(alert=None, fallback=None)
    assert action_for_spend(95, 100, only_shutoff) is Action.allow
    assert action_for_spend(100, 100, only_shutoff) is Action.shutoff


def test_zero_limit_blocks_at_once() -> None:
    assert action_for_spend(0, 0, T) is Action.shutoff


spend = st.integers(min_value=0, max_value=10**16)
fractions = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("2"), places=3)


@given(a=spend, b=spend, limit=spend, f=st.lists(fractions, min_size=3, max_size=3), critical=st.booleans())
def test_action_is_monotone_in_spend(a: int, b: int, limit: int, f: list[Decimal], critical: bool) -> None:
    alert, fallback, shutoff = sorted(f)
    t = Thresholds(alert=alert, fallback=fallback, shutoff=shutoff)
    low, high = sorted((a, b))
    order = [Action.allow, Action.alert, Action.fallback, Action.throttle if critical else Action.shutoff]
    assert order.index(action_for_spend(low, limit, t, critical)) <= order.index(
        action_for_spend(high, limit, t, critical)
    )


@given(s=spend, limit=spend, f=fractions)
def test_reached_is_exact_integer_comparison(s: int, limit: int, f: Decimal) -> None:
    assert reached(s, limit, f) == (Decimal(s) >= f * limit)


def test_evaluate_reference_budgets() -> None:
    budgets = {b.scope: b for b in DEFAULT.budgets}
    fallback = evaluate_budget(budgets["team:marketing"], "team:marketing", 7_200 * USD, DEFAULT)
    assert fallback.action is Action.fallback
    assert fallback.fallback_models["claude-3-5-sonnet"] == "claude-3-5-haiku-latest"
    assert "team:marketing" in fallback.reason and "90.0% of $8,000.00" in fallback.reason
    chatbot = evaluate_budget(budgets["feature:ai_chatbot"], "feature:ai_chatbot", 4_000 * USD, DEFAULT)
    assert (chatbot.action, chatbot.throttle_rps) == (Action.throttle, 2.0)
    scorer = evaluate_budget(budgets["feature:ai_lead_scorer"], "feature:ai_lead_scorer", 2_000 * USD, DEFAULT)
    assert scorer.action is Action.shutoff and scorer.fallback_models == {}


def test_should_emit_only_on_change() -> None:
    assert not should_emit(None, Action.allow)
    assert should_emit(None, Action.alert)
    assert not should_emit(Action.fallback, Action.fallback)
    assert should_emit(Action.shutoff, Action.allow)  # new period: lift the shutoff


def test_most_restrictive_order() -> None:
    assert most_restrictive([]) is Action.allow
    assert most_restrictive([Action.alert, Action.throttle, Action.fallback]) is Action.throttle
    assert most_restrictive([Action.shutoff, Action.throttle]) is Action.shutoff


@given(st.lists(st.sampled_from(list(Action)), min_size=1))
def test_most_restrictive_is_one_of_them_and_dominates(actions: list[Action]) -> None:
    top = most_restrictive(actions)
    assert top in actions
    assert all(most_restrictive([top, a]) is top for a in actions)


def test_quota_fifty_calls_per_day() -> None:
    quota = DEFAULT.quotas[0]
    assert quota_action(49, 10**9, quota).action is Action.allow
    blocked = quota_action(50, 0, quota)
    assert blocked.action is Action.shutoff and "50/50" in blocked.reason
    assert quota_action(40, 0, quota, Decimal("0.8")).action is Action.alert


def test_token_quota() -> None:
    quota = Quota(scope="user:*", tokens_per_day=1000)
    assert quota_action(10**6, 999, quota).action is Action.allow
    assert quota_action(0, 1000, quota).action is Action.shutoff


def test_a_shutoff_of_any_scope_lists_the_critical_features_unless_a_hard_cap_stopped_it() -> None:
    policy = parse_policy(
        "budgets:\n"
        "  - {scope: 'org:acme', period: day, amount_usd: 1}\n"
        "  - {scope: 'model:gpt-4o', period: day, amount_usd: 1, hard_cap: true}\n"
        "features:\n  ai_chatbot: {critical: true, throttle_rps: 2}\n  search: {critical: false}\n"
    )
    day = int(datetime(2026, 3, 2, tzinfo=UTC).timestamp())
    spent = {window_key("org:acme", "day", day): 2 * USD, window_key("model:gpt-4o", "day", day): 2 * USD}

    def totals(key: str) -> tuple[int, int, int]:
        return spent.get(key, 0), 1, 1

    seen = datetime(2026, 3, 2, 12, tzinfo=UTC)
    soft = evaluate_scope("org:acme", {"day": day}, totals, policy, seen)
    assert (soft.action, soft.critical_throttle_rps) == (Action.shutoff, {"ai_chatbot": 2.0})
    hard = evaluate_scope("model:gpt-4o", {"day": day}, totals, policy, seen)
    assert (hard.action, hard.critical_throttle_rps) == (Action.shutoff, {})
    assert "hard cap" in policy.summary()


def test_an_alert_sent_again_for_the_same_crossing_keeps_its_id() -> None:
    """A restarted processor may owe an alert it already sent; the same id lets the ledger and the notifier
    count it once, while another window or level is another alert."""
    from spendstream.core.events import AlertKind, Severity
    from spendstream.processor.decision_publisher import Crossing, build_alert

    now = datetime(2026, 3, 1, tzinfo=UTC)
    crossing = Crossing("team:a|month|2026-03|alert", AlertKind.threshold, Severity.warning, "alert: 80 %")
    first = build_alert("team:a", crossing, "v1", now)
    again = build_alert("team:a", crossing, "v2", datetime(2026, 3, 2, tzinfo=UTC))
    assert first.alert_id == again.alert_id
    next_month = Crossing("team:a|month|2026-04|alert", AlertKind.threshold, Severity.warning, "alert: 80 %")
    assert build_alert("team:a", next_month, "v1", now).alert_id != first.alert_id
    assert build_alert("team:b", crossing, "v1", now).alert_id != first.alert_id

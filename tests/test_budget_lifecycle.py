"""The budget lifecycle's pure rules: effective limits over time, approval by level, request steps."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.core.budget_lifecycle import (
    BudgetRequest,
    Kind,
    LifecycleError,
    Status,
    adjusted_policy,
    approval_problem,
    decide,
    effective_limit,
    expire,
    grant,
    new_request,
    next_expiry,
)
from spendstream.core.events import INT64_MAX
from spendstream.core.policy import parse_policy

USD = 1_000_000_000
T0 = datetime(2026, 12, 1, tzinfo=UTC)
SCOPES = ("team:marketing", "team:sales", "division:growth", "org:acme", "feature:ai_chatbot")
POLICY = parse_policy(
    """
org: acme
divisions: {growth: [marketing, sales]}
budgets:
  - {scope: "team:marketing", period: month, amount_usd: 8000}
  - {scope: "team:marketing", period: day, amount_usd: 500}
  - {scope: "team:sales", period: month, amount_usd: 6000}
  - {scope: "division:growth", period: month, amount_usd: 14000}
  - {scope: "org:acme", period: month, amount_usd: 35000}
"""
)


def adjustment(scope: str, period: str, amount: int, start: int, end: int | None, status: Status) -> BudgetRequest:
    request = new_request(
        Kind.increase, scope, period, amount, T0 + timedelta(seconds=start),
        None if end is None else T0 + timedelta(seconds=start + end), "alice", "campaign", T0,
    )  # fmt: skip
    return replace(request, status=status)


adjustments = st.lists(
    st.builds(
        adjustment,
        st.sampled_from(SCOPES),
        st.sampled_from(("month", "day")),
        st.integers(1, 10**9 * USD),
        st.integers(0, 1000),
        st.one_of(st.none(), st.integers(1, 1000)),
        st.sampled_from(list(Status)),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(adjustments, st.integers(-5, 2100), st.sampled_from(SCOPES), st.sampled_from(("month", "day")))
def test_effective_limit_is_the_base_plus_what_is_approved_and_active_at_that_instant(
    requests: list[BudgetRequest], second: int, scope: str, period: str
) -> None:
    at = T0 + timedelta(seconds=second)
    active = [
        r.amount_nanos
        for r in requests
        if (r.scope, r.period) == (scope, period)
        and r.status is Status.approved
        and r.starts_at <= at
        and (r.expires_at is None or at < r.expires_at)
    ]
    assert effective_limit(100 * USD, requests, scope, period, at) == min(100 * USD + sum(active), INT64_MAX)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10**6), st.integers(0, 100), st.integers(1, 100))
def test_an_increase_counts_from_its_start_until_just_before_its_expiry(amount: int, start: int, length: int) -> None:
    request = adjustment("team:marketing", "month", amount, start, length, Status.approved)
    assert request.expires_at is not None
    tick = timedelta(microseconds=1)
    for at, counted in (
        (request.starts_at - tick, False),
        (request.starts_at, True),
        (request.expires_at - tick, True),
        (request.expires_at, False),
    ):
        assert effective_limit(10, [request], "team:marketing", "month", at) == (10 + amount if counted else 10)


@settings(max_examples=200, deadline=None)
@given(adjustments, st.integers(0, 2100))
def test_an_adjusted_policy_changes_only_the_adjusted_budgets_and_keeps_its_version(
    requests: list[BudgetRequest], second: int
) -> None:
    at = T0 + timedelta(seconds=second)
    adjusted = adjusted_policy(POLICY, requests, at)
    assert adjusted.version == POLICY.version
    for scope in SCOPES:  # the hierarchy is not summed: a team's increase leaves its division's limit alone
        for budget in adjusted.matching_budgets(scope):
            base = next(b.limit_nanos for b in POLICY.budgets if b.id == budget.id)
            assert budget.limit_nanos == effective_limit(base, requests, scope, str(budget.period), at)
    assert not adjusted.matching_budgets("feature:ai_chatbot")  # an increase needs a budget to increase


def test_a_registered_feature_is_budgeted_at_zero_until_approved() -> None:
    feature = new_request(Kind.feature, "feature:ai_summarizer", "month", 2500 * USD, T0, None, "bob", "launch", T0)
    pending = adjusted_policy(POLICY, [feature], T0)
    assert [b.limit_nanos for b in pending.matching_budgets("feature:ai_summarizer")] == [0]
    approved = adjusted_policy(POLICY, [replace(feature, status=Status.approved)], T0)
    assert [b.limit_nanos for b in approved.matching_budgets("feature:ai_summarizer")] == [2500 * USD]
    assert approved.matching_budgets("feature:ai_summarizer")[0].thresholds == POLICY.thresholds
    # a denied registration leaves the feature as it was: registering a feature someone else runs, then having it
    # denied, froze that feature at $0 for good
    denied = adjusted_policy(POLICY, [replace(feature, status=Status.denied)], T0)
    assert denied.matching_budgets("feature:ai_summarizer") == []


def test_approval_levels_follow_the_policy_ladder() -> None:
    rules = POLICY.approval_rules  # the reference ladder: manager, director, vp, board
    assert approval_problem(rules, "manager", "team:marketing", 1000 * USD) is None
    assert "at most $1,000.00" in str(approval_problem(rules, "manager", "team:marketing", 2000 * USD))
    one_nano_over = str(approval_problem(rules, "manager", "team:marketing", 1000 * USD + 1))
    assert "at most $1,000.00, this is $1,000.000000001" in one_nano_over  # the refusal shows what it refused
    assert "not division" in str(approval_problem(rules, "manager", "division:growth", USD))
    assert approval_problem(rules, "director", "division:growth", 5000 * USD) is None
    assert approval_problem(rules, "board", "org:acme", 10**6 * USD) is None
    assert "not in the policy" in str(approval_problem(rules, "cfo", "team:marketing", USD))
    assert "approver token" in str(approval_problem(rules, "", "team:marketing", USD))
    assert "approval level director: up to $5,000.00 for division, team" in POLICY.summary()  # policy show
    custom = parse_policy("approvals: {levels: [{name: lead, dimensions: [team], max_usd: 50}]}").approval_rules
    assert approval_problem(custom, "lead", "team:x", 50 * USD) is None
    assert approval_problem(custom, "manager", "team:x", USD) is not None


def test_bad_approvals_section_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"approvals\.levels\.0\.dimensions"):
        parse_policy("approvals:\n  levels:\n    - {name: lead, dimensions: [planet]}\n")


def test_requests_are_decided_once_by_someone_else_with_the_authority() -> None:
    rules = POLICY.approval_rules
    request = new_request(Kind.overage, "team:marketing", "month", 3000 * USD, T0, None, "alice", "launch week", T0)
    with pytest.raises(LifecycleError, match="may not also decide") as refused:
        decide(request, True, "alice", "board", "self", rules, T0)
    assert refused.value.status == 403
    for approve in (True, False):  # deciding either way takes the authority to approve
        with pytest.raises(LifecycleError, match="at most"):
            decide(request, approve, "mike", "manager", "ok", rules, T0)
    denied = decide(request, False, "dana", "director", "not this month", rules, T0)
    assert (denied.status, denied.step_by, denied.step_reason) == (Status.denied, "dana", "not this month")
    with pytest.raises(LifecycleError, match="cannot be denied") as twice:
        decide(denied, False, "vera", "vp", "no", rules, T0)
    assert twice.value.status == 409
    approved = decide(denied, True, "vera", "vp", "an appeal, worth it", rules, T0)
    assert (approved.status, approved.approver_level, approved.step_by) == (Status.approved, "vp", "vera")
    with pytest.raises(LifecycleError, match="cannot be approved"):
        decide(approved, True, "vera", "vp", "again", rules, T0)
    with pytest.raises(LifecycleError, match="reason"):
        new_request(Kind.increase, "team:marketing", "month", USD, T0, None, "alice", " ", T0)
    # an attacker session: a reason that rewrote the approver's terminal, or faked a row of the listing
    for hostile in ("ok\x1b[2J\x1b[Happroved by CFO", "ok\r\nreq-2  approved", "x" * 2_001):
        with pytest.raises(LifecycleError, match="reason"):
            new_request(Kind.increase, "team:marketing", "month", USD, T0, None, "alice", hostile, T0)
        with pytest.raises(LifecycleError, match="reason"):
            decide(denied, True, "vera", "vp", hostile, rules, T0)


def test_records_round_trip_and_expire_at_their_expiry() -> None:
    request = new_request(
        Kind.increase, "team:marketing", "month", 2000 * USD, T0, T0 + timedelta(days=30), "dana", "promo", T0
    )
    granted = grant(request, "dana", "director", POLICY.approval_rules, T0)
    assert BudgetRequest.from_json(granted.to_json()) == granted
    assert next_expiry([granted], T0) == T0 + timedelta(days=30)
    ended = expire(granted)
    assert (ended.status, ended.step_at) == (Status.expired, T0 + timedelta(days=30))
    assert next_expiry([ended], T0) is None


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("step_at", "2026-12-01T00:00:00", "no timezone"),
        ("amount_nanos", "1000", "positive Int64"),
        ("amount_nanos", -5, "positive Int64"),
        ("status", "granted", "granted"),
        ("starts_at", None, "required"),
    ],
)
def test_a_malformed_record_is_refused_by_name(field: str, value: Any, problem: str) -> None:
    good = json.loads(new_request(Kind.increase, "team:x", "month", USD, T0, None, "a", "b", T0).to_json())
    with pytest.raises(ValueError, match=problem):
        BudgetRequest.from_json(json.dumps({**good, field: value}))


def test_an_approval_ladder_out_of_order_or_empty_is_refused() -> None:
    """Appeals go up the ladder as listed, so a ceiling that falls on the way up would let less overturn more."""
    upside_down = "approvals:\n  levels:\n    - {name: board}\n    - {name: manager, max_usd: 1000}\n"
    with pytest.raises(ValueError, match=r"approvals.*lowest first.*'manager'"):
        parse_policy(upside_down)
    with pytest.raises(ValueError, match=r"approvals.*at least one"):
        parse_policy("approvals:\n  levels: []\n")
    ordered = "approvals:\n  levels:\n    - {name: manager, max_usd: 1000}\n    - {name: board}\n"
    assert [level.name for level in parse_policy(ordered).approval_rules.levels] == ["manager", "board"]


def test_an_increase_that_ended_cannot_be_approved_any_more() -> None:
    """An approval after the expiry was recorded in the audit trail as approved, and changed nothing."""
    request = adjustment("team:sales", "month", 5 * USD, 0, 3600, Status.pending)
    rules = POLICY.approval_rules
    assert decide(request, True, "dana", "director", "ok", rules, T0 + timedelta(minutes=59)).status is Status.approved
    with pytest.raises(LifecycleError, match="an approval now would change nothing") as ended:
        decide(request, True, "dana", "director", "ok", rules, T0 + timedelta(hours=1))
    assert ended.value.status == 409
    assert decide(request, False, "dana", "director", "late", rules, T0 + timedelta(hours=2)).status is Status.denied


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"until": "9999-12-31"}, "until: at most 366 days ahead (got 9999-12-31)"),  # answered 500 (date overflow)
        ({"until": "9999-12-31T23:59:59Z"}, "until: at most 366 days ahead"),
        ({"until": "2199-12-31"}, "until: at most 366 days ahead"),
        ({"kind": "overage", "until": "2026-12-20"}, "until: an overage lasts to the end of the period it is for"),
    ],
)
def test_a_budget_request_s_expiry_is_bounded(body: dict[str, Any], problem: str) -> None:
    from spendstream.api.budget_requests import _budget_request

    base = {"scope": "team:marketing", "period": "day", "amount_usd": "900", "reason": "launch"}
    with pytest.raises(LifecycleError) as refused:
        _budget_request({**base, **body}, POLICY, "vera", T0, False)
    assert str(refused.value).startswith(problem) and refused.value.status == 400
    overage = _budget_request({**base, "kind": "overage"}, POLICY, "vera", T0, False)
    assert overage.expires_at == datetime(2026, 12, 2, tzinfo=UTC)  # the end of the day it is for (policy tz UTC)
    in_a_year = _budget_request({**base, "until": "2027-11-30"}, POLICY, "vera", T0, False)
    assert in_a_year.expires_at == datetime(2027, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize("amount", ["0.00000000001", "1.0000000005"])
def test_an_amount_finer_than_a_nano_dollar_is_refused_not_rounded(amount: str) -> None:
    """``0.00000000001`` became $0.000000001 (ten times the amount) and ``1.0000000005`` lost its last digit."""
    from spendstream.api.budget_requests import _budget_request

    asked = {"scope": "team:sales", "amount_usd": amount, "until": "2026-12-20", "reason": "r"}
    with pytest.raises(LifecycleError, match=re.escape(f"amount_usd: {amount} USD is finer than a nano-dollar")):
        _budget_request(asked, POLICY, "vera", T0, False)
    with pytest.raises(ValueError, match=r"amount_usd: \S+ USD is finer than a nano-dollar"):
        parse_policy(f'budgets:\n  - {{scope: "team:a", period: month, amount_usd: "{amount}"}}\n')
    assert _budget_request({**asked, "amount_usd": "1.000000001"}, POLICY, "vera", T0, False).amount_nanos == (
        1_000_000_001
    )


def test_a_replayed_older_step_does_not_bring_a_request_back() -> None:
    """A signed "approved" step replayed after the increase expired would approve it again: the newest step (by
    when it was taken) stands, whatever order the topic holds them in."""
    from spendstream.core.budget_lifecycle import expire, latest_by_id

    requested = adjustment("team:marketing", "day", 5 * USD, 0, 60, Status.pending)
    approved = replace(requested, status=Status.approved, step="approved", step_at=T0 + timedelta(seconds=10))
    expired = expire(approved)  # taken at the expiry, after the approval
    assert latest_by_id([requested, approved, expired, approved])[requested.id].status is Status.expired
    assert latest_by_id([requested, approved, requested])[requested.id].status is Status.approved
    assert latest_by_id([approved, approved])[requested.id] == approved  # the same step again: no change

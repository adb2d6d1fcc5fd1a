"""What an edge enforces from the policy alone (edge.policy_rules), checked through the pure resolve()."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.policy import load_policy, parse_policy
from spendstream.edge.enforcer import DIMENSIONS
from spendstream.edge.policy_rules import StaticRules
from spendstream.edge.verdict import ALLOW, ScopeRule, Verdict, resolve

DEFAULT = load_policy(Path(__file__).resolve().parents[1] / "infra" / "policy" / "default.yaml")
NOON = datetime(2026, 3, 10, 12, tzinfo=UTC).timestamp()


def values(**request: str) -> list[str]:
    return [request.get(dim, "") for dim in DIMENSIONS]


def verdict(rules: StaticRules, model: str, wall: float = NOON, **request: str) -> Verdict:
    hits: list[tuple[ScopeRule, str]] = []
    rules.apply(values(**request), wall, hits)
    return resolve(hits, model, wall, 0.0) if hits else Verdict(ALLOW, model)


def test_reference_policy_lists_apply_with_globs() -> None:
    rules = StaticRules(DEFAULT, DIMENSIONS)
    assert verdict(rules, "local/qwen", environment="development").action == "allow"
    assert verdict(rules, "llama-3.2-3b", environment="development").action == "allow"
    refused = verdict(rules, "text-embedding-3-small", environment="development")
    assert (refused.action, refused.scope) == ("deny_model", "environment:development")
    assert "local/*" in refused.reason
    assert verdict(rules, "gpt-4o", environment="production").action == "allow"  # no list there


def test_a_scopes_own_list_replaces_its_template() -> None:
    policy = parse_policy(
        "allowed_models:\n  'team:*': [gpt-4o-mini]\n  'team:research': ['*']\n  'division:eng': ['gpt-*']\n"
    )
    rules = StaticRules(policy, DIMENSIONS)
    assert verdict(rules, "o1", team="sales").action == "deny_model"
    assert verdict(rules, "o1", team="research").action == "allow"
    # Lists of several scopes all apply.
    assert verdict(rules, "o1", team="research", division="eng").action == "deny_model"
    assert verdict(rules, "gpt-4o-mini", team="sales", division="eng").action == "allow"


def test_request_quota_lets_exactly_the_cap_through_per_scope_and_day() -> None:
    rules = StaticRules(DEFAULT, DIMENSIONS)  # user:* 50 requests/day
    outcomes = [verdict(rules, "gpt-4o", user="u1").action for _ in range(60)]
    assert outcomes == ["allow"] * 50 + ["shutoff"] * 10
    last = verdict(rules, "gpt-4o", user="u1")
    assert last.scope == "user:u1" and "quota used up: 60/50" in last.reason
    assert last.retry_after_s == 12 * 3600  # until local midnight (UTC policy)
    assert verdict(rules, "gpt-4o", user="u2").action == "allow"  # every user has its own count
    assert verdict(rules, "gpt-4o", user="u1", wall=NOON + 12 * 3600).action == "allow"  # a new day


def test_smaller_cap_binds_and_counts_survive_a_policy_change() -> None:
    tight = parse_policy(
        "quotas:\n  - {scope: 'user:*', requests_per_day: 5}\n  - {scope: 'user:bot', requests_per_day: 3}"
    )
    rules = StaticRules(tight, DIMENSIONS)
    assert [verdict(rules, "m", user="bot").action for _ in range(4)] == ["allow"] * 3 + ["shutoff"]
    assert rules.quotas.used("user:bot") == 4
    raised = parse_policy("quotas:\n  - {scope: 'user:*', requests_per_day: 6}")
    rules = StaticRules(raised, DIMENSIONS, rules)
    assert [verdict(rules, "m", user="bot").action for _ in range(3)] == ["allow", "allow", "shutoff"]


def test_quota_day_is_the_policys_local_day() -> None:
    berlin = parse_policy("timezone: Europe/Berlin\nquotas:\n  - {scope: 'team:*', requests_per_day: 1}")
    rules = StaticRules(berlin, DIMENSIONS)
    late = datetime(2026, 3, 10, 23, 30, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
    assert verdict(rules, "m", wall=late, team="a").action == "allow"
    assert verdict(rules, "m", wall=late + 600, team="a").action == "shutoff"
    assert verdict(rules, "m", wall=late + 1800, team="a").action == "allow"  # 00:00 in Berlin


@given(cap=st.integers(0, 30), requests=st.integers(0, 60))
def test_never_more_than_the_cap_is_admitted(cap: int, requests: int) -> None:
    rules = StaticRules(parse_policy(f"quotas:\n  - {{scope: 'user:*', requests_per_day: {cap}}}"), DIMENSIONS)
    admitted = sum(verdict(rules, "m", user="u").action == "allow" for _ in range(requests))
    assert admitted == min(cap, requests)

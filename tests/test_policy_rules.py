"""What an edge enforces from the policy alone (edge.policy_rules), through Enforcer.check() with no broker."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.events import Decision
from spendstream.core.policy import Policy, load_policy, parse_policy
from spendstream.edge.enforcer import Enforcer
from spendstream.edge.verdict import Verdict

DEFAULT = load_policy(Path(__file__).resolve().parents[1] / "infra" / "policy" / "default.yaml")
NOON = datetime(2026, 3, 10, 12, tzinfo=UTC).timestamp()


class Edge:
    """An Enforcer that is never started: the policy given, decisions applied by hand, a settable clock."""

    def __init__(self, policy: Policy) -> None:
        self.now = NOON
        self.enforcer = Enforcer("127.0.0.1:1", policy=policy, policy_topic=None, clock=self._clock)

    def _clock(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


def verdict(edge: Edge, model: str, wall: float = NOON, **request: str) -> Verdict:
    edge.now = wall
    return edge.enforcer.check(model=model, **request)


def test_reference_policy_lists_apply_with_globs() -> None:
    rules = Edge(DEFAULT)
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
    rules = Edge(policy)
    assert verdict(rules, "o1", team="sales").action == "deny_model"
    assert verdict(rules, "o1", team="research").action == "allow"
    # Lists of several scopes all apply.
    assert verdict(rules, "o1", team="research", division="eng").action == "deny_model"
    assert verdict(rules, "gpt-4o-mini", team="sales", division="eng").action == "allow"


def test_request_quota_lets_exactly_the_cap_through_per_scope_and_day() -> None:
    rules = Edge(DEFAULT)  # user:* 50 requests/day
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
    rules = Edge(tight)
    assert [verdict(rules, "m", user="bot").action for _ in range(4)] == ["allow"] * 3 + ["shutoff"]
    assert rules.enforcer.requests_counted("user:bot") == 4
    raised = parse_policy("quotas:\n  - {scope: 'user:*', requests_per_day: 6}")
    rules.enforcer.set_policy(raised)
    assert [verdict(rules, "m", user="bot").action for _ in range(3)] == ["allow", "allow", "shutoff"]


def test_quota_day_is_the_policys_local_day() -> None:
    berlin = parse_policy("timezone: Europe/Berlin\nquotas:\n  - {scope: 'team:*', requests_per_day: 1}")
    rules = Edge(berlin)
    late = datetime(2026, 3, 10, 23, 30, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
    assert verdict(rules, "m", wall=late, team="a").action == "allow"
    assert verdict(rules, "m", wall=late + 600, team="a").action == "shutoff"
    assert verdict(rules, "m", wall=late + 1800, team="a").action == "allow"  # 00:00 in Berlin


@given(cap=st.integers(0, 30), requests=st.integers(0, 60))
def test_never_more_than_the_cap_is_admitted(cap: int, requests: int) -> None:
    rules = Edge(parse_policy(f"quotas:\n  - {{scope: 'user:*', requests_per_day: {cap}}}"))
    admitted = sum(verdict(rules, "m", user="u").action == "allow" for _ in range(requests))
    assert admitted == min(cap, requests)


def test_lists_apply_to_the_model_served_after_a_fallback() -> None:
    edge = Edge(parse_policy("allowed_models:\n  'team:*': [gpt-4o-mini]\n"))
    edge.enforcer.apply(
        "team:web", Decision(scope="team:web", action="fallback", version=1, fallback_models={"gpt-4o": "gpt-4o-mini"})
    )
    assert verdict(edge, "gpt-4o", team="web")[:2] == ("fallback", "gpt-4o-mini")
    assert verdict(edge, "gpt-4o", team="ops")[:2] == ("deny_model", "gpt-4o")

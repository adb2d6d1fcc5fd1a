"""Most-restrictive resolution, fallback chains, allowed models and the rate limit (pure logic)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.core.events import ACTION_RANK, Decision
from spendstream.edge.verdict import (
    ALERT,
    ALLOW,
    DENY_MODEL,
    FALLBACK,
    SHUTOFF,
    THROTTLE,
    ZERO_RATE_RETRY_S,
    RateLimit,
    ScopeRule,
    Verdict,
    newer,
    parse_scope,
    resolve,
    resolve_many,
    resolve_one,
)

NOW = 1_800_000_000.0
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-haiku", "llama-3.2-1b"]
OUTCOME_RANK = {ALLOW: 0, ALERT: 1, FALLBACK: 2, THROTTLE: 3, DENY_MODEL: 4, SHUTOFF: 5}


def rule(scope: str, action: str, version: int = 1, **fields) -> ScopeRule:
    return ScopeRule.from_decision(Decision(scope=scope, action=action, version=version, **fields))


rules_strategy = st.lists(
    st.builds(
        lambda i, action, fb, allowed, rate, expired: rule(
            f"team:t{i}",
            action,
            fallback_models=dict(fb),
            allowed_models=allowed,
            throttle_rps=rate,
            expires_at=datetime.fromtimestamp(NOW + (-5 if expired else 3600), UTC),
        ),
        st.integers(0, 9),
        st.sampled_from(list(ACTION_RANK)),
        st.lists(st.tuples(st.sampled_from(MODELS), st.sampled_from(MODELS)), max_size=3),
        st.lists(st.sampled_from(MODELS), max_size=3),
        st.sampled_from([0.0, 1000.0]),
        st.booleans(),
    ),
    max_size=6,
    unique_by=lambda r: r.scope,  # an Enforcer holds one decision per scope
)


def outcome(rules: list[ScopeRule], model: str = "gpt-4o") -> Verdict:
    return resolve([(r, "") for r in rules], model, NOW, 100.0)


def fresh(rules: list[ScopeRule]) -> list[ScopeRule]:
    """Copies with new limits, so what one resolution counted does not leak into the next."""
    return [ScopeRule(**{k: v for k, v in r.__dict__.items() if k != "limit"}) for r in rules]


@settings(max_examples=300)
@given(rules_strategy, st.sampled_from(MODELS))
def test_any_active_shutoff_wins(rules: list[ScopeRule], model: str) -> None:
    verdict = outcome(rules, model)
    active = [r for r in rules if r.expires_at > NOW]
    shutoffs = {r.scope for r in active if r.action == SHUTOFF}
    assert (verdict.action == SHUTOFF) == bool(shutoffs)
    if shutoffs:
        assert verdict.scope in shutoffs and verdict.blocked and verdict.http_status == 402


@settings(max_examples=300)
@given(rules_strategy, st.sampled_from(MODELS))
def test_order_of_scopes_does_not_matter(rules: list[ScopeRule], model: str) -> None:
    first = outcome(fresh(rules), model)
    assert outcome(fresh(list(reversed(rules))), model)[:2] == first[:2]


@settings(max_examples=300)
@given(rules_strategy, rules_strategy, st.sampled_from(MODELS))
def test_adding_a_scope_never_loosens(rules: list[ScopeRule], extra: list[ScopeRule], model: str) -> None:
    """Only a fallback map can make an outcome milder (by routing to an allowed model); nothing else can."""
    extra = [r for r in extra if not r.fallback]
    before = outcome(fresh(rules), model)
    after = outcome(fresh(rules + extra), model)
    assert OUTCOME_RANK[after.action] >= OUTCOME_RANK[before.action]


@settings(max_examples=300)
@given(rules_strategy, st.sampled_from(MODELS))
def test_expired_decisions_have_no_effect(rules: list[ScopeRule], model: str) -> None:
    live = [r for r in rules if r.expires_at > NOW]
    assert outcome(fresh(rules), model)[:3] == outcome(fresh(live), model)[:3]


@settings(max_examples=300)
@given(rules_strategy, st.sampled_from(MODELS))
def test_served_model_is_allowed_by_every_scope_unless_blocked(rules: list[ScopeRule], model: str) -> None:
    verdict = outcome(rules, model)
    if not verdict.blocked:
        for r in rules:
            if r.expires_at > NOW and r.allowed is not None:
                assert verdict.model in r.allowed
    if verdict.action == DENY_MODEL:
        assert verdict.http_status == 403


@settings(max_examples=500)
@given(rules_strategy.filter(lambda rules: len(rules) == 1), st.sampled_from(MODELS), st.sampled_from(["", "u1"]))
def test_single_rule_fast_path_agrees_with_the_general_one(rules: list[ScopeRule], model: str, key: str) -> None:
    (one,) = fresh(rules)
    (many,) = fresh(rules)
    assert resolve_one(one, key, model, NOW, 100.0) == resolve_many([(many, key)], model, NOW, 100.0)


def test_precedence_ladder() -> None:
    ladder = [
        rule("org:a", ALERT, reason="80%"),
        rule("division:d", FALLBACK, fallback_models={"gpt-4o": "gpt-4o-mini"}, reason="90%"),
        rule("team:t", THROTTLE, throttle_rps=0.0, reason="slow down"),
        rule("project:p", ALLOW, allowed_models=["claude-3-haiku"]),
        rule("feature:f", SHUTOFF, reason="100%"),
    ]
    expected = [ALERT, FALLBACK, THROTTLE, DENY_MODEL, SHUTOFF]
    for n, action in enumerate(expected, start=1):
        verdict = outcome(ladder[:n])
        assert verdict.action == action
        assert verdict.scope == ladder[n - 1].scope


def test_fallback_chain_and_allowed_model_after_fallback() -> None:
    team = rule("team:t", FALLBACK, fallback_models={"gpt-4o": "gpt-4o-mini"})
    org = rule("org:a", FALLBACK, fallback_models={"gpt-4o-mini": "llama-3.2-1b"})
    assert outcome([team, org]) == Verdict(FALLBACK, "llama-3.2-1b", None, "gpt-4o -> llama-3.2-1b", "org:a")
    only_mini = rule("project:p", ALLOW, allowed_models=["gpt-4o-mini"])
    assert outcome([team, only_mini]).model == "gpt-4o-mini"
    assert outcome([team, only_mini]).action == FALLBACK
    cycle = rule("org:a", FALLBACK, fallback_models={"gpt-4o-mini": "gpt-4o"})
    assert outcome([team, cycle]).action in (FALLBACK, ALERT)


@pytest.mark.parametrize(
    ("model", "served"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o-mini"),
        ("gpt-4o-latest", "gpt-4o-mini"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-haiku-latest"),
        ("claude-3-5-sonnet-latest", "claude-3-5-haiku-latest"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini-2024-07-18"),  # another model, not a snapshot of gpt-4o
    ],
)
def test_a_dated_snapshot_or_alias_of_a_model_falls_back_as_the_model_does(model: str, served: str) -> None:
    """Clients call dated model ids: ``gpt-4o: gpt-4o-mini`` was silently skipped for ``gpt-4o-2024-08-06``, which
    was served unchanged in the fallback band (a user session)."""
    models = {"gpt-4o": "gpt-4o-mini", "claude-3-5-sonnet-latest": "claude-3-5-haiku-latest"}
    verdict = outcome([rule("team:t", FALLBACK, fallback_models=models)], model)
    assert verdict.model == served
    assert verdict.action == (ALERT if served == model else FALLBACK)
    with_mini = {**models, "gpt-4o-mini": "llama-3.2-1b"}  # the model itself named: its own entry, exactly
    assert outcome([rule("team:t", FALLBACK, fallback_models=with_mini)], "gpt-4o-mini").model == "llama-3.2-1b"


def test_fallback_without_mapping_for_the_model_is_an_alert() -> None:
    verdict = outcome([rule("team:t", FALLBACK, fallback_models={"o1": "o1-mini"}, reason="90% of budget")])
    assert verdict == Verdict(ALERT, "gpt-4o", None, "90% of budget", "team:t")


def test_shutoff_retry_after_is_time_to_expiry() -> None:
    until = datetime.fromtimestamp(NOW + 120, UTC)
    assert outcome([rule("team:t", SHUTOFF, expires_at=until)]).retry_after_s == pytest.approx(120)


def test_throttle_uses_a_bucket_per_wildcard_value() -> None:
    users = rule("user:*", THROTTLE, throttle_rps=1.0)
    first_a = resolve([(users, "a")], "m", NOW, 10.0)
    second_a = resolve([(users, "a")], "m", NOW, 10.0)
    first_b = resolve([(users, "b")], "m", NOW, 10.0)
    assert (first_a.action, second_a.action, first_b.action) == (ALLOW, THROTTLE, ALLOW)
    assert second_a.retry_after_s == pytest.approx(1.0)
    assert resolve([(users, "a")], "m", NOW, 11.0).action == ALLOW


def test_blocked_throttle_takes_no_token_from_other_scopes() -> None:
    open_team = rule("team:t", THROTTLE, throttle_rps=1.0)
    closed_user = rule("user:u", THROTTLE, throttle_rps=0.0)
    assert outcome([open_team, closed_user]).action == THROTTLE
    assert outcome([open_team]).action == ALLOW  # the team's single token is still there


class TokenBucketModel:
    """The reference a ``RateLimit`` must agree with: a token bucket per value, full when first seen."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = rate if rate >= 1.0 else (1.0 if rate > 0 else 0.0)
        self.buckets: dict[str, tuple[float, float]] = {}  # value -> (tokens, updated)

    def try_take(self, key: str, now: float) -> float:
        if self.rate <= 0:
            return ZERO_RATE_RETRY_S
        tokens, updated = self.buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - updated) * self.rate)
        if tokens >= 1.0:
            self.buckets[key] = (tokens - 1.0, now)
            return 0.0
        self.buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


@settings(max_examples=300)
@given(
    st.sampled_from([0.0, 0.2, 1.0, 2.5, 10.0, 333.0]),
    st.lists(st.tuples(st.sampled_from("abcd"), st.floats(0.0, 0.7)), min_size=1, max_size=300),
    st.integers(1, 3),
)
def test_rate_limit_grants_what_a_token_bucket_per_value_grants(
    rate: float, requests: list[tuple[str, float]], keep: int
) -> None:
    """Same grants and (to rounding) the same waits as a token bucket per value, with pruning at ``keep`` values
    (a value back on schedule is forgotten, and must be answered as if never seen)."""
    limit, model = RateLimit(rate, keep=keep), TokenBucketModel(rate)
    now = 1000.0
    for key, gap in requests:
        now += gap
        expected = model.try_take(key, now)
        got = limit.try_take(key, now)
        assert (got == 0.0) == (expected == 0.0) or abs(got - expected) < 1e-6, (key, now, got, expected)
        if got > 0.0 and expected > 0.0:
            assert got == pytest.approx(expected, abs=1e-6)


@given(
    st.floats(0.1, 500.0),
    st.lists(st.floats(0.0, 0.5), min_size=1, max_size=200),
)
def test_rate_limit_never_exceeds_rate_plus_burst(rate: float, gaps: list[float]) -> None:
    limit = RateLimit(rate)
    now, granted = 0.0, 0
    for gap in gaps:
        now += gap
        if limit.wait_time("u", now) == 0.0:
            limit.take("u", now)
            granted += 1
    assert granted <= limit.capacity + rate * now + 1e-6


def test_a_throttle_on_every_user_keeps_only_the_users_still_limited() -> None:
    """One float per user, and users back on schedule are dropped: a million one-off users do not stay in memory."""
    limit = RateLimit(2.0, keep=1000)
    for i in range(1_000_000):
        assert limit.try_take(f"user{i}", i * 0.001) == 0.0  # 1,000 new users a second, each once
    assert len(limit) <= 2 * 1000  # only those seen within the last second (their next request is not yet due)
    busy = RateLimit(1.0, keep=10)
    for i in range(100):
        busy.try_take(f"user{i}", 5.0)  # all at once: none is back on schedule, so none may be dropped
    assert len(busy) == 100
    assert all(busy.try_take(f"user{i}", 5.0) > 0.0 for i in range(100))


def test_versions_only_move_forward() -> None:
    v2 = rule("team:t", SHUTOFF, version=2)
    assert newer(None, v2)
    assert not newer(v2, rule("team:t", ALLOW, version=2))
    assert not newer(v2, rule("team:t", ALLOW, version=1))
    assert newer(v2, rule("team:t", ALLOW, version=3))


@pytest.mark.parametrize("scope", ["team", "team:", ":x", ""])
def test_malformed_scopes_are_refused(scope: str) -> None:
    with pytest.raises(ValueError):
        parse_scope(scope)


def test_every_action_pairing_resolves_to_the_stricter() -> None:
    for a, b in itertools.product([ALLOW, ALERT, SHUTOFF], repeat=2):
        verdict = outcome([rule("team:t", a), rule("user:u", b)])
        assert verdict.action == max(a, b, key=ACTION_RANK.__getitem__)


def test_a_shutoff_throttles_the_critical_features_it_lists() -> None:
    shutoff = ScopeRule.from_decision(
        Decision(scope="team:marketing", action="shutoff", version=1, critical_throttle_rps={"ai_chatbot": 1.0})
    )
    chatbot = shutoff.for_feature("ai_chatbot")
    assert shutoff.for_feature("campaigns") is shutoff and shutoff.for_feature("ai_chatbot") is chatbot
    assert resolve([(chatbot, "")], "gpt-4o", 0.0, 0.0).action == "allow"  # one request per second passes
    throttled = resolve([(chatbot, "")], "gpt-4o", 0.0, 0.1)
    assert throttled.action == "throttle" and "critical feature ai_chatbot" in throttled.reason
    assert resolve([(shutoff, "")], "gpt-4o", 0.0, 0.2).action == "shutoff"

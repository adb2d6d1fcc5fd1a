"""The outcome plans the Enforcer keeps per set of matched rules answer exactly as the general rule does."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.core.events import Decision
from spendstream.edge.enforcer import Enforcer
from spendstream.edge.verdict import ACTION_RANK, SHUTOFF, ScopeRule, follow, plan, resolve_many

NOW = 1_800_000_000.0
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-haiku"]
SCOPES = ["*", "team:t1", "team:t2", "team:*", "user:u1", "user:*", "feature:f", "project:p"]


def decision(scope: str, action: str, version: int, fallback, allowed, rate, expires_in, critical) -> Decision:
    return Decision(
        scope=scope,
        action=action,
        version=version,
        fallback_models=dict(fallback),
        allowed_models=allowed,
        throttle_rps=rate,
        critical_throttle_rps={"f": 1.0} if critical else {},
        expires_at=None if expires_in is None else datetime.fromtimestamp(NOW + expires_in, UTC),
    )


decisions_strategy = st.lists(
    st.builds(
        decision,
        st.sampled_from(SCOPES),
        st.sampled_from(list(ACTION_RANK)),
        st.integers(1, 3),
        st.lists(st.tuples(st.sampled_from(MODELS), st.sampled_from(MODELS)), max_size=2),
        st.lists(st.sampled_from(MODELS), max_size=2),
        st.sampled_from([0.0, 1.0, 1e9]),
        st.sampled_from([None, None, -5.0, 3600.0]),
        st.booleans(),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(decisions_strategy, st.sampled_from(MODELS), st.lists(st.sampled_from(["", "u1", "u2"]), min_size=8))
def test_following_a_kept_plan_answers_as_resolve_many_call_after_call(decisions, model, keys) -> None:
    """Same rules, two copies (separate limits): one resolved each time, the other planned once and followed."""
    general = [ScopeRule.from_decision(d) for d in decisions]
    planned = [ScopeRule.from_decision(d) for d in decisions]
    keys = keys[: len(decisions)]
    kept = plan(planned, model, NOW)
    for call in range(4):
        mono = 100.0 + call * 0.3  # slow enough that a 1 request/s bucket refuses some of them
        expected = resolve_many(list(zip(general, keys, strict=True)), model, NOW, mono)
        if kept is None:
            assert expected.action == SHUTOFF and expected.retry_after_s is not None
        else:
            assert follow(kept, planned, keys, mono) == expected


@settings(max_examples=300, deadline=None)
@given(decisions_strategy, st.sampled_from(MODELS), st.floats(0.0, 1.0))
def test_a_plan_holds_over_its_whole_validity_range(decisions, model, fraction) -> None:
    rules = [ScopeRule.from_decision(d) for d in decisions]
    kept = plan(rules, model, NOW)
    if kept is None:
        return
    assert kept.valid_from <= NOW < kept.valid_until
    later = NOW + fraction * (min(kept.valid_until, NOW + 7200) - NOW) * 0.999
    again = plan(rules, model, later)
    assert again is not None and again.verdict == kept.verdict and again.throttles == kept.throttles


def enforcer() -> Enforcer:
    """An Enforcer fed through ``apply`` (no broker is contacted before ``start``)."""
    return Enforcer("127.0.0.1:1", policy_topic=None, clock=lambda: datetime.fromtimestamp(NOW, UTC))


requests_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "team": st.sampled_from(["", "t1", "t2", "t3"]),
            "user": st.sampled_from(["", "u1", "u2"]),
            "feature": st.sampled_from(["", "f", "g"]),
            "project": st.sampled_from(["", "p"]),
            "model": st.sampled_from(MODELS),
        }
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(decisions_strategy, requests_strategy)
def test_kept_plans_follow_every_decision_that_arrives(decisions, requests) -> None:
    """After each decision, a long-lived Enforcer (plans kept from earlier requests) answers as a new one."""
    # unlimited or zero rates only: the answers do not depend on what earlier requests took from a bucket
    decisions = [d for d in decisions if d.throttle_rps != 1.0 and not d.critical_throttle_rps]
    long_lived = enforcer()
    for n, arriving in enumerate(decisions):
        long_lived.apply(arriving.scope, arriving)
        new = enforcer()
        for earlier in decisions[: n + 1]:
            new.apply(earlier.scope, earlier)
        for request in requests:
            assert long_lived.check(**request) == new.check(**request)
            assert long_lived.check(**request) == new.check(**request)  # the second answer comes from a kept plan


def test_kept_throttle_plans_take_the_token_of_the_matched_value() -> None:
    """``user:*`` holds one bucket per user and ``team:t`` one for the team, also when a kept plan answers."""
    edge = enforcer()
    once = 1e-6  # requests/s: each bucket lets one request through, then refuses for days
    edge.apply("user:*", Decision(scope="user:*", action="throttle", version=1, throttle_rps=once))
    answers = [edge.check(user=user, model="m") for user in ("u1", "u1", "u2", "u2", "u1")]
    assert [a.action for a in answers] == ["allow", "throttle", "allow", "throttle", "throttle"]
    assert answers[1].scope == "user:*" and answers[1].retry_after_s > 3600
    edge.apply("team:t", Decision(scope="team:t", action="throttle", version=1, throttle_rps=once))
    assert edge.check(team="t", user="u3", model="m").action == "allow"  # takes u3's token and the team's
    refused = edge.check(team="t", user="u4", model="m")
    assert (refused.action, refused.scope) == ("throttle", "team:t")
    assert edge.check(user="u4", model="m").action == "allow"  # the team's refusal took none of u4's tokens
    assert edge.check(user="u3", model="m").action == "throttle"

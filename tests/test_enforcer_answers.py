"""The answers the Enforcer keeps per repeated request change with every decision, expiry, policy and hierarchy change.

A request is answered from the rules the first two times and from its kept answer after that, so each check below
repeats a request several times before and after the change it must see.
"""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.core.attribution import DIMENSIONS
from spendstream.core.events import Decision
from spendstream.core.policy import parse_policy
from spendstream.edge.enforcer import Enforcer

NOW = 1_800_000_000.0
REPEATS = 4  # enough for the answer to come from the kept one


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


def repeated(edge: Enforcer, **request: str) -> list[str]:
    """The actions of the same request checked several times in a row."""
    return [edge.check(**request).action for _ in range(REPEATS)]


def test_a_kept_answer_changes_when_a_decision_arrives_expires_or_is_deleted() -> None:
    clock = Clock(NOW)
    edge = Enforcer("127.0.0.1:1", policy_topic=None, clock=clock)
    assert repeated(edge, team="t", user="u", model="gpt-4o") == ["allow"] * REPEATS
    fallback = Decision(
        scope="team:t",
        action="fallback",
        version=1,
        fallback_models={"gpt-4o": "gpt-4o-mini"},
        expires_at=datetime.fromtimestamp(NOW + 60, UTC),
    )
    edge.apply("team:t", fallback)
    assert repeated(edge, team="t", user="u", model="gpt-4o") == ["fallback"] * REPEATS
    assert edge.check(team="t", user="u", model="gpt-4o").model == "gpt-4o-mini"
    clock.now = NOW + 61  # the fallback expired: no decision arrives, the clock alone changes the answer
    assert repeated(edge, team="t", user="u", model="gpt-4o") == ["allow"] * REPEATS
    edge.apply("user:u", Decision(scope="user:u", action="shutoff", version=1))
    assert repeated(edge, team="t", user="u", model="gpt-4o") == ["shutoff"] * REPEATS
    edge.apply("user:u", None)  # a tombstone
    assert repeated(edge, team="t", user="u", model="gpt-4o") == ["allow"] * REPEATS
    edge.apply("*", Decision(scope="*", action="shutoff", version=1))  # the global scope
    assert repeated(edge, team="t", user="u", model="gpt-4o") == ["shutoff"] * REPEATS


def test_a_kept_answer_changes_with_the_policy_and_the_hierarchy() -> None:
    edge = Enforcer("127.0.0.1:1", policy_topic=None, hierarchy={})  # set here, not taken from the policy
    edge.apply("division:eng", Decision(scope="division:eng", action="alert", version=1, reason="eng at 80%"))
    assert repeated(edge, team="web", environment="development", model="gpt-4o") == ["allow"] * REPEATS
    edge.set_hierarchy({"team:web": "division:eng"})
    assert repeated(edge, team="web", environment="development", model="gpt-4o") == ["alert"] * REPEATS
    edge.set_policy(parse_policy("allowed_models:\n  'environment:development': [gpt-4o-mini]\n"))
    assert repeated(edge, team="web", environment="development", model="gpt-4o") == ["deny_model"] * REPEATS
    edge.set_policy(parse_policy("quotas:\n  - {scope: 'team:*', requests_per_day: 6}\n"))
    assert repeated(edge, team="web", model="gpt-4o") == ["alert"] * REPEATS
    # the team's four earlier requests today were not counted (no quota then): two more go out, then none
    assert repeated(edge, team="web", model="gpt-4o") == ["alert", "alert", "shutoff", "shutoff"]


def test_a_kept_answer_counts_its_quota_until_midnight_then_counts_afresh() -> None:
    midnight = datetime(2027, 1, 2, tzinfo=UTC).timestamp()
    clock = Clock(midnight - 10)
    edge = Enforcer(
        "127.0.0.1:1",
        policy=parse_policy("quotas:\n  - {scope: 'user:*', requests_per_day: 3}\n"),
        policy_topic=None,
        clock=clock,
    )
    assert repeated(edge, user="u", model="m") == ["allow", "allow", "allow", "shutoff"]
    assert edge.requests_counted("user:u") == REPEATS
    clock.now = midnight
    assert repeated(edge, user="u", model="m") == ["allow", "allow", "allow", "shutoff"]
    assert edge.requests_counted("user:u") == REPEATS


def test_a_kept_throttle_answer_takes_a_token_per_request() -> None:
    edge = Enforcer("127.0.0.1:1", policy_topic=None)
    edge.apply("user:*", Decision(scope="user:*", action="throttle", version=1, throttle_rps=1e-6))
    assert repeated(edge, user="u1", model="m") == ["allow"] + ["throttle"] * (REPEATS - 1)
    assert repeated(edge, user="u2", model="m") == ["allow"] + ["throttle"] * (REPEATS - 1)


MODELS = ["gpt-4o", "gpt-4o-mini"]


def decision_lists(scopes: list[str], throttle_rps: float, expiries: list[float | None]) -> st.SearchStrategy:
    """Lists of decisions on ``scopes``: every action, fallbacks and allowed lists on gpt-4o, throttles at
    ``throttle_rps``, expiring after one of ``expiries`` seconds (None: never)."""
    return st.lists(
        st.builds(
            lambda scope, action, version, allowed, expires_in: Decision(
                scope=scope,
                action=action,
                version=version,
                fallback_models={"gpt-4o": "gpt-4o-mini"} if action == "fallback" else {},
                allowed_models=["gpt-4o-mini"] if allowed else [],
                throttle_rps=throttle_rps if action == "throttle" else None,
                expires_at=None if expires_in is None else datetime.fromtimestamp(NOW + expires_in, UTC),
            ),
            st.sampled_from(scopes),
            st.sampled_from(["alert", "fallback", "throttle", "shutoff", "allow"]),
            st.integers(1, 3),
            st.booleans(),
            st.sampled_from(expiries),
        ),
        min_size=1,
        max_size=6,
    )


def request_lists(users: list[str], max_size: int) -> st.SearchStrategy:
    """Lists of requests over two teams, ``users`` and one feature, for either model."""
    return st.lists(
        st.fixed_dictionaries(
            {
                "team": st.sampled_from(["", "t1", "t2"]),
                "user": st.sampled_from(users),
                "feature": st.sampled_from(["", "f"]),
                "model": st.sampled_from(MODELS),
            }
        ),
        min_size=1,
        max_size=max_size,
    )


# throttles that never refuse, so answers depend on the decisions and the clock alone
decisions_strategy = decision_lists(
    ["*", "team:t1", "team:*", "user:u1", "user:*", "feature:f"], 1e9, [None, None, 30.0, 90.0]
)
requests_strategy = request_lists(["", "u1", "u2"], 4)


@settings(max_examples=150, deadline=None)
@given(decisions_strategy, requests_strategy)
def test_a_long_lived_enforcer_answers_as_a_new_one_after_each_decision_and_clock_step(decisions, requests) -> None:
    clock = Clock(NOW)
    long_lived = Enforcer("127.0.0.1:1", policy_topic=None, clock=clock)
    for n, arriving in enumerate(decisions):
        long_lived.apply(arriving.scope, arriving)
        for step in (0.0, 60.0):  # some decisions expire in between
            clock.now = NOW + step
            new = Enforcer("127.0.0.1:1", policy_topic=None, clock=clock)
            for earlier in decisions[: n + 1]:
                new.apply(earlier.scope, earlier)
            for request in requests:
                expected = new.check(**request)
                assert [long_lived.check(**request) for _ in range(REPEATS)] == [expected] * REPEATS
        clock.now = NOW


def test_users_without_rules_of_their_own_share_an_answer_but_each_has_its_own_throttle() -> None:
    """A user never seen before is answered from the answer users like them share, counted by its own limit."""
    edge = Enforcer("127.0.0.1:1", policy_topic=None)
    edge.apply("user:*", Decision(scope="user:*", action="throttle", version=1, throttle_rps=1e-6))
    edge.apply("team:t", Decision(scope="team:t", action="fallback", version=1, fallback_models={"m": "m-mini"}))
    edge.apply("user:boss", Decision(scope="user:boss", action="shutoff", version=1))
    first = [edge.check(team="t", user=f"u{i}", model="m") for i in range(50)]
    assert {(v.action, v.model) for v in first} == {("fallback", "m-mini")}  # one request each: within its limit
    assert {edge.check(team="t", user=f"u{i}", model="m").action for i in range(50)} == {"throttle"}
    assert edge.check(team="t", user="boss", model="m").action == "shutoff"  # a decision of its own: not shared
    assert edge.check(team="t", user="new", model="m").action == "fallback"
    assert len(edge._answers) <= 2  # one shared answer (and boss's), not one per user


def test_a_per_user_policy_rule_stops_the_sharing_and_a_team_quota_counts_all_its_users() -> None:
    per_user = Enforcer(
        "127.0.0.1:1", policy=parse_policy("quotas:\n  - {scope: 'user:*', requests_per_day: 2}\n"), policy_topic=None
    )
    for user in ("u1", "u2", "u3"):
        assert repeated(per_user, team="t", user=user, model="m") == ["allow", "allow", "shutoff", "shutoff"]
    per_team = Enforcer(
        "127.0.0.1:1", policy=parse_policy("quotas:\n  - {scope: 'team:*', requests_per_day: 5}\n"), policy_topic=None
    )
    actions = [per_team.check(team="t", user=f"u{i % 3}", model="m").action for i in range(8)]
    assert actions == ["allow"] * 5 + ["shutoff"] * 3
    listed = Enforcer(
        "127.0.0.1:1", policy=parse_policy("allowed_models:\n  'user:intern': [m-mini]\n"), policy_topic=None
    )
    for user in ("u1", "u2", "intern", "u3"):
        expected = "deny_model" if user == "intern" else "allow"
        assert repeated(listed, team="t", user=user, model="m") == [expected] * REPEATS


# one request per limit, then refused for days: answers show whose limit counted
one_request_throttles = decision_lists(
    ["*", "team:t1", "team:*", "user:u1", "user:*", "feature:f", "feature:*"], 1e-6, [None]
)
many_users = request_lists(["", "u1", "u2", "u3", "u4"], 30)


@settings(max_examples=150, deadline=None)
@given(one_request_throttles, many_users)
def test_shared_answers_give_every_user_what_answers_of_its_own_would(decisions, requests) -> None:
    """The same decisions and requests through an Enforcer that shares answers among users and one that does not:
    every verdict is the same, throttles included (each limit lets exactly one request through)."""
    sharing = Enforcer("127.0.0.1:1", policy_topic=None)
    alone = Enforcer("127.0.0.1:1", policy_topic=None)
    for decision in decisions:
        sharing.apply(decision.scope, decision)
        alone.apply(decision.scope, decision)
    alone._shared_users = None  # what a per-user policy rule sets: every user answered on its own
    for request in requests:
        shared, own = sharing.check(**request), alone.check(**request)
        assert shared._replace(retry_after_s=None) == own._replace(retry_after_s=None), request  # waits: real time
        assert (shared.retry_after_s is None) == (own.retry_after_s is None), request


def test_a_refreshed_decision_keeps_the_rule_in_force_and_a_hard_caps_allow_only_opens_a_ledger() -> None:
    """The processor refreshes an alert's spend every few seconds, and publishes a hard cap's standing as an allow:
    neither may change an answer, restart a throttle's count, or stop a user's requests sharing answers; a
    refresh still moves the reservation ledger to the new spend."""
    clock = Clock(NOW)
    edge = Enforcer("127.0.0.1:1", policy_topic=None, clock=clock)
    period_end = datetime.fromtimestamp(NOW + 3600, UTC)
    issued = datetime.fromtimestamp(NOW, UTC)

    def alert(version: int, spend: int) -> Decision:
        return Decision(
            scope="team:t", action="alert", version=version, reason=f"{spend} spent", spend_nanos=spend,
            limit_nanos=1_000, issued_at=issued, expires_at=period_end,
        )  # fmt: skip

    edge.apply("team:t", alert(1, 800))
    rule = edge.decisions()["team:t"]
    assert repeated(edge, team="t", user="u", model="gpt-4o") == ["alert"] * REPEATS
    answers = edge._answers
    edge.apply("team:t", alert(2, 900))
    assert edge.decisions()["team:t"] is rule and (rule.version, rule.reason) == (2, "900 spent")
    assert edge._answers is answers  # nothing the answers were built on changed
    assert edge.reservations.ledgers["team:t"].spend_nanos == 900
    tracked = Decision(
        scope="user:u", action="allow", version=1, spend_nanos=5, limit_nanos=1_000, issued_at=issued,
        expires_at=period_end,
    )  # fmt: skip
    edge.apply("user:u", tracked)
    assert edge._answers is answers and "u" not in edge._index[DIMENSIONS.index("user")]  # u shares answers still
    assert edge.reservations.ledgers["user:u"].spend_nanos == 5
    assert repeated(edge, team="t", user="u", model="gpt-4o") == ["alert"] * REPEATS
    edge.apply("team:t", Decision(scope="team:t", action="allow", version=3, spend_nanos=10, limit_nanos=1_000))
    assert repeated(edge, team="t", user="u", model="gpt-4o") == ["allow"] * REPEATS  # lifted
    assert "team:t" not in edge.reservations.ledgers  # a plain allow is not refreshed: it opens no ledger


def test_a_critical_features_request_is_not_refused_by_an_ordinary_budgets_reservation() -> None:
    """README: a critical feature is throttled, never shut off, whatever scope is exhausted, unless by a hard cap."""
    policy = parse_policy(
        """
features: {support_bot: {critical: true, throttle_rps: 2}}
budgets:
  - {scope: "team:t", period: day, amount_usd: 1}
  - {scope: "team:h", period: day, amount_usd: 1, hard_cap: true}
"""
    )
    edge = Enforcer("127.0.0.1:1", policy=policy, policy_topic=None)
    issued, end = datetime.fromtimestamp(NOW, UTC), datetime.fromtimestamp(NOW + 3600, UTC)
    edge._wall = lambda: NOW  # type: ignore[method-assign]
    for team in ("t", "h"):
        used_up = Decision(
            scope=f"team:{team}", action="fallback", version=1, spend_nanos=10**9, limit_nanos=10**9,
            issued_at=issued, expires_at=end,
        )  # fmt: skip
        edge.apply(f"team:{team}", used_up)
    assert edge.reserve(lambda: 5, team="t", feature="search").scope == "team:t"
    # The ordinary budget is used up: the critical feature is throttled to its 2 requests/s (a burst of one second's
    # worth at most), not refused
    first, second, third = (edge.reserve(lambda: 5, team="t", feature="support_bot") for _ in range(3))
    assert first.exhausted == second.exhausted == "team:t"
    assert third.scope == "team:t" and third.throttle_rps == 2 and 0 < third.retry_after_s <= 0.5
    assert edge.reserve(lambda: 5, team="h", feature="support_bot").scope == "team:h"  # a hard cap stops it


def test_a_team_the_policy_does_not_give_a_critical_feature_is_shut_off_not_throttled() -> None:
    """A review, through the SDK's Enforcer: marketing, shut off, checked its calls as support's critical
    ``ai_chatbot`` and got throttles (2 requests/s) instead of its shutoff. The gateway refuses such a call (403);
    the Enforcer gives the critical feature's throttle only to the teams the policy gives it."""
    policy = parse_policy(
        """
features: {ai_chatbot: {critical: true, throttle_rps: 2, teams: [support]}}
budgets:
  - {scope: "team:marketing", period: day, amount_usd: 1}
  - {scope: "team:support", period: day, amount_usd: 1}
"""
    )
    edge = Enforcer("127.0.0.1:1", policy=policy, policy_topic=None)
    for team in ("marketing", "support"):
        shutoff = Decision(scope=f"team:{team}", action="shutoff", version=1, critical_throttle_rps={"ai_chatbot": 2.0})
        edge.apply(f"team:{team}", shutoff)
    assert edge.check(team="marketing", feature="ai_chatbot", model="gpt-4o").action == "shutoff"
    assert edge.check(team="support", feature="ai_chatbot", model="gpt-4o").action != "shutoff"
    issued, end = datetime.fromtimestamp(NOW, UTC), datetime.fromtimestamp(NOW + 3600, UTC)
    edge._wall = lambda: NOW  # type: ignore[method-assign]
    used_up = Decision(
        scope="team:marketing", action="fallback", version=2, spend_nanos=10**9, limit_nanos=10**9,
        issued_at=issued, expires_at=end,
    )  # fmt: skip
    edge.apply("team:marketing", used_up)
    held = edge.reserve(lambda: 5, team="marketing", feature="ai_chatbot")
    assert held.scope == "team:marketing" and not getattr(held, "throttle_rps", None)  # refused, not paced

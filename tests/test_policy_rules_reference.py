"""The edge's request quotas and allowed-model lists (counters and remembered answers) against a plain reference.

The reference recounts everything from the policy per request: requests per (scope, local date), the smaller cap
of a scope's own quota and its template's, lists matched by regular expression. Every verdict of
``Enforcer.check()`` must equal the reference's across local midnights (one a DST day), policy changes mid-day
(counts carry over unless the timezone changes) and a team fallback decision (lists apply to the model served).
"""

from __future__ import annotations

import re
import sys
import threading
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.core.attribution import DIMENSIONS
from spendstream.core.events import Decision
from spendstream.core.policy import Policy, parse_policy
from spendstream.edge.enforcer import Enforcer

POLICIES = [
    parse_policy(
        "quotas:\n  - {scope: 'user:*', requests_per_day: 3}\n  - {scope: 'user:bot', requests_per_day: 1}\n"
        "  - {scope: 'team:web', requests_per_day: 4}\n"
        "allowed_models:\n  'environment:development': [gpt-4o-mini, 'local/*']\n"
        "  'team:*': ['gpt-4o*', 'local/*']\n  'team:ops': ['*']\n"
    ),
    parse_policy("quotas:\n  - {scope: 'user:*', requests_per_day: 2}\n  - {scope: 'user:bot', requests_per_day: 5}\n"),
    parse_policy("allowed_models:\n  'environment:*': [gpt-4o-mini]\n"),
    parse_policy(
        "timezone: Europe/Berlin\nquotas:\n  - {scope: 'user:*', requests_per_day: 3}\n"
        "  - {scope: 'team:*', requests_per_day: 2}\n"
        "allowed_models:\n  'environment:development': ['local/*']\n"
    ),
    parse_policy(
        "quotas:\n  - {scope: 'team:*', requests_per_day: 5}\n  - {scope: 'user:u1', requests_per_day: 2}\n"
        "  - {scope: 'user:*', tokens_per_day: 100}\n"
    ),
]
TEAMS = ["", "web", "ops"]
USERS = ["", "u1", "u2", "bot"]
ENVIRONMENTS = ["", "development", "production"]
MODELS = ["gpt-4o", "gpt-4o-mini", "local/qwen", "o1"]
FALLBACK = {"gpt-4o": "gpt-4o-mini"}  # team:web's fallback decision
# Minutes before a local midnight (UTC, and Berlin on the night the clocks go forward).
STARTS = [
    datetime(2026, 3, 10, 12, tzinfo=UTC).timestamp(),
    datetime(2026, 3, 10, 23, 50, tzinfo=UTC).timestamp(),
    datetime(2026, 3, 28, 23, 50, tzinfo=ZoneInfo("Europe/Berlin")).timestamp(),
]

requests = st.tuples(
    st.just("request"), st.sampled_from(TEAMS), st.sampled_from(USERS), st.sampled_from(ENVIRONMENTS),
    st.sampled_from(MODELS),
)  # fmt: skip
advances = st.tuples(st.just("advance"), st.sampled_from([0, 1, 300, 1200, 3600, 6 * 3600, 23 * 3600]))
policy_changes = st.tuples(st.just("policy"), st.integers(0, len(POLICIES) - 1))


def _glob(entry: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in entry.split("*")), re.DOTALL)


class Reference:
    """What the edge must answer, recomputed from the policy and a log of counts on every request."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.counts: dict[tuple[str, date], int] = {}

    def counted_dimensions(self, policy: Policy) -> set[str]:
        return {q.scope.partition(":")[0] for q in policy.quotas if q.requests_per_day is not None}

    def change(self, policy: Policy) -> None:
        kept = self.counted_dimensions(policy)
        if policy.timezone != self.policy.timezone or not self.counted_dimensions(self.policy):
            kept = set()
        self.counts = {key: n for key, n in self.counts.items() if key[0].partition(":")[0] in kept}
        self.policy = policy

    def cap(self, dimension: str, value: str) -> int | None:
        caps = [
            q.requests_per_day
            for q in self.policy.quotas
            if q.requests_per_day is not None and q.scope in (f"{dimension}:{value}", f"{dimension}:*")
        ]
        return min(caps) if caps else None

    def check(self, wall: float, request: dict[str, str], model: str) -> tuple:
        tz = self.policy.tz
        today = datetime.fromtimestamp(wall, tz).date()
        refusals = []
        for dimension in DIMENSIONS:
            value = request.get(dimension, "")
            cap = self.cap(dimension, value) if value else None
            if cap is None:
                continue
            scope = f"{dimension}:{value}"
            used = self.counts.get((scope, today), 0)
            self.counts[(scope, today)] = used + 1
            if used >= cap:
                refusals.append((scope, used, cap))
        if refusals:
            scope, used, cap = min(refusals)
            midnight = datetime.combine(today + timedelta(days=1), time(0), tzinfo=tz).timestamp()
            reason = f"{scope} daily requests quota used up: {used}/{cap} (counted at this edge)"
            return ("shutoff", model, midnight - wall, reason, scope)
        served = FALLBACK.get(model, model) if request.get("team") == "web" else model
        lists = self.policy.allowed_models
        for dimension in DIMENSIONS:
            value = request.get(dimension, "")
            scope = f"{dimension}:{value}" if f"{dimension}:{value}" in lists else f"{dimension}:*"
            if value and scope in lists and not any(_glob(e).fullmatch(served) for e in lists[scope]):
                allowed = ", ".join(sorted(dict.fromkeys(lists[scope])))
                return (
                    "deny_model",
                    served,
                    None,
                    f"model {served} is not allowed for {scope} (allowed: {allowed})",
                    scope,
                )
        if served != model:
            return ("fallback", served, None, f"{model} -> {served}", "team:web")
        if request.get("team") == "web":  # a fallback decision that rewrites nothing is an alert
            return ("alert", model, None, "", "team:web")
        return ("allow", model, None, "", "")

    def used(self, scope: str, wall: float) -> int:
        return self.counts.get((scope, datetime.fromtimestamp(wall, self.policy.tz).date()), 0)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


@settings(max_examples=300, deadline=None)
@given(
    start=st.sampled_from(STARTS),
    first=st.integers(0, len(POLICIES) - 1),
    steps=st.lists(st.one_of(requests, requests, requests, advances, policy_changes), max_size=80),
)
def test_check_answers_as_the_reference_across_days_and_policy_changes(start: float, first: int, steps: list) -> None:
    clock = Clock(start)
    enforcer = Enforcer("127.0.0.1:1", policy=POLICIES[first], policy_topic=None, clock=clock)
    enforcer.apply("team:web", Decision(scope="team:web", action="fallback", version=1, fallback_models=FALLBACK))
    reference = Reference(POLICIES[first])
    counted_today = False
    for step in steps:
        if step[0] == "advance":
            clock.now += step[1]
            counted_today = counted_today and step[1] == 0
        elif step[0] == "policy":
            enforcer.set_policy(POLICIES[step[1]])
            reference.change(POLICIES[step[1]])
        else:
            _, team, user, environment, model = step
            request = {"team": team, "user": user, "environment": environment}
            assert tuple(enforcer.check(model=model, **request)) == reference.check(clock.now, request, model)
            counted_today = True
        if counted_today:  # the edge's counts of a day are read once it has counted a request of that day
            for scope in ("user:u1", "user:bot", "team:web", "team:ops"):
                assert enforcer.requests_counted(scope) == reference.used(scope, clock.now)


def test_concurrent_checks_admit_exactly_the_cap() -> None:
    """Counting takes no lock: checks from many threads, switching as often as the interpreter can, still admit
    exactly the cap and count every request."""
    cap, threads, calls = 2_000, 8, 1_000
    policy = parse_policy(f"quotas:\n  - {{scope: 'user:*', requests_per_day: {cap}}}\n")
    enforcer = Enforcer("127.0.0.1:1", policy=policy, policy_topic=None)
    admitted = [0] * threads

    def client(n: int) -> None:
        for _ in range(calls):
            admitted[n] += enforcer.check(user="shared", model="m").action == "allow"

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert sum(admitted) == cap
    assert enforcer.requests_counted("user:shared") == threads * calls

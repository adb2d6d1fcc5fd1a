"""Exact reservation at the edge: the pure ledger (hypothesis) and a gateway that holds requests to what remains."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from spendstream.core.config import Settings
from spendstream.core.events import Decision
from spendstream.edge.emitter import Emitter
from spendstream.edge.enforcer import Enforcer
from spendstream.edge.reservation import Refusal, Reservation, ReservationBook
from spendstream.gateway.app import Gateway, GatewayThread
from stub_upstream import StubUpstream, publish_decisions, publish_heartbeat, wait_for
from test_gateway import gateway_config, http, read_usage

SCOPE = ("team:web",)

# A request: its estimate, and the fraction of it that it really cost (a model answers at most max_tokens).
requests = st.lists(st.tuples(st.integers(0, 5_000), st.fractions(0, 1)), max_size=60)


@given(
    limit=st.integers(0, 100_000),
    spend=st.integers(0, 120_000),
    share=st.sampled_from([Fraction(1), Fraction(1, 2), Fraction(1, 3)]),
    calls=requests,
    settle_after=st.integers(0, 5),
)
def test_an_edge_passes_its_share_of_what_remains_by_less_than_one_request(
    limit: int, spend: int, share: Fraction, calls: list[tuple[int, Fraction]], settle_after: int
) -> None:
    book = ReservationBook(share, margin_s=0.5)
    book.observe("team:web", spend, limit, issued_at=100.0)
    cap = max(0, limit - spend) * share
    in_flight: list[tuple[Reservation, int]] = []
    spent = 0
    for i, (estimate, part) in enumerate(calls):
        before = spent + sum(r.nanos for r, _ in in_flight)
        held = book.reserve(SCOPE, lambda estimate=estimate: estimate, 100.0 + i)
        if isinstance(held, Refusal):
            assert held.scope == "team:web" and before >= cap
            assert held.in_flight == (spent < cap.numerator // cap.denominator)  # else what it settled refuses
        else:
            assert before < cap  # admitted only while something of the share was left
            in_flight.append((held, int(estimate * part)))
        while len(in_flight) > settle_after:  # requests finish in order, some while others are in flight
            done, cost = in_flight.pop(0)
            book.settle(done, cost, 100.0 + i)
            spent += cost
        assert spent + sum(r.nanos for r, _ in in_flight) < cap + max([e for e, _ in calls], default=0) + 1


@given(limit=st.integers(1, 10_000), estimate=st.integers(1, 20_000))
def test_a_released_reservation_gives_its_budget_back(limit: int, estimate: int) -> None:
    book = ReservationBook()
    book.standing_known = True
    book.observe("team:web", 0, limit, issued_at=0.0)
    first = book.reserve(SCOPE, lambda: estimate, 1.0)
    assert isinstance(first, Reservation) and first.nanos == estimate
    second = book.reserve(SCOPE, lambda: 1, 1.0)
    assert isinstance(second, Refusal) == (estimate >= limit)
    if isinstance(second, Reservation):
        book.release(second)
    book.release(first)
    assert book.ledgers["team:web"].available(Fraction(1)) == limit


@hypothesis_settings(max_examples=200)
@given(
    remaining=st.integers(0, 50_000),
    edges=st.integers(1, 4),
    order=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3_000)), max_size=80),
)
def test_edges_holding_one_share_each_together_pass_what_remains_by_at_most_one_request_each(
    remaining: int, edges: int, order: list[tuple[int, int]]
) -> None:
    books = [ReservationBook(Fraction(1, edges)) for _ in range(edges)]
    for book in books:
        book.observe("team:web", 1_000, 1_000 + remaining, issued_at=0.0)
    spent = 0
    for edge, cost in order:
        held = books[edge % edges].reserve(SCOPE, lambda cost=cost: cost, 1.0)
        if isinstance(held, Reservation):
            books[edge % edges].settle(held, cost, 1.0)
            spent += cost
    assert spent < remaining + edges * 3_000


def test_a_first_decision_counts_what_this_edge_settled_just_before_it_was_issued() -> None:
    book = ReservationBook(margin_s=0.5)
    unknown = book.reserve(SCOPE, lambda: 1 / 0, 90.0)  # no budget known: no estimate asked, nothing held
    assert isinstance(unknown, Reservation) and unknown.nanos == 0
    book.settle(book.reserve(SCOPE, lambda: 0, 90.0), 50, at=90.0)  # long before the decision: surely in its spend
    book.settle(unknown, 700, at=99.8)  # 0.2 s before it: maybe not
    book.observe("team:web", 300, 1_000, issued_at=100.0)
    assert book.ledgers["team:web"].available(Fraction(1)) == 0
    assert book.reserve(SCOPE, lambda: 1, 100.0).scope == "team:web"


def test_a_refusal_from_counting_requests_twice_is_lifted_by_the_refreshed_spend() -> None:
    """At 100 requests/s the half second before an alert holds 50 requests the processor had already counted: the
    edge counts them again and refuses at 75 % of the budget. The processor's refresh of the alert's spend (the
    refused requests cost nothing, so no threshold would be crossed again) lets the edge serve the rest."""
    book = ReservationBook(margin_s=0.5)
    for i in range(50):
        at = 99.5 + i / 100
        book.settle(book.reserve(SCOPE, lambda: 0, at), 40, at=at)
    book.observe("team:web", spend_nanos=3_000, limit_nanos=4_000, issued_at=100.0)  # its spend includes them
    assert book.reserve(SCOPE, lambda: 40, 100.1).scope == "team:web"  # 1,000 remain, 2,000 counted twice: refused
    book.observe("team:web", spend_nanos=3_000, limit_nanos=4_000, issued_at=102.0)  # the refresh, same spend
    held = book.reserve(SCOPE, lambda: 40, 102.1)
    assert isinstance(held, Reservation) and book.ledgers["team:web"].available(Fraction(1)) == 1_000 - 40


def test_a_budget_period_that_ended_holds_nothing() -> None:
    """The processor publishes no decision for a new period that starts at plain allow: the ledger of the old
    period must not refuse requests of the new one."""
    book = ReservationBook()
    book.standing_known = True
    book.observe("team:web", 1_000, 1_000, issued_at=100.0, expires_at=200.0)
    assert book.reserve(SCOPE, lambda: 500, 150.0).scope == "team:web"
    held = book.reserve(SCOPE, lambda: 500, 200.0)
    assert isinstance(held, Reservation) and held.ledgers == () and "team:web" not in book.ledgers


class _Caps:
    """A hard cap of 1,000 nanos on team:web, with periods of 100 s."""

    def opening(self, scope: str, now: float) -> tuple[int, float, float] | None:
        start = now - now % 100
        return (1_000, start, start + 100) if scope == "team:web" else None

    def limit_of(self, scope: str, period_name: str) -> int | None:
        return 1_000 if scope == "team:web" and period_name == "month" else None


def test_a_hard_cap_holds_its_scope_from_the_first_request_before_any_decision() -> None:
    """A burst before the processor has said anything is held to the cap's limit (nothing spent assumed); the first
    decision replaces that assumption with the processor's spend, and the ledger ends with its period."""
    book = ReservationBook(margin_s=0.5)
    book.set_caps(_Caps())
    starting = book.reserve(SCOPE, lambda: 300, 100.0)  # no processor has reported since this edge started
    assert isinstance(starting, Refusal) and starting.starting and starting.limit_nanos == 1_000
    book.standing_known = True  # (the Enforcer sets it at the first processor heartbeat it reads)
    served = 0
    while isinstance(held := book.reserve(SCOPE, lambda: 300, 100.0), Reservation):
        book.settle(held, 300, at=100.0)
        served += 300
    # a request that may cost more than what remains of a hard cap is refused as too large, not served to pass it
    assert isinstance(held, Refusal) and not held.in_flight and held.larger_nanos == 300 and served == 900
    last = book.reserve(SCOPE, lambda: 100, 100.0)  # one that fits what remains is the last one
    assert isinstance(last, Reservation)
    book.settle(last, 100, at=100.0)
    spent = book.reserve(SCOPE, lambda: 1, 100.0)
    assert isinstance(spent, Refusal) and not spent.larger_nanos  # nothing remains
    book.observe("team:web", spend_nanos=1_000, limit_nanos=1_000, issued_at=101.0, expires_at=200.0)
    assert book.ledgers["team:web"].settled_nanos == 0  # the processor counted them
    assert book.reserve(SCOPE, lambda: 300, 150.0).scope == "team:web"
    fresh = book.reserve(SCOPE, lambda: 300, 200.0)  # the next period: the cap opens again from nothing spent
    assert isinstance(fresh, Reservation) and fresh.nanos == 300 and book.ledgers["team:web"].spend_nanos == 0


def test_a_hard_cap_the_policy_no_longer_has_holds_nothing() -> None:
    book = ReservationBook()
    book.standing_known = True
    book.set_caps(_Caps())
    book.settle(book.reserve(SCOPE, lambda: 900, 100.0), 1_000, at=100.0)
    assert book.reserve(SCOPE, lambda: 300, 100.0).scope == "team:web"
    book.set_caps(None)
    held = book.reserve(SCOPE, lambda: 300, 100.0)
    assert isinstance(held, Reservation) and held.ledgers == ()


def test_a_decision_in_flight_when_the_cap_opened_still_replaces_it() -> None:
    """A ledger opened from the policy knows nothing of the scope's spend: any decision is newer news."""
    book = ReservationBook(margin_s=0.5)
    book.standing_known = True
    book.set_caps(_Caps())
    book.settle(book.reserve(SCOPE, lambda: 100, 100.0), 100, at=100.0)
    book.observe("team:web", spend_nanos=950, limit_nanos=1_000, issued_at=99.0, expires_at=200.0)
    assert book.ledgers["team:web"].spend_nanos == 950 and book.ledgers["team:web"].settled_nanos == 100


def test_a_critical_feature_is_held_by_hard_caps_alone() -> None:
    """A used-up budget throttles a critical feature instead of stopping it: the edge's ledger of an ordinary
    budget counts its requests but does not refuse them, and names itself once used up (the caller throttles);
    a hard cap refuses it."""
    book = ReservationBook()
    book.standing_known = True
    book.set_caps(_Caps())  # team:web has a hard cap, team:app an ordinary budget
    book.observe("team:app", 900, 1_000, issued_at=100.0, expires_at=200.0)
    app = ("team:app",)
    held = book.reserve(app, lambda: 100, 100.0, critical=True)
    assert isinstance(held, Reservation) and held.exhausted is None  # 100 remained
    book.settle(held, 100, at=100.0)
    assert book.ledgers["team:app"].settled_nanos == 100  # counted: critical traffic uses the budget too
    assert book.reserve(app, lambda: 10, 100.0).scope == "team:app"  # used up: others are refused
    held = book.reserve(app, lambda: 10, 100.0, critical=True)
    assert isinstance(held, Reservation) and held.exhausted == "team:app"  # the critical feature is throttled
    book.settle(book.reserve(SCOPE, lambda: 1_000, 100.0), 1_000, at=100.0)  # the hard cap used up
    assert book.reserve(SCOPE, lambda: 10, 100.0, critical=True).scope == "team:web"


def test_the_tightest_hard_cap_of_a_scope_and_its_period_end() -> None:
    from spendstream.core.policy import parse_policy
    from spendstream.edge.policy_rules import HardCaps

    caps = HardCaps(
        parse_policy(
            """
timezone: Europe/Berlin
budgets:
  - {scope: "team:web", period: month, amount_usd: 100, hard_cap: true}
  - {scope: "team:web", period: day, amount_usd: 10, hard_cap: true}
  - {scope: "team:app", period: day, amount_usd: 1}
  - {scope: "user:*", period: week, amount_usd: 2, hard_cap: true}
"""
        )
    )
    noon = datetime(2026, 3, 4, 12, tzinfo=UTC).timestamp()  # a Wednesday
    berlin_midnight = datetime(2026, 3, 4, 23, tzinfo=UTC).timestamp()
    assert caps.opening("team:web", noon) == (10 * 10**9, berlin_midnight - 86400, berlin_midnight)
    assert caps.opening("team:app", noon) is None  # not a hard cap
    monday = datetime(2026, 3, 1, 23, tzinfo=UTC).timestamp()
    assert caps.opening("user:u1", noon) == (2 * 10**9, monday, monday + 7 * 86400)
    next_day = (10 * 10**9, berlin_midnight, berlin_midnight + 86400)
    assert caps.opening("team:web", berlin_midnight) == next_day
    assert not HardCaps(parse_policy("budgets: [{scope: 'team:app', period: day, amount_usd: 1}]"))


# -- through the gateway ------------------------------------------------------------------------------------------


@pytest.fixture
def stub() -> Iterator[StubUpstream]:
    with StubUpstream() as running:
        yield running


def test_the_gateway_serves_what_remains_of_a_budget_then_refuses(
    settings: Settings, stub: StubUpstream, tmp_path: Path
) -> None:
    """An alert says 80 % of the team's budget is spent: the gateway serves what the rest pays for (the last
    request crosses the limit, so the processor sees it), then refuses with 402, before the processor has counted
    a single one of those requests. Its word alone does not end the period: the client may retry after the
    processor's next decision, which confirms it (a shutoff with the period's end) or lifts it."""
    limit = 1_000_000  # $0.001
    alert = Decision(
        scope="team:marketing",
        action="alert",
        version=1,
        spend_nanos=800_000,
        limit_nanos=limit,
        issued_at=datetime.now(UTC),
        expires_at=datetime.now(UTC) + timedelta(hours=5),  # the end of the budget's period
    )
    publish_decisions(settings.kafka_bootstrap, [alert])
    enforcer = Enforcer(settings=settings).start()
    assert enforcer.wait_ready(10)
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    gateway = Gateway(gateway_config(stub, stub), settings, enforcer=enforcer, emitter=emitter)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 50}
    statuses: list[int] = []
    try:
        with GatewayThread(gateway) as running:
            assert wait_for(lambda: "team:marketing" in enforcer.reservations.ledgers, 10)
            for _ in range(100):
                status, headers, data = http(running.url + "/v1/chat/completions", body)
                statuses.append(status)
                if status == 402:
                    assert headers["X-Spendstream-Scope"] == "team:marketing"
                    message = json.loads(data)["error"]["message"]
                    assert "used its part of what remained of the budget" in message
                    assert "the last decision: $0.0008 of $0.001 spent; this gateway counted $0.000" in message
                    assert headers["Retry-After"] == "2"  # the processor's next decision confirms it or lifts it
                    break
    finally:
        emitter.close(10)
        enforcer.stop()
    assert statuses[-1] == 402 and statuses.count(200) == len(statuses) - 1 > 1
    served = [e for e in read_usage(settings.kafka_bootstrap, len(statuses)) if e["status"] == "ok"]
    assert len(served) == statuses.count(200)
    costs = [e["cost_nanos"] for e in served]
    assert limit - alert.spend_nanos <= sum(costs) < limit - alert.spend_nanos + max(costs)


def test_a_burst_under_a_hard_cap_is_held_to_the_cap_before_any_decision(
    settings: Settings, stub: StubUpstream, tmp_path: Path
) -> None:
    """No processor has said anything about the team (it is far below its alert): 8 clients at once still get no
    more than the hard cap's limit served, give or take the last request of each, because the gateway holds the
    team's requests against the policy's cap from the first one."""
    from concurrent.futures import ThreadPoolExecutor

    from spendstream.core.policy import parse_policy

    limit = 2_000_000  # $0.002: a few hundred requests
    policy = parse_policy(f"budgets: [{{scope: 'team:marketing', period: day, amount_nanos: {limit}, hard_cap: true}}]")
    enforcer = Enforcer(settings=settings, policy=policy, policy_topic=None).start()
    assert enforcer.wait_ready(10)
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    gateway = Gateway(gateway_config(stub, stub), settings, enforcer=enforcer, emitter=emitter)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 50}

    def client(url: str) -> list[int]:
        """Until its first 402; a 429 (requests in flight hold what remains) is retried, as SDKs do."""
        statuses = []
        while len(statuses) < 300 and (not statuses or statuses[-1] in (200, 429)):
            status, headers, _ = http(url + "/v1/chat/completions", body)
            statuses.append(status)
            if status == 429:
                assert headers["Retry-After"] == "1" and headers["X-Spendstream-Scope"] == "team:marketing"
                time.sleep(0.05)
        return statuses

    try:
        with GatewayThread(gateway) as running, ThreadPoolExecutor(8) as pool:
            # before any processor reported, the cap's spend is unknown (a restart): refused until one does
            status, headers, answer = http(running.url + "/v1/chat/completions", body)
            assert (status, headers["Retry-After"], headers["X-Spendstream-Scope"]) == (503, "2", "team:marketing")
            assert "not known yet" in json.loads(answer)["error"]["message"]
            publish_heartbeat(settings.kafka_bootstrap)
            assert wait_for(lambda: enforcer.reservations.standing_known, 10)
            statuses = [s for one in pool.map(client, [running.url] * 8) for s in one]
    finally:
        emitter.close(10)
        enforcer.stop()
    assert statuses.count(402) == 8 and len(statuses) < 8 * 300
    served = [e for e in read_usage(settings.kafka_bootstrap, len(statuses)) if e["status"] == "ok"]
    costs = [e["cost_nanos"] for e in served]
    assert len(served) == statuses.count(200) > 8
    # Over by at most one request per client; what was held for requests in flight was retried, so the last
    # refusals came from spend: under by less than one request
    assert limit - max(costs) <= sum(costs) < limit + 8 * max(costs)


def test_a_burst_of_many_completions_each_is_held_at_what_all_its_completions_may_cost(
    settings: Settings, stub: StubUpstream, tmp_path: Path
) -> None:
    """``n`` completions are billed ``n`` times: 16 requests at once, each asking for 8 completions of 50 tokens,
    under a hard cap that pays for 3.5 of them. Each is held at all 8 completions, so the cap is passed by less
    than one request (held at one completion, 12 of 16 were served: several times the cap)."""
    from concurrent.futures import ThreadPoolExecutor

    from spendstream.core.policy import parse_policy
    from spendstream.gateway.cost_estimate import request_cost_estimate

    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 50,
        "n": 8,
    }
    held = request_cost_estimate("openai", "gpt-4o-mini", body, json.dumps(body).encode())
    limit = held * 7 // 2
    policy = parse_policy(f"budgets: [{{scope: 'team:marketing', period: day, amount_nanos: {limit}, hard_cap: true}}]")
    enforcer = Enforcer(settings=settings, policy=policy, policy_topic=None).start()
    assert enforcer.wait_ready(10)
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    gateway = Gateway(gateway_config(stub, stub), settings, enforcer=enforcer, emitter=emitter)
    stub.hang_s = 1.0  # every request of the burst is in flight at once
    try:
        with GatewayThread(gateway) as running, ThreadPoolExecutor(16) as pool:
            publish_heartbeat(settings.kafka_bootstrap)
            assert wait_for(lambda: enforcer.reservations.standing_known, 10)
            url = running.url + "/v1/chat/completions"
            statuses = [status for status, _, _ in pool.map(lambda _: http(url, body), range(16))]
    finally:
        stub.hang_s = 0.0
        emitter.close(10)
        enforcer.stop()
    served = [e for e in read_usage(settings.kafka_bootstrap, len(statuses)) if e["status"] == "ok"]
    assert len(served) == statuses.count(200) >= 3
    assert {e["output_tokens"] for e in served} == {8 * 50}  # what the stub billed: every completion
    costs = [e["cost_nanos"] for e in served]
    assert sum(costs) < limit + max(costs)
    assert statuses.count(200) + statuses.count(429) == 16


@contextmanager
def user_hard_cap_gateway(settings: Settings, stub: StubUpstream, tmp_path: Path, limit: int) -> Iterator[str]:
    """The chat URL of a gateway under a ``user:*`` hard cap of ``limit`` nanos, its standing known."""
    from spendstream.core.policy import parse_policy

    policy = parse_policy(f"budgets: [{{scope: 'user:*', period: day, amount_nanos: {limit}, hard_cap: true}}]")
    enforcer = Enforcer(settings=settings, policy=policy, policy_topic=None).start()
    assert enforcer.wait_ready(10)
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    gateway = Gateway(gateway_config(stub, stub), settings, enforcer=enforcer, emitter=emitter)
    try:
        with GatewayThread(gateway) as running:
            publish_heartbeat(settings.kafka_bootstrap)
            assert wait_for(lambda: enforcer.reservations.standing_known, 10)
            yield running.url + "/v1/chat/completions"
    finally:
        emitter.close(10)
        enforcer.stop()


def test_one_request_that_may_cost_more_than_a_hard_cap_has_left_is_refused(
    settings: Settings, stub: StubUpstream, tmp_path: Path
) -> None:
    """A review: a fresh user under a $0.05 ``user:*`` hard cap sent one request of n=128 x 16,000 tokens, which
    may cost $20; it was served (the last request may pass the cap) and billed 6.5 times the cap. It is refused
    with what it may cost and what to change; a request that fits is served."""
    huge = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16_000, "n": 128}
    with user_hard_cap_gateway(settings, stub, tmp_path, 50_000_000) as url:  # $0.05
        status, headers, data = http(url, huge)
        assert status == 402 and headers["X-Spendstream-Scope"].startswith("user:")
        message = json.loads(data)["error"]["message"]
        assert "this request may cost up to $20.48" in message and "set max_tokens (or n) lower" in message
        assert http(url, {**huge, "max_tokens": 50, "n": 1})[0] == 200


def test_a_request_whose_images_may_cost_more_than_a_hard_cap_has_left_is_refused(
    settings: Settings, stub: StubUpstream, tmp_path: Path
) -> None:
    """A review: two image URLs are a few bytes of JSON but up to 7,558 prompt tokens of gpt-4o; the estimate
    counted their bytes, so a request that may cost $0.019 fitted in what remained of a $0.01 cap."""
    image = {"type": "image_url", "image_url": {"url": "https://example.com/chart.png", "detail": "high"}}
    content = [{"type": "text", "text": "compare"}, image, image]
    pictures = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], "max_tokens": 50}
    with user_hard_cap_gateway(settings, stub, tmp_path, 10_000_000) as url:  # $0.01
        status, _, data = http(url, pictures)
        assert status == 402, data
        assert "images" in json.loads(data)["error"]["message"]
        assert http(url, {**pictures, "messages": [{"role": "user", "content": "compare"}]})[0] == 200


def test_a_policy_that_lowers_a_hard_cap_holds_from_the_moment_the_edge_reads_it() -> None:
    """A decision made under the previous policy carried its higher limit: the new policy's lower cap of the same
    period holds at once, not from the processor's next decision; a decision made under the new policy (its limit
    may include an approved increase) is taken as it is, and a cap of another period changes nothing."""
    book = ReservationBook()
    book.standing_known = True
    book.set_caps(_Caps(), "v1")
    book.observe("team:web", 800, 5_000, issued_at=100.0, expires_at=200.0, period="month", policy_version="v0")
    assert book.ledgers["team:web"].limit_nanos == 1_000  # an older policy's decision, read after the new policy
    book.observe("team:web", 800, 5_000, issued_at=101.0, expires_at=200.0, period="month", policy_version="v1")
    assert isinstance(book.reserve(SCOPE, lambda: 2_000, 101.0), Reservation)  # the new policy's own word
    book.set_caps(_Caps(), "v2")  # a newer policy: the v1 decision's limit is held to its cap again
    refused = book.reserve(SCOPE, lambda: 100, 102.0)
    assert isinstance(refused, Refusal) and refused.limit_nanos == 1_000
    book.observe("team:web", 800, 5_000, issued_at=103.0, expires_at=200.0, period="day", policy_version="v0")
    assert book.ledgers["team:web"].limit_nanos == 5_000  # no day cap: the decision's limit stands
    book.set_caps(None, "v3")
    book.observe("team:web", 800, 5_000, issued_at=104.0, expires_at=200.0, period="month", policy_version="v0")
    assert book.ledgers["team:web"].limit_nanos == 5_000  # no caps at all


def test_a_policy_lowering_a_hard_cap_below_the_spend_refuses_at_once_at_the_gateway(
    settings: Settings, stub: StubUpstream, tmp_path: Path
) -> None:
    """An attacker session: lowering a $1 hard cap to $0.50 when $0.60 was spent let traffic through at the old
    limit for about 2 s, until the processor's decision under the new policy arrived. The gateway's ledger now
    holds the scope to the new cap from the moment it reads the policy."""
    from spendstream.core.policy import parse_policy

    def capped(amount: str) -> str:
        budget = f"{{scope: 'team:marketing', period: month, amount_usd: {amount}, hard_cap: true}}"
        return f"name: caps\nbudgets: [{budget}]"

    before, after = parse_policy(capped("1")), parse_policy(capped("0.5"))
    standing = Decision(
        scope="team:marketing",
        action="allow",
        version=1,
        spend_nanos=600_000_000,
        limit_nanos=1_000_000_000,
        period="month",
        policy_version=before.version,
        issued_at=datetime.now(UTC),
        expires_at=datetime.now(UTC) + timedelta(days=5),  # the end of the budget's period
    )
    publish_decisions(settings.kafka_bootstrap, [standing])
    publish_heartbeat(settings.kafka_bootstrap)
    enforcer = Enforcer(settings=settings, policy=before, policy_topic=None).start()
    assert enforcer.wait_ready(10)
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    gateway = Gateway(gateway_config(stub, stub), settings, enforcer=enforcer, emitter=emitter)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 50}
    try:
        with GatewayThread(gateway) as running:
            assert wait_for(lambda: "team:marketing" in enforcer.reservations.ledgers, 10)
            assert wait_for(lambda: enforcer.reservations.standing_known, 10)
            assert http(running.url + "/v1/chat/completions", body)[0] == 200
            enforcer.set_policy(after)  # what the gateway's policy follower does when the new policy is applied
            status, headers, _ = http(running.url + "/v1/chat/completions", body)
            assert (status, headers["X-Spendstream-Scope"]) == (402, "team:marketing")
    finally:
        emitter.close(10)
        enforcer.stop()


def test_a_worker_refusing_a_request_larger_than_its_part_says_it_is_its_part() -> None:
    """An attacker session: a worker of ``gateway --workers 2`` refused a fresh user's $0.0197 request under a
    $0.03 cap as costing "more than remains of this hard cap"; each worker holds half of what remains."""
    from spendstream.gateway.app import refusal_verdict

    book = ReservationBook(Fraction(1, 2))
    book.standing_known = True
    book.set_caps(_Caps())
    refused = book.reserve(SCOPE, lambda: 700, 100.0)  # of 1,000: more than the worker's 500
    assert isinstance(refused, Refusal) and refused.larger_nanos == 700 and refused.share == Fraction(1, 2)
    reason = refusal_verdict(refused, "gpt-4o").reason
    assert "more than this gateway worker's part (1/2: the workers share what remains)" in reason

"""Exact reservation at the edge: a request's estimated cost is held against the remaining budget before it leaves.

Pure arithmetic in integer nano-USD; time is passed in (epoch seconds), so it is testable without sleeping.

What the edge knows of a scope's budget is the newest decision that carried it (``spend_nanos``, ``limit_nanos``,
``issued_at``: the processor publishes one at each threshold, alert and fallback, before the shutoff). Since then
this edge has spent what it settled (the real cost of each request once its usage is known) and holds what is in
flight (the reservations of requests not yet settled). The processor's spend may already include this edge's
requests settled shortly before ``issued_at``, but not those settled later; the edge cannot tell which, so it
counts every request it settled from ``margin_s`` before ``issued_at`` (the processor's usual lag; counting one
twice refuses a little early, never late). A request is admitted, and holds its estimate, while

    reserved + settled since (issued_at - margin_s) < share x (limit - spend)

so the request that reaches the limit is the last one: spend crosses the limit by less than one request's
estimate per edge (the processor sees the crossing, publishes its shutoff and raises its alerts, as without
reservation, unless counting requests twice stopped the edge a little early) instead of by everything served
during a decision round trip.
``share`` is this edge's part of the remaining budget: with G edges (gateway processes) each holding 1/G, the
edges together cannot pass what remained by more than one request each, whatever the others do until the next
decision.

A scope under a ``hard_cap`` budget (``caps``, from the policy) is held from its first request, before any
decision: its ledger opens with nothing spent, the budget's whole limit and its period's end, and counts what this
edge settles. The processor publishes a hard cap's standing from the scope's first traffic on (an ``allow`` that
carries its spend), which then replaces that assumption. Until it arrives, a burst at one edge is bounded by the
limit instead of by a decision round trip; nothing spent is the optimistic guess (after a restart the scope may
have spent more), so it never refuses what the budget allows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Protocol

RECENT_S = 10.0  # how long settled requests are remembered for a ledger that a first decision opens
UNKNOWN = float("-inf")  # the ``issued_at`` of a ledger opened from the policy: any decision is newer


class HardCapLimits(Protocol):
    """The policy's hard caps: ``opening(scope, now)`` is (limit nanos, start and end of its period) or None;
    ``limit_of(scope, period)`` the smallest limit of its caps over that period (``month``) or None."""

    def opening(self, scope: str, now: float) -> tuple[int, float, float] | None: ...

    def limit_of(self, scope: str, period_name: str) -> int | None: ...


@dataclass(slots=True)
class ScopeLedger:
    """One scope's budget as the newest decision told it, and this edge's spend and reservations since."""

    spend_nanos: int  # the processor's spend of the budget's window when it decided
    limit_nanos: int  # the limit this edge holds the scope to (``decided_limit`` unless a newer policy lowered it)
    issued_at: float  # epoch seconds of that decision
    expires_at: float | None = None  # the end of the budget's period: the ledger holds nothing after it
    decided_limit: int = 0  # the limit the decision carried
    period: str = ""  # the decision's budget period (``month``)
    policy_version: str = ""  # the policy the decision was made under
    reserved_nanos: int = 0  # requests in flight at this edge
    settled: deque[tuple[float, int]] = field(default_factory=deque)  # (settled at, real cost) at this edge
    settled_nanos: int = 0  # the sum of ``settled``

    def forget_before(self, at: float) -> None:
        """Drop settled requests older than ``at`` (the decision in force includes them)."""
        settled = self.settled
        while settled and settled[0][0] < at:
            self.settled_nanos -= settled.popleft()[1]

    def available(self, share: Fraction) -> int:
        """Nanos this edge may still reserve (negative: it already holds more than its share)."""
        remaining = max(0, self.limit_nanos - self.spend_nanos)
        return remaining * share.numerator // share.denominator - self.settled_nanos - self.reserved_nanos


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why this edge refuses a request of ``scope``: what it holds for requests in flight fills what remains
    (``in_flight``: it frees up as they settle, within a second), or what it settled since the last decision does
    (the processor's next decision confirms it with a shutoff or lifts it). ``decided_nanos``: the spend the last
    decision carried (None: no decision yet, a hard cap held from the policy); ``settled_nanos`` and
    ``held_nanos``: what this edge counted since (settled requests, those in flight)."""

    scope: str
    in_flight: bool
    decided_nanos: int | None
    settled_nanos: int
    held_nanos: int
    limit_nanos: int
    throttle_rps: float | None = None  # a critical feature's request over its throttle (the budget used up)
    retry_after_s: float | None = None  # with ``throttle_rps``: when the next one may go
    starting: bool = False  # a hard cap whose spend no processor has reported since this edge started
    larger_nanos: int = 0  # the estimate of a request that alone may cost more than what remains of a hard cap
    share: Fraction = Fraction(1)  # this edge's part of what remains (1/N for each of N gateway workers)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one request holds: its estimate on every scope ledger it was checked against, and its scopes."""

    nanos: int
    ledgers: tuple[ScopeLedger, ...]
    scopes: tuple[str, ...]
    exhausted: str | None = None  # for a critical feature: an ordinary budget it used up (it throttles the feature)


class ReservationBook:
    """The ledgers of every scope with a known budget at this edge, by scope (``team:web``)."""

    def __init__(self, share: Fraction = Fraction(1), margin_s: float = 0.5) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.share = share
        self.margin_s = margin_s
        self.ledgers: dict[str, ScopeLedger] = {}
        self.caps: HardCapLimits | None = None  # the policy's hard caps, for scopes no decision has told yet
        self.policy_version = ""  # the version of the policy ``caps`` come from
        # Whether a processor has reported since this edge started (its heartbeat, which it sends once its spend
        # windows are restored): before that, "no decision" may mean "not republished yet" (an embedded broker
        # restarts empty), so a hard cap is not opened from the policy on the assumption that nothing is spent.
        self.standing_known = False
        # Every request settled in the last RECENT_S (at, cost, scopes): the first decision of a scope (its alert)
        # may have been issued before this edge's latest requests of that scope were counted.
        self.recent: deque[tuple[float, int, tuple[str, ...]]] = deque()

    def observe(
        self,
        scope: str,
        spend_nanos: int,
        limit_nanos: int,
        issued_at: float,
        expires_at: float | None = None,
        period: str = "",
        policy_version: str = "",
    ) -> None:
        """A decision told the budget of ``scope`` over ``period`` until ``expires_at``, under the policy
        ``policy_version`` (older news than what is known is ignored)."""
        ledger = self.ledgers.get(scope)
        if ledger is None:
            ledger = self._open(scope, spend_nanos, limit_nanos, issued_at, expires_at, issued_at - self.margin_s)
        elif issued_at < ledger.issued_at:
            return
        else:
            ledger.spend_nanos, ledger.issued_at, ledger.expires_at = spend_nanos, issued_at, expires_at
        ledger.decided_limit, ledger.period, ledger.policy_version = limit_nanos, period, policy_version
        ledger.limit_nanos = self._limit(scope, ledger)
        ledger.forget_before(issued_at - self.margin_s)

    def _limit(self, scope: str, ledger: ScopeLedger) -> int:
        """The limit to hold a decision's ledger to: the decision's, unless it was made under another policy than
        this edge's, whose hard cap of the same period is lower. A policy that lowers a cap then holds from the
        moment the edge reads it, not from the processor's next decision (which carries the new limit, and any
        approved increase, under the new policy's version)."""
        caps = self.caps
        if caps is None or ledger.policy_version == self.policy_version or not ledger.period:
            return ledger.decided_limit
        lower = caps.limit_of(scope, ledger.period)
        return ledger.decided_limit if lower is None else min(lower, ledger.decided_limit)

    def _open(
        self,
        scope: str,
        spend_nanos: int,
        limit_nanos: int,
        issued_at: float,
        expires_at: float | None,
        counted_from: float,
    ) -> ScopeLedger:
        """A new ledger, counting the requests this edge settled since ``counted_from`` (epoch seconds)."""
        self.ledgers[scope] = ledger = ScopeLedger(spend_nanos, limit_nanos, issued_at, expires_at, limit_nanos)
        for at, cost, scopes in self.recent:
            if scope in scopes and at >= counted_from:
                ledger.settled.append((at, cost))
                ledger.settled_nanos += cost
        return ledger

    def forget(self, scope: str) -> None:
        """The scope has no budget decision any more (a new period, or the decision was deleted)."""
        self.ledgers.pop(scope, None)

    def set_caps(self, caps: HardCapLimits | None, policy_version: str = "") -> None:
        """A new policy's hard caps; the ledgers opened from the previous policy's are dropped (reopened on the
        next request if the scope is still capped), and those of decisions made under another policy are held to
        its lower caps."""
        self.caps, self.policy_version = caps, policy_version
        for scope in [scope for scope, ledger in self.ledgers.items() if ledger.issued_at == UNKNOWN]:
            del self.ledgers[scope]
        for scope, ledger in self.ledgers.items():
            ledger.limit_nanos = self._limit(scope, ledger)

    def reserve(
        self, scopes: tuple[str, ...], estimate: Callable[[], int], now: float, critical: bool = False
    ) -> Reservation | Refusal:
        """Hold the request's estimated cost on every known ledger of ``scopes``; else the refusal of the first
        scope whose share this edge has used up. ``estimate`` (nanos) is asked only when some scope has a ledger.
        A ledger whose period ended before ``now`` is dropped: the next period starts from nothing spent, with no
        decision to say so (a hard cap's opens again from the policy). A request of a ``critical`` feature is
        refused by hard caps alone: any other budget, used up, throttles it instead of stopping it, so that ledger
        holds and counts it but names itself (``exhausted``) for the caller to throttle."""
        held = []
        throttling: set[str] = set()  # ledgers a critical request is counted on but not refused by
        ledgers, caps = self.ledgers, self.caps
        for scope in scopes:
            ledger = ledgers.get(scope)
            if ledger is not None and ledger.expires_at is not None and ledger.expires_at <= now:
                del ledgers[scope]
                ledger = None
            opening = caps.opening(scope, now) if caps is not None and (ledger is None or critical) else None
            if ledger is None:
                if opening is None:
                    continue
                limit, start, end = opening
                if not self.standing_known:
                    return Refusal(scope, False, None, 0, 0, limit, starting=True)
                ledger = self._open(scope, 0, limit, UNKNOWN, end, start)
            elif critical and opening is None:
                throttling.add(scope)
            held.append((scope, ledger))
        if not held:
            return Reservation(0, (), scopes)
        exhausted = None
        for scope, ledger in held:
            if ledger.available(self.share) <= 0:
                if scope not in throttling:
                    return self.refusal(scope)
                exhausted = exhausted or scope
        nanos = estimate()
        for scope, ledger in held:
            # A hard cap is passed by at most the last request: not by one the caller made larger than what remains
            # (``n`` x ``max_tokens`` can cost many times a small cap). While requests in flight hold part of it,
            # the request may fit once they settle: refused as held by them (retry), else as too large.
            available = ledger.available(self.share)
            if nanos > available and caps is not None and caps.opening(scope, now) is not None:
                refused = self.refusal(scope)
                too_large = replace(refused, in_flight=False, larger_nanos=nanos)
                return refused if nanos <= available + ledger.reserved_nanos else too_large
        for _, ledger in held:
            ledger.reserved_nanos += nanos
        return Reservation(nanos, tuple(ledger for _, ledger in held), scopes, exhausted)

    def refusal(self, scope: str, throttle_rps: float | None = None, retry_after_s: float | None = None) -> Refusal:
        """Why ``scope``'s ledger refuses a request now (its share used, by requests in flight or settled ones)."""
        ledger = self.ledgers[scope]
        decided = None if ledger.issued_at == UNKNOWN else ledger.spend_nanos
        in_flight = ledger.available(self.share) + ledger.reserved_nanos > 0
        return Refusal(
            scope, in_flight, decided, ledger.settled_nanos, ledger.reserved_nanos, ledger.limit_nanos,
            throttle_rps, retry_after_s, share=self.share,
        )  # fmt: skip

    def settle(self, reservation: Reservation, cost_nanos: int, at: float) -> None:
        """The request's real cost is known (``at``, epoch seconds): it replaces the estimate."""
        for ledger in reservation.ledgers:
            ledger.reserved_nanos -= reservation.nanos
            if cost_nanos:
                ledger.settled.append((at, cost_nanos))
                ledger.settled_nanos += cost_nanos
        if cost_nanos:
            recent = self.recent
            recent.append((at, cost_nanos, reservation.scopes))
            while recent[0][0] < at - RECENT_S:
                recent.popleft()

    def release(self, reservation: Reservation) -> None:
        """The request failed before it cost anything."""
        self.settle(reservation, 0, 0.0)

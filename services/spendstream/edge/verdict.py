"""Pure enforcement logic: what one request may do, given the decisions of every scope it belongs to.

Kept free of I/O so it can be tested exhaustively; the ``Enforcer`` only feeds it rules and clocks.
Outcomes, from most to least restrictive:
``unavailable`` (fail-closed, no fresh view) > ``shutoff`` > ``deny_model`` > ``throttle`` > ``fallback`` >
``alert`` > ``allow``. A throttle only blocks when its limit is reached; otherwise the request goes on
with the next outcome in that order.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from spendstream.core.events import ACTION_RANK, Decision
from spendstream.core.matching import ModelMatcher, base_model

ALLOW = "allow"
ALERT = "alert"
FALLBACK = "fallback"
THROTTLE = "throttle"
DENY_MODEL = "deny_model"
SHUTOFF = "shutoff"
UNAVAILABLE = "unavailable"

# Outcomes that stop the request, and the HTTP status an OpenAI-compatible edge answers with.
BLOCKING_STATUS = {THROTTLE: 429, DENY_MODEL: 403, SHUTOFF: 402, UNAVAILABLE: 503}
# How long a client should wait when a throttle allows no requests at all.
ZERO_RATE_RETRY_S = 60.0


class Verdict(NamedTuple):
    """What the edge does with one request. ``model`` is the model to call (after any fallback)."""

    action: str
    model: str
    retry_after_s: float | None = None
    reason: str = ""
    scope: str = ""

    @property
    def blocked(self) -> bool:
        return self.action in BLOCKING_STATUS

    @property
    def http_status(self) -> int:
        return BLOCKING_STATUS.get(self.action, 200)


class RateLimit:
    """A requests-per-second limit kept per matched value, as one float each: the generic cell rate algorithm.

    It grants what a token bucket of ``capacity`` (one second of traffic, at least one request; none at rate 0)
    grants, but a value's whole state is its theoretical arrival time: when its next request would be on schedule.
    A value whose time has passed is indistinguishable from one never seen (a full bucket), so ``try_take`` drops
    those once the table outgrows ``keep`` values: a throttle on every user stays bounded by its active users, and
    a user's first request allocates no object but a float.

    Time is passed in (monotonic seconds) so the arithmetic is testable without sleeping. ``lock`` guards each
    read-modify-write (threads may call ``check()`` at once, and the GIL can switch between any two bytecodes);
    one lock per rule, not per value.
    """

    __slots__ = ("_arrivals", "_lock", "_prune_at", "capacity", "interval", "keep", "rate", "tolerance")

    def __init__(self, rate: float, keep: int = 65_536) -> None:
        self.rate = rate
        self.capacity = rate if rate >= 1.0 else (1.0 if rate > 0 else 0.0)
        self.interval = 1.0 / rate if rate > 0 else math.inf  # the schedule's step: one request's share
        self.tolerance = (self.capacity - 1.0) * self.interval if rate > 0 else 0.0  # how far ahead a burst may run
        self.keep = keep
        self._prune_at = keep
        self._arrivals: dict[str, float] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._arrivals)

    def wait_time(self, key: str, now: float) -> float:
        """Seconds until ``key`` may make a request (0.0: now)."""
        if self.rate <= 0:
            return ZERO_RATE_RETRY_S
        ahead = self._arrivals.get(key, now) - now - self.tolerance
        return ahead if ahead > 0.0 else 0.0

    def try_take(self, key: str, now: float) -> float:
        """Count a request of ``key`` if it is within the limit (returning 0.0), else return the seconds to wait."""
        if self.rate <= 0:
            return ZERO_RATE_RETRY_S
        lock = self._lock
        lock.acquire()  # acquire/release costs half of ``with`` (CPython 3.11), on every throttled request
        try:
            arrivals = self._arrivals
            due = arrivals.get(key)
            if due is None:
                if len(arrivals) >= self._prune_at:
                    arrivals = self._prune(now)
                due = now
            elif due < now:
                due = now
            ahead = due - now - self.tolerance
            if ahead > 0.0:
                return ahead
            arrivals[key] = due + self.interval
            return 0.0
        finally:
            lock.release()

    def take(self, key: str, now: float) -> None:
        """Count a request of ``key`` whatever the wait (after ``wait_time`` said every limit has room)."""
        if self.rate > 0:
            with self._lock:
                due = self._arrivals.get(key, now)
                self._arrivals[key] = max(due, now) + self.interval

    def _prune(self, now: float) -> dict[str, float]:
        """Drop the values back on schedule (their next request is granted as if never seen), under the lock; the
        next prune waits until the table doubles, so pruning stays amortised O(1) per request."""
        self._arrivals = kept = {key: due for key, due in self._arrivals.items() if due > now}
        self._prune_at = max(self.keep, 2 * len(kept))
        return kept


def _epoch(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


class FallbackMap(dict[str, str]):
    """A decision's ``fallback_models``, which also maps a dated snapshot or alias of a model it names: clients
    call ``gpt-4o-2024-08-06`` and ``claude-3-5-sonnet-20241022``, and a policy's ``gpt-4o: gpt-4o-mini`` was
    silently skipped for them (the gateway answered ``alert`` in the fallback band; a user session)."""

    def __init__(self, models: dict[str, str]) -> None:
        super().__init__(models)
        self._by_base = {base_model(model): target for model, target in models.items()}

    def get(self, model: str, default: str | None = None) -> str | None:  # type: ignore[override]
        found = dict.get(self, model)
        if found is None:
            found = self._by_base.get(base_model(model))
        return default if found is None else found


@dataclass(eq=False)
class ScopeRule:
    """A decision, precomputed for the request path: sets and ranks instead of lists and strings.

    A wildcard rule (``user:*``) limits each matched value on its own (``RateLimit``), so a throttle on every user
    limits each user separately.
    """

    scope: str
    action: str
    rank: int
    version: int
    reason: str = ""
    fallback: dict[str, str] = field(default_factory=dict)
    allowed: ModelMatcher | None = None  # names and globs (``local/*``)
    rate: float | None = None
    expires_at: float | None = None  # epoch seconds
    critical: dict[str, float] = field(default_factory=dict)  # for a shutoff: critical feature -> throttle rate
    exempted: dict[str, ScopeRule] = field(default_factory=dict)  # the throttles for_feature derived
    limit: RateLimit = field(init=False, repr=False)  # a throttle's limit, per matched value of a wildcard rule

    def __post_init__(self) -> None:
        self.limit = RateLimit(self.rate or 0.0)

    @classmethod
    def from_decision(cls, decision: Decision) -> ScopeRule:
        action = str(decision.action)
        rate = decision.throttle_rps if action == THROTTLE else None
        if action == THROTTLE and rate is None:
            rate = 0.0
        return cls(
            scope=decision.scope,
            action=action,
            rank=ACTION_RANK[action],
            version=decision.version,
            reason=decision.reason,
            fallback=FallbackMap(decision.fallback_models) if action == FALLBACK else {},
            allowed=ModelMatcher(decision.allowed_models) if decision.allowed_models else None,
            rate=rate,
            expires_at=_epoch(decision.expires_at),
            critical=dict(decision.critical_throttle_rps) if action == SHUTOFF else {},
        )

    def same_effect(self, other: ScopeRule) -> bool:
        """Whether ``other`` gives every request the same answer (a decision refreshed with a new spend)."""
        mine, theirs = self.allowed, other.allowed
        return (
            self.action == other.action
            and self.fallback == other.fallback
            and self.rate == other.rate
            and self.expires_at == other.expires_at
            and self.critical == other.critical
            and (mine is theirs or (mine is not None and theirs is not None and mine.entries == theirs.entries))
        )

    def for_feature(self, feature: str) -> ScopeRule:
        """This rule as it applies to a request of ``feature``: a shutoff throttles a critical feature instead
        (one derived rule per feature, so its limit lasts as long as the decision)."""
        rate = self.critical.get(feature)
        if rate is None:
            return self
        derived = self.exempted.get(feature)
        if derived is None:
            reason = f"{self.reason or 'budget exhausted'}; critical feature {feature} throttled to {rate:g} requests/s"
            derived = ScopeRule(
                self.scope, THROTTLE, ACTION_RANK[THROTTLE], self.version, reason, self.fallback, self.allowed, rate,
                self.expires_at,
            )  # fmt: skip
            derived = self.exempted.setdefault(feature, derived)
        return derived


def newer(current: ScopeRule | None, candidate: ScopeRule) -> bool:
    """A decision replaces the one in force only with a higher version (replays and reordering are ignored)."""
    return current is None or candidate.version > current.version


def parse_scope(scope: str) -> tuple[str, str]:
    """``team:marketing`` -> ``("team", "marketing")``; a bare ``*`` is the global scope ``("*", "*")``."""
    if scope == "*":
        return "*", "*"
    dim, sep, value = scope.partition(":")
    if not sep or not dim or not value:
        raise ValueError(f"scope must look like dimension:value, got {scope!r}")
    return dim, value


def resolve(hits: list[tuple[ScopeRule, str]], model: str, wall_now: float, mono_now: float) -> Verdict:
    """Apply the most restrictive of the matched rules to a request for ``model``.

    ``hits`` pairs each matched rule with its limit's key (the matched value for wildcard rules, ``""`` for
    exact ones). Expired rules are skipped. Fallback maps are applied in scope order until no rule
    rewrites the model any more (so ``team`` gpt-4o -> gpt-4o-mini and ``org`` gpt-4o-mini -> local chain),
    and the allowed-model lists are checked on the model actually served. Tokens are only taken when the
    request will really go out, and from every throttling scope at once.
    """
    if len(hits) == 1:
        return resolve_one(hits[0][0], hits[0][1], model, wall_now, mono_now)
    return resolve_many(hits, model, wall_now, mono_now)


def resolve_one(rule: ScopeRule, key: str, model: str, wall_now: float, mono_now: float) -> Verdict:
    """``resolve`` for the common case of a single matching rule, without the bookkeeping of many."""
    if rule.expires_at is not None and rule.expires_at <= wall_now:
        return Verdict(ALLOW, model)
    action = rule.action
    if action == SHUTOFF:
        retry = max(0.0, rule.expires_at - wall_now) if rule.expires_at is not None else None
        return Verdict(SHUTOFF, model, retry, rule.reason or "budget exhausted", rule.scope)
    served = rule.fallback.get(model, model) if rule.fallback else model
    if rule.allowed is not None and served not in rule.allowed:
        reason = f"model {served} is not allowed for {rule.scope} (allowed: {rule.allowed.describe()})"
        return Verdict(DENY_MODEL, served, None, reason, rule.scope)
    if action == THROTTLE:
        wait = rule.limit.try_take(key, mono_now)
        if wait > 0.0:
            return Verdict(THROTTLE, served, wait, rule.reason or f"throttled to {rule.rate:g} requests/s", rule.scope)
        return Verdict(ALLOW, served)
    if served != model:
        return Verdict(FALLBACK, served, None, rule.reason or f"{model} -> {served}", rule.scope)
    if action == ALLOW:
        return Verdict(ALLOW, served)
    return Verdict(ALERT, served, None, rule.reason, rule.scope)


def served_model(fallbacks: list[ScopeRule], model: str) -> tuple[str, ScopeRule | None]:
    """The model a request is served after every fallback map applies (maps chain, taken in scope order so the
    answer does not depend on the order decisions arrived in), and the rule that rewrote it last, if any."""
    served, rewrote = model, None
    if len(fallbacks) == 1:
        target = fallbacks[0].fallback.get(model)
        return (target, fallbacks[0]) if target is not None and target != model else (model, None)
    fallbacks.sort(key=_scope_of)
    for _ in range(len(fallbacks)):
        for rule in fallbacks:
            target = rule.fallback.get(served)
            if target is not None and target != served:
                served, rewrote = target, rule
                break
        else:
            break
    return (served, rewrote) if served != model else (model, None)


def resolve_many(hits: Iterable[tuple[ScopeRule, str]], model: str, wall_now: float, mono_now: float) -> Verdict:
    """``resolve`` for any number of matching rules."""
    shutoff: ScopeRule | None = None
    active: list[tuple[ScopeRule, str]] = []
    fallbacks: list[ScopeRule] = []
    for hit in hits:
        rule = hit[0]
        expires_at = rule.expires_at
        if expires_at is not None and expires_at <= wall_now:
            continue
        if rule.action == SHUTOFF and (shutoff is None or rule.scope < shutoff.scope):
            shutoff = rule
        if rule.fallback:
            fallbacks.append(rule)
        active.append(hit)
    if shutoff is not None:
        retry = max(0.0, shutoff.expires_at - wall_now) if shutoff.expires_at is not None else None
        return Verdict(SHUTOFF, model, retry, shutoff.reason or "budget exhausted", shutoff.scope)
    if not active:
        return Verdict(ALLOW, model)

    served, rewrote = served_model(fallbacks, model)

    top: ScopeRule | None = None
    throttles = []
    for rule, key in active:
        if rule.allowed is not None and served not in rule.allowed:
            reason = f"model {served} is not allowed for {rule.scope} (allowed: {rule.allowed.describe()})"
            return Verdict(DENY_MODEL, served, None, reason, rule.scope)
        action = rule.action
        if action == THROTTLE:
            throttles.append((rule, key))
        elif action in (ALERT, FALLBACK) and (top is None or rule.rank > top.rank):
            top = rule

    if len(throttles) == 1:
        limiting, key = throttles[0]
        wait = limiting.limit.try_take(key, mono_now)
        if wait > 0.0:
            return throttled(served, limiting, wait)
    elif throttles:
        wait, limiting = take_all(throttles, mono_now)
        if wait > 0.0:
            return throttled(served, limiting, wait)

    if rewrote is not None:
        return Verdict(FALLBACK, served, None, rewrote.reason or f"{model} -> {served}", rewrote.scope)
    if top is not None:
        return Verdict(ALERT, served, None, top.reason, top.scope)
    return Verdict(ALLOW, served)


def _scope_of(rule: ScopeRule) -> str:
    return rule.scope


class Plan(NamedTuple):
    """The outcome of one set of matched rules for one model, minus the throttles' state.

    It holds while the wall clock is in ``[valid_from, valid_until)`` (the same rules are expired), so the
    Enforcer keeps it across requests and only takes tokens per request: see ``plan`` and ``follow``.
    """

    valid_from: float  # the latest expiry among the rules it skipped (-inf: none)
    valid_until: float  # the earliest expiry among the rules it applies (inf: none)
    verdict: Verdict  # the outcome when no throttle's limit is reached
    throttles: tuple[int, ...]  # positions of the throttling rules among the matched ones
    timed: bool  # some rule expires or has expired: compare the wall clock with the range first


def plan(rules: Sequence[ScopeRule], model: str, wall_now: float) -> Plan | None:
    """``resolve_many``'s outcome for ``rules`` (in match order) with the throttles left to ``follow``.

    None when the outcome changes with every clock tick (a shutoff that expires: its retry-after counts down);
    ``resolve_many`` answers those.
    """
    valid_from, valid_until = -math.inf, math.inf
    shutoff: ScopeRule | None = None
    active: list[int] = []
    fallbacks: list[ScopeRule] = []
    for position, rule in enumerate(rules):
        expires_at = rule.expires_at
        if expires_at is not None:
            if expires_at <= wall_now:
                valid_from = max(valid_from, expires_at)
                continue
            valid_until = min(valid_until, expires_at)
        if rule.action == SHUTOFF and (shutoff is None or rule.scope < shutoff.scope):
            shutoff = rule
        if rule.fallback:
            fallbacks.append(rule)
        active.append(position)
    if shutoff is not None:
        if shutoff.expires_at is not None:
            return None
        verdict = Verdict(SHUTOFF, model, None, shutoff.reason or "budget exhausted", shutoff.scope)
        return Plan(valid_from, valid_until, verdict, (), _timed(valid_from, valid_until))
    served, rewrote = served_model(fallbacks, model)
    top: ScopeRule | None = None
    throttles: list[int] = []
    for position in active:
        rule = rules[position]
        if rule.allowed is not None and served not in rule.allowed:
            reason = f"model {served} is not allowed for {rule.scope} (allowed: {rule.allowed.describe()})"
            deny = Verdict(DENY_MODEL, served, None, reason, rule.scope)
            return Plan(valid_from, valid_until, deny, (), _timed(valid_from, valid_until))
        if rule.action == THROTTLE:
            throttles.append(position)
        elif rule.action in (ALERT, FALLBACK) and (top is None or rule.rank > top.rank):
            top = rule
    if rewrote is not None:
        verdict = Verdict(FALLBACK, served, None, rewrote.reason or f"{model} -> {served}", rewrote.scope)
    elif top is not None:
        verdict = Verdict(ALERT, served, None, top.reason, top.scope)
    else:
        verdict = Verdict(ALLOW, served)
    return Plan(valid_from, valid_until, verdict, tuple(throttles), _timed(valid_from, valid_until))


def follow(plan: Plan, rules: Sequence[ScopeRule], keys: Sequence[str], mono_now: float) -> Verdict:
    """The verdict of ``plan`` for one request: a request is counted by every throttling scope, or by none."""
    if not plan.throttles:
        return plan.verdict
    return take(plan.verdict, throttles_of(plan, rules, keys), mono_now)


def throttles_of(plan: Plan, rules: Sequence[ScopeRule], keys: Sequence[str]) -> tuple[tuple[ScopeRule, str], ...]:
    """The throttling rules of ``plan`` with the values they limit (``keys``): what ``take`` counts on."""
    return tuple([(rules[position], keys[position]) for position in plan.throttles])


def take(verdict: Verdict, throttles: Sequence[tuple[ScopeRule, str]], mono_now: float) -> Verdict:
    """``verdict`` once every limit of ``throttles`` counted the request; else (none counts it) the refusal of
    the rule that needs the longest wait."""
    if len(throttles) == 1:
        limiting, key = throttles[0]
        wait = limiting.limit.try_take(key, mono_now)
    else:
        wait, limiting = take_all(throttles, mono_now)
    return verdict if wait <= 0.0 else throttled(verdict.model, limiting, wait)


def take_all(throttles: Sequence[tuple[ScopeRule, str]], mono_now: float) -> tuple[float, ScopeRule]:
    """Counted by every limit or by none: (0.0, any rule) once counted, else the longest wait and its rule."""
    wait, limiting = 0.0, throttles[0][0]
    for rule, key in throttles:
        needed = rule.limit.wait_time(key, mono_now)
        if needed > wait:
            wait, limiting = needed, rule
    if wait <= 0.0:
        for rule, key in throttles:
            rule.limit.take(key, mono_now)
    return wait, limiting


def throttled(served: str, limiting: ScopeRule, wait: float) -> Verdict:
    """The verdict of a request for ``served`` refused by the limit of ``limiting`` for ``wait`` seconds."""
    reason = limiting.reason or f"throttled to {limiting.rate:g} requests/s"
    return Verdict(THROTTLE, served, wait, reason, limiting.scope)


def _timed(valid_from: float, valid_until: float) -> bool:
    return valid_from != -math.inf or valid_until != math.inf

"""Rules an edge applies from the policy itself, from the first request on (pure; the Enforcer feeds it).

Decisions come from the processor after it has seen traffic. Two kinds of rule need no spend, so an edge
applies them straight from the policy instead of waiting for a decision:

- allowed-model lists (``allowed_models``): a request whose model (the one served, after any fallback) is not
  covered by the list of one of its scopes (the scope's own list, else its ``dimension:*`` template's, as the
  processor resolves them) is refused with ``deny_model``. Lists hold names and globs (``local/*``), matched
  by ``core.matching``. They are checked on the outcome of the decisions, so a request no list covers pays
  one dict lookup per listed dimension.
- request quotas (``requests_per_day``): the edge counts the requests it checks per quota scope and local day
  (the policy's timezone) and refuses with ``shutoff`` once a scope's count reaches its cap; the cap-th request
  still goes out, as the processor counts. Every checked request counts, refused ones included, because each
  is metered and the processor counts it too. The processor's count, which covers every edge, arrives as its
  quota decision and then applies on top; between two decisions this count bounds what one edge lets through.
  Token quotas need the tokens of answers, so only the processor enforces them.

A used-up quota becomes a ``shutoff`` ``ScopeRule``, so ``resolve`` weighs it with the decisions of the
request's other scopes.

- hard caps (``HardCaps``): the limit and period end of the tightest ``hard_cap`` budget of a scope, so the edge's
  reservation ledger (``edge/reservation.py``) holds the scope's requests from its first one, before any decision.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from itertools import count

from spendstream.core.events import ACTION_RANK
from spendstream.core.matching import ModelMatcher, is_template
from spendstream.core.periods import period
from spendstream.core.policy import Policy
from spendstream.edge.verdict import DENY_MODEL, SHUTOFF, ScopeRule, Verdict

_MODELS_REMEMBERED = 4096  # answers kept per list (the names a deployment calls are few)


class ModelList(dict[str, Verdict | None]):
    """One scope's allowed-model list; as a dict, its answer per model name (None: allowed), decided on first sight,
    so the request path pays one dict lookup and allocates nothing, refusals included."""

    __slots__ = ("matcher", "scope")

    def __init__(self, scope: str, matcher: ModelMatcher) -> None:
        super().__init__()
        self.scope = scope
        self.matcher = matcher

    def __missing__(self, model: str) -> Verdict | None:
        found = None
        if model not in self.matcher:
            reason = f"model {model} is not allowed for {self.scope} (allowed: {self.matcher.describe()})"
            found = Verdict(DENY_MODEL, model, None, reason, self.scope)
        if len(self) >= _MODELS_REMEMBERED:
            self.clear()
        self[model] = found
        return found


# (dimension index, list per value, list of the dimension's template or None)
_Lookup = tuple[int, dict[str, ModelList], ModelList | None]


def index_allowed_models(policy: Policy, dimensions: Sequence[str]) -> tuple[_Lookup, ...]:
    """The policy's allowed-model lists, indexed by the position of their dimension in ``dimensions``."""
    by_dim: dict[int, tuple[dict[str, ModelList], list[ModelList]]] = {}
    for scope, models in policy.allowed_models.items():
        dimension, _, value = scope.partition(":")
        if dimension not in dimensions:
            continue
        exact, template = by_dim.setdefault(dimensions.index(dimension), ({}, []))
        if is_template(scope):
            template.append(ModelList(scope, ModelMatcher(models)))
        else:
            exact[value] = ModelList(scope, ModelMatcher(models))
    return tuple((i, exact, template[0] if template else None) for i, (exact, template) in sorted(by_dim.items()))


# Per counted dimension: (index, (index, cap, counter) per value seen today, caps per value, template's cap, counters)
_Counted = tuple[int, dict[str, tuple[int, int, "count[int]"]], dict[str, int], int | None, dict[str, "count[int]"]]


def _counted(counter: count[int]) -> int:
    """How many numbers ``counter`` has handed out (``itertools.count`` has no accessor; its repr is ``count(n)``)."""
    return int(repr(counter)[6:-1])


class RequestQuotas:
    """Requests per quota scope and local day counted at this edge: ``scopes`` hands out a request's counters, the
    caller counts (``next()``) and asks for the ``refusal`` of a count that reached its cap.

    Each counted scope has an ``itertools.count``: ``next()`` on it is one C call under the GIL, so concurrent
    checks never admit two requests on one count, without a lock on the request path. The counters are shared
    with the next policy version (same timezone), so a request counted by a check still on the old rules counts.
    """

    def __init__(self, policy: Policy, dimensions: Sequence[str]) -> None:
        self.tz = policy.tz
        exact: dict[int, dict[str, int]] = {}
        templates: dict[int, int] = {}
        for quota in policy.quotas:
            if quota.requests_per_day is None:
                continue
            dimension, _, value = quota.scope.partition(":")
            if dimension not in dimensions:
                continue
            i = dimensions.index(dimension)
            if is_template(quota.scope):
                templates[i] = min(quota.requests_per_day, templates.get(i, quota.requests_per_day))
            else:
                caps = exact.setdefault(i, {})
                caps[value] = min(quota.requests_per_day, caps.get(value, quota.requests_per_day))
        # Every matching quota applies (a scope's own and its template's), so the smaller cap is the one that binds.
        self._caps: tuple[tuple[int, dict[str, int], int | None], ...] = tuple(
            (i, {v: min(cap, templates.get(i, cap)) for v, cap in exact.get(i, {}).items()}, templates.get(i))
            for i in sorted({*exact, *templates})
        )
        self._dimensions = tuple(dimensions)
        self._counters: dict[int, dict[str, count[int]]] = {i: {} for i, _, _ in self._caps}  # today's, per value
        self._counted = self._compile()
        self._day_end = -math.inf
        self._lock = threading.Lock()  # one roll-over per day

    def _compile(self) -> tuple[_Counted, ...]:
        """What ``scopes`` reads per request, with no (cap, counter) seen yet."""
        return tuple((i, {}, caps, template_cap, self._counters[i]) for i, caps, template_cap in self._caps)

    def __bool__(self) -> bool:
        return bool(self._caps)

    def dimensions(self) -> tuple[int, ...]:
        """The indexes of the dimensions with a quota."""
        return tuple(i for i, _, _ in self._caps)

    def adopt_counts(self, previous: RequestQuotas) -> None:
        """Keep today's counts across a policy change (a new cap applies to the requests already made)."""
        if previous.tz == self.tz:
            with previous._lock:
                for i, counters in previous._counters.items():
                    if i in self._counters:
                        self._counters[i] = counters
                self._counted = self._compile()
                self._day_end = previous._day_end

    @property
    def day_end(self) -> float:
        """Epoch seconds of the next local midnight, when today's counters are replaced."""
        return self._day_end

    def scopes(self, values: Sequence[str], wall_now: float) -> tuple[tuple[int, int, count[int]], ...]:
        """(dimension index, cap, today's counter) of every quota scope among ``values`` (by dimension index); the
        counters hold until ``day_end``, so an edge can keep them for a request it sees again that day."""
        if wall_now >= self._day_end:
            self._roll_over(wall_now)
        found: tuple[tuple[int, int, count[int]], ...] = ()
        for i, seen, caps, template_cap, counters in self._counted:
            value = values[i]
            if value:
                entry = seen.get(value)
                if entry is None:
                    cap = caps.get(value, template_cap)
                    if cap is None:
                        continue
                    entry = seen.setdefault(value, (i, cap, counters.setdefault(value, count())))
                found += (entry,)
        return found

    def refusal(self, i: int, value: str, used: int, cap: int) -> ScopeRule:
        """The ``shutoff`` of the request that found the quota of ``value`` (dimension ``i``) used up."""
        scope = f"{self._dimensions[i]}:{value}"
        reason = f"{scope} daily requests quota used up: {used}/{cap} (counted at this edge)"
        return ScopeRule(scope, SHUTOFF, ACTION_RANK[SHUTOFF], 0, reason, expires_at=self._day_end)

    def used(self, scope: str) -> int:
        """Requests counted today for ``scope`` (``user:u1``)."""
        dimension, _, value = scope.partition(":")
        counter = self._counters.get(self._dimensions.index(dimension), {}).get(value)
        return 0 if counter is None else _counted(counter)

    def _roll_over(self, wall_now: float) -> None:
        with self._lock:
            if wall_now < self._day_end:
                return
            local = datetime.fromtimestamp(wall_now, self.tz)
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
            end = (start + timedelta(days=1, hours=2)).replace(hour=0)  # the next local midnight, across DST too
            self._counters = {i: {} for i in self._counters}
            self._counted = self._compile()  # before the new day's end, so a check that sees it counts afresh
            self._day_end = end.timestamp()


class StaticRules:
    """What an edge enforces from one policy version without any decision: model lists and request quotas."""

    def __init__(self, policy: Policy, dimensions: Sequence[str], previous: StaticRules | None = None) -> None:
        self.version = policy.version
        self.allowed = index_allowed_models(policy, dimensions)
        quotas = RequestQuotas(policy, dimensions)
        if previous is not None and previous.quotas is not None:
            quotas.adopt_counts(previous.quotas)
        self.quotas = quotas if quotas else None  # None: nothing to count (one test on the request path)

    def __bool__(self) -> bool:
        return bool(self.allowed) or self.quotas is not None

    def names(self, dimension: int) -> bool:
        """Whether a model list or a request quota applies per value of ``dimension`` (by index): then requests
        that differ only in that value may get different answers."""
        counted = self.quotas.dimensions() if self.quotas is not None else ()
        return any(i == dimension for i, _, _ in self.allowed) or dimension in counted

    def denial(self, values: Sequence[str], served: str) -> Verdict | None:
        """The ``deny_model`` verdict of the first list among ``values`` (by dimension index) that does not cover the
        model ``served``; None if every list covers it (one lookup per listed dimension)."""
        for i, exact, template in self.allowed:
            value = values[i]
            if value:
                found = exact.get(value, template)
                if found is not None:
                    denied = found[served]
                    if denied is not None:
                        return denied
        return None


_NOT_CAPPED = (0, -math.inf, math.inf)  # a scope with no hard cap, remembered as such for good
_CAPS_REMEMBERED = 65536  # scopes looked up per policy (emptied when full)


class HardCaps:
    """The policy's ``hard_cap`` budgets by scope, matched as the processor matches budgets
    (``Policy.matching_budgets``); ``opening`` answers from a table, so a scope costs one dict lookup after its
    first request."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._found: dict[str, tuple[int, float, float]] = {}  # scope -> (limit, period start, end) or _NOT_CAPPED

    def __bool__(self) -> bool:
        return any(budget.hard_cap for budget in self.policy.budgets)

    def limit_of(self, scope: str, period_name: str) -> int | None:
        """The smallest limit of ``scope``'s hard caps over ``period_name`` (``month``), or None if it has none."""
        limits = [
            budget.limit_nanos
            for budget in self.policy.matching_budgets(scope)
            if budget.hard_cap and period(budget.period).name == period_name
        ]
        return min(limits) if limits else None

    def opening(self, scope: str, now: float) -> tuple[int, float, float] | None:
        """(limit nanos, epoch seconds its period starts and ends) of the smallest hard cap of ``scope`` at ``now``,
        or None."""
        found = self._found.get(scope)
        if found is None or found[2] <= now:
            caps = [budget for budget in self.policy.matching_budgets(scope) if budget.hard_cap]
            if caps:
                tightest = min(caps, key=lambda b: b.limit_nanos)
                start, end = period(tightest.period).window(datetime.fromtimestamp(now, UTC), self.policy.tz)
                found = (tightest.limit_nanos, start.timestamp(), end.timestamp())
            else:
                found = _NOT_CAPPED
            if len(self._found) >= _CAPS_REMEMBERED:
                self._found.clear()
            self._found[scope] = found
        return None if found is _NOT_CAPPED else found

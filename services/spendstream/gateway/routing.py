"""Cost-aware routing: which provider and model serve a request. Pure: policy, stats and estimates come in.

``choose_route`` applies the rules in this order:

1. **Environment restriction.** No routing section for the environment: the request passes unchanged. Otherwise
   only providers allowed there (``local_only``, ``allowed_providers``) and able to serve the endpoint's API
   (``compatible_providers``) are eligible; a requested model on any other provider is never used.
2. **Tier by complexity.** The classifier's tier (or the client's ``X-Spendstream-Complexity``).
3. **Budget-aware downgrade.** Of the budget rules whose ``remaining_at_most`` is reached by the remaining budget
   fraction, the one with the most ``downgrade_steps`` moves the tier that many steps cheaper (never below simple).
   ``remaining_bound`` derives the fraction from the enforcement outcome the edge already has.
4. **Provider score** among the tier's usable candidates: eligible, priced, provider under its monthly budget,
   error rate at most ``max_error_rate`` (skipped only while another candidate passes). If a tier has no usable
   candidate, the next cheaper tier is tried, then the dearer ones.

Score of a candidate (lower wins), each term scaled to 0..1 so the weights mean what they say::

    score = (w_cost * scaled(cost) + w_latency * scaled(p95) + w_error * min(1, error_rate / max_error_rate)
             + w_priority * scaled(priority)) / (sum of weights)
    scaled(x) = (x - min x) / (max x - min x) over the tier's usable candidates (0 when they are all equal)

so the cheapest candidate has cost term 0 and the dearest 1, whatever the absolute prices. ``cost`` is the
estimated cost of this request on that model; ``p95`` and ``error_rate`` come from ``RoutingStats`` once a model
has ``min_samples`` observations (before that: ``unknown_latency_ms`` and 0).
Ties break on (cost, priority, provider, model), so the same inputs always give the same route.

Finally, unless ``allow_upgrade``, a requested model that is eligible (its provider allowed and under budget)
and estimated cheaper than the winner is kept: routing saves money, it does not spend more than the client asked for.

``choose_route`` runs in two halves: ``plan_route`` (steps 1-4 up to the competing candidates, which do not depend
on the request's token counts) and ``pick_route`` (prices, scores, keeps a cheaper requested model). The gateway
reuses a plan until its stats snapshot or the minute changes, so a request only pays for ``pick_route``.

The requested and routed cost estimates travel in the usage event's tags (``routing_tags``) so the ledger can
show spend as routed against spend had every request gone to the requested model.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple, Protocol

from spendstream.core.events import UsageEvent
from spendstream.core.pricing import (
    EMPTY_TABLE,
    CostOverflowError,
    PriceTable,
    UnknownModelError,
    detail_of,
    price_usage,
)
from spendstream.gateway.complexity import TIER_ORDER, Tier
from spendstream.gateway.provider_stats import RoutingStats

# What routing reads of the policy: ``spendstream.core.routing_policy.RoutingPolicy`` has this shape. Edges do
# not import the processor, so the gateway is handed the policy object and reads it through these protocols.


class CandidateView(Protocol):
    @property
    def provider(self) -> str: ...
    @property
    def model(self) -> str: ...


class TiersView(Protocol):
    def of(self, tier: str) -> Sequence[CandidateView]: ...


class EnvironmentView(Protocol):
    @property
    def tiers(self) -> TiersView: ...
    @property
    def local_only(self) -> bool: ...
    @property
    def allowed_providers(self) -> list[str] | None: ...


class ProviderView(Protocol):
    @property
    def priority(self) -> int: ...
    @property
    def local(self) -> bool: ...
    @property
    def monthly_budget_nanos(self) -> int | None: ...


class WeightsView(Protocol):
    @property
    def cost(self) -> Decimal: ...
    @property
    def latency(self) -> Decimal: ...
    @property
    def error_rate(self) -> Decimal: ...
    @property
    def priority(self) -> Decimal: ...


class BudgetRuleView(Protocol):
    @property
    def remaining_at_most(self) -> Decimal: ...
    @property
    def downgrade_steps(self) -> int: ...


class RoutingPolicyView(Protocol):
    @property
    def default_environment(self) -> str | None: ...
    @property
    def providers(self) -> Mapping[str, ProviderView]: ...
    @property
    def weights(self) -> WeightsView: ...
    @property
    def budget_rules(self) -> Sequence[BudgetRuleView]: ...
    @property
    def allow_upgrade(self) -> bool: ...
    @property
    def unknown_latency_ms(self) -> int: ...
    @property
    def min_samples(self) -> int: ...
    @property
    def max_error_rate(self) -> Decimal: ...

    def environment(self, name: str) -> EnvironmentView | None: ...


class ThresholdsView(Protocol):
    @property
    def alert(self) -> Decimal | None: ...
    @property
    def fallback(self) -> Decimal | None: ...


class NoRouteError(LookupError):
    """Nothing may serve this request in its environment (e.g. development asked for a hosted model and the
    routing section lists no usable local model); the gateway answers 403 with this message."""


class Route(NamedTuple):
    model: str
    provider: str
    tier: str  # "" when the request passed unrouted
    reason: str  # short, no prompt text; goes into tags["route_reason"]
    requested_cost_estimate_nanos: int | None  # None: the requested model has no price (unknown_model: reject)
    routed_cost_estimate_nanos: int | None


class TokenEstimate(NamedTuple):
    input_tokens: int
    output_tokens: int


_UNPRICED: Any = object()  # not yet in a request's costs


def _cost(provider: str, model: str, estimate: TokenEstimate, prices: PriceTable, at: datetime | None) -> int | None:
    try:
        return price_usage(
            provider, model, estimate.input_tokens, estimate.output_tokens, at=at, overrides=prices
        ).cost_nanos
    except UnknownModelError:
        return None


def _eligible(
    env: EnvironmentView, policy: RoutingPolicyView, provider: str, compatible: Collection[str] | None
) -> bool:
    spec = policy.providers.get(provider)
    if compatible is not None and provider not in compatible:
        return False
    if env.allowed_providers is not None and provider not in env.allowed_providers:
        return False
    if env.local_only:
        return spec is not None and spec.local
    return True


def _over_budget(policy: RoutingPolicyView, stats: RoutingStats, provider: str) -> bool:
    spec = policy.providers.get(provider)
    budget = spec.monthly_budget_nanos if spec is not None else None
    return budget is not None and stats.provider_spend_nanos.get(provider, 0) >= budget


def _failing(policy: RoutingPolicyView, stats: RoutingStats, provider: str, model: str) -> bool:
    observed = stats.models.get((provider, model))
    return (
        observed is not None and observed.samples >= policy.min_samples and observed.error_rate > policy.max_error_rate
    )


class _Row(NamedTuple):
    """A usable candidate as the score sees it (everything but the cost, which depends on the request)."""

    provider: str
    model: str
    latency: float
    error_rate: float
    priority: int


class _Scored(NamedTuple):
    score: float
    cost: int
    priority: int
    provider: str
    model: str


def _score(rows: Sequence[_Row], costs: Sequence[int], policy: RoutingPolicyView) -> list[_Scored]:
    w = policy.weights
    weights = (float(w.cost), float(w.latency), float(w.error_rate), float(w.priority))
    total = sum(weights)
    low_cost, span_cost = min(costs), max(costs) - min(costs)
    low_latency = min(r.latency for r in rows)
    span_latency = max(r.latency for r in rows) - low_latency
    low_priority = min(r.priority for r in rows)
    span_priority = max(r.priority for r in rows) - low_priority
    max_error_rate = float(policy.max_error_rate)
    scored = []
    for row, cost in zip(rows, costs, strict=True):
        terms = (
            (cost - low_cost) / span_cost if span_cost else 0.0,
            (row.latency - low_latency) / span_latency if span_latency else 0.0,
            min(1.0, row.error_rate / max_error_rate),
            (row.priority - low_priority) / span_priority if span_priority else 0.0,
        )
        score = sum(wi * ti for wi, ti in zip(weights, terms, strict=True)) / total
        scored.append(_Scored(round(score, 12), cost, row.priority, row.provider, row.model))
    return sorted(scored)


def _row(candidate: CandidateView, policy: RoutingPolicyView, stats: RoutingStats) -> _Row:
    observed = stats.models.get((candidate.provider, candidate.model))
    known = observed is not None and observed.samples >= policy.min_samples
    return _Row(
        candidate.provider,
        candidate.model,
        observed.p95_ms if known else policy.unknown_latency_ms,  # type: ignore[union-attr]
        observed.error_rate if known else 0.0,  # type: ignore[union-attr]
        policy.providers[candidate.provider].priority,
    )


def _priced(provider: str, model: str, prices: PriceTable, at: datetime) -> bool:
    """Whether the price table has (or defaults) a price for the model: a property of the model, not of counts."""
    return _cost(provider, model, TokenEstimate(1, 1), prices, at) is not None


def _usable(
    env: EnvironmentView,
    tier: Tier,
    policy: RoutingPolicyView,
    stats: RoutingStats,
    prices: PriceTable,
    compatible: Collection[str] | None,
    at: datetime,
    over_budget: bool = False,
) -> list[_Row]:
    """The candidates of ``tier`` a request may go to; with ``over_budget``, those whose provider passed its monthly
    budget instead (the last resort: such a provider is not routed to while another candidate remains)."""
    usable: list[_Row] = []
    failing: list[_Row] = []
    for candidate in env.tiers.of(tier):
        if not _eligible(env, policy, candidate.provider, compatible):
            continue
        if _over_budget(policy, stats, candidate.provider) != over_budget:
            continue
        if not _priced(candidate.provider, candidate.model, prices, at):
            continue
        if _failing(policy, stats, candidate.provider, candidate.model):
            failing.append(_row(candidate, policy, stats))
        else:
            usable.append(_row(candidate, policy, stats))
    return usable or failing


def downgrade_steps(policy: RoutingPolicyView, remaining_budget_fraction: float | None) -> int:
    """Tiers to step down for the remaining budget fraction (0 when unknown or no rule applies)."""
    if remaining_budget_fraction is None:
        return 0
    return max(
        (r.downgrade_steps for r in policy.budget_rules if remaining_budget_fraction <= float(r.remaining_at_most)),
        default=0,
    )


def remaining_bound(action: str, thresholds: ThresholdsView) -> float | None:
    """The most budget that can remain, given the enforcement outcome of a request (None: nothing known).

    The processor issues ``alert`` once spend reaches the alert threshold and ``fallback`` once it reaches the
    fallback threshold, so those outcomes bound the remaining fraction by 1 - threshold. No network, no extra
    state: the edge's Enforcer already answered.
    """
    if action == "alert":
        threshold = thresholds.alert
    elif action == "fallback":
        threshold = thresholds.fallback
    else:
        return None
    return None if threshold is None else _remaining_below(threshold)


@functools.lru_cache(maxsize=64)
def _remaining_below(threshold: Decimal) -> float:
    """1 - threshold as a float (Decimal arithmetic per request costs more than the lookup)."""
    return max(0.0, float(1 - threshold))


class RoutePlan(NamedTuple):
    """Everything ``choose_route`` decides before it knows the request's token counts: which tier's candidates
    compete, whether the requested model may be kept, and the reasons. It depends on the policy, the stats snapshot,
    the price table and the minute, so a gateway reuses one plan for every request with the same inputs until its
    stats snapshot is refreshed (``plan_route``); ``pick_route`` then prices and scores per request."""

    requested_model: str
    requested_provider: str
    routed: bool  # False: the environment has no routing section, the request passes unchanged
    requested_ok: bool  # its provider is allowed in the environment and speaks the endpoint's API
    requested_kept: bool  # ... and is under budget and not failing
    tier: str  # the tier whose candidates compete ("" when none is usable)
    candidates: tuple[_Row, ...]
    reason: str  # why a candidate other than the requested model wins
    no_route: str  # the NoRouteError message when nothing may serve


def plan_route(
    requested_model: str,
    complexity: Tier,
    environment: str,
    remaining_budget_fraction: float | None,
    policy: RoutingPolicyView,
    stats: RoutingStats,
    *,
    requested_provider: str,
    prices: PriceTable = EMPTY_TABLE,
    compatible_providers: Collection[str] | None = None,
    at: datetime | None = None,
) -> RoutePlan:
    """The part of ``choose_route`` that does not depend on the token estimate (same arguments, without it)."""
    at = at or datetime.now(UTC)
    env = policy.environment(environment)
    if env is None:
        return RoutePlan(requested_model, requested_provider, False, True, True, "", (), "unrouted", "")
    requested_ok = _eligible(env, policy, requested_provider, compatible_providers)
    # Kept only if its provider is also under budget and it is not failing.
    requested_kept = (
        requested_ok
        and not _over_budget(policy, stats, requested_provider)
        and not _failing(policy, stats, requested_provider, requested_model)
    )
    reasons = []
    index = TIER_ORDER.index(complexity)
    steps = downgrade_steps(policy, remaining_budget_fraction)
    if steps and index:
        lowered = max(0, index - steps)
        reasons.append(f"budget {remaining_budget_fraction:.0%} left: {complexity}->{TIER_ORDER[lowered]}")
        index = lowered
    # The wanted tier, then cheaper ones, then dearer ones.
    order = [*range(index, -1, -1), *range(index + 1, len(TIER_ORDER))]
    # every tier without the providers past their monthly budget, then with them alone
    found = (
        (TIER_ORDER[position], usable, over_budget)
        for over_budget in (False, True)
        for position in order
        if (usable := _usable(env, TIER_ORDER[position], policy, stats, prices, compatible_providers, at, over_budget))
    )
    tier, usable, over_budget = next(found, ("", [], False))
    if over_budget:
        reasons.append("no provider under its monthly budget: one past it")
    if not usable:
        no_route = (
            f"environment {environment or policy.default_environment!r} allows no provider for this request "
            f"(requested {requested_provider}/{requested_model}) and its tiers list no usable candidate"
        )
        return RoutePlan(requested_model, requested_provider, True, requested_ok, requested_kept, "", (), "", no_route)
    if tier is not TIER_ORDER[index]:
        reasons.append(f"no usable candidate in {TIER_ORDER[index]}")
    reason = "; ".join([f"tier {tier}", *reasons])
    if not requested_ok:
        reason += f"; {requested_provider} not allowed in {environment or policy.default_environment}"
    return RoutePlan(
        requested_model, requested_provider, True, requested_ok, requested_kept, tier.value, tuple(usable), reason, ""
    )


def pick_route(
    plan: RoutePlan,
    policy: RoutingPolicyView,
    *,
    estimate: TokenEstimate,
    prices: PriceTable = EMPTY_TABLE,
    at: datetime | None = None,
    priced: dict[tuple[str, str], int | None] | None = None,
) -> Route:
    """The route for one request under ``plan``: estimated costs, the score, and the requested model kept when it
    is cheaper (see the module docstring). Raises ``NoRouteError`` when the plan allows nothing.

    ``priced`` keeps the estimated cost of each (provider, model) priced for this request (the same estimate, table
    and time), so routing it again under a budget bound prices nothing twice."""
    at = at or datetime.now(UTC)
    priced = {} if priced is None else priced
    model, provider = plan.requested_model, plan.requested_provider
    requested_cost = priced.get((provider, model), _UNPRICED)
    if requested_cost is _UNPRICED:
        requested_cost = priced[(provider, model)] = _cost(provider, model, estimate, prices, at)
    if not plan.routed:
        return Route(model, provider, "", "unrouted", requested_cost, requested_cost)
    if not plan.candidates:
        if plan.requested_kept:
            return Route(model, provider, "", "requested", requested_cost, requested_cost)
        raise NoRouteError(plan.no_route)
    rows, costs = [], []
    for row in plan.candidates:  # all priced when planned (with the same table and minute)
        cost = priced.get((row.provider, row.model), _UNPRICED)
        if cost is _UNPRICED:
            cost = priced[(row.provider, row.model)] = _cost(row.provider, row.model, estimate, prices, at)
        if cost is not None:
            rows.append(row)
            costs.append(cost)
    if not rows:
        raise NoRouteError(plan.no_route or f"no priced candidate in tier {plan.tier}")
    if len(rows) == 1:  # nothing to weigh
        best = _Scored(0.0, costs[0], 0, rows[0].provider, rows[0].model)
    else:
        best = _score(rows, costs, policy)[0]
    winner_is_requested = (best.provider, best.model) == (provider, model)
    if (
        plan.requested_kept
        and not policy.allow_upgrade
        and requested_cost is not None
        and requested_cost < best.cost
        and not winner_is_requested
    ):
        return Route(model, provider, plan.tier, "requested", requested_cost, requested_cost)
    reason = "requested" if winner_is_requested else plan.reason
    return Route(best.model, best.provider, plan.tier, reason, requested_cost, best.cost)


def choose_route(
    requested_model: str,
    complexity: Tier,
    environment: str,
    remaining_budget_fraction: float | None,
    policy: RoutingPolicyView,
    stats: RoutingStats,
    *,
    requested_provider: str,
    estimate: TokenEstimate,
    prices: PriceTable = EMPTY_TABLE,
    compatible_providers: Collection[str] | None = None,
    at: datetime | None = None,
) -> Route:
    """The route for one request (see the module docstring for the rules and the score).

    ``remaining_budget_fraction`` is 1 - spend/limit of the tightest budget the request falls under (None when no
    budget applies); ``compatible_providers`` are the providers that speak the endpoint's API.
    Raises ``NoRouteError`` when the environment allows neither the requested model nor any candidate.
    """
    at = at or datetime.now(UTC)  # one price instant for every estimate of this request
    plan = plan_route(
        requested_model,
        complexity,
        environment,
        remaining_budget_fraction,
        policy,
        stats,
        requested_provider=requested_provider,
        prices=prices,
        compatible_providers=compatible_providers,
        at=at,
    )
    return pick_route(plan, policy, estimate=estimate, prices=prices, at=at)


def routing_tags(route: Route, requested_provider: str, requested_model: str) -> dict[str, str]:
    """Tags for the usage event: the tier and why; for a rerouted request also the requested model and what it
    would have cost (an estimate that ``with_requested_cost`` replaces with the exact figure once the response's
    token counts are known). Spend as requested is then, per event,
    ``if(mapContains(tags, 'requested_cost_nanos'), toInt64(tags['requested_cost_nanos']), cost_nanos)``.
    """
    tags = {"route_reason": route.reason}
    if route.tier:
        tags["route_tier"] = route.tier
    if (route.provider, route.model) != (requested_provider, requested_model):
        tags["requested_model"] = f"{requested_provider}/{requested_model}"
        if route.requested_cost_estimate_nanos is not None:
            tags["requested_cost_nanos"] = str(route.requested_cost_estimate_nanos)
    return tags


def with_requested_cost(event: UsageEvent, prices: PriceTable = EMPTY_TABLE) -> UsageEvent:
    """The event with ``tags["requested_cost_nanos"]`` priced exactly: its own token counts on the requested model
    (from ``tags["requested_model"]``). Events of requests that were not rerouted, or that used no tokens, are
    returned unchanged; an event whose usage was out of range keeps no requested cost (no saving can be claimed)."""
    requested = event.tags.get("requested_model")
    if "usage_error" in event.tags and "requested_cost_nanos" in event.tags:  # no usage to compare with
        return event.model_copy(update={"tags": {k: v for k, v in event.tags.items() if k != "requested_cost_nanos"}})
    if not requested or not (event.input_tokens or event.output_tokens):
        return event
    provider, _, model = requested.partition("/")
    try:
        cost = price_usage(
            provider,
            model,
            event.input_tokens,
            event.output_tokens,
            event.cached_input_tokens,
            event.cache_write_tokens,
            event.occurred_at,
            prices,
            detail_of(event.__dict__),  # the same reasoning, audio, cache TTL and tier as the call that ran
        ).cost_nanos
    except UnknownModelError:
        return event
    except CostOverflowError:  # an absurd price for the requested model: no figure the ledger could read back
        tags = {k: v for k, v in event.tags.items() if k != "requested_cost_nanos"}
        return event.model_copy(update={"tags": {**tags, "usage_error": "requested_cost_nanos: exceeds Int64"}})
    return event.model_copy(update={"tags": {**event.tags, "requested_cost_nanos": str(cost)}})


def requested_cost_nanos(
    provider: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    prices: PriceTable = EMPTY_TABLE,
    at: datetime | None = None,
) -> int | None:
    """What the actual token counts would have cost on the requested model (None: no price for it)."""
    return _cost(provider, model, TokenEstimate(input_tokens, output_tokens), prices, at)

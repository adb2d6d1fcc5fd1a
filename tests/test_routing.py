"""Routing policy validation and ``choose_route``: environment restriction, tiers, budget downgrade, provider score."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.events import UsageEvent
from spendstream.core.policy import PolicyError, Thresholds, parse_policy, policy_from_json
from spendstream.core.pricing import PriceOverride, PriceTable, Rates
from spendstream.core.routing_policy import Weights
from spendstream.gateway.complexity import Tier
from spendstream.gateway.provider_stats import EMPTY_STATS, ModelStats, RoutingStats
from spendstream.gateway.routing import (
    NoRouteError,
    TokenEstimate,
    choose_route,
    downgrade_steps,
    pick_route,
    plan_route,
    remaining_bound,
    requested_cost_nanos,
    routing_tags,
    with_requested_cost,
)

AT = datetime(2025, 6, 1, 12, tzinfo=UTC)
EST = TokenEstimate(1_000, 500)

POLICY_YAML = """\
name: routed
routing:
  default_environment: production
  environments:
    development:
      local_only: true
      tiers:
        simple: [local/llama-3.2-1b]
        medium: [local/llama-3.2-3b]
        complex: [local/llama-3.2-3b]
    staging:
      allowed_providers: [openai, local]
      tiers:
        simple: [local/llama-3.2-1b, openai/gpt-4o-mini]
        medium: [openai/gpt-4o-mini]
        complex: [openai/gpt-4o]
    production:
      tiers:
        simple: [openai/gpt-4o-mini, anthropic/claude-3-haiku]
        medium: [openai/gpt-4o-mini, anthropic/claude-3-5-haiku]
        complex: [openai/gpt-4o, anthropic/claude-3-5-sonnet]
  providers:
    openai: {priority: 1, monthly_budget_usd: 20000}
    anthropic: {priority: 2}
    local: {priority: 3, local: true}
  weights: {cost: 0.5, latency: 0.2, error_rate: 0.2, priority: 0.1}
  budget_rules:
    - {remaining_at_most: 0.20, downgrade_steps: 1}
    - {remaining_at_most: 0.05, downgrade_steps: 2}
"""
POLICY = parse_policy(POLICY_YAML)
ROUTING = POLICY.routing
assert ROUTING is not None


def rates(inp: str, out: str) -> Rates:
    return Rates(Decimal(inp), Decimal(out))


# Fixed prices (USD per M tokens) so tests do not depend on the price database.
PRICES = PriceTable(
    (
        PriceOverride("openai", "gpt-4o-mini", rates("0.15", "0.60")),
        PriceOverride("openai", "gpt-4o", rates("2.50", "10")),
        PriceOverride("anthropic", "claude-3-haiku", rates("0.25", "1.25")),
        PriceOverride("anthropic", "claude-3-5-haiku", rates("0.80", "4")),
        PriceOverride("anthropic", "claude-3-5-sonnet", rates("3", "15")),
        PriceOverride("local", "llama-3.2-1b", rates("0.02", "0.02")),
        PriceOverride("local", "llama-3.2-3b", rates("0.05", "0.05")),
    )
)


def route(
    model: str = "gpt-4o",
    provider: str = "openai",
    complexity: Tier = Tier.complex,
    environment: str = "production",
    remaining: float | None = None,
    stats: RoutingStats = EMPTY_STATS,
    compatible: set[str] | None = None,
):
    return choose_route(
        model,
        complexity,
        environment,
        remaining,
        ROUTING,
        stats,
        requested_provider=provider,
        estimate=EST,
        prices=PRICES,
        compatible_providers=compatible,
        at=AT,
    )


def cost(provider: str, model: str) -> int:
    value = requested_cost_nanos(provider, model, EST.input_tokens, EST.output_tokens, PRICES, AT)
    assert value is not None
    return value


# -- policy ------------------------------------------------------------------------------------------------------


def test_routing_section_parses_and_round_trips() -> None:
    assert ROUTING.providers["openai"].monthly_budget_nanos == 20_000 * 10**9
    assert [str(c) for c in ROUTING.environments["development"].tiers.of(Tier.simple)] == ["local/llama-3.2-1b"]
    again = policy_from_json(POLICY.to_json())
    assert again == POLICY and again.version == POLICY.version


def test_policy_without_routing_still_parses() -> None:
    assert parse_policy("name: plain\n").routing is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("local/llama-3.2-3b]\n    staging", "openai/gpt-4o]\n    staging"), "local_only but provider is not local"),
        (
            ("[openai/gpt-4o-mini]\n        complex", "[mistral/small]\n        complex"),
            "'mistral' is not in providers",
        ),
        (("[openai/gpt-4o, anthropic", "[gpt-4o, anthropic"), "must be provider/model"),
        (("simple: [local/llama-3.2-1b, openai", "simple: [local/llama-3.2-1b, anthropic"), "not in allowed_providers"),
        (("default_environment: production", "default_environment: prod"), "default_environment 'prod'"),
        (("downgrade_steps: 2", "downgrade_steps: 3"), "less than or equal to 2"),
        (
            (
                "cost: 0.5, latency: 0.2, error_rate: 0.2, priority: 0.1",
                "cost: 0, latency: 0, error_rate: 0, priority: 0",
            ),
            "at least one weight",
        ),
    ],
)
def test_bad_routing_sections_name_the_problem(edit: tuple[str, str], message: str) -> None:
    old, new = edit
    assert old in POLICY_YAML
    with pytest.raises(PolicyError) as exc:
        parse_policy(POLICY_YAML.replace(old, new, 1), "p.yaml")
    assert message in str(exc.value)
    assert str(exc.value).startswith("p.yaml:")


def test_empty_tier_is_rejected() -> None:
    with pytest.raises(PolicyError, match=r"routing\.environments\.staging\.tiers\.medium"):
        parse_policy(POLICY_YAML.replace("medium: [openai/gpt-4o-mini]", "medium: []"))


# -- environment restriction ---------------------------------------------------------------------------------------


def test_unconfigured_environment_passes_unrouted() -> None:
    r = route(environment="qa")
    assert (r.model, r.provider, r.tier, r.reason) == ("gpt-4o", "openai", "", "unrouted")
    assert r.requested_cost_estimate_nanos == r.routed_cost_estimate_nanos == cost("openai", "gpt-4o")


def test_empty_environment_uses_the_default_environment() -> None:
    assert route(environment="", complexity=Tier.simple).model == "gpt-4o-mini"


@pytest.mark.parametrize("complexity", list(Tier))
def test_development_never_leaves_local_models(complexity: Tier) -> None:
    r = route(environment="development", complexity=complexity)
    assert r.provider == "local"
    assert r.model == ("llama-3.2-1b" if complexity is Tier.simple else "llama-3.2-3b")
    assert "openai not allowed in development" in r.reason
    assert r.routed_cost_estimate_nanos < r.requested_cost_estimate_nanos


def test_development_keeps_a_requested_local_model_that_is_cheaper() -> None:
    r = route(model="llama-3.2-1b", provider="local", environment="development", complexity=Tier.complex)
    assert (r.model, r.reason) == ("llama-3.2-1b", "requested")


def test_no_route_when_environment_allows_nothing_compatible() -> None:
    with pytest.raises(NoRouteError, match="development"):
        route(environment="development", compatible={"anthropic"})


def test_compatible_providers_limit_candidates() -> None:
    r = route(model="claude-3-5-sonnet", provider="anthropic", complexity=Tier.simple, compatible={"anthropic"})
    assert (r.provider, r.model) == ("anthropic", "claude-3-haiku")


def test_staging_allowed_providers() -> None:
    r = route(model="claude-3-5-sonnet", provider="anthropic", environment="staging", complexity=Tier.complex)
    assert (r.provider, r.model) == ("openai", "gpt-4o")
    assert "anthropic not allowed in staging" in r.reason


# -- tiers and budget rules --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("complexity", "expected"),
    [(Tier.simple, "gpt-4o-mini"), (Tier.medium, "gpt-4o-mini"), (Tier.complex, "gpt-4o")],
)
def test_tier_by_complexity(complexity: Tier, expected: str) -> None:
    r = route(complexity=complexity)
    assert (r.model, r.tier) == (expected, complexity.value)


def test_routing_never_upgrades_past_the_requested_model() -> None:
    r = route(model="gpt-4o-mini", complexity=Tier.complex)
    assert (r.model, r.reason, r.tier) == ("gpt-4o-mini", "requested", "complex")
    assert r.routed_cost_estimate_nanos == r.requested_cost_estimate_nanos


def test_allow_upgrade_routes_to_the_tier() -> None:
    upgrading = ROUTING.model_copy(update={"allow_upgrade": True})
    r = choose_route(
        "gpt-4o-mini",
        Tier.complex,
        "production",
        None,
        upgrading,
        RoutingStats(),
        requested_provider="openai",
        estimate=EST,
        prices=PRICES,
        at=AT,
    )
    assert r.model == "gpt-4o" and r.routed_cost_estimate_nanos > r.requested_cost_estimate_nanos


@pytest.mark.parametrize(
    ("remaining", "complexity", "tier"),
    [
        (None, Tier.complex, "complex"),
        (0.5, Tier.complex, "complex"),
        (0.21, Tier.complex, "complex"),
        (0.20, Tier.complex, "medium"),  # "at most": the bound an alert at 80% gives triggers the rule
        (0.19, Tier.complex, "medium"),
        (0.19, Tier.medium, "simple"),
        (0.19, Tier.simple, "simple"),
        (0.05, Tier.complex, "simple"),
        (0.04, Tier.complex, "simple"),
        (0.0, Tier.medium, "simple"),
    ],
)
def test_budget_aware_downgrade(remaining: float | None, complexity: Tier, tier: str) -> None:
    r = route(complexity=complexity, remaining=remaining)
    assert r.tier == tier
    if tier != complexity.value:
        assert f"budget {remaining:.0%} left: {complexity}->{tier}" in r.reason


@given(st.floats(min_value=0, max_value=1), st.sampled_from(list(Tier)))
def test_downgrade_is_monotone_in_remaining_budget(remaining: float, complexity: Tier) -> None:
    richer = min(1.0, remaining + 0.1)
    order = [t.value for t in Tier]
    assert order.index(route(complexity=complexity, remaining=remaining).tier) <= order.index(
        route(complexity=complexity, remaining=richer).tier
    )
    assert downgrade_steps(ROUTING, remaining) >= downgrade_steps(ROUTING, richer)


def test_remaining_bound_from_enforcement_outcomes() -> None:
    thresholds = POLICY.thresholds  # alert 0.80, fallback 0.90
    assert remaining_bound("alert", thresholds) == pytest.approx(0.20)
    assert remaining_bound("fallback", thresholds) == pytest.approx(0.10)
    assert remaining_bound("allow", thresholds) is None
    assert remaining_bound("alert", Thresholds(alert=None)) is None
    assert remaining_bound("alert", Thresholds(alert=Decimal("1.5"), fallback=None, shutoff=None)) == 0.0
    assert route(remaining=remaining_bound("alert", thresholds)).tier == "medium"


def test_provider_over_budget_is_skipped() -> None:
    spent = RoutingStats(provider_spend_nanos={"openai": 20_000 * 10**9})
    r = route(complexity=Tier.complex, stats=spent)
    assert (r.provider, r.model) == ("anthropic", "claude-3-5-sonnet")


def test_a_provider_past_its_budget_is_the_last_resort_not_a_refusal() -> None:
    """An attacker session: one ingested event of $10 M put openai past its monthly budget, and every call only
    openai could serve got 403 "no usable candidate". A provider past its budget is not routed to while another
    candidate remains; when none does, it serves, saying why."""
    only_openai = parse_policy(
        POLICY_YAML.replace("allowed_providers: [openai, local]", "allowed_providers: [openai]").replace(
            "simple: [local/llama-3.2-1b, openai/gpt-4o-mini]", "simple: [openai/gpt-4o-mini]"
        )
    ).routing
    assert only_openai is not None
    spent = RoutingStats(provider_spend_nanos={"openai": 20_000 * 10**9})
    r = choose_route(
        "gpt-4o-mini", Tier.medium, "staging", None, only_openai, spent,
        requested_provider="openai", estimate=EST, prices=PRICES, at=AT,
    )  # fmt: skip
    assert (r.provider, r.model) == ("openai", "gpt-4o-mini")  # served, not refused
    dearer = choose_route(
        "gpt-4o", Tier.medium, "staging", None, only_openai, spent,
        requested_provider="openai", estimate=EST, prices=PRICES, at=AT,
    )  # fmt: skip
    assert dearer.model == "gpt-4o-mini" and "no provider under its monthly budget" in dearer.reason


def test_cheaper_tier_when_a_tier_has_no_usable_candidate() -> None:
    spent = RoutingStats(provider_spend_nanos={"openai": 20_000 * 10**9})
    r = route(environment="staging", complexity=Tier.medium, stats=spent)
    assert (r.model, r.tier) == ("llama-3.2-1b", "simple")
    assert "no usable candidate in medium" in r.reason


# -- provider score ------------------------------------------------------------------------------------------------


def stats_for(**by_key: tuple[int, int, int]) -> RoutingStats:
    """provider__model=(samples, errors, p95_ms)."""
    models = {}
    for key, (samples, errors, p95) in by_key.items():
        provider, model = key.split("__")
        models[(provider, model.replace("_", "-"))] = ModelStats(samples, errors, p95 // 2, p95)
    return RoutingStats(models)


def test_cheapest_wins_when_nothing_is_observed() -> None:
    r = route(complexity=Tier.simple, model="claude-3-5-sonnet", provider="anthropic")
    assert (r.provider, r.model) == ("openai", "gpt-4o-mini")


# Weights that value reliability over price: cost 0.1, latency 0.4, error rate 0.4, priority 0.1.
RELIABLE = ROUTING.model_copy(update={"weights": Weights(cost=0.1, latency=0.4, error_rate=0.4, priority=0.1)})


def route_reliable(stats: RoutingStats):
    return choose_route(
        "gpt-4o", Tier.simple, "production", None, RELIABLE, stats,
        requested_provider="openai", estimate=EST, prices=PRICES, at=AT,
    )  # fmt: skip


def test_cost_dominates_with_the_default_weights() -> None:
    # gpt-4o-mini: cost 0 + error 0.2 * (0.4 / 0.5) = 0.16; claude-3-haiku: cost 0.5 + priority 0.1 = 0.6
    stats = stats_for(openai__gpt_4o_mini=(100, 40, 500), anthropic__claude_3_haiku=(100, 0, 500))
    assert route(complexity=Tier.simple, stats=stats).model == "gpt-4o-mini"


def test_a_failing_model_loses_to_a_dearer_healthy_one() -> None:
    # gpt-4o-mini: error 0.4 * 0.8 = 0.32; claude-3-haiku: cost 0.1 + priority 0.1 = 0.2
    stats = stats_for(openai__gpt_4o_mini=(100, 40, 500), anthropic__claude_3_haiku=(100, 0, 500))
    r = route_reliable(stats)
    assert (r.provider, r.model) == ("anthropic", "claude-3-haiku")


def test_error_rate_above_the_cutoff_excludes_unless_all_fail() -> None:
    failing = stats_for(openai__gpt_4o=(50, 30, 100))
    assert route(stats=failing).model == "claude-3-5-sonnet"
    all_failing = stats_for(openai__gpt_4o=(50, 30, 100), anthropic__claude_3_5_sonnet=(50, 45, 100))
    assert route(stats=all_failing).model == "gpt-4o"  # both fail: scored anyway, the cheaper and healthier wins


def test_slow_model_loses_when_latency_weighs_enough() -> None:
    # slow gpt-4o-mini: latency 0.4; claude-3-haiku: cost 0.1 + priority 0.1 = 0.2
    stats = stats_for(openai__gpt_4o_mini=(100, 0, 9_000), anthropic__claude_3_haiku=(100, 0, 300))
    assert route_reliable(stats).model == "claude-3-haiku"
    fast = stats_for(openai__gpt_4o_mini=(100, 0, 300), anthropic__claude_3_haiku=(100, 0, 300))
    assert route_reliable(fast).model == "gpt-4o-mini"


def test_too_few_samples_are_ignored() -> None:
    stats = stats_for(openai__gpt_4o_mini=(5, 5, 60_000))
    assert route(complexity=Tier.simple, stats=stats).model == "gpt-4o-mini"


def test_priority_breaks_equal_cost() -> None:
    same = PriceTable(
        (
            PriceOverride("openai", "gpt-4o-mini", rates("1", "1")),
            PriceOverride("anthropic", "claude-3-haiku", rates("1", "1")),
        )
    )
    r = choose_route(
        "x", Tier.simple, "production", None, ROUTING, RoutingStats(),
        requested_provider="openai", estimate=EST, prices=same, at=AT,
    )  # fmt: skip
    assert (r.provider, r.model) == ("openai", "gpt-4o-mini")


@given(
    st.tuples(st.integers(20, 500), st.integers(0, 500), st.integers(1, 30_000)),
    st.tuples(st.integers(20, 500), st.integers(0, 500), st.integers(1, 30_000)),
)
def test_score_is_deterministic_and_prefers_dominant_candidates(
    a: tuple[int, int, int], b: tuple[int, int, int]
) -> None:
    a = (a[0], min(a[1], a[0]), a[2])
    b = (b[0], min(b[1], b[0]), b[2])
    stats = stats_for(openai__gpt_4o_mini=a, anthropic__claude_3_haiku=b)
    first = route(complexity=Tier.simple, stats=stats)
    assert route(complexity=Tier.simple, stats=stats) == first
    # gpt-4o-mini is cheaper and has the better priority: it loses only if slower or failing more often.
    a_rate, b_rate = a[1] / a[0], b[1] / b[0]
    if a[2] <= b[2] and a_rate <= b_rate:
        assert first.model == "gpt-4o-mini"
    if first.model == "claude-3-haiku":
        assert a[2] > b[2] or a_rate > b_rate


# One candidate cheaper on input, the other on output: which wins depends on the request's token mix.
CROSSED = PriceTable(
    (
        PriceOverride("openai", "gpt-4o-mini", rates("0.10", "2")),
        PriceOverride("anthropic", "claude-3-haiku", rates("1", "0.20")),
        PriceOverride("openai", "gpt-4o", rates("2.50", "10")),
    )
)


@given(st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 100_000)), min_size=1, max_size=20))
def test_a_plan_reused_for_many_requests_routes_each_as_choose_route_does(estimates: list[tuple[int, int]]) -> None:
    # The gateway plans once per (model, tier, environment, ...) and stats snapshot, then prices per request.
    plan = plan_route(
        "gpt-4o", Tier.simple, "production", None, ROUTING, EMPTY_STATS,
        requested_provider="openai", prices=CROSSED, at=AT,
    )  # fmt: skip
    for inp, out in [*estimates, (100_000, 0), (0, 100_000)]:
        estimate = TokenEstimate(inp, out)
        fresh = choose_route(
            "gpt-4o", Tier.simple, "production", None, ROUTING, EMPTY_STATS,
            requested_provider="openai", estimate=estimate, prices=CROSSED, at=AT,
        )  # fmt: skip
        assert pick_route(plan, ROUTING, estimate=estimate, prices=CROSSED, at=AT) == fresh
    winners = {pick_route(plan, ROUTING, estimate=TokenEstimate(i, o), prices=CROSSED, at=AT).model
               for i, o in ((100_000, 0), (0, 100_000))}  # fmt: skip
    assert winners == {"gpt-4o-mini", "claude-3-haiku"}  # the plan fixes the competitors, not the winner


def test_routing_tags() -> None:
    r = route(complexity=Tier.simple)
    tags = routing_tags(r, "openai", "gpt-4o")
    assert tags == {
        "route_reason": "tier simple",
        "route_tier": "simple",
        "requested_model": "openai/gpt-4o",
        "requested_cost_nanos": str(cost("openai", "gpt-4o")),
    }
    assert int(tags["requested_cost_nanos"]) > r.routed_cost_estimate_nanos
    kept = route(model="gpt-4o-mini", complexity=Tier.complex)
    assert routing_tags(kept, "openai", "gpt-4o-mini") == {"route_reason": "requested", "route_tier": "complex"}
    assert routing_tags(route(environment="qa"), "openai", "gpt-4o") == {"route_reason": "unrouted"}


def test_requested_cost_is_repriced_with_actual_tokens() -> None:
    tags = routing_tags(route(complexity=Tier.simple), "openai", "gpt-4o")
    served = UsageEvent(
        provider="openai", model_requested="gpt-4o", model_served="gpt-4o-mini", occurred_at=AT,
        input_tokens=2_000, cached_input_tokens=1_000, output_tokens=100, cost_nanos=1, tags=tags,
    )  # fmt: skip
    exact = with_requested_cost(served, PRICES)
    # gpt-4o at $2.50/M input (cache reads default to the input rate) and $10/M output
    assert exact.tags["requested_cost_nanos"] == str(2_000 * 2_500 + 100 * 10_000)
    assert exact.tags["route_tier"] == "simple" and exact.cost_nanos == 1
    unrouted = served.model_copy(update={"tags": {}})
    assert with_requested_cost(unrouted, PRICES) is unrouted
    no_tokens = served.model_copy(update={"input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0})
    assert with_requested_cost(no_tokens, PRICES) is no_tokens


def test_unknown_requested_model_is_priced_at_the_default_and_routed_away() -> None:
    r = route(model="mystery-model", complexity=Tier.simple)
    assert r.model == "gpt-4o-mini"
    assert r.requested_cost_estimate_nanos > r.routed_cost_estimate_nanos

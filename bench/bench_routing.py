"""Cost of the routing core per request: complexity classifier (latency and accuracy), cache key + lookup,
choose_route, and pick_route with a reused plan (what the gateway runs per request). Baseline from the same
run: json.loads of the same request bodies, which the gateway does anyway.

Run: .venv/bin/python bench/bench_routing.py
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spendstream.core.policy import parse_policy
from spendstream.gateway.complexity import Tier, assess
from spendstream.gateway.provider_stats import ProviderStats
from spendstream.gateway.response_cache import CachedResponse, ResponseCache, cache_key
from spendstream.gateway.routing import RoutePlan, TokenEstimate, choose_route, pick_route, plan_route

ROOT = Path(__file__).resolve().parents[1]
ROWS = [json.loads(line) for line in (ROOT / "tests" / "data" / "complexity_labelled.jsonl").open(encoding="utf-8")]
BODIES = [r["body"] for r in ROWS]
RAW = [json.dumps(b).encode() for b in BODIES]

POLICY = parse_policy(
    """
routing:
  default_environment: production
  environments:
    development:
      local_only: true
      tiers: {simple: [local/llama-3.2-1b], medium: [local/llama-3.2-3b], complex: [local/llama-3.2-3b]}
    production:
      tiers:
        simple: [openai/gpt-4o-mini, anthropic/claude-3-haiku, local/llama-3.2-1b]
        medium: [openai/gpt-4o-mini, anthropic/claude-3-5-haiku]
        complex: [openai/gpt-4o, anthropic/claude-3-5-sonnet]
  providers:
    openai: {priority: 1, monthly_budget_usd: 20000}
    anthropic: {priority: 2}
    local: {priority: 3, local: true}
pricing:
  overrides:
    - {provider: local, model: llama-3.2-1b, input_per_mtok: "0.02", output_per_mtok: "0.02"}
    - {provider: local, model: llama-3.2-3b, input_per_mtok: "0.05", output_per_mtok: "0.05"}
"""
)


def percentiles_us(fn: Callable[[Any], object], items: list[Any], rounds: int) -> tuple[float, float, float]:
    """p50, p99 and max of single calls, in microseconds, over ``rounds`` passes of ``items``."""
    samples = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for item in items:
            start = clock()
            fn(item)
            samples.append(clock() - start)
    samples.sort()
    n = len(samples)
    return samples[n // 2] / 1e3, samples[int(n * 0.99)] / 1e3, samples[-1] / 1e3


def show(name: str, figures: tuple[float, float, float]) -> None:
    p50, p99, worst = figures
    print(f"  {name:<44} p50 {p50:8.1f} us   p99 {p99:8.1f} us   max {worst:9.1f} us")


def main() -> None:
    print(f"routing core, {len(BODIES)} labelled request bodies")
    for split in ("all", "holdout"):
        rows = [r for r in ROWS if split == "all" or r.get("split") == split]
        correct = sum(assess(r["body"]).tier.value == r["label"] for r in rows)
        print(f"  classifier accuracy ({split:>7}): {correct}/{len(rows)} = {correct / len(rows):.1%}")
    show("json.loads of the body (baseline)", percentiles_us(json.loads, RAW, 20))
    show("assess (complexity classifier)", percentiles_us(assess, BODIES, 20))
    pasted = "The committee reviewed the design, the budget and the schedule; then it asked for changes. " * 1100
    huge = [{"messages": [{"role": "user", "content": "Summarise this document:\n\n" + pasted}]}]
    show(f"assess, one {len(pasted) // 1000} kB pasted document", percentiles_us(assess, huge, 300))

    cache = ResponseCache(ttl_s=300, max_bytes=64 * 1024 * 1024, max_entry_bytes=1024 * 1024)
    answer = CachedResponse(200, "application/json", body=b'{"choices":[]}' * 50)
    for body in BODIES[::2]:
        cache.put(cache_key(body, "chat.completions", "team:support"), answer)
    show("cache_key + get (half hit)", percentiles_us(
        lambda b: cache.get(cache_key(b, "chat.completions", "team:support")), BODIES, 20
    ))  # fmt: skip

    routing = POLICY.routing
    assert routing is not None
    stats = ProviderStats()
    now = time.time()
    for i in range(2000):
        stats.observe("openai", "gpt-4o-mini", now, 200 + i % 300, i % 50 == 0)
        stats.observe("anthropic", "claude-3-haiku", now, 300 + i % 200, False)
    snapshot = stats.snapshot(now)
    at = datetime.now(UTC)
    prices = POLICY.price_table
    cases = [(Tier(t), env, frac) for t in ("simple", "medium", "complex") for env in ("production", "development")
             for frac in (None, 0.5, 0.1)]  # fmt: skip

    def route(case: tuple[Tier, str, float | None]) -> object:
        tier, env, frac = case
        return choose_route(
            "gpt-4o", tier, env, frac, routing, snapshot,
            requested_provider="openai", estimate=TokenEstimate(1200, 400), prices=prices, at=at,
        )  # fmt: skip

    show("choose_route (plan + pick)", percentiles_us(route, cases, 500))

    def plan(case: tuple[Tier, str, float | None]) -> RoutePlan:
        tier, env, frac = case
        return plan_route(
            "gpt-4o", tier, env, frac, routing, snapshot, requested_provider="openai", prices=prices, at=at
        )

    plans = {case: plan(case) for case in cases}
    estimate = TokenEstimate(1200, 400)
    show("pick_route (plan reused, as in the gateway)", percentiles_us(
        lambda case: pick_route(plans[case], routing, estimate=estimate, prices=prices, at=at), cases, 500
    ))  # fmt: skip
    show("ProviderStats.snapshot (2 models x 512)", percentiles_us(lambda _: stats.snapshot(now), [0], 200))


if __name__ == "__main__":
    main()

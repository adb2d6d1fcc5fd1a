"""Per-event cost of the processor's pure core: pricing (memoised vs genai-prices direct), scopes, budget rules.

Run: .venv/bin/python bench/bench_processor_core.py
"""

from __future__ import annotations

import timeit
from datetime import UTC, datetime
from pathlib import Path

from genai_prices import Usage, calc_price

from spendstream.core.policy import load_policy
from spendstream.core.pricing import price_usage
from spendstream.processor.budget_rules import action_for_spend
from spendstream.processor.scopes import matching_budgets, scopes_for

POLICY = load_policy(Path(__file__).resolve().parents[1] / "infra" / "policy" / "default.yaml")
AT = datetime(2025, 3, 1, 12, 30, tzinfo=UTC)
EVENT = {
    "team": "marketing",
    "feature": "ai_chatbot",
    "user": "u17",
    "customer": "c3",
    "environment": "production",
    "model_requested": "gpt-4o",
}
BUDGET = POLICY.budgets[0]


def per_call_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    cases = {
        "genai-prices calc_price (baseline)": (
            lambda: calc_price(
                Usage(input_tokens=1000, output_tokens=100, cache_read_tokens=500), "gpt-4o", provider_id="openai"
            ),
            2_000,
        ),
        "price_usage openai/gpt-4o (memoised)": (
            lambda: price_usage("openai", "gpt-4o", 1000, 100, 500, at=AT, overrides=POLICY.price_table),
            100_000,
        ),
        "price_usage local override (memoised)": (
            lambda: price_usage("local", "llama-3.2-1b", 1000, 100, at=AT, overrides=POLICY.price_table),
            100_000,
        ),
        "price_usage google tiered (per call)": (
            lambda: price_usage("google", "gemini-1.5-flash", 1000, 100, at=AT, overrides=POLICY.price_table),
            5_000,
        ),
        "scopes_for (7 scopes)": (lambda: scopes_for(EVENT, POLICY), 100_000),
        "matching_budgets x7": (lambda: [matching_budgets(s, POLICY) for s in scopes_for(EVENT, POLICY)], 50_000),
        "action_for_spend": (
            lambda: action_for_spend(7_300_000_000_000, BUDGET.limit_nanos, BUDGET.thresholds),
            200_000,
        ),
    }
    for name, (fn, number) in cases.items():
        print(f"{name:<42} {per_call_us(fn, number):8.2f} us/call")


if __name__ == "__main__":
    main()

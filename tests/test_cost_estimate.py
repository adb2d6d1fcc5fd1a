"""What the gateway holds for a request in flight: never less than what the provider can bill for it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.events import MAX_EVENT_COST_NANOS
from spendstream.core.pricing import PriceTable, price_usage
from spendstream.gateway.cost_estimate import UNBOUNDED_OUTPUT_TOKENS, output_tokens_asked, request_cost_estimate

limits = st.sampled_from(["max_tokens", "max_completion_tokens", "max_output_tokens"])


@given(
    limit_name=limits,
    per_completion=st.integers(1, 100_000),
    n=st.integers(1, 128),
    best_of=st.integers(1, 20),
    billed_fraction=st.fractions(0, 1),
    prompt_bytes=st.integers(0, 400_000),
)
def test_the_estimate_covers_every_completion_the_provider_can_bill(
    limit_name: str, per_completion: int, n: int, best_of: int, billed_fraction, prompt_bytes: int
) -> None:
    body = {"model": "gpt-4o", limit_name: per_completion, "n": n, "best_of": best_of}
    billed_output = int(per_completion * max(n, best_of) * billed_fraction)
    billed = price_usage("openai", "gpt-4o", prompt_bytes // 4, billed_output).cost_nanos
    assert request_cost_estimate("openai", "gpt-4o", body, prompt_bytes) >= billed


def test_completions_multiply_the_output_and_bad_values_count_as_one() -> None:
    assert output_tokens_asked({"max_tokens": 50, "n": 8}) == 400
    assert output_tokens_asked({"max_tokens": 50, "n": 2, "best_of": 5}) == 250
    assert output_tokens_asked({"max_tokens": 50, "n": True}) == 50  # a bool is not a count
    assert output_tokens_asked({"max_tokens": 50, "n": "8"}) == 50
    assert output_tokens_asked({"max_tokens": 50, "n": -3}) == 50


def test_a_request_without_an_output_limit_holds_the_longest_answer_for_each_completion() -> None:
    assert output_tokens_asked({}) == UNBOUNDED_OUTPUT_TOKENS
    assert output_tokens_asked({"n": 4}) == 4 * UNBOUNDED_OUTPUT_TOKENS
    assert output_tokens_asked({"max_tokens": None}) == UNBOUNDED_OUTPUT_TOKENS


def test_an_estimate_beyond_any_price_holds_the_ceiling_and_an_unknown_model_holds_nothing() -> None:
    # 0 here would hold nothing for the request: it must hold more than any budget can give
    huge = {"max_tokens": 10**30}
    assert request_cost_estimate("openai", "gpt-4o", huge, 100) == MAX_EVENT_COST_NANOS
    rejecting = PriceTable(unknown_model="reject")
    assert request_cost_estimate("openai", "no-such-model-xyz", {"max_tokens": 10}, 100, rejecting) == 0

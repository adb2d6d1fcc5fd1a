"""Pricing in integer nano-USD: genai-prices, overrides, cache conventions, unknown models, rounding."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.pricing import (
    PriceOverride,
    PriceTable,
    Rates,
    UnknownModelError,
    normalise_usage,
    price_usage,
    to_nanos,
    usd_to_nanos,
)

AT = datetime(2025, 3, 1, 12, tzinfo=UTC)
CHEAP = PriceTable((PriceOverride("acme", "cheap", Rates(Decimal("0.075"), Decimal("0.3"), Decimal("0.0375"))),))


def test_ten_tokens_at_0_075_per_million_is_750_nanos() -> None:
    assert price_usage("acme", "cheap", 10, 0, at=AT, overrides=CHEAP).cost_nanos == 750


def test_genai_prices_gpt_4o_with_cached_tokens() -> None:
    # 500 uncached x $2.50/M + 500 cached x $1.25/M + 100 output x $10/M = $0.002875
    result = price_usage("openai", "gpt-4o", 1000, 100, 500, at=AT)
    assert result == (2_875_000, "genai-prices:openai/gpt-4o", False)


def test_anthropic_cache_writes_cost_more_than_plain_input() -> None:
    # claude-3-5-sonnet: $3/M input, $3.75/M cache write, $15/M output
    assert price_usage("anthropic", "claude-3-5-sonnet", 1000, 100, 0, 500, at=AT).cost_nanos == 4_875_000
    assert price_usage("anthropic", "claude-3-5-sonnet", 1000, 100, at=AT).cost_nanos == 4_500_000


def test_override_wins_only_while_effective() -> None:
    row = PriceOverride(
        "openai",
        "gpt-4o",
        Rates(Decimal("1"), Decimal("2")),
        datetime(2025, 1, 1, tzinfo=UTC),
        datetime(2025, 2, 1, tzinfo=UTC),
    )
    table = PriceTable((row,))
    inside = price_usage("openai", "gpt-4o", 1_000_000, 0, at=datetime(2025, 1, 15, tzinfo=UTC), overrides=table)
    after = price_usage("openai", "gpt-4o", 1_000_000, 0, at=datetime(2025, 2, 1, tzinfo=UTC), overrides=table)
    assert inside == (1_000_000_000, "override:openai/gpt-4o", False)
    assert after.cost_nanos == 2_500_000_000 and after.source.startswith("genai-prices")


def test_naive_times_are_utc_wherever_they_meet_an_override() -> None:
    """The ledger's client returns its UTC times naive and a price table may be built with naive dates: mixing them
    with aware ones raised ``TypeError`` (``ledger reprice`` of any overridden model). A naive time is UTC."""
    aware = PriceOverride("openai", "gpt-4o", Rates(Decimal("1"), Decimal("2")), datetime(2026, 11, 1, tzinfo=UTC))
    naive = PriceOverride(
        "openai", "gpt-4o", Rates(Decimal("1"), Decimal("2")), datetime(2026, 1, 1), datetime(2026, 11, 1)
    )
    assert naive.effective_to == datetime(2026, 11, 1, tzinfo=UTC)
    for row, inside, outside in ((aware, datetime(2026, 11, 1), datetime(2026, 10, 31, 23, 59)),
                                 (naive, datetime(2026, 10, 31, 23, 59), datetime(2026, 11, 1))):  # fmt: skip
        table = PriceTable((row,))
        for at in (inside, inside.replace(tzinfo=UTC)):
            assert price_usage("openai", "gpt-4o", 1_000_000, 0, at=at, overrides=table).cost_nanos == 1_000_000_000
        for at in (outside, outside.replace(tzinfo=UTC)):
            assert price_usage("openai", "gpt-4o", 1_000_000, 0, at=at, overrides=table).source.startswith("genai")
    mixed = PriceTable((aware, naive))  # sorting rows by their dates compares them too
    assert mixed.override_for("openai", "gpt-4o", datetime(2026, 12, 1)) is aware


def test_newest_overlapping_override_wins() -> None:
    old = PriceOverride("local", "llama", Rates(Decimal("1"), Decimal("1")), datetime(2024, 1, 1, tzinfo=UTC))
    new = PriceOverride("local", "llama", Rates(Decimal("2"), Decimal("2")), datetime(2025, 1, 1, tzinfo=UTC))
    table = PriceTable((new, old))
    assert price_usage("local", "llama", 1_000_000, 0, at=AT, overrides=table).cost_nanos == 2_000_000_000
    assert (
        price_usage("local", "llama", 1_000_000, 0, at=datetime(2024, 6, 1, tzinfo=UTC), overrides=table).cost_nanos
        == 1_000_000_000
    )


def test_unknown_model_is_flagged_at_default_price_never_free() -> None:
    result = price_usage("local", "mystery-7b", 1000, 100, at=AT)
    assert result.flagged_unknown and result.source == "default"
    assert result.cost_nanos == 1000 * 15_000 + 100 * 75_000


def test_unknown_model_rejected_when_configured() -> None:
    with pytest.raises(UnknownModelError, match="mystery-7b"):
        price_usage("local", "mystery-7b", 10, 1, at=AT, overrides=PriceTable(unknown_model="reject"))


def test_self_hosted_model_priced_by_override() -> None:
    table = PriceTable((PriceOverride("local", "llama-3.2-1b", Rates(Decimal("0.02"), Decimal("0.02"))),), "reject")
    assert price_usage("local", "llama-3.2-1b", 1000, 1000, at=AT, overrides=table).cost_nanos == 40_000


def test_bad_token_counts_rejected() -> None:
    with pytest.raises(ValueError, match="exceed input_tokens"):
        price_usage("openai", "gpt-4o", 10, 0, 8, 5, at=AT)
    with pytest.raises(ValueError, match="negative"):
        price_usage("openai", "gpt-4o", -1, 0, at=AT)


def test_rounding_half_even_but_never_zero() -> None:
    assert to_nanos(Decimal("2.5")) == 2
    assert to_nanos(Decimal("3.5")) == 4
    assert to_nanos(Decimal("0.3")) == 1
    assert to_nanos(Decimal(0)) == 0
    assert usd_to_nanos("8000") == 8_000_000_000_000
    assert usd_to_nanos(Decimal("0.000000001")) == 1


def test_normalise_openai_prompt_tokens_include_cached() -> None:
    raw = {"prompt_tokens": 1000, "completion_tokens": 50, "prompt_tokens_details": {"cached_tokens": 800}}
    assert normalise_usage("openai", raw) == (1000, 800, 0, 50)
    responses = {"input_tokens": 300, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 100}}
    assert normalise_usage("openai", responses) == (300, 100, 0, 7)


def test_normalise_anthropic_adds_cache_reads_and_writes() -> None:
    raw = {"input_tokens": 20, "cache_read_input_tokens": 900, "cache_creation_input_tokens": 80, "output_tokens": 5}
    assert normalise_usage("anthropic", raw) == (1000, 900, 80, 5)


def test_normalise_google_counts_thoughts_as_output() -> None:
    raw = {"promptTokenCount": 100, "cachedContentTokenCount": 40, "candidatesTokenCount": 10, "thoughtsTokenCount": 5}
    assert normalise_usage("google", raw) == (100, 40, 0, 15)


def test_normalise_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match="negative"):
        normalise_usage("openai", {"prompt_tokens": -3})


def test_price_table_version_tracks_content() -> None:
    assert PriceTable().version == PriceTable().version
    assert CHEAP.version != PriceTable().version


tokens = st.integers(min_value=0, max_value=10_000_000)


@given(total=tokens, cached_share=st.integers(0, 100), out=tokens)
def test_cached_reads_never_cost_more_than_uncached_and_never_zero(total: int, cached_share: int, out: int) -> None:
    cached = total * cached_share // 100
    with_cache = price_usage("openai", "gpt-4o", total, out, cached, at=AT)
    without = price_usage("openai", "gpt-4o", total, out, at=AT)
    assert isinstance(with_cache.cost_nanos, int)
    assert with_cache.cost_nanos <= without.cost_nanos
    assert (with_cache.cost_nanos > 0) == (total + out > 0)


@given(a=tokens, b=tokens, out=tokens)
def test_price_is_additive_for_linear_prices(a: int, b: int, out: int) -> None:
    # $0.075 and $0.3 per million are whole nanos per token, so no rounding can break additivity.
    joined = price_usage("acme", "cheap", a + b, out, at=AT, overrides=CHEAP).cost_nanos
    split = price_usage("acme", "cheap", a, out, at=AT, overrides=CHEAP).cost_nanos
    assert joined == split + price_usage("acme", "cheap", b, 0, at=AT, overrides=CHEAP).cost_nanos


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_tiered_model_prices_match_genai_prices(inp: int, out: int, cached: int) -> None:
    from genai_prices import Usage, calc_price

    cached = min(cached, inp)
    expected = calc_price(
        Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=cached),
        "gemini-1.5-flash",
        provider_id="google",
        genai_request_timestamp=AT,
    ).total_price
    assert price_usage("google", "gemini-1.5-flash", inp, out, cached, at=AT).cost_nanos == to_nanos(expected * 10**9)


rate = st.decimals(min_value=0, max_value=100, places=4, allow_nan=False, allow_infinity=False)


@given(inp=rate, out=rate, read=rate, write=rate, tokens=st.tuples(*(st.integers(0, 10**7) for _ in range(4))))
def test_priced_exactly_whether_rates_are_whole_nanos_or_not(
    inp: Decimal, out: Decimal, read: Decimal, write: Decimal, tokens: tuple[int, int, int, int]
) -> None:
    # Rates that are whole nanos per token take the integer path, the rest Decimal: both equal the exact sum
    # rounded half-even (and never a positive amount to zero).
    uncached, cached, written, output = tokens
    table = PriceTable((PriceOverride("acme", "any", Rates(inp, out, read, write)),))
    priced = price_usage("acme", "any", uncached + cached + written, output, cached, written, at=AT, overrides=table)
    per_mtok = Decimal(1000)  # nanos per token for $1 per million tokens
    exact = (uncached * inp + cached * read + written * write + output * out) * per_mtok
    assert priced.cost_nanos == to_nanos(exact)


def test_a_cost_beyond_int64_nanos_is_refused_with_a_typed_error() -> None:
    from spendstream.core.pricing import INT64_MAX, CostOverflowError

    with pytest.raises(CostOverflowError, match="exceeds the Int64"):
        price_usage("acme", "cheap", 10**16 * 1000, 0, at=AT, overrides=CHEAP)
    with pytest.raises(ValueError):  # callers that only know ValueError still refuse it
        price_usage("openai", "gpt-4o", 10**16, 0, at=AT)
    assert price_usage("acme", "cheap", 10**12, 0, at=AT, overrides=CHEAP).cost_nanos < INT64_MAX

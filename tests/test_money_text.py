"""Dollar amounts for people: never a small positive amount written as $0.00, whole cents as they are."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.money_text import usd_text
from spendstream.core.policy import parse_policy


def test_amounts_read_as_people_expect() -> None:
    cases = {
        0: "$0.00",
        1: "$0.000000001",
        750: "$0.00000075",
        2_000_000: "$0.002",
        1_689_300: "$0.001689",
        250_000_000: "$0.25",
        123_456_789: "$0.1235",
        1_234_567_891_234: "$1,234.57",
        -1_500_000_000: "-$1.50",
        6_400 * 10**9: "$6,400.00",
    }
    assert {nanos: usd_text(nanos) for nanos in cases} == cases


@given(st.integers(1, 10**9 - 1))
def test_an_amount_below_a_dollar_keeps_four_significant_digits_and_is_never_zero(nanos: int) -> None:
    text = usd_text(nanos)
    assert text.startswith("$") and text != "$0.00"
    written = Decimal(text[1:])
    exact = Decimal(nanos) / 10**9
    assert abs(written - exact) <= exact / 1000  # within the fourth significant digit


def test_the_policy_summary_shows_a_small_budget_and_a_quota_without_a_token_limit() -> None:
    policy = parse_policy(
        "name: p\ntimezone: UTC\nbudgets:\n  - {scope: 'team:ux', period: day, amount_usd: 0.002}\n"
        "quotas:\n  - {scope: 'user:*', requests_per_day: 50}\n"
    )
    summary = policy.summary()
    assert "team:ux" in summary and "$0.002" in summary, summary
    assert "quota user:*: 50 requests/day, no token limit" in summary, summary

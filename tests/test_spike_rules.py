"""Spike rules: daily factor with guards, hourly EWMA, and emergency stop of non-critical features only."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.events import Action
from spendstream.core.policy import SpikeRule, load_policy
from spendstream.processor.spike_rules import daily_spike, ewma_next, hourly_spike, spike_action

DEFAULT = load_policy(Path(__file__).resolve().parents[1] / "infra" / "policy" / "default.yaml")
DAILY = DEFAULT.spike_rules[0]
HOURLY = DEFAULT.spike_rules[1]
USD = 10**9


def test_daily_three_times_the_average_fires() -> None:
    history = [100 * USD] * 7
    assert daily_spike(300 * USD, history, DAILY) is None  # exactly 3x is not more than 3x
    verdict = daily_spike(300 * USD + 1, history, DAILY)
    assert verdict is not None and verdict.baseline_nanos == 100 * USD and verdict.rule == "daily_3x"
    assert "7-day average $100.00" in verdict.reason


def test_daily_guards() -> None:
    assert daily_spike(10_000 * USD, [1 * USD, 1 * USD], DAILY) is None  # two days of history are too few
    assert daily_spike(49 * USD, [1 * USD] * 7, DAILY) is None  # below the $50 minimum
    assert daily_spike(60 * USD, [0] * 3, DAILY) is not None  # quiet history, real money today


def test_daily_uses_only_the_window() -> None:
    history = [10_000 * USD] * 3 + [10 * USD] * 7
    assert daily_spike(100 * USD, history, DAILY) is not None


@given(
    today=st.integers(0, 10**15),
    history=st.lists(st.integers(0, 10**14), min_size=3, max_size=7),
    factor=st.decimals(min_value=Decimal("1.01"), max_value=Decimal(10), places=2),
)
def test_daily_matches_exact_rational_comparison(today: int, history: list[int], factor: Decimal) -> None:
    rule = SpikeRule(name="r", kind="daily", factor=factor)
    fired = daily_spike(today, history, rule) is not None
    assert fired == (Decimal(today) * len(history) > factor * sum(history))


@given(
    today=st.integers(0, 10**15),
    more=st.integers(0, 10**15),
    history=st.lists(st.integers(0, 10**14), min_size=7, max_size=7),
)
def test_daily_is_monotone_in_todays_spend(today: int, more: int, history: list[int]) -> None:
    if daily_spike(today, history, DAILY) is not None:
        assert daily_spike(today + more, history, DAILY) is not None


def test_ewma_seed_and_update_are_integers() -> None:
    assert ewma_next(None, 1234, Decimal("0.3")) == 1234
    assert ewma_next(1000, 2000, Decimal("0.3")) == 1300
    assert ewma_next(0, 5, Decimal("0.5")) == 2  # 2.5 rounds half-even


@given(
    prev=st.integers(0, 10**15),
    hour=st.integers(0, 10**15),
    alpha=st.decimals(min_value=Decimal("0.01"), max_value=1, places=2),
)
def test_ewma_stays_between_old_and_new(prev: int, hour: int, alpha: Decimal) -> None:
    value = ewma_next(prev, hour, alpha)
    assert isinstance(value, int) and min(prev, hour) <= value <= max(prev, hour)


def test_runaway_loop_caught_within_the_hour() -> None:
    ewma = None
    for _ in range(24):
        ewma = ewma_next(ewma, 5 * USD, HOURLY.alpha)  # a steady $5/hour
    minute_spend = 3 * USD  # a loop burning $3 per minute
    first = next(m for m in range(1, 61) if hourly_spike(m * minute_spend, ewma, 24, HOURLY) is not None)
    assert first <= 10


def test_hourly_guards() -> None:
    assert hourly_spike(1000 * USD, 1 * USD, 5, HOURLY) is None  # fewer than 6 hours of history
    assert hourly_spike(19 * USD, 1 * USD, 24, HOURLY) is None  # below the $20 minimum
    assert hourly_spike(1000 * USD, None, 24, HOURLY) is None
    assert hourly_spike(25 * USD + 1, 5 * USD, 24, HOURLY) is not None
    assert hourly_spike(25 * USD, 5 * USD, 24, HOURLY) is None


def test_emergency_stop_spares_critical_features() -> None:
    assert spike_action(DAILY, "feature:ai_lead_scorer", DEFAULT) is Action.shutoff
    assert spike_action(DAILY, "feature:ai_chatbot", DEFAULT) is Action.alert
    assert spike_action(HOURLY, "feature:ai_lead_scorer", DEFAULT) is Action.alert

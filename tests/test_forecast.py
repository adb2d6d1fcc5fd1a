"""Linear period-end projection, exhaustion instant, and the forecast alert."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.run_rate import exhaustion_instant
from spendstream.processor.forecast import forecast, project, should_alert_forecast

START = datetime(2025, 4, 1, tzinfo=UTC)
END = datetime(2025, 5, 1, tzinfo=UTC)  # 30 days
USD = 10**9


def test_linear_projection() -> None:
    assert project(3_000 * USD, START, END, START + timedelta(days=10)) == 9_000 * USD
    assert project(1 * USD, START, END, START + timedelta(hours=2)) is None  # too early to say
    assert project(1 * USD, START, END, START + timedelta(hours=2), min_elapsed=timedelta(hours=1)) == 360 * USD
    assert project(5 * USD, START, END, END + timedelta(days=3)) == 5 * USD  # after the period: what was spent


def exhaustion_at(spend: int, limit: int, start: datetime, now: datetime) -> datetime | None:
    """When the limit is reached at the average rate since ``start`` (what the forecast and the gauges use)."""
    return forecast(spend, limit, start, start + timedelta(days=10_000), now).exhausts_at


def test_exhaustion_day() -> None:
    # $8,000 budget, $4,000 after 10 days -> reached after 20 days
    assert exhaustion_at(4_000 * USD, 8_000 * USD, START, START + timedelta(days=10)) == START + timedelta(days=20)
    assert exhaustion_at(0, 8_000 * USD, START, START + timedelta(days=10)) is None
    now = START + timedelta(days=3)
    assert exhaustion_at(9_000 * USD, 8_000 * USD, START, now) == now


def test_exhaustion_at_a_trailing_run_rate_rounds_up_to_whole_seconds() -> None:
    now = START + timedelta(days=3)
    week = timedelta(days=7)
    # $70 in the last week against $100 left: 10 more days
    assert exhaustion_instant(900 * USD, 1_000 * USD, 70 * USD, week, now) == now + timedelta(days=10)
    assert exhaustion_instant(0, 1, 3, timedelta(seconds=1), now) == now + timedelta(seconds=1)  # 1/3 s -> 1 s
    assert exhaustion_instant(0, 1, 0, week, now) is None  # no spend in the span: never
    assert exhaustion_instant(0, 10**15, 1, week, now) is None  # beyond a century


def test_forecast_reports_exhaustion_inside_the_period() -> None:
    result = forecast(4_000 * USD, 8_000 * USD, START, END, START + timedelta(days=10))
    assert result.projected_nanos == 12_000 * USD and result.exhausts_in_period
    slow = forecast(1_000 * USD, 8_000 * USD, START, END, START + timedelta(days=10))
    assert slow.projected_nanos == 3_000 * USD and not slow.exhausts_in_period


def test_forecast_alert_comes_before_the_threshold_alert() -> None:
    now = START + timedelta(days=10)
    assert should_alert_forecast(3_000 * USD, 8_000 * USD, START, END, now)  # projects $9,000 at 37.5% spent
    assert not should_alert_forecast(2_000 * USD, 8_000 * USD, START, END, now)  # projects $6,000
    assert not should_alert_forecast(7_000 * USD, 8_000 * USD, START, END, now)  # the 80% alert already covers it
    assert not should_alert_forecast(3_000 * USD, 8_000 * USD, START, END, START + timedelta(hours=3))


@given(
    spend=st.integers(0, 10**15),
    elapsed=st.integers(86_400, 30 * 86_400),
)
def test_projection_never_below_spend_and_integer(spend: int, elapsed: int) -> None:
    projected = project(spend, START, END, START + timedelta(seconds=elapsed))
    assert isinstance(projected, int) and projected >= spend


@given(spend=st.integers(1, 10**15), limit=st.integers(1, 10**15), elapsed=st.integers(1, 30 * 86_400))
def test_exhaustion_consistent_with_rate(spend: int, limit: int, elapsed: int) -> None:
    now = START + timedelta(seconds=elapsed)
    at = exhaustion_at(spend, limit, START, now)
    if at is None:
        assert limit * elapsed > spend * 100 * 365 * 86_400  # only "never" when it is beyond a century
    elif spend < limit:
        assert at > now
        # at the average rate, spend at `at` reaches the limit (rounded up to whole microseconds)
        assert spend * (at - START).total_seconds() >= limit * elapsed * (1 - 1e-9)

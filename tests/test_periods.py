"""Budget periods: every registered period's windows, local-midnight boundaries, DST, rolling 24 h, and that a
new period is one class the policy and the processor both use."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, tzinfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.core.events import Action
from spendstream.core.periods import (
    PERIODS,
    CalendarPeriod,
    hour_bucket,
    monthly_equivalent,
    period_key,
    period_window,
    rolling_buckets,
    zone,
)
from spendstream.core.policy import PolicyError, parse_policy
from spendstream.processor.decision_publisher import evaluate_scope
from spendstream.processor.spend_accounting import WindowCalendar, window_key

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "America/Santiago", "Asia/Kolkata", "Australia/Lord_Howe"]
CALENDAR = ["day", "week", "month", "quarter"]
instants = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC))


@settings(max_examples=300)
@given(instant=instants, tz=st.sampled_from(ZONES), period=st.sampled_from(CALENDAR))
def test_instant_lies_in_its_window_and_windows_are_contiguous(instant: datetime, tz: str, period: str) -> None:
    start, end = period_window(period, instant, tz)
    assert start <= instant < end
    assert period_window(period, end, tz)[0] == end  # the next window starts where this one ends
    assert period_window(period, start - timedelta(microseconds=1), tz)[1] == start
    assert period_window(period, end - timedelta(microseconds=1), tz) == (start, end)
    assert period_key(period, start, tz) == period_key(period, instant, tz) != period_key(period, end, tz)


@settings(max_examples=300)
@given(instant=instants, tz=st.sampled_from(ZONES), period=st.sampled_from(CALENDAR))
def test_boundaries_are_local_midnights(instant: datetime, tz: str, period: str) -> None:
    start, _ = period_window(period, instant, tz)
    local = start.astimezone(zone(tz))
    before = (start - timedelta(microseconds=1)).astimezone(zone(tz))
    assert before.date() < local.date()  # the first instant of a new local date
    # local time is midnight, unless the zone skipped midnight that day (then the day starts at the jump)
    assert local.time() == datetime.min.time() or local.utcoffset() != before.utcoffset()
    if period == "week":
        assert local.weekday() == 0
    if period in ("month", "quarter"):
        assert local.day == 1
    if period == "quarter":
        assert local.month in (1, 4, 7, 10)


def test_dst_days_are_23_and_25_hours() -> None:
    spring = period_window("day", datetime(2025, 3, 30, 12, tzinfo=UTC), "Europe/Berlin")
    autumn = period_window("day", datetime(2025, 10, 26, 12, tzinfo=UTC), "Europe/Berlin")
    assert spring[1] - spring[0] == timedelta(hours=23)
    assert autumn[1] - autumn[0] == timedelta(hours=25)
    assert spring[0] == datetime(2025, 3, 29, 23, tzinfo=UTC)


def test_day_starting_at_a_dst_jump_over_midnight() -> None:
    # Santiago skipped 2024-09-08 00:00 (-04) -> 01:00 (-03): the day starts at 04:00 UTC.
    start, end = period_window("day", datetime(2024, 9, 8, 12, tzinfo=UTC), "America/Santiago")
    assert (start, end) == (datetime(2024, 9, 8, 4, tzinfo=UTC), datetime(2024, 9, 9, 3, tzinfo=UTC))


def test_iso_week_crosses_year_boundary() -> None:
    start, end = period_window("week", datetime(2025, 1, 1, 12, tzinfo=UTC), "UTC")
    assert (start, end) == (datetime(2024, 12, 30, tzinfo=UTC), datetime(2025, 1, 6, tzinfo=UTC))
    assert period_key("week", datetime(2025, 1, 1, tzinfo=UTC), "UTC") == "2025-W01"


def test_quarter_and_month_keys_use_local_date() -> None:
    late = datetime(2025, 12, 31, 23, 30, tzinfo=UTC)  # already 2026 in Tokyo
    assert period_key("quarter", late, "Asia/Tokyo") == "2026-Q1"
    assert period_key("month", late, "UTC") == "2025-12"
    assert period_window("quarter", late, "Asia/Tokyo") == (
        datetime(2025, 12, 31, 15, tzinfo=UTC),
        datetime(2026, 3, 31, 15, tzinfo=UTC),
    )


@given(instant=instants)
def test_rolling_window_is_25_hourly_buckets_ending_with_the_current_hour(instant: datetime) -> None:
    start, end = period_window("rolling_24h", instant, "Europe/Berlin")
    buckets = rolling_buckets(instant)
    assert (
        len(buckets) == 25 and buckets[0] == start and buckets[-1] == hour_bucket(instant) == end - timedelta(hours=1)
    )
    assert start <= instant < end
    # any 24 hours up to now are inside it (with 24 buckets, spend 23 h 01 min ago had left it at the hour)
    assert timedelta(hours=24) <= instant - start < timedelta(hours=25)


def test_naive_instant_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        period_window("day", datetime(2025, 1, 1), "UTC")


@settings(max_examples=200, deadline=None)
@given(
    instant=instants,
    later=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=400)),
    tz=st.sampled_from(ZONES),
)
@pytest.mark.parametrize("name", sorted(PERIODS))
def test_every_registered_period_holds_its_instant_and_orders_its_keys(
    name: str, instant: datetime, later: timedelta, tz: str
) -> None:
    """For every period, in zones with DST changes (and one that moves by 30 minutes): the window around an
    instant holds it, ends at the next boundary, is the same from any instant inside it, and keys never go back."""
    period = PERIODS[name]
    start, end = period.window(instant, tz)
    assert start <= instant < end == period.next_boundary(instant, tz)
    assert period.window(end - timedelta(microseconds=1), tz) == (start, end)
    assert period.key(instant, tz) == period.key(start, tz) <= period.key(instant + later, tz)
    if period.series == name:  # a period that tiles time: the next window starts where this one ends
        assert period.window(end, tz)[0] == end
        assert period.key(end, tz) != period.key(instant, tz)
    series = PERIODS[period.series]
    starts, budget_start, budget_end = period.budget_starts(series.start_s(instant, tz), tz)
    assert (budget_start, budget_end) == (start, end)  # what the processor sums is the period's own window
    assert all(start.timestamp() <= s < end.timestamp() for s in starts)


@pytest.fixture
def year_period() -> Iterator[str]:
    """A period a test adds the way a contributor would: one class."""

    class Year(CalendarPeriod):
        name = "year"
        ledger_bucket = "toDateTime(toStartOfYear(occurred_at, '{tz}'), '{tz}')"

        def first_day(self, local: date) -> date:
            return date(local.year, 1, 1)

        def next_first_day(self, first: date) -> date:
            return date(first.year + 1, 1, 1)

        def key(self, instant: datetime, tz: tzinfo | str) -> str:
            return str(self.local_day(instant, tz).year)

        def monthly_equivalent(self, limit_nanos: int, month: date) -> int:
            return limit_nanos // 12

    try:
        yield Year.name
    finally:
        del PERIODS[Year.name]


def test_a_new_period_class_is_accepted_by_the_policy_and_used_by_the_processor(year_period: str) -> None:
    usd = 10**9
    policy = parse_policy(
        f'timezone: Europe/Berlin\nbudgets:\n  - {{scope: "team:a", period: {year_period}, amount_usd: 1200}}\n'
    )
    assert policy.budgets[0].period == year_period
    # stage 1 keeps a window of the new period for every event
    instant = datetime(2025, 6, 1, 12, tzinfo=UTC)
    starts = dict(WindowCalendar(policy.tz).starts(int(instant.timestamp())))
    new_year = datetime(2024, 12, 31, 23, tzinfo=UTC)  # 2025-01-01 00:00 in Berlin
    assert starts[year_period] == int(new_year.timestamp())
    # stage 2 evaluates the budget against that window, and the decision ends with the local year
    key = window_key("team:a", year_period, starts[year_period])
    verdict = evaluate_scope(
        "team:a", starts, lambda k: (1_300 * usd, 1, 1) if k == key else (0, 0, 0), policy, instant
    )
    assert (verdict.action, verdict.period, verdict.limit_nanos) == (Action.shutoff, year_period, 1_200 * usd)
    assert verdict.expires_at == datetime(2025, 12, 31, 23, tzinfo=UTC)
    # the ledger's budgets table converts it to a month
    assert monthly_equivalent(year_period, 1_200 * usd, date(2025, 6, 1)) == 100 * usd


def test_a_period_name_nobody_registered_is_refused_by_the_policy() -> None:
    with pytest.raises(PolicyError, match=r"budgets\.0\.period: Input should be 'day', 'week', 'month', 'quarter' or"):
        parse_policy('budgets:\n  - {scope: "team:a", period: year, amount_usd: 1}\n')
    with pytest.raises(PolicyError, match=r"budgets\.0\.period"):
        parse_policy('budgets:\n  - {scope: "team:a", period: hour, amount_usd: 1}\n')  # a series, not a budget

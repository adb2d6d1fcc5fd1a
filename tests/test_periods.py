"""Period windows: local-midnight boundaries, DST, contiguity, rolling 24 h."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.core.policy import Period
from spendstream.processor.periods import hour_bucket, period_key, period_window, rolling_buckets, zone

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "America/Santiago", "Asia/Kolkata", "Australia/Lord_Howe"]
CALENDAR = [Period.day, Period.week, Period.month, Period.quarter]
instants = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC))


@settings(max_examples=300)
@given(instant=instants, tz=st.sampled_from(ZONES), period=st.sampled_from(CALENDAR))
def test_instant_lies_in_its_window_and_windows_are_contiguous(instant: datetime, tz: str, period: Period) -> None:
    start, end = period_window(period, instant, tz)
    assert start <= instant < end
    assert period_window(period, end, tz)[0] == end  # the next window starts where this one ends
    assert period_window(period, start - timedelta(microseconds=1), tz)[1] == start
    assert period_window(period, end - timedelta(microseconds=1), tz) == (start, end)
    assert period_key(period, start, tz) == period_key(period, instant, tz) != period_key(period, end, tz)


@settings(max_examples=300)
@given(instant=instants, tz=st.sampled_from(ZONES), period=st.sampled_from(CALENDAR))
def test_boundaries_are_local_midnights(instant: datetime, tz: str, period: Period) -> None:
    start, _ = period_window(period, instant, tz)
    local = start.astimezone(zone(tz))
    before = (start - timedelta(microseconds=1)).astimezone(zone(tz))
    assert before.date() < local.date()  # the first instant of a new local date
    # local time is midnight, unless the zone skipped midnight that day (then the day starts at the jump)
    assert local.time() == datetime.min.time() or local.utcoffset() != before.utcoffset()
    if period is Period.week:
        assert local.weekday() == 0
    if period in (Period.month, Period.quarter):
        assert local.day == 1
    if period is Period.quarter:
        assert local.month in (1, 4, 7, 10)


def test_dst_days_are_23_and_25_hours() -> None:
    spring = period_window(Period.day, datetime(2025, 3, 30, 12, tzinfo=UTC), "Europe/Berlin")
    autumn = period_window(Period.day, datetime(2025, 10, 26, 12, tzinfo=UTC), "Europe/Berlin")
    assert spring[1] - spring[0] == timedelta(hours=23)
    assert autumn[1] - autumn[0] == timedelta(hours=25)
    assert spring[0] == datetime(2025, 3, 29, 23, tzinfo=UTC)


def test_day_starting_at_a_dst_jump_over_midnight() -> None:
    # Santiago skipped 2024-09-08 00:00 (-04) -> 01:00 (-03): the day starts at 04:00 UTC.
    start, end = period_window(Period.day, datetime(2024, 9, 8, 12, tzinfo=UTC), "America/Santiago")
    assert (start, end) == (datetime(2024, 9, 8, 4, tzinfo=UTC), datetime(2024, 9, 9, 3, tzinfo=UTC))


def test_iso_week_crosses_year_boundary() -> None:
    start, end = period_window(Period.week, datetime(2025, 1, 1, 12, tzinfo=UTC), "UTC")
    assert (start, end) == (datetime(2024, 12, 30, tzinfo=UTC), datetime(2025, 1, 6, tzinfo=UTC))
    assert period_key(Period.week, datetime(2025, 1, 1, tzinfo=UTC), "UTC") == "2025-W01"


def test_quarter_and_month_keys_use_local_date() -> None:
    late = datetime(2025, 12, 31, 23, 30, tzinfo=UTC)  # already 2026 in Tokyo
    assert period_key(Period.quarter, late, "Asia/Tokyo") == "2026-Q1"
    assert period_key(Period.month, late, "UTC") == "2025-12"
    assert period_window(Period.quarter, late, "Asia/Tokyo") == (
        datetime(2025, 12, 31, 15, tzinfo=UTC),
        datetime(2026, 3, 31, 15, tzinfo=UTC),
    )


@given(instant=instants)
def test_rolling_window_is_24_hourly_buckets_ending_with_the_current_hour(instant: datetime) -> None:
    start, end = period_window(Period.rolling_24h, instant, "Europe/Berlin")
    buckets = rolling_buckets(instant)
    assert (
        len(buckets) == 24 and buckets[0] == start and buckets[-1] == hour_bucket(instant) == end - timedelta(hours=1)
    )
    assert start <= instant < end
    assert timedelta(hours=23) <= instant - start < timedelta(hours=24)


def test_naive_instant_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        period_window(Period.day, datetime(2025, 1, 1), "UTC")

"""Budget period windows in the policy timezone.

- ``period_window(period, instant, tz) -> (start, end)``: the half-open window ``[start, end)`` (UTC-aware
  datetimes) that contains ``instant``. Calendar periods start at LOCAL midnight: ``day``; ``week`` = ISO week
  (Monday); ``month``; ``quarter`` (Jan/Apr/Jul/Oct). zoneinfo makes them DST-correct: a local day lasts 23 or
  25 hours across a change, and where midnight does not exist (clocks jump 00:00 -> 01:00) the day starts at the
  jump, which is the first instant of that local date.
- ``rolling_24h`` is not a calendar window: spend is kept in UTC hourly buckets (``hour_bucket``), and the rolling
  total at ``instant`` is the sum of the current (partial) hour and the 23 hours before it, i.e. the window
  ``[hour_bucket(instant) - 23h, hour_bucket(instant) + 1h)``: it looks back between 23 and 24 hours from
  ``instant`` and slides on the hour, when the oldest bucket drops out. Hourly granularity keeps the state at 24
  integers per scope and makes the total exact and replayable.
- ``period_key(period, instant, tz)`` names a window (``2025-03``, ``2025-W09``, ``2025-Q1``, ``2025-03-01``,
  ``rolling_24h``), for table keys and reports.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo

from spendstream.core.policy import Period

HOUR = timedelta(hours=1)
ROLLING_HOURS = 24


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _tz(tz: tzinfo | str) -> tzinfo:
    return zone(tz) if isinstance(tz, str) else tz


def local_midnight(day: date, tz: tzinfo | str) -> datetime:
    """The first instant (UTC) of a local date; fold=0 puts a non-existent midnight at the DST jump itself."""
    return datetime(day.year, day.month, day.day, tzinfo=_tz(tz)).astimezone(UTC)


def hour_bucket(instant: datetime) -> datetime:
    """Start of the UTC hour containing ``instant`` (the rolling_24h bucket)."""
    return instant.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _first_day(period: Period, local: date) -> date:
    if period is Period.day:
        return local
    if period is Period.week:
        return local - timedelta(days=local.weekday())
    if period is Period.month:
        return local.replace(day=1)
    if period is Period.quarter:
        return date(local.year, 3 * ((local.month - 1) // 3) + 1, 1)
    raise ValueError(f"{period} is not a calendar period")


def _next_first_day(period: Period, first: date) -> date:
    if period is Period.day:
        return first + timedelta(days=1)
    if period is Period.week:
        return first + timedelta(days=7)
    months = 1 if period is Period.month else 3
    month0 = first.month - 1 + months
    return date(first.year + month0 // 12, month0 % 12 + 1, 1)


def period_window(period: Period | str, instant: datetime, tz: tzinfo | str) -> tuple[datetime, datetime]:
    """``[start, end)`` in UTC of the period containing ``instant`` (timezone-aware)."""
    if instant.tzinfo is None:
        raise ValueError("instant must be timezone-aware")
    period = Period(period)
    if period is Period.rolling_24h:
        end = hour_bucket(instant) + HOUR
        return end - ROLLING_HOURS * HOUR, end
    zone_ = _tz(tz)
    first = _first_day(period, instant.astimezone(zone_).date())
    return local_midnight(first, zone_), local_midnight(_next_first_day(period, first), zone_)


def period_key(period: Period | str, instant: datetime, tz: tzinfo | str) -> str:
    period = Period(period)
    if period is Period.rolling_24h:
        return "rolling_24h"
    local = instant.astimezone(_tz(tz)).date()
    if period is Period.day:
        return local.isoformat()
    if period is Period.week:
        year, week, _ = local.isocalendar()
        return f"{year}-W{week:02d}"
    if period is Period.month:
        return f"{local.year}-{local.month:02d}"
    return f"{local.year}-Q{(local.month - 1) // 3 + 1}"


def rolling_buckets(instant: datetime) -> list[datetime]:
    """The 24 hourly bucket starts whose sum is the rolling_24h spend at ``instant``, oldest first."""
    current = hour_bucket(instant)
    return [current - i * HOUR for i in range(ROLLING_HOURS - 1, -1, -1)]

"""What a budget period is: its window around an instant, its next boundary, its key, its monthly equivalent and
how long the processor keeps its windows. One class per period; a subclass registers itself by ``name``.

- Calendar periods start at LOCAL midnight of the policy timezone: ``day``; ``week`` = ISO week (Monday);
  ``month``; ``quarter`` (Jan/Apr/Jul/Oct). zoneinfo makes them DST-correct: a local day lasts 23 or 25 hours
  across a change, and where midnight does not exist (clocks jump 00:00 -> 01:00) the day starts at the jump,
  which is the first instant of that local date.
- ``hour`` is the UTC hour bucket the processor keeps for every scope (the rolling budget and the hourly spike
  baseline read it); it is a window series, not a budget period a policy may name.
- ``rolling_24h`` is not a calendar window: its spend is the sum of the current (partial) UTC hour and the 24
  hours before it, i.e. ``[hour_bucket(instant) - 24h, hour_bucket(instant) + 1h)``: it looks back between 24
  and 25 hours and slides on the hour, so any 24 hours up to now are inside it. (With 23 hours before the current
  one, spend from 23 h 01 min ago had left the window at the turn of the hour, and a cap could be spent twice within
  24 hours: an attacker session.) Hourly granularity keeps the state at 25 integers per scope and makes the total
  exact and replayable.

The processor keeps, per scope, the windows of every period's ``series`` (``tracked_series()``), and a budget's
spend is the sum of the ``series`` windows that ``Period.budget_starts`` names. Adding a period is one subclass:
the policy accepts its name (``budget_period_names()``), the processor keeps and evaluates its windows, the
ledger's budgets table converts it with ``monthly_equivalent``.
"""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

HOUR = "hour"  # the name of the UTC hour bucket series
_ONE_HOUR = timedelta(hours=1)
ROLLING_HOURS = 25  # hour buckets summed by rolling_24h: the current one and the 24 before it
HOURLY_HISTORY = 48  # completed hours before the current one that the hourly spike baseline (EWMA) reads


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def known_timezone(name: str) -> str:
    """``name`` if it is an IANA time zone; else a ValueError saying what is expected (settings and policies)."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r}: expected an IANA name such as Europe/Paris") from None
    return name


def as_tz(tz: tzinfo | str) -> tzinfo:
    return zone(tz) if isinstance(tz, str) else tz


def local_midnight(day: date, tz: tzinfo | str) -> datetime:
    """The first instant (UTC) of a local date; fold=0 puts a non-existent midnight at the DST jump itself."""
    return datetime(day.year, day.month, day.day, tzinfo=as_tz(tz)).astimezone(UTC)


def hour_bucket(instant: datetime) -> datetime:
    """Start of the UTC hour containing ``instant``."""
    return instant.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def days_in_month(month: date) -> int:
    return calendar.monthrange(month.year, month.month)[1]


def utc_at(epoch_s: int) -> datetime:
    """The UTC instant of epoch seconds (window starts are kept as epoch seconds)."""
    return datetime.fromtimestamp(epoch_s, UTC)


PERIODS: dict[str, Period] = {}


class Period:
    """A budget period. Subclasses set ``name`` and register themselves; instances are stateless singletons."""

    name: ClassVar[str]
    # The windows the processor keeps for this period (its own name, or another period's, e.g. hours).
    series: ClassVar[str]
    budget: ClassVar[bool] = True  # may a policy's budget name it
    forecast: ClassVar[bool] = True  # does a period-end projection mean anything for it
    rolling: ClassVar[bool] = False  # its window moves with the clock (hour by hour) instead of ending
    # A period that is its own series: the ClickHouse expression of its window start for ``occurred_at`` (``{tz}``
    # the policy timezone), with which a processor rebuilds its windows from the ledger (``core.ledger_spend``).
    ledger_bucket: ClassVar[str]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.series = cls.__dict__.get("series", cls.name)
            PERIODS[cls.name] = cls()

    def __str__(self) -> str:
        return self.name

    def window(self, instant: datetime, tz: tzinfo | str) -> tuple[datetime, datetime]:
        """``[start, end)`` in UTC of the period containing ``instant`` (timezone-aware)."""
        raise NotImplementedError

    def key(self, instant: datetime, tz: tzinfo | str) -> str:
        """The name of the window containing ``instant`` (``2025-03``, ``2025-W09``), for table keys and reports."""
        raise NotImplementedError

    def monthly_equivalent(self, limit_nanos: int, month: date) -> int:
        """A budget of this period expressed for the calendar ``month`` (floor to the nano-dollar)."""
        raise NotImplementedError

    def next_boundary(self, instant: datetime, tz: tzinfo | str) -> datetime:
        """Where the window containing ``instant`` ends (the next one starts)."""
        return self.window(instant, tz)[1]

    def start_s(self, instant: datetime, tz: tzinfo | str) -> int:
        """The window start (epoch seconds) of ``instant``."""
        return int(self.window(instant, tz)[0].timestamp())

    def retained_windows(self, history_days: int) -> int:
        """How many windows after its own a window is still read (and so kept): the current one only."""
        return 1

    def retained_until_s(self, start_s: int, tz: tzinfo | str, history_days: int) -> int:
        """Where (epoch s) the window starting at ``start_s`` and the ``retained_windows`` after it have ended."""
        end = self.next_boundary(utc_at(start_s), tz)
        for _ in range(self.retained_windows(history_days)):
            end = self.next_boundary(end, tz)
        return int(end.timestamp())

    def budget_starts(self, latest_s: int, tz: tzinfo | str) -> tuple[tuple[int, ...], datetime, datetime]:
        """The starts of the ``series`` windows whose totals are the spend of the budget window at the newest
        ``series`` window ``latest_s``, and that budget window's ``[start, end)``."""
        start, end = self.window(utc_at(latest_s), tz)
        return (latest_s,), start, end


class CalendarPeriod(Period):
    """A period of whole local days: subclasses give its first day and the first day of the next one."""

    def first_day(self, local: date) -> date:
        raise NotImplementedError

    def next_first_day(self, first: date) -> date:
        raise NotImplementedError

    def window(self, instant: datetime, tz: tzinfo | str) -> tuple[datetime, datetime]:
        if instant.tzinfo is None:
            raise ValueError("instant must be timezone-aware")
        zone_ = as_tz(tz)
        first = self.first_day(instant.astimezone(zone_).date())
        return local_midnight(first, zone_), local_midnight(self.next_first_day(first), zone_)

    def start_s(self, instant: datetime, tz: tzinfo | str) -> int:
        zone_ = as_tz(tz)  # only the start: one local midnight, not the two of ``window``
        return int(local_midnight(self.first_day(instant.astimezone(zone_).date()), zone_).timestamp())

    def local_day(self, instant: datetime, tz: tzinfo | str) -> date:
        return instant.astimezone(as_tz(tz)).date()


class Day(CalendarPeriod):
    name = "day"
    ledger_bucket = "toStartOfDay(occurred_at, '{tz}')"

    def first_day(self, local: date) -> date:
        return local

    def next_first_day(self, first: date) -> date:
        return first + timedelta(days=1)

    def key(self, instant: datetime, tz: tzinfo | str) -> str:
        return self.local_day(instant, tz).isoformat()

    def monthly_equivalent(self, limit_nanos: int, month: date) -> int:
        return limit_nanos * days_in_month(month)

    def retained_windows(self, history_days: int) -> int:
        """The daily spike rule reads the trailing ``history_days`` local days (local days, not 24-hour steps, so
        a 23- or 25-hour DST day counts as one day)."""
        return max(history_days, 1)


class Week(CalendarPeriod):
    name = "week"  # ISO week, Monday 00:00 local
    ledger_bucket = "toDateTime(toMonday(occurred_at, '{tz}'), '{tz}')"

    def first_day(self, local: date) -> date:
        return local - timedelta(days=local.weekday())

    def next_first_day(self, first: date) -> date:
        return first + timedelta(days=7)

    def key(self, instant: datetime, tz: tzinfo | str) -> str:
        year, week, _ = self.local_day(instant, tz).isocalendar()
        return f"{year}-W{week:02d}"

    def monthly_equivalent(self, limit_nanos: int, month: date) -> int:
        return limit_nanos * days_in_month(month) // 7


def _months_later(first: date, months: int) -> date:
    month0 = first.month - 1 + months
    return date(first.year + month0 // 12, month0 % 12 + 1, 1)


class Month(CalendarPeriod):
    name = "month"
    ledger_bucket = "toDateTime(toStartOfMonth(occurred_at, '{tz}'), '{tz}')"

    def first_day(self, local: date) -> date:
        return local.replace(day=1)

    def next_first_day(self, first: date) -> date:
        return _months_later(first, 1)

    def key(self, instant: datetime, tz: tzinfo | str) -> str:
        local = self.local_day(instant, tz)
        return f"{local.year}-{local.month:02d}"

    def monthly_equivalent(self, limit_nanos: int, month: date) -> int:
        return limit_nanos


class Quarter(CalendarPeriod):
    name = "quarter"  # starts in January, April, July, October
    ledger_bucket = "toDateTime(toStartOfQuarter(occurred_at, '{tz}'), '{tz}')"

    def first_day(self, local: date) -> date:
        return date(local.year, 3 * ((local.month - 1) // 3) + 1, 1)

    def next_first_day(self, first: date) -> date:
        return _months_later(first, 3)

    def key(self, instant: datetime, tz: tzinfo | str) -> str:
        local = self.local_day(instant, tz)
        return f"{local.year}-Q{(local.month - 1) // 3 + 1}"

    def monthly_equivalent(self, limit_nanos: int, month: date) -> int:
        return limit_nanos // 3


class Rolling24h(Period):
    name = "rolling_24h"
    series = HOUR
    forecast = False  # it never ends, so there is no period end to project to
    rolling = True

    def window(self, instant: datetime, tz: tzinfo | str) -> tuple[datetime, datetime]:
        if instant.tzinfo is None:
            raise ValueError("instant must be timezone-aware")
        end = hour_bucket(instant) + _ONE_HOUR
        return end - ROLLING_HOURS * _ONE_HOUR, end

    def key(self, instant: datetime, tz: tzinfo | str) -> str:
        return self.name

    def monthly_equivalent(self, limit_nanos: int, month: date) -> int:
        return limit_nanos * days_in_month(month)

    def budget_starts(self, latest_s: int, tz: tzinfo | str) -> tuple[tuple[int, ...], datetime, datetime]:
        starts = tuple(latest_s - 3600 * i for i in range(ROLLING_HOURS))
        return starts, utc_at(starts[-1]), utc_at(latest_s + 3600)


class Hour(Period):
    """The UTC hour bucket: a window series the processor keeps per scope, not a budget period of a policy."""

    name = HOUR
    budget = False
    ledger_bucket = "toStartOfHour(occurred_at)"  # UTC

    def window(self, instant: datetime, tz: tzinfo | str) -> tuple[datetime, datetime]:
        if instant.tzinfo is None:
            raise ValueError("instant must be timezone-aware")
        start = hour_bucket(instant)
        return start, start + _ONE_HOUR

    def start_s(self, instant: datetime, tz: tzinfo | str) -> int:
        epoch_s = int(instant.timestamp())
        return epoch_s - epoch_s % 3600

    def key(self, instant: datetime, tz: tzinfo | str) -> str:
        return hour_bucket(instant).strftime("%Y-%m-%dT%H")

    def monthly_equivalent(self, limit_nanos: int, month: date) -> int:
        return limit_nanos * 24 * days_in_month(month)

    def retained_windows(self, history_days: int) -> int:
        """The rolling 24 h budget reads 24 hours back, the hourly spike baseline ``HOURLY_HISTORY``."""
        return max(HOURLY_HISTORY, ROLLING_HOURS - 1)

    def retained_until_s(self, start_s: int, tz: tzinfo | str, history_days: int) -> int:
        return start_s + 3600 * (1 + self.retained_windows(history_days))


def period(name: str | Period) -> Period:
    """The registered period (or window series) called ``name``; ``ValueError`` naming the known ones otherwise."""
    if isinstance(name, Period):
        return name
    found = PERIODS.get(name)
    if found is None:
        raise ValueError(f"unknown period {name!r} (expected {', '.join(PERIODS)})")
    return found


def budget_period(name: str) -> Period:
    """The registered period a budget may name; ``ValueError`` naming those otherwise."""
    found = PERIODS.get(name)
    if found is None or not found.budget:
        raise ValueError(f"unknown budget period {name!r} (expected {', '.join(budget_period_names())})")
    return found


def budget_period_names() -> tuple[str, ...]:
    """The periods a policy's budget may name, in registration order."""
    return tuple(name for name, found in PERIODS.items() if found.budget)


def tracked_series() -> tuple[str, ...]:
    """The window series the processor keeps per scope: every registered period's ``series``, each once."""
    return tuple(dict.fromkeys(found.series for found in PERIODS.values()))


def period_window(name: str | Period, instant: datetime, tz: tzinfo | str) -> tuple[datetime, datetime]:
    """``[start, end)`` in UTC of the period containing ``instant`` (timezone-aware)."""
    return period(name).window(instant, tz)


def period_key(name: str | Period, instant: datetime, tz: tzinfo | str) -> str:
    return period(name).key(instant, tz)


def monthly_equivalent(name: str, limit_nanos: int, month: date) -> int:
    """A budget of period ``name`` expressed for one calendar month (floor to the nano-dollar)."""
    return budget_period(name).monthly_equivalent(limit_nanos, month)


def window_expiry(name: str, start_s: int, allowed_lateness_s: int, tz: tzinfo | str, history_days: int) -> int:
    """The watermark (epoch s) from which the window ``name``/``start_s`` is never read or written again.

    Who reads a window after it ends: the processor evaluates a scope at its NEWEST window per period, and an
    event still counts up to ``allowed_lateness_s`` after it occurred, so a scope may be evaluated at a window
    that ended up to the lateness ago. From that window it reads back ``retained_windows`` windows (hours: the
    rolling budget and the hourly EWMA; days: the daily spike history); weeks, months and quarters keep one
    window more than their end, a margin for events whose Kafka timestamps arrive out of order (edges with
    skewed clocks, a previous period sent late). So a window is kept until the end of the window
    ``retained_windows`` after it, + the lateness.
    """
    return period(name).retained_until_s(start_s, tz, history_days) + allowed_lateness_s


def rolling_buckets(instant: datetime) -> list[datetime]:
    """The ``ROLLING_HOURS`` hourly bucket starts whose sum is the rolling_24h spend at ``instant``, oldest first."""
    current = hour_bucket(instant)
    return [current - i * _ONE_HOUR for i in range(ROLLING_HOURS - 1, -1, -1)]

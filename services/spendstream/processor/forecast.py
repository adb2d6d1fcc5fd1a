"""Period-end spend projection per budget (pure, integer nano-USD).

Model: linear in elapsed time of the period. The average spend rate so far, ``spend / (now - start)``, is assumed
to continue until ``end``: ``projected = spend x (end - start) / (now - start)``, computed on whole microseconds
with integer arithmetic (rounded down). Simple and explainable to finance; it lags a sudden rate change, which is
what the spike rules are for. Early in a period the rate is noise, so nothing is projected before ``min_elapsed``
(default one day).

- ``project(spend_nanos, start, end, now, min_elapsed) -> int | None``: projected spend at ``end``.
- ``exhaustion_at(spend_nanos, limit_nanos, start, now) -> datetime | None``: when the limit is reached at the
  current average rate (``now`` if already reached; ``None`` with no spend yet or more than a century away); it
  may lie beyond the period.
- ``forecast(...) -> Forecast`` with both, and ``should_alert_forecast(...)``: alert when the projection reaches the
  limit while actual spend has not reached ``alert_fraction`` of it yet (the threshold alert would come later).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from spendstream.processor.budget_rules import reached

DEFAULT_MIN_ELAPSED = timedelta(days=1)
_FOREVER_MICROS = 100 * 366 * 86_400 * 1_000_000  # beyond a century "never" is the honest answer


def _micros(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def project(
    spend_nanos: int, start: datetime, end: datetime, now: datetime, min_elapsed: timedelta = DEFAULT_MIN_ELAPSED
) -> int | None:
    elapsed = _micros(min(now, end) - start)
    if elapsed <= 0 or elapsed < _micros(min(min_elapsed, end - start)):
        return None
    return spend_nanos * _micros(end - start) // elapsed


def exhaustion_at(spend_nanos: int, limit_nanos: int, start: datetime, now: datetime) -> datetime | None:
    if spend_nanos >= limit_nanos:
        return now
    if spend_nanos <= 0 or now <= start:
        return None
    micros = -(-_micros(now - start) * limit_nanos // spend_nanos)  # rounded up: not reached before this
    if micros > _FOREVER_MICROS:
        return None
    return start + timedelta(microseconds=micros)


@dataclass(frozen=True, slots=True)
class Forecast:
    projected_nanos: int | None
    exhausts_at: datetime | None  # None: no spend yet, or not within a century
    exhausts_in_period: bool


def forecast(
    spend_nanos: int,
    limit_nanos: int,
    start: datetime,
    end: datetime,
    now: datetime,
    min_elapsed: timedelta = DEFAULT_MIN_ELAPSED,
) -> Forecast:
    projected = project(spend_nanos, start, end, now, min_elapsed)
    exhausts = exhaustion_at(spend_nanos, limit_nanos, start, now)
    return Forecast(projected, exhausts, exhausts is not None and exhausts < end)


def should_alert_forecast(
    spend_nanos: int,
    limit_nanos: int,
    start: datetime,
    end: datetime,
    now: datetime,
    alert_fraction: Decimal = Decimal("0.80"),
    min_elapsed: timedelta = DEFAULT_MIN_ELAPSED,
) -> bool:
    """True when the projection crosses the limit before actual spend reaches the alert threshold."""
    projected = project(spend_nanos, start, end, now, min_elapsed)
    if projected is None or projected < limit_nanos:
        return False
    return not reached(spend_nanos, limit_nanos, alert_fraction)

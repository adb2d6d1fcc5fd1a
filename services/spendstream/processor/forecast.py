"""Period-end spend projection per budget (pure, integer nano-USD).

Model: linear in elapsed time of the period. The average spend rate so far, ``spend / (now - start)``, is assumed
to continue until ``end``: ``projected = spend x (end - start) / (now - start)``, computed on whole microseconds
with integer arithmetic (rounded down). Simple and explainable to finance; it lags a sudden rate change, which is
what the spike rules are for. Early in a period the rate is noise, so nothing is projected before ``min_elapsed``
(default one day).

- ``project(spend_nanos, start, end, now, min_elapsed) -> int | None``: projected spend at ``end``.
- ``forecast(...) -> Forecast`` with it and when the limit is reached at the current average rate
  (``core.run_rate.exhaustion_instant``: ``now`` if already reached; ``None`` with no spend yet or more than a
  century away; it may lie beyond the period).
- ``should_alert_forecast(...)``: alert when the projection reaches the limit while actual spend has not reached
  ``alert_fraction`` of it yet (the threshold alert would come later).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from spendstream.core.run_rate import duration_micros, exhaustion_instant
from spendstream.processor.budget_rules import reached

DEFAULT_MIN_ELAPSED = timedelta(days=1)
MICROSECOND = timedelta(microseconds=1)


def project(
    spend_nanos: int, start: datetime, end: datetime, now: datetime, min_elapsed: timedelta = DEFAULT_MIN_ELAPSED
) -> int | None:
    elapsed = duration_micros(min(now, end) - start)
    if elapsed <= 0 or elapsed < duration_micros(min(min_elapsed, end - start)):
        return None
    return spend_nanos * duration_micros(end - start) // elapsed


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
    exhausts = exhaustion_instant(spend_nanos, limit_nanos, spend_nanos, now - start, now, MICROSECOND)
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

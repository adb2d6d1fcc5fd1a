"""When a budget runs out at a spend rate (pure, integer nano-USD): one answer for the reports and the gauges.

The reports project a team's trailing run rate; the processor's budget gauges the window's average rate since it
started. Both ask the same question of a rate given as ``rate_nanos`` spent over ``rate_span``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

HORIZON = timedelta(days=100 * 366)  # beyond a century "never" is the honest answer (and stays a valid datetime)


def exhaustion_instant(
    spent_nanos: int,
    limit_nanos: int,
    rate_nanos: int,
    rate_span: timedelta,
    now: datetime,
    resolution: timedelta = timedelta(seconds=1),
) -> datetime | None:
    """When spend reaches ``limit_nanos`` if it goes on at ``rate_nanos`` per ``rate_span``: ``now`` if already
    reached, None with no spend in the span or not within a century. Rounded up to whole ``resolution`` steps
    (integer arithmetic), so the limit is not reached before the instant returned."""
    if spent_nanos >= limit_nanos:
        return now
    step_us = duration_micros(resolution)
    span_steps = duration_micros(rate_span) // step_us
    if rate_nanos <= 0 or span_steps <= 0:
        return None
    steps = -(-(limit_nanos - spent_nanos) * span_steps // rate_nanos)  # ceiling division
    if steps * step_us > duration_micros(HORIZON):
        return None
    return now + steps * resolution


def duration_micros(delta: timedelta) -> int:
    """Whole microseconds of a duration, exactly (no float on the way)."""
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds

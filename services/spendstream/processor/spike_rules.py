"""Spend-spike detection on integer nano-USD, as pure functions.

- ``daily_spike(today_nanos, trailing_daily_nanos, rule) -> SpikeVerdict | None``: fires when today's spend so far
  exceeds ``rule.factor`` x the average of the trailing complete days (oldest first, zeros included for quiet
  days, at most ``rule.window_days`` are used). Guards: at least ``rule.min_history_days`` days of history (a
  new scope has no baseline) and today >= ``rule.min_spend_nanos`` (so $0.02 vs $0.005 is not a spike).
- Hourly EWMA: ``ewma_next(ewma_nanos, hour_nanos, alpha)`` folds a completed hour into the baseline;
  ``hourly_spike(current_hour_nanos, ewma_nanos, hours_seen, rule)`` compares the CURRENT, partial hour with
  ``factor`` x the baseline, so a runaway loop fires as soon as its spend passes the bar, within minutes,
  without waiting for the hour to end. Guards: ``rule.min_history_hours`` completed hours, ``min_spend_nanos``.
- ``spike_action(rule, scope, policy) -> Action``: ``alert`` rules alert; ``emergency_stop`` shuts off a
  non-critical feature and only alerts for a critical one.
All comparisons are exact (factor and alpha are Decimals turned into integer ratios).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

from spendstream.core.events import Action
from spendstream.core.money_text import usd_text
from spendstream.core.policy import Policy, SpikeRule


@dataclass(frozen=True, slots=True)
class SpikeVerdict:
    rule: str
    observed_nanos: int
    baseline_nanos: int  # the average (daily) or EWMA (hourly) it was compared with
    reason: str


def daily_spike(today_nanos: int, trailing_daily_nanos: Sequence[int], rule: SpikeRule) -> SpikeVerdict | None:
    history = list(trailing_daily_nanos)[-rule.window_days :]
    if len(history) < rule.min_history_days or today_nanos < (rule.min_spend_nanos or 0):
        return None
    total = sum(history)
    num, den = rule.factor.as_integer_ratio()
    # today > factor * total / days  <=>  today * days * den > num * total
    if today_nanos * len(history) * den <= num * total:
        return None
    average = total // len(history)
    return SpikeVerdict(
        rule.name,
        today_nanos,
        average,
        f"daily spend {usd_text(today_nanos)} > {rule.factor}x the {len(history)}-day average {usd_text(average)}",
    )


def ewma_next(ewma_nanos: int | None, hour_nanos: int, alpha: Decimal) -> int:
    """Baseline after one more completed hour; the first hour seeds it. Rounded half-even to whole nanos."""
    if ewma_nanos is None:
        return hour_nanos
    value = alpha * hour_nanos + (1 - alpha) * ewma_nanos
    return int(value.to_integral_value(rounding=ROUND_HALF_EVEN))


def hourly_spike(
    current_hour_nanos: int, ewma_nanos: int | None, hours_seen: int, rule: SpikeRule
) -> SpikeVerdict | None:
    if ewma_nanos is None or hours_seen < rule.min_history_hours:
        return None
    if current_hour_nanos < (rule.min_spend_nanos or 0):
        return None
    num, den = rule.factor.as_integer_ratio()
    if current_hour_nanos * den <= num * ewma_nanos:
        return None
    return SpikeVerdict(
        rule.name,
        current_hour_nanos,
        ewma_nanos,
        f"spend this hour {usd_text(current_hour_nanos)} > {rule.factor}x the hourly EWMA {usd_text(ewma_nanos)}",
    )


def spike_action(rule: SpikeRule, scope: str, policy: Policy) -> Action:
    if rule.action == "alert":
        return Action.alert
    dimension, _, feature = scope.partition(":")
    if dimension != "feature" or policy.is_critical(feature):
        return Action.alert
    return Action.shutoff

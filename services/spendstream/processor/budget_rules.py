"""Budget decisions as pure functions on integer nano-USD.

- ``action_for_spend(spend_nanos, limit_nanos, thresholds, critical) -> Action``: the highest threshold reached
  (``spend >= fraction x limit``, compared exactly with integers, never floats): shutoff, fallback, alert or
  allow. A critical feature gets ``throttle`` where others get ``shutoff``. A zero limit blocks at once.
  The action is monotone in spend.
- ``evaluate_budget(budget, scope, spend_nanos, policy) -> Evaluation``: the action plus what a Decision
  carries (fallback map, throttle rate, reason); criticality comes from the policy's feature list, and a
  ``hard_cap`` budget shuts off critical features too. (A shutoff of any other scope, e.g. ``team:marketing``,
  lists the critical features the edges throttle instead: ``decision_publisher``.)
- ``should_emit(previous, current) -> bool``: decisions are emitted only when a scope's action changes, so a
  steady state costs no traffic on the compacted enforcement topic.
- ``quota_action(requests_used, tokens_used, quota) -> QuotaVerdict``: a used-up per-day quota shuts the scope off
  (``used >= cap``: the cap-th call was allowed, the next one is not).
- ``most_restrictive(actions)``: allow < alert < fallback < throttle < shutoff (``core.events.ACTION_RANK``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

from spendstream.core.events import ACTION_RANK, Action
from spendstream.core.money_text import usd_text
from spendstream.core.policy import Budget, Policy, Quota, Thresholds


def most_restrictive(actions: Iterable[Action]) -> Action:
    """The most restrictive action (``allow`` for none)."""
    return max(actions, key=ACTION_RANK.__getitem__, default=Action.allow)


def reached(spend_nanos: int, limit_nanos: int, fraction: Decimal) -> bool:
    """``spend >= fraction x limit`` in exact integer arithmetic."""
    numerator, denominator = fraction.as_integer_ratio()
    return spend_nanos * denominator >= limit_nanos * numerator


def action_for_spend(spend_nanos: int, limit_nanos: int, thresholds: Thresholds, critical: bool = False) -> Action:
    if thresholds.shutoff is not None and reached(spend_nanos, limit_nanos, thresholds.shutoff):
        return Action.throttle if critical else Action.shutoff
    if thresholds.fallback is not None and reached(spend_nanos, limit_nanos, thresholds.fallback):
        return Action.fallback
    if thresholds.alert is not None and reached(spend_nanos, limit_nanos, thresholds.alert):
        return Action.alert
    return Action.allow


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One budget's verdict, with the extras a Decision needs for that action."""

    action: Action
    reason: str
    fallback_models: dict[str, str] = field(default_factory=dict)
    throttle_rps: float | None = None


def _pct(spend_nanos: int, limit_nanos: int) -> str:
    if limit_nanos == 0:
        return "budget is zero"
    return f"{Decimal(spend_nanos * 100) / Decimal(limit_nanos):.1f}% of {usd_text(limit_nanos)}"


def evaluate_budget(budget: Budget, scope: str, spend_nanos: int, policy: Policy) -> Evaluation:
    """The action for ``scope`` (concrete, e.g. ``user:u1`` for a ``user:*`` budget) at this spend."""
    dimension, _, value = scope.partition(":")
    critical = dimension == "feature" and policy.is_critical(value) and not budget.hard_cap
    thresholds = budget.thresholds or policy.thresholds
    action = action_for_spend(spend_nanos, budget.limit_nanos, thresholds, critical)
    spent = usd_text(spend_nanos)
    reason = f"{budget.period} budget {scope}: {spent} spent, {_pct(spend_nanos, budget.limit_nanos)}"
    if budget.limit_nanos == 0 and dimension == "feature":  # what the developer refused and the approver need to know
        reason += (
            " (a feature registered above the approval threshold stays at $0 until approved: "
            "`spendstream budget list --status pending`)"
        )
    if action is Action.fallback:
        fallback = budget.fallback_models if budget.fallback_models is not None else policy.fallback_models
        return Evaluation(action, reason, dict(fallback))
    if action is Action.throttle:
        return Evaluation(action, reason, throttle_rps=policy.throttle_rps(value))
    return Evaluation(action, reason)


def should_emit(previous: Action | None, current: Action) -> bool:
    """Emit only on a change; with no previous decision, ``allow`` is what edges assume already."""
    if previous is None:
        return current is not Action.allow
    return previous is not current


@dataclass(frozen=True, slots=True)
class QuotaVerdict:
    action: Action
    reason: str


def quota_action(
    requests_used: int, tokens_used: int, quota: Quota, alert_fraction: Decimal | None = None
) -> QuotaVerdict:
    """Shut off once a daily cap is used up; optionally alert from ``alert_fraction`` of a cap."""
    caps = (("requests", requests_used, quota.requests_per_day), ("tokens", tokens_used, quota.tokens_per_day))
    for what, used, cap in caps:
        if cap is not None and used >= cap:
            return QuotaVerdict(Action.shutoff, f"{quota.scope} daily {what} quota used up: {used}/{cap}")
    if alert_fraction is not None:
        for what, used, cap in caps:
            if cap is not None and reached(used, cap, alert_fraction):
                return QuotaVerdict(Action.alert, f"{quota.scope} daily {what} quota at {used}/{cap}")
    return QuotaVerdict(Action.allow, "")

"""What one scope's spend means right now: its decision and the alerts it owes (pure; stage 2 calls it).

Stage 2 knows, per scope, the newest window start seen for each tracked period (event time drives it, so a
period rolls over when the first event of the next period arrives, and the decision's ``expires_at`` ends
it at the period boundary even if no event comes) and a lookup of window totals. ``evaluate_scope`` applies
every rule of the policy that matches the scope: budgets (thresholds, critical features throttled instead
of shut off), per-day quotas, spike rules (daily and hourly EWMA) and the forecast; the decision is the most
restrictive action. A shutoff carries the policy's critical features and their throttle rates
(``critical_throttle_rps``): an edge throttles a request of a critical feature where it stops the others, so a
critical feature is never shut off by any scope's budget or quota, unless a ``hard_cap`` budget shut it off.
A scope with a ``hard_cap`` budget and no other action is still published (``allow``, carrying the spend and
limit of the hard cap closest to its limit), so edges hold its requests against the remaining budget
(``edge/reservation.py``) from its first traffic, not only after its alert.
``decision_signature`` is what must change for a new Decision to be published (a budget's alert and fallback,
and a hard cap's allow, are also refreshed every ``SPEND_REFRESH_S`` while the scope has traffic, a shutoff its
critical features still spend under every ``FAR_REFRESH_S``: ``needs_spend_refresh``), and
``next_version`` keeps versions increasing per scope across restarts (it never goes below the clock).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from functools import lru_cache

from spendstream.core.events import ACTION_RANK, SPEND_REFRESH_S, Action, Alert, AlertKind, Decision, Severity
from spendstream.core.matching import scope_matches
from spendstream.core.money_text import usd_text
from spendstream.core.periods import HOUR, HOURLY_HISTORY, Period, hour_bucket, period, period_window, utc_at
from spendstream.core.policy import Budget, Policy, SpikeRule
from spendstream.processor.budget_rules import (
    evaluate_budget,
    quota_action,
)
from spendstream.processor.forecast import should_alert_forecast
from spendstream.processor.scopes import allowed_model_lists, matching_quotas
from spendstream.processor.spend_accounting import window_key
from spendstream.processor.spike_rules import daily_spike, ewma_next, hourly_spike, spike_action

Totals = Callable[[str], tuple[int, int, int]]  # window key -> (total_nanos, requests, tokens)
FAR_REFRESH_S = 30.0  # a hard cap's standing while less than half of it is spent: refreshed at most this often

_SEVERITY = {
    Action.alert: Severity.warning,
    Action.fallback: Severity.warning,
    Action.throttle: Severity.critical,
    Action.shutoff: Severity.critical,
}


@dataclass(frozen=True, slots=True)
class Crossing:
    """An alert owed once: ``key`` identifies the crossing (rule, window, level) so replays do not repeat it."""

    key: str
    kind: AlertKind
    severity: Severity
    message: str
    spend_nanos: int = 0
    limit_nanos: int = 0
    period: str = ""


@dataclass(frozen=True, slots=True)
class BudgetStanding:
    """Where a scope stands against one of its budgets in the current window (the budget gauges show it)."""

    scope: str
    period: str
    limit_nanos: int
    spend_nanos: int
    start: datetime
    end: datetime
    named: bool = True  # the policy's budget names this scope (False: a template's, such as each user of user:*)


@dataclass(slots=True)
class ScopeEvaluation:
    """What the policy's rules make of one scope's spend: the most restrictive action, what its Decision carries,
    the alerts owed and the budget standings (an edge's per-request answer is ``edge.verdict.Verdict``)."""

    action: Action = Action.allow
    reason: str = ""
    spend_nanos: int = 0
    limit_nanos: int = 0
    period: str = ""
    period_start: datetime | None = None
    expires_at: datetime | None = None
    fallback_models: dict[str, str] = field(default_factory=dict)
    throttle_rps: float | None = None
    allowed_models: list[str] = field(default_factory=list)
    crossings: list[Crossing] = field(default_factory=list)
    hard_stop: bool = False  # a hard-cap budget is shut off: nothing is exempt
    critical_throttle_rps: dict[str, float] = field(default_factory=dict)
    standings: list[BudgetStanding] = field(default_factory=list)  # one per budget of the scope with a window
    tracks_hard_cap: bool = False  # an ``allow`` that carries the standing of a hard cap, for edges to reserve against

    def consider(self, action: Action, reason: str, **extra: object) -> None:
        """Adopt a rule's outcome if it is more restrictive than what is already decided (an ``allow`` still
        records the first budget's spend and limit, so a lifting decision says where the scope stands)."""
        if ACTION_RANK[action] > ACTION_RANK[self.action] or (action is self.action and not self.period):
            self.adopt(action, reason, **extra)

    def adopt(self, action: Action, reason: str, **extra: object) -> None:
        """Take this outcome and what its Decision carries, whatever was decided before."""
        self.action = action
        self.reason = reason
        self.spend_nanos = int(extra.get("spend_nanos") or 0)  # type: ignore[call-overload]
        self.limit_nanos = int(extra.get("limit_nanos") or 0)  # type: ignore[call-overload]
        self.period = str(extra.get("period") or "")
        self.period_start = extra.get("period_start")  # type: ignore[assignment]
        self.expires_at = extra.get("expires_at")  # type: ignore[assignment]
        self.fallback_models = dict(extra.get("fallback_models") or {})  # type: ignore[call-overload]
        self.throttle_rps = extra.get("throttle_rps")  # type: ignore[assignment]


def _previous_day_starts(day_start: int, tz: tzinfo, count: int) -> list[int]:
    """Starts of the ``count`` local days before the day starting at ``day_start``, oldest first."""
    out = []
    start = day_start
    for _ in range(count):
        start = int(period_window("day", utc_at(start - 1), tz)[0].timestamp())
        out.append(start)
    return out[::-1]


def _trim_leading_zeros(values: list[int]) -> list[int]:
    """History starts at the first period with spend: a new scope has no baseline, not a zero one."""
    for i, value in enumerate(values):
        if value:
            return values[i:]
    return []


@lru_cache(maxsize=4096)
def _budget_starts(kind: Period, latest_s: int, tz: tzinfo) -> tuple[tuple[int, ...], datetime, datetime]:
    """``Period.budget_starts``, memoised: every scope evaluated in a batch asks for the same few windows, and each
    answer costs timezone arithmetic."""
    return kind.budget_starts(latest_s, tz)


@lru_cache(maxsize=8192)
def _window_start(series: str, instant_s: int, tz: tzinfo) -> int:
    return int(period_window(series, utc_at(instant_s), tz)[0].timestamp())


def current_windows(latest: Mapping[str, int], seen_at: datetime, tz: tzinfo) -> dict[str, int]:
    """``latest`` with each calendar series' newest window read in ``tz``: the window there that holds the newest
    window start seen, or the newest event (``seen_at``) if that is later.

    After the policy's timezone changed, a scope's newest window could be one cut in the old timezone: an attacker
    session moved from Pacific/Kiritimati to America/New_York, and the budget kept reading Kiritimati's day ($1 of the
    $2 that New York's day held). Hour buckets are UTC, in every timezone."""
    seen_s = int(seen_at.timestamp())
    seen_s -= seen_s % 900  # window starts are on the quarter hour in every timezone in use: a few memo keys
    out = dict(latest)
    for series, start_s in latest.items():
        if series != HOUR:
            out[series] = max(_window_start(series, start_s, tz), _window_start(series, seen_s, tz) if seen_s else 0)
    return out


def rolling_expiry(
    budget: Budget, scope: str, hours: Sequence[int], hour_end: datetime, action: Action, policy: Policy
) -> datetime:
    """When a rolling budget's ``action`` lapses if nothing more is spent: the first hour boundary from ``hour_end``
    (the end of the newest of the ``hours``, newest first) at which the hours still inside the window add up to
    another action. Its decision lasts that long: one that lapsed with the hour lifted a hard cap for the burst
    until the next event's decision came back (an attacker session: 150 of 300 requests served on a $5 cap)."""
    remaining = sum(hours)
    for dropped, oldest in enumerate(reversed(hours)):
        remaining -= oldest
        if evaluate_budget(budget, scope, remaining, policy).action is not action:
            return hour_end + timedelta(hours=dropped)
    return hour_end + timedelta(hours=len(hours))


def evaluate_scope(
    scope: str,
    latest: Mapping[str, int],
    totals: Totals,
    policy: Policy,
    seen_at: datetime,
    now: datetime | None = None,
) -> ScopeEvaluation:
    """Every rule that matches ``scope``; ``latest`` maps a tracked period to its newest window start. A budget of
    $0 applies from ``now`` without spend (a feature registered at $0 is shut off before its first call: a burst
    otherwise passed during the decision round trip); any other budget waits for its period's first window."""
    tz = policy.tz
    latest = current_windows(latest, seen_at, tz)
    verdict = ScopeEvaluation()
    lists = allowed_model_lists([scope], policy)
    if lists:
        verdict.allowed_models = list(lists[0])
    closest_cap: tuple[int, str, dict[str, object]] | None = None  # (remaining, reason, extra) of a hard cap at allow
    for budget in policy.matching_budgets(scope):
        kind = period(budget.period)
        if kind.series in latest:
            latest_s = latest[kind.series]
            if kind.rolling and now is not None:  # the 24 hours before now, whenever the newest spend happened
                latest_s = max(latest_s, int(hour_bucket(now).timestamp()))
            starts, start, end = _budget_starts(kind, latest_s, tz)
            hours = [totals(window_key(scope, kind.series, window))[0] for window in starts]
            spend = sum(hours)
        elif budget.limit_nanos == 0 and now is not None:
            start, end = period_window(kind.name, now, tz)
            spend = 0
        else:
            continue
        evaluation = evaluate_budget(budget, scope, spend, policy)
        if kind.rolling and evaluation.action is not Action.allow:
            end = rolling_expiry(budget, scope, hours, end, evaluation.action, policy)
        verdict.standings.append(
            BudgetStanding(scope, kind.name, budget.limit_nanos, spend, start, end, not budget.is_template)
        )
        extra = {
            "spend_nanos": spend,
            "limit_nanos": budget.limit_nanos,
            "period": kind.name,
            "period_start": start,
            "expires_at": end,
            "fallback_models": evaluation.fallback_models,
            "throttle_rps": evaluation.throttle_rps,
        }
        verdict.consider(evaluation.action, evaluation.reason, **extra)
        verdict.hard_stop |= budget.hard_cap and evaluation.action is Action.shutoff
        remaining = budget.limit_nanos - spend
        capped = budget.hard_cap and evaluation.action is Action.allow
        if capped and (closest_cap is None or remaining < closest_cap[0]):
            closest_cap = (remaining, evaluation.reason, extra)
        # the limit is part of what was crossed: after an approved increase, reaching a threshold of the new limit
        # is a new crossing (alerted, notified), not the one already alerted at the old limit
        window_id = f"{budget.id}|{int(start.timestamp())}|{budget.limit_nanos}"
        if evaluation.action is not Action.allow:
            verdict.crossings.append(
                Crossing(
                    f"{window_id}|{evaluation.action}",
                    AlertKind.threshold,
                    _SEVERITY[evaluation.action],
                    f"{evaluation.action}: {evaluation.reason}",
                    spend,
                    budget.limit_nanos,
                    kind.name,
                )
            )
        thresholds = budget.thresholds or policy.thresholds
        if (
            kind.forecast
            and thresholds.alert is not None
            and budget.limit_nanos > 0
            and should_alert_forecast(spend, budget.limit_nanos, start, end, seen_at, thresholds.alert)
        ):
            verdict.crossings.append(
                Crossing(
                    f"forecast|{window_id}",
                    AlertKind.forecast,
                    Severity.warning,
                    f"forecast: {scope} is on course to exceed its {kind} budget of "
                    f"{usd_text(budget.limit_nanos)} ({usd_text(spend)} spent so far)",
                    spend,
                    budget.limit_nanos,
                    kind.name,
                )
            )
    if "day" in latest:
        day = latest["day"]
        _, requests, tokens = totals(window_key(scope, "day", day))
        for quota in matching_quotas(scope, policy):
            outcome = quota_action(requests, tokens, quota)
            if outcome.action is not Action.allow:
                start, end = period_window("day", utc_at(day), tz)
                verdict.consider(outcome.action, outcome.reason, period="day", period_start=start, expires_at=end)
                verdict.crossings.append(
                    Crossing(f"quota|{quota.scope}|{day}", AlertKind.quota, Severity.warning, outcome.reason)
                )
    for rule in policy.spike_rules:
        if scope_matches(rule.scope, scope):
            _apply_spike(rule, scope, latest, totals, policy, verdict)
    if verdict.action is Action.shutoff and not verdict.hard_stop:
        verdict.critical_throttle_rps = dict(policy.critical_throttle_rps)
    if verdict.action is Action.allow and closest_cap is not None:
        _, reason, extra = closest_cap
        verdict.adopt(Action.allow, reason, **extra)
        verdict.tracks_hard_cap = True
    return verdict


def _apply_spike(
    rule: SpikeRule, scope: str, latest: Mapping[str, int], totals: Totals, policy: Policy, verdict: ScopeEvaluation
) -> None:
    if rule.kind == "daily":
        if "day" not in latest:
            return
        day = latest["day"]
        history = _trim_leading_zeros(
            [totals(window_key(scope, "day", d))[0] for d in _previous_day_starts(day, policy.tz, rule.window_days)]
        )
        found = daily_spike(totals(window_key(scope, "day", day))[0], history, rule)
        window_start, window_end = period_window("day", utc_at(day), policy.tz)
    else:
        if HOUR not in latest:
            return
        hour = latest[HOUR]
        past = _trim_leading_zeros(
            [totals(window_key(scope, HOUR, hour - 3600 * i))[0] for i in range(HOURLY_HISTORY, 0, -1)]
        )
        ewma: int | None = None
        for value in past:
            ewma = ewma_next(ewma, value, rule.alpha)
        found = hourly_spike(totals(window_key(scope, HOUR, hour))[0], ewma, len(past), rule)
        window_start, window_end = utc_at(hour), utc_at(hour + 3600)
    if found is None:
        return
    action = spike_action(rule, scope, policy)
    reason = f"spike rule {rule.name} on {scope}: {found.reason}"
    verdict.consider(action, reason, spend_nanos=found.observed_nanos, period_start=window_start, expires_at=window_end)
    verdict.crossings.append(
        Crossing(
            f"spike|{rule.name}|{int(window_start.timestamp())}",
            AlertKind.spike,
            Severity.critical if action is Action.shutoff else Severity.warning,
            reason,
            found.observed_nanos,
            found.baseline_nanos,
        )
    )


def decision_signature(verdict: ScopeEvaluation) -> list[object]:
    """What edges act on, and the limit they say it was decided against; a Decision is published only when this
    changes (JSON-friendly for table storage). The limit: a feature approved at $2,500 with $3,000 spent stayed shut
    off under its old decision, whose 402 kept saying it was held at $0 until approved (an attacker session)."""
    return [
        str(verdict.action),
        sorted(verdict.fallback_models.items()),
        verdict.throttle_rps,
        sorted(verdict.allowed_models),
        verdict.expires_at.isoformat() if verdict.expires_at else None,
        sorted(verdict.critical_throttle_rps.items()),
        verdict.tracks_hard_cap,
        verdict.limit_nanos,
    ]


def needs_decision(previous: list[object] | None, verdict: ScopeEvaluation) -> bool:
    """No previous decision means edges assume ``allow`` with no model restriction."""
    if previous is None:
        return verdict.action is not Action.allow or bool(verdict.allowed_models)
    current = decision_signature(verdict)
    if verdict.action is Action.allow and previous[0] == str(Action.allow):
        # A new period of plain allow changes nothing at the edge; a hard cap's standing dropped (the policy no longer
        # caps the scope) must reach the edges' reservation books.
        return current[:4] != previous[:4] or current[6:] != previous[6:]
    return current != previous


def needs_spend_refresh(verdict: ScopeEvaluation, last_version: int, now: datetime) -> bool:
    """A budget's alert or fallback, or a hard cap's allow, is published again, with its spend as it is now, at
    most every ``SPEND_REFRESH_S`` while the scope has traffic (stage 2 evaluates a scope when its events arrive).

    Edges hold each request against the spend the decision carried and count their own requests since, and those
    of the half second before it too, which they cannot tell the processor had already counted
    (``edge/reservation.py``). That double count grew with the request rate, and once it refused a scope nothing
    lifted it: refused requests cost nothing, so no threshold was crossed and no decision came until the period
    ended. A fresh decision moves the edge's half second past them; the refused requests' own events bring it.
    A hard cap below its alert threshold is published the same way, the first time on its first traffic, so edges
    bound a burst by the remaining budget instead of serving it until the shutoff's round trip; while less than
    half of it is spent, at most every ``FAR_REFRESH_S`` (a ``user:*`` cap has a decision per active user, and
    far from its limit an edge's own count keeps it safe). A shutoff that lets critical features through (throttled)
    is refreshed at most every ``FAR_REFRESH_S`` too: edges refuse it without reserving, but the spend and reason
    that dashboards and the ledger show would otherwise stay those of the moment it was issued while spend goes on.
    """
    if verdict.limit_nanos <= 0:
        return False
    if verdict.action in (Action.alert, Action.fallback):
        interval = SPEND_REFRESH_S
    elif verdict.tracks_hard_cap:
        interval = SPEND_REFRESH_S if verdict.spend_nanos * 2 >= verdict.limit_nanos else FAR_REFRESH_S
    elif verdict.action is Action.shutoff and verdict.critical_throttle_rps and not verdict.hard_stop:
        interval = FAR_REFRESH_S  # critical features still spend: the shutoff's spend and reason keep up with them
    else:
        return False
    return now.timestamp() * 1_000_000 - last_version >= interval * 1_000_000


def next_version(previous: int, now: datetime) -> int:
    """Strictly above the last version and never below the clock (microseconds), so a restart after a lost
    table write still publishes a newer version than anything already on the compacted topic."""
    return max(previous + 1, int(now.timestamp() * 1_000_000))


def build_decision(scope: str, verdict: ScopeEvaluation, version: int, policy_version: str, now: datetime) -> Decision:
    return Decision(
        scope=scope,
        action=verdict.action,
        fallback_models=verdict.fallback_models,
        throttle_rps=verdict.throttle_rps,
        allowed_models=verdict.allowed_models,
        reason=verdict.reason or "within budget",
        spend_nanos=verdict.spend_nanos,
        limit_nanos=verdict.limit_nanos,
        period=verdict.period,
        period_start=verdict.period_start,
        expires_at=verdict.expires_at if verdict.action is not Action.allow or verdict.tracks_hard_cap else None,
        version=version,
        issued_at=now,
        policy_version=policy_version,
        critical_throttle_rps=verdict.critical_throttle_rps,
    )


ALERT_ID_NAMESPACE = uuid.UUID("6f0c2a4e-3b1d-5c7e-9a80-5e1d0a11e47e")


def alert_id_for(scope: str, crossing: Crossing) -> uuid.UUID:
    """The same crossing always gets the same id, so an alert sent again after a restart (whose memory of
    what it already sent may be older than the ledger's) collapses in the ledger and is notified once."""
    return uuid.uuid5(ALERT_ID_NAMESPACE, f"{scope}\x1f{crossing.key}")


def build_alert(scope: str, crossing: Crossing, policy_version: str, occurred_at: datetime) -> Alert:
    return Alert(
        alert_id=alert_id_for(scope, crossing),
        scope=scope,
        kind=crossing.kind,
        severity=crossing.severity,
        message=crossing.message,
        spend_nanos=crossing.spend_nanos,
        limit_nanos=crossing.limit_nanos,
        period=crossing.period,
        occurred_at=occurred_at,
        policy_version=policy_version,
    )

"""Budgets from a policy into the ledger's ``budgets`` table, so reports compare budget with actual."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from spendstream.analytics.money import first_of_month, month_bounds
from spendstream.core.budget_lifecycle import BudgetRequest, effective_limit
from spendstream.core.matching import is_template
from spendstream.core.periods import monthly_equivalent

BudgetLine = tuple[str, str, int]  # (scope, period, limit_nanos)


def budget_rows(budgets: Iterable[BudgetLine], month: date, policy_version: str) -> list[list[Any]]:
    """Rows for the ``budgets`` table; template scopes (``team:*``) have no single owner and are skipped."""
    month = first_of_month(month)
    rows = []
    for scope, period, limit_nanos in budgets:
        if is_template(scope):
            continue
        if limit_nanos < 0:
            raise ValueError(f"budget {scope}/{period}: limit must not be negative ({limit_nanos})")
        rows.append(
            [
                month,
                scope,
                str(period),
                int(limit_nanos),
                monthly_equivalent(str(period), limit_nanos, month),
                policy_version,
            ]
        )
    return rows


BUDGET_COLUMNS = ["month", "scope", "period", "limit_nanos", "monthly_limit_nanos", "policy_version"]


def load_budgets(client: Any, db: str, budgets: Iterable[BudgetLine], month: date, policy_version: str = "") -> int:
    """Make ``month``'s budgets exactly ``budgets`` (a budget dropped from the policy disappears too).

    Returns the number of rows loaded. Running it again with the same input changes nothing.
    """
    rows = budget_rows(budgets, month, policy_version)
    client.command(f"DELETE FROM {db}.budgets WHERE month = {{m:Date}}", parameters={"m": first_of_month(month)})
    if rows:
        client.insert(f"{db}.budgets", rows, column_names=BUDGET_COLUMNS)
    return len(rows)


def policy_budget_lines(policy: Any) -> list[BudgetLine]:
    """(scope, period, limit_nanos) of a parsed ``core.policy.Policy``."""
    return [(b.scope, str(b.period), b.limit_nanos) for b in policy.budgets]


def monthly_increase(
    line: BudgetLine, requests: Iterable[BudgetRequest], month: date, at: datetime, tz: str = "UTC"
) -> int:
    """What the adjustments in force at ``at`` add to the policy's budget ``line``, expressed for ``month``. Only
    requests for exactly that scope and period count.

    A month budget's increase counts once (the processor's limit at ``at`` minus the policy's amount). A day or week
    budget's increase counts for the days of the month it covers, not as a monthly equivalent: a one-day $10 overage
    of a day budget adds $10 to the month (its monthly equivalent, $310, was never approved), a one-week increase of
    a week budget adds its amount for each of that week's days in the month, a seventh per day."""
    scope, period, limit_nanos = line
    if period not in ("day", "week"):
        limit = effective_limit(limit_nanos, requests, scope, period, at)
        assert limit is not None  # the policy declares this budget
        return monthly_equivalent(period, limit, month) - monthly_equivalent(period, limit_nanos, month)
    start, end = month_bounds(month, tz)
    zone = ZoneInfo(tz)
    added = 0
    for request in requests:
        if request.scope != scope or request.period != period or not request.active_at(at):
            continue
        since, until = max(request.starts_at, start), min(request.expires_at or end, end)
        if until <= since:
            continue
        days = (until - timedelta(microseconds=1)).astimezone(zone).date() - since.astimezone(zone).date()
        covered = days.days + 1  # the local days of the month the increase raised the limit of
        added += request.amount_nanos * covered if period == "day" else request.amount_nanos * covered // 7
    return added

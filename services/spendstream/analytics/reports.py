"""The reports finance and platform teams read: CFO weekly, chargeback, forecast, top spenders,
model mix, latency, routing savings. Each is one or two ``FINAL`` queries over the ledger (exact under replays),
then the pure arithmetic of ``money.py``. Chargeback, weekly, forecast and top read through :func:`spend_totals`:
sealed buckets from the rollups of ``rollup.py`` (exact: a seal is used only while no insert touched its bucket),
the rest of the range (the open tail, edges that cut a bucket, buckets touched since their seal) from the ledger
with ``FINAL``, in one query.

Periods are calendar days, ISO weeks and months in the policy in force's timezone (``report_timezone``), as budgets
are.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple

from spendstream.analytics.budgets import monthly_increase
from spendstream.analytics.money import (
    allocate_shared,
    first_of_month,
    forecast_month_end,
    is_premium,
    local_date,
    month_bounds,
    ratio,
    week_start,
)
from spendstream.analytics.report_model import Column, Report
from spendstream.analytics.rollup import SERVED, WIDTH_OF, interval_sql, utc_literal, valid_seals
from spendstream.core.audit_chain import normalised
from spendstream.core.budget_lifecycle import BudgetRequest
from spendstream.core.periods import days_in_month, local_midnight
from spendstream.core.run_rate import exhaustion_instant

# Exact reads: FINAL collapses replayed event_ids. The ledger is partitioned by month of
# occurred_at and a duplicate always has the same occurred_at, so FINAL never needs to merge
# across partitions; telling ClickHouse so lets it process partitions independently.
FINAL_SETTINGS = {"do_not_merge_across_partitions_select_final": 1}

TOP_DIMENSIONS = (
    "team", "feature", "user", "customer", "project", "environment", "provider", "model", "org", "division",
    "service_tier",
)  # fmt: skip
UNATTRIBUTED = "(unattributed)"


@dataclass(frozen=True)
class Ledger:
    """Where the reports read: a clickhouse-connect client, its database and the policy in force's timezone."""

    client: Any
    db: str
    tz: str = "UTC"
    sealed: bool = True  # False: every figure from the ledger with FINAL (the reference the rollups are tested against)

    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return self.client.query(sql.replace("{db}", self.db), parameters=params, settings=FINAL_SETTINGS).result_rows


def _ts(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


_MODEL = "if(model_served != '', model_served, model_requested)"
# Sums of costs are Int128: each cost fits Int64, but enough large ones overflow an Int64 sum, which
# ClickHouse wraps silently (a negative total); Python reads Int128 as an exact int.
_COST = "toInt128(ifNull(cost_nanos, 0))"
_RANGE = "occurred_at >= {start:DateTime64(6, 'UTC')} AND occurred_at < {end:DateTime64(6, 'UTC')}"


@dataclass(frozen=True)
class TeamBudgets:
    """The monthly budget per team (scope ``team:<name>``): the policy's amount and what the approved increases in
    force at ``at`` add to it, both as monthly equivalents. The limit is their sum, what the processor enforced."""

    policy: dict[str, int]
    increases: dict[str, int]
    at: datetime
    periods: frozenset[str] = frozenset()  # the periods of the policy's team budgets ("day", "week", "month")

    def limits(self) -> dict[str, int]:
        return {team: amount + self.increases.get(team, 0) for team, amount in self.policy.items()}


def budget_instant(month: date, now: datetime, tz: str) -> datetime:
    """The instant whose limits a report of ``month`` shows: ``now`` for the running month, the month's last
    instant for a past one (what was in force when it closed), its first for a month to come."""
    start, end = month_bounds(month, tz)
    return min(max(now, start), end - timedelta(microseconds=1))


_REQUEST_FIELDS = [f.name for f in fields(BudgetRequest)]  # the columns of budget_events that make a request


def approved_requests(ledger: Ledger) -> list[BudgetRequest]:
    """The newest step of every approved request on a team budget, from the audit trail (``budget_events``); a
    row that does not make a well-formed request is left out, as the processor skips such a record."""
    rows = ledger.rows(
        f"SELECT {', '.join(_REQUEST_FIELDS)} FROM (SELECT * FROM {{db}}.budget_events "
        "ORDER BY chain_seq DESC LIMIT 1 BY id) WHERE status = 'approved' AND startsWith(scope, 'team:')"
    )
    requests = []
    for row in rows:
        record = json.dumps(normalised(dict(zip(_REQUEST_FIELDS, row, strict=True))))
        try:
            requests.append(BudgetRequest.from_json(record))
        except (ValueError, KeyError, TypeError):
            continue
    return requests


def team_budgets(ledger: Ledger, month: date, now: datetime) -> TeamBudgets:
    """``month``'s team budgets as loaded from the policy, with the approved increases in force at
    ``budget_instant(month, now)``. A team with several budgets (a day's and a month's) is held by the tightest of
    them over the month: that one is its budget, not their sum ($1 a day and $100 a month allow $31 in March)."""
    at = budget_instant(month, now, ledger.tz)
    rows = ledger.rows(
        "SELECT scope, period, limit_nanos, monthly_limit_nanos FROM {db}.budgets FINAL "
        "WHERE month = {month:Date} AND startsWith(scope, 'team:')",
        month=first_of_month(month),
    )
    requests = approved_requests(ledger) if rows else []
    binding: dict[str, tuple[int, int]] = {}  # team -> (policy amount, increases) of its tightest budget
    for scope, period, limit, monthly_limit in rows:
        team = scope.removeprefix("team:")
        candidate = (int(monthly_limit), monthly_increase((scope, period, int(limit)), requests, month, at, ledger.tz))
        if team not in binding or sum(candidate) < sum(binding[team]):
            binding[team] = candidate
    policy = {team: amount for team, (amount, _) in binding.items()}
    increases = {team: added for team, (_, added) in binding.items()}
    return TeamBudgets(policy, increases, at, frozenset(str(row[1]) for row in rows))


def monthly_equivalents_note(periods: frozenset[str]) -> list[str]:
    """Says how day and week budgets enter a report that compares with months ([] when all budgets are monthly):
    a reader of "$310 budget" for a team held to $10 a day must know where the figure comes from."""
    named = {"day": "a day budget x the month's days", "week": "a week budget x the month's days / 7"}
    shown = [named[p] for p in ("day", "week") if p in periods]
    if not shown:
        return []
    return [
        f"team budgets by {' or '.join(p for p in ('day', 'week') if p in periods)} are shown as monthly "
        f"equivalents ({'; '.join(shown)}); the edges hold each day or week to its own limit"
    ]


def unrecorded_budgets_note(ledger: Ledger, month: date, budgets: TeamBudgets) -> list[str]:
    """Says that ``month`` has no team budgets in the ledger while other months do ([] otherwise): a month before
    any policy read as every team held to $0 and over budget by all it spent."""
    if budgets.policy:
        return []
    if not ledger.rows("SELECT 1 FROM {db}.budgets FINAL WHERE startsWith(scope, 'team:') LIMIT 1"):
        return []  # no team budgets anywhere: nothing to compare with, nothing to explain
    return [
        f"no team budgets are recorded for {month:%Y-%m} (the ledger sink records a month's budgets while it runs "
        "in that month, and with each policy applied): its budgets read $0, so variances are the spend"
    ]


def budgets_note(budgets: TeamBudgets, now: datetime) -> str:
    """What a report's budget means: the limit in force at one instant, said in the report."""
    when = "now" if budgets.at == now else "at the end of the month" if budgets.at < now else "at its start"
    return (
        f"budget = policy budget + approved increases in force {when} ({_ts(budgets.at)[:19]} UTC); "
        "an increase that ended earlier in the month is not included"
    )


def budgets_policy_version(ledger: Ledger, month: date) -> str:
    """The version of the policy ``month``'s budgets were loaded from ("" if none were)."""
    rows = ledger.rows(
        "SELECT argMax(policy_version, loaded_at) FROM {db}.budgets FINAL WHERE month = {month:Date}",
        month=first_of_month(month),
    )
    return str(rows[0][0]) if rows else ""


def _spend_by(ledger: Ledger, dimension: str, start: datetime, end: datetime) -> dict[str, int]:
    return {k: int(cost) for k, cost, *_ in spend_totals(ledger, (dimension,), start, end)}


# -- exact totals: sealed buckets from the rollups, the rest from the ledger ---------------------------

# Per key, in the ledger (raw) and in the rollups; "day" is the local date in the report's timezone.
_RAW_KEYS = {"model": _MODEL, "day": "toDate(occurred_at, {tz:String})"}
_RAW_MEASURES = (
    f"sum({_COST}) AS c, {SERVED} AS r, countIf(cache_hit) AS h, sum(toInt128(input_tokens + output_tokens)) AS t"
)
_ROLLUP_MEASURES = "sum(cost_nanos) AS c, sum(requests) AS r, sum(cache_hits) AS h, sum(tokens) AS t"


class Plan(NamedTuple):
    """Where the figures of [start, end) come from: sealed buckets (start, seal id) and ledger intervals."""

    sealed: list[tuple[datetime, int]]
    raw: list[tuple[datetime, datetime]]


def plan(start: datetime, end: datetime, width: int, seals: dict[datetime, int], cuts: list[datetime]) -> Plan:
    """Buckets of ``width`` seconds inside [start, end) with a valid seal and no cut (an instant where the
    report's grouping changes, such as a local midnight) strictly inside them come from the rollup; the rest
    of the range, merged into as few intervals as possible, from the ledger."""
    step = timedelta(seconds=width)
    epoch_s = int(start.timestamp())
    bucket = datetime.fromtimestamp(epoch_s - epoch_s % width, UTC)
    sealed: list[tuple[datetime, int]] = []
    raw: list[tuple[datetime, datetime]] = []
    while bucket < end:
        lo, hi = max(bucket, start), min(bucket + step, end)
        seal_id = seals.get(bucket)
        whole = lo == bucket and hi == bucket + step and not any(bucket < cut < hi for cut in cuts)
        if whole and seal_id is not None:
            sealed.append((bucket, seal_id))
        elif raw and raw[-1][1] == lo:
            raw[-1] = (raw[-1][0], hi)
        else:
            raw.append((lo, hi))
        bucket += step
    return Plan(sealed, raw)


def spend_totals(
    ledger: Ledger, keys: tuple[str, ...], start: datetime, end: datetime, *, order_limit: int | None = None
) -> list[tuple[Any, ...]]:
    """Exact (cost, requests, cache hits, tokens) per ``keys`` over [start, end), summed in ClickHouse.

    Keys are ledger attribution columns, ``model`` (served, else requested) and ``day`` (local date). With
    ``order_limit`` the rows are the largest ``order_limit`` by cost, each followed by the total of all keys.
    """
    dimensions = [k for k in keys if k != "day"]
    rolled_up = all(k in WIDTH_OF for k in dimensions)  # a key no rollup holds (service_tier) reads the ledger
    width = max((WIDTH_OF.get(k, WIDTH_OF["team"]) for k in dimensions), default=WIDTH_OF["team"])
    if rolled_up and width != WIDTH_OF["team"] and len(dimensions) > 1:
        raise ValueError(f"daily rollups hold one dimension at a time, not {dimensions}")
    cuts = _local_midnights(start, end, ledger.tz) if "day" in keys else []
    seals = valid_seals(ledger.client, ledger.db, width, start, end) if ledger.sealed and rolled_up else {}
    source = plan(start, end, width, seals, cuts)
    names = [f"k{i}" for i in range(len(keys))]
    parts = []
    if source.sealed:
        parts.append(_rollup_part(keys, names, width, source.sealed))
    if source.raw:
        raw_keys = ", ".join(f"{_RAW_KEYS.get(k, f'`{k}`')} AS {n}" for k, n in zip(keys, names, strict=True))
        parts.append(
            f"SELECT {raw_keys}, {_RAW_MEASURES} FROM {{db}}.usage_ledger FINAL "
            f"WHERE {interval_sql(source.raw)} GROUP BY {', '.join(names)}"
        )
    group = ", ".join(names)
    ranked = order_limit is not None
    total = ", sum(sum(c)) OVER ()" if ranked else ""
    tail = f" ORDER BY sum(c) DESC, {group} LIMIT {int(order_limit)}" if ranked else ""
    union = " UNION ALL ".join(parts)
    return ledger.rows(
        f"SELECT {group}, sum(c), sum(r), sum(h), sum(t){total} FROM ({union}) GROUP BY {group}{tail}",
        tz=ledger.tz,
    )


def _rollup_part(keys: tuple[str, ...], names: list[str], width: int, sealed: list[tuple[datetime, int]]) -> str:
    bucket_sql = ", ".join(f"({int(bucket.timestamp())}, {seal_id})" for bucket, seal_id in sealed)
    lo, hi = utc_literal(sealed[0][0]), utc_literal(sealed[-1][0])
    if width == WIDTH_OF["team"]:
        columns = {"day": "toDate(hour, {tz:String})"}
        source, where = "{db}.ledger_hourly", f"hour BETWEEN {lo} AND {hi} AND (toUInt32(hour), seal) IN ({bucket_sql})"
    else:
        (dimension,) = (k for k in keys if k != "day")
        columns = {"day": "toDate(day, {tz:String})", dimension: "key"}
        source = "{db}.ledger_daily_keys"
        where = f"dimension = '{dimension}' AND day BETWEEN {lo} AND {hi} AND (toUInt32(day), seal) IN ({bucket_sql})"
    selected = ", ".join(f"{columns.get(k, f'`{k}`')} AS {n}" for k, n in zip(keys, names, strict=True))
    return f"SELECT {selected}, {_ROLLUP_MEASURES} FROM {source} WHERE {where} GROUP BY {', '.join(names)}"


def _local_midnights(start: datetime, end: datetime, tz: str) -> list[datetime]:
    day, last = local_date(start, tz), local_date(end, tz)
    cuts = []
    while day <= last:
        cuts.append(local_midnight(day, tz))
        day += timedelta(days=1)
    return cuts


# -- chargeback ---------------------------------------------------------------------------------

CHARGEBACK_COLUMNS = [
    Column("department", "Department"),
    Column("budget", "Monthly budget", "usd"),
    Column("actual", "Actual spend", "usd"),
    Column("variance", "Variance", "usd"),
    Column("utilisation", "Used", "pct"),
    Column("shared", "Shared alloc.", "usd"),
    Column("chargeback", "Chargeback", "usd"),
    Column("policy_budget", "Policy budget", "usd"),
    Column("increase", "Approved increases", "usd"),
]


def chargeback_rows(budgets: TeamBudgets, actual: dict[str, int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per department (= team): budget (policy + approved increases), actual, variance (budget - actual), chargeback.

    Spend without a team is shared cost, allocated to departments in proportion to their own
    spend, so the chargebacks add up to the month's whole bill to the nano-dollar. It has a row of its own, last:
    its actual is that spend, its shared allocation minus what went to the departments (its chargeback is what no
    department could take: all of it in a month without department spend), so every column adds up to TOTAL.
    """
    shared = actual.get("", 0)
    limits = budgets.limits()
    departments = sorted((set(limits) | set(actual)) - {""})
    own = {d: actual.get(d, 0) for d in departments}
    allocation = allocate_shared(shared, own)
    rows = []
    for d in departments:
        budget = limits.get(d, 0)
        rows.append(
            {
                "department": d,
                "budget": budget,
                "actual": own[d],
                "variance": budget - own[d],
                "utilisation": ratio(own[d], budget),
                "shared": allocation[d],
                "chargeback": own[d] + allocation[d],
                "policy_budget": budgets.policy.get(d, 0),
                "increase": budgets.increases.get(d, 0),
            }
        )
    if shared:  # its own row, so that every column adds up: what went to the departments leaves it
        allocated = sum(allocation.values())
        rows.append(
            {"department": UNATTRIBUTED, "budget": 0, "actual": shared, "variance": -shared,
             "utilisation": None, "shared": -allocated, "chargeback": shared - allocated,
             "policy_budget": 0, "increase": 0}
        )  # fmt: skip
    total_budget = sum(r["budget"] for r in rows)
    total_actual = sum(r["actual"] for r in rows)
    totals = {
        "department": "TOTAL",
        "budget": total_budget,
        "actual": total_actual,
        "variance": total_budget - total_actual,
        "utilisation": ratio(total_actual, total_budget),
        "shared": sum(r["shared"] for r in rows),
        "chargeback": sum(r["chargeback"] for r in rows),
        "policy_budget": sum(r["policy_budget"] for r in rows),
        "increase": sum(r["increase"] for r in rows),
    }
    return rows, totals


def chargeback(ledger: Ledger, month: date, now: datetime | None = None) -> Report:
    """``month``'s chargeback; its budgets are the limits in force at ``budget_instant(month, now)``."""
    now = now or datetime.now(UTC)
    start, end = month_bounds(month, ledger.tz)
    budgets = team_budgets(ledger, month, now)
    rows, totals = chargeback_rows(budgets, _spend_by(ledger, "team", start, end))
    shared_note = [
        f"{UNATTRIBUTED}: spend without a team, allocated to the departments by their own spend (its Shared alloc. is "
        "what went to them)"
        for row in rows
        if row["department"] == UNATTRIBUTED
    ]
    return Report(
        "chargeback",
        f"Chargeback {first_of_month(month):%B %Y}",
        CHARGEBACK_COLUMNS,
        rows,
        totals,
        params={"month": first_of_month(month), "timezone": ledger.tz, "budgets_at": budgets.at},
        notes=[
            "variance = budget - actual (negative: over budget); chargeback = actual + shared allocation",
            *shared_note,
            budgets_note(budgets, now),
            *monthly_equivalents_note(budgets.periods),
            *unrecorded_budgets_note(ledger, month, budgets),
        ],
    )


# -- CFO weekly ---------------------------------------------------------------------------------

WEEKLY_COLUMNS = [
    Column("week", "Week of", "date"),
    Column("spend", "Spend", "usd"),
    Column("previous", "Previous week", "usd"),
    Column("change", "Change", "pct"),
    Column("budget", "Budget (pro rata)", "usd"),
    Column("budget_used", "Budget used", "pct"),
    Column("top_feature", "Top feature"),
    Column("top_feature_spend", "Top feature spend", "usd"),
    Column("cache_hit_rate", "Cache hit rate", "pct"),
    Column("premium_share", "Premium share", "pct"),
    Column("budget_increase", "Of which increases", "usd"),
]


def prorated_budget(days: list[date], monthly_budget: dict[date, int]) -> int:
    """The part of monthly budgets that falls on ``days``: each day gets 1/days_in_month (floor)."""
    return sum(monthly_budget.get(first_of_month(d), 0) // days_in_month(d) for d in days)


@dataclass
class _WeekTotals:
    spend: int = 0
    requests: int = 0
    cache_hits: int = 0
    premium: int = 0

    def __post_init__(self) -> None:
        self.features: dict[str, int] = defaultdict(int)


def weekly_rows(
    daily: list[tuple[date, str, str, int, int, int]],
    weeks: list[date],
    monthly_budget: dict[date, int],
    monthly_increases: dict[date, int],
) -> list[dict[str, Any]]:
    """CFO rows, newest week first, from (day, feature, model, spend, requests, cache_hits) groups.

    ``weeks`` lists the Mondays to report plus, last, the week before the oldest (for its change);
    ``monthly_budget`` is per month the team budgets in force, ``monthly_increases`` the approved increases in them.
    """
    totals: dict[date, _WeekTotals] = defaultdict(_WeekTotals)
    for day, feature, model, spend, requests, hits in daily:
        week = totals[week_start(day)]
        week.spend += spend
        week.requests += requests
        week.cache_hits += hits
        week.features[feature] += spend
        if is_premium(model):
            week.premium += spend
    rows = []
    for monday in sorted(weeks, reverse=True)[:-1]:
        this, last = totals[monday], totals[monday - timedelta(days=7)]
        days = [monday + timedelta(days=i) for i in range(7)]
        budget = prorated_budget(days, monthly_budget)
        top = max(sorted(this.features), key=lambda f: this.features[f], default=None)
        rows.append(
            {
                "week": monday,
                "spend": this.spend,
                "previous": last.spend,
                "change": ratio(this.spend - last.spend, last.spend),
                "budget": budget,
                "budget_used": ratio(this.spend, budget),
                "top_feature": (top or UNATTRIBUTED) if top is not None else None,
                "top_feature_spend": this.features[top] if top is not None else None,
                "cache_hit_rate": ratio(this.cache_hits, this.requests),
                "premium_share": ratio(this.premium, this.spend),
                "budget_increase": prorated_budget(days, monthly_increases),
            }
        )
    return rows


def weekly(ledger: Ledger, as_of: date, weeks: int = 4, now: datetime | None = None) -> Report:
    """The CFO weekly report: the ISO week containing ``as_of`` and the ``weeks - 1`` before it; each month's
    budgets are the limits in force at ``budget_instant(month, now)``, as in that month's chargeback."""
    now = now or datetime.now(UTC)
    current = week_start(as_of)
    mondays = [current - timedelta(days=7 * i) for i in range(weeks + 1)]
    start, end = local_midnight(mondays[-1], ledger.tz), local_midnight(current + timedelta(days=7), ledger.tz)
    daily = [
        (d, f, m, int(s), int(r), int(h))
        for d, f, m, s, r, h, _ in spend_totals(ledger, ("day", "feature", "model"), start, end)
    ]
    months = {first_of_month(mondays[-1]), first_of_month(current + timedelta(days=6))}
    months |= {first_of_month(m) for m in mondays}
    budgets = {m: team_budgets(ledger, m, now) for m in months}
    monthly_budget = {m: sum(b.limits().values()) for m, b in budgets.items()}
    monthly_increases = {m: sum(b.increases.values()) for m, b in budgets.items()}
    shown = {first_of_month(monday + timedelta(days=day)) for monday in mondays[:weeks] for day in range(7)}
    unrecorded = sorted(m for m, b in budgets.items() if m in shown and not b.limits())
    gaps = []
    if unrecorded and len(unrecorded) < len(budgets):  # a user session read such a week's budget as a full week's
        gaps.append(
            f"no team budgets are recorded for {', '.join(f'{m:%Y-%m}' for m in unrecorded)} (the ledger sink records "
            "a month's budgets while it runs in that month, and with each policy applied): those days add $0 to "
            "the budget column"
        )
    return Report(
        "weekly",
        f"CFO weekly report, week of {current.isoformat()}",
        WEEKLY_COLUMNS,
        weekly_rows(daily, mondays, monthly_budget, monthly_increases),
        params={"as_of": as_of, "weeks": weeks, "timezone": ledger.tz},
        notes=[
            "budget = the week's days' share of the team budgets for their months; premium = complex-tier models",
            "cache hit rate = requests served from cache / requests",
            "a month's budgets include the approved increases in force at its end (the running month: now, "
            "a month to come: its start); "
            "of which increases = their share of the week's budget",
            *monthly_equivalents_note(frozenset().union(*(b.periods for b in budgets.values()))),
            *gaps,
        ],
    )


# -- forecast -----------------------------------------------------------------------------------

FORECAST_COLUMNS = [
    Column("team", "Team"),
    Column("budget", "Monthly budget", "usd"),
    Column("actual", "Month to date", "usd"),
    Column("run_rate", "Daily run rate", "usd"),
    Column("forecast", "Month-end forecast", "usd"),
    Column("forecast_used", "Forecast / budget", "pct"),
    Column("over_by", "Over budget by", "usd"),
    Column("exhausted_on", "Budget runs out", "date"),
    Column("policy_budget", "Policy budget", "usd"),
    Column("increase", "Approved increases", "usd"),
    Column("edges_now", "Edges now"),
]
RUN_RATE_DAYS = 7


def forecast_rows(
    budgets: TeamBudgets,
    actual: dict[str, int],
    window: dict[str, int],
    now: datetime,
    month_end: datetime,
    tz: str,
    edges_now: Mapping[str, str] | None = None,
    stopped: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Month-end forecast per team from month-to-date spend and the trailing 7-day run rate, against the budget in
    force (policy + approved increases); ``edges_now`` is what the edges do to a team now where it is restricted
    (a team held by a day budget can be shut off today while its month looks far from its budget). A team in
    ``stopped`` is shut off to the month's end: its forecast is what it spent (a user session saw a shut-off
    team forecast $28 over its budget)."""
    limits = budgets.limits()
    window_seconds = RUN_RATE_DAYS * 86_400
    run_rate_span = timedelta(days=RUN_RATE_DAYS)
    remaining = max(0, int((month_end - now).total_seconds()))
    rows = []
    for team in sorted(set(limits) | set(actual) | set(window)):
        spent, recent, budget = actual.get(team, 0), window.get(team, 0), limits.get(team, 0)
        if team in stopped:
            forecast, runs_out = spent, None
        else:
            forecast = forecast_month_end(spent, recent, window_seconds, remaining)
            runs_out = exhaustion_instant(spent, budget, recent, run_rate_span, now) if budget > 0 else None
        rows.append(
            {
                "team": team or UNATTRIBUTED,
                "budget": budget,
                "actual": spent,
                "run_rate": recent // RUN_RATE_DAYS,
                "forecast": forecast,
                "forecast_used": ratio(forecast, budget),
                "over_by": max(0, forecast - budget) if budget else None,
                "exhausted_on": local_date(runs_out, tz) if runs_out is not None and runs_out < month_end else None,
                "policy_budget": budgets.policy.get(team, 0),
                "increase": budgets.increases.get(team, 0),
                "edges_now": (edges_now or {}).get(team, ""),
            }
        )
    return rows


def forecast(ledger: Ledger, now: datetime) -> Report:
    month = local_date(now, ledger.tz)
    start, end = month_bounds(month, ledger.tz)
    actual = _spend_by(ledger, "team", start, now)
    window = _spend_by(ledger, "team", now - timedelta(days=RUN_RATE_DAYS), now)
    budgets = team_budgets(ledger, month, now)
    decisions = [d for d in active_decisions(ledger, now) if d["scope"].startswith("team:")]
    restricted = {
        d["scope"].removeprefix("team:"): f"{d['action']} ({d['period']})" if d["period"] else str(d["action"])
        for d in decisions
    }
    stopped = {
        d["scope"].removeprefix("team:")
        for d in decisions
        if d["action"] == "shutoff" and (d["expires_at"] is None or d["expires_at"].replace(tzinfo=UTC) >= end)
    }
    rows = forecast_rows(budgets, actual, window, now, end, ledger.tz, restricted, stopped)
    totals = {
        "team": "TOTAL",
        **{
            k: sum(r[k] for r in rows)
            for k in ("budget", "actual", "run_rate", "forecast", "policy_budget", "increase")
        },
    }
    totals["forecast_used"] = ratio(totals["forecast"], totals["budget"])
    return Report(
        "forecast",
        f"Month-end forecast {first_of_month(month):%B %Y}",
        FORECAST_COLUMNS,
        rows,
        totals,
        params={"as_of": now, "timezone": ledger.tz},
        notes=[
            f"forecast = month to date + trailing {RUN_RATE_DAYS}-day spend x remaining time / {RUN_RATE_DAYS} days",
            budgets_note(budgets, now),
            *monthly_equivalents_note(budgets.periods),
            *unrecorded_budgets_note(ledger, month, budgets),
            "edges now = the newest decision on the team where it restricts its requests (and the budget period)",
            "a team shut off to the month's end is forecast at what it spent (its critical features, throttled, "
            "may add a little)",
        ],
    )


# -- top spenders, model mix, latency ----------------------------------------------------------

TOP_COLUMNS = [
    Column("rank", "#", "int"),
    Column("key", "Name"),
    Column("spend", "Spend", "usd"),
    Column("share", "Share", "pct"),
    Column("requests", "Requests", "int"),
    Column("cost_per_request", "Per request", "usd"),
    Column("tokens", "Tokens", "int"),
]


def top(ledger: Ledger, by: str, start: date, end: date, limit: int = 10) -> Report:
    """The biggest spenders by one dimension over [start, end] (local dates, inclusive)."""
    if by not in TOP_DIMENSIONS:
        raise ValueError(f"cannot rank by {by!r}; choose one of {', '.join(TOP_DIMENSIONS)}")
    lo, hi = local_midnight(start, ledger.tz), local_midnight(end + timedelta(days=1), ledger.tz)
    rows = [(k, s, n, t, total) for k, s, n, _, t, total in spend_totals(ledger, (by,), lo, hi, order_limit=limit)]
    out = [
        {
            "rank": i,
            "key": k or ("standard" if by == "service_tier" else UNATTRIBUTED),  # batch, flex, priority or standard
            "spend": int(s),
            "share": ratio(int(s), int(total)),
            "requests": int(n),
            "cost_per_request": int(s) // int(n) if n else None,
            "tokens": int(t),
        }
        for i, (k, s, n, t, total) in enumerate(rows, start=1)
    ]
    return Report(
        "top",
        f"Top {by} by spend, {start.isoformat()} to {end.isoformat()}",
        TOP_COLUMNS,
        out,
        params={"by": by, "from": start, "to": end, "limit": limit, "timezone": ledger.tz},
    )


MIX_COLUMNS = [
    Column("provider", "Provider"),
    Column("model", "Model"),
    Column("tier", "Tier"),
    Column("requests", "Requests", "int"),
    Column("request_share", "Of requests", "pct"),
    Column("spend", "Spend", "usd"),
    Column("spend_share", "Of spend", "pct"),
]


def model_mix(ledger: Ledger, start: date, end: date) -> Report:
    lo, hi = local_midnight(start, ledger.tz), local_midnight(end + timedelta(days=1), ledger.tz)
    rows = ledger.rows(
        f"SELECT provider, {_MODEL} AS m, {SERVED} AS n, sum({_COST}) AS s "
        f"FROM {{db}}.usage_ledger FINAL WHERE {_RANGE} GROUP BY provider, m ORDER BY s DESC, n DESC, m",
        start=_ts(lo),
        end=_ts(hi),
    )
    requests, spend = sum(int(r[2]) for r in rows), sum(int(r[3]) for r in rows)
    out = [
        {
            "provider": p,
            "model": m,
            "tier": "premium" if is_premium(m) else "standard",
            "requests": int(n),
            "request_share": ratio(int(n), requests),
            "spend": int(s),
            "spend_share": ratio(int(s), spend),
        }
        for p, m, n, s in rows
    ]
    return Report(
        "mix",
        f"Model mix, {start.isoformat()} to {end.isoformat()}",
        MIX_COLUMNS,
        out,
        params={"from": start, "to": end, "timezone": ledger.tz},
    )


LATENCY_COLUMNS = [
    Column("provider", "Provider"),
    Column("model", "Model"),
    Column("requests", "Requests", "int"),
    Column("error_rate", "Error rate", "pct"),
    Column("timed", "Timed", "int"),
    Column("p50", "p50", "ms"),
    Column("p95", "p95", "ms"),
    Column("p99", "p99", "ms"),
]


def latency(ledger: Ledger, start: date, end: date) -> Report:
    """Latency quantiles and error rate per provider and model; blocked calls never left, so excluded.

    Quantiles are exact (``quantilesExact``: the element at floor(q * n) of the sorted latencies) over the calls
    that carry a latency (``timed``): an event reported without one stores 0 (the schema's default), and a cache
    hit never reached the provider; counted as 0 ms, eleven untimed events of seventeen made a model's p50 0 ms.
    """
    lo, hi = local_midnight(start, ledger.tz), local_midnight(end + timedelta(days=1), ledger.tz)
    timed = "latency_ms > 0 AND NOT cache_hit"
    rows = ledger.rows(
        f"SELECT provider, {_MODEL} AS m, count() AS n, countIf(status = 'error'), countIf({timed}), "
        f"quantilesExactIf(0.5, 0.95, 0.99)(latency_ms, {timed}) FROM {{db}}.usage_ledger FINAL "
        f"WHERE {_RANGE} AND status != 'blocked' GROUP BY provider, m ORDER BY provider, m",
        start=_ts(lo),
        end=_ts(hi),
    )
    out = [
        {
            "provider": p,
            "model": m,
            "requests": int(n),
            "error_rate": ratio(int(e), int(n)),
            "timed": int(t),
            "p50": int(q[0]) if t else None,
            "p95": int(q[1]) if t else None,
            "p99": int(q[2]) if t else None,
        }
        for p, m, n, e, t, q in rows
    ]
    return Report(
        "latency",
        f"Latency and errors by model, {start.isoformat()} to {end.isoformat()}",
        LATENCY_COLUMNS,
        out,
        params={"from": start, "to": end, "timezone": ledger.tz},
    )


# -- routing and cache savings ------------------------------------------------------------------

SAVINGS_COLUMNS = [
    Column("team", "Team"),
    Column("requests", "Requests", "int"),
    Column("rerouted", "Rerouted", "int"),
    Column("cache_hit_rate", "Cache hit rate", "pct"),
    Column("requested", "Cost as requested", "usd"),
    Column("routed", "Cost as routed", "usd"),
    Column("savings", "Saved", "usd"),
    Column("savings_share", "Saved share", "pct"),
    Column("routing_savings", "By routing", "usd"),
    Column("cache_savings", "By cache", "usd"),
]

# Per event, what it would have cost on the requested model without the cache (the same expression as the
# routing_savings_monthly view, schemas/clickhouse/0006_routing_savings.sql, which explains it).
_REQUESTED_COST = (
    "if(status = 'ok' AND mapContains(tags, 'requested_cost_nanos'), toInt64OrZero(tags['requested_cost_nanos']), "
    "ifNull(cost_nanos, 0) + if(cache_hit, toInt64OrZero(tags['saved_nanos']), 0))"
)


class SavingsTotals(NamedTuple):
    requests: int
    rerouted: int
    cache_hits: int
    routed: int
    requested: int
    cache_savings: int


def savings_rows(by_team: dict[str, SavingsTotals]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per team (largest saving first) and in total: savings = requested - routed = routing + cache savings."""

    def row(team: str, t: SavingsTotals) -> dict[str, Any]:
        saved = t.requested - t.routed
        return {
            "team": team,
            "requests": t.requests,
            "rerouted": t.rerouted,
            "cache_hit_rate": ratio(t.cache_hits, t.requests),
            "requested": t.requested,
            "routed": t.routed,
            "savings": saved,
            "savings_share": ratio(saved, t.requested),
            "routing_savings": saved - t.cache_savings,
            "cache_savings": t.cache_savings,
        }

    rows = [row(team or UNATTRIBUTED, t) for team, t in by_team.items()]
    rows.sort(key=lambda r: (-r["savings"], r["team"]))
    total = SavingsTotals(*(sum(t[i] for t in by_team.values()) for i in range(len(SavingsTotals._fields))))
    return rows, row("TOTAL", total)


def feature_users(ledger: Ledger, feature: str, start: datetime, end: datetime) -> dict[str, tuple[int, int]]:
    """``{team: (served requests, spend)}`` under ``feature`` in [start, end): whom a $0 hold on it would stop."""
    rows = ledger.rows(
        f"SELECT team, {SERVED}, sum({_COST}) FROM {{db}}.usage_ledger FINAL "
        f"WHERE feature = {{feature:String}} AND {_RANGE} GROUP BY team HAVING {SERVED} > 0",
        feature=feature,
        start=_ts(start),
        end=_ts(end),
    )
    return {team: (int(requests), int(spend)) for team, requests, spend in rows}


def savings(ledger: Ledger, month: date) -> Report:
    """What cost-aware routing and the response cache saved per team in ``month`` (budget timezone)."""
    start, end = month_bounds(month, ledger.tz)
    rows = ledger.rows(
        f"SELECT team, {SERVED}, countIf(mapContains(tags, 'requested_model')), countIf(cache_hit), "
        f"sum({_COST}), sum(toInt128({_REQUESTED_COST})), "
        f"sumIf(toInt128(toInt64OrZero(tags['saved_nanos'])), cache_hit) "
        f"FROM {{db}}.usage_ledger FINAL WHERE {_RANGE} GROUP BY team",
        start=_ts(start),
        end=_ts(end),
    )
    out, totals = savings_rows({team: SavingsTotals(*(int(v) for v in values)) for team, *values in rows})
    return Report(
        "savings",
        f"Routing and cache savings {first_of_month(month):%B %Y}",
        SAVINGS_COLUMNS,
        out,
        totals,
        params={"month": first_of_month(month), "timezone": ledger.tz},
        notes=[
            "cost as requested: every request on the model its client asked for, uncached, except those a budget's "
            "fallback served from another model (enforcement, not routing: counted at what they cost); "
            "saved = as requested - as routed = by routing + by cache"
        ],
    )


# -- dashboard feeds ----------------------------------------------------------------------------


def spend_trend(ledger: Ledger, start: date, end: date) -> dict[str, dict[date, int]]:
    """Spend per UTC day per team from the ``spend_daily`` rollup (fast; see 0004 for exactness)."""
    rows = ledger.rows(
        "SELECT day, team, sum(cost_nanos) FROM {db}.spend_daily WHERE day BETWEEN {lo:Date} AND {hi:Date} "
        "GROUP BY day, team ORDER BY day",
        lo=start,
        hi=end,
    )
    trend: dict[str, dict[date, int]] = defaultdict(dict)
    for day, team, spend in rows:
        trend[team or UNATTRIBUTED][day] = int(spend)
    return dict(trend)


def active_decisions(ledger: Ledger, now: datetime) -> list[dict[str, Any]]:
    """The newest decision per scope, where it restricts anything and has not expired."""
    rows = ledger.rows(
        "SELECT scope, toString(action), reason, spend_nanos, limit_nanos, period, version, issued_at, "
        "expires_at, policy_version FROM (SELECT * FROM {db}.decisions FINAL ORDER BY version DESC "
        "LIMIT 1 BY scope) WHERE action != 'allow' AND (expires_at IS NULL OR expires_at > {now:DateTime64(6, 'UTC')}) "
        "ORDER BY action DESC, scope",
        now=_ts(now),
    )
    keys = ("scope", "action", "reason", "spend", "limit", "period", "version", "issued_at", "expires_at", "policy")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def recent_alerts(ledger: Ledger, limit: int = 20) -> list[dict[str, Any]]:
    rows = ledger.rows(
        "SELECT occurred_at, scope, toString(kind), toString(severity), message, spend_nanos, limit_nanos, "
        "policy_version FROM {db}.alerts FINAL ORDER BY occurred_at DESC, alert_id LIMIT {limit:UInt32}",
        limit=limit,
    )
    keys = ("occurred_at", "scope", "kind", "severity", "message", "spend", "limit", "policy")
    return [dict(zip(keys, row, strict=True)) for row in rows]

"""Every named report, in one registry: ``spendstream report KIND`` and ``GET /v1/reports/{kind}`` both read it.

Adding a report is one function in ``reports.py`` and one ``ReportSpec`` here: the CLI's choices, the API's
route and its 404 list follow. ``build_report`` also range-checks the parameters both front ends pass, so a
day the ledger cannot answer for is refused with the parameter's name, whichever way it came.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from spendstream.analytics import reports
from spendstream.analytics.money import local_date
from spendstream.analytics.report_model import Report
from spendstream.core.config import Settings

# The days a report may name: wide enough for any real ledger, narrow enough that every period
# around them (weeks back, the next month) stays inside Python's dates and ClickHouse's DateTime64.
FIRST_REPORT_DAY = date(1970, 1, 1)
LAST_REPORT_DAY = date(2199, 12, 31)
MAX_REPORT_COUNT = 1000  # rows of top
# weeks of the weekly report: two years. Each month it spans reads its budgets in force, so 1,000 weeks took 75 s and
# held the ledger (one viewer stalled every report, export and feature registration behind it)
MAX_REPORT_WEEKS = 104


class ReportRangeError(ValueError):
    """A report parameter outside the range the ledger can answer for; names the parameter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def report_day_problem(day: date, monthly: bool = False) -> str | None:
    """Why ``day`` cannot be a report parameter, or None."""
    if FIRST_REPORT_DAY <= day <= LAST_REPORT_DAY:
        return None
    if monthly:
        return f"must be between {FIRST_REPORT_DAY:%Y-%m} and {LAST_REPORT_DAY:%Y-%m}, got {day.isoformat()[:7]}"
    return f"must be between {FIRST_REPORT_DAY} and {LAST_REPORT_DAY}, got {day}"


@dataclass(frozen=True)
class ReportRequest:
    """What a report may be asked for, with the defaults filled in (the CLI flags or the API's query)."""

    ledger: reports.Ledger
    options: Mapping[str, Any]
    today: date  # in the budget timezone
    now: datetime

    @property
    def month(self) -> date:
        return self.options.get("month") or self.today

    @property
    def start(self) -> date:
        return self.options.get("start") or self.today.replace(day=1)

    @property
    def end(self) -> date:
        return self.options.get("end") or self.today


@dataclass(frozen=True)
class ReportSpec:
    name: str
    build: Callable[[ReportRequest], Report]
    takes: frozenset[str] = frozenset()  # the options it reads; any other one given is refused, not ignored
    period: str = ""  # what it reports on when it takes no date, said when such an option is refused


def _weekly(r: ReportRequest) -> Report:
    return reports.weekly(r.ledger, r.options.get("as_of") or r.today, r.options.get("weeks") or 4, r.now)


def _top(r: ReportRequest) -> Report:
    return reports.top(r.ledger, r.options.get("by") or "feature", r.start, r.end, r.options.get("limit") or 10)


REPORTS: dict[str, ReportSpec] = {
    spec.name: spec
    for spec in (
        ReportSpec("weekly", _weekly, frozenset({"as_of", "weeks"})),
        ReportSpec("chargeback", lambda r: reports.chargeback(r.ledger, r.month, r.now), frozenset({"month"})),
        ReportSpec(
            "forecast", lambda r: reports.forecast(r.ledger, r.now), period="it forecasts the current month from now"
        ),
        ReportSpec("top", _top, frozenset({"start", "end", "by", "limit"})),
        ReportSpec("mix", lambda r: reports.model_mix(r.ledger, r.start, r.end), frozenset({"start", "end"})),
        ReportSpec("latency", lambda r: reports.latency(r.ledger, r.start, r.end), frozenset({"start", "end"})),
        ReportSpec("savings", lambda r: reports.savings(r.ledger, r.month), frozenset({"month"})),
    )
}


RANGE_REPORTS = frozenset({"top", "mix", "latency"})  # the reports over a from..to range of days
# The options' names as the CLI and the API spell them.
OPTION_NAMES = {
    "month": "month (--month)",
    "as_of": "as_of (--as-of)",
    "start": "from (--from)",
    "end": "to (--to)",
    "weeks": "weeks (--weeks)",
    "limit": "limit (--limit)",
    "by": "by (--by)",
}


def check_report_options(options: Mapping[str, Any]) -> None:
    """Refuse a day or count outside what the ledger can answer for, naming the parameter."""
    for key in ("month", "as_of", "start", "end"):
        day = options.get(key)
        problem = day and report_day_problem(day, monthly=key == "month")
        if problem:
            raise ReportRangeError(key, f"{key} {problem}")
    for key, most in (("weeks", MAX_REPORT_WEEKS), ("limit", MAX_REPORT_COUNT)):
        count = options.get(key)
        if count is not None and not 0 < count <= most:
            raise ReportRangeError(key, f"{key} must be between 1 and {most}, got {count}")


def build_report(
    kind: str, client: Any, settings: Settings, options: Mapping[str, Any], now: datetime, *, timezone: str
) -> Report:
    """One report by name; ``options`` are the CLI flags or the API's query parameters. ``timezone`` is the policy
    in force's (``report_timezone``): every front end cuts periods where budgets are cut."""
    check_report_options(options)
    spec = REPORTS.get(kind)
    if spec is None:
        raise ValueError(f"unknown report {kind!r}; expected one of {', '.join(REPORTS)}")
    unread = sorted(key for key, value in options.items() if value is not None and key not in spec.takes)
    if unread:
        takes = ", ".join(OPTION_NAMES[key] for key in sorted(spec.takes)) or "no option"
        why = f" ({spec.period})" if spec.period else ""
        raise ReportRangeError(
            unread[0],
            f"the {kind} report does not take {OPTION_NAMES.get(unread[0], unread[0])}{why}; it takes {takes}",
        )
    ledger = reports.Ledger(client, settings.clickhouse_database, timezone)
    request = ReportRequest(ledger, options, local_date(now, timezone), now)
    if kind in RANGE_REPORTS and request.start > request.end:  # with defaults: a `from` after today, alone
        raise ReportRangeError("to", f"the range ends before it starts: from {request.start} to {request.end}")
    return spec.build(request)

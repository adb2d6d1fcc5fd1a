"""Scheduled reports as notifications: the CFO weekly report and the monthly chargeback, computed from the ledger
with the report functions every other reader uses (exact, ``FINAL``), summarised for chat and attached as CSV."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from typing import Any

from spendstream.analytics import reports
from spendstream.analytics.money import fmt_pct
from spendstream.analytics.report_model import Report, render_csv
from spendstream.core.money_text import exact_usd_text, usd_text
from spendstream.core.notification_policy import ReportSchedule
from spendstream.notifier.messages import Message, report_message


def weekly_summary(report: Report) -> list[str]:
    """The CFO's headline figures of the newest week in the report."""
    if not report.rows:
        return ["No spend recorded."]
    row = report.rows[0]
    lines = [
        f"Spend: {exact_usd_text(row['spend'])} (previous week {exact_usd_text(row['previous'])}, "
        f"change {fmt_pct(row['change'])})",
        # (the week's share of monthly budgets, floored per day: an allocation, shown to the cent; the CSV is exact)
        f"Budget (pro rata): {usd_text(row['budget'])}, used {fmt_pct(row['budget_used'])}",
    ]
    if row["top_feature"] is not None:
        lines.append(f"Top feature: {row['top_feature']} ({exact_usd_text(row['top_feature_spend'])})")
    lines.append(
        f"Cache hit rate: {fmt_pct(row['cache_hit_rate'])}; premium-model share: {fmt_pct(row['premium_share'])}"
    )
    return lines


def chargeback_summary(report: Report) -> list[str]:
    """One line per department and the total: actual against budget, and what is charged back."""
    lines = [
        f"{row['department']}: {exact_usd_text(row['actual'])} of {exact_usd_text(row['budget'])} "
        f"(variance {exact_usd_text(row['variance'])}), charged back {exact_usd_text(row['chargeback'])}"
        for row in report.rows
    ]
    totals: dict[str, Any] = report.totals or {}
    if totals:
        lines.append(f"Total: {exact_usd_text(totals['actual'])} of {exact_usd_text(totals['budget'])}, "
                     f"charged back {exact_usd_text(totals['chargeback'])}")  # fmt: skip
    return lines or ["No spend recorded."]


def build_scheduled_report(
    client: Any, db: str, tz: str, schedule: ReportSchedule, period: date, now: datetime
) -> Report:
    ledger = reports.Ledger(client, db, tz)
    if schedule.report == "weekly":
        return reports.weekly(ledger, period, weeks=4, now=now)
    return reports.chargeback(ledger, period, now)


def scheduled_report_message(
    client: Any, db: str, tz: str, schedule: ReportSchedule, period: date, source_id: str,
    dashboard_url: str | None, now: datetime,
) -> Message:  # fmt: skip
    report = build_scheduled_report(client, db, tz, schedule, period, now)
    summary: Iterable[str]
    if schedule.report == "weekly":
        summary, name = weekly_summary(report), f"cfo-weekly-{period.isoformat()}.csv"
        command = f"spendstream report weekly --as-of {period.isoformat()}"
    else:
        summary, name = chargeback_summary(report), f"chargeback-{period:%Y-%m}.csv"
        command = f"spendstream report chargeback --month {period:%Y-%m}"
    return report_message(source_id, report.title, summary, name, render_csv(report), dashboard_url, now, command)

"""Reports show the budget the processor enforces: the policy's amount plus the approved increases in force.

Every step of every request goes through the real audit sink (broker -> ``budget_events``), the policy's budgets
through ``load_budgets``, and the reports are built by the registry ``spendstream report`` and
``GET /v1/reports/{kind}`` both use.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka import Producer

from spendstream.analytics.budgets import load_budgets, monthly_increase, policy_budget_lines
from spendstream.analytics.report_model import render
from spendstream.analytics.report_registry import build_report
from spendstream.core import topics
from spendstream.core.budget_lifecycle import BudgetRequest, Kind, decide, expire, new_request
from spendstream.core.config import Settings
from spendstream.core.ledger_store import connect, migrate
from spendstream.core.policy import parse_policy
from spendstream.sink.audit_sink import AuditSink

B = 1_000_000_000  # nano-USD per USD
NOW = datetime(2026, 3, 16, 12, 0, tzinfo=UTC)  # a Monday in March 2026 (31 days)
POLICY = parse_policy("""
name: finance-reports
budgets:
  - {scope: "team:finance", period: month, amount_usd: 1000}
  - {scope: "team:ops", period: month, amount_usd: 1000}
approvals:
  levels:
    - {name: vp, max_usd: 100000}
""")
ASKED_AT = datetime(2026, 1, 20, tzinfo=UTC)


def utc(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=UTC)


def asked(scope: str, usd: int, starts: str, expires: str | None, period: str = "month") -> BudgetRequest:
    return new_request(
        Kind.increase, scope, period, usd * B, utc(starts), utc(expires) if expires else None, "alice", "launch",
        ASKED_AT,
    )  # fmt: skip


def approved(request: BudgetRequest) -> list[BudgetRequest]:
    return [request, decide(request, True, "vera", "vp", "agreed", POLICY.approval_rules, ASKED_AT)]


STEPS = [
    *approved(asked("team:finance", 500, "2026-03-01", "2026-04-01")),
    *approved(asked("team:finance", 200, "2026-02-01", "2026-03-01")),  # in force at February's last instant only
    *approved(asked("team:ops", 100, "2026-03-01", None)),  # standing, from March
    *approved(asked("team:ops", 50, "2026-02-01", "2026-02-15")),  # ended mid-February
]
PENDING = asked("team:ops", 300, "2026-03-01", "2026-04-01")
DENIED = decide(
    asked("team:ops", 300, "2026-03-01", "2026-04-01"), False, "vera", "vp", "not now", POLICY.approval_rules, ASKED_AT
)
ENDED = approved(asked("team:ops", 300, "2026-03-01", "2026-03-10"))
OPS_NOTHING = [  # none of these changes the ops budget in March
    PENDING,
    DENIED,
    *ENDED,
    expire(ENDED[-1]),  # the processor's audit entry of its end
    *approved(asked("team:ops", 300, "2026-03-01", "2026-04-01", period="day")),  # the policy has no daily ops budget
    *approved(asked("team:nobudget", 300, "2026-03-01", "2026-04-01")),  # the policy does not budget this team
    *approved(asked("team:ops", 300, "2026-04-01", "2026-05-01")),  # starts next month
]
LEDGER_COLUMNS = ["event_id", "occurred_at", "org", "team", "provider", "model_requested", "cost_nanos", "status"]


@pytest.fixture
def ledger(settings: Settings) -> Iterator[tuple[Any, Settings]]:
    """A ledger whose ``budget_events`` the audit sink wrote from the topic, with both months' policy budgets."""
    producer = Producer(settings.kafka_client_config())
    for step in [*STEPS, *OPS_NOTHING]:
        producer.produce(topics.BUDGET_ADJUSTMENTS, step.to_json(), key=step.id.encode())
    assert producer.flush(10) == 0
    client = connect(settings)
    try:
        migrate(client, settings)
        sink = AuditSink(settings, client)
        for _ in range(60):
            sink.run_once(timeout=0.5)
            if sink.counts["budget_events"] == len(STEPS) + len(OPS_NOTHING):
                break
        sink.close()
        assert sink.counts["budget_events"] == len(STEPS) + len(OPS_NOTHING)
        for month in (date(2026, 2, 1), date(2026, 3, 1)):
            load_budgets(client, settings.clickhouse_database, policy_budget_lines(POLICY), month, POLICY.version)
        client.insert(
            f"{settings.clickhouse_database}.usage_ledger",
            [[uuid.uuid4(), utc("2026-03-10 09:00"), "acme", "finance", "openai", "gpt-4o", 1200 * B, "ok"]],
            column_names=LEDGER_COLUMNS,
        )
        yield client, settings
    finally:
        client.close()


def rows_by(report: Any, key: str) -> dict[str, dict[str, Any]]:
    return {row[key]: row for row in report.rows}


def test_chargeback_budget_includes_the_approved_increase_in_force_and_shows_it(ledger: tuple[Any, Settings]) -> None:
    client, settings = ledger
    report = build_report("chargeback", client, settings, {"month": date(2026, 3, 1)}, NOW, timezone="UTC")
    rows = rows_by(report, "department")
    assert rows["finance"]["budget"] == 1500 * B  # the limit the processor enforces
    assert {k: rows["finance"][k] for k in ("budget", "policy_budget", "increase", "actual", "variance")} == {
        "budget": 1500 * B, "policy_budget": 1000 * B, "increase": 500 * B, "actual": 1200 * B, "variance": 300 * B,
    }  # fmt: skip
    assert str(rows["finance"]["utilisation"]) == "0.8000"
    assert report.totals is not None
    assert (report.totals["budget"], report.totals["policy_budget"], report.totals["increase"]) == (
        2600 * B, 2000 * B, 600 * B,
    )  # fmt: skip
    table = render(report, "table")
    assert "Policy budget" in table and "Approved increases" in table and "$1,500.00" in table
    assert "approved increases in force now (2026-03-16 12:00:00 UTC)" in table
    doc = render(report, "json")
    assert '"increase_usd": "500.000000000"' in doc and '"budget_nanos": 1500000000000' in doc


def test_denied_pending_expired_and_other_budgets_requests_change_nothing(ledger: tuple[Any, Settings]) -> None:
    """Ops has one approved increase in force (+$100); every other request on it or beside it adds nothing."""
    client, settings = ledger
    rows = rows_by(
        build_report("chargeback", client, settings, {"month": date(2026, 3, 1)}, NOW, timezone="UTC"), "department"
    )
    ops = rows["ops"]
    assert ops["budget"] == 1100 * B
    assert (ops["budget"], ops["policy_budget"], ops["increase"]) == (1100 * B, 1000 * B, 100 * B)
    assert "nobudget" not in rows
    assert (PENDING.status, DENIED.status) == ("pending", "denied")


def test_a_past_month_shows_the_limits_in_force_at_its_last_instant(ledger: tuple[Any, Settings]) -> None:
    """February: finance's increase ran to the end of the month (+$200); ops' ended on the 15th (not shown)."""
    client, settings = ledger
    report = build_report("chargeback", client, settings, {"month": date(2026, 2, 1)}, NOW, timezone="UTC")
    rows = rows_by(report, "department")
    assert rows["finance"]["budget"] == 1200 * B
    assert (rows["finance"]["budget"], rows["finance"]["increase"]) == (1200 * B, 200 * B)
    assert (rows["ops"]["budget"], rows["ops"]["increase"]) == (1000 * B, 0)
    assert report.params["budgets_at"] == datetime(2026, 2, 28, 23, 59, 59, 999_999, tzinfo=UTC)
    assert any("in force at the end of the month" in note for note in report.notes)


def test_weekly_budget_share_includes_the_approved_increases(ledger: tuple[Any, Settings]) -> None:
    client, settings = ledger
    report = build_report("weekly", client, settings, {"as_of": date(2026, 3, 16), "weeks": 1}, NOW, timezone="UTC")
    (week,) = report.rows
    assert week["budget"] == 7 * (2600 * B // 31)  # (1000 + 500) + (1000 + 100), a week's share of March
    assert week["budget_increase"] == 7 * (600 * B // 31)


def test_forecast_compares_with_the_raised_budget(ledger: tuple[Any, Settings]) -> None:
    client, settings = ledger
    report = build_report("forecast", client, settings, {}, NOW, timezone="UTC")
    finance = rows_by(report, "team")["finance"]
    assert finance["budget"] == 1500 * B
    assert (finance["budget"], finance["policy_budget"], finance["increase"]) == (1500 * B, 1000 * B, 500 * B)
    assert finance["over_by"] == finance["forecast"] - 1500 * B
    # $300 left at $1,200 a week: 1.75 days after now, not "already exhausted" against the policy's $1,000.
    assert finance["exhausted_on"] == date(2026, 3, 18) == (NOW + timedelta(days=1.75)).date()


def test_an_increase_of_a_day_or_week_budget_counts_for_the_days_it_covers_not_as_a_monthly_equivalent() -> None:
    """A one-day $10 overage of a $100-a-day budget adds $10 to March, not 31 x $10 (the reports showed $310 of
    increases for $10 approved); a one-week $70 increase of a week budget adds $10 for each of its days in March."""
    at = utc("2026-03-10T12:00:00")
    one_day = approved(asked("team:ops", 10, "2026-03-10", "2026-03-11", period="day"))[1]
    assert monthly_increase(("team:ops", "day", 100 * B), [one_day], date(2026, 3, 1), at) == 10 * B
    one_week = approved(asked("team:ops", 70, "2026-03-09", "2026-03-16", period="week"))[1]
    assert monthly_increase(("team:ops", "week", 700 * B), [one_week], date(2026, 3, 1), at) == 70 * B
    across = approved(asked("team:ops", 70, "2026-03-28", "2026-04-04", period="week"))[1]  # 4 of its days in March
    assert monthly_increase(("team:ops", "week", 700 * B), [across], date(2026, 3, 1), utc("2026-03-29")) == 40 * B
    standing = approved(asked("team:ops", 5, "2026-03-21", None, period="day"))[1]  # to the month's end: 11 days
    assert monthly_increase(("team:ops", "day", 100 * B), [standing], date(2026, 3, 1), utc("2026-03-22")) == 55 * B
    assert monthly_increase(("team:ops", "day", 100 * B), [one_day], date(2026, 3, 1), utc("2026-03-12")) == 0
    month = approved(asked("team:finance", 500, "2026-03-01", "2026-04-01"))[1]
    assert monthly_increase(("team:finance", "month", 1000 * B), [month], date(2026, 3, 1), at) == 500 * B

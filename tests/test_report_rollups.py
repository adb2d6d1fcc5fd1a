"""Reports from sealed rollups equal the ledger read with FINAL, to the nano-dollar, through replays, late
events and corrections that arrive after a seal."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from spendstream.analytics import reports
from spendstream.analytics.rollup import DAY, HOUR, seal, valid_seals

DB = "spendstream"
COLUMNS = [
    "event_id",
    "occurred_at",
    "team",
    "feature",
    "user",
    "provider",
    "model_requested",
    "cost_nanos",
    "cache_hit",
    "status",
]
NOW = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
TEAMS = ("search", "ads", "")
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet-20241022")


def events(count: int, start: datetime, spacing: timedelta, salt: int = 0) -> list[list[Any]]:
    return [
        [
            uuid.uuid4(),
            start + i * spacing,
            TEAMS[(i + salt) % 3],
            f"f{(i + salt) % 4}",
            f"u{(i * 7 + salt) % 11}",
            "openai",
            MODELS[i % 3],
            0 if i % 7 == 3 else 1_000_000_007 * (i % 5 + 1) + salt,
            i % 4 == 0,
            "blocked" if i % 7 == 3 else "ok",  # refused calls are no requests, sealed or not
        ]
        for i in range(count)
    ]


def insert(ledger: Any, rows: list[list[Any]]) -> None:
    ledger.insert(f"{DB}.usage_ledger", rows, column_names=COLUMNS)


def every_report(ledger: reports.Ledger) -> list[Any]:
    today = NOW.date()
    found = [
        reports.chargeback(ledger, today),
        reports.chargeback(ledger, today.replace(day=1) - timedelta(days=1)),
        reports.weekly(ledger, today, 4),
        reports.forecast(ledger, NOW),
        reports.forecast(ledger, NOW - timedelta(days=3, minutes=17)),
    ]
    for by in ("team", "user", "model", "feature"):
        found.append(reports.top(ledger, by, today - timedelta(days=12), today, 5))
    return [(report.rows, report.totals) for report in found]


def team_spend_final(ledger: reports.Ledger, start: datetime, end: datetime) -> dict[str, int]:
    """The plain FINAL query, written out: what the fast path must reproduce."""
    rows = ledger.client.query(
        f"SELECT team, sum(toInt128(ifNull(cost_nanos, 0))) FROM {DB}.usage_ledger FINAL "
        "WHERE occurred_at >= {a:DateTime64(6, 'UTC')} AND occurred_at < {b:DateTime64(6, 'UTC')} GROUP BY team",
        parameters={"a": start.replace(tzinfo=None), "b": end.replace(tzinfo=None)},
    ).result_rows
    return {team: int(cost) for team, cost in rows}


@pytest.mark.parametrize("tz", ["UTC", "Asia/Kathmandu"])  # Kathmandu: local midnight at :15 past a UTC hour
def test_sealed_reports_equal_final_through_replays_late_events_and_corrections(ledger: Any, tz: str) -> None:
    fast = reports.Ledger(ledger, DB, tz)
    reference = replace(fast, sealed=False)
    history = events(400, NOW - timedelta(days=12), timedelta(minutes=43))
    insert(ledger, history)
    insert(ledger, history[:50])  # replayed copies before the seal
    assert seal(ledger, DB, NOW) > 0
    assert every_report(fast) == every_report(reference)

    late = events(20, NOW - timedelta(days=9, minutes=3), timedelta(hours=5), salt=1)
    insert(ledger, late)  # new events in sealed hours
    insert(ledger, history[100:160])  # replayed copies of sealed events
    corrected = [[*row[:7], row[7] + 999, *row[8:]] for row in history[300:310]]
    insert(ledger, corrected)  # a correction: the last version of an event is the one FINAL keeps

    assert every_report(fast) == every_report(reference)
    start, end = NOW - timedelta(days=12), NOW + timedelta(hours=1)
    charged = {team: spend for team, spend, *_ in reports.spend_totals(fast, ("team",), start, end)}
    assert charged == team_spend_final(fast, start, end)
    late_hour = late[0][1].replace(minute=0, second=0, microsecond=0)
    assert late_hour not in valid_seals(ledger, DB, HOUR, start, end)  # touched after its seal: read with FINAL

    assert seal(ledger, DB, NOW) > 0  # sealing again brings the touched buckets back
    assert late_hour in valid_seals(ledger, DB, HOUR, start, end)
    assert every_report(fast) == every_report(reference)
    assert charged == team_spend_final(fast, start, end)


def test_a_seal_is_only_used_while_nothing_touched_its_bucket(ledger: Any) -> None:
    day = (NOW - timedelta(days=5)).replace(hour=0, minute=30)
    insert(ledger, events(24, day, timedelta(hours=1)))
    seal(ledger, DB, NOW)
    midnight = day.replace(minute=0)
    days = valid_seals(ledger, DB, DAY, midnight, midnight + timedelta(days=1))
    hours = valid_seals(ledger, DB, HOUR, midnight, midnight + timedelta(days=1))
    assert list(days) == [midnight] and len(hours) == 24
    insert(ledger, events(1, day + timedelta(hours=7), timedelta(0), salt=2))
    assert valid_seals(ledger, DB, DAY, midnight, midnight + timedelta(days=1)) == {}
    assert midnight + timedelta(hours=7) not in valid_seals(ledger, DB, HOUR, midnight, midnight + timedelta(days=1))


def test_plan_reads_cut_and_unsealed_buckets_from_the_ledger() -> None:
    hour = timedelta(hours=1)
    base = datetime(2026, 3, 1, tzinfo=UTC)
    seals = {base + i * hour: 100 + i for i in range(6)}
    start, end = base + timedelta(minutes=20), base + 5 * hour + timedelta(minutes=10)
    cut = base + 3 * hour + timedelta(minutes=30)  # a local midnight inside hour 3 (a UTC+5:30 zone)

    got = reports.plan(start, end, HOUR, {k: v for k, v in seals.items() if k != base + 2 * hour}, [cut])

    assert got.sealed == [(base + hour, 101), (base + 4 * hour, 104)]
    assert got.raw == [(start, base + hour), (base + 2 * hour, base + 4 * hour), (base + 5 * hour, end)]

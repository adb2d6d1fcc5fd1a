"""Windows rebuilt from the ledger equal the windows the stream computes, to the nano-dollar (real chDB)."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from spendstream.core.events import DETAIL_FIELDS
from spendstream.core.ledger_spend import SpendQuery, grains, query_spend
from spendstream.core.policy import parse_policy
from spendstream.processor.ledger_rebuild import RebuildPlan, fold_snapshot, usage_partition
from spendstream.processor.scopes import scopes_for
from spendstream.processor.spend_accounting import Retention, WindowCalendar, dedup_id, owner_prefix, split_window_key
from spendstream.sink.decode import LEDGER_COLUMNS
from test_periods import year_period  # noqa: F401  (the fixture that registers a period, used by name)

POLICY = parse_policy(
    """
name: default
timezone: America/New_York
org: acme
divisions: {eng: [web, api], sales: [crm]}
projects: {checkout: web}
budgets:
  - {scope: "team:web", period: month, amount_usd: 10}
spike_rules:
  - {name: d, kind: daily, scope: "project:*", factor: 3, window_days: 5, min_history_days: 2}
"""
)
PARTITIONS = 6
LATENESS_S = 86_400
SKEW_S = 300


def ledger_rows(now: datetime, count: int) -> list[dict[str, Any]]:
    rng = random.Random(3)
    rows = []
    for _ in range(count):
        team = rng.choice(["web", "api", "crm", ""])
        rows.append(
            {
                "event_id": uuid.uuid4(),
                "occurred_at": now - timedelta(seconds=rng.randrange(120 * 86_400)),
                "org": rng.choice(["acme", ""]),
                "division": "",
                "team": team,
                "project": rng.choice(["checkout", ""]) if team in ("web", "") else "",
                "feature": rng.choice(["chat", "search", ""]),
                "user": f"u{rng.randrange(9)}",
                "customer": rng.choice(["c1", ""]),
                "environment": "prod",
                "tags": {},
                "provider": "openai",
                "model_requested": "gpt-4o",
                "model_served": rng.choice(["gpt-4o-mini", ""]),
                "input_tokens": rng.randrange(1000),
                "output_tokens": rng.randrange(100),
                "cached_input_tokens": 0,
                "cache_write_tokens": 0,
                "cost_nanos": rng.choice([rng.randrange(1, 9 * 10**12), None]),  # (0 when blocked: below)
                "price_source": "x",
                "latency_ms": 1,
                "status": rng.choice(["ok", "ok", "error", "blocked"]),
                "decision_applied": "",
                "cache_hit": False,
                **dict.fromkeys(DETAIL_FIELDS, 0),
                "service_tier": "",
            }
        )
        if rows[-1]["status"] == "blocked" and rows[-1]["cost_nanos"]:
            rows[-1]["cost_nanos"] = 0  # a refused call costs nothing
        # when its message reached the broker: some later than the allowed lateness, some with an occurred_at further
        # ahead of it than the skew (a producer's clock or timestamp set back): recorded in the ledger, counted in no
        # budget by the stream; others exactly at either bound (counted)
        delay = rng.choice(
            [timedelta(seconds=2)] * 8
            + [timedelta(seconds=LATENESS_S + 1), timedelta(seconds=LATENESS_S)]
            + [timedelta(seconds=-SKEW_S - 1), timedelta(seconds=-SKEW_S)]
        )
        rows[-1]["arrived_at"] = rows[-1]["occurred_at"] + delay
    return rows


def counted_by_the_stream(row: dict[str, Any]) -> bool:
    """Priced, arrived within the allowed lateness, not further ahead of its arrival than the skew (stage 1
    dead-letters the rest)."""
    delay = row["arrived_at"] - row["occurred_at"]
    return row["cost_nanos"] is not None and timedelta(seconds=-SKEW_S) <= delay <= timedelta(seconds=LATENESS_S)


def test_rebuilt_windows_equal_the_stream_fold_of_the_same_events(ledger: Any, offline_settings: Any) -> None:
    periods = _rebuild_equals_fold(ledger, offline_settings)
    assert periods == {"hour", "day", "week", "month", "quarter"}


def test_a_registered_period_is_rebuilt_from_the_ledger_too(
    year_period: str,  # noqa: F811
    ledger: Any,
    offline_settings: Any,
) -> None:
    assert _rebuild_equals_fold(ledger, offline_settings) == {"hour", "day", "week", "month", "quarter", year_period}


def _rebuild_equals_fold(ledger: Any, offline_settings: Any) -> set[str]:
    """Rebuild windows from a seeded ledger, check them against the fold of the same events, return the periods."""
    now = datetime.now(UTC).replace(microsecond=0)
    rows = ledger_rows(now, 4000)
    ledger.insert(
        f"{offline_settings.clickhouse_database}.usage_ledger",
        [[row[c] for c in LEDGER_COLUMNS] for row in rows],
        list(LEDGER_COLUMNS),
    )
    calendar = WindowCalendar(POLICY.tz)
    retention = Retention(POLICY.tz, LATENESS_S, 5)
    plan = RebuildPlan(int(now.timestamp()), LATENESS_S, retention, calendar, POLICY.timezone, SKEW_S)
    query = plan.query(int((now - timedelta(minutes=5)).timestamp() * 1000))
    since = dict(zip(grains(), query.since, strict=True))
    snapshot = query_spend(ledger, offline_settings.clickhouse_database, query)
    windows, recent = fold_snapshot(snapshot, POLICY, plan, PARTITIONS, range(PARTITIONS))

    expected: dict[int, dict[str, list[int]]] = {p: {} for p in range(PARTITIONS)}
    for row in rows:
        at = int(row["occurred_at"].timestamp())
        if not counted_by_the_stream(row):
            continue
        for wkey in calendar.window_keys(scopes_for(row, POLICY), at):
            _, period, start = split_window_key(wkey)
            if plan.wanted(period, start) and at >= since[period]:
                acc = expected[usage_partition(row["org"], row["team"], PARTITIONS)].setdefault(wkey, [0, 0, 0])
                served = row["status"] != "blocked"  # a refused call is no request and used no tokens
                acc[0] += row["cost_nanos"]
                acc[1] += served
                acc[2] += row["input_tokens"] + row["output_tokens"] if served else 0
    assert windows == expected
    counted = [r for r in rows if counted_by_the_stream(r) and r["occurred_at"].timestamp() >= min(query.since)]
    assert len(counted) < len(
        [r for r in rows if r["cost_nanos"] is not None and r["occurred_at"].timestamp() >= min(query.since)]
    )
    identities = sorted(dedup_id(r["event_id"].bytes, owner_prefix(r["org"], r["team"])) for r in counted)
    assert sorted(i for ids in recent.values() for i, _ in ids) == identities  # as stage 1 counts an event once
    return {split_window_key(k)[1] for p in windows.values() for k in p}


def test_the_query_refuses_a_timezone_that_is_not_a_name() -> None:
    try:
        SpendQuery("UTC'); DROP TABLE x; --", (0, 0, 0, 0, 0), 0)
    except ValueError as exc:
        assert "tz" in str(exc)
    else:
        raise AssertionError("accepted")


def test_rebuilt_windows_reach_stage_two_in_bounded_chunks() -> None:
    from spendstream.processor.internal_topics import scope_chunks

    scopes = {f"user:u{i}": [["w"]] * 75 for i in range(100)}
    chunks = list(scope_chunks(scopes, limit=2_000))
    assert [scope for chunk in chunks for scope in chunk] == list(scopes)
    assert all(sum(map(len, chunk.values())) <= 2_000 for chunk in chunks) and len(chunks) == 4

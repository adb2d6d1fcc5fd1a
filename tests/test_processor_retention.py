"""Closed windows are deleted from both processor tables (and their changelogs), live ones stay exact."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from spendstream.core.periods import HOUR, period_window
from spendstream.core.policy import parse_policy
from spendstream.processor.recovery import read_scope_totals, read_window_totals
from spendstream.processor.spend_accounting import Retention
from spendstream.runtime.embedded_broker import EmbeddedBroker
from test_processor import event, produce, start_worker, stop_worker, wait_totals
from test_processor_faults import exact_totals, read_by_stage_two

LATENESS_S = 3600
POLICY_YAML = """
name: default
timezone: Europe/Berlin
org: acme
divisions: {eng: [keep, prune]}
budgets:  # a team's windows of every series are read, so stage 2 holds them too (``watched_windows``)
  - {scope: "team:keep", period: week, amount_usd: 1000}
  - {scope: "team:*", period: week, amount_usd: 1000}
  - {scope: "team:*", period: month, amount_usd: 1000}
  - {scope: "team:*", period: quarter, amount_usd: 1000}
spike_rules:
  - {name: daily, kind: daily, scope: "team:*", factor: 3, window_days: 2, min_history_days: 1}
  - {name: hourly, kind: hourly_ewma, scope: "team:*"}
"""
TEAMS = ("keep", "prune")
APP = "spendstream-processor"


def conf(broker: EmbeddedBroker) -> dict[str, str]:
    return {"bootstrap.servers": broker.bootstrap}


@pytest.mark.slow
def test_expired_windows_are_tombstoned_in_both_tables_and_stay_gone_after_a_restart(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY_YAML)
    policy = parse_policy(POLICY_YAML)
    retention = Retention(policy.tz, LATENESS_S, 2)  # window_days of the daily rule
    newest = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    # every two hours over six days, for two teams (two source partitions); Kafka timestamp = occurred_at
    days = [
        [
            event(org="acme", team=team, occurred_at=newest - timedelta(hours=h), cost_nanos=1_000 + h, input_tokens=h)
            for h in range(24 * day - 2, 24 * (day - 1) - 2, -2)
            for team in TEAMS
        ]
        for day in range(6, 0, -1)
    ]
    events = [ev for chunk in days for ev in chunk]
    expected = exact_totals(events, policy)
    watermark = int(newest.timestamp())
    worker = start_worker(broker.bootstrap, tmp_path / "w", policy_path, "--allowed-lateness-s", str(LATENESS_S))
    try:
        for chunk in days:  # a day at a time, so the early windows exist before the watermark passes them
            produce(broker.bootstrap, chunk)
            last = max(chunk, key=lambda ev: ev.occurred_at)
            key = ("team:keep", HOUR, int(last.occurred_at.timestamp()) // 3600 * 3600)
            wait_totals(broker.bootstrap, {key: expected[key]}, APP)
        # one more batch per partition: its retention scan runs against the watermark the last day left
        markers = [event(org="acme", team=team, occurred_at=newest, cost_nanos=1) for team in TEAMS]
        produce(broker.bootstrap, markers)
        expected = exact_totals(events + markers, policy)
        live = {k: v for k, v in expected.items() if retention.live(k[1], k[2], watermark)}
        # a scan runs once per watermark hour: whatever expired by the start of the hour is gone
        gone = {k for k in expected if not retention.live(k[1], k[2], watermark - watermark % 3600)}
        assert gone and {k[1] for k in gone} == {HOUR, "day"}  # a week or month would need weeks of data
        assert len(live) < len(expected)

        held = read_by_stage_two(live, policy)  # the org's and the division's windows are no rule's
        assert {k for k in live if k[0].startswith("team:")} <= set(held)

        def settled(totals: dict, wanted: dict) -> bool:
            return all(totals.get(k) == v for k, v in wanted.items()) and not gone & set(totals)

        deadline = time.monotonic() + 30
        while not (settled(read_window_totals(conf(broker)), live) and settled(read_scope_totals(conf(broker)), held)):
            assert time.monotonic() < deadline, "expired windows still stored, or live windows not exact"
            time.sleep(0.5)
        hours = [k[2] for k in read_scope_totals(conf(broker)) if k[0] == "team:keep" and k[1] == HOUR]
        assert min(hours) >= watermark - 51 * 3600  # 48 h of EWMA history + the hour + 1 h lateness (+ scan hour)

        stop_worker(worker)
        worker = start_worker(broker.bootstrap, tmp_path / "w", policy_path, "--allowed-lateness-s", str(LATENESS_S))
        # an event whose Kafka timestamp lags four days (within its own lateness): its deleted windows stay
        # deleted (the restarted worker restored its watermark), its live ones count it
        lagging_at = newest - timedelta(days=4)
        lagging = event(org="acme", team="keep", occurred_at=lagging_at, cost_nanos=7)
        produce(broker.bootstrap, [lagging], arrival=lagging_at + timedelta(minutes=1))
        month = ("team:keep", "month", int(period_window("month", lagging_at, policy.tz)[0].timestamp()))
        quarter = ("team:keep", "quarter", int(period_window("quarter", lagging_at, policy.tz)[0].timestamp()))
        wait_totals(broker.bootstrap, {month: (live[month][0] + 7, live[month][1] + 1, live[month][2] + 15)}, APP)
        deadline = time.monotonic() + 30  # stage 2 merges what stage 1 announced a moment later
        while read_scope_totals(conf(broker)).get(quarter, (0, 0, 0))[1] != live[quarter][1] + 1:
            assert time.monotonic() < deadline, "stage 2 did not count the lagging event"
            time.sleep(0.5)
    finally:
        stop_worker(worker)
    for totals in (read_window_totals(conf(broker)), read_scope_totals(conf(broker))):
        assert not gone & set(totals)
        assert totals[quarter][1] == live[quarter][1] + 1
        assert all(totals[k] == v for k, v in live.items() if k[0] == "team:prune")

"""Provider stats: rolling latency percentiles, error rates and provider spend, from events and from the ledger."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.codec import AvroCodec
from spendstream.core.config import Settings
from spendstream.core.events import UsageEvent, UsageStatus
from spendstream.gateway.provider_stats import ModelStats, ProviderStats, feed, load_from_ledger

NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)


def event(latency: int, status: UsageStatus = UsageStatus.ok, **kw: Any) -> UsageEvent:
    fields: dict[str, Any] = {
        "provider": "openai",
        "model_requested": "gpt-4o",
        "model_served": "gpt-4o",
        "occurred_at": NOW,
        "latency_ms": latency,
        "status": status,
        "cost_nanos": 100,
    }
    fields.update(kw)
    return UsageEvent(**fields)


def test_percentiles_and_error_rate() -> None:
    stats = ProviderStats(window_s=600)
    for ms in range(1, 101):
        stats.observe_event(event(ms, UsageStatus.error if ms % 10 == 0 else UsageStatus.ok))
    snap = stats.snapshot(NOW.timestamp())
    assert snap.models[("openai", "gpt-4o")] == ModelStats(samples=100, errors=10, p50_ms=50, p95_ms=95)
    assert snap.models[("openai", "gpt-4o")].error_rate == pytest.approx(0.10)


def test_blocked_and_cache_hits_do_not_count_as_calls() -> None:
    stats = ProviderStats()
    stats.observe_event(event(5, UsageStatus.blocked, cost_nanos=0))
    stats.observe_event(event(1, cache_hit=True, cost_nanos=0))
    stats.observe_event(event(700, model_served="", model_requested="gpt-4o-mini"))
    snap = stats.snapshot(NOW.timestamp())
    assert set(snap.models) == {("openai", "gpt-4o-mini")}


def test_window_and_reservoir_bound_what_counts() -> None:
    stats = ProviderStats(window_s=60, reservoir_size=4)
    stats.observe_event(event(9_999, occurred_at=NOW - timedelta(seconds=61)))
    for ms in (10, 20, 30):
        stats.observe_event(event(ms))
    assert stats.snapshot(NOW.timestamp()).models[("openai", "gpt-4o")].p95_ms == 30
    for ms in (40, 50, 60, 70):
        stats.observe_event(event(ms))
    assert stats.snapshot(NOW.timestamp()).models[("openai", "gpt-4o")] == ModelStats(4, 0, 50, 70)
    assert stats.snapshot(NOW.timestamp() + 3600).models == {}


def test_spend_per_provider_since_period_start() -> None:
    stats = ProviderStats(period_start=NOW - timedelta(days=1))
    stats.observe_event(event(1, cost_nanos=500))
    stats.observe_event(event(1, cost_nanos=700, provider="anthropic"))
    stats.observe_event(event(1, cost_nanos=10**9, occurred_at=NOW - timedelta(days=2)))
    stats.observe_event(event(1, cost_nanos=None))
    assert stats.snapshot(NOW.timestamp()).provider_spend_nanos == {"openai": 500, "anthropic": 700}
    stats.reset_spend(NOW, {"openai": 5})
    assert stats.snapshot(NOW.timestamp()).provider_spend_nanos == {"openai": 5}


def test_decoded_usage_records_from_the_stream() -> None:
    codec = AvroCodec("usage_event")
    records = [codec.decode(codec.encode(event(ms).to_avro())) for ms in (100, 200, 300)]
    stats = ProviderStats()
    assert feed(stats, records) == 3
    assert stats.snapshot(NOW.timestamp()).models[("openai", "gpt-4o")] == ModelStats(3, 0, 200, 300)


@given(st.lists(st.integers(min_value=0, max_value=100_000), min_size=1, max_size=200))
def test_percentiles_are_nearest_rank_of_observed_values(latencies: list[int]) -> None:
    stats = ProviderStats(reservoir_size=1000)
    for ms in latencies:
        stats.observe("p", "m", NOW.timestamp(), ms, False)
    got = stats.snapshot(NOW.timestamp()).models[("p", "m")]
    ordered = sorted(latencies)
    assert got.p50_ms in latencies and got.p95_ms in latencies
    assert got.p50_ms <= got.p95_ms <= ordered[-1]
    assert sum(1 for x in ordered if x <= got.p95_ms) >= 0.95 * len(ordered)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ProviderStats(window_s=0)


LEDGER_COLUMNS = [
    "event_id",
    "occurred_at",
    "provider",
    "model_requested",
    "model_served",
    "latency_ms",
    "status",
    "cache_hit",
    "cost_nanos",
]


def test_load_from_ledger(ledger: Any, offline_settings: Settings) -> None:
    now = datetime.now(UTC)
    rows = []
    for i in range(30):
        status = "error" if i < 3 else "ok"
        at = now - timedelta(minutes=5) + timedelta(seconds=i)
        rows.append([uuid.uuid4(), at, "openai", "gpt-4o", "gpt-4o", 100 + i, status, False, 10])
    old = now - timedelta(days=2)
    rows.append([uuid.uuid4(), old, "openai", "gpt-4o", "gpt-4o", 99_999, "ok", False, 1_000])
    rows.append([uuid.uuid4(), now, "openai", "gpt-4o", "gpt-4o", 1, "ok", True, 0])  # cache hit
    rows.append([uuid.uuid4(), now, "anthropic", "claude-3-haiku", "", 50, "blocked", False, 0])
    rows.append([uuid.uuid4(), now, "anthropic", "claude-3-haiku", "", 80, "ok", False, 7])
    ledger.insert(f"{offline_settings.clickhouse_database}.usage_ledger", rows, column_names=LEDGER_COLUMNS)

    stats = load_from_ledger(ledger, offline_settings.clickhouse_database, 15, now - timedelta(days=1), 20)
    snap = stats.snapshot(now.timestamp())
    # The newest 20 of 30 calls (the reservoir): latencies 110..129, none of the 3 oldest errors.
    assert snap.models[("openai", "gpt-4o")] == ModelStats(samples=20, errors=0, p50_ms=119, p95_ms=128)
    assert snap.models[("anthropic", "claude-3-haiku")] == ModelStats(1, 0, 80, 80)
    assert snap.provider_spend_nanos == {"openai": 300, "anthropic": 7}
    full = load_from_ledger(ledger, offline_settings.clickhouse_database, 15, old - timedelta(minutes=1))
    snap = full.snapshot(now.timestamp())
    assert snap.models[("openai", "gpt-4o")].errors == 3 and snap.models[("openai", "gpt-4o")].samples == 30
    assert snap.provider_spend_nanos["openai"] == 1_300

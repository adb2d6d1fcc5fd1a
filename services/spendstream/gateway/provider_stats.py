"""Observed latency and error rate per provider and model, and spend per provider, for routing decisions.

``ProviderStats`` is a pure aggregator fed with usage events: the gateway's own events as it emits them, and
decoded records consumed from ``spendstream.usage`` (so one gateway also learns from the others). Per
(provider, model) it keeps the last ``reservoir_size`` calls in a ring buffer (timestamp, latency, failed), so
memory is fixed; ``snapshot(now)`` reads the calls of the last ``window_s`` seconds and returns immutable
``RoutingStats`` (p50/p95 latency by exact rank over the reservoir, error rate, spend per provider). Snapshots
cost O(reservoir log reservoir) per model: take one every few seconds, not per request.

Which calls count: ``ok`` and ``error`` calls that reached a provider. Blocked requests and cache hits never
reached one, so they would only flatter the figures. Spend counts every priced event since ``period_start``.

``load_from_ledger`` fills an aggregator from ``spendstream.usage_ledger`` (the last N minutes of calls, the
provider spend since the period start), so a restarted gateway routes on history instead of priors.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from spendstream.core.events import UsageEvent

Key = tuple[str, str]  # (provider, model)


class ModelStats(NamedTuple):
    samples: int
    errors: int
    p50_ms: int
    p95_ms: int

    @property
    def error_rate(self) -> float:
        return self.errors / self.samples if self.samples else 0.0


@dataclass(frozen=True)
class RoutingStats:
    """An immutable view for ``choose_route``: per (provider, model) stats and spend per provider (nano-USD)."""

    models: Mapping[Key, ModelStats] = field(default_factory=dict)
    provider_spend_nanos: Mapping[str, int] = field(default_factory=dict)


EMPTY_STATS = RoutingStats()


def _rank(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of a sorted non-empty list."""
    return sorted_values[max(0, math.ceil(len(sorted_values) * q) - 1)]


class ProviderStats:
    """Rolling per-model latency/error figures and per-provider spend. Not thread-safe: one event loop feeds it."""

    def __init__(self, window_s: float = 900.0, reservoir_size: int = 512, period_start: datetime | None = None):
        if window_s <= 0 or reservoir_size < 1:
            raise ValueError("window_s must be positive and reservoir_size at least 1")
        self.window_s = window_s
        self.reservoir_size = reservoir_size
        self.period_start = period_start
        self._calls: dict[Key, deque[tuple[float, int, bool]]] = {}
        self._spend: dict[str, int] = {}

    def observe(self, provider: str, model: str, at: float, latency_ms: int, failed: bool) -> None:
        """One call that reached a provider; ``at`` is epoch seconds."""
        calls = self._calls.get((provider, model))
        if calls is None:
            calls = self._calls[(provider, model)] = deque(maxlen=self.reservoir_size)
        calls.append((at, latency_ms, failed))

    def add_spend(self, provider: str, occurred_at: datetime, cost_nanos: int | None) -> None:
        if cost_nanos and (self.period_start is None or occurred_at >= self.period_start):
            self._spend[provider] = self._spend.get(provider, 0) + cost_nanos

    def observe_record(self, record: Mapping[str, Any]) -> None:
        """A decoded usage record (``AvroCodec("usage_event").decode`` output, or ``UsageEvent.to_avro()``)."""
        occurred_at: datetime = record["occurred_at"]
        provider = record["provider"]
        self.add_spend(provider, occurred_at, record.get("cost_nanos"))
        status = str(record.get("status", "ok"))
        if record.get("cache_hit") or status not in ("ok", "error"):
            return
        model = record.get("model_served") or record["model_requested"]
        self.observe(provider, model, occurred_at.timestamp(), int(record.get("latency_ms", 0)), status == "error")

    def observe_event(self, event: UsageEvent) -> None:
        self.observe_record(event.__dict__)

    def reset_spend(self, period_start: datetime, spend: Mapping[str, int] | None = None) -> None:
        """Start a new budget period (optionally seeded with spend already recorded in the ledger)."""
        self.period_start = period_start
        self._spend = dict(spend or {})

    def snapshot(self, now: float) -> RoutingStats:
        since = now - self.window_s
        models = {}
        for key, calls in self._calls.items():
            recent = [(latency, failed) for at, latency, failed in calls if at >= since]
            if not recent:
                continue
            latencies = sorted(latency for latency, _ in recent)
            errors = sum(1 for _, failed in recent if failed)
            models[key] = ModelStats(len(recent), errors, _rank(latencies, 0.50), _rank(latencies, 0.95))
        return RoutingStats(models, dict(self._spend))


# -- the ledger as a source ----------------------------------------------------------------------------------

_RECENT_CALLS_SQL = """
SELECT provider,
       if(model_served != '', model_served, model_requested) AS model,
       toUnixTimestamp64Milli(occurred_at) AS at_ms,
       latency_ms,
       status = 'error' AS failed
FROM {db}.usage_ledger FINAL
WHERE occurred_at >= now64(3) - toIntervalMinute({minutes:UInt32})
  AND status IN ('ok', 'error') AND NOT cache_hit
ORDER BY occurred_at DESC
LIMIT {per_model:UInt32} BY provider, model
"""

_PROVIDER_SPEND_SQL = """
SELECT provider, toInt64(sum(ifNull(cost_nanos, 0)))
FROM {db}.usage_ledger FINAL
WHERE occurred_at >= {since:DateTime64(6, 'UTC')}
GROUP BY provider
"""


def load_from_ledger(
    client: Any,
    database: str,
    minutes: int,
    period_start: datetime,
    reservoir_size: int = 512,
) -> ProviderStats:
    """An aggregator holding the ledger's calls of the last ``minutes`` (newest ``reservoir_size`` per model) and
    the spend per provider since ``period_start``. ``client`` is a clickhouse-connect client (server or chDB)."""
    if minutes < 1:
        raise ValueError("minutes must be at least 1")
    stats = ProviderStats(window_s=minutes * 60.0, reservoir_size=reservoir_size, period_start=period_start)
    rows = client.query(
        _RECENT_CALLS_SQL.replace("{db}", database),
        parameters={"minutes": minutes, "per_model": reservoir_size},
    ).result_rows
    for provider, model, at_ms, latency_ms, failed in reversed(rows):  # oldest first, as a live feed would be
        stats.observe(provider, model, at_ms / 1000.0, int(latency_ms), bool(failed))
    spend_rows = client.query(
        _PROVIDER_SPEND_SQL.replace("{db}", database),
        parameters={"since": period_start.astimezone(UTC).replace(tzinfo=None)},
    ).result_rows
    stats.reset_spend(period_start, {provider: int(total) for provider, total in spend_rows})
    return stats


def feed(stats: ProviderStats, records: Iterable[Mapping[str, Any]]) -> int:
    """Observe a batch of decoded usage records (a consumer poll); returns how many were read."""
    count = 0
    for record in records:
        stats.observe_record(record)
        count += 1
    return count

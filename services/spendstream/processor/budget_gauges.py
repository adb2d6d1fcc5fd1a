"""Prometheus gauges of every budget of a scope the policy names, for alerting stacks that already watch /metrics.

Per scope and period (labels ``scope``, ``period``): ``spendstream_budget_limit_usd``,
``spendstream_budget_spent_usd``, ``spendstream_budget_remaining_usd`` (never below 0),
``spendstream_budget_used_ratio`` (above 1 when overspent) and ``spendstream_budget_hours_to_exhaustion``: when
the limit is reached at the average rate of the window so far (the forecast's rate, ``forecast.forecast``),
0 once reached, +Inf with no spend yet or when that is more than a century away. The processor is where
windows and budgets live, so the figures are those its decisions act on. Stage 2 records a scope's standings
each time it evaluates the scope; the gauges are
computed at scrape time, so the hours count down between events, and a window that has ended is no longer
shown (the next period's series appears with its first event). Each worker shows the scopes it evaluates,
and forgets those whose partition a rebalance gives another worker.
Prometheus samples are floats: the exact nano-USD figures stay in the ledger and the decisions.
A template's scopes (each user of a ``user:*`` budget) are not shown: a series per user grows with the users,
and a client naming a new user per event grew the processor's memory and every scrape without bound. Their
standing is in their decisions. A scope whose windows have all ended is forgotten at the next scrape.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from spendstream.core.events import NANOS_PER_USD
from spendstream.processor.decision_publisher import BudgetStanding
from spendstream.processor.forecast import forecast

_LABELS = ["scope", "period"]


def remaining_nanos(standing: BudgetStanding) -> int:
    return max(standing.limit_nanos - standing.spend_nanos, 0)


def hours_to_exhaustion(standing: BudgetStanding, now: datetime) -> float:
    """Hours until the limit is reached at the window's average rate so far: 0 if reached, +Inf if never."""
    at = forecast(standing.spend_nanos, standing.limit_nanos, standing.start, standing.end, now).exhausts_at
    if at is None:
        return math.inf
    return max((at - now).total_seconds(), 0.0) / 3600


class BudgetGauges(Collector):
    """The latest standing per (scope, period); where several budgets watch one, the one with least remaining."""

    def __init__(self, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._clock = clock
        self._standings: dict[str, dict[str, BudgetStanding]] = {}
        self._lock = threading.Lock()

    def update(self, scope: str, standings: Iterable[BudgetStanding]) -> None:
        tightest: dict[str, BudgetStanding] = {}
        for standing in standings:
            if not standing.named:
                continue
            held = tightest.get(standing.period)
            if held is None or remaining_nanos(standing) < remaining_nanos(held):
                tightest[standing.period] = standing
        with self._lock:
            if tightest:
                self._standings[scope] = tightest
            else:
                self._standings.pop(scope, None)

    def retain(self, evaluated_here: Callable[[str], bool]) -> None:
        """Forget the scopes this worker no longer evaluates: after a rebalance another worker shows them, and a
        frozen copy here would linger (beside the live one) until the window ends."""
        with self._lock:
            for scope in [scope for scope in self._standings if not evaluated_here(scope)]:
                del self._standings[scope]

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families().values())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self._clock()
        with self._lock:
            for scope in [
                scope for scope, periods in self._standings.items() if all(now >= s.end for s in periods.values())
            ]:
                del self._standings[scope]
            current = [s for periods in self._standings.values() for s in periods.values() if now < s.end]
        families = self._families()
        for standing in sorted(current, key=lambda s: (s.scope, s.period)):
            labels = [standing.scope, standing.period]
            families["limit"].add_metric(labels, standing.limit_nanos / NANOS_PER_USD)
            families["spent"].add_metric(labels, standing.spend_nanos / NANOS_PER_USD)
            families["remaining"].add_metric(labels, remaining_nanos(standing) / NANOS_PER_USD)
            if standing.limit_nanos > 0:
                families["ratio"].add_metric(labels, standing.spend_nanos / standing.limit_nanos)
            families["hours"].add_metric(labels, hours_to_exhaustion(standing, now))
        yield from families.values()

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        def gauge(name: str, text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"spendstream_budget_{name}", text, labels=_LABELS)

        return {
            "limit": gauge("limit_usd", "Budget limit of the scope for the period, USD."),
            "spent": gauge("spent_usd", "Spend of the scope in the current window of the period, USD."),
            "remaining": gauge("remaining_usd", "Budget left in the current window (0 once spent), USD."),
            "ratio": gauge("used_ratio", "Spend over limit in the current window (above 1 when overspent)."),
            "hours": gauge(
                "hours_to_exhaustion",
                "Hours until the limit is reached at the window's average rate so far "
                "(0: reached; +Inf: no spend yet, or not within a century at that rate).",
            ),
        }


BUDGET_GAUGES = BudgetGauges()
REGISTRY.register(BUDGET_GAUGES)

"""The processor's budget gauges: the scopes a policy names, not every user of a template."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, generate_latest

from spendstream.processor.budget_gauges import BudgetGauges
from spendstream.processor.decision_publisher import BudgetStanding

USD = 1_000_000_000
START = datetime(2026, 12, 1, tzinfo=UTC)
END = datetime(2027, 1, 1, tzinfo=UTC)


def scraped(gauges: BudgetGauges) -> str:
    registry = CollectorRegistry()
    registry.register(gauges)
    return generate_latest(registry).decode()


def test_a_templates_scopes_are_no_series_so_new_users_cannot_grow_the_metrics() -> None:
    """A ``user:*`` budget made a series per user: a client naming a new user per event grew the processor's memory
    and every scrape without bound."""
    clock = [START + timedelta(days=3)]
    gauges = BudgetGauges(clock=lambda: clock[0])
    gauges.update("team:web", [BudgetStanding("team:web", "month", 100 * USD, 30 * USD, START, END)])
    for i in range(1_000):
        user = f"user:u{i}"
        gauges.update(user, [BudgetStanding(user, "day", USD, USD // 2, START, START + timedelta(days=1), False)])
    text = scraped(gauges)
    assert 'spendstream_budget_spent_usd{period="month",scope="team:web"} 30.0' in text
    assert "user:" not in text and len(gauges._standings) == 1


def test_a_scope_whose_windows_all_ended_is_forgotten() -> None:
    clock = [START + timedelta(hours=1)]
    gauges = BudgetGauges(clock=lambda: clock[0])
    day_end = START + timedelta(days=1)
    gauges.update("team:web", [BudgetStanding("team:web", "day", 10 * USD, USD, START, day_end)])
    assert 'scope="team:web"' in scraped(gauges)
    clock[0] = day_end
    assert 'scope="team:web"' not in scraped(gauges) and gauges._standings == {}

"""What routing and the response cache saved: the routing_savings_monthly view and ``report savings``, against
figures worked out by hand from a small seeded ledger (real chDB)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from spendstream.analytics import reports
from spendstream.analytics.report_model import render
from spendstream.analytics.report_registry import REPORTS, build_report
from spendstream.api.app import create_app
from spendstream.api.tokens import add_token
from spendstream.core.config import Settings

DB = "spendstream"
COLUMNS = ["event_id", "occurred_at", "team", "provider", "model_requested", "model_served", "cost_nanos", "status",
           "cache_hit", "tags"]  # fmt: skip
REPLAYED = uuid.UUID("00000000-0000-0000-0000-0000000000a1")
ROUTED = {"requested_model": "openai/gpt-4o", "route_tier": "simple"}


def row(when: str, team: str, cost: int | None, tags: dict[str, str] | None = None, **kw: Any) -> list[Any]:
    served = "gpt-4o-mini" if tags and "requested_model" in tags else "gpt-4o"
    return [
        kw.get("event_id", uuid.uuid4()), datetime.fromisoformat(when).replace(tzinfo=UTC), team, "openai", "gpt-4o",
        served, cost, kw.get("status", "ok"), kw.get("cache_hit", False), tags or {},
    ]  # fmt: skip


SEED = [
    # marketing, March: requested 30000 + 10000 + 10000 + 25000 + 0 = 75000; routed 2000 + 10000 = 12000
    row("2026-03-02 10:00", "marketing", 2_000, {**ROUTED, "requested_cost_nanos": "30000"}, event_id=REPLAYED),
    row("2026-03-03 10:00", "marketing", 10_000),
    row("2026-03-04 10:00", "marketing", 0, {"cache": "hit", "saved_nanos": "10000"}, cache_hit=True),
    # a rerouted hit: as requested it would have cost the requested model's price, not the cached one
    row("2026-03-05 10:00", "marketing", 0, {**ROUTED, "requested_cost_nanos": "25000", "saved_nanos": "1500"},
        cache_hit=True),
    # a rerouted call that failed would have failed (and cost nothing) on the requested model too
    row("2026-03-06 10:00", "marketing", None, {**ROUTED, "requested_cost_nanos": "9999"}, status="error"),
    row("2026-03-07 10:00", "engineering", 5_000),
    row("2026-03-07 11:00", "engineering", None, status="blocked"),
    row("2026-03-08 10:00", "", 1_000, {**ROUTED, "requested_cost_nanos": "4000"}),
    # February in UTC, March in Europe/Berlin (UTC+1)
    row("2026-02-28 23:30", "marketing", 100, {**ROUTED, "requested_cost_nanos": "1100"}),
]  # fmt: skip


@pytest.fixture
def seeded(ledger: Any) -> Any:
    ledger.insert(f"{DB}.usage_ledger", SEED, column_names=COLUMNS)
    ledger.insert(f"{DB}.usage_ledger", [SEED[0]], column_names=COLUMNS)  # a replay: FINAL counts it once
    return ledger


def test_view_per_month_and_team_by_hand(seeded: Any) -> None:
    rows = seeded.query(
        f"SELECT month, team, requests, rerouted_requests, cache_hits, cache_hit_rate, routed_nanos, requested_nanos, "
        f"savings_nanos, cache_savings_nanos, routing_savings_nanos FROM {DB}.routing_savings_monthly"
    ).result_rows
    assert rows == [
        (date(2026, 2, 1), "marketing", 1, 1, 0, 0.0, 100, 1_100, 1_000, 0, 1_000),
        (date(2026, 3, 1), "", 1, 1, 0, 0.0, 1_000, 4_000, 3_000, 0, 3_000),
        (date(2026, 3, 1), "engineering", 1, 0, 0, 0.0, 5_000, 5_000, 0, 0, 0),  # its refused call is no request
        (date(2026, 3, 1), "marketing", 5, 3, 2, 0.4, 12_000, 75_000, 63_000, 11_500, 51_500),
    ]


def test_report_by_hand(seeded: Any) -> None:
    report = reports.savings(reports.Ledger(seeded, DB, "UTC"), date(2026, 3, 20))
    assert [r["team"] for r in report.rows] == ["marketing", "(unattributed)", "engineering"]  # largest saving first
    assert report.rows[0] == {
        "team": "marketing", "requests": 5, "rerouted": 3, "cache_hit_rate": Decimal("0.4"), "requested": 75_000,
        "routed": 12_000, "savings": 63_000, "savings_share": Decimal("0.84"), "routing_savings": 51_500,
        "cache_savings": 11_500,
    }  # fmt: skip
    assert report.totals == {
        "team": "TOTAL", "requests": 7, "rerouted": 4, "cache_hit_rate": Decimal("0.2857"), "requested": 84_000,
        "routed": 18_000, "savings": 66_000, "savings_share": Decimal("0.7857"), "routing_savings": 54_500,
        "cache_savings": 11_500,
    }  # fmt: skip
    assert "63000" not in render(report, "table") and "$0.00" in render(report, "table")  # rendered in USD
    assert "0.000063000" in render(report, "csv")


def test_report_months_are_in_the_budget_timezone(seeded: Any) -> None:
    report = reports.savings(reports.Ledger(seeded, DB, "Europe/Berlin"), date(2026, 3, 1))
    marketing = next(r for r in report.rows if r["team"] == "marketing")
    assert (marketing["requests"], marketing["routed"], marketing["requested"]) == (6, 12_100, 76_100)
    february = reports.savings(reports.Ledger(seeded, DB, "Europe/Berlin"), date(2026, 2, 1))
    assert february.rows == [] and february.totals is not None and february.totals["savings_share"] is None


def march_totals(seeded: Any) -> dict[str, Any] | None:
    return reports.savings(reports.Ledger(seeded, DB, "UTC"), date(2026, 3, 1)).totals


def test_cli_and_api_serve_the_report(seeded: Any, offline_settings: Settings, settings: Settings) -> None:
    assert "savings" in REPORTS
    now = datetime(2026, 3, 20, tzinfo=UTC)
    report = build_report("savings", seeded, offline_settings, {"month": date(2026, 2, 1)}, now, timezone="UTC")
    assert report.totals is not None and report.totals["savings"] == 1_000
    assert build_report("savings", seeded, offline_settings, {}, now, timezone="UTC").totals == march_totals(seeded)

    async def get() -> dict[str, Any]:
        viewer = {"Authorization": f"Bearer {add_token(settings.api_tokens_path, 'viewer', 'finance')}"}
        async with TestClient(TestServer(create_app(settings, seeded))) as http:  # settings: its producer has a broker
            response = await http.get("/v1/reports/savings?month=2026-03", headers=viewer)
            assert response.status == 200
            return await response.json()

    doc = asyncio.run(get())
    assert doc["report"] == "savings" and doc["totals"]["savings_nanos"] == 66_000
    assert doc["rows"][0]["team"] == "marketing" and doc["rows"][0]["cache_savings_usd"] == "0.000011500"

"""Every report's figures against values worked out by hand from a small seeded ledger (real chDB)."""

from __future__ import annotations

import io
import json
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendstream.analytics import money, reports
from spendstream.analytics.budgets import load_budgets
from spendstream.analytics.readonly_sql import WriteRefused, sql_report
from spendstream.analytics.report_model import cell_text, render
from spendstream.analytics.report_registry import build_report
from spendstream.analytics.reprice import reprice
from spendstream.analytics.rollup import rebuild_spend_daily
from spendstream.core.periods import monthly_equivalent

B = 1_000_000_000  # nano-USD per USD
DB = "spendstream"
NOW = datetime(2026, 3, 16, 12, 0, tzinfo=UTC)  # a Monday; March 2026 has 31 days
LEDGER_COLUMNS = [
    "event_id", "occurred_at", "org", "team", "feature", "user", "customer", "environment", "provider",
    "model_requested", "model_served", "input_tokens", "output_tokens", "cached_input_tokens", "cost_nanos",
    "latency_ms", "status", "cache_hit",
]  # fmt: skip
DUPLICATED = uuid.UUID("00000000-0000-0000-0000-000000000001")


def row(when: str, team: str, feature: str, model: str, cost: int | None, latency: int, **kw: Any) -> list[Any]:
    return [
        kw.get("event_id", uuid.uuid4()), datetime.fromisoformat(when).replace(tzinfo=UTC), "acme", team, feature,
        kw.get("user", "u1"), kw.get("customer", ""), "prod", kw.get("provider", "openai"), model,
        kw.get("served", model), 1000, 100, 0, cost, latency, kw.get("status", "ok"), kw.get("cache_hit", False),
    ]  # fmt: skip


SEED = [
    row("2026-03-02 10:00", "engineering", "ai_code_review", "gpt-4o", 100 * B, 100, event_id=DUPLICATED),
    row("2026-03-10 10:00", "engineering", "ai_code_review", "gpt-4o", 50 * B, 200, cache_hit=True),
    row("2026-03-16 09:00", "engineering", "ai_chatbot", "gpt-4o-mini", 10 * B, 300, status="error"),
    row("2026-03-16 11:00", "marketing", "ai_content_generator", "claude-3-5-sonnet-20241022", 30 * B, 400,
        provider="anthropic", cache_hit=True),
    row("2026-03-11 08:00", "marketing", "ai_chatbot", "gpt-4o-mini", 5 * B, 500),
    row("2026-03-12 08:00", "", "ai_lead_scorer", "llama-3.2-1b", 3 * B + 7, 50, provider="local"),
    row("2026-03-15 23:00", "sales", "ai_lead_scorer", "gpt-4o-mini", None, 60, status="blocked"),
    row("2026-02-28 12:00", "sales", "ai_lead_scorer", "gpt-4o-mini", 7 * B, 70),
    row("2026-03-17 09:00", "engineering", "ai_code_review", "gpt-4o", 1000 * B, 700),
]  # fmt: skip
BUDGETS = [
    ("team:engineering", "month", 12_000 * B),
    ("team:marketing", "month", 8_000 * B),
    ("team:sales", "week", 1_400 * B),  # 1400 x 31 / 7 = 6200 for March
    ("feature:ai_chatbot", "month", 4_000 * B),  # not a department: chargeback ignores it
    ("team:*", "day", 100 * B),  # a template has no single owner: not loaded
]


@pytest.fixture
def seeded(ledger: Any) -> reports.Ledger:
    ledger.insert(f"{DB}.usage_ledger", SEED, column_names=LEDGER_COLUMNS)
    # A replay of the first event in a separate insert: FINAL must count it once.
    ledger.insert(f"{DB}.usage_ledger", [SEED[0]], column_names=LEDGER_COLUMNS)
    assert load_budgets(ledger, DB, BUDGETS, date(2026, 3, 1), "pv-1") == 4
    return reports.Ledger(ledger, DB, "UTC")


def by(report: Any, key: str) -> dict[str, dict[str, Any]]:
    return {r[key]: r for r in report.rows}


def test_chargeback_by_hand(seeded: reports.Ledger) -> None:
    report = reports.chargeback(seeded, date(2026, 3, 9))
    rows = by(report, "department")
    assert list(rows) == ["engineering", "marketing", "sales", reports.UNATTRIBUTED]
    # Shared 3.000000007 USD split 1160:35 -> floors 2912133898 + 87866108, the spare nano to the larger remainder.
    assert rows["engineering"] == {
        "department": "engineering", "budget": 12_000 * B, "actual": 1160 * B, "variance": 10_840 * B,
        "utilisation": Decimal("0.0967"), "shared": 2_912_133_898, "chargeback": 1160 * B + 2_912_133_898,
        "policy_budget": 12_000 * B, "increase": 0,
    }  # fmt: skip
    assert rows["marketing"]["shared"] == 87_866_109
    assert rows["marketing"]["variance"] == 7_965 * B
    assert rows["sales"] == {
        "department": "sales", "budget": 6_200 * B, "actual": 0, "variance": 6_200 * B,
        "utilisation": Decimal("0"), "shared": 0, "chargeback": 0, "policy_budget": 6_200 * B, "increase": 0,
    }  # fmt: skip
    # the spend without a team has its row, last: every column adds up to TOTAL (a user session found the
    # departments' actuals short of the total by the shared spend)
    assert rows[reports.UNATTRIBUTED] == {
        "department": reports.UNATTRIBUTED, "budget": 0, "actual": 3 * B + 7, "variance": -(3 * B + 7),
        "utilisation": None, "shared": -(3 * B + 7), "chargeback": 0, "policy_budget": 0, "increase": 0,
    }  # fmt: skip
    for column in ("budget", "actual", "variance", "shared", "chargeback"):
        assert sum(r[column] for r in report.rows) == report.totals[column], column
    assert report.totals["chargeback"] == 1198 * B + 7 == report.totals["actual"]
    assert report.totals["budget"] == 26_200 * B
    # sales is held to $1,400 a week; its $6,200 is said to be a monthly equivalent, and how it is made
    assert any("team budgets by week are shown as monthly equivalents" in n and "x the month's days / 7" in n
               for n in report.notes)  # fmt: skip


def test_chargeback_view_agrees_with_report(seeded: reports.Ledger) -> None:
    view = seeded.client.query(
        f"SELECT department, budget_nanos, actual_nanos, variance_nanos, shared_nanos, chargeback_nanos "
        f"FROM {DB}.chargeback_monthly WHERE month = '2026-03-01'"
    ).result_rows
    report = reports.chargeback(seeded, date(2026, 3, 1))
    expected = [
        (r["department"], r["budget"], r["actual"], r["variance"], r["shared"], r["chargeback"]) for r in report.rows
    ]
    assert view == expected


def test_cfo_weekly_by_hand(seeded: reports.Ledger) -> None:
    report = reports.weekly(seeded, date(2026, 3, 18), weeks=2)
    this, last = report.rows
    week_budget = 26_200 * B // 31 * 7
    assert this == {
        "week": date(2026, 3, 16), "spend": 1040 * B, "previous": 58 * B + 7, "change": Decimal("16.9310"),
        "budget": week_budget, "budget_used": Decimal("0.1758"), "top_feature": "ai_code_review",
        "top_feature_spend": 1000 * B, "cache_hit_rate": Decimal("0.3333"), "premium_share": Decimal("0.9904"),
        "budget_increase": 0,
    }  # fmt: skip
    assert last == {
        "week": date(2026, 3, 9), "spend": 58 * B + 7, "previous": 100 * B, "change": Decimal("-0.4200"),
        "budget": week_budget, "budget_used": Decimal("0.0098"), "top_feature": "ai_code_review",
        "top_feature_spend": 50 * B, "cache_hit_rate": Decimal("0.3333"), "premium_share": Decimal("0.8621"),
        "budget_increase": 0,
    }  # fmt: skip
    assert any("shown as monthly equivalents" in note for note in report.notes)
    assert not any("no team budgets are recorded" in note for note in report.notes)


def test_a_week_in_a_month_without_recorded_budgets_says_so(seeded: reports.Ledger) -> None:
    """A user session read the week of 2026-11-30 as a whole week's budget: November had none recorded (the sink
    ran only in December), so only Dec 1-6 counted. Here February has none, March has them."""
    report = reports.weekly(seeded, date(2026, 3, 4), weeks=2)
    _, week = report.rows
    assert week["week"] == date(2026, 2, 23) and week["budget"] == 26_200 * B // 31  # of its days, only Mar 1
    (note,) = [n for n in report.notes if "no team budgets are recorded" in n]
    assert "for 2026-02" in note and "those days add $0" in note


def test_a_month_without_recorded_budgets_says_so_in_chargeback_and_forecast(seeded: reports.Ledger) -> None:
    """A user session read February's chargeback (before any policy) as every team at "$0.00" budget and over it by
    all it spent, with no word why; the weekly report already said so. March has budgets: it needs no such note."""
    february = reports.chargeback(seeded, date(2026, 2, 1))
    assert by(february, "department")["sales"]["variance"] == -7 * B
    (note,) = [n for n in february.notes if "no team budgets are recorded" in n]
    assert "for 2026-02" in note and "variances are the spend" in note
    forecast = reports.forecast(seeded, datetime(2026, 2, 28, 18, 0, tzinfo=UTC))
    assert any("no team budgets are recorded for 2026-02" in n for n in forecast.notes)
    march = [reports.chargeback(seeded, date(2026, 3, 1)), reports.forecast(seeded, NOW)]
    assert not any("no team budgets are recorded" in n for report in march for n in report.notes)
    seeded.client.command(f"TRUNCATE TABLE {DB}.budgets")  # no budgets anywhere: nothing to explain
    assert not any("no team budgets" in n for n in reports.chargeback(seeded, date(2026, 2, 1)).notes)


def test_monthly_equivalents_are_named_only_when_a_team_budget_is_not_monthly(seeded: reports.Ledger) -> None:
    load_budgets(seeded.client, DB, [("team:engineering", "month", 1 * B)], date(2026, 3, 20), "pv-2")
    assert not any("monthly equivalents" in note for note in reports.chargeback(seeded, date(2026, 3, 1)).notes)
    load_budgets(seeded.client, DB, [("team:engineering", "day", 10 * B)], date(2026, 3, 20), "pv-3")
    (note,) = [n for n in reports.forecast(seeded, NOW).notes if "monthly equivalents" in n]
    assert note.startswith("team budgets by day are shown") and "a day budget x the month's days" in note
    assert by(reports.forecast(seeded, NOW), "team")["engineering"]["budget"] == 310 * B


def test_forecast_by_hand(seeded: reports.Ledger) -> None:
    report = reports.forecast(seeded, NOW)
    rows = by(report, "team")
    # 15.5 days (1,339,200 s) remain; run rate = trailing 7 days (604,800 s) of spend.
    assert rows["engineering"]["actual"] == 160 * B
    assert rows["engineering"]["forecast"] == 160 * B + 60 * B * 1_339_200 // 604_800 == 292_857_142_857
    assert rows["engineering"]["run_rate"] == 60 * B // 7
    assert rows["engineering"]["exhausted_on"] is None
    assert rows["marketing"]["forecast"] == 112_500_000_000
    assert rows["marketing"]["forecast_used"] == Decimal("0.0141")
    assert rows["sales"]["forecast"] == 0 and rows["sales"]["budget"] == 6_200 * B
    assert rows[reports.UNATTRIBUTED]["actual"] == 3 * B + 7
    assert report.totals["forecast"] == sum(r["forecast"] for r in report.rows)
    assert any("shown as monthly equivalents" in note for note in report.notes)


def test_a_team_shut_off_to_the_months_end_is_forecast_at_what_it_spent(seeded: reports.Ledger) -> None:
    """A user session: engineering, shut off for the month, was forecast $28 over its budget."""
    from spendstream.core.events import Decision
    from spendstream.sink.audit_sink import DECISION_COLUMNS, decision_row

    stop = Decision(scope="team:engineering", action="shutoff", version=1, period="month", issued_at=NOW)
    seeded.client.insert(f"{DB}.decisions", [decision_row(stop.to_avro())], column_names=DECISION_COLUMNS)
    rows = by(reports.forecast(seeded, NOW), "team")
    assert rows["engineering"]["forecast"] == rows["engineering"]["actual"] == 160 * B
    assert rows["engineering"]["exhausted_on"] is None and rows["engineering"]["edges_now"] == "shutoff (month)"
    assert rows["marketing"]["forecast"] == 112_500_000_000  # the others as before


def test_top_by_service_tier_separates_batch_spend(seeded: reports.Ledger) -> None:
    batch = row("2026-03-20 10:00", "engineering", "ai_code_review", "gpt-4o", 40 * B, 10)
    seeded.client.insert(f"{DB}.usage_ledger", [[*batch, "batch"]], column_names=[*LEDGER_COLUMNS, "service_tier"])
    top = reports.top(seeded, "service_tier", date(2026, 3, 1), date(2026, 3, 31))
    assert [(r["key"], r["spend"], r["requests"]) for r in top.rows] == [
        ("standard", 1198 * B + 7, 7),  # the refused call is no request
        ("batch", 40 * B, 1),
    ]


def test_top_by_division(seeded: reports.Ledger) -> None:
    growth = row("2026-03-20 10:00", "marketing", "ai_chatbot", "gpt-4o", 40 * B, 10)
    seeded.client.insert(f"{DB}.usage_ledger", [[*growth, "growth"]], column_names=[*LEDGER_COLUMNS, "division"])
    top = reports.top(seeded, "division", date(2026, 3, 1), date(2026, 3, 31))
    assert [(r["key"], r["spend"], r["requests"]) for r in top.rows] == [
        (reports.UNATTRIBUTED, 1198 * B + 7, 7),
        ("growth", 40 * B, 1),
    ]


def test_top_mix_latency_by_hand(seeded: reports.Ledger) -> None:
    top = reports.top(seeded, "feature", date(2026, 3, 1), date(2026, 3, 31), limit=3)
    assert [(r["key"], r["spend"], r["requests"]) for r in top.rows] == [
        ("ai_code_review", 1150 * B, 3),
        ("ai_content_generator", 30 * B, 1),
        ("ai_chatbot", 15 * B, 2),
    ]
    assert top.rows[0]["share"] == money.ratio(1150 * B, 1198 * B + 7)
    mix = by(reports.model_mix(seeded, date(2026, 3, 1), date(2026, 3, 31)), "model")
    assert {m: (r["requests"], r["spend"], r["tier"]) for m, r in mix.items()} == {
        "gpt-4o": (3, 1150 * B, "premium"),
        "claude-3-5-sonnet-20241022": (1, 30 * B, "premium"),
        "gpt-4o-mini": (2, 15 * B, "standard"),  # the refused call is no request
        "llama-3.2-1b": (1, 3 * B + 7, "standard"),
    }
    lat = by(reports.latency(seeded, date(2026, 3, 1), date(2026, 3, 31)), "model")
    # quantilesExact: element floor(q * n) of the sorted latencies; the blocked call is left out, and so is the cache
    # hit's latency (it never reached the provider)
    assert (lat["gpt-4o"]["requests"], lat["gpt-4o"]["timed"]) == (3, 2)
    assert (lat["gpt-4o"]["p50"], lat["gpt-4o"]["p95"], lat["gpt-4o"]["p99"]) == (700, 700, 700)
    assert (lat["gpt-4o-mini"]["requests"], lat["gpt-4o-mini"]["p50"]) == (2, 500)
    assert (lat["claude-3-5-sonnet-20241022"]["timed"], lat["claude-3-5-sonnet-20241022"]["p50"]) == (0, None)
    assert lat["gpt-4o-mini"]["error_rate"] == Decimal("0.5000")


def test_views_agree_with_reports(seeded: reports.Ledger) -> None:
    q = seeded.client.query
    assert dict(
        q(f"SELECT feature, spend_nanos FROM {DB}.cost_by_feature_monthly WHERE month = '2026-03-01'").result_rows
    ) == {"ai_code_review": 1150 * B, "ai_content_generator": 30 * B, "ai_chatbot": 15 * B, "ai_lead_scorer": 3 * B + 7}
    premium = q(f"SELECT model, premium FROM {DB}.model_mix_monthly WHERE month = '2026-03-01'").result_rows
    assert {m: bool(p) for m, p in premium} == {m: money.is_premium(m) for m, _ in premium}
    lat = q(f"SELECT p50_ms, p95_ms, errors FROM {DB}.latency_by_model_daily WHERE model = 'gpt-4o-mini'").result_rows
    assert sorted(lat) == [(70, 70, 0), (300, 300, 1), (500, 500, 0)]
    assert q(f"SELECT count() FROM {DB}.cfo_weekly").result_rows == [(1,)]
    assert q(f"SELECT count() FROM {DB}.forecast_month_end").result_rows[0][0] >= 0


def test_rollup_counts_replays_until_rebuilt(seeded: reports.Ledger) -> None:
    trend = reports.spend_trend(seeded, date(2026, 3, 1), date(2026, 3, 31))
    assert trend["engineering"][date(2026, 3, 2)] == 200 * B  # the replayed insert, counted twice by the view
    assert rebuild_spend_daily(seeded.client, DB, date(2026, 3, 1), date(2026, 3, 31)) == 8
    trend = reports.spend_trend(seeded, date(2026, 3, 1), date(2026, 3, 31))
    assert trend["engineering"][date(2026, 3, 2)] == 100 * B
    assert sum(sum(days.values()) for days in trend.values()) == 1198 * B + 7


def test_reprice_keeps_old_figures_and_reports_per_team(seeded: reports.Ledger) -> None:
    def corrected(provider: str, model: str, inp: int, out: int, cached: int, write: int, at: datetime, detail):
        return inp * 2_000 + out * 8_000, "override:openai/gpt-4o-mini"  # $2/M in, $8/M out

    result = reprice(seeded.client, DB, "gpt-4o-mini", date(2026, 3, 1), date(2026, 3, 31), corrected, NOW)
    per_team = by(result.report("gpt-4o-mini", date(2026, 3, 1), date(2026, 3, 31)), "team")
    assert per_team["engineering"]["old"] == 10 * B and per_team["engineering"]["new"] == 2_800_000
    # sales' only call was refused: it reached no model and costs nothing at any price (an attacker session)
    assert "sales" not in per_team
    assert result.changed == 2 and result.examined == 2
    audit = seeded.client.query(
        f"SELECT team, old_cost_nanos, new_cost_nanos FROM {DB}.reprice_audit ORDER BY team"
    ).result_rows
    assert audit == [("engineering", 10 * B, 2_800_000), ("marketing", 5 * B, 2_800_000)]
    march = reports.chargeback(seeded, date(2026, 3, 1))
    assert by(march, "department")["engineering"]["actual"] == 1150 * B + 2_800_000
    assert reports.spend_trend(seeded, date(2026, 3, 16), date(2026, 3, 16))["engineering"] == {
        date(2026, 3, 16): 2_800_000
    }
    again = reprice(seeded.client, DB, "gpt-4o-mini", date(2026, 3, 1), date(2026, 3, 31), corrected, NOW)
    assert again.changed == 0


def test_budgets_reload_replaces_the_month(seeded: reports.Ledger) -> None:
    load_budgets(seeded.client, DB, [("team:engineering", "month", 1 * B)], date(2026, 3, 20), "pv-2")
    assert reports.team_budgets(seeded, date(2026, 3, 1), NOW).policy == {"engineering": 1 * B}
    with pytest.raises(ValueError, match="unknown budget period"):
        load_budgets(seeded.client, DB, [("team:x", "fortnight", 1)], date(2026, 3, 1))


def test_reports_render_in_every_format(seeded: reports.Ledger, offline_settings: Any) -> None:
    report = build_report(
        "chargeback", seeded.client, offline_settings, {"month": date(2026, 3, 1)}, NOW, timezone="UTC"
    )
    table = render(report, "table")
    assert "engineering" in table and "$12,000.00" in table and "$1,162.91" in table and "TOTAL" in table
    csv_text = render(report, "csv")
    assert csv_text.splitlines()[0].startswith("department,budget_usd,actual_usd")
    assert "engineering,12000.000000000,1160.000000000,10840.000000000,0.0967,2.912133898,1162.912133898" in csv_text
    assert len(csv_text.splitlines()) == 1 + len(report.rows) and "TOTAL" not in csv_text  # summing it adds up
    doc = json.loads(render(report, "json"))
    assert doc["rows"][0]["chargeback_nanos"] == 1160 * B + 2_912_133_898
    assert doc["totals"]["chargeback_usd"] == "1198.000000007"
    weekly = render(
        build_report("weekly", seeded.client, offline_settings, {"as_of": date(2026, 3, 16)}, NOW, timezone="UTC"),
        "table",
    )
    assert "ai_code_review" in weekly and "16.9310"[:2] in weekly


def test_sql_is_read_only_by_default(seeded: reports.Ledger, offline_settings: Any) -> None:
    result = sql_report(seeded.client, offline_settings, "SELECT count() AS n FROM usage_ledger FINAL")
    assert result.rows == [{"n": 9}]
    with pytest.raises(WriteRefused, match="TRUNCATE statement refused"):
        sql_report(seeded.client, offline_settings, "/* x */ TRUNCATE TABLE usage_ledger")
    with pytest.raises(Exception, match="SETTINGS refused"):  # a settings change hidden in a SELECT
        sql_report(seeded.client, offline_settings, "SELECT * FROM usage_ledger SETTINGS readonly = 0")
    sql_report(seeded.client, offline_settings, "DELETE FROM budgets WHERE month = '2026-03-01'", write=True)
    assert reports.team_budgets(seeded, date(2026, 3, 1), NOW).policy == {}


# -- pure arithmetic ------------------------------------------------------------------------------


@given(st.integers(0, 10**15), st.dictionaries(st.text(max_size=3), st.integers(0, 10**14), max_size=8))
def test_allocation_adds_up_exactly(shared: int, weights: dict[str, int]) -> None:
    shares = money.allocate_shared(shared, weights)
    assert set(shares) == set(weights)
    assert all(s >= 0 for s in shares.values())
    if any(w > 0 for w in weights.values()):
        assert sum(shares.values()) == shared
        total = sum(weights.values())
        for k, w in weights.items():
            assert abs(shares[k] - shared * w / total) < 1.0001
    else:
        assert sum(shares.values()) == 0


@given(st.integers(0, 10**14), st.integers(0, 10**13), st.integers(1, 10**7), st.integers(0, 4 * 10**6))
def test_forecast_is_monotone_and_exact_at_edges(actual: int, window: int, window_s: int, remaining: int) -> None:
    f = money.forecast_month_end(actual, window, window_s, remaining)
    assert f >= actual
    assert f == actual + window * remaining // window_s
    assert money.forecast_month_end(actual, window, window_s, 0) == actual


@pytest.mark.parametrize(
    ("model", "premium"),
    [("gpt-4o", True), ("openai/gpt-4o-2024-08-06", True), ("gpt-4o-mini", False), ("claude-3-haiku-20240307", False),
     ("claude-sonnet-4-20250514", True), ("llama-3.2-1b", False), ("gemini-1.5-flash", False), ("o3-mini", False)],
)  # fmt: skip
def test_premium_tier(model: str, premium: bool) -> None:
    assert money.is_premium(model) is premium


def test_premium_regex_in_views_is_the_python_one() -> None:
    from spendstream.core.schemas import schema_dir

    literal = "'" + money.PREMIUM_MODEL_REGEX.replace("\\", "\\\\") + "'"
    views = (schema_dir() / "clickhouse" / "0005_report_views.sql").read_text()
    assert views.count(literal) == 2
    assert (schema_dir() / "clickhouse" / "0021_served_requests.sql").read_text().count(literal) == 1  # model mix


def test_money_edges() -> None:
    assert cell_text("usd", -3_105_000_000) == "-$3.10"
    assert cell_text("usd", 21_750) == "$0.00002175"  # a cheap call's spend is not $0.00 in a report table
    assert cell_text("usd", 12_340_000) == "$0.01234"
    assert money.usd_str(750) == "0.000000750"
    assert money.nanos_from_usd("12000") == 12_000 * B
    with pytest.raises(ValueError):
        money.nanos_from_usd("0.0000000001")
    assert monthly_equivalent("quarter", 9 * B, date(2026, 2, 1)) == 3 * B
    assert monthly_equivalent("day", 1, date(2026, 2, 1)) == 28


def test_a_team_with_several_budgets_is_held_by_the_tightest_in_reports_and_views(seeded: reports.Ledger) -> None:
    """$100 a day and $12,000 a month allow $3,000 in April: the team's budget is the tightest monthly equivalent,
    not the sum of its budgets ($15,000), in the chargeback, the forecast and the SQL views alike."""
    april = date(2026, 4, 1)
    lines = [("team:engineering", "day", 100 * B), ("team:engineering", "month", 12_000 * B)]
    load_budgets(seeded.client, DB, [*lines, ("team:sales", "month", 500 * B)], april, "pv-4")
    chargeback = reports.chargeback(seeded, april, datetime(2026, 4, 10, tzinfo=UTC))
    assert by(chargeback, "department")["engineering"]["budget"] == 3_000 * B
    assert chargeback.totals["budget"] == 3_500 * B
    view = dict(seeded.client.query(
        f"SELECT department, budget_nanos FROM {DB}.chargeback_monthly WHERE month = '2026-04-01'"
    ).result_rows)  # fmt: skip
    assert view == {"engineering": 3_000 * B, "sales": 500 * B}
    forecast = reports.forecast(seeded, datetime(2026, 4, 10, tzinfo=UTC))
    assert by(forecast, "team")["engineering"]["budget"] == 3_000 * B


def test_the_forecast_says_what_the_edges_do_to_a_team_now(seeded: reports.Ledger) -> None:
    """A team held by a day or week budget can be shut off today while its month looks far from its budget: the
    forecast names the restriction in force (the newest decision on the team, unexpired, not an allow)."""
    columns = ["scope", "action", "reason", "spend_nanos", "limit_nanos", "period", "version", "issued_at",
               "expires_at", "policy_version"]  # fmt: skip
    later = NOW + timedelta(hours=6)
    seeded.client.insert(f"{DB}.decisions", [
        ["team:sales", "shutoff", "week budget used", 1_400 * B, 1_400 * B, "week", 2, NOW, later, "pv-1"],
        ["team:marketing", "alert", "80 %", 1, 1, "month", 3, NOW - timedelta(days=30), NOW - timedelta(days=1), "pv"],
    ], column_names=columns)  # fmt: skip
    rows = by(reports.forecast(seeded, NOW), "team")
    assert rows["sales"]["edges_now"] == "shutoff (week)"
    assert rows["marketing"]["edges_now"] == rows["engineering"]["edges_now"] == ""  # expired; never restricted


def test_a_name_that_starts_like_a_formula_stays_text_in_csv(seeded: reports.Ledger) -> None:
    """Any caller can name a feature or user (a header, an ingested event): in the CSV finance opens in a
    spreadsheet it must not run as a formula. Money, written by spendstream, stays a number, negative or not."""
    from spendstream.analytics import focus
    from spendstream.analytics.report_model import Column, Report

    hostile = ['=HYPERLINK("http://evil","x")', "+1+cmd|calc", "@SUM(1)", "-2+3"]
    report = Report("top", "t", [Column("key", "Name"), Column("spend", "Spend", "usd")],
                    [{"key": name, "spend": -5 * B} for name in hostile])  # fmt: skip
    lines = render(report, "csv").splitlines()[1:]
    assert [line.split(",")[-1] for line in lines] == ["-5.000000000"] * 4
    assert all(line.startswith("\"'") or line.startswith("'") for line in lines), lines
    # a plain number in a text cell (``spendstream sql`` writes a Decimal or a Float so) runs nothing and is
    # left a number: a finance session's negative variance was quoted, and the column no longer added up
    numbers = Report("sql", "t", [Column("v", "v")], [{"v": v} for v in ("-0.011970003", "-1.5", "+2", "-3e-05")])
    assert render(numbers, "csv").splitlines()[1:] == ["-0.011970003", "-1.5", "+2", "-3e-05"]
    out = io.StringIO()
    string_column = next(i for i, c in enumerate(focus.COLUMNS) if c.kind == "string")
    typical = {"cost": 0, "quantity": 0, "integer": 0, "datetime": NOW, "json": "{}", "string": "x"}
    row = [typical[c.kind] for c in focus.COLUMNS]
    row[string_column] = "=1+1"
    focus.write_csv(iter([[tuple(row)]]), out)
    assert "'=1+1" in out.getvalue().splitlines()[1]


def test_calls_reported_without_a_latency_are_not_zero_milliseconds(ledger: Any) -> None:
    """A user session: 11 of 17 ingest events carried no latency (stored as 0), and the model's p50 read 0 ms."""
    rows = [row("2026-03-02 10:00", "web", "chat", "gpt-4o", B, 0) for _ in range(11)]
    rows += [row("2026-03-02 11:00", "web", "chat", "gpt-4o", B, ms) for ms in (300, 400, 500, 600, 700, 800)]
    ledger.insert(f"{DB}.usage_ledger", rows, column_names=LEDGER_COLUMNS)
    report = reports.latency(reports.Ledger(ledger, DB, "UTC"), date(2026, 3, 1), date(2026, 3, 31))
    (only,) = report.rows
    assert (only["requests"], only["timed"], only["p50"], only["p99"]) == (17, 6, 600, 800)

"""The API against a real broker and chDB: ingest lands once (through the real ledger sink), bad input
gets precise 400s, limits give 413, reports come back as JSON, admin endpoints need the token."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from spendstream.api.app import create_app
from spendstream.core.config import Settings, load_settings
from spendstream.core.ledger_store import connect, migrate
from spendstream.sink.ledger_sink import LedgerSink

B = 1_000_000_000
ADMIN = {"Authorization": "Bearer s3cret"}  # the admin token of api_settings may do everything


def event(**kw: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()), "occurred_at": datetime.now(UTC).isoformat(), "org": "acme",
        "team": "marketing", "feature": "ai_chatbot", "provider": "openai", "model_requested": "gpt-4o-mini",
        "input_tokens": 1000, "output_tokens": 200, "cost_nanos": 270_000, "latency_ms": 420, **kw,
    }  # fmt: skip


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return load_settings(**{**settings.model_dump(exclude={"admin_token"}), "admin_token": "s3cret"})


@pytest.fixture
def shared_client(api_settings: Settings) -> Iterator[Any]:
    """One chDB client for the sink and the API, as the embedded runtime shares it."""
    client = connect(api_settings)
    migrate(client, api_settings)
    yield client
    client.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_client(settings: Settings, ledger: Any, body: Any, **app_kw: Any) -> Any:
    async with TestClient(TestServer(create_app(settings, ledger, **app_kw))) as http:
        return await body(http)


def ledger_count(client: Any, ids: list[str]) -> int:
    return client.query(
        "SELECT count() FROM spendstream.usage_ledger FINAL WHERE toString(event_id) IN {ids:Array(String)}",
        parameters={"ids": ids},
    ).result_rows[0][0]


def test_batch_posted_twice_lands_once(api_settings: Settings, shared_client: Any) -> None:
    batch = [event(), event(team="sales", cost_nanos=3 * B), event(user="u7")]
    ids = [e["event_id"] for e in batch]

    async def body(http: TestClient) -> None:
        first = await http.post("/v1/usage", json={"events": batch}, headers=ADMIN)
        assert first.status == 202, await first.text()
        assert (await first.json()) == {"accepted": 3, "event_ids": ids}
        again = await http.post("/v1/usage", json=batch, headers=ADMIN)  # a client retry, as a bare array
        assert again.status == 202
        single = await http.post("/v1/usage", json=batch[0], headers=ADMIN)
        assert (await single.json())["accepted"] == 1

    run(_with_client(api_settings, shared_client, body))
    sink = LedgerSink(api_settings, shared_client)
    worker = threading.Thread(target=sink.run, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while sink.stats.inserted + sink.stats.superseded < 7 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        sink.stop()
        worker.join(60)
    assert sink.stats.inserted + sink.stats.superseded == 7  # every publish reached the sink...
    # the progress line adds up: what was consumed is inserted, dead-lettered or skipped as a copy
    assert "consumed 7, inserted 3, dead-lettered 0 {}, copies skipped 4 " in sink._progress_line(0, 0)
    assert ledger_count(shared_client, ids) == 3  # ...and FINAL counts each event once
    spend = shared_client.query("SELECT sum(cost_nanos) FROM spendstream.usage_ledger FINAL").result_rows[0][0]
    assert spend == 270_000 * 2 + 3 * B


@pytest.mark.parametrize(
    ("payload", "problems"),
    [
        ([event(input_tokens=-5)], [(0, "input_tokens", "greater than or equal to 0")]),
        ([event(input_tokens="10")], [(0, "input_tokens", "valid integer")]),  # counts are never coerced
        ([event(output_tokens=True)], [(0, "output_tokens", "valid integer")]),
        ([event(latency_ms=4.0)], [(0, "latency_ms", "valid integer")]),
        ([event(input_tokens=10**16, cost_nanos=None)], [(0, "input_tokens", "less than or equal to 100000000000")]),
        ([event(cost_nanos=10**17)], [(0, "cost_nanos", "less than or equal to 10000000000000000")]),
        ([event(), {"provider": "openai"}], [(1, "event_id", "required")]),
        ([event(), event(event_id="not-a-uuid")], [(1, "event_id", "UUID")]),
        ([event(occurred_at="2026-03-01T10:00:00")], [(0, "occurred_at", "timezone")]),
        ([event(cached_input_tokens=2000)], [(0, "cached_input_tokens", "exceed input_tokens")]),
        ([event(model_requested="")], [(0, "model_requested", "missing provider or model_requested")]),
        ([event(prompt="secret text")], [(0, "prompt", "Extra inputs are not permitted")]),
        ([event(occurred_at=(datetime.now(UTC) + timedelta(hours=2)).isoformat())], [(0, "occurred_at", "future")]),
        ([event(), 42], [(1, None, "JSON object")]),
        ({"events": "nope"}, [(None, "events", "array")]),
        ([], [(None, "events", "empty")]),
    ],
)
def test_bad_input_gets_a_precise_400_and_nothing_is_published(
    api_settings: Settings, shared_client: Any, payload: Any, problems: list[tuple[Any, Any, str]]
) -> None:
    async def body(http: TestClient) -> dict[str, Any]:
        response = await http.post("/v1/usage", json=payload, headers=ADMIN)
        assert response.status == 400
        return await response.json()

    answer = run(_with_client(api_settings, shared_client, body))
    assert "nothing was accepted" in answer["error"]
    assert [(p["index"], p["field"]) for p in answer["problems"]] == [(i, f) for i, f, _ in problems]
    for got, (_, _, text) in zip(answer["problems"], problems, strict=True):
        assert text in got["message"]


def test_not_json_and_size_limits(api_settings: Settings, shared_client: Any) -> None:
    async def body(http: TestClient) -> None:
        as_json = {**ADMIN, "Content-Type": "application/json"}
        response = await http.post("/v1/usage", data=b"{not json", headers=as_json)
        assert response.status == 400 and "not JSON" in (await response.json())["error"]
        response = await http.post("/v1/usage", json=[event() for _ in range(4)], headers=ADMIN)
        assert response.status == 413 and "at most 3" in (await response.json())["error"]
        response = await http.post("/v1/usage", data=b"[" + b" " * 70_000 + b"]", headers=as_json)
        assert response.status == 413

    run(_with_client(api_settings, shared_client, body, max_body_bytes=64 * 1024, max_events=3))


def test_reports_and_admin(api_settings: Settings, shared_client: Any) -> None:
    now = datetime.now(UTC)
    shared_client.insert(
        "spendstream.usage_ledger",
        [[uuid.uuid4(), now, "engineering", "ai_code_review", "openai", "gpt-4o", 5 * B]],
        column_names=["event_id", "occurred_at", "team", "feature", "provider", "model_requested", "cost_nanos"],
    )
    month = now.strftime("%Y-%m")
    around_now = {"from": str((now - timedelta(days=1)).date()), "to": str((now + timedelta(days=1)).date())}

    async def body(http: TestClient) -> None:
        doc = {
            "month": month,
            "policy_version": "pv-9",
            "budgets": [{"scope": "team:engineering", "limit_usd": "12000"}],
        }
        assert (await http.post("/v1/admin/budgets", json=doc)).status == 401
        wrong = await http.post("/v1/admin/budgets", json=doc, headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
        auth = ADMIN
        loaded = await http.post("/v1/admin/budgets", json=doc, headers=auth)
        assert (await loaded.json()) == {"loaded": 1, "month": f"{month}-01"}
        bad = await http.post(
            "/v1/admin/budgets", json={"month": month, "budgets": [{"scope": "team:x"}]}, headers=auth
        )
        assert bad.status == 400 and "limit_usd" in (await bad.json())["error"]
        chargeback = await (await http.get(f"/v1/reports/chargeback?month={month}", headers=ADMIN)).json()
        (row,) = chargeback["rows"]
        assert (row["department"], row["budget_usd"], row["actual_nanos"]) == ("engineering", "12000.000000000", 5 * B)
        for kind in ("weekly", "forecast", "top", "mix", "latency"):
            response = await http.get(f"/v1/reports/{kind}", headers=ADMIN)
            assert response.status == 200 and (await response.json())["report"] == kind
        top = await (await http.get("/v1/reports/top?by=team&limit=1", headers=ADMIN)).json()
        assert top["rows"][0]["key"] == "engineering" and top["rows"][0]["spend_usd"] == "5.000000000"
        assert (await http.get("/v1/reports/top?by=colour", headers=ADMIN)).status == 400
        assert (await http.get("/v1/reports/weekly?as_of=yesterday", headers=ADMIN)).status == 400
        assert (await http.get("/v1/reports/nope", headers=ADMIN)).status == 404
        rebuilt = await http.post("/v1/admin/rollup/rebuild", json=around_now, headers=auth)
        assert (await rebuilt.json())["rebuilt_groups"] == 1

    run(_with_client(api_settings, shared_client, body))


def test_forecast_of_a_trickle_against_a_large_budget(api_settings: Settings, shared_client: Any) -> None:
    """A few cheap calls against a large budget run it out centuries away: the forecast says never, not a 500."""
    now = datetime.now(UTC)
    an_hour_ago_this_month = max(now - timedelta(hours=1), now.replace(day=1, hour=0, minute=0, second=0))
    shared_client.insert(
        "spendstream.usage_ledger",
        [[uuid.uuid4(), an_hour_ago_this_month, "sales", "ai_lead_scorer", "openai", "gpt-4o-mini", 1]],
        column_names=["event_id", "occurred_at", "team", "feature", "provider", "model_requested", "cost_nanos"],
    )
    doc = {
        "month": now.strftime("%Y-%m"),
        "policy_version": "pv-1",
        "budgets": [{"scope": "team:sales", "limit_usd": "6000"}],
    }

    async def body(http: TestClient) -> None:
        assert (await http.post("/v1/admin/budgets", json=doc, headers=ADMIN)).status == 200
        response = await http.get("/v1/reports/forecast", headers=ADMIN)
        assert response.status == 200, await response.text()
        (row,) = (await response.json())["rows"]
        assert (row["team"], row["actual_nanos"], row["exhausted_on"]) == ("sales", 1, None)

    run(_with_client(api_settings, shared_client, body))


def test_a_correction_under_an_accepted_event_id_is_said_to_be_dropped(
    api_settings: Settings, shared_client: Any
) -> None:
    """A user session re-posted an event with a corrected cost under its event_id: 202, and the ledger kept the
    first version without a word. The 202 says which copies differ from what was accepted."""
    first = event(cost_nanos=3_500_000)
    corrected = {**first, "cost_nanos": 2_501_000_000}

    async def body(http: TestClient) -> None:
        assert (await http.post("/v1/usage", json=[first], headers=ADMIN)).status == 202
        retried = await http.post("/v1/usage", json=[dict(first)], headers=ADMIN)  # the same content: a retry
        assert "other_versions_dropped" not in await retried.json()
        answer = await http.post("/v1/usage", json=[event(), corrected], headers=ADMIN)
        assert answer.status == 202
        [dropped] = (await answer.json())["other_versions_dropped"]
        assert (dropped["index"], dropped["event_id"]) == (1, first["event_id"])
        assert "keep the first version" in dropped["message"] and "new event_id" in dropped["message"]

    run(_with_client(api_settings, shared_client, body))


def test_a_batch_holding_one_event_twice_gets_a_400_naming_both(api_settings: Settings, shared_client: Any) -> None:
    """It was answered "accepted": 2 and kept once; the same id under another team is another event."""
    twice = event()
    other_team = {**twice, "team": "sales"}

    async def body(http: TestClient) -> None:
        response = await http.post("/v1/usage", json=[twice, event(), dict(twice)], headers=ADMIN)
        assert response.status == 400, await response.text()
        [problem] = (await response.json())["problems"]
        assert problem == {"index": 2, "field": "event_id", "message": "the same event as index 0 of this batch"}
        both = await http.post("/v1/usage", json=[twice, other_team], headers=ADMIN)
        assert both.status == 202 and (await both.json())["accepted"] == 2

    run(_with_client(api_settings, shared_client, body))


def test_budgets_for_a_month_outside_the_report_range_get_a_400(api_settings: Settings, shared_client: Any) -> None:
    async def body(http: TestClient) -> None:
        for month in ("0001-01", "9999-12", "1969-12"):
            doc = {"month": month, "budgets": [{"scope": "team:engineering", "limit_usd": "1"}]}
            response = await http.post("/v1/admin/budgets", json=doc, headers=ADMIN)
            assert response.status == 400, await response.text()
            assert f"month must be between 1970-01 and 2199-12, got {month}" in (await response.json())["error"]
        report = await http.get("/v1/reports/chargeback?month=0001-01", headers=ADMIN)
        assert report.status == 400 and "got 0001-01" in (await report.json())["problems"][0]["message"]

    run(_with_client(api_settings, shared_client, body))


def test_a_range_that_ends_before_it_starts_gets_a_400_naming_to(api_settings: Settings, shared_client: Any) -> None:
    async def body(http: TestClient) -> None:
        for kind in ("top", "mix", "latency"):
            for query in ("from=2199-12-31&to=1970-01-01", "from=2199-12-31"):  # the second: to defaults to today
                response = await http.get(f"/v1/reports/{kind}?{query}", headers=ADMIN)
                assert response.status == 400, (kind, query, await response.text())
                [problem] = (await response.json())["problems"]
                assert problem["field"] == "to" and "ends before it starts" in problem["message"], problem

    run(_with_client(api_settings, shared_client, body))


def test_a_weekly_report_of_more_than_two_years_gets_a_400(api_settings: Settings, shared_client: Any) -> None:
    """1,000 weeks took 75 s and held the ledger: every report, export and registration waited behind it."""

    async def body(http: TestClient) -> None:
        response = await http.get("/v1/reports/weekly?weeks=1000", headers=ADMIN)
        assert response.status == 400, await response.text()
        [problem] = (await response.json())["problems"]
        assert problem["field"] == "weeks" and "between 1 and 104, got 1000" in problem["message"], problem
        assert (await http.get("/v1/reports/weekly?weeks=104", headers=ADMIN)).status == 200

    run(_with_client(api_settings, shared_client, body))


def test_report_totals_beyond_int64_are_exact(api_settings: Settings, shared_client: Any) -> None:
    """Two accepted costs of $5 B each sum past Int64: reports show $10 B, not a wrapped negative total."""
    big = 5 * 10**18
    shared_client.insert(
        "spendstream.usage_ledger",
        [[uuid.uuid4(), datetime.now(UTC), "ovf", "f", "openai", "o1-pro", big, 1] for _ in range(2)],
        column_names=["event_id", "occurred_at", "team", "feature", "provider", "model_requested", "cost_nanos",
                      "input_tokens"],
    )  # fmt: skip
    month = datetime.now(UTC).strftime("%Y-%m")

    async def body(http: TestClient) -> None:
        async def rows(path: str) -> list[dict[str, Any]]:
            response = await http.get(path, headers=ADMIN)
            assert response.status == 200, await response.text()
            return (await response.json())["rows"]

        (top,) = await rows("/v1/reports/top?by=team")
        assert (top["key"], top["spend_nanos"], top["spend_usd"]) == ("ovf", 2 * big, "10000000000.000000000")
        assert (await rows("/v1/reports/weekly"))[0]["spend_nanos"] == 2 * big
        assert (await rows("/v1/reports/mix"))[0]["spend_nanos"] == 2 * big
        (forecast,) = [r for r in await rows("/v1/reports/forecast") if r["team"] == "ovf"]
        assert forecast["actual_nanos"] == 2 * big
        (saving,) = [r for r in await rows(f"/v1/reports/savings?month={month}") if r["team"] == "ovf"]
        assert min(v for k, v in saving.items() if k.endswith("_nanos") and v is not None) >= 0

    run(_with_client(api_settings, shared_client, body))


def test_an_unknown_model_the_policy_rejects_is_refused_at_ingest_naming_it(
    api_settings: Settings, shared_client: Any, tmp_path: Any
) -> None:
    """With ``pricing.unknown_model: reject`` the processor dead-letters an unpriced event of an unknown model; the
    API refuses it with 400 and the reason instead of a 202 whose events then vanish into the DLQ."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: strict\npricing: {unknown_model: reject}\n")
    settings = api_settings.model_copy(update={"policy": policy})
    unknown = event(model_requested="gpt-9-turbo", cost_nanos=None)
    priced = event(model_requested="gpt-9-turbo", cost_nanos=5)  # a cost the client sends is its own word

    async def body(http: TestClient) -> None:
        refused = await http.post("/v1/usage", json=[event(cost_nanos=None), unknown], headers=ADMIN)
        assert refused.status == 400, await refused.text()
        (problem,) = (await refused.json())["problems"]
        assert problem["index"] == 1 and problem["field"] == "model_requested"
        assert "gpt-9-turbo" in problem["message"] and "unknown_model: reject" in problem["message"]
        assert (await http.post("/v1/usage", json=[priced, event(cost_nanos=None)], headers=ADMIN)).status == 202

    run(_with_client(settings, shared_client, body))


def test_reports_cut_months_in_the_timezone_of_the_policy_in_force_and_follow_a_new_one(
    api_settings: Settings, shared_client: Any
) -> None:
    """A user session applied a Berlin policy and read ``params.timezone = "UTC"``: reports cut by
    SPENDSTREAM_TIMEZONE, while budgets and the report e-mails cut by the policy's. 23:30 UTC on 30 November is
    December in Berlin and November in New York; the report follows the policy applied, without a restart."""
    from spendstream.core.policy import parse_policy
    from spendstream.core.policy_log import publish_policy

    late = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)
    shared_client.insert(
        "spendstream.usage_ledger",
        [[uuid.uuid4(), late, "marketing", "ai_chatbot", "openai", "gpt-4o-mini", 7 * B]],
        column_names=["event_id", "occurred_at", "team", "feature", "provider", "model_requested", "cost_nanos"],
    )
    conf = api_settings.kafka_client_config()
    assert api_settings.timezone == "UTC"
    publish_policy(conf, parse_policy("name: berlin\ntimezone: Europe/Berlin\n", "berlin.yaml"))

    async def month_of_late_spend(http: TestClient, timezone: str) -> str:
        deadline = time.monotonic() + 30
        while True:
            reports = {}
            for month in ("2026-11", "2026-12"):
                response = await http.get(f"/v1/reports/chargeback?month={month}", headers=ADMIN)
                assert response.status == 200, await response.text()
                reports[month] = await response.json()
            if all(r["params"]["timezone"] == timezone for r in reports.values()):
                break
            assert time.monotonic() < deadline, [r["params"] for r in reports.values()]
            await asyncio.sleep(0.2)
        (month,) = [m for m, r in reports.items() if r["totals"] and r["totals"]["actual_nanos"] == 7 * B]
        return month

    async def body(http: TestClient) -> None:
        assert await month_of_late_spend(http, "Europe/Berlin") == "2026-12"
        publish_policy(conf, parse_policy("name: east\ntimezone: America/New_York\n", "east.yaml"))
        assert await month_of_late_spend(http, "America/New_York") == "2026-11"
        page = await http.get("/", headers=ADMIN)
        assert page.status == 200

    run(_with_client(api_settings, shared_client, body))

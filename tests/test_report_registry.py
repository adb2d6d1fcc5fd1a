"""Adding a report is one registry entry: the CLI and the API both offer it, with no other file changed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from spendstream.analytics.report_model import Column, Report
from spendstream.analytics.report_registry import REPORTS, ReportRequest, ReportSpec
from spendstream.api.app import create_app
from spendstream.cli import main
from spendstream.core.config import load_settings
from spendstream.core.ledger_store import connect


def _teams(request: ReportRequest) -> Report:
    rows = request.ledger.rows("SELECT team, count() FROM {db}.usage_ledger FINAL GROUP BY team ORDER BY team")
    return Report("teams", "Events per team", [Column("team", "team"), Column("events", "events", "int")],
                  [{"team": team, "events": n} for team, n in rows])  # fmt: skip


def test_a_report_registered_once_is_served_by_the_cli_and_the_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPENDSTREAM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SPENDSTREAM_ADMIN_TOKEN", "s3cret")
    monkeypatch.setitem(REPORTS, "teams", ReportSpec("teams", _teams))
    insert = (
        "INSERT INTO spendstream.usage_ledger (event_id, occurred_at, team, provider, model_requested, cost_nanos) "
        "VALUES (generateUUIDv4(), now(), 'search', 'openai', 'gpt-4o', 5)"
    )
    assert main(["sql", "--write", insert]) == 0
    capsys.readouterr()
    assert main(["report", "teams", "--format", "json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    assert from_cli["rows"] == [{"team": "search", "events": 1}]

    settings = load_settings()
    client = connect(settings)

    async def ask() -> tuple[int, Any]:
        async with TestClient(TestServer(create_app(settings, client))) as http:
            response = await http.get("/v1/reports/teams", headers={"Authorization": "Bearer s3cret"})
            return response.status, await response.json()

    try:
        status, from_api = asyncio.run(ask())
    finally:
        client.close()
    assert status == 200 and from_api["rows"] == from_cli["rows"]


def test_an_option_a_report_does_not_read_is_refused_not_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user session: `report forecast --month 2026-11` printed December's forecast and exit 0."""
    monkeypatch.setenv("SPENDSTREAM_DATA_DIR", str(tmp_path / "data"))
    assert main(["ledger", "migrate"]) == 0
    capsys.readouterr()
    assert main(["report", "forecast", "--month", "2026-11"]) == 2
    error = capsys.readouterr().err
    assert "does not take month (--month) (it forecasts the current month from now); it takes no option" in error
    assert main(["report", "chargeback", "--limit", "5"]) == 2
    assert "it takes month (--month)" in capsys.readouterr().err
    assert main(["report", "top", "--by", "team", "--limit", "5"]) == 0


def test_a_report_read_straight_from_the_ledger_cuts_weeks_where_the_report_email_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user session: the CFO e-mail for the week of 2026-11-30 said $0.078593182 (cut in the policy's Berlin
    weeks) and the command it suggests, `spendstream report weekly --as-of 2026-11-30`, $0.087348182 (cut in UTC,
    SPENDSTREAM_TIMEZONE's default). With no process holding the embedded ledger, the command reads the policy
    `dev` last had in force from the data directory, and both agree."""
    from datetime import UTC, date, datetime

    from spendstream.core.codec import AvroCodec
    from spendstream.core.events import PolicyRecord
    from spendstream.core.notification_policy import ReportSchedule
    from spendstream.core.policy import parse_policy
    from spendstream.core.policy_log import LAST_POLICY_FILE
    from spendstream.notifier.reports import build_scheduled_report

    data = tmp_path / "data"
    monkeypatch.setenv("SPENDSTREAM_DATA_DIR", str(data))
    monkeypatch.delenv("SPENDSTREAM_TIMEZONE", raising=False)
    monkeypatch.delenv("SPENDSTREAM_POLICY", raising=False)
    insert = (
        "INSERT INTO spendstream.usage_ledger (event_id, occurred_at, team, provider, model_requested, cost_nanos) "
        "VALUES (generateUUIDv4(), '2026-11-30 12:00:00', 'search', 'openai', 'gpt-4o', 78593182), "
        "(generateUUIDv4(), '2026-12-06 23:30:00', 'search', 'openai', 'gpt-4o', 8755000)"  # Monday 00:30 in Berlin
    )
    assert main(["sql", "--write", insert]) == 0
    policy = parse_policy("name: berlin\ntimezone: Europe/Berlin\n", "berlin.yaml")
    record = PolicyRecord(name=policy.name, version=policy.version, document=policy.to_json(), published_by="t")
    (data / LAST_POLICY_FILE).write_bytes(AvroCodec("policy").encode(record.to_avro()))
    capsys.readouterr()

    assert main(["report", "weekly", "--as-of", "2026-11-30", "--weeks", "1", "--format", "json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    assert from_cli["params"]["timezone"] == "Europe/Berlin"
    settings = load_settings()
    client = connect(settings)
    try:
        schedule = ReportSchedule(report="weekly", to=["cfo"], weekday="monday")
        now = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
        emailed = build_scheduled_report(client, "spendstream", policy.timezone, schedule, date(2026, 11, 30), now)
    finally:
        client.close()
    assert from_cli["rows"][0]["spend_nanos"] == emailed.rows[0]["spend"] == 78593182

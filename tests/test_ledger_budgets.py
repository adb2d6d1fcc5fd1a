"""The ledger's budgets follow the policy in force outside the demo: ``spendstream policy apply`` and a
``spendstream sink --with-api`` process, then ``spendstream report chargeback`` shows budget and variance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spendstream import Emitter, UsageEvent
from spendstream.api.tokens import add_token
from spendstream.core.config import load_settings
from spendstream.core.ledger_store import connect
from spendstream.core.periods import days_in_month
from spendstream.core.policy import parse_policy
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from stub_upstream import wait_for

ROOT = Path(__file__).resolve().parents[1]
USD = 1_000_000_000

POLICY = """
name: acme-prod
budgets:
  - {scope: "team:marketing", period: month, amount_usd: 100}
  - {scope: "team:sales", period: day, amount_usd: 2}
  - {scope: "user:*", period: day, amount_usd: 5}
"""


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendstream.cli", *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _chargeback(env: dict[str, str], until: Any, timeout: float = 60) -> dict[str, dict[str, Any]]:
    """Chargeback rows by department, asked again until ``until(rows)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        report = _cli(env, "report", "chargeback", "--format", "json")
        assert report.returncode == 0, report.stderr
        rows = {row["department"]: row for row in json.loads(report.stdout)["rows"]}
        if until(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_reports_compare_spend_with_the_budgets_of_the_policy_in_force(broker: EmbeddedBroker, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {
        **os.environ,
        "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap,
        "SPENDSTREAM_DATA_DIR": str(data_dir),
        "SPENDSTREAM_API_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("SPENDSTREAM_POLICY", "SPENDSTREAM_METRICS_PORT", "SPENDSTREAM_CLICKHOUSE_DSN"):
        env.pop(name, None)
    first = tmp_path / "acme.yaml"
    first.write_text(POLICY)
    applied = _cli(env, "policy", "apply", "--wait", "0", str(first))
    assert applied.returncode == 0, applied.stderr
    log = open(tmp_path / "sink.log", "ab")  # noqa: SIM115
    sink = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "sink", "--with-api"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        assert wait_for(lambda: _answers(f"http://127.0.0.1:{env['SPENDSTREAM_API_PORT']}/healthz"), 60, 0.2)
        with Emitter(broker.bootstrap, spool_dir=tmp_path / "spool") as emitter:
            emitter.emit(
                UsageEvent(
                    team="marketing", provider="openai", model_requested="gpt-4o", input_tokens=1, cost_nanos=30 * USD
                )
            )
            assert emitter.flush(15) == 0
        rows = _chargeback(env, lambda r: r.get("marketing", {}).get("actual_nanos") == 30 * USD)
        marketing = rows["marketing"]
        assert (marketing["budget_nanos"], marketing["variance_nanos"]) == (100 * USD, 70 * USD)
        month_days = days_in_month(datetime.now(UTC).date())
        assert rows["sales"]["budget_nanos"] == 2 * USD * month_days  # a daily budget, for the month

        lowered = tmp_path / "lowered.yaml"
        lowered.write_text(POLICY.replace("amount_usd: 100", "amount_usd: 50"))
        assert _cli(env, "policy", "apply", "--wait", "0", str(lowered)).returncode == 0
        rows = _chargeback(env, lambda r: r["marketing"]["budget_nanos"] == 50 * USD)
        assert (rows["marketing"]["budget_nanos"], rows["marketing"]["variance_nanos"]) == (50 * USD, 20 * USD)
        forecast = _cli(env, "report", "forecast", "--format", "json")
        assert forecast.returncode == 0, forecast.stderr
        teams = {row["team"]: row for row in json.loads(forecast.stdout)["rows"]}
        assert teams["marketing"]["budget_nanos"] == 50 * USD
        dashboard = f"http://127.0.0.1:{env['SPENDSTREAM_API_PORT']}/"
        viewer = add_token(load_settings(data_dir=data_dir).api_tokens_path, "viewer", "budgets-test")
        request = urllib.request.Request(dashboard, headers={"Authorization": f"Bearer {viewer}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            page = response.read().decode()
        version = parse_policy(lowered.read_text()).version
        assert f'<span id="policy-version">{version}</span>' in page
    finally:
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(60) == 0
        log.close()
    client = connect(load_settings(data_dir=data_dir))
    try:
        versions = client.query("SELECT DISTINCT policy_version FROM spendstream.budgets FINAL").result_rows
    finally:
        client.close()
    assert versions == [(version,)]

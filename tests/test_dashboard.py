"""The dashboard renders real ledger data in headless Chromium: charts (SVG) and figures present."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from spendstream.analytics.budgets import load_budgets
from spendstream.api.app import create_app
from spendstream.api.tokens import add_token
from spendstream.core.config import Settings

B = 1_000_000_000
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TEAMS = {"engineering": ("gpt-4o", 300), "marketing": ("claude-3-5-sonnet-20241022", 260), "sales": ("gpt-4o-mini", 40)}


def seed(client: Any, now: datetime) -> None:
    rows = []
    for day in range(14):
        for n, (team, (model, usd)) in enumerate(TEAMS.items()):
            when = now - timedelta(days=day, minutes=5)
            if when.month != now.month and day > 0:
                continue
            rows.append([uuid.uuid4(), when, team, "ai_chatbot" if n else "ai_code_review", "openai", model,
                         (usd + 13 * day) * B, 200 + 40 * n, day % 3 == 0])  # fmt: skip
    client.insert(
        "spendstream.usage_ledger",
        rows,
        column_names=[
            "event_id",
            "occurred_at",
            "team",
            "feature",
            "provider",
            "model_requested",
            "cost_nanos",
            "latency_ms",
            "cache_hit",
        ],
    )
    budgets = [("team:engineering", "month", 4_000 * B), ("team:marketing", "month", 3_000 * B),
               ("team:sales", "month", 2_000 * B)]  # fmt: skip
    load_budgets(client, "spendstream", budgets, now.date(), "pv-dash")
    client.insert(
        "spendstream.decisions",
        [["team:marketing", "fallback", "90% of the monthly budget", 2_800 * B, 3_000 * B, "month", 4, now, "pv-dash"]],
        column_names=[
            "scope",
            "action",
            "reason",
            "spend_nanos",
            "limit_nanos",
            "period",
            "version",
            "issued_at",
            "policy_version",
        ],
    )
    client.insert(
        "spendstream.alerts",
        [[uuid.uuid4(), "team:marketing", "threshold", "warning", "marketing passed 80% of its budget", now]],
        column_names=["alert_id", "scope", "kind", "severity", "message", "occurred_at"],
    )


@pytest.fixture
def served(ledger: Any, offline_settings: Settings) -> Iterator[str]:
    """The API on a real loopback port (its own event loop in a thread), sharing the test's ledger."""
    seed(ledger, datetime.now(UTC))
    viewer = add_token(offline_settings.api_tokens_path, "viewer", "dashboard-test")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(create_app(offline_settings, ledger))
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}/?token={viewer}"  # as `spendstream dev` prints it
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(15)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def chromium(url: str, tmp_path: Path, *mode: str) -> str:
    assert CHROMIUM is not None
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1000", *mode, url,
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=90, check=True)
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_dashboard_in_headless_chromium(served: str, tmp_path: Path) -> None:
    dom = chromium(served, tmp_path, "--dump-dom")
    assert dom.count('class="series"') == 3  # one trend line per team
    for team in TEAMS:
        assert f'data-team="{team}"' in dom
    assert dom.count('class="threshold"') == 3 and "fallback 90%" in dom and ">90%</text>" in dom
    assert 'id="mix"' in dom and "gpt-4o-mini" in dom and 'id="forecast"' in dom
    assert "90% of the monthly budget" in dom and "marketing passed 80% of its budget" in dom
    assert "$4,000.00" in dom  # the engineering budget, as people read it
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    chromium(served, tmp_path, f"--screenshot={shot}")
    assert shot.stat().st_size > 20_000

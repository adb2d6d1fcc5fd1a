"""The dashboard renders real ledger data in headless Chromium: charts (SVG) and figures present."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import threading
import urllib.request
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


# (times, per) applied to the amounts above: a few cents this month, thousands, millions.
SCALES = {"small": (1, 100_000), "medium": (1, 1), "large": (1_000, 1)}


def seed(client: Any, now: datetime, scale: tuple[int, int] = (1, 1), with_budgets: bool = True) -> None:
    times, per = scale
    rows = []
    for day in range(14):
        for n, (team, (model, usd)) in enumerate(TEAMS.items()):
            when = now - timedelta(days=day, minutes=5)
            if when.month != now.month:  # the first minutes of a month: today's rows at its start, no earlier day
                if day > 0:
                    continue
                when = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            rows.append([uuid.uuid4(), when, team, "ai_chatbot" if n else "ai_code_review", "openai", model,
                         (usd + 13 * day) * B * times // per, 200 + 40 * n, day % 3 == 0])  # fmt: skip
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
    if with_budgets:
        monthly = {"team:engineering": 4_000, "team:marketing": 3_000, "team:sales": 2_000}
        budgets = [(scope, "month", usd * B * times // per) for scope, usd in monthly.items()]
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
    """The API on a real loopback port, sharing the test's ledger seeded at the medium scale."""
    seed(ledger, datetime.now(UTC))
    yield from _serve(ledger, offline_settings)


def _serve(ledger: Any, offline_settings: Settings) -> Iterator[str]:
    """The API on a real loopback port (its own event loop in a thread), opened with a viewer token."""
    viewer = add_token(offline_settings.api_tokens_path, "viewer", "dashboard-test", replace=True)
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


def _page(url: str) -> str:
    """The page as a browser gets it: ``?token=`` sets a cookie and redirects to ``/``."""
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with browser.open(url, timeout=60) as response:
        return response.read().decode()


def _axis_labels(page: str) -> list[str]:
    trend = page[page.index('id="trend"') : page.index("</svg>", page.index('id="trend"'))]
    return re.findall(r'class="axis" text-anchor="end">([^<]*)</text>', trend)


@pytest.mark.parametrize("scale", list(SCALES))
def test_dashboard_figures_keep_their_precision_at_every_scale(
    ledger: Any, offline_settings: Settings, scale: str, tmp_path: Path
) -> None:
    """A few cents of spend: the y axis does not read $0, $0, $0 and no model reads $0.00; budgets are shown."""
    seed(ledger, datetime.now(UTC), SCALES[scale])
    for url in _serve(ledger, offline_settings):
        page = _page(url)
        labels = _axis_labels(page)
        assert len(labels) == 3 and len(set(labels)) == 3, labels
        assert labels[0].startswith("$0") and all(re.fullmatch(r"\$[\d,]+(\.\d+)?", label) for label in labels)
        captions = re.findall(r'class="label">([^<]*· [^<]*req)</text>', page)
        assert captions and not [c for c in captions if c.startswith("$0.00 ")], captions
        assert page.count('class="bar ') >= 3 and 'id="no-budgets"' not in page  # utilisation bars with budgets
        assert "no budget" not in page
        if CHROMIUM is not None:
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / f"dashboard-{scale}.png"
            shot.unlink(missing_ok=True)
            chromium(url, tmp_path, f"--screenshot={shot}")
            assert shot.stat().st_size > 20_000


def test_dashboard_says_when_the_ledger_has_no_budgets(ledger: Any, offline_settings: Settings) -> None:
    seed(ledger, datetime.now(UTC), SCALES["small"], with_budgets=False)
    for url in _serve(ledger, offline_settings):
        page = _page(url)
        assert 'id="no-budgets"' in page and "of $0.00 budget" not in page


def test_dashboard_with_a_few_cents_against_a_large_budget(ledger: Any, offline_settings: Settings) -> None:
    """A fresh `dev` stack: a few calls against the reference policy's budgets. The budget would run out in
    millions of years at that rate; the page says no exhaustion date instead of failing."""
    now = datetime.now(UTC)
    ledger.insert(
        "spendstream.usage_ledger",
        [[uuid.uuid4(), now - timedelta(minutes=1), "marketing", "ai_chatbot", "openai", "gpt-4o-mini", 30_000]],
        column_names=["event_id", "occurred_at", "team", "feature", "provider", "model_requested", "cost_nanos"],
    )
    load_budgets(ledger, "spendstream", [("team:marketing", "month", 40_000 * B)], now.date(), "pv-dash")
    for url in _serve(ledger, offline_settings):
        page = _page(url)
        assert 'id="forecast"' in page and "$40,000.00" in page


def test_dashboard_budget_includes_an_approved_increase(ledger: Any, offline_settings: Settings) -> None:
    """The headline budget is the limit the processor enforces, with the approved increase named beside it."""
    from spendstream.core.budget_lifecycle import Kind, grant, new_request
    from spendstream.core.policy import parse_policy
    from spendstream.sink.audit_sink import BUDGET_EVENT_COLUMNS, budget_event_row

    now = datetime.now(UTC)
    load_budgets(ledger, "spendstream", [("team:marketing", "month", 1000 * B)], now.date(), "pv-dash")
    asked = new_request(Kind.increase, "team:marketing", "month", 500 * B, now - timedelta(hours=1), None, "vera",
                        "campaign", now - timedelta(hours=1))  # fmt: skip
    granted = grant(asked, "vera", "vp", parse_policy("{}").approval_rules, now - timedelta(hours=1))
    ledger.insert("spendstream.budget_events", [budget_event_row(granted)], column_names=BUDGET_EVENT_COLUMNS)
    for url in _serve(ledger, offline_settings):
        page = _page(url)
        assert "of $1,500.00 budget (incl. +$500.00 approved increases)" in page

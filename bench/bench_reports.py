"""Each report over a 10-million-row ledger in chDB (target: under 1 s each).

Rows are generated inside chDB (INSERT ... SELECT FROM numbers) over the last 60 days: 8 teams,
12 features, 6 models, 50k users; 1% of events replayed (same event_id) so FINAL has work to do.
Baseline from the same run: a plain sum() of the month without FINAL.

    .venv/bin/python bench/bench_reports.py [rows]
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta

from spendstream.analytics import reports
from spendstream.core.config import load_settings
from spendstream.core.ledger_store import connect, migrate

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000_000

GENERATE = """
INSERT INTO spendstream.usage_ledger (event_id, occurred_at, org, team, feature, user, customer, environment,
    provider, model_requested, model_served, input_tokens, output_tokens, cached_input_tokens, cost_nanos,
    latency_ms, status, cache_hit)
SELECT
    reinterpretAsUUID(concat(reinterpretAsFixedString(cityHash64(n)), reinterpretAsFixedString(toUInt64(n)))),
    toDateTime64({start:DateTime64(6, 'UTC')}, 6, 'UTC') + toIntervalMicrosecond(n * {step:UInt64}),
    'acme',
    ['engineering','marketing','sales','support','product','finance','legal','ops'][n % 8 + 1],
    ['ai_code_review','ai_chatbot','ai_content_generator','ai_lead_scorer','search','summarise','translate',
     'classify','extract','agent','rag','eval'][intHash32(n) % 12 + 1],
    concat('u', toString(intHash32(n) % 50000)),
    concat('c', toString(n % 997)),
    'prod',
    ['openai','openai','anthropic','anthropic','google','local'][n % 6 + 1],
    ['gpt-4o','gpt-4o-mini','claude-3-5-sonnet-20241022','claude-3-haiku-20240307','gemini-1.5-flash',
     'llama-3.2-1b'][n % 6 + 1],
    '',
    1000 + n % 3000, 100 + n % 700, n % 500, (n % 9973) * 1000,
    50 + intHash32(n) % 2000,
    if(n % 97 = 0, 'error', 'ok'),
    n % 5 = 0
FROM (SELECT toUInt64(if(number % 100 = 99, number - 1, number)) AS n FROM numbers({rows:UInt64}))
"""


def timed(label: str, fn, *args) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return label, best


def main() -> None:
    settings = load_settings(data_dir=tempfile.mkdtemp(prefix="bench-reports-"))
    client = connect(settings)
    migrate(client, settings)
    now = datetime.now(UTC)
    start = now - timedelta(days=60)
    t = time.perf_counter()
    client.command(
        GENERATE,
        parameters={"start": start.strftime("%Y-%m-%d %H:%M:%S"), "step": 60 * 86_400 * 10**6 // ROWS, "rows": ROWS},
    )
    print(f"generated {ROWS:,} ledger rows in {time.perf_counter() - t:.1f} s (spend_daily kept by the view)")
    ledger = reports.Ledger(client, "spendstream", "UTC")
    today = now.date()
    month_start = today.replace(day=1)
    lo = reports.local_midnight(today - timedelta(days=29), "UTC")
    results = [
        timed(
            "baseline: sum() of 30 days, no FINAL",
            lambda: client.query(
                "SELECT sum(cost_nanos) FROM spendstream.usage_ledger WHERE occurred_at >= {a:DateTime64(6)}",
                parameters={"a": lo.strftime("%Y-%m-%d %H:%M:%S")},
            ),
        ),
        timed("chargeback (month, FINAL)", reports.chargeback, ledger, today),
        timed("weekly (4 weeks, FINAL)", reports.weekly, ledger, today, 4),
        timed("forecast (month + 7 days, FINAL)", reports.forecast, ledger, now),
        timed("top users (month, FINAL)", reports.top, ledger, "user", month_start, today, 10),
        timed("model mix (month, FINAL)", reports.model_mix, ledger, month_start, today),
        timed("latency p50/95/99 (month, FINAL)", reports.latency, ledger, month_start, today),
        timed("spend trend (30 days, rollup)", reports.spend_trend, ledger, today - timedelta(days=29), today),
        timed(
            "chargeback_monthly view (this month)",
            lambda: client.query(
                "SELECT * FROM spendstream.chargeback_monthly WHERE month = {m:Date}", parameters={"m": month_start}
            ),
        ),
    ]
    width = max(len(label) for label, _ in results)
    print(f"\n{'report':<{width}}  best of 3")
    print(f"{'-' * width}  ---------")
    for label, seconds in results:
        print(f"{label:<{width}}  {seconds * 1000:7.0f} ms{'' if seconds < 1 else '  (over 1 s target)'}")
    client.close()


if __name__ == "__main__":
    main()

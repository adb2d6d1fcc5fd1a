"""FOCUS export of one month of the ledger in chDB: CSV and Parquet, end to end into a file.

Rows are generated inside chDB (INSERT ... SELECT FROM numbers) over November 2026: 5,000 users, each in one
of 8 teams and using 3 of 12 features, 6 models, 997 customers; 1% of events replayed (same event_id) so
FINAL has work to do. Baseline from the same run: the ClickHouse aggregation alone (rows counted, none
returned), which is the floor under any export at this grain.

    .venv/bin/python bench/bench_focus_export.py [rows]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from machine_facts import cpu_model
from spendstream.analytics.focus import export_focus
from spendstream.core.attribution import ATTRIBUTION_FIELDS
from spendstream.core.config import load_settings
from spendstream.core.ledger_store import connect, migrate

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000_000
MONTH = date(2026, 11, 1)

GENERATE = """
INSERT INTO spendstream.usage_ledger (event_id, occurred_at, org, division, team, feature, user, customer,
    environment, provider, model_requested, model_served, input_tokens, output_tokens, cached_input_tokens,
    cost_nanos, latency_ms, status, cache_hit)
SELECT
    reinterpretAsUUID(concat(reinterpretAsFixedString(cityHash64(n)), reinterpretAsFixedString(toUInt64(n)))),
    toDateTime64('2026-11-01 00:00:00', 6, 'UTC')
        + toIntervalMicrosecond(n * intDiv(30 * 86400 * 1000000, {rows:UInt64})),
    'acme', ['research', 'go-to-market'][u % 2 + 1],
    ['engineering','marketing','sales','support','product','finance','legal','ops'][u % 8 + 1],
    ['ai_code_review','ai_chatbot','ai_content_generator','ai_lead_scorer','search','summarise','translate',
     'classify','extract','agent','rag','eval'][(u + n % 3) % 12 + 1],
    concat('u', toString(u)), concat('c', toString(u % 997)), 'prod',
    ['openai','openai','anthropic','anthropic','google','local'][n % 6 + 1],
    ['gpt-4o','gpt-4o-mini','claude-3-5-sonnet-20241022','claude-3-haiku-20240307','gemini-1.5-flash',
     'llama-3.2-1b'][n % 6 + 1],
    '', 1000 + n % 3000, 100 + n % 700, n % 500, (n % 9973) * 1000 + 750, 50 + intHash32(n) % 2000,
    if(n % 97 = 0, 'error', 'ok'), n % 5 = 0
FROM (SELECT n, intHash32(n) % 5000 AS u
      FROM (SELECT toUInt64(if(number % 100 = 99, number - 1, number)) AS n FROM numbers({rows:UInt64})))
"""


def main() -> None:
    print(f"cpu: {cpu_model()} x {os.cpu_count()}; load average before: {os.getloadavg()}")
    data_dir = tempfile.mkdtemp(prefix="bench-focus-")
    settings = load_settings(data_dir=data_dir)
    client = connect(settings)
    migrate(client, settings)
    started = time.perf_counter()
    client.command(GENERATE.replace("{rows:UInt64}", str(ROWS)))
    client.command("OPTIMIZE TABLE spendstream.usage_ledger")  # merged parts, as an older month is
    ledger_rows = client.query("SELECT count() FROM spendstream.usage_ledger FINAL").result_rows[0][0]
    print(f"generated {ROWS:,} rows ({ledger_rows:,} after FINAL) in {time.perf_counter() - started:.1f} s")

    keys = ", ".join(f"`{name}`" for name in ATTRIBUTION_FIELDS)
    started = time.perf_counter()
    groups = client.query(
        f"SELECT count() FROM (SELECT 1 FROM spendstream.usage_ledger FINAL WHERE toYYYYMM(occurred_at) = 202611 "
        f"GROUP BY toDate(occurred_at), {keys}, provider, model_requested, model_served)"
    ).result_rows[0][0]
    print(f"baseline, ClickHouse aggregation only: {groups:,} groups in {time.perf_counter() - started:.2f} s")

    out_dir = Path(data_dir) / "out"
    out_dir.mkdir()
    for fmt in ("csv", "parquet"):
        target = out_dir / f"focus.{fmt}"
        started = time.perf_counter()
        with target.open("w" if fmt == "csv" else "wb", **({"newline": ""} if fmt == "csv" else {})) as out:
            rows = export_focus(client, "spendstream", MONTH, fmt, out)
        seconds = time.perf_counter() - started
        size = target.stat().st_size / 1e6
        print(f"export {fmt:<7}: {rows:,} FOCUS rows from {ROWS:,} ledger rows in {seconds:.1f} s "
              f"({rows / seconds:,.0f} rows/s, {size:.0f} MB)")  # fmt: skip
        target.unlink()
    print(f"load average after: {os.getloadavg()}")
    client.close()
    shutil.rmtree(data_dir)


if __name__ == "__main__":
    main()

"""Time to rebuild a processor's windows from a ledger of N rows (default 1 M; try 10 M).

Rows are generated inside chDB (``bench_reports.GENERATE``: 8 teams, 12 features, 6 models, 50k users, 997
customers, 1% replayed event_ids) over the last 90 days, so the rebuild reads the whole ledger (a quarter's
windows are open). Measured: the one snapshot query (``core.ledger_spend``, FINAL), the JSON round trip the
embedded runtime adds (the processor reads it through the API), and the fold into windows for all 6 partitions.

    .venv/bin/python bench/bench_ledger_rebuild.py [rows]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta

from bench_reports import GENERATE
from machine_facts import cpu_model
from spendstream.core.config import load_settings
from spendstream.core.ledger_spend import query_spend
from spendstream.core.ledger_store import connect, migrate
from spendstream.core.policy import parse_policy
from spendstream.processor.ledger_rebuild import RebuildPlan, fold_snapshot
from spendstream.processor.spend_accounting import Retention, WindowCalendar

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
POLICY = parse_policy(
    "name: default\ntimezone: Europe/Berlin\norg: acme\n"
    "divisions: {eng: [engineering, product, ops], gtm: [marketing, sales, support], g_a: [finance, legal]}\n"
)


def main() -> None:
    print(f"cpu: {cpu_model()} x {os.cpu_count()}; load average {os.getloadavg()}")
    settings = load_settings(data_dir=tempfile.mkdtemp(prefix="bench-rebuild-"))
    client = connect(settings)
    migrate(client, settings)
    now = datetime.now(UTC)
    start = now - timedelta(days=90)
    t = time.perf_counter()
    client.command(
        GENERATE,
        parameters={"start": start.strftime("%Y-%m-%d %H:%M:%S"), "step": 90 * 86_400 * 10**6 // ROWS, "rows": ROWS},
    )
    # ingested a second after it occurred, as a sink that keeps up would: only the last minutes are "recent"
    client.command(
        "ALTER TABLE spendstream.usage_ledger UPDATE ingested_at = occurred_at + toIntervalSecond(1) WHERE 1",
        settings={"mutations_sync": 1},
    )
    print(f"generated {ROWS:,} ledger rows in {time.perf_counter() - t:.1f} s")
    lateness = 86_400
    plan = RebuildPlan(
        int(now.timestamp()), lateness, Retention(POLICY.tz, lateness, 0), WindowCalendar(POLICY.tz), POLICY.timezone
    )
    query = plan.query(int((now - timedelta(minutes=15)).timestamp() * 1000))
    best: dict[str, float] = {}
    for _ in range(3):
        t0 = time.perf_counter()
        snapshot = query_spend(client, settings.clickhouse_database, query)
        t1 = time.perf_counter()
        snapshot = json.loads(json.dumps(snapshot))
        t2 = time.perf_counter()
        windows, recent = fold_snapshot(snapshot, POLICY, plan, 6, range(6))
        t3 = time.perf_counter()
        for label, seconds in (("query", t1 - t0), ("json", t2 - t1), ("fold", t3 - t2), ("total", t3 - t0)):
            best[label] = min(best.get(label, float("inf")), seconds)
    groups = len(snapshot["groups"])
    print(
        f"{groups:,} groups -> {sum(len(w) for w in windows.values()):,} windows, "
        f"{sum(len(r) for r in recent.values()):,} recent ids"
    )
    for label, seconds in best.items():
        print(f"{label:>6}: {seconds:6.2f} s (best of 3)")
    print(f"load average after: {os.getloadavg()}")
    client.close()


if __name__ == "__main__":
    main()

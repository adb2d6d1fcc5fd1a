"""Rollups of the ledger: rebuilding ``spend_daily``, and the sealed buckets exact reports read.

``spend_daily``'s materialized view adds every insert, replays included (see
``schemas/clickhouse/0004_spend_daily_rollup.sql``); ``rebuild_spend_daily`` puts chosen days back to the
truth. The sealed rollups (``0020_sealed_report_rollups.sql``) never need that: a bucket's figures are
used only while no insert has touched it since they were taken, so they cannot over-count.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)
_FINAL = {"do_not_merge_across_partitions_select_final": 1}

_SELECT = """
SELECT toDate(occurred_at) AS day, team, feature,
       if(model_served != '', model_served, model_requested) AS model, environment,
       sum(ifNull(cost_nanos, 0)), count(), countIf(status = 'error'), countIf(cache_hit),
       countIf(cost_nanos IS NULL), sum(input_tokens), sum(output_tokens), sum(cached_input_tokens)
FROM {db}.usage_ledger FINAL
WHERE toDate(occurred_at) BETWEEN {{lo:Date}} AND {{hi:Date}}
GROUP BY day, team, feature, model, environment
"""


def rebuild_spend_daily(client: Any, db: str, start: date, end: date) -> int:
    """Recompute UTC days [start, end] of ``spend_daily``; returns the number of day groups now there.

    An insert that lands between the delete and the re-insert is counted by both; the window is
    one statement long and the next rebuild of that day corrects it.
    """
    params = {"lo": start, "hi": end}
    client.command(
        f"DELETE FROM {db}.spend_daily WHERE day BETWEEN {{lo:Date}} AND {{hi:Date}}",
        parameters=params,
        settings={"lightweight_deletes_sync": 2},
    )
    client.command(
        f"INSERT INTO {db}.spend_daily " + _SELECT.format(db=db),
        parameters=params,
        settings={"do_not_merge_across_partitions_select_final": 1},
    )
    return int(
        client.query(
            f"SELECT count() FROM (SELECT 1 FROM {db}.spend_daily WHERE day BETWEEN {{lo:Date}} AND {{hi:Date}} "
            "GROUP BY day, team, feature, model, environment)",
            parameters=params,
        ).result_rows[0][0]
    )


# -- sealed rollups (schemas/clickhouse/0020_sealed_report_rollups.sql) -------------------------------
#
# Reports read sealed buckets from a rollup and everything else from the ledger with FINAL. A seal is
# exact by construction: its rollup is a FINAL aggregate, and it stays in use only while the ledger's
# insert counter for the bucket still equals the count read *before* the aggregate. ClickHouse writes
# an insert's ledger part before the materialized view's counter part, so every insert the count
# includes was visible to the aggregate; any later insert into the bucket makes the counts differ.

HOUR = 3600
DAY = 86_400
HOURLY_KEYS = ("org", "team", "project", "feature", "environment", "provider", "model")
DAILY_KEYS = ("user", "customer")
WIDTH_OF = {**dict.fromkeys(HOURLY_KEYS, HOUR), **dict.fromkeys(DAILY_KEYS, DAY)}
SEAL_DELAY = timedelta(minutes=5)  # buckets that ended this recently still receive stragglers

# A report's requests are the calls served, by a provider or the cache: a call the gateway refused (a ``blocked``
# row, $0) is in the ledger for the audit, but counting it would make a refused burst look like traffic and
# divide the spend per request by calls that cost nothing.
SERVED = "countIf(status != 'blocked')"
_MEASURES = (
    f"sum(toInt128(ifNull(cost_nanos, 0))), {SERVED}, countIf(cache_hit), sum(toInt128(input_tokens + output_tokens))"
)
_SEAL_HOURLY = f"""
INSERT INTO {{db}}.ledger_hourly
SELECT toStartOfHour(toDateTime(occurred_at, 'UTC')) AS hour, {{seal:UInt64}}, org, team, project, feature, environment,
       provider, if(model_served != '', model_served, model_requested) AS model, {_MEASURES}
FROM {{db}}.usage_ledger FINAL WHERE {{where}}
GROUP BY hour, org, team, project, feature, environment, provider, model
"""
_SEAL_DAILY = f"""
INSERT INTO {{db}}.ledger_daily_keys
SELECT toStartOfDay(toDateTime(occurred_at, 'UTC')) AS day, {{seal:UInt64}}, dimension, key, {_MEASURES}
FROM {{db}}.usage_ledger FINAL ARRAY JOIN ['user', 'customer'] AS dimension, [user, customer] AS key
WHERE {{where}}
GROUP BY day, dimension, key
"""
_STALE = """
SELECT i.bucket, i.inserted FROM (
    SELECT toStartOfInterval(hour, INTERVAL {w:UInt32} SECOND) AS bucket, sum(rows) AS inserted
    FROM {db}.ledger_inserted GROUP BY bucket
) AS i LEFT JOIN (
    SELECT bucket, inserted AS sealed_count FROM {db}.ledger_seals FINAL WHERE width_s = {w:UInt32}
) AS s ON i.bucket = s.bucket
WHERE i.inserted != s.sealed_count AND i.bucket + {w:UInt32} <= {until:DateTime('UTC')}
ORDER BY i.bucket
"""
_VALID = """
SELECT s.bucket, s.seal FROM {db}.ledger_seals AS s FINAL INNER JOIN (
    SELECT toStartOfInterval(hour, INTERVAL {w:UInt32} SECOND) AS bucket, sum(rows) AS inserted
    FROM {db}.ledger_inserted WHERE hour >= {lo:DateTime('UTC')} AND hour < {hi:DateTime('UTC')} GROUP BY bucket
) AS i ON s.bucket = i.bucket
WHERE s.width_s = {w:UInt32} AND s.bucket >= {lo:DateTime('UTC')} AND s.bucket < {hi:DateTime('UTC')}
  AND s.inserted = i.inserted
"""


def utc_literal(instant: datetime) -> str:
    """A DateTime64(6, 'UTC') literal (instants are formatted here, never taken from input)."""
    return f"toDateTime64('{instant.astimezone(UTC):%Y-%m-%d %H:%M:%S.%f}', 6, 'UTC')"


def interval_sql(intervals: Sequence[tuple[datetime, datetime]]) -> str:
    """``occurred_at`` in any of the [start, end) intervals."""
    return " OR ".join(
        f"(occurred_at >= {utc_literal(lo)} AND occurred_at < {utc_literal(hi)})" for lo, hi in intervals
    )


def valid_seals(client: Any, db: str, width: int, lo: datetime, hi: datetime) -> dict[datetime, int]:
    """The buckets of ``width`` seconds starting in [lo, hi) whose seal still holds, with their seal ids."""
    rows = client.query(
        _VALID.replace("{db}", db),
        parameters={
            "w": width,
            "lo": lo.astimezone(UTC).replace(tzinfo=None),
            "hi": hi.astimezone(UTC).replace(tzinfo=None),
        },
    ).result_rows
    return {bucket.replace(tzinfo=UTC): int(seal) for bucket, seal in rows}


def seal(client: Any, db: str, until: datetime) -> int:
    """Seal every bucket that ended by ``until`` and has no valid seal; returns how many were sealed.

    Buckets go one UTC day at a time (one FINAL read per day and rollup). Idempotent, and safe beside
    the sink: a bucket that receives rows meanwhile is merely stale again. The rows of a superseded seal
    are never read again and are left to the rollups' TTL: deleting them could race a report that
    planned its read just before the bucket went stale.
    """
    sealed = 0
    for width, statement in ((HOUR, _SEAL_HOURLY), (DAY, _SEAL_DAILY)):
        stale = client.query(
            _STALE.replace("{db}", db), parameters={"w": width, "until": until.astimezone(UTC).replace(tzinfo=None)}
        ).result_rows
        by_day: dict[date, list[tuple[datetime, int]]] = defaultdict(list)
        for bucket, inserted in stale:
            by_day[bucket.date()].append((bucket.replace(tzinfo=UTC), int(inserted)))
        for buckets in by_day.values():
            _seal_buckets(client, db, width, statement, buckets)
            sealed += len(buckets)
    return sealed


def _seal_buckets(client: Any, db: str, width: int, statement: str, buckets: list[tuple[datetime, int]]) -> None:
    seal_id = secrets.randbits(63) or 1
    step = timedelta(seconds=width)
    where = interval_sql([(bucket, bucket + step) for bucket, _ in buckets])
    client.command(
        statement.replace("{db}", db).replace("{where}", where), parameters={"seal": seal_id}, settings=_FINAL
    )
    now = datetime.now(UTC)
    client.insert(
        f"{db}.ledger_seals",
        [[bucket, width, inserted, seal_id, now] for bucket, inserted in buckets],
        column_names=["bucket", "width_s", "inserted", "seal", "sealed_at"],
    )


def seal_periodically(client: Any, db: str, stop: threading.Event, interval_s: float = 60.0) -> None:
    """Keep the seals current until ``stop``: what reports read from the ledger stays the open tail."""
    while not stop.is_set():
        try:
            count = seal(client, db, datetime.now(UTC) - SEAL_DELAY)
            if count:
                log.info("sealed %d report buckets", count)
        except Exception as exc:  # the ledger is busy or away: reports stay exact, only slower
            log.warning("could not seal report buckets: %s", exc)
        stop.wait(interval_s)

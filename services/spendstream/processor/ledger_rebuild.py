"""Rebuilding lost window state from the ledger, exactly (pure fold here; ``recovery.rebuild_from_ledger`` applies it).

When stage 1 finds NO state for a source partition of ``spendstream.usage`` (no partial, no ids, no clock: a
fresh memory-only broker after ``spendstream dev`` restarted, a new app id, a lost changelog topic), the ledger is
the durable truth and the partition's windows are rebuilt from it before any event is read:

1. ``S_p``: the ledger sink's committed offset of every such partition is read FIRST (none: the topic start).
2. One ledger query (``core.ledger_spend``: one read of ``usage_ledger FINAL``, so one snapshot) returns exact
   integer sums per attribution and bucket for every window still open or read (``RebuildPlan``) and the ids
   of the rows ingested since ``recent_since_ms`` = min(t1 - margin, now - dedup horizon), t1 the time of step 1.
3. Each group goes to the partition the edges key it to (``org/team``, librdkafka's CRC32 partitioner), and is
   folded into that partition's windows with the policy's scopes and calendar; each becomes ONE partial whose
   offset is ``S_p - 1``. The recent ids become the partition's applied ids at offset -1 (never a real offset).
4. Every stage-2 partition is told to forget what it holds of these partitions (``ForgetMessage``), then these
   records are written and flushed, ``S_p`` is committed as stage 1's position, and stage 1 reads from it. (A group
   may land on another partition than its events were read from: the ledger fills an org an event left out, and
   edges key by the org the event names. Without the forget, stage 2 added the old share to the rebuilt one.)

Why nothing is counted twice or lost. Take an event e at offset o of partition p.
* o < S_p: the sink commits an offset only after the rows below it are inserted, so e is in the snapshot,
  counted once in the rebuilt windows; stage 1 never reads it.
* o >= S_p and e is NOT in the snapshot: stage 1 reads and counts it, the rebuilt windows do not hold it.
* o >= S_p and e IS in the snapshot: the sink inserted it after step 1, or inserted it before and had not yet
  committed it (a batch in flight: insert, dead letters, commit). Either way its ``ingested_at`` is after
  t1 - margin, so its id is among the recent ids and stage 1 skips it as a copy (it is counted in the windows).
  The argument needs the sink's insert-to-commit gap and the clock skew between the ClickHouse server and the
  processor to stay under the margin (``REBUILD_MARGIN``: 10 minutes).
* A copy re-sent by an edge later (at least once delivery) within the dedup horizon of its original's arrival:
  the original was ingested after now - horizon, so its id is seeded and the copy is skipped, as usual.
Rows without a cost (rejected unknown models) are not counted, as stage 1 dead-letters them, nor rows whose message
arrived later than the allowed lateness after their occurred_at (``arrived_at``, the Kafka timestamp the sink
writes): stage 1 dead-letters them as late, the ledger records them for finance. Counted before, they made a team's
spend jump at a restart of the embedded stack (a user session: $0.20 to $1.21, shut off by what no budget counted).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from spendstream.core.api_address import read_address
from spendstream.core.ledger_spend import SPEND_WINDOWS_PATH, SpendQuery, grains
from spendstream.core.matching import model_scope_name
from spendstream.core.periods import HOUR, PERIODS, period_window
from spendstream.core.policy import Policy
from spendstream.processor.scopes import scopes_for
from spendstream.processor.spend_accounting import (
    Retention,
    WindowCalendar,
    dedup_id,
    owner_prefix,
    window_key,
)

log = logging.getLogger(__name__)

REBUILD_MARGIN = timedelta(minutes=10)
LEDGER_WAIT_S = 120.0  # how long a processor waits for the ledger's API to answer before it gives up rebuilding
# How long a processor waits for an API to appear in its data directory at all: `dev` starts the API beside the
# processor, while a processor beside a plain `spendstream sink` has none and must not stall its partitions.
API_APPEAR_WAIT_S = 20.0

SpendSource = Callable[[SpendQuery], dict[str, list[list[Any]]]]


def usage_partition(org: str, team: str, partitions: int) -> int:
    """The usage partition of an event: edges key it ``org/team`` and librdkafka's default partitioner is CRC32."""
    return zlib.crc32(f"{org}/{team}".encode()) % partitions


@dataclass(frozen=True)
class RebuildPlan:
    """Which windows a rebuild restores at ``now_s``: every window a live processor could still write or read.

    Hours and days as long as retention keeps them (rolling budget, hourly EWMA, daily spike history); weeks,
    months and quarters while an event allowed by the lateness can still land in them (the current one, and the
    previous one within the lateness after its end).
    """

    now_s: int
    lateness_s: int
    retention: Retention
    calendar: WindowCalendar
    tz_name: str  # the policy's timezone, for the ledger's local days
    skew_s: int | None = None  # how far ahead of its arrival stage 1 takes an occurred_at (None: any)

    def wanted(self, period: str, start_s: int) -> bool:
        if period in (HOUR, "day"):
            return self.retention.live(period, start_s, self.now_s)
        end = period_window(period, datetime.fromtimestamp(start_s, UTC), self.calendar.tz)[1]
        return end.timestamp() + self.lateness_s > self.now_s

    def query(self, recent_since_ms: int) -> SpendQuery:
        """The earliest window start read per grain (``grains()`` order); ``wanted`` then picks exactly."""
        oldest = datetime.fromtimestamp(self.now_s - self.lateness_s, UTC)
        history = oldest - timedelta(days=max(self.retention.history_days, 1) + 1)
        since = {g: int(period_window(g, oldest, self.calendar.tz)[0].timestamp()) for g in grains() if g != HOUR}
        since["day"] = int(period_window("day", history, self.calendar.tz)[0].timestamp())
        hour_since = self.now_s - 3600 * (PERIODS[HOUR].retained_windows(0) + 1) - self.lateness_s
        since[HOUR] = hour_since - hour_since % 3600
        return SpendQuery(
            self.tz_name,
            tuple(max(0, since[g]) for g in grains()),
            max(0, recent_since_ms),
            self.lateness_s,
            self.skew_s,
        )


def _scopes(name: str, values: list[str], policy: Policy) -> list[str]:
    if name == "hierarchy":
        org, team, division, project = values
        return scopes_for({"org": org, "team": team, "division": division, "project": project}, policy)
    value = values[-1]
    if name == "model" and value:  # the ledger's names, as stage 1 names their scope
        value = model_scope_name(value)
    return [f"{name}:{value}"] if value else []


def fold_snapshot(
    snapshot: dict[str, list[list[Any]]], policy: Policy, plan: RebuildPlan, partitions: int, rebuild: Iterable[int]
) -> tuple[dict[int, dict[str, list[int]]], dict[int, list[tuple[bytes, int]]]]:
    """The rebuilt windows ``{partition: {window key: [nanos, requests, tokens]}}`` of the ``rebuild`` partitions,
    and their recent ids ``{partition: [(dedup_id, ingested ms)]}`` (see the module docstring)."""
    mine = set(rebuild)
    windows: dict[int, dict[str, list[int]]] = {p: {} for p in mine}
    starts: dict[tuple[str, int], int | None] = {}  # (grain, bucket) -> the window start, None if not wanted
    for row in snapshot.get("groups", ()):
        name, org, team = row[0], row[1], row[2]
        partition = usage_partition(org, team, partitions)
        if partition not in mine:
            continue
        *values, grain, bucket, nanos, requests, tokens = row[1:]
        start = starts.get((grain, bucket), -1)
        if start == -1:
            # a calendar bucket is the local midnight ClickHouse computed; the calendar decides from its noon
            start = bucket if grain == HOUR else dict(plan.calendar.starts(bucket + 43_200))[grain]
            start = starts[(grain, bucket)] = start if plan.wanted(grain, start) else None
        if start is None:
            continue
        acc = windows[partition]
        for scope in _scopes(name, values, policy):
            total = acc.setdefault(window_key(scope, grain, start), [0, 0, 0])
            total[0] += nanos
            total[1] += requests
            total[2] += tokens
    recent: dict[int, list[tuple[bytes, int]]] = {p: [] for p in mine}
    for org, team, event_id, ingested_ms in snapshot.get("recent", ()):
        partition = usage_partition(org, team, partitions)
        if partition in mine:
            recent[partition].append((dedup_id(uuid.UUID(event_id).bytes, owner_prefix(org, team)), int(ingested_ms)))
    return windows, recent


def sink_positions(kafka_conf: dict[str, Any], sink_group: str, partitions: Iterable[int]) -> dict[int, int]:
    """The ledger sink's committed usage offset per partition (-1: nothing committed, i.e. the topic start)."""
    from confluent_kafka import Consumer, TopicPartition

    from spendstream.core.topics import USAGE

    consumer = Consumer({**kafka_conf, "group.id": sink_group, "enable.auto.commit": False})
    try:
        committed = consumer.committed([TopicPartition(USAGE, p) for p in partitions], timeout=30)
        return {tp.partition: tp.offset if tp.offset >= 0 else -1 for tp in committed}
    finally:
        consumer.close()


def recent_since_ms(positions_read_at_s: float, now_s: float, dedup_horizon: timedelta) -> int:
    """Rows ingested since then are listed by id: see the module docstring."""
    return int(min(positions_read_at_s - REBUILD_MARGIN.total_seconds(), now_s - dedup_horizon.total_seconds()) * 1000)


# -- I/O: where the ledger is read from --------------------------------------------------------------------------


def spend_source(ledger_dsn: str, database: str, api_address_path: Path) -> SpendSource | None:
    """How this processor reads the ledger: a ClickHouse server directly; an embedded chDB ledger through the API of
    the process that owns it (``sink --with-api``), found through the address file it leaves in the data directory
    with a viewer token; None when the embedded ledger was never created (no ledger)."""
    if ledger_dsn.startswith("chdb://"):
        if not Path(ledger_dsn.removeprefix("chdb://")).exists():
            return None
        return _from_api(api_address_path)

    def from_server(query: SpendQuery) -> dict[str, list[list[Any]]]:
        import clickhouse_connect

        from spendstream.core.ledger_spend import query_spend

        client = clickhouse_connect.get_client(dsn=ledger_dsn)
        try:
            return query_spend(client, database, query)
        finally:
            client.close()

    return from_server


def _from_api(api_address_path: Path) -> SpendSource:
    def from_api(query: SpendQuery) -> dict[str, list[list[Any]]]:
        started = time.monotonic()
        deadline = started + LEDGER_WAIT_S
        while True:
            address = read_address(api_address_path)  # read again: the API may (re)start after this processor
            try:
                if address is None:
                    if time.monotonic() - started > API_APPEAR_WAIT_S:
                        raise LookupError(f"no API serves this data directory ({api_address_path} is missing)")
                    raise OSError(f"no API serves this data directory yet ({api_address_path} is missing)")
                url = f"{address.url.rstrip('/')}{SPEND_WINDOWS_PATH}?{urllib.parse.urlencode(query.as_params())}"
                request = urllib.request.Request(url, headers={"Authorization": f"Bearer {address.read_token}"})
                with urllib.request.urlopen(request, timeout=300) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError:
                raise
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise OSError(f"the ledger's API did not answer within {LEDGER_WAIT_S:.0f}s: {exc}") from exc
                time.sleep(0.5)

    return from_api

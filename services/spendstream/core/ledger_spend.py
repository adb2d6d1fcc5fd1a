"""Spend per attribution and time bucket, read from the ledger in ONE query: what a processor rebuilds its windows from.

One statement (one read of ``usage_ledger FINAL``, so one consistent snapshot of its parts) returns, through
GROUPING SETS:

* per ``(org, team, division, project, grain, window start)``, and per ``(org, team, <dimension>, grain, window
  start)`` for feature, user, customer, environment and model: exact sums (Int128 in SQL, integer nano-USD) of
  cost, requests and tokens, for every grain a processor keeps (``grains()``: day, week, month, quarter, local
  calendar windows of the policy's timezone, and the UTC hour; each bucketed by its period's ``ledger_bucket``),
  each from its own ``since`` on (only the windows a processor still needs).
  ``org``/``team`` stay in every set because the edges key usage records by ``org/team``, which decides the
  Kafka partition an event was counted in;
* the ids of the rows ingested since ``recent_since_ms`` (``org``, ``team``, id, ingestion ms): the rows that may
  still be on the usage topic past the sink's committed offsets, and the processor's dedup horizon.

Rows without a cost (unknown models the policy rejects) are left out: the processor dead-letters them.
The caller folds the groups into windows (``spendstream.processor.ledger_rebuild``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from spendstream.core.periods import PERIODS, tracked_series

SPEND_WINDOWS_PATH = "/v1/ledger/spend-windows"  # the API route serving ``query_spend`` (embedded ledger)
DIMENSION_SETS = ("hierarchy", "feature", "user", "customer", "environment", "model")
_KEYS = (
    "org", "team", "division", "project", "feature", "user", "customer", "environment", "model", "grain", "bucket",
    "rid",
)  # fmt: skip
_SET_COLUMNS = {
    "hierarchy": ("org", "team", "division", "project"),
    **{name: ("org", "team", name) for name in DIMENSION_SETS[1:]},
}
_ZONE = re.compile(r"^[A-Za-z0-9_+\-/]{1,64}$")


def grains() -> tuple[str, ...]:
    """The window series a processor keeps (``core.periods.tracked_series``), each bucketed by its period's
    ``ledger_bucket``: day, week, month, quarter (local windows of the policy timezone) and the UTC hour."""
    return tracked_series()


@dataclass(frozen=True)
class SpendQuery:
    tz: str  # the policy's IANA timezone: local calendar windows
    since: tuple[int, ...]  # per grain (``grains()`` order): earliest occurred_at (epoch s) bucketed
    recent_since_ms: int  # rows ingested since then are listed by event_id
    # the processor's allowed lateness: a row whose message arrived later than this after its occurred_at was
    # counted in no budget (``arrived_at``), so the sums leave it out; None: every row
    lateness_s: int | None = None
    # how far ahead of its arrival stage 1 takes an occurred_at: a row further ahead was dead-lettered by stage 1 (the
    # sink, judging by its own clock, wrote it); None: no bound
    skew_s: int | None = None

    def __post_init__(self) -> None:
        if not _ZONE.match(self.tz):
            raise ValueError(f"tz: not a timezone name: {self.tz!r}")
        names = grains()
        if len(self.since) != len(names):
            raise ValueError(f"since: expected {len(names)} values ({', '.join(names)})")
        for name, value in (*zip(names, self.since, strict=True), ("recent_since_ms", self.recent_since_ms)):
            if not isinstance(value, int) or not 0 <= value < 2**42:
                raise ValueError(f"{name}: expected a non-negative epoch integer, got {value!r}")
        for name, seconds in (("lateness_s", self.lateness_s), ("skew_s", self.skew_s)):
            if seconds is not None and (not isinstance(seconds, int) or not 0 <= seconds < 2**31):
                raise ValueError(f"{name}: expected a non-negative number of seconds, got {seconds!r}")

    def as_params(self) -> dict[str, str]:
        given = (("lateness_s", self.lateness_s), ("skew_s", self.skew_s))
        bounds = {name: str(value) for name, value in given if value is not None}
        return {"tz": self.tz, **{f"{g}_since": str(v) for g, v in zip(grains(), self.since, strict=True)},
                "recent_since_ms": str(self.recent_since_ms), **bounds}  # fmt: skip

    @classmethod
    def from_params(cls, params: Any) -> SpendQuery:
        try:
            since = tuple(int(params[f"{g}_since"]) for g in grains())
            lateness, skew = params.get("lateness_s"), params.get("skew_s")
            return cls(
                str(params["tz"]),
                since,
                int(params["recent_since_ms"]),
                None if lateness is None else int(lateness),
                None if skew is None else int(skew),
            )
        except KeyError as exc:
            raise ValueError(f"missing parameter {exc}") from exc


def _grouping_sets() -> list[tuple[str, tuple[str, ...]]]:
    """``(set name, key columns)`` in statement order."""
    sets = [(name, (*_SET_COLUMNS[name], "grain", "bucket")) for name in DIMENSION_SETS]
    sets.append(("recent", ("org", "team", "rid")))
    return sets


def _mask(columns: tuple[str, ...]) -> int:
    """``grouping(<_KEYS>)`` of a set: a 1 bit (most significant first) for each key NOT grouped by it."""
    return sum(1 << (len(_KEYS) - 1 - i) for i, key in enumerate(_KEYS) if key not in columns)


def spend_sql(db: str, query: SpendQuery) -> str:
    """Each row is expanded (ARRAY JOIN) into the grains whose ``since`` it reaches, then grouped per set."""
    sets = ", ".join(f"({', '.join(columns)})" for _, columns in _grouping_sets())
    buckets = ", ".join(
        f"('{g}', if(occurred_at >= toDateTime64({since}, 6, 'UTC'), "
        f"toInt64(toUnixTimestamp({PERIODS[g].ledger_bucket.format(tz=query.tz)})), -1))"
        for g, since in zip(grains(), query.since, strict=True)
    )
    return f"""
SELECT grouping({", ".join(_KEYS)}) AS g, {", ".join(_KEYS)},
       toString(sum(toInt128(cost))) AS nanos, countIf(served) AS requests, toString(sum(toInt128(tokens))) AS tokens,
       max(ingested_ms) AS newest_ms
FROM (
    SELECT org, team, division, project, feature, user, customer, environment,
           if(model_served != '', model_served, model_requested) AS model,
           if(ingested_at >= fromUnixTimestamp64Milli(toInt64({query.recent_since_ms})), toString(event_id), '') AS rid,
           status != 'blocked' AS served,  -- a refused call is no request and used no tokens, as stage 1 counts
           assumeNotNull(cost_nanos) AS cost, if(served, input_tokens + output_tokens, 0) AS tokens,
           toUnixTimestamp64Milli(ingested_at) AS ingested_ms,
           arrayFilter(x -> x.2 >= 0, [{buckets}]) AS buckets
    FROM {db}.usage_ledger FINAL
    WHERE occurred_at >= toDateTime64({min(query.since)}, 6, 'UTC') AND cost_nanos IS NOT NULL{_counted(query)}
)
ARRAY JOIN buckets.1 AS grain, buckets.2 AS bucket
GROUP BY GROUPING SETS ({sets})
"""


def _counted(query: SpendQuery) -> str:
    """The condition of the rows the processor counted in budgets (its checks, in microseconds): arrived within its
    allowed lateness after occurred_at, and occurred_at at most the future skew ahead of the arrival."""
    arrived_us = "toUnixTimestamp64Milli(arrived_at) * 1000"
    bounds = []
    if query.lateness_s is not None:
        bounds.append(f" AND {arrived_us} - toUnixTimestamp64Micro(occurred_at) <= {query.lateness_s * 1_000_000}")
    if query.skew_s is not None:
        bounds.append(f" AND toUnixTimestamp64Micro(occurred_at) <= {arrived_us} + {query.skew_s * 1_000_000}")
    return "".join(bounds)


def query_spend(client: Any, db: str, query: SpendQuery) -> dict[str, list[list[Any]]]:
    """Run the snapshot query; JSON-ready ``{"groups": [...], "recent": [...]}``.

    ``groups`` rows are ``[set name, org, team, value(s)..., grain, bucket_s, nanos, requests, tokens]`` with the
    set's own columns (``hierarchy``: division and project; the others: one dimension value); ``bucket_s`` is the
    window start the ledger computed (local midnight of its first day; a UTC hour). ``recent`` rows are
    ``[org, team, event_id, ingested_ms]``.
    """
    by_mask = {_mask(columns): (name, columns) for name, columns in _grouping_sets()}
    out: dict[str, list[list[Any]]] = {"groups": [], "recent": []}
    index = {key: i + 1 for i, key in enumerate(_KEYS)}
    for row in client.query(spend_sql(db, query)).result_rows:
        name, columns = by_mask[row[0]]
        values = [row[index[column]] for column in columns]
        if name == "recent":
            if values[2]:
                out["recent"].append([values[0], values[1], values[2], int(row[16])])
        else:
            out["groups"].append([name, *values, int(row[13]), int(row[14]), int(row[15])])
    return out

"""Spend per attribution and time bucket, read from the ledger in ONE query: what a processor rebuilds its windows from.

One statement (one read of ``usage_ledger FINAL``, so one consistent snapshot of its parts) returns, through
GROUPING SETS:

* per ``(org, team, division, project, local day)``, and per ``(org, team, <dimension>, local day)`` for
  feature, user, customer, environment and model: exact sums (Int128 in SQL, integer nano-USD) of cost,
  requests and tokens. ``org``/``team`` stay in every set because the edges key usage records by ``org/team``,
  which decides the Kafka partition an event was counted in;
* the same per UTC hour since ``hour_since_s`` (the hour buckets the rolling budget and the hourly spike rule read);
* the ids of the rows ingested since ``recent_since_ms`` (``org``, ``team``, id, ingestion ms): the rows that may
  still be on the usage topic past the sink's committed offsets, and the processor's dedup horizon.

Rows without a cost (unknown models the policy rejects) are left out: the processor dead-letters them.
The caller folds the groups into windows (``spendstream.processor.ledger_rebuild``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

SPEND_WINDOWS_PATH = "/v1/ledger/spend-windows"  # the API route serving ``query_spend`` (embedded ledger)
DAY_SETS = ("hierarchy", "feature", "user", "customer", "environment", "model")
_KEYS = (
    "org",
    "team",
    "division",
    "project",
    "feature",
    "user",
    "customer",
    "environment",
    "model",
    "day",
    "hour",
    "rid",
)
_SET_COLUMNS = {
    "hierarchy": ("org", "team", "division", "project"),
    **{name: ("org", "team", name) for name in DAY_SETS[1:]},
}
_ZONE = re.compile(r"^[A-Za-z0-9_+\-/]{1,64}$")


@dataclass(frozen=True)
class SpendQuery:
    tz: str  # the policy's IANA timezone: local days
    since_s: int  # earliest occurred_at (epoch s) read
    hour_since_s: int  # earliest occurred_at bucketed per UTC hour
    recent_since_ms: int  # rows ingested since then are listed by event_id

    def __post_init__(self) -> None:
        if not _ZONE.match(self.tz):
            raise ValueError(f"tz: not a timezone name: {self.tz!r}")
        for name in ("since_s", "hour_since_s", "recent_since_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 2**42:
                raise ValueError(f"{name}: expected a non-negative epoch integer, got {value!r}")

    def as_params(self) -> dict[str, str]:
        return {
            "tz": self.tz,
            "since_s": str(self.since_s),
            "hour_since_s": str(self.hour_since_s),
            "recent_since_ms": str(self.recent_since_ms),
        }

    @classmethod
    def from_params(cls, params: Any) -> SpendQuery:
        try:
            return cls(
                str(params["tz"]),
                int(params["since_s"]),
                int(params["hour_since_s"]),
                int(params["recent_since_ms"]),
            )
        except KeyError as exc:
            raise ValueError(f"missing parameter {exc}") from exc


def _grouping_sets() -> list[tuple[str, str, tuple[str, ...]]]:
    """``(set name, grain, key columns)`` in statement order."""
    sets = []
    for grain in ("day", "hour"):
        sets.extend((name, grain, (*_SET_COLUMNS[name], grain)) for name in DAY_SETS)
    sets.append(("recent", "id", ("org", "team", "rid")))
    return sets


def _mask(columns: tuple[str, ...]) -> int:
    """``grouping(<_KEYS>)`` of a set: a 1 bit (most significant first) for each key NOT grouped by it."""
    return sum(1 << (len(_KEYS) - 1 - i) for i, key in enumerate(_KEYS) if key not in columns)


def spend_sql(db: str, query: SpendQuery) -> str:
    sets = ", ".join(f"({', '.join(columns)})" for _, _, columns in _grouping_sets())
    return f"""
SELECT grouping({", ".join(_KEYS)}) AS g, {", ".join(_KEYS)},
       toString(sum(toInt128(cost))) AS nanos, count() AS requests, toString(sum(toInt128(tokens))) AS tokens,
       max(ingested_ms) AS newest_ms
FROM (
    SELECT org, team, division, project, feature, user, customer, environment,
           if(model_served != '', model_served, model_requested) AS model,
           toInt64(toUnixTimestamp(toStartOfDay(occurred_at, '{query.tz}'))) + 43200 AS day,
           if(occurred_at >= toDateTime64({query.hour_since_s}, 6, 'UTC'),
              toInt64(toUnixTimestamp(toStartOfHour(occurred_at))), -1) AS hour,
           if(ingested_at >= fromUnixTimestamp64Milli(toInt64({query.recent_since_ms})), toString(event_id), '') AS rid,
           assumeNotNull(cost_nanos) AS cost, input_tokens + output_tokens AS tokens,
           toUnixTimestamp64Milli(ingested_at) AS ingested_ms
    FROM {db}.usage_ledger FINAL
    WHERE occurred_at >= toDateTime64({query.since_s}, 6, 'UTC') AND cost_nanos IS NOT NULL
)
GROUP BY GROUPING SETS ({sets})
"""


def query_spend(client: Any, db: str, query: SpendQuery) -> dict[str, list[list[Any]]]:
    """Run the snapshot query; JSON-ready ``{"day": [...], "hour": [...], "recent": [...]}``.

    ``day``/``hour`` rows are ``[set name, org, team, value(s)..., bucket_s, nanos, requests, tokens]`` with the
    set's own columns (``hierarchy`` has division and project, the others one dimension value); a ``day`` bucket
    is local noon of the day (an instant inside it, whatever the DST shift). ``recent`` rows are
    ``[org, team, event_id, ingested_ms]``.
    """
    by_mask = {_mask(columns): (name, grain, columns) for name, grain, columns in _grouping_sets()}
    out: dict[str, list[list[Any]]] = {"day": [], "hour": [], "recent": []}
    index = {key: i + 1 for i, key in enumerate(_KEYS)}
    for row in client.query(spend_sql(db, query)).result_rows:
        name, grain, columns = by_mask[row[0]]
        nanos, requests, tokens, newest_ms = int(row[13]), int(row[14]), int(row[15]), int(row[16])
        values = [row[index[column]] for column in columns]
        if grain == "id":
            if values[2]:
                out["recent"].append([values[0], values[1], values[2], newest_ms])
        elif grain == "day" or values[-1] >= 0:
            out[grain].append([name, *values, nanos, requests, tokens])
    return out

"""Rebuilding days of the ``spend_daily`` rollup from the ledger's exact (FINAL) figures.

The rollup's materialized view adds every insert, replays included (see
``schemas/clickhouse/0004_spend_daily_rollup.sql``); this puts chosen days back to the truth.
"""

from __future__ import annotations

from datetime import date
from typing import Any

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

"""The ledger writer: the one interface through which the sink's loop touches ClickHouse.

The loop (:mod:`spendstream.sink.ledger_sink`) decides *what* lands and *when* offsets move; a
:class:`LedgerWriter` knows *how* a batch is staged, checked against what the ledger already holds
(first version wins) and inserted. There is one implementation per ClickHouse client kind, because
they differ in who else shares the database:

* :class:`EmbeddedLedgerWriter` (``chdb://dir``): this process owns the directory, so the staging
  tables have one fixed name and a crashed sink's leftovers are simply replaced.
* :class:`ServerLedgerWriter` (``http(s)://``, clickhouse-connect's HTTP client): several sinks share
  the server, so each writer stages into tables of its own.

Every insert carries an ``insert_deduplication_token``; retrying the same call with the same token
writes nothing twice. Errors propagate: the loop tells content refusals (:func:`is_content_error`,
bisected to the dead-letter topic) from outages (retried).
"""

from __future__ import annotations

import logging
import re
import struct
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from clickhouse_connect.driver.exceptions import DataError

from spendstream.core.config import Settings
from spendstream.sink.avro_block import ROW_FIELD, ledger_select_sql
from spendstream.sink.decode import LEDGER_COLUMNS
from spendstream.sink.staging import AvroGroup, Judged, create_staging, judge_group

log = logging.getLogger(__name__)

LEDGER_TABLE = "usage_ledger"


class LedgerWriter(Protocol):
    """What the sink's loop needs from the ledger. Calls come from one writer thread, one at a time."""

    table: str  # the ledger table, database-qualified

    def open(self, *, staged: bool) -> None:
        """Prepare to write (column types; with ``staged``, the staging tables)."""

    def judge(self, group: AvroGroup, now: datetime, skew: timedelta) -> Judged | None:
        """Stage a group and let SQL judge it; None if its rows did not come back intact."""

    def insert_staged(self, count: int, excluded: set[int], token: str, placed: Mapping[str, str] | None = None) -> int:
        """Insert the judged group's rows except ``excluded`` and the superseded, their team, division and org
        filled by ``placed`` (``core.placement``); returns how many were superseded."""

    def insert_rows(self, columns: list[Sequence[Any]], token: str) -> int:
        """Insert the first versions among ledger ``columns``; returns how many rows were superseded."""

    def close(self) -> None:
        """Drop what :meth:`open` created (best effort: nothing is lost if the server is gone)."""


class ClickHouseLedgerWriter:
    """The ledger writer over a clickhouse-connect client; subclasses name the staging tables."""

    def __init__(self, client: Any, database: str, staging: str) -> None:
        self.client = client
        self.table = f"{database}.{LEDGER_TABLE}"
        self.staging = f"{database}.{staging}"
        self._keys = f"{self.staging}_keys"
        self._column_types: list[str] = []
        self._staged = False

    def open(self, *, staged: bool) -> None:
        types = {row[0]: row[1] for row in self.client.query(f"DESCRIBE TABLE {self.table}").result_rows}
        self._column_types = [types[name] for name in LEDGER_COLUMNS]
        if staged:
            create_staging(self.client, self.staging)
        self._staged = staged

    def judge(self, group: AvroGroup, now: datetime, skew: timedelta) -> Judged | None:
        return judge_group(self.client, self.staging, group, now, skew)

    def insert_staged(self, count: int, excluded: set[int], token: str, placed: Mapping[str, str] | None = None) -> int:
        superseded = superseded_staged_rows(self.client, self.staging, self.table, excluded, placed)
        skipped = excluded | superseded
        if len(skipped) < count:
            self.client.command(
                f"INSERT INTO {self.table} ({', '.join(LEDGER_COLUMNS)}) "
                + ledger_select_sql(LEDGER_COLUMNS, self.staging, sorted(skipped), placed),
                settings={"insert_deduplication_token": token},
            )
        return len(superseded)

    def insert_rows(self, columns: list[Sequence[Any]], token: str) -> int:
        rows = len(columns[0])
        columns = first_versions(self.client, self.table, self._keys, columns)
        if not columns[0]:
            return rows
        self.client.insert(
            self.table,
            columns,
            column_names=LEDGER_COLUMNS,
            column_type_names=self._column_types,
            column_oriented=True,
            settings={"insert_deduplication_token": token},
        )
        return rows - len(columns[0])

    def close(self) -> None:
        if not self._staged:
            return
        try:
            self.client.command(f"DROP TABLE IF EXISTS {self.staging}")
            self.client.command(f"DROP TABLE IF EXISTS {self._keys}")
        except Exception as exc:  # an unreachable server keeps an empty Memory table; nothing is lost
            log.warning("could not drop the staging table %s: %s", self.staging, exc)


class EmbeddedLedgerWriter(ClickHouseLedgerWriter):
    """chDB: the process owns the ledger directory, so one fixed staging name (a leftover is replaced)."""

    def __init__(self, client: Any, database: str) -> None:
        super().__init__(client, database, "usage_sink_staging")


class ServerLedgerWriter(ClickHouseLedgerWriter):
    """A ClickHouse server over HTTP: sinks share it, so each writer stages into tables of its own."""

    def __init__(self, client: Any, database: str) -> None:
        super().__init__(client, database, f"usage_sink_staging_{uuid.uuid4().hex[:12]}")


def ledger_writer_for(settings: Settings, client: Any) -> ClickHouseLedgerWriter:
    """The writer for the configured ledger DSN's client kind."""
    kind = EmbeddedLedgerWriter if settings.ledger_dsn.startswith("chdb://") else ServerLedgerWriter
    return kind(client, settings.clickhouse_database)


# ClickHouse errors caused by the values sent, never by the server's state: retrying cannot help.
_CONTENT_ERROR_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        131,  # TOO_LARGE_STRING_SIZE
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        407,  # DECIMAL_OVERFLOW
        469,  # VIOLATED_CONSTRAINT (a CHECK an operator put on the ledger)
        691,  # UNKNOWN_ELEMENT_OF_ENUM
    }
)
_ERROR_CODE = re.compile(r"Code: (\d+)\.")


def is_content_error(exc: BaseException) -> bool:
    """True when an insert failed because of what it carried (a value out of a column's range, a type
    the column refuses), so the same rows will fail forever; False for outages and anything unknown,
    which are retried."""
    if isinstance(exc, DataError | OverflowError | struct.error | TypeError | ValueError):
        return True
    code = _ERROR_CODE.search(str(exc))
    return code is not None and int(code.group(1)) in _CONTENT_ERROR_CODES


def refusal_reason(exc: BaseException) -> str:
    cause = f"{exc}; {exc.__cause__}" if exc.__cause__ is not None else str(exc)
    return f"the ledger refuses this record: {cause}"


# First version wins. ``usage_ledger`` is a ReplacingMergeTree without a version column: of two rows with one
# sorting key (org, team, day, event_id) the one inserted LAST survives. A re-sent event_id with other content
# would then replace what the processor counted (it keeps the first version and dead-letters the copy as a
# conflicting duplicate), and a copy naming another occurred_at day would be a second row. So the sink never
# inserts a row whose (org, team, event_id) the ledger already holds, whatever day it names, nor a second row of
# one event within a batch: identical replays change nothing, a conflicting copy is dropped here. The lookups go
# through primary indexes: ``ledger_event_ids`` (migration 0024: the ledger's ids by org, team and event_id, with
# the day, filled by a materialized view on every ledger insert) names the candidates, and the ledger's own key
# confirms them (an id whose row an operator deleted is not held). A copy that changes org or team is another row,
# within a batch as across batches: a team's key never decides whether another team's row lands.
EVENT_IDS_TABLE = "ledger_event_ids"


def held_events_sql(table: str, keys_sql: str) -> str:
    """A query of the (org, team, event_id) the ledger ``table`` holds among those ``keys_sql`` selects."""
    database, _, _ = table.rpartition(".")
    ids = f"{database}.{EVENT_IDS_TABLE}" if database else EVENT_IDS_TABLE
    return (
        f"SELECT org, team, event_id FROM {table} WHERE (org, team, toDate(occurred_at), event_id) IN "
        f"(SELECT org, team, day, event_id FROM {ids} WHERE (org, team, event_id) IN ({keys_sql}))"
    )


def superseded_staged_rows(
    client: Any, staging: str, table: str, excluded: set[int], placed: Mapping[str, str] | None = None
) -> set[int]:
    """Staged rows (``_i`` positions) not to insert: the ledger holds their event, or an earlier row is the same
    event; an event is its org, team and event_id, with the org and team the row will be written with
    (``placed``: ``core.placement``)."""
    org, team = (placed or {}).get("org", "org"), (placed or {}).get("team", "team")
    staged_key = f"({org}, {team}, toUUIDOrZero(toString(event_id)))"
    row = f"reinterpretAsUInt32({ROW_FIELD})"
    skip = f" AND {row} NOT IN ({', '.join(map(str, sorted(excluded)))})" if excluded else ""
    rows = client.query(
        f"SELECT {row} FROM {staging} WHERE 1{skip} AND ("
        f"{staged_key} IN ({held_events_sql(table, f'SELECT {staged_key} FROM {staging}')})"
        f" OR {row} NOT IN (SELECT min({row}) FROM {staging} WHERE 1{skip} GROUP BY {staged_key}))"
    ).result_rows
    return {r[0] for r in rows}


def first_versions(client: Any, table: str, keys_table: str, columns: list[Sequence[Any]]) -> list[Sequence[Any]]:
    """Ledger columns without the rows ``superseded_staged_rows`` would drop (the Python path's rows); their keys
    go through the Memory table ``keys_table`` so the ledger lookup is one indexed join."""
    at = {name: i for i, name in enumerate(LEDGER_COLUMNS)}
    ids, orgs, teams = (columns[at[n]] for n in ("event_id", "org", "team"))
    if not ids:
        return columns
    client.command(f"CREATE TABLE IF NOT EXISTS {keys_table} (org String, team String, event_id UUID) ENGINE = Memory")
    client.command(f"TRUNCATE TABLE {keys_table}")
    client.insert(
        keys_table,
        [list(orgs), list(teams), [uuid.UUID(str(e)) for e in ids]],
        column_names=["org", "team", "event_id"],
        column_oriented=True,
    )
    held = {
        (o, t, str(e))
        for o, t, e in client.query(held_events_sql(table, f"SELECT org, team, event_id FROM {keys_table}")).result_rows
    }
    seen: set[tuple[str, str, str]] = set()
    keep = []
    for i in range(len(ids)):
        key = (orgs[i], teams[i], str(ids[i]))
        if key not in seen and key not in held:
            keep.append(i)
        seen.add(key)
    if len(keep) == len(ids):
        return columns
    return [[column[i] for i in keep] for column in columns]

"""Staging: a batch's values framed, undecoded, for ClickHouse to read and validate.

Values framed with a known schema fingerprint (the current UsageEvent schema or a version under
``schemas/history/``) are grouped by writer schema and wrapped into an Avro container file
(:mod:`spendstream.sink.avro_block`) that ClickHouse reads into a per-sink ``Memory`` staging table.
SQL there mirrors ``usage_record_problem`` (same checks, same order, same reason texts). Rows SQL does
not judge, and whole groups ClickHouse cannot read (a corrupt body fails the block), are left to
:mod:`spendstream.sink.decode`. Framing is pure; :func:`create_staging` and :func:`judge_group` take
any clickhouse-connect client.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import repeat
from typing import Any

from spendstream.core.codec import SINGLE_OBJECT_MAGIC
from spendstream.core.schemas import load_schema_json
from spendstream.sink.avro_block import (
    EXACT,
    ROW_FIELD,
    ContainerWriter,
    encoded_length_sql,
    problem_sql,
    staging_columns,
)
from spendstream.sink.decode import micros

SCHEMA_NAME = "usage_event"
_HEADER_LEN = len(SINGLE_OBJECT_MAGIC) + 8
_CHECK_ROW = struct.Struct("<IIB")  # RowBinary of (_i FixedString(4) little-endian, UInt32, UInt8)


@dataclass(frozen=True)
class WriterVersion:
    """One known writer schema of UsageEvent: how to frame its values for ClickHouse and measure them."""

    name: str
    container: ContainerWriter
    length_sql: str

    @classmethod
    def of(cls, name: str) -> WriterVersion:
        schema = load_schema_json(name)
        return cls(name, ContainerWriter(schema, _HEADER_LEN), encoded_length_sql(schema, _HEADER_LEN))


@dataclass
class AvroGroup:
    """Values of one batch written with one schema, framed as an Avro container for ClickHouse."""

    version: WriterVersion
    indices: list[int]  # positions in the batch
    container: bytes
    expected: bytes  # RowBinary (_i, value length, no problem) per row, what the staging check must give back

    @classmethod
    def of(
        cls, version: WriterVersion, values: Sequence[bytes], indices: list[int], arrivals: Sequence[int]
    ) -> AvroGroup:
        """``arrivals``: when each value's message reached the broker (its Kafka timestamp, epoch ms)."""
        expected = b"".join(map(_CHECK_ROW.pack, range(len(values)), map(len, values), repeat(0)))
        return cls(version, indices, version.container.container(values, arrivals), expected)


def split_by_writer(
    values: Sequence[bytes | None], versions: dict[bytes, WriterVersion]
) -> tuple[dict[bytes, list[int]], list[int]]:
    """Positions of values by single-object header (known writer schemas only), and all the others."""
    if len(versions) and None not in values:
        for header in versions:  # the common case, every value in one schema, checked in C
            if all(map(bytes.startswith, values, repeat(header))):  # type: ignore[arg-type]
                return {header: list(range(len(values)))}, []
    groups: dict[bytes, list[int]] = {header: [] for header in versions}
    others: list[int] = []
    get = groups.get
    for index, value in enumerate(values):
        positions = get(value[:_HEADER_LEN]) if value is not None else None
        if positions is None:
            others.append(index)
        else:
            positions.append(index)
    return {header: positions for header, positions in groups.items() if positions}, others


@dataclass
class Judged:
    """SQL's verdict on a staged group: rows it rejects (with the reason) and rows left to Python."""

    rejected: dict[int, str]  # row -> usage_record_problem's reason
    exact: set[int]  # rows SQL does not judge (the Python path names their problem)


def create_staging(client: Any, staging: str) -> None:
    """The Memory table a sink loads each group into (its rows live only until the next group)."""
    columns = ", ".join(f"`{name}` {kind}" for name, kind in staging_columns(load_schema_json(SCHEMA_NAME)))
    client.command(f"CREATE OR REPLACE TABLE {staging} ({columns}) ENGINE = Memory")


def judge_group(client: Any, staging: str, group: AvroGroup, now: datetime, skew: timedelta) -> Judged | None:
    """Load a group into ``staging`` and validate it in SQL; None if its rows did not come back intact.

    Raises what ClickHouse raises when it cannot read the container (a corrupt body fails it).
    """
    client.command(f"TRUNCATE TABLE {staging}")
    client.raw_insert(
        staging, None, group.container, fmt="Avro", settings={"input_format_avro_allow_missing_fields": 1}
    )
    problem = problem_sql(load_schema_json(SCHEMA_NAME), micros(now + skew), skew)
    checked = client.raw_query(
        f"SELECT {ROW_FIELD}, toUInt32({group.version.length_sql}), toUInt8(({problem}) != '') FROM {staging} "
        "SETTINGS max_threads = 1 FORMAT RowBinary"
    )
    if checked == group.expected:  # every position in order, every value read exactly, all valid: the common case
        return Judged({}, set())
    if len(checked) != len(group.expected):
        return None
    flagged = False
    for (row, length, problem_flag), (want_row, want_length, _) in zip(
        sorted(_CHECK_ROW.iter_unpack(checked)), _CHECK_ROW.iter_unpack(group.expected), strict=True
    ):
        if row != want_row or length != want_length:  # see avro_block: then no row's position can be trusted
            return None
        flagged = flagged or bool(problem_flag)
    verdicts = (
        client.query(
            f"SELECT reinterpretAsUInt32({ROW_FIELD}), {problem} AS problem FROM {staging} WHERE problem != ''"
        ).result_rows
        if flagged
        else []
    )
    exact = {row for row, verdict in verdicts if verdict == EXACT}
    return Judged({row: verdict for row, verdict in verdicts if row not in exact}, exact)

"""The Avro schemas are the source of truth: the ledger DDL (local and cluster) must agree with them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from spendstream.core.schemas import load_schema_json

ROOT = Path(__file__).resolve().parents[1]
# Columns the ledger adds: when the row landed, and the audit hash chain (core/audit_chain.py).
LEDGER_ONLY = {"ingested_at", "chain_seq", "prev_hash", "record_hash"}


def _clickhouse_type(avro_type: Any) -> str:
    """The ClickHouse column type an Avro field maps to in the ledger."""
    if isinstance(avro_type, list):
        members = [t for t in avro_type if t != "null"]
        assert len(members) == 1, avro_type
        return f"Nullable({_clickhouse_type(members[0])})"
    if isinstance(avro_type, dict):
        logical = avro_type.get("logicalType")
        if logical == "uuid":
            return "UUID"
        if logical == "timestamp-micros":
            return "DateTime64(6, 'UTC')"
        if avro_type["type"] == "enum":
            symbols = ", ".join(f"'{s}' = {i}" for i, s in enumerate(avro_type["symbols"], start=1))
            return f"Enum8({symbols})"
        if avro_type["type"] == "map":
            return f"Map(String, {_clickhouse_type(avro_type['values'])})"
        if avro_type["type"] == "array":
            return f"Array({_clickhouse_type(avro_type['items'])})"
        return _clickhouse_type(avro_type["type"])
    return {"string": "String", "long": "Int64", "boolean": "Bool", "double": "Float64"}[avro_type]


def _without_low_cardinality(kind: str) -> str:
    return re.sub(r"LowCardinality\((.*)\)", r"\1", kind)


@pytest.mark.parametrize(
    ("schema", "table", "overrides"),
    [
        ("usage_event", "usage_ledger", {}),
        ("decision", "decisions", {"version": "UInt64"}),  # a version is never negative
        ("alert", "alerts", {}),
    ],
)
def test_ledger_tables_mirror_the_avro_schemas(ledger: Any, schema: str, table: str, overrides: dict[str, str]) -> None:
    described = ledger.query(f"DESCRIBE TABLE spendstream.{table}").result_rows
    columns = {name: kind for name, kind, *_ in described if name not in LEDGER_ONLY}
    fields = load_schema_json(schema)["fields"]
    assert list(columns) == [f["name"] for f in fields], "same columns, same order as the schema"
    for field in fields:
        expected = overrides.get(field["name"]) or _clickhouse_type(field["type"])
        assert _without_low_cardinality(columns[field["name"]]) == expected, field["name"]


def _ddl_columns(sql: str, table: str) -> list[tuple[str, str]]:
    body = re.search(rf"CREATE TABLE IF NOT EXISTS \{{db\}}\.{table}\b[^(]*\((.*?)\n\)", sql, re.S)
    assert body, f"no CREATE TABLE {table}"
    columns = []
    for line in body.group(1).splitlines():
        match = re.match(r"\s+(\w+)\s+(.+?),?$", line)
        if match:
            columns.append((match.group(1), match.group(2).removesuffix(",")))
    return columns


def test_cluster_ledger_ddl_has_the_same_columns_as_the_local_ddl() -> None:
    local = (ROOT / "schemas/clickhouse/0001_usage_ledger.sql").read_text()
    cluster = (ROOT / "infra/clickhouse/cluster/0001_usage_ledger.sql").read_text()
    assert _ddl_columns(cluster, "usage_ledger_local") == _ddl_columns(local, "usage_ledger")


def test_notifications_table_agrees_with_the_notifier_and_the_cluster_ddl(ledger: Any) -> None:
    from spendstream.notifier.store import COLUMNS

    described = [name for name, *_ in ledger.query("DESCRIBE TABLE spendstream.notifications").result_rows]
    assert described == COLUMNS
    local = (ROOT / "schemas/clickhouse/0015_notifications.sql").read_text()
    cluster = (ROOT / "infra/clickhouse/cluster/0006_notifications.sql").read_text()
    assert _ddl_columns(cluster, "notifications_local") == _ddl_columns(local, "notifications")

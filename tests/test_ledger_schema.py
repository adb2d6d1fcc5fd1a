"""The Avro schemas are the source of truth: the ledger DDL (local and cluster) must agree with them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from spendstream.core.schemas import load_schema_json

ROOT = Path(__file__).resolve().parents[1]
# Columns the ledger adds: when the row landed and when its message reached the broker, and the audit hash chain
# (core/audit_chain.py).
LEDGER_ONLY = {"ingested_at", "arrived_at", "chain_seq", "prev_hash", "record_hash"}


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


# -- the cluster DDL (infra/clickhouse/cluster/) covers every single-node table ------------------------

CLUSTER_DIR = ROOT / "infra/clickhouse/cluster"
REPLICATED_ON_EVERY_NODE = {"budgets"}  # small, read by every shard: one full replica per node, no Distributed
_CREATE_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS \{db\}\.(\w+)(?: ON CLUSTER '\{cluster\}')?\s*\(")
_CREATE_AS = re.compile(
    r"CREATE TABLE IF NOT EXISTS \{db\}\.(\w+) ON CLUSTER '\{cluster\}' AS \{db\}\.(\w+)\s+"
    r"ENGINE = Distributed\('\{cluster\}', \{db\}, (\w+), .+\)$",
    re.S,
)
_CREATE_VIEW = re.compile(r"CREATE (MATERIALIZED )?VIEW IF NOT EXISTS \{db\}\.(\w+)")
_ALTER_ADD = re.compile(r"ALTER TABLE \{db\}\.(\w+)(?: ON CLUSTER '\{cluster\}')?\s+(ADD COLUMN .*)", re.S)


def _statements(directory: Path) -> list[str]:
    """The statements of every migration in ``directory``, in the order they are applied, comments removed."""
    statements = []
    for path in sorted(directory.glob("*.sql")):
        text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("--"))
        statements += [s.strip() for s in re.split(r";\s*(?:\n|$)", text) if s.strip()]
    return statements


def _top_level_split(text: str) -> list[str]:
    """``text`` split at the commas outside parentheses and quotes."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, char in enumerate(text):
        if char == "'":
            quoted = not quoted
        elif not quoted and char in "()":
            depth += 1 if char == "(" else -1
        elif not quoted and depth == 0 and char == ",":
            parts.append(text[start:i])
            start = i + 1
    return [part.strip() for part in [*parts, text[start:]] if part.strip()]


def _column(definition: str) -> tuple[str, str]:
    name, kind = definition.split(None, 1)
    return name, " ".join(kind.split())


def _schema(directory: Path) -> tuple[dict[str, list[tuple[str, str]]], dict[str, str], dict[str, str]]:
    """Apply the DDL of ``directory`` on paper: the columns of every table after all ALTERs, the Distributed
    tables (name -> the table they read), and the views (name -> their statement)."""
    tables: dict[str, list[tuple[str, str]]] = {}
    distributed: dict[str, str] = {}
    views: dict[str, str] = {}
    for statement in _statements(directory):
        if created := _CREATE_AS.match(statement):
            name, like, underlying = created.groups()
            assert like == underlying, statement
            tables[name], distributed[name] = list(tables[like]), underlying
        elif created := _CREATE_TABLE.match(statement):
            body = statement[created.end() : statement.index("\n)", created.end())]
            tables[created.group(1)] = [_column(part) for part in _top_level_split(body)]
        elif view := _CREATE_VIEW.match(statement):
            views[view.group(2)] = statement
        elif altered := _ALTER_ADD.match(statement):
            columns = tables[altered.group(1)]
            for clause in _top_level_split(altered.group(2)):
                name, kind = _column(clause.removeprefix("ADD COLUMN IF NOT EXISTS "))
                kind, _, after = kind.partition(" AFTER ")
                if name not in dict(columns):
                    at = [n for n, _ in columns].index(after) + 1 if after else len(columns)
                    columns.insert(at, (name, kind))
    return tables, distributed, views


def test_every_single_node_table_has_a_cluster_counterpart_with_the_same_columns() -> None:
    local_tables, _, local_views = _schema(ROOT / "schemas/clickhouse")
    cluster_tables, distributed, cluster_views = _schema(CLUSTER_DIR)
    assert local_tables, "the single-node DDL parsed to nothing"
    for table, columns in local_tables.items():
        if table in REPLICATED_ON_EVERY_NODE:
            assert cluster_tables.get(table) == columns, table
            continue
        assert cluster_tables.get(f"{table}_local") == columns, f"{table}_local: columns differ or table missing"
        assert distributed.get(table) == f"{table}_local", f"{table}: no Distributed table over {table}_local"
        assert cluster_tables[table] == columns, f"{table}: the Distributed table's columns differ"
    readme = (CLUSTER_DIR / "README.md").read_text()
    for view, statement in local_views.items():
        if statement.startswith("CREATE MATERIALIZED VIEW"):  # must fire on each shard's local insert
            source = re.search(r"FROM \{db\}\.(\w+)", statement)
            cluster_view = cluster_views.get(view, "")
            assert source and f"FROM {{db}}.{source.group(1)}_local" in cluster_view, view
            assert re.search(r"TO \{db\}\.\w+_local AS", cluster_view), view
        else:  # the report views apply unchanged over the Distributed tables
            defined_in = next(p.name for p in (ROOT / "schemas/clickhouse").glob("*.sql") if view in p.read_text())
            assert defined_in in readme, f"the cluster README does not say how to create {view} ({defined_in})"


def test_cluster_ddl_parses(offline_settings: Any) -> None:
    """chDB's parser accepts every cluster statement, ON CLUSTER included, once {db} is filled in."""
    from spendstream.core.ledger_store import connect

    client = connect(offline_settings)
    try:
        for statement in _statements(CLUSTER_DIR):
            client.query("EXPLAIN AST " + statement.replace("{db}", "spendstream"))
    finally:
        client.close()

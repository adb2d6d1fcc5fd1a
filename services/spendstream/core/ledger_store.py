"""The ClickHouse ledger connection and versioned DDL, shared by the sink, the API and the CLI.

One clickhouse-connect code path serves both runtimes: ``chdb:///dir`` is the embedded
engine (one process owns a directory at a time), ``http(s)://...`` a ClickHouse server.
Migrations are the ``schemas/clickhouse/NNNN_*.sql`` files, applied in order once each and
recorded in ``schema_migrations``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spendstream.core.config import Settings
from spendstream.core.schemas import schema_dir

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def connect(settings: Settings) -> Any:
    """A clickhouse-connect client for the configured DSN (creating a chDB directory if needed)."""
    import clickhouse_connect

    dsn = settings.ledger_dsn
    if dsn.startswith("chdb://"):
        Path(dsn.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
    return clickhouse_connect.get_client(dsn=dsn)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def migrations(settings: Settings) -> list[Migration]:
    """Every DDL file, rendered for this deployment's database and TTL."""
    found = []
    for path in sorted((schema_dir() / "clickhouse").glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise ValueError(f"{path}: migration files are named NNNN_description.sql")
        text = path.read_text().format(db=settings.clickhouse_database, ttl_months=settings.ledger_ttl_months)
        found.append(Migration(int(match.group(1)), path.stem, tuple(split_statements(text))))
    return found


def split_statements(sql: str) -> list[str]:
    """Statements of a DDL file: ``;`` at the end of a line ends one; ``--`` comments dropped."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    statements, current = [], []
    for line in lines:
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(current).rstrip().rstrip(";"))
            current = []
    tail = "\n".join(current).strip()
    if tail:
        statements.append(tail)
    return [s.strip() for s in statements if s.strip()]


def migrate(client: Any, settings: Settings) -> list[str]:
    """Apply every migration not yet recorded; return the names applied now."""
    db = settings.clickhouse_database
    client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations "
        "(version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = MergeTree ORDER BY version"
    )
    applied = {row[0] for row in client.query(f"SELECT version FROM {db}.schema_migrations").result_rows}
    done = []
    for migration in migrations(settings):
        if migration.version in applied:
            continue
        for statement in migration.statements:
            client.command(statement)
        client.insert(f"{db}.schema_migrations", [[migration.version, migration.name]], ["version", "name"])
        done.append(migration.name)
    return done

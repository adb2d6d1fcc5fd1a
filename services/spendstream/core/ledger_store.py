"""The ClickHouse ledger connection and versioned DDL, shared by the sink, the API and the CLI.

One clickhouse-connect code path serves both runtimes: ``chdb:///dir`` is the embedded
engine (one process owns a directory at a time), ``http(s)://...`` a ClickHouse server.
Migrations are the ``schemas/clickhouse/NNNN_*.sql`` files, applied in order once each and
recorded in ``schema_migrations``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spendstream.core.config import Settings
from spendstream.core.schemas import schema_dir

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class LedgerBusy(RuntimeError):
    """The embedded ledger is open in another process (``spendstream dev`` or a sink); ``str()`` is its DSN."""

    def __init__(self, dsn: str, pid: int | None = None) -> None:
        super().__init__(dsn)
        self.dsn, self.pid = dsn, pid

    def holder(self) -> str:
        """``another process`` or ``another process (pid 123)``: the pid as the engine recorded it."""
        return "another process" + (f" (pid {self.pid})" if self.pid else "")


# What chDB writes to file descriptor 2 when another process holds the directory.
_LOCKED = "Cannot lock file"
# The embedded engine's lock: the server status file, flock()ed by the process that has the directory open.
_STATUS_FILE = "status"
_stderr_swap = threading.Lock()


def connect(settings: Settings) -> Any:
    """A clickhouse-connect client for the configured DSN (creating a chDB directory if needed).

    An embedded ledger that another process has open raises ``LedgerBusy`` rather than the engine's error, so every
    command can say what to do; what the engine writes to stderr meanwhile is kept from the user unless it says
    something else."""
    import clickhouse_connect

    dsn = settings.ledger_dsn
    if not dsn.startswith("chdb://"):
        return clickhouse_connect.get_client(dsn=dsn)
    directory = Path(dsn.removeprefix("chdb://"))
    directory.mkdir(parents=True, exist_ok=True)
    failure: Exception | None = None
    with _engine_stderr() as engine_said:
        try:
            client = clickhouse_connect.get_client(dsn=dsn)
        except Exception as exc:
            failure = exc
    said = "".join(engine_said)
    busy = failure is not None and (_LOCKED in said or _held_elsewhere(directory))
    other_lines = [line for line in said.splitlines(keepends=True) if _LOCKED not in line] if busy else [said]
    if "".join(other_lines).strip():
        sys.stderr.write("".join(other_lines))
    if busy:
        raise LedgerBusy(dsn, _holder_pid(directory)) from None
    if failure is not None:
        raise failure
    return client


@contextlib.contextmanager
def _engine_stderr() -> Iterator[list[str]]:
    """Capture what the embedded engine writes straight to file descriptor 2 (chDB prints its raw
    "Code: 76 ... Cannot lock file" there); the caller decides what the user sees. One swap at a time: two threads
    swapping at once would leave descriptor 2 on a closed file."""
    captured: list[str] = []
    with _stderr_swap, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def _held_elsewhere(directory: Path) -> bool:
    """Whether another process holds the engine's lock on ``directory`` (probed after a failed open, so not us)."""
    import fcntl

    try:
        fd = os.open(directory / _STATUS_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also releases the probe's lock
    return False


def _holder_pid(directory: Path) -> int | None:
    """The pid the engine holding ``directory`` wrote to its status file (``PID: 123``), if it says."""
    try:
        text = (directory / _STATUS_FILE).read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"^PID:\s*(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else None


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

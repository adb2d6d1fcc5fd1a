"""``spendstream ledger migrate`` (``spendstream sink`` runs the ledger process, see ``runtime.commands``)."""

from __future__ import annotations

import argparse
import sys

from spendstream.core.config import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    ledger = subparsers.add_parser("ledger", help="manage the ClickHouse ledger")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    migrate = ledger_sub.add_parser("migrate", help="apply every pending ledger migration (idempotent)")
    migrate.set_defaults(handler=run_migrate)

    from spendstream.analytics.commands import register_ledger_commands

    register_ledger_commands(ledger_sub)


def run_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.core.ledger_store import connect, migrate

    client = connect(settings)
    try:
        applied = migrate(client, settings)
    except Exception as exc:  # a failing DDL statement: name it instead of a traceback
        print(f"spendstream: ledger migration failed on {settings.ledger_dsn}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if applied:
        for name in applied:
            print(f"applied  {name}")
    else:
        print(f"ledger {settings.ledger_dsn} database {settings.clickhouse_database}: up to date")
    return 0

"""``spendstream sink`` and ``spendstream ledger migrate``."""

from __future__ import annotations

import argparse
import sys

from spendstream.core.config import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    sink = subparsers.add_parser(
        "sink",
        help="run the ledger sink: spendstream.usage -> ClickHouse usage_ledger, exactly once",
        description="Consume usage events in batches (SPENDSTREAM_SINK_BATCH_SIZE / SPENDSTREAM_SINK_BATCH_MS) "
        "into the ledger; SIGTERM or Ctrl-C finishes the current batch, commits it and exits.",
    )
    sink.add_argument(
        "--with-api",
        action="store_true",
        help="also serve the API and dashboard from this process (needed with an embedded chDB ledger, "
        "which one process owns)",
    )
    sink.add_argument(
        "--with-notifier",
        action="store_true",
        help="also run the notifier in this process (as `spendstream dev` does with an embedded ledger)",
    )
    sink.add_argument("--no-audit", action="store_true", help="do not write decisions and alerts to the ledger")
    sink.set_defaults(handler=run_sink)

    ledger = subparsers.add_parser("ledger", help="manage the ClickHouse ledger")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    migrate = ledger_sub.add_parser("migrate", help="apply every pending ledger migration (idempotent)")
    migrate.set_defaults(handler=run_migrate)

    from spendstream.analytics.commands import register_ledger_commands

    register_ledger_commands(ledger_sub)


def run_sink(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.runtime.ledger_process import run_ledger_process

    return run_ledger_process(
        settings, with_audit=not args.no_audit, with_api=args.with_api, with_notifier=args.with_notifier
    )


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

"""``spendstream sink`` and ``spendstream ledger migrate``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

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
    sink.add_argument("--no-audit", action="store_true", help="do not write decisions and alerts to the ledger")
    sink.set_defaults(handler=run_sink)

    ledger = subparsers.add_parser("ledger", help="manage the ClickHouse ledger")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    migrate = ledger_sub.add_parser("migrate", help="apply every pending ledger migration (idempotent)")
    migrate.set_defaults(handler=run_migrate)

    from spendstream.analytics.commands import register_ledger_commands

    register_ledger_commands(ledger_sub)


def run_sink(args: argparse.Namespace, settings: Settings) -> int:
    """The usage sink in the main thread; the audit sink (and optionally the API) beside it on one client."""
    from spendstream.core.ledger_store import connect, migrate
    from spendstream.sink.audit_sink import AuditSink
    from spendstream.sink.ledger_sink import LedgerSink

    client = connect(settings)
    migrate(client, settings)
    sink = LedgerSink(settings, client)
    stop = threading.Event()

    def shutdown(*_: object) -> None:
        stop.set()
        sink.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, shutdown)
    workers = []
    if not args.no_audit:
        workers.append(threading.Thread(target=AuditSink(settings, client).run, args=(stop,), name="audit-sink"))
    if args.with_api:
        workers.append(threading.Thread(target=_serve_api, args=(settings, client, stop), name="api"))
    for worker in workers:
        worker.start()
    try:
        return sink.run()
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
        client.close()


def _serve_api(settings: Settings, client: object, stop: threading.Event) -> None:
    """Run the API's aiohttp app on this thread's own event loop until ``stop`` is set."""
    import asyncio

    from aiohttp import web

    from spendstream.api.app import create_app

    async def serve() -> None:
        runner = web.AppRunner(create_app(settings, ledger_client=client), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.api_host, settings.api_port).start()
        print(f"api and dashboard on http://{settings.api_host}:{settings.api_port}/", flush=True)
        try:
            while not stop.is_set():
                await asyncio.sleep(0.2)
        finally:
            await runner.cleanup()

    asyncio.run(serve())


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

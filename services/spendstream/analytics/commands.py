"""``spendstream report weekly|chargeback|forecast|top|mix|latency|savings``, ``spendstream sql`` and
``spendstream ledger reprice`` (registered by the ledger group through ``register_ledger_commands``)."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, date, datetime
from typing import Any

from spendstream.analytics.report_model import FORMATS, Column, Report, render
from spendstream.core.config import Settings

REPORTS = ("weekly", "chargeback", "forecast", "top", "mix", "latency", "savings")


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report", help="print a report from the ledger: CFO weekly, chargeback, forecast, top spenders, mix, latency"
    )
    report.add_argument("kind", choices=REPORTS, help="which report")
    report.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    report.add_argument("--month", type=_month, help="chargeback/savings month, YYYY-MM (default: this month)")
    report.add_argument("--as-of", type=date.fromisoformat, help="weekly: a day of the week to report (YYYY-MM-DD)")
    report.add_argument("--weeks", type=int, default=4, help="weekly: how many weeks (default 4)")
    report.add_argument("--by", default="feature", help="top: team, feature, user, customer, model, ...")
    report.add_argument("--limit", type=int, default=10, help="top: how many rows")
    report.add_argument("--from", dest="start", type=date.fromisoformat, help="top/mix/latency: first day")
    report.add_argument("--to", dest="end", type=date.fromisoformat, help="top/mix/latency: last day")
    report.set_defaults(handler=run_report)

    sql = subparsers.add_parser("sql", help="run SQL against the ledger (read-only unless --write)")
    sql.add_argument("query", help='one SQL statement, e.g. "SELECT count() FROM spendstream.usage_ledger"')
    sql.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    sql.add_argument("--write", action="store_true", help="allow statements that change data")
    sql.set_defaults(handler=run_sql)


def register_ledger_commands(ledger_subparsers: argparse._SubParsersAction) -> None:
    """Add ``reprice`` under the ``ledger`` group."""
    reprice = ledger_subparsers.add_parser("reprice", help="recompute past costs from the corrected price table")
    reprice.add_argument("--model", required=True, help="model served (or requested when none was served)")
    reprice.add_argument("--from", dest="start", required=True, type=date.fromisoformat, help="first UTC day")
    reprice.add_argument("--to", dest="end", required=True, type=date.fromisoformat, help="last UTC day")
    reprice.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    reprice.set_defaults(handler=run_reprice)


def _month(text: str) -> date:
    try:
        return datetime.strptime(text, "%Y-%m").date()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM, got {text!r}") from None


class LedgerBusy(RuntimeError):
    """The embedded ledger is open in another process (``spendstream dev`` or a sink)."""


def _open(settings: Settings) -> Any:
    from spendstream.core.ledger_store import connect, migrate

    try:
        client = connect(settings)
    except Exception as exc:
        # chDB reports a directory locked by another process only as "Unable to open the chdb engine".
        if settings.ledger_dsn.startswith("chdb://") and "Unable to open the chdb engine" in str(exc):
            raise LedgerBusy(settings.ledger_dsn) from exc
        raise
    migrate(client, settings)
    return client


def _report_from_api(args: argparse.Namespace, settings: Settings) -> Report:
    """Ask the running API for the report when another process owns the embedded ledger."""
    import json
    import urllib.parse
    import urllib.request

    from spendstream.analytics.report_model import report_from_json

    params = {
        "month": args.month and args.month.isoformat(),
        "as_of": args.as_of and args.as_of.isoformat(),
        "weeks": args.weeks,
        "by": args.by,
        "limit": args.limit,
        "from": args.start and args.start.isoformat(),
        "to": args.end and args.end.isoformat(),
    }
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    url = f"http://{settings.api_host}:{settings.api_port}/v1/reports/{args.kind}?{query}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return report_from_json(json.load(response))


def build_report(kind: str, client: Any, settings: Settings, options: dict[str, Any], now: datetime) -> Report:
    """One report by name; ``options`` are the CLI flags or the API's query parameters."""
    from spendstream.analytics import reports
    from spendstream.analytics.money import local_date

    ledger = reports.Ledger(client, settings.clickhouse_database, settings.timezone)
    today = local_date(now, settings.timezone)
    start = options.get("start") or today.replace(day=1)
    end = options.get("end") or today
    if kind == "weekly":
        return reports.weekly(ledger, options.get("as_of") or today, options.get("weeks") or 4)
    if kind == "chargeback":
        return reports.chargeback(ledger, options.get("month") or today)
    if kind == "forecast":
        return reports.forecast(ledger, now)
    if kind == "top":
        return reports.top(ledger, options.get("by") or "feature", start, end, options.get("limit") or 10)
    if kind == "mix":
        return reports.model_mix(ledger, start, end)
    if kind == "latency":
        return reports.latency(ledger, start, end)
    if kind == "savings":
        return reports.savings(ledger, options.get("month") or today)
    raise ValueError(f"unknown report {kind!r}; expected one of {', '.join(REPORTS)}")


def run_report(args: argparse.Namespace, settings: Settings) -> int:
    try:
        client = _open(settings)
    except LedgerBusy as busy:
        try:
            report = _report_from_api(args, settings)
        except OSError as exc:
            print(
                f"spendstream report: the ledger {busy} could not be opened (another spendstream process "
                "probably owns it), and the API at "
                f"http://{settings.api_host}:{settings.api_port} did not answer ({exc}); stop that process or "
                "set SPENDSTREAM_API_PORT to where it serves",
                file=sys.stderr,
            )
            return 1
        sys.stdout.write(render(report, args.format))
        return 0
    try:
        options = {k: getattr(args, k) for k in ("month", "as_of", "weeks", "by", "limit", "start", "end")}
        report = build_report(args.kind, client, settings, options, datetime.now(UTC))
    except ValueError as exc:
        print(f"spendstream report: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    sys.stdout.write(render(report, args.format))
    return 0


def run_sql(args: argparse.Namespace, settings: Settings) -> int:
    try:
        client = _open(settings)
    except LedgerBusy as busy:
        print(
            f"spendstream sql: the embedded ledger {busy} could not be opened; a running spendstream process "
            "(dev or sink) probably owns it: stop it first, or use a ClickHouse server "
            "(SPENDSTREAM_CLICKHOUSE_DSN=http://...)",
            file=sys.stderr,
        )
        return 1
    try:
        report = sql_report(client, settings, args.query, write=args.write)
    except Exception as exc:  # the server's message is the useful part
        print(f"spendstream sql: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    finally:
        client.close()
    sys.stdout.write(render(report, args.format))
    return 0


READ_STATEMENTS = ("SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS")


class WriteRefused(ValueError):
    """A statement that may change data, run without ``--write``."""


def statement_keyword(query: str) -> str:
    """The first keyword of a statement, past comments and opening parentheses."""
    text = re.sub(r"--[^\n]*|/\*.*?\*/", " ", query, flags=re.S).lstrip(" \t\r\n(")
    return (text.split(None, 1) or [""])[0].upper()


def sql_report(client: Any, settings: Settings, query: str, write: bool = False) -> Report:
    """Run one statement; read-only unless ``write``.

    Two locks: only reading statements are accepted, and they run with ClickHouse ``readonly=1``
    (which also refuses writes hidden inside a SELECT, e.g. through a table function).
    """
    if not write and statement_keyword(query) not in READ_STATEMENTS:
        raise WriteRefused(
            f"{statement_keyword(query) or 'empty'} statement refused: read-only unless --write "
            f"(allowed: {', '.join(READ_STATEMENTS)})"
        )
    client.database = settings.clickhouse_database  # unqualified table names mean the ledger's tables
    result = client.query(query, settings={} if write else {"readonly": 1})
    columns = [Column(name, name) for name in result.column_names]
    rows = [{c.key: _cell(v) for c, v in zip(columns, row, strict=True)} for row in result.result_rows]
    return Report("sql", query, columns, rows)


def _cell(value: Any) -> Any:
    return value if isinstance(value, int | str | date | type(None)) else str(value)


def run_reprice(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.analytics.reprice import policy_pricer, reprice

    if args.end < args.start:
        print("spendstream ledger reprice: --to is before --from", file=sys.stderr)
        return 2
    table = None
    if settings.policy is not None:
        from spendstream.core.policy import load_policy

        table = load_policy(settings.policy).price_table
    client = _open(settings)
    try:
        result = reprice(
            client, settings.clickhouse_database, args.model, args.start, args.end, policy_pricer(table)
        )  # fmt: skip
    finally:
        client.close()
    sys.stdout.write(render(result.report(args.model, args.start, args.end), args.format))
    return 0

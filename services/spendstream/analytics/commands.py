"""``spendstream report KIND`` (the kinds of ``report_registry``), ``spendstream sql`` and
``spendstream ledger reprice`` (registered by the ledger group through ``register_ledger_commands``)."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from spendstream.analytics.readonly_sql import SQL_API_MAX_MEMORY_MB, SQL_API_TIMEOUT_S, sql_report
from spendstream.analytics.report_model import FORMATS, Report, render
from spendstream.analytics.report_registry import (
    MAX_REPORT_COUNT,
    MAX_REPORT_WEEKS,
    REPORTS,
    build_report,
    report_day_problem,
)
from spendstream.analytics.report_timezone import policy_in_force_offline, report_timezone
from spendstream.core.config import ConfigError, Settings
from spendstream.core.ledger_store import LedgerBusy

SQL_GRACE_S = 5.0  # past --timeout, before a read the engine did not cancel ends the command


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report",
        help="print a report from the ledger: CFO weekly, chargeback, forecast, top spenders, mix, latency, savings",
    )
    report.add_argument("kind", choices=list(REPORTS), help="which report")
    report.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    report.add_argument("--month", type=_month, help="chargeback/savings month, YYYY-MM (default: this month)")
    report.add_argument("--as-of", type=_day, help="weekly: a day of the week to report (YYYY-MM-DD)")
    report.add_argument(
        "--weeks",
        type=_counter(MAX_REPORT_WEEKS),
        help=f"weekly: how many weeks (default 4, at most {MAX_REPORT_WEEKS})",
    )
    report.add_argument("--by", help="top: team, feature, user, customer, model, ... (default feature)")
    report.add_argument("--limit", type=_counter(MAX_REPORT_COUNT), help="top: how many rows (default 10)")
    report.add_argument("--from", dest="start", type=_day, help="top/mix/latency: first day")
    report.add_argument("--to", dest="end", type=_day, help="top/mix/latency: last day")
    report.set_defaults(handler=run_report)

    sql = subparsers.add_parser("sql", help="run SQL against the ledger (read-only unless --write)")
    sql.add_argument("query", help='one SQL statement, e.g. "SELECT count() FROM spendstream.usage_ledger"')
    sql.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    sql.add_argument("--write", action="store_true", help="allow statements that change data")
    sql.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=60,
        metavar="SECONDS",
        help="stop a statement that runs longer (default 60; the engine cancels it, and a read that it cannot cancel "
        "ends this command a few seconds later)",
    )
    sql.add_argument(
        "--max-memory-mb",
        type=_positive_megabytes,
        default=4096,
        metavar="MB",
        help="stop a statement that would use more memory (default 4096), so one query cannot starve the ledger",
    )
    sql.set_defaults(handler=run_sql)


def register_ledger_commands(ledger_subparsers: argparse._SubParsersAction) -> None:
    """Add ``reprice`` under the ``ledger`` group."""
    reprice = ledger_subparsers.add_parser(
        "reprice", help="recompute past costs with the prices of the policy in force (stop `dev` first)"
    )
    reprice.add_argument("--model", required=True, help="model served (or requested when none was served)")
    reprice.add_argument("--from", dest="start", required=True, type=date.fromisoformat, help="first UTC day")
    reprice.add_argument("--to", dest="end", required=True, type=date.fromisoformat, help="last UTC day")
    reprice.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    reprice.set_defaults(handler=run_reprice)


def _month(text: str) -> date:
    try:
        month = datetime.strptime(text, "%Y-%m").date()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM, got {text!r}") from None
    problem = report_day_problem(month, monthly=True)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return month


def _day(text: str) -> date:
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None
    problem = report_day_problem(day)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return day


def _counter(most: int) -> Callable[[str], int]:
    def count(text: str) -> int:
        if not text.isdigit() or not 0 < int(text) <= most:
            raise argparse.ArgumentTypeError(f"expected 1..{most}, got {text!r}")
        return int(text)

    return count


def _open(settings: Settings, create: bool = False) -> Any:
    """The ledger's client, migrated. An embedded ledger that does not exist is an error unless ``create``: a
    report from a mistyped or unset data directory would otherwise print an empty ledger's figures, not an error."""
    from spendstream.core.ledger_store import connect, migrate

    embedded = settings.ledger_dsn.startswith("chdb://")
    if embedded and not create and not Path(settings.ledger_dsn.removeprefix("chdb://")).is_dir():
        raise ConfigError(
            f"no ledger in {settings.data_dir.resolve()}: nothing has written one there. Set SPENDSTREAM_DATA_DIR "
            "to your stack's data directory (`spendstream dev` uses .spendstream in the directory it was started "
            "from), or SPENDSTREAM_CLICKHOUSE_DSN to your ClickHouse"
        )
    client = connect(settings)  # LedgerBusy when another process holds an embedded ledger
    migrate(client, settings)
    return client


class ApiUnavailable(RuntimeError):
    """No API serves this data directory, or it could not be reached; the message says which."""


class ApiRefused(RuntimeError):
    """The API answered with an error; the message is the API's own."""


def _report_from_api(settings: Settings, path: str, body: dict[str, Any] | None = None) -> tuple[Report, str]:
    """A report from the API that serves this data directory (``DATA_DIR/api.json``, never a guessed port), with
    its local read token: GET ``path``, or POST ``body`` as JSON; (the report, the API's URL)."""
    import json
    import urllib.error
    import urllib.request

    from spendstream.analytics.report_model import report_from_json
    from spendstream.core.api_address import read_address

    address = read_address(settings.api_address_path)
    if address is None:
        raise ApiUnavailable(f"no spendstream API serves {settings.data_dir.resolve()} ({settings.api_address_path} "
                             "names no running API)")  # fmt: skip
    headers = {"Authorization": f"Bearer {address.read_token}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{address.url}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=SQL_API_TIMEOUT_S + 30) as response:
            return report_from_json(json.load(response)), address.url
    except urllib.error.HTTPError as exc:
        raise ApiRefused(f"the API at {address.url} answered {exc.code}: {_api_error_text(exc.read())}") from None
    except OSError as exc:
        raise ApiUnavailable(f"the API at {address.url} (process {address.pid}) did not answer: {exc}") from None


def _report_path(args: argparse.Namespace) -> str:
    """``GET /v1/reports/{kind}`` with the command's options as its query."""
    import urllib.parse

    params = {
        "month": args.month and f"{args.month:%Y-%m}",
        "as_of": args.as_of and args.as_of.isoformat(),
        "weeks": args.weeks,
        "by": args.by,
        "limit": args.limit,
        "from": args.start and args.start.isoformat(),
        "to": args.end and args.end.isoformat(),
    }
    return f"/v1/reports/{args.kind}?{urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})}"


def _print_from_api(
    command: str, busy: LedgerBusy, ask: Callable[[], tuple[Report, str]], fmt: str, refused_status: int
) -> int:
    """Print what the API of this data directory answers while another process holds the embedded ledger."""
    try:
        report, api = ask()
    except ApiRefused as exc:
        print(f"spendstream {command}: {exc}", file=sys.stderr)
        return refused_status
    except ApiUnavailable as exc:
        print(
            f"spendstream {command}: the ledger {busy} is open in another spendstream process, and {exc}; stop that "
            "process, or run this command with its SPENDSTREAM_DATA_DIR",
            file=sys.stderr,
        )
        return 1
    print(f"spendstream {command}: read through the API at {api} (it owns the ledger {busy})", file=sys.stderr)
    sys.stdout.write(render(report, fmt))
    return 0


def _api_error_text(body: bytes) -> str:
    """The API's own message: ``error`` and each problem's field and message."""
    import json

    try:
        doc = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500]
    problems = [f"{p.get('field')}: {p.get('message')}" for p in doc.get("problems") or [] if isinstance(p, dict)]
    return "; ".join([str(doc.get("error", "")), *problems]).strip("; ")


def run_report(args: argparse.Namespace, settings: Settings) -> int:
    try:
        client = _open(settings)
    except LedgerBusy as busy:
        return _print_from_api("report", busy, lambda: _report_from_api(settings, _report_path(args)), args.format, 2)
    try:
        options = {k: getattr(args, k) for k in ("month", "as_of", "weeks", "by", "limit", "start", "end")}
        timezone = report_timezone(policy_in_force_offline(settings), settings)
        report = build_report(args.kind, client, settings, options, datetime.now(UTC), timezone=timezone)
    except ValueError as exc:
        print(f"spendstream report: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    print(f"spendstream report: read the ledger {settings.ledger_dsn}", file=sys.stderr)
    sys.stdout.write(render(report, args.format))
    return 0


def run_sql(args: argparse.Namespace, settings: Settings) -> int:
    try:
        client = _open(settings, create=args.write)
    except LedgerBusy as busy:
        if args.write:
            print(
                f"spendstream sql: the embedded ledger {busy} is open in a running spendstream process (dev or "
                "sink), and writes go to the ledger directly: stop it first, or use a ClickHouse server "
                "(SPENDSTREAM_CLICKHOUSE_DSN=http://...)",
                file=sys.stderr,
            )
            return 1
        return _sql_through_api(args, settings, busy)
    if not args.write:  # the engine checks its time limit between blocks: one long block runs past it
        _end_after(args.timeout + SQL_GRACE_S, f"the statement ran past --timeout {args.timeout}; stopped")
    try:
        report = sql_report(
            client, settings, args.query, write=args.write, timeout_s=args.timeout, max_memory_mb=args.max_memory_mb
        )
    except Exception as exc:  # the server's message is the useful part
        print(f"spendstream sql: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    finally:
        client.close()
    sys.stdout.write(render(report, args.format))
    return 0


def _sql_through_api(args: argparse.Namespace, settings: Settings, busy: LedgerBusy) -> int:
    """A read while ``spendstream dev`` (or a sink with the API) holds the embedded ledger: the API runs it."""
    body = {
        "query": args.query,
        "timeout_s": min(args.timeout, SQL_API_TIMEOUT_S),
        "max_memory_mb": min(args.max_memory_mb, SQL_API_MAX_MEMORY_MB),
    }
    return _print_from_api("sql", busy, lambda: _report_from_api(settings, "/v1/sql", body), args.format, 1)


def _end_after(seconds: float, message: str) -> None:
    """End this process (exit 1, saying why) if it is still running ``seconds`` from now: the embedded engine runs
    in it and can only be stopped with it."""

    def end() -> None:
        print(f"spendstream sql: {message}", file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()


def _positive_megabytes(text: str) -> int:
    megabytes = int(text) if text.isdigit() else 0
    if megabytes <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of megabytes above 0, got {text!r}")
    return megabytes


def _positive_seconds(text: str) -> int:
    seconds = int(text) if text.isdigit() else 0
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds above 0, got {text!r}")
    return seconds


def run_reprice(args: argparse.Namespace, settings: Settings) -> int:
    """Reprice with the prices of the policy in force, never with list prices alone: those priced a self-hosted
    model's override-priced rows at the unknown-model price, 1,750 times their cost, without a word."""
    from spendstream.analytics.reprice import policy_pricer, pricing_policy, reprice
    from spendstream.core.policy import PolicyError

    if args.end < args.start:
        print("spendstream ledger reprice: --to is before --from", file=sys.stderr)
        return 2
    try:
        pricing = pricing_policy(settings.policy, settings.data_dir)
    except (OSError, PolicyError) as exc:
        print(f"spendstream ledger reprice: SPENDSTREAM_POLICY: {exc}", file=sys.stderr)
        return 2
    if pricing is None:
        print(f"spendstream ledger reprice: no policy to price with: SPENDSTREAM_POLICY is not set and no policy is "
              f"recorded in {settings.data_dir.resolve()} (`spendstream dev` records the policy in force there). Set "
              "SPENDSTREAM_POLICY to the policy file in force (`spendstream policy show` prints it): list prices "
              "alone would reprice every model the policy prices by override; nothing was changed",
              file=sys.stderr)  # fmt: skip
        return 2
    if pricing.warning:
        print(f"spendstream ledger reprice: {pricing.warning}", file=sys.stderr)
    try:
        client = _open(settings)
    except LedgerBusy as busy:
        print(f"spendstream ledger reprice: the ledger {busy} is open in another spendstream process (`spendstream "
              "dev` or a sink): stop it, then reprice again", file=sys.stderr)  # fmt: skip
        return 1
    try:
        result = reprice(
            client, settings.clickhouse_database, args.model, args.start, args.end,
            policy_pricer(pricing.policy.price_table),
        )  # fmt: skip
    finally:
        client.close()
    sys.stdout.write(render(result.report(args.model, args.start, args.end, pricing.describe()), args.format))
    return 0

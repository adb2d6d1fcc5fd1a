"""``spendstream export focus``: the ledger as a FOCUS 1.2 cost and usage file (``analytics.focus``)."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from spendstream.analytics.commands import LedgerBusy, _api_error_text, _month, _open
from spendstream.analytics.focus import FORMATS, export_focus
from spendstream.core.config import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser("export", help="export the ledger in a standard format (FOCUS 1.2)")
    kinds = export.add_subparsers(dest="export_command", metavar="FORMAT", required=True)
    focus = kinds.add_parser(
        "focus", help="FOCUS 1.2 cost and usage rows of a month, one per day, attribution and model"
    )
    focus.add_argument("--month", type=_month, required=True, help="billing period, a UTC calendar month (YYYY-MM)")
    focus.add_argument("--format", choices=FORMATS, default="csv", help="file format (default csv)")
    focus.add_argument("--output", type=Path, help="file to write (default: standard output)")
    focus.set_defaults(handler=run_export_focus)


@contextlib.contextmanager
def _destination(path: Path | None, fmt: str) -> Iterator[IO[Any]]:
    """The output file (removed again if the export fails), or standard output."""
    if path is None:
        yield sys.stdout if fmt == "csv" else sys.stdout.buffer
        return
    mode = {"newline": ""} if fmt == "csv" else {}
    with path.open("w" if fmt == "csv" else "wb", **mode) as out:  # type: ignore[call-overload]
        try:
            yield out
        except BaseException:
            path.unlink(missing_ok=True)
            raise


def run_export_focus(args: argparse.Namespace, settings: Settings) -> int:
    try:
        client = _open(settings)
    except LedgerBusy as busy:
        return _export_through_api(args, settings, str(busy))
    try:
        with _destination(args.output, args.format) as out:
            rows = export_focus(client, settings.clickhouse_database, args.month, args.format, out)
    finally:
        client.close()
    print(f"spendstream export: {rows} FOCUS rows for {args.month:%Y-%m} from {settings.ledger_dsn}", file=sys.stderr)
    return 0


def _export_through_api(args: argparse.Namespace, settings: Settings, busy: str) -> int:
    """The API that owns this data directory's ledger (``DATA_DIR/api.json``) writes the export instead."""
    from spendstream.core.api_address import read_address

    address = read_address(settings.api_address_path)
    if address is None:
        print(f"spendstream export: the ledger {busy} is open in another spendstream process and no API serves "
              f"{settings.data_dir.resolve()}; stop that process first", file=sys.stderr)  # fmt: skip
        return 1
    query = urllib.parse.urlencode({"month": f"{args.month:%Y-%m}", "format": args.format})
    request = urllib.request.Request(
        f"{address.url}/v1/exports/focus?{query}", headers={"Authorization": f"Bearer {address.read_token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as response, _destination(args.output, "parquet") as out:
            shutil.copyfileobj(response, out)  # the API's bytes, as they are
    except urllib.error.HTTPError as exc:
        print(f"spendstream export: the API at {address.url} answered {exc.code}: {_api_error_text(exc.read())}",
              file=sys.stderr)  # fmt: skip
        return 2
    except OSError as exc:
        print(f"spendstream export: the API at {address.url} did not answer: {exc}", file=sys.stderr)
        return 1
    print(f"spendstream export: read through the API at {address.url} (it owns the ledger {busy})", file=sys.stderr)
    return 0

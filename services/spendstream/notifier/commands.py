"""``spendstream notifier`` (the service) and ``spendstream notifications list`` (delivery state)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from spendstream.core.config import Settings

LIST_FORMATS = ("table", "json")


def register(subparsers: argparse._SubParsersAction) -> None:
    notifier = subparsers.add_parser(
        "notifier",
        help="deliver alerts and scheduled reports to their owners (webhook, Slack, e-mail)",
        description="Follow spendstream.alerts and decisions, route each alert by the policy's notifications "
        "section, deliver at least once with retries, record every delivery in the ledger's notifications table. "
        "With an embedded chDB ledger, `spendstream dev` runs it inside the ledger process instead.",
    )
    notifier.set_defaults(handler=run_notifier)

    notifications = subparsers.add_parser("notifications", help="show notifications and their delivery state")
    actions = notifications.add_subparsers(dest="notifications_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="newest notifications first: status, attempts, last error")
    listing.add_argument("--status", choices=("pending", "failed", "sent", "dead_letter"), help="only this status")
    listing.add_argument("--limit", type=_limit, default=50, help="how many (default 50, at most 1000)")
    listing.add_argument("--format", choices=LIST_FORMATS, default="table", help="output format (default table)")
    listing.set_defaults(handler=run_list)


def _limit(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"expected 1..1000, got {text!r}")
    return int(text)


def policy_problems(settings: Settings, env: dict[str, str]) -> list[str]:
    """Why the notifier cannot start with the policy file it is given (each problem names its field)."""
    from spendstream.core.notification_policy import missing_secrets
    from spendstream.core.policy import PolicyError, load_policy

    if settings.policy is None:
        return []
    try:
        policy = load_policy(settings.policy)
    except PolicyError as exc:
        return exc.problems
    if policy.notifications is None:
        return []
    return [f"{settings.policy}: {problem}" for problem in missing_secrets(policy.notifications, env)]


def run_notifier(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.analytics.commands import LedgerBusy, _open
    from spendstream.notifier.service import Notifier

    problems = policy_problems(settings, dict(os.environ))
    if problems:
        print("spendstream notifier: cannot start:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    try:
        client = _open(settings, create=True)
    except LedgerBusy as busy:
        print(
            f"spendstream notifier: the embedded ledger {busy} is open in another process; `spendstream dev` "
            "already runs the notifier in its ledger process (or use a ClickHouse server)",
            file=sys.stderr,
        )
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("spendstream notifier: following spendstream.alerts and spendstream.enforcement", flush=True)
    try:
        Notifier(settings, client).run(stop)
    finally:
        client.close()
    return 0


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.analytics.commands import ApiRefused, ApiUnavailable, LedgerBusy, _open
    from spendstream.notifier.store import list_notifications

    try:
        client = _open(settings)
    except LedgerBusy as busy:
        try:
            rows = _list_from_api(args, settings)
        except ApiRefused as exc:
            print(f"spendstream notifications list: {exc}", file=sys.stderr)
            return 2
        except ApiUnavailable as exc:
            print(f"spendstream notifications list: the ledger {busy} is open in another spendstream process, and "
                  f"{exc}", file=sys.stderr)  # fmt: skip
            return 1
    else:
        try:
            found = list_notifications(client, settings.clickhouse_database, args.limit, args.status)
            rows = [_plain(r) for r in found]
        finally:
            client.close()
    sys.stdout.write(render_list(rows, args.format))
    return 0


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


def _list_from_api(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    from spendstream.analytics.commands import ApiRefused, ApiUnavailable, _api_error_text
    from spendstream.core.api_address import read_address

    address = read_address(settings.api_address_path)
    if address is None:
        raise ApiUnavailable(f"no spendstream API serves {settings.data_dir.resolve()}")
    query = urllib.parse.urlencode({"limit": args.limit, **({"status": args.status} if args.status else {})})
    request = urllib.request.Request(
        f"{address.url}/v1/notifications?{query}", headers={"Authorization": f"Bearer {address.read_token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return list(json.load(response)["notifications"])
    except urllib.error.HTTPError as exc:
        raise ApiRefused(f"the API at {address.url} answered {exc.code}: {_api_error_text(exc.read())}") from None
    except OSError as exc:
        raise ApiUnavailable(f"the API at {address.url} did not answer: {exc}") from None


def render_list(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        import json

        return json.dumps({"notifications": rows}, indent=2) + "\n"
    if not rows:
        return "(no notifications)\n"
    header = ["created", "status", "attempts", "kind", "scope", "channel", "to", "last error"]
    body = [
        [
            str(r["created_at"])[:19], r["status"], str(r["attempts"]), r["kind"], r["scope"], r["channel"],
            ",".join(r["audience"]), (r["last_error"] or "")[:60],
        ]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]
    ]
    return "\n".join(lines) + "\n"

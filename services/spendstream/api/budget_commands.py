"""``spendstream budget increase|request|approve|deny|list`` and ``spendstream feature register|list``.

Thin clients of the API (``api/budget_requests.py``): the API that serves this data directory (its address file),
else ``SPENDSTREAM_API_HOST``/``PORT``. The principal is the token in ``SPENDSTREAM_API_TOKEN`` (or
``SPENDSTREAM_ADMIN_TOKEN``): who requests or approves is that token's name, never an argument.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from spendstream.core.config import Settings
from spendstream.core.money_text import exact_usd_text


def register(subparsers: argparse._SubParsersAction) -> None:
    budget = subparsers.add_parser("budget", help="temporary increases, overage requests, approvals and denials")
    actions = budget.add_subparsers(dest="budget_command", metavar="ACTION", required=True)

    def amount_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("scope", help="the budget's scope, e.g. team:marketing")
        parser.add_argument("amount_usd", help="USD added to the budget, e.g. 2000")
        parser.add_argument("--period", default="month", help="the budget's period (default month)")
        parser.add_argument("--reason", required=True, help="why: it is kept in the audit trail")

    increase = actions.add_parser("increase", help="grant a temporary increase at once (approver token)")
    amount_args(increase)
    increase.add_argument(
        "--until", required=True, help="YYYY-MM-DD (through that local day) or an ISO time, at most 366 days ahead"
    )
    increase.set_defaults(handler=run_post, path="/v1/budget/increases")
    request = actions.add_parser("request", help="ask for an increase or, at 100 percent of a budget, an overage")
    amount_args(request)
    request.add_argument(
        "--until",
        help="an increase's expiry: YYYY-MM-DD (through that local day) or an ISO time, at most 366 days ahead; "
        "an overage takes none (it lasts to the end of its period)",
    )
    request.add_argument(
        "--overage", action="store_const", const="overage", default="increase", dest="kind",
        help="an overage request: lifts the scope's shutoff once approved",
    )  # fmt: skip
    request.set_defaults(handler=run_post, path="/v1/budget/requests")
    for verb, helptext in (("approve", "approve a pending request (approver token)"), ("deny", "deny a request")):
        decide = actions.add_parser(verb, help=helptext)
        decide.add_argument("id", help="the request id (spendstream budget list)")
        decide.add_argument("--reason", required=True, help="why: it is kept in the audit trail")
        decide.set_defaults(handler=run_post, path=f"/v1/budget/requests/{{id}}/{verb}")
    listing = actions.add_parser("list", help="budget requests and their state")
    listing.add_argument("--status", choices=("pending", "approved", "denied", "expired"), help="only these")
    listing.add_argument("--kind", choices=("increase", "overage", "feature"), help="only this kind")
    listing.set_defaults(handler=run_list)

    feature = subparsers.add_parser("feature", help="register a new feature with its projected monthly cost")
    feature_actions = feature.add_subparsers(dest="feature_command", metavar="ACTION", required=True)
    register_ = feature_actions.add_parser(
        "register", help="register a feature; above the threshold it waits for approval"
    )
    register_.add_argument("name", help="the feature name, as usage events carry it")
    register_.add_argument("monthly_cost_usd", help="projected cost per month in USD")
    register_.add_argument("--reason", required=True, help="what it is for: kept in the audit trail")
    register_.set_defaults(handler=run_post, path="/v1/features")
    features = feature_actions.add_parser("list", help="registered features and their approval")
    features.add_argument("--status", choices=("pending", "approved", "denied"), help="only these")
    features.set_defaults(handler=run_list, kind="feature")


class ApiCallFailed(RuntimeError):
    pass


def _api(settings: Settings, method: str, path: str, body: dict[str, Any] | None, reading: bool) -> Any:
    from spendstream.core.api_address import read_address

    address = read_address(settings.api_address_path)
    url = address.url if address is not None else f"http://{settings.api_host}:{settings.api_port}"
    secret = settings.api_token or settings.admin_token
    token = secret.get_secret_value() if secret is not None else (address.read_token if address and reading else None)
    if token is None:
        raise ApiCallFailed("set SPENDSTREAM_API_TOKEN to your token (spendstream api token create): it names who acts")
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    call = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(call, timeout=60) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", "")
        except ValueError:
            message = exc.reason
        raise ApiCallFailed(f"{exc.code}: {message}") from None
    except OSError as exc:
        raise ApiCallFailed(f"no spendstream API answers at {url}: {exc}") from None


def _line(r: dict[str, Any]) -> str:
    until = r["expires_at"] or "-"
    by = f"{r['step']} by {r['step_by']}" + (f" ({r['approver_level']})" if r["approver_level"] else "")
    amount = exact_usd_text(int(r["amount_nanos"]))  # $2,000.00 as the reports read; an odd nano-dollar shows
    columns = [r["id"], r["status"], r["scope"], r["period"], amount, f"until {until}"]
    return "\t".join([*columns, f"{by}: {r['step_reason']}"])


def run_post(args: argparse.Namespace, settings: Settings) -> int:
    fields = ("scope", "amount_usd", "period", "reason", "until", "kind", "name", "monthly_cost_usd")
    body = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    path = args.path.format(id=getattr(args, "id", ""))
    try:
        record = _api(settings, "POST", path, body, reading=False)
    except ApiCallFailed as exc:
        print(f"spendstream {args.command}: {exc}", file=sys.stderr)
        return 1
    print(_line(record))
    return 0


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    from urllib.parse import urlencode

    query = {k: v for k in ("status", "kind") if (v := getattr(args, k, None))}
    try:
        found = _api(settings, "GET", f"/v1/budget/requests?{urlencode(query)}", None, reading=True)
    except ApiCallFailed as exc:
        print(f"spendstream {args.command}: {exc}", file=sys.stderr)
        return 1
    for record in found["requests"]:
        print(_line(record))
    return 0

"""``spendstream api``: the ingest, report and dashboard HTTP service; ``api token create|list|revoke``."""

from __future__ import annotations

import argparse
import sys

from spendstream.api.tokens import SCOPE_FIELDS
from spendstream.core.arg_types import setting_number
from spendstream.core.config import ConfigError, Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    api = subparsers.add_parser("api", help="serve HTTP usage ingest, reports as JSON and the dashboard")
    api.add_argument("--host", default=None, help="listen address (default SPENDSTREAM_API_HOST)")
    api.add_argument(
        "--port", type=setting_number("api_port"), default=None, help="listen port (default SPENDSTREAM_API_PORT)"
    )
    api.set_defaults(handler=run_api)
    tokens = api.add_subparsers(dest="api_command", metavar="token")
    token = tokens.add_parser("token", help="create, list or revoke API tokens (SPENDSTREAM_API_TOKENS_FILE)")
    actions = token.add_subparsers(dest="token_action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a token and print it once")
    create.add_argument(
        "--role",
        required=True,
        choices=("viewer", "ingest", "approver", "admin"),
        help="what the token may do (see README: API access)",
    )
    create.add_argument("--level", default="", help="approver: its approval level (the policy's approvals.levels)")
    create.add_argument("--name", help="a unique name (default: role and scope)")
    for field in SCOPE_FIELDS:
        create.add_argument(
            f"--{field}", action="append", default=[], help=f"ingest: a {field} it may report for (repeatable)"
        )
    create.set_defaults(handler=run_token_create)
    listing = actions.add_parser("list", help="names, roles and scopes (never the tokens)")
    listing.set_defaults(handler=run_token_list)
    revoke = actions.add_parser("revoke", help="remove a token; a running API refuses it at once")
    revoke.add_argument("name", help="the name given at create (see api token list)")
    revoke.set_defaults(handler=run_token_revoke)


def run_api(args: argparse.Namespace, settings: Settings) -> int:
    from aiohttp import web

    from spendstream.api.app import create_app, server_options

    host, port = args.host or settings.api_host, args.port if args.port is not None else settings.api_port
    settings = settings.model_copy(update={"api_host": host, "api_port": port})
    print(f"spendstream api on http://{host}:{port}/ (dashboard), POST /v1/usage", flush=True)
    web.run_app(create_app(settings), host=host, port=port, print=None, **server_options(settings))
    return 0


def run_token_create(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.api.tokens import add_token

    scope = {field + "s": getattr(args, field) for field in SCOPE_FIELDS}
    if args.role != "ingest" and any(scope.values()):
        flags = "/".join(f"--{field}" for field in SCOPE_FIELDS)
        print(f"spendstream api token create: {flags} limit ingest tokens only", file=sys.stderr)
        return 2
    if (args.role == "approver") != bool(args.level):
        print("spendstream api token create: an approver token needs --level, and only it", file=sys.stderr)
        return 2
    name = args.name or "-".join(
        [args.role, *(v for values in scope.values() for v in values), *([args.level] if args.level else [])]
    )
    try:
        token = add_token(settings.api_tokens_path, args.role, name, level=args.level, **scope)
    except ConfigError as exc:
        print(f"spendstream api token create: {exc}", file=sys.stderr)
        return 2
    print(token)
    print(
        f"# {args.role} token {name!r} added to {settings.api_tokens_path}; it is shown only now "
        "(use it as 'Authorization: Bearer <token>')",
        file=sys.stderr,
    )
    return 0


def run_token_list(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.api.tokens import parse_tokens

    path = settings.api_tokens_path
    tokens = parse_tokens(path.read_text(encoding="utf-8"), path).values() if path.exists() else []
    for t in tokens:
        scope = " ".join(f"{f}={','.join(getattr(t, f + 's'))}" for f in SCOPE_FIELDS if getattr(t, f + "s"))
        if t.level:
            scope = f"level={t.level} {scope}".strip()
        print(f"{t.name}\t{t.role}\t{scope or '-'}\t{t.created_at}")
    return 0


def run_token_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.api.tokens import remove_token

    if not remove_token(settings.api_tokens_path, args.name):
        print(
            f"spendstream api token revoke: no token named {args.name!r} in {settings.api_tokens_path}", file=sys.stderr
        )
        return 1
    print(f"revoked {args.name}")
    return 0

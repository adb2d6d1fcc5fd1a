"""``spendstream api``: the ingest, report and dashboard HTTP service."""

from __future__ import annotations

import argparse

from spendstream.core.config import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    api = subparsers.add_parser("api", help="serve HTTP usage ingest, reports as JSON and the dashboard")
    api.add_argument("--host", default=None, help="listen address (default SPENDSTREAM_API_HOST)")
    api.add_argument("--port", type=int, default=None, help="listen port (default SPENDSTREAM_API_PORT)")
    api.set_defaults(handler=run_api)


def run_api(args: argparse.Namespace, settings: Settings) -> int:
    from aiohttp import web

    from spendstream.api.app import create_app

    host, port = args.host or settings.api_host, args.port if args.port is not None else settings.api_port
    print(f"spendstream api on http://{host}:{port}/ (dashboard), POST /v1/usage", flush=True)
    web.run_app(create_app(settings), host=host, port=port, print=None)
    return 0

"""``spendstream gateway`` (run the proxy) and ``spendstream gateway keygen`` (mint a virtual key)."""

from __future__ import annotations

import argparse
import json

from spendstream.core.config import Settings
from spendstream.core.events import ATTRIBUTION_FIELDS


def register(subparsers: argparse._SubParsersAction) -> None:
    gateway = subparsers.add_parser("gateway", help="run the OpenAI/Anthropic-compatible metering proxy")
    gateway.add_argument("--config", help="gateway YAML/JSON (default: $SPENDSTREAM_GATEWAY_CONFIG)")
    gateway.add_argument("--host", help="listen address (default: $SPENDSTREAM_GATEWAY_HOST)")
    gateway.add_argument("--port", type=int, help="listen port (default: $SPENDSTREAM_GATEWAY_PORT)")
    gateway.set_defaults(handler=run_gateway)
    actions = gateway.add_subparsers(dest="gateway_command", metavar="ACTION")
    keygen = actions.add_parser("keygen", help="print a new virtual key and the keys-file entry for it")
    keygen.add_argument("--name", default="", help="a label for the key (shown in usage tags)")
    for field in ATTRIBUTION_FIELDS:
        keygen.add_argument(f"--{field}", default="", help=f"the {field} every call with this key is charged to")
    keygen.add_argument("--allow-header-attribution", action="store_true", help="let X-Spendstream-* refine it")
    keygen.set_defaults(handler=run_keygen)


def run_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from aiohttp import web

    from spendstream.core.policy import load_policy
    from spendstream.gateway.app import Gateway
    from spendstream.gateway.config import load_gateway_config

    config = load_gateway_config(args.config)
    if settings.policy:
        policy = load_policy(settings.policy)
        gateway = Gateway(
            config,
            settings,
            routing=policy.routing,
            thresholds=policy.thresholds,
            timezone=policy.timezone,
            prices=policy.price_table,
            hierarchy=policy.parent_scopes,
        )
    else:
        gateway = Gateway(config, settings)
    host, port = args.host or settings.gateway_host, args.port or settings.gateway_port
    print(f"gateway listening on http://{host}:{port} ({len(gateway.keys)} virtual keys)", flush=True)
    web.run_app(gateway.app(), host=host, port=port, access_log=None, print=None)
    return 0


def run_keygen(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.gateway.keys import hash_key, new_key

    key = new_key()
    entry: dict[str, object] = {"sha256": hash_key(key)}
    if args.name:
        entry["name"] = args.name
    entry.update({field: getattr(args, field) for field in ATTRIBUTION_FIELDS if getattr(args, field)})
    if args.allow_header_attribution:
        entry["allow_header_attribution"] = True
    print(f"key (give it to the client; it is not stored): {key}")
    print("keys-file entry:")
    print("- " + json.dumps(entry))
    return 0

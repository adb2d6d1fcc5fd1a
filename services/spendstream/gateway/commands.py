"""``spendstream gateway`` (run the proxy) and ``spendstream gateway keygen`` (mint a virtual key)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from spendstream.core.arg_types import setting_number, whole_number
from spendstream.core.attribution import ATTRIBUTION_FIELDS
from spendstream.core.config import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    gateway = subparsers.add_parser("gateway", help="run the OpenAI/Anthropic-compatible metering proxy")
    gateway.add_argument("--config", help="gateway YAML/JSON (default: $SPENDSTREAM_GATEWAY_CONFIG)")
    gateway.add_argument("--host", help="listen address (default: $SPENDSTREAM_GATEWAY_HOST)")
    gateway.add_argument(
        "--port", type=setting_number("gateway_port"), help="listen port (default: $SPENDSTREAM_GATEWAY_PORT)"
    )
    gateway.add_argument(
        "--workers",
        type=setting_number("gateway_workers"),
        help="gateway processes on the port, 0: one per CPU (default: $SPENDSTREAM_GATEWAY_WORKERS, 1)",
    )
    # Set on each worker by the supervisor: share the port, and reserve 1/N of each remaining budget.
    gateway.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    gateway.add_argument("--budget-share-of", type=whole_number(1), default=1, help=argparse.SUPPRESS)
    gateway.add_argument("--worker-index", type=whole_number(0), help=argparse.SUPPRESS)
    gateway.set_defaults(handler=run_gateway)
    actions = gateway.add_subparsers(dest="gateway_command", metavar="ACTION")
    keygen = actions.add_parser(
        "keygen",
        help="mint a virtual key and add it to the keys file (a running gateway picks it up)",
        description="Mint a virtual key and add its entry (the key's sha256, never the key) to the keys file: "
        "--keys-file, else the keys_file of the gateway config (--config or $SPENDSTREAM_GATEWAY_CONFIG), else "
        "the one `spendstream dev` uses, $SPENDSTREAM_DATA_DIR/keys.yaml.",
    )
    keygen.add_argument("--keys-file", type=Path, help="the keys file to add the key to")
    keygen.add_argument("--print-only", action="store_true", help="print the key and its entry; write nothing")
    keygen.add_argument("--name", default="", help="a label for the key (shown in usage tags)")
    for field in ATTRIBUTION_FIELDS:
        keygen.add_argument(f"--{field}", default="", help=f"the {field} every call with this key is charged to")
    keygen.add_argument(
        "--allow-header-attribution",
        action="store_true",
        help="let X-Spendstream-* headers fill the fields it leaves empty (never change one it sets)",
    )
    keygen.set_defaults(handler=run_keygen)
    keys = actions.add_parser(
        "keys",
        help="list or revoke the virtual keys of the keys file (a running gateway follows within a second)",
        description="List or revoke the virtual keys of the keys file keygen writes to (--keys-file, else the "
        "gateway config's keys_file, else $SPENDSTREAM_DATA_DIR/keys.yaml). Keys are stored as hashes: a key is "
        "named by its name, a prefix of 8 or more of its sha256 (as listed), or the key itself.",
    )
    keys.add_argument("--keys-file", type=Path, help="the keys file")
    key_actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    key_actions.add_parser("list", help="each key's name, sha256 prefix and attribution (never the key)")
    revoke = key_actions.add_parser("revoke", help="take a key out of the keys file")
    revoke.add_argument("selector", help="the key's name, a prefix of its sha256 (8+ hex digits), or the key")
    revoke.add_argument("--all", action="store_true", help="revoke every key the selector names (several by name)")
    keys.set_defaults(handler=run_keys)


def run_gateway(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import gc
    import signal
    from fractions import Fraction

    from spendstream.core.policy import load_policy
    from spendstream.gateway.app import Gateway, new_event_loop, serve, shut_down
    from spendstream.gateway.config import load_gateway_config
    from spendstream.gateway.workers import workers_wanted

    config = load_gateway_config(args.config)
    share = Fraction(1, max(1, args.budget_share_of))
    host, port = args.host or settings.gateway_host, args.port or settings.gateway_port
    workers = args.workers if args.workers is not None else settings.gateway_workers
    if workers < 0:
        print(f"--workers must be 0 (one per CPU) or more, got {workers}", file=sys.stderr)
        return 2
    if workers != 1 and not args.reuse_port:
        return _supervise_workers(args, settings, host, port, workers_wanted(workers), config.shutdown_timeout_s)
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
            policy=policy,
            budget_share=share,
        )
    else:
        gateway = Gateway(config, settings, budget_share=share)
    if args.worker_index is not None and settings.metrics_port is not None:  # each worker scraped on its own
        from spendstream.core.metrics import serve_metrics

        metrics_port = settings.metrics_port + args.worker_index
        try:
            serve_metrics(settings.model_copy(update={"metrics_port": metrics_port}))
        except OSError as exc:
            print(
                f"spendstream gateway: worker {args.worker_index} cannot serve /metrics on port {metrics_port} "
                f"({exc.strerror}): SPENDSTREAM_METRICS_PORT gives worker i the port + i; set it to a free range",
                file=sys.stderr,
            )
            return 1

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        try:
            server, bound = await serve(gateway, host, port, reuse_port=args.reuse_port)
        except OSError as exc:
            print(f"gateway not started: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
            return 1
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_keys)
        print(f"gateway listening on http://{host}:{bound} ({len(gateway.keys)} virtual keys)", flush=True)
        # A request allocates a few hundred objects that reference counting frees; with the default thresholds
        # the cyclic collector ran every few requests and its older generations rescanned the Enforcer's view.
        gc.set_threshold(50_000, 50, 100)
        gc.freeze()  # what startup built (modules, config, policy) is never garbage: out of every collection
        await stop.wait()
        await shut_down(gateway, server)
        return 0

    loop = new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def _supervise_workers(
    args: argparse.Namespace, settings: Settings, host: str, port: int, count: int, drain_s: float
) -> int:
    """Run ``count`` gateway processes on ``host:port`` (SO_REUSEPORT) under a supervisor."""
    from spendstream.gateway.workers import Supervisor, reuse_port_free

    if not port:
        print("--workers needs a fixed port (SPENDSTREAM_GATEWAY_PORT or --port), not 0", file=sys.stderr)
        return 2
    problem = reuse_port_free(host, port)
    if problem is not None:
        print(
            f"gateway not started: {problem}; choose another with SPENDSTREAM_GATEWAY_PORT or --port",
            file=sys.stderr,
        )
        return 1
    argv = [sys.executable, "-m", "spendstream.cli", "gateway", "--host", host, "--port", str(port)]
    if args.config:
        argv += ["--config", args.config]
    argv += ["--workers", "1", "--reuse-port", "--budget-share-of", str(count)]
    print(f"gateway: {count} worker processes on http://{host}:{port}", flush=True)
    if settings.metrics_port is not None:
        last = settings.metrics_port + count - 1
        print(f"gateway: each worker's /metrics on ports {settings.metrics_port}-{last}", flush=True)
    return Supervisor(argv, count, drain_s).run()


def _keys_file_in_use(args: argparse.Namespace, settings: Settings) -> tuple[Path | None, str]:
    """The keys file a gateway started the same way would read, and where that was decided."""
    from spendstream.gateway.config import CONFIG_ENV, load_gateway_config
    from spendstream.gateway.keys import data_dir_keys_file

    if args.keys_file:
        return args.keys_file.resolve(), "given by --keys-file"
    config_path = args.config or os.environ.get(CONFIG_ENV)
    if config_path:
        return load_gateway_config(config_path).keys_file, f"the keys_file of the gateway config {config_path}"
    return data_dir_keys_file(settings.data_dir), "the keys file `spendstream dev` uses, in SPENDSTREAM_DATA_DIR"


def _owner_problem(team: str, feature: str, project: str, settings: Settings) -> tuple[str, str] | None:
    """(field, why) if the policy refuses a key's team naming its feature or project: the policy of
    ``SPENDSTREAM_POLICY``, else the one ``spendstream dev`` recorded in force in the data directory; None if
    neither refuses it."""
    from spendstream.core.policy import PolicyError, load_policy
    from spendstream.core.policy_log import last_policy_recorded

    if not feature and not project:
        return None
    if settings.policy is not None:
        try:
            return load_policy(settings.policy).owner_problem(team, feature, project)
        except (OSError, PolicyError):
            return None  # the gateway itself says what is wrong with its policy file
    recorded = last_policy_recorded(settings.data_dir)
    return recorded[2].owner_problem(team, feature, project) if recorded else None


def run_keys(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.gateway.keys import KeyStore, key_selector_matches, remove_keys

    path, source = _keys_file_in_use(args, settings)
    if path is None:
        print(f"spendstream gateway keys: {source.removeprefix('the keys_file of ')} has no keys_file (its keys are "
              "inline): edit them there, or give --keys-file", file=sys.stderr)  # fmt: skip
        return 2
    if not path.exists():
        print(f"spendstream gateway keys: no keys file at {path} ({source}): `spendstream gateway keygen` makes it",
              file=sys.stderr)  # fmt: skip
        return 2
    store = KeyStore.load(path)
    if args.keys_command == "list":
        print(f"{len(store)} keys in {path} ({source})")
        for key in store:
            attribution = " ".join(f"{field}={value}" for field, value in key.as_dict().items() if value)
            headers = "  (+ X-Spendstream-* headers)" if key.allow_header_attribution else ""
            print(f"  {key.name or '(no name)':<24} {key.sha256[:12]}  {attribution or '(no attribution)'}{headers}")
        return 0
    named = [key for key in store if key_selector_matches(key, args.selector)]
    if not named:
        print(f"spendstream gateway keys revoke: no key in {path} is named {args.selector!r} (`spendstream gateway "
              "keys list` shows names and sha256 prefixes)", file=sys.stderr)  # fmt: skip
        return 1
    if len(named) > 1 and not args.all:
        listed = ", ".join(key.sha256[:12] for key in named)
        print(f"spendstream gateway keys revoke: {args.selector!r} names {len(named)} keys ({listed}): give one's "
              "sha256 prefix, or --all to revoke them all", file=sys.stderr)  # fmt: skip
        return 1
    remove_keys(path, {key.sha256 for key in named})
    for key in named:
        print(f"revoked {key.name or '(no name)'} {key.sha256[:12]} from {path}")
    print("a running gateway that reads this file refuses it within a second (at once on SIGHUP)")
    return 0


def run_keygen(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.gateway.keys import add_key, hash_key, new_key

    key = new_key()
    entry: dict[str, object] = {"sha256": hash_key(key)}
    if args.name:
        entry["name"] = args.name
    entry.update({field: getattr(args, field) for field in ATTRIBUTION_FIELDS if getattr(args, field)})
    if args.allow_header_attribution:
        entry["allow_header_attribution"] = True
    owned = _owner_problem(args.team, args.feature, args.project, settings)
    if owned:
        field, problem = owned
        where = "its features.<name>.teams" if field == "feature" else "its projects: {<name>: <team>}"
        print(
            f"warning: {problem}: every call with this key will be refused (403) until the policy gives the "
            f"{field} to this team ({where})",
            file=sys.stderr,
        )
    print(f"key (give it to the client; it is not stored): {key}")
    if args.print_only:
        print("keys-file entry:")
        print("- " + json.dumps(entry))
        return 0
    path, source = _keys_file_in_use(args, settings)
    if path is None:
        print("keys-file entry:")
        print("- " + json.dumps(entry))
        print(
            f"not written: {source.removeprefix('the keys_file of ')} has no keys_file (its keys are inline); add "
            "the entry to its keys and restart the gateway, or give --keys-file",
            file=sys.stderr,
        )
        return 1
    add_key(path, entry)
    print(f"added to {path} ({source})")
    print("a running gateway that reads this file accepts the key within a second (at once on SIGHUP)")
    return 0

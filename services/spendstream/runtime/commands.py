"""``spendstream broker``, ``dev``, ``demo``, ``topics create`` and ``sink`` (the ledger process)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from spendstream.core.arg_types import whole_number
from spendstream.core.config import Settings

if TYPE_CHECKING:
    from spendstream.core.policy import Policy


def register(subparsers: argparse._SubParsersAction) -> None:
    broker = subparsers.add_parser("broker", help="run the embedded Kafka-protocol broker alone")
    broker.add_argument("--port", type=whole_number(0, 65535), default=None, help="loopback port (default: a free one)")
    broker.add_argument("--no-topics", action="store_true", help="do not create the spendstream topics")
    broker.set_defaults(handler=run_broker)

    dev = subparsers.add_parser(
        "dev",
        help="run the whole pipeline on this machine: broker, processor, sink, api, gateway (Ctrl-C stops all)",
    )
    dev.add_argument(
        "--policy", type=Path, default=None, help="policy YAML (default: SPENDSTREAM_POLICY or the bundled one)"
    )
    dev.add_argument(
        "--stub-upstream",
        action="store_true",
        help="answer LLM calls with a local stub instead of the real providers (no provider keys needed)",
    )
    dev.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,  # `spendstream -v dev` keeps its meaning
        help="show every line the services print (faust's logs and all); default: states, decisions, alerts, errors",
    )
    dev.set_defaults(handler=run_dev)

    demo = subparsers.add_parser(
        "demo",
        help="the scripted story on the embedded stack: budgets, fallback, shutoff, a runaway loop, the CFO report",
    )
    demo.add_argument(
        "--keep-running", action="store_true", help="keep the stack (and the dashboard) up until Enter or Ctrl-C"
    )
    demo.add_argument(
        "--json-summary", type=Path, default=None, metavar="FILE", help="write what happened, machine-checkable, here"
    )
    demo.set_defaults(handler=run_demo)

    topics = subparsers.add_parser("topics", help="manage the spendstream topics")
    topics_sub = topics.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    create = topics_sub.add_parser("create", help="create every missing topic (idempotent)")
    create.set_defaults(handler=run_topics_create)

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
    sink.add_argument(
        "--with-notifier",
        action="store_true",
        help="also run the notifier in this process (as `spendstream dev` does with an embedded ledger)",
    )
    sink.add_argument("--no-audit", action="store_true", help="do not write decisions and alerts to the ledger")
    sink.set_defaults(handler=run_sink)


def run_sink(args: argparse.Namespace, settings: Settings) -> int:
    """The ledger process: the sink, the audit sink and optionally the API and the notifier on one ledger client."""
    from spendstream.runtime.ledger_process import run_ledger_process

    return run_ledger_process(
        settings, with_audit=not args.no_audit, with_api=args.with_api, with_notifier=args.with_notifier
    )


def run_broker(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.runtime.embedded_broker import EmbeddedBroker
    from spendstream.runtime.topic_admin import create_topics

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedBroker(port=args.port) as broker:
        if not args.no_topics:
            create_topics({"bootstrap.servers": broker.bootstrap}, settings.usage_partitions)
        print(f"broker listening on {broker.bootstrap}", flush=True)
        print(f"  export SPENDSTREAM_KAFKA_BOOTSTRAP={broker.bootstrap}", flush=True)
        stop.wait()
    print("broker stopped", flush=True)
    return 0


def run_dev(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.core.policy import PolicyError, load_policy
    from spendstream.runtime.data_dir_lock import DataDirInUse, hold_data_dir
    from spendstream.runtime.dev_stack import default_policy_path

    policy = args.policy or settings.policy or default_policy_path()
    if not policy.is_file():
        print(f"spendstream: policy file not found: {policy}", file=sys.stderr)
        return 2
    try:  # every service of the stack is started with it (SPENDSTREAM_POLICY), even when a restart restores another
        in_file = load_policy(policy)
    except PolicyError as exc:
        print(f"spendstream: {policy} is not a valid policy, so the stack is not started:\n  {exc}", file=sys.stderr)
        return 2
    missing = missing_notifier_secrets(in_file, policy)
    if missing:  # as `spendstream notifier` refuses, rather than a notifier whose channel fails every delivery
        print("spendstream: cannot start the notifier:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    try:
        with hold_data_dir(settings.data_dir.resolve()):
            return _run_dev_stack(args, settings, policy)
    except DataDirInUse as exc:
        print(f"spendstream: {exc}", file=sys.stderr)
        return 1


def _run_dev_stack(args: argparse.Namespace, settings: Settings, policy: Path) -> int:
    import os

    from spendstream.runtime.dev_stack import DevStack, write_dev_gateway_config

    stub = None
    if args.stub_upstream:
        from spendstream.gateway.stub_upstream import StubUpstream

        try:
            stub = StubUpstream(port=settings.stub_upstream_port).start()
        except OSError as exc:
            print(
                f"spendstream: the stub upstream cannot listen on port {settings.stub_upstream_port} ({exc}); "
                "set SPENDSTREAM_STUB_UPSTREAM_PORT to a free port, or 0 for any",
                file=sys.stderr,
            )
            return 1
        print(f"spendstream  stub upstream  {stub.url}  (answers the gateway's LLM calls)", flush=True)
    gateway_config, dev_key = (
        (Path(os.environ["SPENDSTREAM_GATEWAY_CONFIG"]), None)
        if os.environ.get("SPENDSTREAM_GATEWAY_CONFIG")
        else write_dev_gateway_config(settings.data_dir.resolve(), stub.url if stub else None)
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with DevStack(
            settings,
            policy=policy.resolve(),
            gateway_config=gateway_config,
            dev_key=dev_key,
            verbose=getattr(args, "verbose", False),
        ) as stack:
            stack.say("ready; Ctrl-C stops everything")
            while not stop.wait(0.5) and not stack.failed.is_set():
                pass
    except RuntimeError as exc:
        print(f"spendstream: {exc}", file=sys.stderr)
        return 1
    finally:
        if stub is not None:
            stub.stop()
    return 1 if stack.failed.is_set() else 0


def missing_notifier_secrets(policy: Policy, policy_path: Path) -> list[str]:
    """The secrets the policy's notification channels name that the environment does not set (field and variable)."""
    import os

    from spendstream.core.notification_policy import missing_secrets

    if policy.notifications is None:
        return []
    return [f"{policy_path}: {problem}" for problem in missing_secrets(policy.notifications, os.environ)]


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.runtime.demo import run_demo as story

    return story(settings, keep_running=args.keep_running, json_summary=args.json_summary)


def run_topics_create(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.runtime.topic_admin import create_topics

    outcome = create_topics(settings.kafka_client_config(), settings.usage_partitions, settings.replication_factor)
    for name, state in outcome.items():
        print(f"{state:8} {name}")
    return 0

"""``spendstream broker`` and ``spendstream topics create``."""

from __future__ import annotations

import argparse
import signal
import threading

from spendstream.core.config import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    broker = subparsers.add_parser("broker", help="run the embedded Kafka-protocol broker alone")
    broker.add_argument("--port", type=int, default=None, help="loopback port (default: a free one)")
    broker.add_argument("--no-topics", action="store_true", help="do not create the spendstream topics")
    broker.set_defaults(handler=run_broker)

    topics = subparsers.add_parser("topics", help="manage the spendstream topics")
    topics_sub = topics.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    create = topics_sub.add_parser("create", help="create every missing topic (idempotent)")
    create.set_defaults(handler=run_topics_create)


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


def run_topics_create(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.runtime.topic_admin import create_topics

    outcome = create_topics(settings.kafka_client_config(), settings.usage_partitions, settings.replication_factor)
    for name, state in outcome.items():
        print(f"{state:8} {name}")
    return 0

"""``spendstream processor`` and ``spendstream policy validate|apply|show``."""

from __future__ import annotations

import argparse
import gc
import getpass
import sys
from datetime import timedelta

from spendstream.core.config import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    proc = subparsers.add_parser("processor", help="run a spend-window processor worker (faust)")
    proc.add_argument(
        "--app-id", default=None, help="consumer group and table namespace (default spendstream-processor)"
    )
    proc.add_argument(
        "--allowed-lateness-s",
        type=int,
        default=None,
        help="events that arrive later than this after occurred_at go to the DLQ "
        "(default SPENDSTREAM_PROCESSOR_ALLOWED_LATENESS_S, one day)",
    )
    proc.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="most events per partition in a batch (default SPENDSTREAM_PROCESSOR_BATCH_SIZE)",
    )
    proc.add_argument(
        "--batch-ms",
        type=int,
        default=None,
        help="longest wait to fill a batch (default SPENDSTREAM_PROCESSOR_BATCH_MS): bigger batches mean fewer "
        "table writes per event, more latency",
    )
    proc.add_argument("--dump-totals", action="store_true", help="print every window total from the changelog and exit")
    proc.set_defaults(handler=run_processor)

    policy = subparsers.add_parser("policy", help="validate, publish or show the spend policy")
    actions = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    validate = actions.add_parser("validate", help="check a policy file; errors name the line and field")
    validate.add_argument("file", nargs="?", help="policy YAML (default SPENDSTREAM_POLICY)")
    validate.set_defaults(handler=run_policy_validate)
    apply = actions.add_parser("apply", help="validate and publish a policy to spendstream.policy (hot reload)")
    apply.add_argument("file", nargs="?", help="policy YAML (default SPENDSTREAM_POLICY)")
    apply.set_defaults(handler=run_policy_apply)
    show = actions.add_parser("show", help="summarise a policy file, or the policy in force on the topic")
    show.add_argument("file", nargs="?", help="policy YAML (default: the newest record on spendstream.policy)")
    show.set_defaults(handler=run_policy_show)


def _policy_file(args: argparse.Namespace, settings: Settings) -> str | None:
    path = args.file or settings.policy
    if path is None:
        print("spendstream policy: give a FILE or set SPENDSTREAM_POLICY", file=sys.stderr)
    return None if path is None else str(path)


def _load(path: str):  # type: ignore[no-untyped-def]
    from spendstream.core.policy import PolicyError, load_policy

    try:
        return load_policy(path)
    except PolicyError as exc:
        print(f"invalid policy:\n{exc}", file=sys.stderr)
        return None


def run_policy_validate(args: argparse.Namespace, settings: Settings) -> int:
    path = _policy_file(args, settings)
    policy = _load(path) if path else None
    if policy is None:
        return 2
    print(f"ok: policy {policy.name} version {policy.version} ({len(policy.budgets)} budgets)")
    return 0


def run_policy_apply(args: argparse.Namespace, settings: Settings) -> int:
    from confluent_kafka import Producer

    from spendstream.core.codec import AvroCodec
    from spendstream.core.events import PolicyRecord
    from spendstream.core.topics import POLICY

    path = _policy_file(args, settings)
    policy = _load(path) if path else None
    if policy is None:
        return 2
    record = PolicyRecord(name=policy.name, version=policy.version, document=policy.to_json(), published_by=_who())
    producer = Producer(settings.kafka_client_config())
    errors: list[str] = []
    producer.produce(
        POLICY,
        AvroCodec("policy", settings.schema_registry_url).encode(record.to_avro()),
        key=policy.name.encode(),
        on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
    )
    if producer.flush(15) or errors:
        print(f"spendstream policy apply: not published: {errors or 'broker did not confirm'}", file=sys.stderr)
        return 1
    print(f"published policy {policy.name} version {policy.version} to {POLICY}")
    return 0


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def run_policy_show(args: argparse.Namespace, settings: Settings) -> int:
    if args.file or settings.policy:
        policy = _load(str(args.file or settings.policy))
        if policy is None:
            return 2
        print(policy.summary())
        return 0
    from spendstream.core.policy import PolicyError, policy_from_json

    record = _newest_policy_record(settings)
    if record is None:
        print("no policy published on spendstream.policy yet", file=sys.stderr)
        return 1
    try:
        policy = policy_from_json(record.document)
    except PolicyError as exc:
        print(f"the newest published policy is invalid:\n{exc}", file=sys.stderr)
        return 1
    print(f"published {record.published_at.isoformat()} by {record.published_by or '?'}")
    print(policy.summary())
    return 0


def _newest_policy_record(settings: Settings):  # type: ignore[no-untyped-def]
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from spendstream.core.codec import AvroCodec, DecodeError
    from spendstream.core.events import PolicyRecord
    from spendstream.core.topics import POLICY

    codec = AvroCodec("policy", settings.schema_registry_url)
    consumer = Consumer({**settings.kafka_client_config(), "group.id": "spendstream-policy-show"})
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(POLICY, 0), timeout=10)
        if high <= 0:
            return None
        consumer.assign([TopicPartition(POLICY, 0, OFFSET_BEGINNING)])
        newest = None
        offset = -1
        while offset + 1 < high:
            message = consumer.poll(5)
            if message is None:
                break
            if message.error():
                continue
            offset = message.offset()
            try:
                newest = PolicyRecord.from_avro(codec.decode(message.value()))
            except (DecodeError, ValueError):
                continue
        return newest
    finally:
        consumer.close()


def _given(flag: int | None, setting: int) -> int:
    return setting if flag is None else flag


def run_processor(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.processor.app import DEFAULT_APP_ID

    app_id = args.app_id or DEFAULT_APP_ID
    if args.dump_totals:
        from spendstream.processor.app import read_window_totals

        for (scope, period, start), (nanos, requests, tokens) in sorted(
            read_window_totals(settings.kafka_client_config(), app_id).items()
        ):
            print(f"{scope}\t{period}\t{start}\t{nanos}\t{requests}\t{tokens}")
        return 0
    from faust import Worker

    from spendstream.core.metrics import ConsumerLagSampler, serve_metrics
    from spendstream.core.policy import parse_policy
    from spendstream.core.topics import USAGE
    from spendstream.processor.app import PolicyFollower, ProcessorConfig, build_app, usage_group
    from spendstream.processor.internal_topics import ensure_internal_topics
    from spendstream.processor.ledger_rebuild import spend_source

    if settings.policy is not None:
        policy = _load(str(settings.policy))
        if policy is None:
            return 2
    else:
        policy = parse_policy(f"timezone: {settings.timezone}\n", "<defaults>")
    datadir = settings.data_dir / "processor" / app_id
    datadir.mkdir(parents=True, exist_ok=True)
    config = ProcessorConfig(
        bootstrap=settings.kafka_bootstrap,
        partitions=settings.usage_partitions,
        datadir=datadir,
        policy=policy,
        app_id=app_id,
        allowed_lateness=timedelta(seconds=_given(args.allowed_lateness_s, settings.processor_allowed_lateness_s)),
        max_future_skew=timedelta(seconds=settings.max_future_skew_s),
        batch_size=_given(args.batch_size, settings.processor_batch_size),
        batch_within_s=_given(args.batch_ms, settings.processor_batch_ms) / 1000,
        dedup_horizon=timedelta(seconds=settings.processor_dedup_horizon_s),
        kafka_conf=settings.kafka_client_config(),
        spend_source=spend_source(
            settings.ledger_dsn, settings.clickhouse_database, f"http://{settings.api_host}:{settings.api_port}"
        ),
        sink_group=settings.sink_group,
    )
    try:
        ensure_internal_topics(settings.kafka_client_config(), app_id, settings.usage_partitions)
    except (RuntimeError, TimeoutError) as exc:
        print(f"spendstream processor: {exc}", file=sys.stderr)
        return 1
    app, holder = build_app(config)
    # The tables hold many small lists and each batch allocates a few per event; with the default thresholds the
    # cyclic collector ran so often (and rescanned the tables) that one worker moved ~26k events/s instead of ~35k.
    gc.set_threshold(100_000, 50, 100)
    follower = PolicyFollower(holder, settings.kafka_client_config(), settings.usage_partitions)
    follower.start()
    lag = None
    if serve_metrics(settings) is not None:  # stage 1 commits its usage progress to usage_group(app_id)
        lag = ConsumerLagSampler(settings, usage_group(app_id), USAGE, settings.metrics_lag_interval_s).start()
    print(f"processor {app_id}: policy {policy.name} version {policy.version}", flush=True)
    worker = Worker(app, loglevel="DEBUG" if args.verbose else "INFO", quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        if lag is not None:
            lag.stop()
        follower.stopping.set()
    return 0

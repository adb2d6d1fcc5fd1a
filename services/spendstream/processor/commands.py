"""``spendstream processor`` and ``spendstream policy validate|apply|show``."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from spendstream.core.arg_types import seconds, setting_number
from spendstream.core.config import Settings

if TYPE_CHECKING:
    from spendstream.core.policy import Policy
    from spendstream.core.record_signature import RecordSigner

POLICY_WAIT_MAX_S = 3600  # `policy apply --wait`: an hour is long past any processor's next heartbeat


def register(subparsers: argparse._SubParsersAction) -> None:
    proc = subparsers.add_parser("processor", help="run a spend-window processor worker (faust)")
    proc.add_argument(
        "--app-id",
        default=None,
        help="consumer group and table namespace (default spendstream-processor); one app id per set of topics",
    )
    proc.add_argument(
        "--allowed-lateness-s",
        type=setting_number("processor_allowed_lateness_s"),
        default=None,
        help="events that arrive later than this after occurred_at go to the DLQ "
        "(default SPENDSTREAM_PROCESSOR_ALLOWED_LATENESS_S, one day)",
    )
    proc.add_argument(
        "--batch-size",
        type=setting_number("processor_batch_size"),
        default=None,
        help="most events per partition in a batch (default SPENDSTREAM_PROCESSOR_BATCH_SIZE)",
    )
    proc.add_argument(
        "--batch-ms",
        type=setting_number("processor_batch_ms"),
        default=None,
        help="longest wait to fill a batch (default SPENDSTREAM_PROCESSOR_BATCH_MS): bigger batches mean fewer "
        "table writes per event, more latency",
    )
    proc.add_argument("--dump-totals", action="store_true", help="print every window total from the changelog and exit")
    proc.set_defaults(handler=run_processor)

    keygen = subparsers.add_parser(
        "keygen",
        help="write the key pair that signs decisions and policies (signing-key.pem, verify-key.pem)",
        description="Write a new Ed25519 key pair to DIR: signing-key.pem (readable by its owner only) for the "
        "processor, the ledger sink and whoever applies policies (SPENDSTREAM_SIGNING_KEY), verify-key.pem for every "
        "gateway, instrumented service and processor (SPENDSTREAM_VERIFY_KEY): they then apply only decisions and "
        "policies signed with it. `spendstream dev` makes one in its data directory.",
    )
    keygen.add_argument("directory", type=Path, help="where to write the two files")
    keygen.add_argument(
        "--public-dir",
        type=Path,
        default=None,
        help="write verify-key.pem here instead (a volume every service mounts)",
    )
    replace = keygen.add_mutually_exclusive_group()
    replace.add_argument("--force", action="store_true", help="replace a key pair already there")
    replace.add_argument("--keep", action="store_true", help="leave a key pair already there and exit 0 (provisioning)")
    keygen.set_defaults(handler=run_keygen)

    policy = subparsers.add_parser("policy", help="validate, publish or show the spend policy")
    actions = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    validate = actions.add_parser("validate", help="check a policy file; errors name the line and field")
    validate.add_argument("file", nargs="?", help="policy YAML (default SPENDSTREAM_POLICY)")
    validate.set_defaults(handler=run_policy_validate)
    apply = actions.add_parser(
        "apply",
        help="validate and publish a policy as the policy in force, then wait for the processors to confirm it",
        description="Publish FILE to spendstream.policy: the newest valid record there is the policy in force, "
        "whatever its name. Then wait up to --wait seconds until every processor worker heard from reports the "
        "new version in its heartbeat. Exit 0 when confirmed, 3 when published but not confirmed (no processor "
        "running, or one still on another version), 2 for an invalid file, 1 when the broker refused it.",
    )
    apply.add_argument("file", nargs="?", help="policy YAML (default SPENDSTREAM_POLICY)")
    apply.add_argument(
        "--wait",
        type=seconds(0, POLICY_WAIT_MAX_S),
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for processors to confirm the new version (default 10, at most 3600; 0: publish only)",
    )
    apply.set_defaults(handler=run_policy_apply)
    show = actions.add_parser("show", help="the policy in force (the newest valid record on the topic), or a file")
    show.add_argument("file", nargs="?", help="policy YAML to summarise instead of the policy in force")
    show.set_defaults(handler=run_policy_show)


def _policy_file(args: argparse.Namespace, settings: Settings) -> str | None:
    path = args.file or settings.policy
    if path is None:
        print("spendstream policy: give a FILE or set SPENDSTREAM_POLICY", file=sys.stderr)
    return None if path is None else str(path)


def _load(path: str):  # type: ignore[no-untyped-def]
    from spendstream.core.policy import PolicyError, load_policy

    try:
        policy = load_policy(path)
    except PolicyError as exc:
        print(f"invalid policy:\n{exc}", file=sys.stderr)
        return None
    for warning in [*policy.scope_warnings(), *policy.fallback_price_warnings()]:
        print(f"warning: {path}: {warning}", file=sys.stderr)
    return policy


def _warn_of_timezones(policy: Policy, settings: Settings) -> None:
    warning = policy.timezone_warning(settings.timezone_set)
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr)


def run_policy_validate(args: argparse.Namespace, settings: Settings) -> int:
    path = _policy_file(args, settings)
    policy = _load(path) if path else None
    if policy is None:
        return 2
    _warn_of_timezones(policy, settings)
    print(f"ok: policy {policy.name} version {policy.version} ({len(policy.budgets)} budgets)")
    return 0


def run_keygen(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.core.record_signature import SIGNING_KEY_FILE, VERIFY_KEY_FILE, write_key_pair

    public_dir = args.public_dir or args.directory
    existing = [path for path in (args.directory / SIGNING_KEY_FILE, public_dir / VERIFY_KEY_FILE) if path.exists()]
    if len(existing) == 2 and args.keep:
        print(f"signing key {existing[0]} kept (and {existing[1]})")
        return 0
    if existing and not args.force:
        print(
            f"spendstream keygen: {existing[0]} exists; a new pair would make every edge that holds the old "
            "verify key ignore the new decisions: pass --force to replace it",
            file=sys.stderr,
        )
        return 2
    signing, verify = write_key_pair(args.directory, public_dir)
    print(f"signing key {signing} (keep it secret: SPENDSTREAM_SIGNING_KEY of the processor, sink and policy admins)")
    print(f"verify key  {verify} (SPENDSTREAM_VERIFY_KEY of every gateway, instrumented service and processor)")
    return 0


def _policy_signer(settings: Settings) -> RecordSigner | None:
    """The key that signs an applied policy; without one, a warning: services that verify will not adopt it."""
    signer = settings.record_signer()
    if signer is None:
        print(
            "spendstream policy apply: warning: no signing key (SPENDSTREAM_SIGNING_KEY, or DATA_DIR/signing-key.pem):"
            " the policy goes out unsigned, and services that verify policies (SPENDSTREAM_VERIFY_KEY) will keep the "
            "one in force",
            file=sys.stderr,
        )
    return signer


def run_policy_apply(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.core.policy_log import publish_policy, wait_for_confirmations
    from spendstream.core.topics import POLICY

    path = _policy_file(args, settings)
    policy = _load(path) if path else None
    if policy is None:
        return 2
    _warn_of_timezones(policy, settings)
    conf = settings.kafka_client_config()
    try:
        publish_policy(conf, policy, settings.schema_registry_url, _policy_signer(settings))
    except RuntimeError as exc:
        print(f"spendstream policy apply: {exc}", file=sys.stderr)
        return 1
    print(f"published policy {policy.name} version {policy.version} to {POLICY}", flush=True)
    if args.wait <= 0:
        return 0
    outcome = wait_for_confirmations(conf, policy.version, args.wait)
    for worker in outcome.confirmed:
        print(f"in force: processor {worker} confirmed version {policy.version}")
    for worker, version in outcome.pending.items():
        print(f"not in force: processor {worker} still reports version {version or '?'}", file=sys.stderr)
    if outcome.confirmed and not outcome.pending:
        return 0
    if not outcome.confirmed and not outcome.pending:
        print(
            f"no processor confirmed version {policy.version} within {args.wait:g}s (none is running?); "
            "it is published and comes into force when a processor starts",
            file=sys.stderr,
        )
    return 3


def run_policy_show(args: argparse.Namespace, settings: Settings) -> int:
    if args.file:
        policy = _load(str(args.file))
        if policy is None:
            return 2
        print(policy.summary())
        return 0
    from confluent_kafka import KafkaException

    from spendstream.core.policy_log import read_policy_log, wait_for_confirmations

    conf = settings.kafka_client_config()
    verifier = settings.record_verifier()
    try:
        found = read_policy_log(conf, settings.schema_registry_url, verifier=verifier)
    except (KafkaException, RuntimeError) as exc:
        print(f"spendstream policy show: cannot read spendstream.policy: {exc}", file=sys.stderr)
        return 1
    if verifier is None:
        print(
            "signatures not checked (no SPENDSTREAM_VERIFY_KEY, nor DATA_DIR/verify-key.pem): services that verify "
            "may have refused the record shown; the processors' versions below say what they enforce",
            file=sys.stderr,
        )
    for problem in found.rejected:
        print(f"rejected (not in force): {problem}", file=sys.stderr)
    if found.in_force is None:
        print("no valid policy published on spendstream.policy yet", file=sys.stderr)
        return 1
    record, policy = found.in_force.record, found.in_force.policy
    print(f"in force: published {record.published_at.isoformat()} by {record.published_by or '?'}")
    print(policy.summary())
    heard = wait_for_confirmations(conf, policy.version, 2.0)
    for worker in heard.confirmed:
        print(f"processor {worker}: version {policy.version}")
    for worker, version in heard.pending.items():
        print(f"processor {worker}: version {version or '?'} (not the policy in force yet)")
    if not heard.confirmed and not heard.pending:
        print("no processor heartbeat in the last 2s")
    return 0


def _given(flag: int | None, setting: int) -> int:
    return setting if flag is None else flag


def run_processor(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.processor.internal_topics import DEFAULT_APP_ID

    app_id = args.app_id or DEFAULT_APP_ID
    if args.dump_totals:
        from spendstream.processor.recovery import read_window_totals

        for (scope, period, start), (nanos, requests, tokens) in sorted(
            read_window_totals(settings.kafka_client_config(), app_id).items()
        ):
            print(f"{scope}\t{period}\t{start}\t{nanos}\t{requests}\t{tokens}")
        return 0
    from confluent_kafka import KafkaException
    from faust import Worker

    from spendstream.core.metrics import ConsumerLagSampler, serve_metrics
    from spendstream.core.policy import parse_policy
    from spendstream.core.policy_log import seed_policy
    from spendstream.core.topics import POLICY, USAGE
    from spendstream.processor.app import ProcessorConfig, build_app
    from spendstream.processor.budget_adjustments import BudgetAdjustmentFollower
    from spendstream.processor.internal_seal import InternalSeal, usage_epoch
    from spendstream.processor.internal_topics import ensure_internal_topics
    from spendstream.processor.ledger_rebuild import spend_source
    from spendstream.processor.policy_in_force import PolicyFollower
    from spendstream.processor.usage_reader import usage_group

    seed = None
    if settings.policy is not None:  # only seeds an empty policy topic
        seed = _load(str(settings.policy))
        if seed is None:
            return 2
    defaults = parse_policy(f"timezone: {settings.timezone}\n", "<defaults>")
    try:
        conf = settings.kafka_client_config()
        policy, policy_offset, read_in_force = seed_policy(
            conf, seed, defaults, settings.schema_registry_url, settings.record_signer(), settings.record_verifier()
        )
    except (KafkaException, RuntimeError) as exc:
        print(f"spendstream processor: cannot read or seed the policy in force on {POLICY}: {exc}", file=sys.stderr)
        return 1
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
        dedup_memory_ids=settings.processor_dedup_memory_ids,
        kafka_conf=settings.kafka_client_config(),
        spend_source=spend_source(settings.ledger_dsn, settings.clickhouse_database, settings.api_address_path),
        sink_group=settings.sink_group,
        signer=settings.record_signer(),
    )
    try:
        ensure_internal_topics(settings.kafka_client_config(), app_id, settings.usage_partitions)
        if config.signer is not None:
            epoch = usage_epoch(settings.kafka_client_config())
            config = dataclasses.replace(config, seal=InternalSeal(config.signer, epoch))
    except (RuntimeError, TimeoutError) as exc:
        print(f"spendstream processor: {exc}", file=sys.stderr)
        return 1
    app, holder = build_app(config)
    # The tables hold many small lists and each batch allocates a few per event; with the default thresholds the
    # cyclic collector ran so often (and rescanned the tables) that one worker moved ~26k events/s instead of ~35k.
    gc.set_threshold(100_000, 50, 100)
    follower = PolicyFollower(
        holder,
        settings.kafka_client_config(),
        settings.usage_partitions,
        policy_offset,
        settings.record_verifier(),
        read_in_force,
        settings.record_signer(),
        config.seal,
        restart_on_new_timezone=config.spend_source is not None,
    )
    follower.start()
    adjustments = BudgetAdjustmentFollower(
        holder,
        settings.kafka_client_config(),
        settings.usage_partitions,
        settings.record_signer(),
        settings.record_verifier(),
        config.seal,
    )
    adjustments.start()
    guard = None
    if (verifier := settings.record_verifier()) is not None:  # without keys anyone may write any decision anyway
        from spendstream.processor.decision_guard import DecisionGuard

        guard = DecisionGuard(settings.kafka_client_config(), verifier)
        guard.start()
    lag = None
    if serve_metrics(settings) is not None:  # stage 1 commits its usage progress to usage_group(app_id)
        lag = ConsumerLagSampler(settings, usage_group(app_id), USAGE, settings.metrics_lag_interval_s).start()
    print(f"processor {app_id}: policy {policy.name} version {policy.version} in force", flush=True)
    if config.signer is None:
        print(
            f"processor {app_id}: warning: no signing key (SPENDSTREAM_SIGNING_KEY, or "
            "DATA_DIR/signing-key.pem): its decisions and alerts go out unsigned, and services that verify them ignore "
            "them; "
            "`spendstream keygen DIR` writes a key pair",
            file=sys.stderr,
            flush=True,
        )
    _warn_of_timezones(policy, settings)
    if seed is not None and seed.version != policy.version:
        print(
            f"processor {app_id}: SPENDSTREAM_POLICY {settings.policy} (version {seed.version}) only seeds an empty "
            f"{POLICY}; `spendstream policy apply` it to put it in force",
            flush=True,
        )
    worker = Worker(app, loglevel="DEBUG" if args.verbose else "INFO", quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        if lag is not None:
            lag.stop()
        follower.stopping.set()
        adjustments.stopping.set()
        if guard is not None:
            guard.stopping.set()
    return 0

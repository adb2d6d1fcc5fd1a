"""One process that owns the ledger: usage sink, audit sink and, when asked, the API and the notifier beside them.

An embedded chDB ledger can be opened by one process only, so the embedded runtime runs every
ledger reader and writer here on one shared client (chDB serves concurrent calls from threads).
With a ClickHouse server the same services can run as separate processes instead.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable

from spendstream.core.config import Settings
from spendstream.core.placement import Placement
from spendstream.core.policy import Policy
from spendstream.core.pricing import EMPTY_TABLE

log = logging.getLogger(__name__)
EXIT_WORKER_FAILED = 70  # EX_SOFTWARE: a thread beside the sink failed; the process is to be restarted


def run_ledger_process(
    settings: Settings, *, with_audit: bool = True, with_api: bool = False, with_notifier: bool = False
) -> int:
    """The usage sink in the main thread (it owns signal handling and the exit code), the rest in threads: the
    ledger's budgets from the policy in force, the sealing of report rollups, the audit sink, the API, the notifier.

    With ``metrics_port`` set, ``/metrics`` is served there; with it or the API, the sink group's lag is sampled.
    """
    from spendstream.analytics.rollup import seal_periodically
    from spendstream.core.ledger_store import connect, migrate
    from spendstream.core.metrics import ConsumerLagSampler, serve_metrics
    from spendstream.core.topics import USAGE
    from spendstream.sink.audit_sink import AuditSink
    from spendstream.sink.ledger_sink import LedgerSink
    from spendstream.sink.metrics import SINKS
    from spendstream.sink.policy_budgets import PolicyBudgets

    client = connect(settings)
    migrate(client, settings)
    if with_audit:
        _restore_budget_requests(settings, client)
    policy = policy_in_force_or_seed(settings)
    sink = LedgerSink(
        settings,
        client,
        prices=policy.price_table if policy is not None else EMPTY_TABLE,
        placement=Placement.of(policy),
    )
    SINKS.track(sink)
    lag: ConsumerLagSampler | None = None
    if serve_metrics(settings) is not None or with_api:  # the API's /metrics shows this process's registry
        lag = ConsumerLagSampler(settings, settings.sink_group, USAGE, settings.metrics_lag_interval_s).start()
    stop = threading.Event()

    def shutdown(*_: object) -> None:
        stop.set()
        sink.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, shutdown)
    budgets = PolicyBudgets(settings, client, on_policy=sink.set_policy)
    failed: list[str] = []

    def worker(name: str, target: Callable[..., object], *args: object) -> threading.Thread:
        """A thread beside the sink whose death ends the process (exit code 70) rather than leaving it running
        without, say, the audit tables being written: whatever runs it (``dev``, systemd, Kubernetes) restarts it."""

        def run() -> None:
            try:
                target(*args)
            except BaseException:
                log.exception("%s stopped on an error; stopping this process so that it is restarted whole", name)
                failed.append(name)
                shutdown()

        return threading.Thread(target=run, name=name)

    workers = [
        worker("policy-budgets", budgets.run, stop),
        worker("report-seals", seal_periodically, client, settings.clickhouse_database, stop),
    ]
    if with_audit:
        workers.append(worker("audit-sink", AuditSink(settings, client).run, stop))
    if with_api:
        workers.append(worker("api", _serve_api, settings, client, stop))
    if with_notifier:
        from spendstream.notifier.service import Notifier

        workers.append(worker("notifier", Notifier(settings, client).run, stop))
    for thread in workers:
        thread.start()
    try:
        code = sink.run()
        return EXIT_WORKER_FAILED if failed else code
    finally:
        stop.set()
        for thread in workers:
            thread.join(timeout=30)
        if lag is not None:
            lag.stop()
        client.close()


def _restore_budget_requests(settings: Settings, client: object) -> None:
    """An empty budget-requests topic after a broker restart gets the ledger's requests back, and an empty
    enforcement topic the decisions still in force (``audit_sink``)."""
    from confluent_kafka import KafkaException

    from spendstream.sink.audit_sink import restore_budget_requests, restore_decisions

    for what, restore in (("budget requests", restore_budget_requests), ("decisions in force", restore_decisions)):
        try:
            restored = restore(settings, client)
        except (KafkaException, RuntimeError) as exc:  # no broker yet: they come back at the next start
            logging.getLogger(__name__).warning("%s not restored from the ledger: %s", what, exc)
            continue
        if restored:
            print(f"restored {restored} {what} from the ledger to an empty broker", flush=True)


def policy_in_force_or_seed(settings: Settings) -> Policy | None:
    """The policy in force (what the processor prices and places events with); before any policy is published,
    the ``SPENDSTREAM_POLICY`` file that will seed it; else none."""
    from confluent_kafka import KafkaException

    from spendstream.core.policy import load_policy
    from spendstream.core.policy_log import read_policy_log

    try:
        found = read_policy_log(
            settings.kafka_client_config(), settings.schema_registry_url, verifier=settings.record_verifier()
        )
    except (KafkaException, RuntimeError):  # no broker yet: the policy thread sets the prices once it can
        found = None
    if found is not None and found.in_force is not None:
        return found.in_force.policy
    if settings.policy is None:
        return None
    return load_policy(settings.policy)


def _serve_api(settings: Settings, client: object, stop: threading.Event) -> None:
    """Run the API's aiohttp app on this thread's own event loop until ``stop`` is set."""
    from aiohttp import web

    from spendstream.api.app import create_app, server_options

    async def serve() -> None:
        runner = web.AppRunner(create_app(settings, ledger_client=client), access_log=None, **server_options(settings))
        await runner.setup()
        await web.TCPSite(runner, settings.api_host, settings.api_port).start()
        print(f"api and dashboard on http://{settings.api_host}:{settings.api_port}/", flush=True)
        try:
            while not stop.is_set():
                await asyncio.sleep(0.2)
        finally:
            await runner.cleanup()

    asyncio.run(serve())

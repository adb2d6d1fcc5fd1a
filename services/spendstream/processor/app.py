"""The processor worker: faust for coordination, a plain consumer for the hot loop, wired around its collaborators.

faust keeps what it does well (consumer-group membership and partition assignment, rebalancing, tables restored
from their changelogs, standbys) and does not read the usage topic at all (``usage_reader`` says why). The
parts, each in its own module and testable without a broker:

* ``stage_one.StageOne``: per batch of a source partition of ``spendstream.usage``, decode, validate, price,
  fold into per-(window, source partition) partials counting each event_id once (``SourcePartition``: applied
  offsets, applied ids within the dedup horizon, the retention watermark), and announce every touched
  partial's TOTAL to the internal topic ``spendstream.processor.partials`` (``internal_topics.PartialsMessage``).
  ``usage_reader.UsageReader`` runs it in a thread on the partitions whose ``partials`` faust assigned here.
* ``stage_two.StageTwo`` (a faust agent on the internal topic, one actor for all its partitions): merge totals into the
  ``windows`` table, evaluate each touched scope (``ScopeState``), publish Decisions to
  ``spendstream.enforcement`` when a scope's action changes and Alerts to ``spendstream.alerts`` once per
  crossing.
* ``checkpoint``: every record a batch writes (table changelogs, the internal topic, decisions, alerts, DLQ)
  goes through a confluent-kafka producer (faust's costs ~45 us per message, profiled), one per stage, and
  ``Checkpoint`` flushes it BEFORE the batch's source offsets are committed (stage 1) or acked to faust
  (stage 2). Table writes name their changelog partition explicitly (the stage's partition).
* ``recovery``: completes faust's table restore past the high watermark the embedded broker reports, seals
  this worker's changelog partitions, and rebuilds partitions without state from the ledger.
* ``policy_in_force``: the policy both stages read, followed on ``spendstream.policy`` by every worker.
* Retention: closed windows are deleted with tombstones once nothing reads them any more and no allowed late
  event can land in them (``spend_accounting.window_expiry``), judged by a watermark of Kafka timestamps: stage
  1 prunes its partials per source partition, stage 2 its windows per internal partition.
* Heartbeat: every ``heartbeat_interval_s`` each worker publishes ``heartbeat:<worker>`` on the enforcement
  topic with the policy version in force (``processor.heartbeat``), from the event loop stage 2 runs on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import faust
from faust.types import TP

from spendstream.core.metrics import PROCESSOR_BATCH_SECONDS, PROCESSOR_CONSUMED
from spendstream.core.policy import Policy
from spendstream.core.record_signature import RecordSigner
from spendstream.processor.applied_ids import SPILL_AT, Spill
from spendstream.processor.budget_gauges import BUDGET_GAUGES
from spendstream.processor.checkpoint import BatchOutput, Changelog, Checkpoint
from spendstream.processor.heartbeat import HeartbeatPublisher
from spendstream.processor.internal_seal import InternalSeal, UnsealedLog
from spendstream.processor.internal_topics import DEFAULT_APP_ID, PARTIALS_TOPIC, internal_message, stage2_partition
from spendstream.processor.ledger_rebuild import SpendSource
from spendstream.processor.policy_in_force import PolicyHolder
from spendstream.processor.recovery import HorizonAdoption, OwnChangelogs, rebuild_from_ledger
from spendstream.processor.stage_one import StageOne
from spendstream.processor.stage_two import StageTwo
from spendstream.processor.usage_reader import FETCH_MAX_WAIT_MS, UsageReader, usage_group

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessorConfig:
    bootstrap: str
    partitions: int
    datadir: Path
    policy: Policy
    app_id: str = DEFAULT_APP_ID
    allowed_lateness: timedelta = timedelta(days=1)
    max_future_skew: timedelta = timedelta(minutes=5)
    batch_size: int = 5000  # per partition; see Settings.processor_batch_size
    batch_within_s: float = 0.05
    dedup_horizon: timedelta = timedelta(minutes=15)  # arrival time within which a re-sent event_id is skipped
    dedup_memory_ids: int = SPILL_AT  # ids of a partition's horizon in memory before they move to disk
    heartbeat_interval_s: float = 1.0
    kafka_conf: dict[str, Any] | None = None  # librdkafka settings (security included) for direct clients
    spend_source: SpendSource | None = None  # the ledger, to rebuild lost window state from (``ledger_rebuild``)
    sink_group: str = "spendstream-sink"  # the ledger sink's consumer group: how far the ledger holds the topic
    signer: RecordSigner | None = None  # signs decisions and heartbeats (``core.record_signature``)
    seal: InternalSeal | None = None  # seals what stage 2 reads, for this usage topic (``internal_seal``)


def _prompt_fetches() -> None:
    """Make faust's consumer fetch with a 50 ms long-poll instead of its hard-coded 1.5 s.

    Measured here: the embedded broker holds a fetch that found no data for the whole wait even when data
    arrives meanwhile, so every hop (usage -> stage 1, internal -> stage 2) added up to 1.5 s of latency
    and the emit -> decision p50 was 2.4 s. faust has no setting for it, so the worker process swaps in a
    consumer class that overrides the value (process-wide, idempotent).
    """
    import aiokafka

    if getattr(aiokafka.AIOKafkaConsumer, "_spendstream_prompt", False):
        return
    base = aiokafka.AIOKafkaConsumer

    class PromptConsumer(base):  # type: ignore[misc, valid-type]
        _spendstream_prompt = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["fetch_max_wait_ms"] = FETCH_MAX_WAIT_MS
            super().__init__(*args, **kwargs)

    aiokafka.AIOKafkaConsumer = PromptConsumer  # type: ignore[misc]


def faust_credentials(kafka_conf: dict[str, Any]) -> faust.types.auth.CredentialsT | None:
    """The librdkafka security settings as faust (aiokafka) credentials, so both kinds of client connect alike."""
    protocol = str(kafka_conf.get("security.protocol", "PLAINTEXT")).upper()
    if protocol == "PLAINTEXT":
        return None
    context = ssl.create_default_context(cafile=kafka_conf.get("ssl.ca.location")) if "SSL" in protocol else None
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=kafka_conf.get("sasl.username"),
            password=kafka_conf.get("sasl.password"),
            ssl_context=context,
            mechanism=kafka_conf.get("sasl.mechanism") or "PLAIN",
        )
    return faust.SSLCredentials(context)


def _changelog(table: faust.Table, out: BatchOutput) -> Changelog:
    """A faust memory table as a ``Changelog`` written through ``out``, on the store's plain dict (faust keeps that
    one dict for the table's life and restores into it): its get and set run in C, where the store's mapping
    wrapper adds Python calls to each (profiled in stage 2). The key snapshot lists it in
    C under the GIL, so the stage-1 thread can take it while the event loop applies standby records."""
    store = table.data.data
    return Changelog(store, table.changelog_topic.get_topic_name(), out, keys=lambda: list(store))


def horizon_directory(datadir: Path) -> Path:
    """Where the dedup horizons' runs on disk go: unlinked files, so nothing is left after the worker stops."""
    directory = datadir / "horizon"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def build_app(config: ProcessorConfig) -> tuple[faust.App, PolicyHolder]:
    _prompt_fetches()
    holder = PolicyHolder(config.policy, config.allowed_lateness)
    n = config.partitions
    kafka_conf = config.kafka_conf or {"bootstrap.servers": config.bootstrap}
    app = faust.App(
        config.app_id,
        broker=f"kafka://{config.bootstrap}",
        broker_credentials=faust_credentials(kafka_conf),
        store="memory://",
        datadir=str(config.datadir),
        web_enabled=False,
        topic_partitions=n,
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=5000,
        stream_buffer_maxsize=20_000,
        # the embedded broker completes a group join after about half the session timeout
        broker_session_timeout=6.0,
        broker_rebalance_timeout=6.0,
        broker_heartbeat_interval=1.0,
        producer_linger=0.005,
        # no standby copies of the tables: faust's in-memory store drops a standby's data when each recovery ends
        # and restores a partition that moves here from its changelog's start anyway, so a standby only cost
        # memory (the whole ids records of another worker's horizon)
        table_standby_replicas=0,
        # the check compares the offset this process already read a changelog to with the broker's high
        # watermark, which the embedded broker reports one record batch short: after a rebalance that gave a
        # worker back partitions it had written, faust crashed the worker on a false "data removed" (tables are
        # in memory, so nothing persisted can be ahead; ``OwnChangelogs`` reads each changelog to its true end)
        recovery_consistency_check=False,
    )
    internal = app.topic(PARTIALS_TOPIC, key_serializer="raw", value_serializer="json", partitions=n, internal=True)
    out1 = BatchOutput(kafka_conf)  # stage 1 (its own thread)
    out2 = BatchOutput(kafka_conf)  # stage 2
    table_kw: dict[str, Any] = {"partitions": n}  # keys and values are JSON (faust's table default)
    # "scope|period|start#partition" -> [total, requests, tokens, offset]; small restore batches, because faust holds
    # a batch's records whole until it applies them (an ids record is ~0.7 MB)
    partials = app.Table("partials", recovery_buffer_size=16, **table_kw)
    windows = app.Table("windows", **table_kw)  # "scope|period|start" -> {partition: [total, requests, tokens, offset]}
    scope_states = app.Table("scopes", **table_kw)  # scope -> ``stage_two.ScopeState`` as JSON
    spill = Spill(horizon_directory(config.datadir), at=config.dedup_memory_ids)
    seal = config.seal
    stage1 = StageOne(
        holder,
        _changelog(partials, out1),
        out1,
        n,
        allowed_lateness=config.allowed_lateness,
        max_future_skew=config.max_future_skew,
        dedup_horizon=config.dedup_horizon,
        spill=spill,
        seal=seal,
    )
    holder.on_swap.append(stage1.announce_newly_watched)
    stage2 = StageTwo(holder, _changelog(windows, out2), _changelog(scope_states, out2), out2, n, config.signer)

    def owned_partitions(topic: str) -> list[int]:
        """The partitions of ``topic`` assigned to this worker as active (not standby)."""
        return sorted(tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic)

    def active_partitions(table: faust.Table) -> list[int]:
        return owned_partitions(table.changelog_topic.get_topic_name())

    own = OwnChangelogs(kafka_conf, active_partitions)
    adoption = HorizonAdoption(stage1.horizon_ms, spill)
    own.guard(partials, adoption.take)
    for table in (windows, scope_states):
        own.guard(table)
    for stage2_table in (windows, scope_states):
        stage2_table.on_recover(functools.partial(own.complete_restore, stage2_table))

    @windows.on_recover
    async def forget_stage2_clocks() -> None:
        stage2.forget_clocks()

    reader = UsageReader(
        kafka_conf, usage_group(config.app_id), config.batch_size, config.batch_within_s, stage1.process, out1
    )

    restored = asyncio.Event()  # set once this worker's windows are restored (rebuilt from the ledger if lost)

    @partials.on_recover
    async def start_stage1() -> None:
        """Faust restored this worker's active partials: announce their totals to stage 2 again (whatever a stage-2
        owner missed, ``StageOne.announce_restored``), then read the matching usage partitions from here on."""
        await reader.stop()
        await own.complete_restore(partials)
        mine = active_partitions(partials)
        blank = stage1.restore(mine, adoption.horizons, rebuildable=config.spend_source is not None)
        starts: dict[int, int] = {}
        if blank and config.spend_source:
            rebuild = functools.partial(
                rebuild_from_ledger,
                stage1,
                blank,
                out1,
                kafka_conf=kafka_conf,
                spend_source=config.spend_source,
                sink_group=config.sink_group,
                usage_group=usage_group(config.app_id),
                dedup_horizon=config.dedup_horizon,
            )
            starts = await asyncio.to_thread(rebuild)
        restored_partitions = [partition for partition in mine if partition not in blank]
        if announced := await asyncio.to_thread(stage1.announce_restored, restored_partitions):
            await asyncio.to_thread(out1.flush_now)
            log.info("stage 1 announced %d restored window totals of partitions %s", announced, restored_partitions)
        if mine:
            reader.start(mine, starts)
        restored.set()

    @app.on_partitions_revoked.connect
    async def stop_stage1(_app: faust.App, _revoked: set[TP], **_: Any) -> None:
        """Stop reading before faust completes the revocation, so a partition never has two stage-1 writers."""
        await reader.stop()
        own.unseal_all()

    @app.on_partitions_assigned.connect
    async def forget_moved_gauges(_app: faust.App, assigned: set[TP], **_: Any) -> None:
        mine = {tp.partition for tp in assigned if tp.topic == internal.get_topic_name()}
        BUDGET_GAUGES.retain(lambda scope: stage2_partition(scope, n) in mine)

    @app.on_before_shutdown.connect
    async def stop_stage1_on_shutdown(_app: faust.App, **_: Any) -> None:
        await reader.stop()

    heartbeats = HeartbeatPublisher(
        kafka_conf, config.app_id, config.heartbeat_interval_s, lambda: holder.policy, config.signer
    )

    @app.timer(config.heartbeat_interval_s)
    async def heartbeat() -> None:
        """From the event loop stage 2 runs on, so a worker whose loop is stuck stops proving it is alive; the first
        once its windows are restored, so that an edge opens a hard cap only on spend this worker knows (after an
        embedded broker's restart, the decisions are republished only from the rebuilt windows)."""
        if restored.is_set():
            heartbeats.beat()

    @app.on_before_shutdown.connect
    async def stop_heartbeats(_app: faust.App, **_: Any) -> None:
        heartbeats.close()

    checkpoint2 = Checkpoint(out2)  # faust acks a batch when the agent asks for the next one
    unsealed = UnsealedLog()

    @app.agent(internal)
    async def scope_stage(stream: faust.StreamT) -> None:
        """One actor for every internal partition this worker owns, each partition's messages in order.

        Not an actor per partition (faust's ``isolated_partitions``): after a rebalance that revoked and assigned
        partitions again, the actors of the revoked ones could come back without a stream to read, and stage 2
        silently stopped evaluating their scopes (seen after kill -9 with a dead member still in the group)."""
        consumed, seconds = PROCESSOR_CONSUMED.labels("scopes"), PROCESSOR_BATCH_SECONDS.labels("scopes")
        async for events in stream.take_events(config.batch_size, within=config.batch_within_s):
            started = time.perf_counter()
            owned = set(owned_partitions(PARTIALS_TOPIC))
            by_partition: dict[int, list[Any]] = {}
            for event in events:  # messages of a partition revoked meanwhile belong to its new owner
                message = event.message
                if (partition := message.partition) not in owned:
                    continue
                if seal is not None and not seal.vouches_for(partition, message.value, message.headers):
                    unsealed.ignored_one(partition, message.offset)
                    continue
                by_partition.setdefault(partition, []).append(internal_message(event.value))
            for partition, messages in by_partition.items():
                stage2.process(partition, messages)
            await checkpoint2.commit_async()
            consumed.inc(len(events))
            seconds.observe(time.perf_counter() - started)

    return app, holder

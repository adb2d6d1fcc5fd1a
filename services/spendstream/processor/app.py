"""The processor runtime: faust for coordination, a plain consumer for the hot loop (arithmetic: ``spend_accounting``).

Measured on the build machine (``bench/bench_faust_baseline.py``): faust's stream moves ~11-12k usage events/s
through one worker, whatever the agent does, while a plain confluent-kafka consumer decodes ~100k/s. So faust
keeps what it does well (consumer-group membership and partition assignment, rebalancing, tables restored from
their changelogs, standbys) and does not read the usage topic at all.

* Stage 1 (``UsageReader``, a thread): faust assigns the ``partials`` table's changelog partitions; when it has
  restored this worker's active ones, a group-less confluent-kafka consumer reads the SAME partitions of
  ``spendstream.usage`` from the offsets committed to ``usage_group(app_id)``. Per batch of a partition:
  decode, validate, check lateness, price events that lack ``cost_nanos``, fold into per-(window, source
  partition) partials (``fold_fresh``: a few dict operations per scope and event; ``fold_batch`` event by
  event while replaying offsets a crash may already have applied), skipping copies of an event_id the partition
  applied at another offset within the dedup horizon (``AppliedIds``: edges publish at least once), write each
  changed partial once, then the batch's applied ids (records ``ids#partition#first_offset`` of the same
  changelog, pruned with tombstones as the horizon passes), and send
  every touched partial's TOTAL to the internal topic ``spendstream.processor.partials`` keyed by scope. Bad
  events go to ``spendstream.usage.dlq`` with a reason. Only after the producer confirmed all of it are the
  next offsets committed, so the committed offset never runs ahead of the changelog. When faust starts a
  rebalance, the reader finishes its batch and stops before the revocation completes: a partition never has
  two stage-1 writers (short of a worker that lost its membership without noticing).
* Stage 2 (faust agent on the internal topic, one actor per partition): merge totals into the ``windows`` table,
  then evaluate each touched scope (``decision_publisher``) and publish Decisions to ``spendstream.enforcement``
  when a scope's action changes and Alerts to ``spendstream.alerts`` once per crossing.
* Retention: closed windows are deleted with tombstones once nothing reads them any more and no allowed late
  event can land in them (``window_expiry``: hours 48 h + the lateness after their end, days the daily spike
  history + the lateness, other periods one period + the lateness), judged by a watermark of Kafka timestamps
  (``Watermark``): stage 1 prunes its partials per source partition, stage 2 its windows per internal
  partition, each at most once per watermark hour, and both skip updates of windows already expired.
* Policy: the newest valid record on ``spendstream.policy`` is in force, whatever its name (``core.policy_log``).
  Every worker follows the topic with its own group-less consumer thread (a consumer group would give the
  single partition to one worker only). A valid record replaces the policy at once; an invalid one is rejected
  with a ``policy`` alert and the last good policy stays. After a change the thread asks stage 2 to re-evaluate
  every scope (a control message to each partition), which is how a raised budget lifts a shutoff mid-period.
* Heartbeat: every ``heartbeat_interval_s`` each worker publishes ``heartbeat:<worker>`` on the enforcement
  topic with the policy version in force (``processor.heartbeat``): edges measure their staleness from it and
  ``spendstream policy apply`` waits for it to confirm a new version.

Output path: faust's producer costs ~45 us per message (profiled), so every record this app writes (table
changelogs, the internal topic, decisions, alerts, DLQ) goes through confluent-kafka producers (one per stage),
and each batch ends with a flush BEFORE its source offsets are committed (stage 1) or acked to faust (stage 2).
Table writes name their changelog partition explicitly (the stage's partition); faust still restores the tables
from those changelog topics on start and rebalance, and ``complete_restore`` reads on past the high watermark
the embedded broker reports (see ``read_to_end``), which faust's recovery would otherwise stop at.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faust
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from faust.types import TP

from spendstream.core.budget_lifecycle import BudgetRequest, adjusted_policy
from spendstream.core.codec import AvroCodec, DecodeError
from spendstream.core.events import Alert, AlertKind, PolicyRecord, Severity, usage_record_problem
from spendstream.core.metrics import (
    PROCESSOR_ALERTS,
    PROCESSOR_BATCH_SECONDS,
    PROCESSOR_CONSUMED,
    PROCESSOR_DEAD_LETTERED,
    PROCESSOR_DECISIONS,
)
from spendstream.core.policy import Policy, PolicyError, policy_from_json
from spendstream.core.pricing import CostOverflowError, UnknownModelError, price_record
from spendstream.core.topics import ALERTS, DLQ_REASON_HEADER, DLQ_SOURCE_HEADER, ENFORCEMENT, POLICY, USAGE, USAGE_DLQ
from spendstream.processor.budget_gauges import BUDGET_GAUGES
from spendstream.processor.decision_publisher import (
    build_alert,
    build_decision,
    decision_signature,
    evaluate_scope,
    needs_decision,
    next_version,
)
from spendstream.processor.heartbeat import HeartbeatPublisher
from spendstream.processor.internal_topics import PARTIALS_TOPIC
from spendstream.processor.ledger_rebuild import (
    RebuildPlan,
    SpendSource,
    fold_snapshot,
    recent_since_ms,
    scope_chunks,
    sink_positions,
)
from spendstream.processor.scopes import scopes_for
from spendstream.processor.spend_accounting import (
    IDS_PER_RECORD,
    AppliedIds,
    Retention,
    Watermark,
    WindowCalendar,
    clock_key,
    content_digest,
    fold_distinct,
    ids_key,
    is_clock_key,
    lateness_problem,
    merge_partial,
    pack_ids,
    partial_key,
    restore_clock,
    restore_stage1,
    split_partial_key,
    split_window_key,
    totals_from_partials,
    window_total,
)

log = logging.getLogger(__name__)

DEFAULT_APP_ID = "spendstream-processor"
_MAX_ALERTED = 256  # crossings remembered per scope (old windows' keys are dropped first)


@dataclass(frozen=True)
class ProcessorConfig:
    bootstrap: str
    partitions: int
    datadir: Path
    policy: Policy
    app_id: str = DEFAULT_APP_ID
    allowed_lateness: timedelta = timedelta(days=1)
    max_future_skew: timedelta = timedelta(minutes=5)
    batch_size: int = 5000
    batch_within_s: float = 0.05
    dedup_horizon: timedelta = timedelta(minutes=15)  # arrival time within which a re-sent event_id is skipped
    heartbeat_interval_s: float = 1.0
    kafka_conf: dict[str, Any] | None = None  # librdkafka settings (security included) for direct clients
    spend_source: SpendSource | None = None  # the ledger, to rebuild lost window state from (``ledger_rebuild``)
    sink_group: str = "spendstream-sink"  # the ledger sink's consumer group: how far the ledger holds the topic


def history_days(policy: Policy) -> int:
    """Local days of history the policy's daily spike rules read before the current day."""
    return max((rule.window_days for rule in policy.spike_rules if rule.kind == "daily"), default=0)


class PolicyHolder:
    """The policy in force, swapped atomically by the policy thread and read by both stages, with the window
    calendar and retention that follow from it (timezone, daily spike history).

    ``policy`` is the applied policy (``base``) with the approved budget adjustments in force now
    (``core.budget_lifecycle.adjusted_policy``, kept current by ``budget_adjustments``); it keeps its version."""

    def __init__(self, policy: Policy, allowed_lateness: timedelta) -> None:
        self.base = self.policy = policy
        self.adjustments: list[BudgetRequest] = []
        self._lock = threading.Lock()
        self.calendar = WindowCalendar(policy.tz)
        self.lateness_s = int(allowed_lateness.total_seconds())
        self.retention = Retention(policy.tz, self.lateness_s, history_days(policy))

    def adopt(self, policy: Policy) -> bool:
        with self._lock:
            if policy.version == self.base.version:
                return False
            if policy.timezone != self.base.timezone:
                self.calendar = WindowCalendar(policy.tz)
            if policy.timezone != self.base.timezone or history_days(policy) != self.retention.history_days:
                self.retention = Retention(policy.tz, self.lateness_s, history_days(policy))
            self.base = policy
            self.policy = adjusted_policy(policy, self.adjustments, _now())
            return True

    def readjust(self, adjustments: list[BudgetRequest], at: datetime) -> None:
        """Put the budget adjustments in force at ``at`` on top of the applied policy."""
        with self._lock:
            self.adjustments = adjustments
            self.policy = adjusted_policy(self.base, adjustments, at)


class BatchOutput:
    """Everything a batch produces, on one librdkafka producer; ``flush`` must succeed before the batch is acked."""

    def __init__(self, kafka_conf: dict[str, Any]) -> None:
        self.producer = Producer({**kafka_conf, "linger.ms": 2, "queue.buffering.max.messages": 2_000_000})
        self.errors: list[str] = []

    def _delivered(self, err: Any, _message: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def send(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None, headers: Any = None
    ) -> None:
        kwargs: dict[str, Any] = {"on_delivery": self._delivered}
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = headers
        while True:
            try:
                self.producer.produce(topic, value, key, **kwargs)
                return
            except BufferError:
                self.producer.poll(0.05)

    def put(self, table: faust.Table, partition: int, key: str, value: Any) -> None:
        """Set a table key and write its changelog record (faust's JSON key and value encoding)."""
        table.data[key] = value
        self.send(
            table.changelog_topic.get_topic_name(), json.dumps(key).encode(), json.dumps(value).encode(), partition
        )

    def delete(self, table: faust.Table, partition: int, key: str) -> None:
        """Remove a table key and write its tombstone (a null value: faust's restore deletes the key)."""
        table.data.pop(key, None)
        self.send(table.changelog_topic.get_topic_name(), json.dumps(key).encode(), None, partition)

    def flush_now(self) -> None:
        remaining = self.producer.flush(60.0)
        if remaining or self.errors:
            # Crashing here leaves the batch unacked: it is replayed, and replays are idempotent.
            raise RuntimeError(f"batch output not confirmed: {remaining} pending, errors {self.errors[:3]}")

    async def flush(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.flush_now)


FETCH_MAX_WAIT_MS = 50


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


def usage_group(app_id: str) -> str:
    """The consumer group whose committed usage offsets are stage 1's progress (and its lag)."""
    return f"{app_id}-usage"


class UsageReader:
    """Stage 1's hot loop: a confluent-kafka consumer without group membership on the usage partitions that faust
    assigned to this worker, in a thread of its own (the event loop stays free for faust and stage 2).

    Each round reads up to ``batch_size`` events per partition (a partition's batch writes each touched window
    once, so bigger batches mean fewer changelog records per event), hands every partition's events to
    ``process`` in offset order, then ``flush`` must confirm everything written, and only then are the next
    offsets committed to ``usage_group``: a committed offset never runs ahead of the changelog. Anything that
    goes wrong ends the process (``os._exit``), because its in-memory table may hold values whose changelog
    records were not confirmed; a restart restores from the changelog and replays from the committed offsets.
    """

    def __init__(
        self,
        kafka_conf: dict[str, Any],
        group: str,
        batch_size: int,
        wait_s: float,
        process: Callable[[int, list[Message]], None],
        flush: Callable[[], None],
    ) -> None:
        self._conf = {
            **kafka_conf,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.wait.max.ms": FETCH_MAX_WAIT_MS,  # the embedded broker holds a fetch for the whole wait
        }
        self._batch_size = batch_size
        self._wait_s = wait_s
        self._process = process
        self._flush = flush
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, partitions: list[int], starts: dict[int, int] | None = None) -> None:
        """Read ``partitions`` from their committed offsets, or from ``starts`` where given (after a rebuild)."""
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, args=(partitions, starts or {}), name="stage1-usage", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        """Finish the batch in hand (flushed and committed) and stop reading; returns when the thread is gone."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            await asyncio.to_thread(thread.join)

    def _run(self, partitions: list[int], starts: dict[int, int]) -> None:
        try:
            consumer = Consumer(self._conf)
            committed = consumer.committed([TopicPartition(USAGE, p) for p in partitions], timeout=30)
            consumer.assign(
                [
                    TopicPartition(USAGE, tp.partition, starts.get(tp.partition, max(tp.offset, OFFSET_BEGINNING)))
                    for tp in committed
                ]
            )
            log.info("stage 1 reads %s partitions %s", USAGE, partitions)
            positions: dict[int, int] = {}
            consumed, seconds = PROCESSOR_CONSUMED.labels("usage"), PROCESSOR_BATCH_SECONDS.labels("usage")
            while not self._stopping.is_set():
                batch: dict[int, list[Message]] = {}
                for message in consumer.consume(self._batch_size * len(partitions), self._wait_s):
                    if message.error():
                        log.warning("usage consumer: %s", message.error())
                        continue
                    batch.setdefault(message.partition(), []).append(message)
                if not batch:
                    continue
                started = time.perf_counter()
                for partition, messages in batch.items():
                    self._process(partition, messages)
                    positions[partition] = messages[-1].offset() + 1
                self._flush()
                consumed.inc(sum(len(messages) for messages in batch.values()))  # metrics once per batch
                seconds.observe(time.perf_counter() - started)
                consumer.commit(offsets=[TopicPartition(USAGE, p, o) for p, o in positions.items()], asynchronous=True)
            if positions:
                consumer.commit(offsets=[TopicPartition(USAGE, p, o) for p, o in positions.items()], asynchronous=False)
            consumer.close()
        except Exception:
            self._die()

    @staticmethod
    def _die() -> None:
        log.critical("stage 1 failed; exiting so that a restart recovers from the changelog", exc_info=True)
        logging.shutdown()
        os._exit(70)


def _keys(table: faust.Table) -> list[str]:
    """A snapshot of a table's keys, safe from the stage-1 thread while the event loop applies standby records:
    ``list`` of the memory store's plain dict runs in C under the GIL (its ``keys()`` view would iterate in
    Python and could see the dict change size)."""
    return list(table.data.data)


def stage2_partition(scope: str, partitions: int) -> int:
    """Stable scope -> internal partition, so every window of a scope is evaluated by one stage-2 owner."""
    return zlib.crc32(scope.encode()) % partitions


def _now() -> datetime:
    return datetime.now(UTC)


def _at(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def build_app(config: ProcessorConfig) -> tuple[faust.App, PolicyHolder]:
    _prompt_fetches()
    holder = PolicyHolder(config.policy, config.allowed_lateness)
    usage_codec = AvroCodec("usage_event")
    decision_codec = AvroCodec("decision")
    alert_codec = AvroCodec("alert")
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
    )
    internal = app.topic(PARTIALS_TOPIC, key_serializer="raw", value_serializer="json", partitions=n, internal=True)
    out = BatchOutput(kafka_conf)  # stage 2
    out1 = BatchOutput(kafka_conf)  # stage 1 (its own thread)
    table_kw: dict[str, Any] = {"partitions": n}  # keys and values are JSON (faust's table default)
    partials = app.Table("partials", **table_kw)  # "scope|period|start#partition" -> [total, requests, tokens, offset]
    windows = app.Table("windows", **table_kw)  # "scope|period|start" -> {partition: [total, requests, tokens, offset]}
    scope_states = app.Table("scopes", **table_kw)  # scope -> stage-2 state of the scope, see _new_state

    def to_dlq(message: Message, reason: str, kind: str) -> None:
        PROCESSOR_DEAD_LETTERED.labels(kind).inc()  # bad input only, not the per-event path
        out1.send(
            USAGE_DLQ,
            message.key(),
            message.value(),
            headers=[(DLQ_REASON_HEADER, reason.encode()), (DLQ_SOURCE_HEADER, f"{USAGE}/processor".encode())],
        )

    applied_high: dict[int, int] = {}  # source partition -> highest offset in any stored partial of it
    applied_ids: dict[int, AppliedIds] = {}  # source partition -> event ids applied within the dedup horizon
    horizon_ms = int(config.dedup_horizon.total_seconds() * 1000)
    skew_ms = int(config.max_future_skew.total_seconds() * 1000)
    clock1: dict[int, Watermark] = {}  # source partition -> its retention clock
    clock2: dict[int, Watermark] = {}  # internal partition -> its retention clock (its sources' newest)

    def stage1(partition: int, messages: list[Message]) -> None:
        policy = holder.policy
        calendar = holder.calendar
        prices = policy.price_table
        decode = usage_codec.decode
        skew, lateness = config.max_future_skew, config.allowed_lateness
        items: list[tuple[int, int, int, list[str], int, bytes, int]] = []
        newest_ms = watermark_ms = 0
        for message in messages:
            try:
                record = decode(message.value())
            except DecodeError as exc:
                to_dlq(message, str(exc), "undecodable")
                continue
            kind, stamp_ms = message.timestamp()
            arrived = _at(stamp_ms / 1000) if kind else _now()
            newest_ms = max(newest_ms, stamp_ms if kind else int(arrived.timestamp() * 1000))
            occurred = record["occurred_at"]
            problem = usage_record_problem(record, arrived, skew) or lateness_problem(occurred, arrived, lateness)
            if problem:
                to_dlq(message, problem, "late" if problem.startswith("late event") else "invalid")
                continue
            cost = record["cost_nanos"]
            if cost is None:
                try:
                    cost = price_record(record, occurred, prices).cost_nanos  # as the ledger sink prices it
                except UnknownModelError as exc:
                    to_dlq(message, f"unknown model, policy rejects it: {exc}", "unknown_model")
                    continue
                except CostOverflowError as exc:
                    to_dlq(message, f"cost overflow: {exc}", "cost_overflow")
                    continue
                except ValueError as exc:
                    to_dlq(message, f"cannot price: {exc}", "unpriceable")
                    continue
            tokens = record["input_tokens"] + record["output_tokens"]
            scopes = scopes_for(record, policy)
            watermark_ms = max(watermark_ms, stamp_ms if kind else int(arrived.timestamp() * 1000))
            items.append(
                (
                    message.offset(),
                    cost,
                    tokens,
                    scopes,
                    int(occurred.timestamp()),
                    record["event_id"].bytes,
                    content_digest(message.value()),
                )
            )
        if not items:
            return
        clock = clock1.setdefault(partition, Watermark())
        # a producer's clock far ahead must not expire every window: the watermark stops at now + the skew
        watermark_ms = clock.after(min(watermark_ms, int(time.time() * 1000) + skew_ms))
        applied = applied_ids.setdefault(partition, AppliedIds(horizon_ms))
        retention = holder.retention
        batch = fold_distinct(
            items,
            partition,
            newest_ms,
            applied_high.get(partition, -1),
            applied,
            partials.data.get,
            calendar,
            retention,
            watermark_ms // 1000,
        )
        if batch.conflicts:
            by_offset = {message.offset(): message for message in messages}
            for offset, first in batch.conflicts:
                reason = (
                    f"conflicting_duplicate: event_id already counted with other content (offset {first}); "
                    "the first version wins"
                )
                to_dlq(by_offset[offset], reason, "conflicting_duplicate")
        touched = batch.touched
        if touched:
            applied_high[partition] = max(applied_high.get(partition, -1), items[-1][0])
        for pkey in batch.changed:
            out1.put(partials, partition, pkey, list(touched[pkey]))
        # after the partials: a crash may lose these ids (the replay skips their events by offset and records the
        # ids again), never the partials they vouch for
        for key, value in batch.ids_records:
            out1.put(partials, partition, key, value)
        for key in batch.expired:
            out1.delete(partials, partition, key)
        if clock.scan_due():
            for key in retention.expired_partials(_keys(partials), partition, clock.durable_ms // 1000):
                out1.delete(partials, partition, key)
        if (record := clock.persist(watermark_ms)) is not None:
            out1.put(partials, partition, clock_key(partition), record)
        # one internal message per stage-2 partition:
        # {"p": source partition, "at": newest event, "w": the partition's watermark (ms), "s": scopes}
        by_target: dict[int, dict[str, list[list[Any]]]] = {}
        for pkey, value in touched.items():
            wkey, _ = split_partial_key(pkey)
            scope = wkey.partition("|")[0]
            target = by_target.setdefault(stage2_partition(scope, n), {})
            target.setdefault(scope, []).append([wkey, *value])
        newest = max(item[4] for item in items)
        for target, scopes in by_target.items():
            body = json.dumps({"p": partition, "at": newest, "w": watermark_ms, "s": scopes}).encode()
            out1.send(PARTIALS_TOPIC, None, body, partition=target)

    # Changelog partitions this worker writes, whose restore is complete. faust's recovery keeps applying records
    # of active partitions that it fetched beyond the high watermark it waited for (the embedded broker reports
    # it one record batch short), AFTER recovery ended: an old value would then overwrite a newer one in memory
    # and the next batch would build on it. Once a partition is restored here, its table ignores its changelog.
    sealed: set[TP] = set()

    def ignore_own_changelog(table: faust.Table) -> None:
        apply = table.apply_changelog_batch

        def apply_unsealed(batch: Iterable[Any]) -> None:
            events = list(batch)
            kept = [event for event in events if event.message.tp not in sealed]
            if len(kept) < len(events):
                log.info("%s: ignored %d late changelog records", table.name, len(events) - len(kept))
            apply(kept)

        table.apply_changelog_batch = apply_unsealed  # type: ignore[method-assign]

    for table in (partials, windows, scope_states):
        ignore_own_changelog(table)

    def active_partitions(table: faust.Table) -> list[int]:
        topic = table.changelog_topic.get_topic_name()
        return sorted(tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic)

    async def complete_restore(table: faust.Table) -> None:
        """Apply the changelog records faust's recovery stops short of (see ``read_to_end``) to the table."""
        topic = table.changelog_topic.get_topic_name()

        def tail() -> list[tuple[int, Any, Any]]:
            consumer = Consumer({**kafka_conf, "group.id": f"{topic}-restore", "enable.auto.commit": False})
            try:
                return list(read_to_end(consumer, topic, active_partitions(table), 60.0, last_batch_only=True))
            finally:
                consumer.close()

        for _, key, value in await asyncio.to_thread(tail):
            if value is None:
                table.data.pop(key, None)
            else:
                table.data[key] = value
        sealed.update(TP(topic, partition) for partition in active_partitions(table))

    for stage2_table in (windows, scope_states):
        stage2_table.on_recover(functools.partial(complete_restore, stage2_table))

    @windows.on_recover
    async def forget_stage2_clocks() -> None:
        """Partitions may have moved: each clock is read again from the restored table on its next batch."""
        clock2.clear()

    reader = UsageReader(
        kafka_conf, usage_group(config.app_id), config.batch_size, config.batch_within_s, stage1, out1.flush_now
    )

    @partials.on_recover
    async def start_stage1() -> None:
        """Faust restored this worker's active partials: read the matching usage partitions from here on."""
        await reader.stop()
        await complete_restore(partials)
        mine = active_partitions(partials)
        high, ids = restore_stage1(partials.data, mine, horizon_ms)
        applied_high.clear()
        applied_high.update(high)
        applied_ids.clear()
        applied_ids.update(ids)
        clock1.clear()
        clock1.update({partition: Watermark(restore_clock(partials.data, partition)) for partition in mine})
        empty = [p for p in mine if p not in high and not ids[p].records and not clock1[p].durable_ms]
        starts = await asyncio.to_thread(rebuild_from_ledger, empty) if empty and config.spend_source else {}
        if mine:
            reader.start(mine, starts)

    def rebuild_from_ledger(empty: list[int]) -> dict[int, int]:
        """Write the windows and recent ids of partitions without state from the ledger (``ledger_rebuild``) as
        partials at the ledger sink's committed offsets; returns where stage 1 reads each partition from."""
        assert config.spend_source is not None
        read_at = time.time()
        positions = sink_positions(kafka_conf, config.sink_group, empty)
        policy, now_s = holder.policy, int(time.time())
        plan = RebuildPlan(now_s, holder.lateness_s, holder.retention, holder.calendar, policy.timezone)
        try:
            snapshot = config.spend_source(plan.query(recent_since_ms(read_at, now_s, config.dedup_horizon)))
        except Exception:
            log.error("cannot read the ledger: windows of partitions %s start from zero", empty, exc_info=True)
            return {}
        windows, recent = fold_snapshot(snapshot, policy, plan, n, empty)
        now_ms = now_s * 1000
        by_target: dict[tuple[int, int], dict[str, list[list[Any]]]] = {}  # (source, internal partition) -> scopes
        for p in empty:
            start = max(positions.get(p, -1), 0)
            for wkey, (nanos, requests, tokens) in windows[p].items():
                value = [nanos, requests, tokens, start - 1]
                out1.put(partials, p, partial_key(wkey, p), value)
                scope = wkey.partition("|")[0]
                target = (p, stage2_partition(scope, n))
                by_target.setdefault(target, {}).setdefault(scope, []).append([wkey, *value])
            if windows[p]:
                applied_high[p] = start - 1
            applied = applied_ids[p]
            for chunk, first in enumerate(range(0, len(recent[p]), IDS_PER_RECORD)):
                rows = recent[p][first : first + IDS_PER_RECORD]
                entries = [(event_id, -1) for event_id, _ in rows]  # -1: applied, at no offset stage 1 will read
                applied.admit(entries)
                key, value = ids_key(p, -1 - chunk), pack_ids(max(ms for _, ms in rows), entries)
                applied.remember(key, value, entries)
                out1.put(partials, p, key, value)
            clock1[p] = Watermark(now_ms)
            out1.put(partials, p, clock_key(p), [now_ms])
            log.info(
                "partition %d rebuilt from the ledger: %d windows, %d recent ids, reading from offset %d",
                p, len(windows[p]), len(recent[p]), start,
            )  # fmt: skip
        for (source, target), scopes in by_target.items():
            for chunk in scope_chunks(scopes):
                body = {"p": source, "at": now_s, "w": now_ms, "s": chunk}
                out1.send(PARTIALS_TOPIC, None, json.dumps(body).encode(), partition=target)
        out1.flush_now()
        committed = [TopicPartition(USAGE, p, positions[p]) for p in empty if positions.get(p, -1) >= 0]
        if committed:
            consumer = Consumer({**kafka_conf, "group.id": usage_group(config.app_id), "enable.auto.commit": False})
            try:
                consumer.commit(offsets=committed, asynchronous=False)
            finally:
                consumer.close()
        return {p: positions[p] if positions.get(p, -1) >= 0 else OFFSET_BEGINNING for p in empty}

    @app.on_partitions_revoked.connect
    async def stop_stage1(_app: faust.App, _revoked: set[TP], **_: Any) -> None:
        """Stop reading before faust completes the revocation, so a partition never has two stage-1 writers."""
        await reader.stop()
        sealed.clear()

    @app.on_partitions_assigned.connect
    async def forget_moved_gauges(_app: faust.App, assigned: set[TP], **_: Any) -> None:
        mine = {tp.partition for tp in assigned if tp.topic == internal.get_topic_name()}
        BUDGET_GAUGES.retain(lambda scope: stage2_partition(scope, n) in mine)

    @app.on_before_shutdown.connect
    async def stop_stage1_on_shutdown(_app: faust.App, **_: Any) -> None:
        await reader.stop()

    heartbeats = HeartbeatPublisher(kafka_conf, config.app_id, config.heartbeat_interval_s, lambda: holder.policy)

    @app.timer(config.heartbeat_interval_s)
    async def heartbeat() -> None:
        """From the event loop stage 2 runs on, so a worker whose loop is stuck stops proving it is alive."""
        heartbeats.beat()

    @app.on_before_shutdown.connect
    async def stop_heartbeats(_app: faust.App, **_: Any) -> None:
        heartbeats.close()

    def stage2(events: Sequence[Any]) -> None:
        partition = events[0].message.partition
        dirty_windows: dict[str, dict[str, list[int]]] = {}
        states: dict[str, dict[str, Any]] = {}
        reevaluate = False
        retention = holder.retention
        clock = clock2.get(partition)
        if clock is None:
            clock = clock2[partition] = Watermark(restore_clock(windows.data, partition))
        watermark_ms = clock.after(max(event.value.get("w", 0) for event in events))
        watermark_s = watermark_ms // 1000
        for event in events:
            value = event.value
            if "reevaluate" in value:
                reevaluate = True
                continue
            for scope, entries in value["s"].items():
                state = states.get(scope)
                if state is None:
                    state = states[scope] = dict(scope_states.data.get(scope) or _new_state(partition))
                    state["latest"] = dict(state["latest"])
                latest = state["latest"]
                for wkey, *partial in entries:
                    _, period, start = split_window_key(wkey)
                    if not retention.live(period, start, watermark_s):
                        continue  # a source partition behind this one's watermark: never recreate a deleted window
                    parts = dirty_windows.get(wkey)
                    if parts is None:
                        parts = dict(windows.data.get(wkey) or {})
                    if merge_partial(parts, value["p"], partial) or wkey in dirty_windows:
                        dirty_windows[wkey] = parts
                    if start > latest.get(period, -1):
                        latest[period] = start
                state["seen"] = max(state["seen"], value["at"])
        for wkey, parts in dirty_windows.items():
            out.put(windows, partition, wkey, parts)
        if reevaluate:
            for scope, state in list(scope_states.data.items()):
                if state["p"] == partition and scope not in states:
                    states[scope] = dict(state)
        for scope, state in states.items():
            evaluate(scope, state, partition)
        if clock.scan_due():
            prune_windows(partition, clock.durable_ms // 1000, retention)
        if (record := clock.persist(watermark_ms)) is not None:
            out.put(windows, partition, clock_key(partition), record)

    def prune_windows(partition: int, watermark_s: int, retention: Retention) -> None:
        """Tombstone this internal partition's expired windows (a scope's windows live in its ``stage2_partition``)."""
        mine = [
            k
            for k in _keys(windows)
            if not is_clock_key(k) and stage2_partition(split_window_key(k)[0], n) == partition
        ]
        for wkey in retention.expired_windows(mine, watermark_s):
            out.delete(windows, partition, wkey)

    def totals(wkey: str) -> tuple[int, int, int]:
        return window_total(windows.data.get(wkey) or {})

    def evaluate(scope: str, state: dict[str, Any], partition: int) -> None:
        policy = holder.policy
        now = _now()
        verdict = evaluate_scope(scope, state["latest"], totals, policy, _at(state["seen"]))
        BUDGET_GAUGES.update(scope, verdict.standings)
        alerted = list(state["alerted"])
        for crossing in verdict.crossings:
            if crossing.key not in alerted:
                alert = build_alert(scope, crossing, policy.version, now)
                out.send(ALERTS, scope.encode(), alert_codec.encode(alert.to_avro()))
                PROCESSOR_ALERTS.labels(alert.kind.value).inc()
                alerted.append(crossing.key)
        state["alerted"] = alerted[-_MAX_ALERTED:]
        if needs_decision(state["sig"], verdict):
            version = next_version(state["version"], now)
            decision = build_decision(scope, verdict, version, policy.version, now)
            out.send(ENFORCEMENT, scope.encode(), decision_codec.encode(decision.to_avro()))
            PROCESSOR_DECISIONS.labels(decision.action.value).inc()
            state["sig"] = decision_signature(verdict)
            state["version"] = version
        state["p"] = partition
        out.put(scope_states, partition, scope, state)

    @app.agent(internal, isolated_partitions=True)
    async def scope_stage(stream: faust.StreamT) -> None:
        consumed, seconds = PROCESSOR_CONSUMED.labels("scopes"), PROCESSOR_BATCH_SECONDS.labels("scopes")
        async for events in stream.take_events(config.batch_size, within=config.batch_within_s):
            started = time.perf_counter()
            stage2(events)
            await out.flush()
            consumed.inc(len(events))
            seconds.observe(time.perf_counter() - started)

    return app, holder


def _new_state(partition: int) -> dict[str, Any]:
    return {"p": partition, "latest": {}, "seen": 0, "sig": None, "version": 0, "alerted": []}


class PolicyFollower(threading.Thread):
    """Follows ``spendstream.policy`` from ``start_offset`` (where the startup read ended), without a consumer group,
    and hot-swaps the policy to every valid record, whatever its name."""

    def __init__(
        self, holder: PolicyHolder, kafka_conf: dict[str, Any], partitions: int, start_offset: int = 0
    ) -> None:
        super().__init__(name="policy-follower", daemon=True)
        self.holder = holder
        self.kafka_conf = kafka_conf
        self.partitions = partitions
        self.start_offset = start_offset
        self.stopping = threading.Event()
        self.codec = AvroCodec("policy")
        self.alert_codec = AvroCodec("alert")

    def run(self) -> None:
        consumer = Consumer({**self.kafka_conf, "group.id": "spendstream-policy-follower", "enable.auto.commit": False})
        producer = Producer(self.kafka_conf)
        consumer.assign([TopicPartition(POLICY, 0, self.start_offset or OFFSET_BEGINNING)])
        try:
            while not self.stopping.is_set():
                message = consumer.poll(0.5)
                if message is None or message.error():
                    continue
                self._handle(message.value(), producer)
        finally:
            consumer.close()
            producer.flush(5)

    def _handle(self, value: bytes, producer: Producer) -> None:
        try:
            record = PolicyRecord.from_avro(self.codec.decode(value))
        except (DecodeError, ValueError) as exc:
            self._reject("?", f"undecodable policy record: {exc}", producer)
            return
        try:
            policy = policy_from_json(record.document)
        except PolicyError as exc:
            self._reject(
                record.name, f"policy {record.name} rejected, keeping {self.holder.policy.version}: {exc}", producer
            )
            return
        if self.holder.adopt(policy):
            log.info("policy %s version %s in force", policy.name, policy.version)
            for partition in range(self.partitions):
                producer.produce(PARTIALS_TOPIC, b'{"reevaluate": "%s"}' % policy.version.encode(), partition=partition)
            producer.flush(5)

    def _reject(self, name: str, message: str, producer: Producer) -> None:
        log.error("%s", message)
        alert = Alert(
            scope=f"policy:{name}",
            kind=AlertKind.policy,
            severity=Severity.critical,
            message=message,
            policy_version=self.holder.policy.version,
        )
        producer.produce(ALERTS, self.alert_codec.encode(alert.to_avro()), key=alert.scope.encode())
        producer.flush(5)


def read_window_totals(kafka_conf: dict[str, Any], app_id: str = DEFAULT_APP_ID, timeout: float = 15.0) -> dict:
    """Window totals ``{(scope, period, start_epoch_s): (nanos, requests, tokens)}`` from the stage-1 changelog.

    Reads the ``partials`` changelog to its end with a group-less consumer, so it works whether or not a
    processor is running, and sums the newest value of each (window, source partition).
    """
    latest = _read_changelog(kafka_conf, f"{app_id}-partials-changelog", timeout)
    return {split_window_key(k): v for k, v in totals_from_partials(latest).items()}


def read_scope_totals(kafka_conf: dict[str, Any], app_id: str = DEFAULT_APP_ID, timeout: float = 15.0) -> dict:
    """The same totals as stage 2 holds them (its ``windows`` changelog): what decisions were based on."""
    latest = _read_changelog(kafka_conf, f"{app_id}-windows-changelog", timeout)
    return {split_window_key(k): window_total(v) for k, v in latest.items() if not is_clock_key(k)}


def _read_changelog(kafka_conf: dict[str, Any], topic: str, timeout: float) -> dict[str, Any]:
    """Newest JSON value per key of a table changelog, read to its current end."""
    consumer = Consumer({**kafka_conf, "group.id": f"{topic}-reader", "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return {}
        latest: dict[str, Any] = {}
        for _, key, value in read_to_end(consumer, topic, metadata.partitions, timeout):
            if value is None:
                latest.pop(key, None)
            else:
                latest[key] = value
        return latest
    finally:
        consumer.close()


def read_to_end(
    consumer: Consumer, topic: str, partitions: Iterable[int], timeout: float, last_batch_only: bool = False
) -> Iterator[tuple[int, Any, Any]]:
    """``(partition, key, value)`` of every JSON record of a changelog to its end, in order per partition
    (value None for a tombstone).

    The end is not the reported high watermark alone: the embedded broker reports the last record BATCH's
    base offset + 1, so the records after it are only found by reading on until a fetch returns nothing.
    ``last_batch_only`` starts at that reported end - 1 (what faust's table recovery reads up to).
    """
    ends: dict[int, int] = {}
    starts: dict[int, int] = {}
    for partition in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
        if high > 0:
            ends[partition] = high
            starts[partition] = max(low, high - 1) if last_batch_only else OFFSET_BEGINNING
    consumer.assign([TopicPartition(topic, p, starts[p]) for p in ends])
    deadline = time.monotonic() + timeout
    while ends:
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not read {topic} to its end within {timeout}s")
        for message in consumer.consume(1000, timeout=0.5):
            if message.error():
                continue
            yield message.partition(), json.loads(message.key()), _json_or_none(message.value())
            if message.offset() + 1 >= ends.get(message.partition(), 0):
                ends.pop(message.partition(), None)
    # past the reported ends, until nothing more comes (or, while a worker keeps writing, until the deadline)
    while time.monotonic() < deadline and (messages := consumer.consume(1000, timeout=0.2)):
        for message in messages:
            if not message.error():
                yield message.partition(), json.loads(message.key()), _json_or_none(message.value())


def _json_or_none(value: bytes | None) -> Any:
    return None if value is None else json.loads(value)

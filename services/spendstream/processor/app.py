"""The processor runtime: a faust-streaming app with two batch stages (the arithmetic is in ``spend_accounting``).

Measured on the build machine (``bench/bench_faust_baseline.py``): faust moves ~11-12k usage events/s
through one worker whether an agent iterates event by event or with ``take``, while a plain confluent-kafka
consumer decodes ~110k/s. faust's per-message machinery is the ceiling, so per-event Python work here is
kept to decode + price + window keys, and everything else (table writes, stage-2 messages, rule evaluation)
happens once per batch. faust is kept for what it does well: consumer-group coordination, co-partitioned
tables with changelog recovery and standbys, rebalancing.

* Stage 1 (``spendstream.usage``, one actor per partition): decode, validate, check lateness, price events
  that lack ``cost_nanos``, fold the batch into per-(window, source partition) partials, write each changed
  partial once to the ``partials`` table, and send every touched partial's TOTAL to the internal topic
  ``spendstream.processor.partials`` keyed by scope. Bad events go to ``spendstream.usage.dlq`` with a reason.
* Stage 2 (internal topic, one actor per partition): merge totals into the ``windows`` table, then evaluate
  each touched scope (``decision_publisher``) and publish Decisions to ``spendstream.enforcement`` when a
  scope's action changes and Alerts to ``spendstream.alerts`` once per crossing.
* Policy: every worker follows ``spendstream.policy`` with its own group-less consumer thread (a consumer group
  would give the single partition to one worker only). A valid record replaces the policy at once; an
  invalid one is rejected with a ``policy`` alert and the last good policy stays. After a change the thread
  asks stage 2 to re-evaluate every scope (a control message to each partition), which is how a raised
  budget lifts a shutoff mid-period.

Output path: faust's producer costs ~45 us per message (profiled), and a batch writes about one changelog
record per touched (window, partition), so every record this app writes (table changelogs, the internal topic,
decisions, alerts, DLQ) goes through one confluent-kafka producer instead, and each batch ends with a flush
of it BEFORE faust may ack the batch's events. Nothing a batch wrote can be missing once its source offsets
are committed, which is the ordering the exact accounting needs. Table writes name their changelog
partition explicitly (the stage's partition), so they never depend on faust's "current event" in a batch;
faust still restores the tables from those changelog topics on start and rebalance.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faust
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from spendstream.core.codec import AvroCodec, DecodeError
from spendstream.core.events import Alert, AlertKind, PolicyRecord, Severity, usage_record_problem
from spendstream.core.metrics import (
    PROCESSOR_ALERTS,
    PROCESSOR_BATCH_SECONDS,
    PROCESSOR_CONSUMED,
    PROCESSOR_DEAD_LETTERED,
    PROCESSOR_DECISIONS,
)
from spendstream.core.pricing import UnknownModelError, price_usage
from spendstream.core.topics import ALERTS, DLQ_REASON_HEADER, DLQ_SOURCE_HEADER, ENFORCEMENT, POLICY, USAGE, USAGE_DLQ
from spendstream.processor.decision_publisher import (
    build_alert,
    build_decision,
    decision_signature,
    evaluate_scope,
    needs_decision,
    next_version,
)
from spendstream.processor.policy import Policy, PolicyError, policy_from_json
from spendstream.processor.scopes import scopes_for
from spendstream.processor.spend_accounting import (
    WindowCalendar,
    fold_batch,
    lateness_problem,
    merge_partial,
    split_partial_key,
    split_window_key,
    totals_from_partials,
    window_total,
)

log = logging.getLogger(__name__)

PARTIALS_TOPIC = "spendstream.processor.partials"
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
    kafka_conf: dict[str, Any] | None = None  # librdkafka settings (security included) for direct clients


class PolicyHolder:
    """The policy in force, swapped atomically by the policy thread and read by both stages."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.name = policy.name
        self.calendar = WindowCalendar(policy.tz)

    def adopt(self, policy: Policy) -> bool:
        if policy.version == self.policy.version:
            return False
        if policy.timezone != self.policy.timezone:
            self.calendar = WindowCalendar(policy.tz)
        self.policy = policy
        return True


class BatchOutput:
    """Everything a batch produces, on one librdkafka producer; ``flush`` must succeed before the batch is acked."""

    def __init__(self, kafka_conf: dict[str, Any]) -> None:
        self.producer = Producer({**kafka_conf, "linger.ms": 2, "queue.buffering.max.messages": 2_000_000})
        self.errors: list[str] = []

    def _delivered(self, err: Any, _message: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def send(
        self, topic: str, key: bytes | None, value: bytes, partition: int | None = None, headers: Any = None
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

    async def flush(self) -> None:
        remaining = await asyncio.get_running_loop().run_in_executor(None, self.producer.flush, 60.0)
        if remaining or self.errors:
            # Crashing here leaves the batch unacked: it is replayed, and replays are idempotent.
            raise RuntimeError(f"batch output not confirmed: {remaining} pending, errors {self.errors[:3]}")


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


def stage2_partition(scope: str, partitions: int) -> int:
    """Stable scope -> internal partition, so every window of a scope is evaluated by one stage-2 owner."""
    return zlib.crc32(scope.encode()) % partitions


def _now() -> datetime:
    return datetime.now(UTC)


def _at(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def build_app(config: ProcessorConfig) -> tuple[faust.App, PolicyHolder]:
    _prompt_fetches()
    holder = PolicyHolder(config.policy)
    usage_codec = AvroCodec("usage_event")
    decision_codec = AvroCodec("decision")
    alert_codec = AvroCodec("alert")
    n = config.partitions
    app = faust.App(
        config.app_id,
        broker=f"kafka://{config.bootstrap}",
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
    usage = app.topic(USAGE, key_serializer="raw", value_serializer="raw", partitions=n)
    internal = app.topic(PARTIALS_TOPIC, key_serializer="raw", value_serializer="json", partitions=n, internal=True)
    out = BatchOutput(config.kafka_conf or {"bootstrap.servers": config.bootstrap})
    table_kw: dict[str, Any] = {"partitions": n}  # keys and values are JSON (faust's table default)
    partials = app.Table("partials", **table_kw)  # "scope|period|start#partition" -> [total, requests, tokens, offset]
    windows = app.Table("windows", **table_kw)  # "scope|period|start" -> {partition: [total, requests, tokens, offset]}
    scope_states = app.Table("scopes", **table_kw)  # scope -> stage-2 state of the scope, see _new_state

    def to_dlq(message: Any, reason: str, kind: str) -> None:
        PROCESSOR_DEAD_LETTERED.labels(kind).inc()  # bad input only, not the per-event path
        out.send(
            USAGE_DLQ,
            message.key,
            message.value,
            headers=[(DLQ_REASON_HEADER, reason.encode()), (DLQ_SOURCE_HEADER, f"{USAGE}/processor".encode())],
        )

    def stage1(events: Sequence[Any]) -> None:
        policy = holder.policy
        calendar = holder.calendar
        prices = policy.price_table
        partition = events[0].message.partition
        items: list[tuple[int, int, int, list[str]]] = []
        newest = 0
        for event in events:
            message = event.message
            try:
                record = usage_codec.decode(message.value)
            except DecodeError as exc:
                to_dlq(message, str(exc), "undecodable")
                continue
            arrived = _at(message.timestamp)
            occurred = record["occurred_at"]
            problem = usage_record_problem(record, arrived, config.max_future_skew)
            if problem:
                to_dlq(message, problem, "invalid")
                continue
            problem = lateness_problem(occurred, arrived, config.allowed_lateness)
            if problem:
                to_dlq(message, problem, "late")
                continue
            cost = record["cost_nanos"]
            if cost is None:
                try:
                    cost = price_usage(
                        record["provider"],
                        record["model_served"] or record["model_requested"],
                        record["input_tokens"],
                        record["output_tokens"],
                        record["cached_input_tokens"],
                        record["cache_write_tokens"],
                        occurred,
                        prices,
                    ).cost_nanos
                except UnknownModelError as exc:
                    to_dlq(message, f"unknown model, policy rejects it: {exc}", "unknown_model")
                    continue
                except ValueError as exc:
                    to_dlq(message, f"cannot price: {exc}", "unpriceable")
                    continue
            epoch = int(occurred.timestamp())
            newest = max(newest, epoch)
            wkeys = calendar.window_keys(scopes_for(record, policy), epoch)
            items.append((message.offset, cost, record["input_tokens"] + record["output_tokens"], wkeys))
        if not items:
            return
        touched, changed = fold_batch(items, partition, partials.data.get)
        for pkey in changed:
            out.put(partials, partition, pkey, list(touched[pkey]))
        # one internal message per stage-2 partition: {"p": source partition, "at": newest event, "s": scopes}
        by_target: dict[int, dict[str, list[list[Any]]]] = {}
        for pkey, value in touched.items():
            wkey, _ = split_partial_key(pkey)
            scope = wkey.partition("|")[0]
            target = by_target.setdefault(stage2_partition(scope, n), {})
            target.setdefault(scope, []).append([wkey, *value])
        for target, scopes in by_target.items():
            body = json.dumps({"p": partition, "at": newest, "s": scopes}).encode()
            out.send(PARTIALS_TOPIC, None, body, partition=target)

    def stage2(events: Sequence[Any]) -> None:
        partition = events[0].message.partition
        dirty_windows: dict[str, dict[str, list[int]]] = {}
        states: dict[str, dict[str, Any]] = {}
        reevaluate = False
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
                    parts = dirty_windows.get(wkey)
                    if parts is None:
                        parts = dict(windows.data.get(wkey) or {})
                    if merge_partial(parts, value["p"], partial) or wkey in dirty_windows:
                        dirty_windows[wkey] = parts
                    _, period, start = split_window_key(wkey)
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

    def totals(wkey: str) -> tuple[int, int, int]:
        return window_total(windows.data.get(wkey) or {})

    def evaluate(scope: str, state: dict[str, Any], partition: int) -> None:
        policy = holder.policy
        now = _now()
        verdict = evaluate_scope(scope, state["latest"], totals, policy, _at(state["seen"]))
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

    @app.agent(usage, isolated_partitions=True)
    async def usage_stage(stream: faust.StreamT) -> None:
        consumed, seconds = PROCESSOR_CONSUMED.labels("usage"), PROCESSOR_BATCH_SECONDS.labels("usage")
        async for events in stream.take_events(config.batch_size, within=config.batch_within_s):
            started = time.perf_counter()
            stage1(events)
            await out.flush()
            consumed.inc(len(events))  # once per batch
            seconds.observe(time.perf_counter() - started)

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
    """Reads ``spendstream.policy`` from the beginning, without a consumer group, and hot-swaps the policy."""

    def __init__(self, holder: PolicyHolder, kafka_conf: dict[str, Any], partitions: int) -> None:
        super().__init__(name="policy-follower", daemon=True)
        self.holder = holder
        self.kafka_conf = kafka_conf
        self.partitions = partitions
        self.stopping = threading.Event()
        self.codec = AvroCodec("policy")
        self.alert_codec = AvroCodec("alert")

    def run(self) -> None:
        consumer = Consumer({**self.kafka_conf, "group.id": "spendstream-policy-follower", "enable.auto.commit": False})
        producer = Producer(self.kafka_conf)
        consumer.assign([TopicPartition(POLICY, 0, OFFSET_BEGINNING)])
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
        if record.name != self.holder.name:
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
    return {split_window_key(k): window_total(v) for k, v in latest.items()}


def _read_changelog(kafka_conf: dict[str, Any], topic: str, timeout: float) -> dict[str, Any]:
    """Newest JSON value per key of a table changelog, read to its current end."""
    consumer = Consumer({**kafka_conf, "group.id": f"{topic}-reader", "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return {}
        ends: dict[int, int] = {}
        for partition in metadata.partitions:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
            if high > 0:
                ends[partition] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        latest: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=0.5):
                if message.error():
                    continue
                latest[json.loads(message.key())] = json.loads(message.value())
                if message.offset() + 1 >= ends.get(message.partition(), 0):
                    ends.pop(message.partition(), None)
        if ends:
            raise TimeoutError(f"could not read {topic} to its end within {timeout}s")
        return latest
    finally:
        consumer.close()

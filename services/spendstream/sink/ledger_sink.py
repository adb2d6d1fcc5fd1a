"""The ledger sink: ``spendstream.usage`` into ``{db}.usage_ledger``, every event exactly once.

Why the ledger is exact (DESIGN.md §7.1, §7.2):

* **Nothing is lost.** Offsets are committed explicitly (``last offset + 1`` per partition),
  synchronously, and only after the batch's insert has returned and its dead letters are
  acknowledged by the broker. A crash anywhere before that replays the batch from the last
  commit. Batches are committed in the order they were read, so a commit never covers a batch
  whose insert has not landed.
* **Nothing is counted twice.** A replay may write an event a second time. Two mechanisms
  remove the copy:

  1. Each insert carries ``insert_deduplication_token`` = the batch's ``(partition, first
     offset, last offset)`` ranges. Retrying a failed or timed-out insert of the *same* batch
     (the common case: ClickHouse answered with an error after writing, or the connection
     dropped) is dropped by ClickHouse itself, so not even a duplicate part is written.
  2. A replay after a crash or rebalance usually has *different* boundaries (a different
     batch size, a batch cut short by the time limit, other partitions mixed in), so its token
     differs and its rows land again. Exactness then rests on the table: ``usage_ledger`` is a
     ReplacingMergeTree whose sorting key ends in ``event_id`` and whose other key columns and
     partition key are functions of the event itself, so every copy of an event has the same
     key and the same partition. Background merges collapse copies eventually, and ``FINAL``
     collapses them at read time, always. Every exact read (views, reports, tests) uses FINAL.

The hot path avoids per-event objects: values are read with fastavro against a copy of the
schema without logical types (timestamps stay integer microseconds, which is also what a
``DateTime64(6)`` column stores), checked by :func:`fast_problem_free` and transposed into
columns in C (``itemgetter`` + ``zip``). Anything unusual (older schema versions, registry
framing, corrupt bytes, a record the quick check does not clear) takes the exact path:
``AvroCodec.decode`` and ``usage_record_problem``, which also supply the dead-letter reason.
Inserts run in a writer thread (chDB and the HTTP client release the GIL) so that decoding
batch N+1 overlaps inserting batch N.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any

import fastavro
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from spendstream.core.codec import SINGLE_OBJECT_MAGIC, AvroCodec, DecodeError, fingerprint
from spendstream.core.config import Settings
from spendstream.core.events import usage_record_problem
from spendstream.core.schemas import load_schema_json
from spendstream.core.topics import USAGE
from spendstream.sink.dead_letters import DeadLetter, DeadLetterPublisher, source_of

log = logging.getLogger(__name__)

LEDGER_TABLE = "usage_ledger"
# Insert columns, in the table's order; ``ingested_at`` is filled in by its DEFAULT.
LEDGER_COLUMNS = (
    "event_id",
    "occurred_at",
    "org",
    "division",
    "team",
    "project",
    "feature",
    "user",
    "customer",
    "environment",
    "tags",
    "provider",
    "model_requested",
    "model_served",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "cost_nanos",
    "price_source",
    "latency_ms",
    "status",
    "decision_applied",
    "cache_hit",
)
_ROW = itemgetter(*LEDGER_COLUMNS)
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


# -- pure core: decoding, validation, batch bookkeeping --------------------------------------


def _without_logical_types(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {key: _without_logical_types(value) for key, value in schema.items() if key != "logicalType"}
    if isinstance(schema, list):
        return [_without_logical_types(item) for item in schema]
    return schema


def fast_problem_free(record: dict[str, Any], future_limit_us: int) -> bool:
    """A cheap sufficient condition for ``usage_record_problem(...) is None`` on a raw record.

    ``record`` is decoded without logical types (``occurred_at`` in integer microseconds).
    True guarantees the full check passes; False only means "ask the full check", which
    also accepts UUID spellings other than the canonical lower-case one.
    """
    inp = record["input_tokens"]
    cached = record["cached_input_tokens"]
    written = record["cache_write_tokens"]
    cost = record["cost_nanos"]
    return bool(
        cached >= 0
        and written >= 0
        and cached + written <= inp
        and record["output_tokens"] >= 0
        and record["latency_ms"] >= 0
        and (cost is None or cost >= 0)
        and record["occurred_at"] <= future_limit_us
        and record["provider"]
        and record["model_requested"]
        and _CANONICAL_UUID.fullmatch(record["event_id"])
    )


def micros(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (no float on the way)."""
    return (moment - _EPOCH) // _MICROSECOND


@dataclass
class Rejected:
    index: int
    stage: str  # "decode" or "validate"
    reason: str


@dataclass
class DecodedValues:
    records: list[dict[str, Any]]  # raw form: occurred_at in micros, event_id a string
    rejected: list[Rejected]


class UsageDecoder:
    """Turns UsageEvent values into ledger records, or into rejections with a reason."""

    def __init__(self, max_future_skew: timedelta, registry_url: str | None = None) -> None:
        self.codec = AvroCodec("usage_event", registry_url)
        self.max_future_skew = max_future_skew
        self._header = SINGLE_OBJECT_MAGIC + fingerprint("usage_event")
        self._raw_schema = fastavro.parse_schema(_without_logical_types(load_schema_json("usage_event")))

    def decode(self, values: Sequence[bytes | None], now: datetime) -> DecodedValues:
        future_limit_us = micros(now + self.max_future_skew)
        read = fastavro.schemaless_reader
        raw_schema, header = self._raw_schema, self._header
        records: list[dict[str, Any]] = []
        rejected: list[Rejected] = []
        for index, value in enumerate(values):
            if value is not None and value[:10] == header:
                stream = io.BytesIO(value)
                stream.seek(10)
                try:
                    record = read(stream, raw_schema, None)
                except Exception:  # corrupt body: the exact path below names the problem
                    record = None
                if record is not None and stream.tell() == len(value) and fast_problem_free(record, future_limit_us):
                    records.append(record)
                    continue
            self._decode_exactly(index, value, now, records, rejected)
        return DecodedValues(records, rejected)

    def _decode_exactly(
        self, index: int, value: bytes | None, now: datetime, records: list[dict[str, Any]], rejected: list[Rejected]
    ) -> None:
        try:
            record = self.codec.decode(value or b"")
        except DecodeError as exc:
            rejected.append(Rejected(index, "decode", str(exc)))
            return
        problem = usage_record_problem(record, now, self.max_future_skew)
        if problem is not None:
            rejected.append(Rejected(index, "validate", problem))
            return
        record["event_id"] = str(record["event_id"])
        record["occurred_at"] = micros(record["occurred_at"])
        records.append(record)


def columns_of(records: Sequence[dict[str, Any]]) -> list[Sequence[Any]]:
    """Ledger columns (in ``LEDGER_COLUMNS`` order) of raw records, transposed in C."""
    if not records:
        return [() for _ in LEDGER_COLUMNS]
    return list(zip(*map(_ROW, records), strict=True))


def dedup_token(ranges: dict[int, tuple[int, int]]) -> str:
    """Deterministic insert_deduplication_token of a batch: its sorted partition offset ranges."""
    return "usage:" + ",".join(f"{p}:{first}-{last}" for p, (first, last) in sorted(ranges.items()))


def commit_positions(topic: str, ranges: dict[int, tuple[int, int]], owned: Iterable[int]) -> list[TopicPartition]:
    """Offsets to commit after a batch landed: ``last + 1`` for every partition still owned."""
    mine = set(owned)
    return [TopicPartition(topic, p, last + 1) for p, (_, last) in sorted(ranges.items()) if p in mine]


_REASON_KINDS = (
    ("unknown schema fingerprint", "unknown_schema"),
    ("missing event_id", "bad_event_id"),
    ("event_id is not a UUID", "bad_event_id"),
    ("hexadecimal UUID", "bad_event_id"),  # the uuid logical type refuses it while decoding
    ("is negative", "negative_value"),
    ("exceed input_tokens", "cached_exceeds_input"),
    ("in the future", "future_occurred_at"),
    ("missing occurred_at", "missing_occurred_at"),
    ("missing provider or model_requested", "missing_provider_or_model"),
)


def reason_kind(stage: str, reason: str) -> str:
    """A bounded label for a dead-letter reason (the full reason travels in the header)."""
    for needle, kind in _REASON_KINDS:
        if needle in reason:
            return kind
    return "undecodable" if stage == "decode" else "invalid"


# -- the service ----------------------------------------------------------------------------


@dataclass
class SinkStats:
    consumed: int = 0
    inserted: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    commits: int = 0
    insert_retries: int = 0


@dataclass
class _Batch:
    ranges: dict[int, tuple[int, int]]
    columns: list[Sequence[Any]]
    rows: int
    token: str
    abandoned: threading.Event = field(default_factory=threading.Event)
    landed: Future[bool] | None = None


class LedgerSink:
    """Consumes usage events in batches, inserts them into the ledger, then commits offsets.

    ``run()`` blocks until :meth:`stop` (also wired to SIGTERM/SIGINT by the CLI) and returns
    an exit code. ``client`` lets a caller own the ClickHouse connection (chDB allows one
    directory per process); by default the sink connects with ``ledger_store.connect``.
    """

    def __init__(self, settings: Settings, client: Any = None, stop_grace_s: float = 30.0) -> None:
        self.settings = settings
        self.stats = SinkStats()
        self._client = client
        self._stop = threading.Event()
        self._stop_grace_s = stop_grace_s
        self._decoder = UsageDecoder(timedelta(seconds=settings.max_future_skew_s), settings.schema_registry_url)
        self._table = f"{settings.clickhouse_database}.{LEDGER_TABLE}"
        self._column_types: list[str] = []
        self._consumer: Consumer | None = None
        self._dlq: DeadLetterPublisher | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ledger-writer")
        self._pending: _Batch | None = None
        self._owned: set[int] = set()
        self._generation = 0
        self._failed = False

    @property
    def client(self) -> Any:
        return self._client

    def stop(self) -> None:
        """Ask the sink to finish the batch in hand, commit it, and return from ``run``."""
        self._stop.set()

    # -- lifecycle -------------------------------------------------------------------------

    def run(self, ready: Callable[[], None] | None = None) -> int:
        from spendstream.core.ledger_store import connect, migrate

        if self._client is None:
            self._client = connect(self.settings)
        applied = migrate(self._client, self.settings)
        if applied:
            log.info("ledger migrations applied: %s", ", ".join(applied))
        self._column_types = self._ledger_column_types()
        kafka = self.settings.kafka_client_config()
        self._dlq = DeadLetterPublisher(kafka)
        self._consumer = Consumer(
            {
                **kafka,
                "group.id": self.settings.sink_group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "client.id": "spendstream-sink",
                # A crashed sink's partitions move to a live one within seconds, not the default 45 s.
                "session.timeout.ms": 10_000,
                "heartbeat.interval.ms": 1_000,
            }
        )
        self._consumer.subscribe([USAGE], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        if ready is not None:
            ready()
        log.info("sink consuming %s as group %s into %s", USAGE, self.settings.sink_group, self._table)
        try:
            self._loop()
        finally:
            self._consumer.close()  # revokes: _on_revoke settles anything still pending
            self._dlq.close()
            self._writer.shutdown(wait=True, cancel_futures=False)
        log.info("sink stopped: %s", self._progress_line(0.0, 0))
        return 1 if self._failed else 0

    def _loop(self) -> None:
        assert self._consumer is not None
        batch_s = self.settings.sink_batch_ms / 1000
        last_log, logged_rows = time.monotonic(), 0
        while not self._stop.is_set() and not self._failed:
            generation = self._generation
            messages = self._consumer.consume(self.settings.sink_batch_size, batch_s)
            if generation != self._generation:
                # A rebalance happened inside consume(); what it returned may predate it, and the
                # new assignment re-reads from the committed offsets anyway.
                continue
            batch = self._prepare(messages)
            if self._pending is not None and not self._settle(self._pending):
                self._pending = None
                break
            self._pending = None
            if batch is not None:
                self._pending = batch
                batch.landed = self._writer.submit(self._insert, batch)
            now = time.monotonic()
            if now - last_log >= 10:
                log.info("sink progress: %s", self._progress_line(now - last_log, self.stats.inserted - logged_rows))
                last_log, logged_rows = now, self.stats.inserted
        if self._pending is not None and not self._failed:
            self._settle(self._pending)
            self._pending = None

    def _progress_line(self, seconds: float, rows: int) -> str:
        s = self.stats
        rate = f"{rows / seconds:,.0f} rows/s, " if seconds else ""
        return (
            f"{rate}consumed {s.consumed:,}, inserted {s.inserted:,}, "
            f"dead-lettered {sum(s.dead_lettered.values()):,} {dict(s.dead_lettered)}, "
            f"batches {s.batches:,}, commits {s.commits:,}"
        )

    # -- one batch -------------------------------------------------------------------------

    def _prepare(self, messages: list[Message]) -> _Batch | None:
        """Decode a consumed batch, dead-letter what is bad, and return what to insert."""
        assert self._dlq is not None
        good: list[Message] = []
        for msg in messages:
            err = msg.error()
            if err is None:
                good.append(msg)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("consume error: %s", err)
        if not good:
            return None
        ranges: dict[int, tuple[int, int]] = {}
        for msg in good:
            partition, offset = msg.partition(), msg.offset()
            seen = ranges.get(partition)
            ranges[partition] = (offset, offset) if seen is None else (seen[0], offset)
        decoded = self._decoder.decode([msg.value() for msg in good], datetime.now(UTC))
        for rejected in decoded.rejected:
            msg = good[rejected.index]
            self._dlq.publish(
                DeadLetter(
                    msg.key(),
                    msg.value(),
                    rejected.reason,
                    source_of(msg.topic(), msg.partition(), msg.offset()),
                    rejected.stage,
                )
            )
            self.stats.dead_lettered[reason_kind(rejected.stage, rejected.reason)] += 1
        self.stats.consumed += len(good)
        return _Batch(ranges, columns_of(decoded.records), len(decoded.records), dedup_token(ranges))

    def _insert(self, batch: _Batch) -> bool:
        """Insert one batch, retrying with backoff until it lands, is abandoned, or the stop grace ends."""
        if batch.rows == 0:
            return True
        delay = 0.2
        stop_deadline: float | None = None
        while not batch.abandoned.is_set():
            try:
                self._client.insert(
                    self._table,
                    batch.columns,
                    column_names=LEDGER_COLUMNS,
                    column_type_names=self._column_types,
                    column_oriented=True,
                    settings={"insert_deduplication_token": batch.token},
                )
                return True
            except Exception as exc:  # any ClickHouse or transport error: the same batch is retried
                self.stats.insert_retries += 1
                log.warning("ledger insert of %d rows failed (retrying in %.1fs): %s", batch.rows, delay, exc)
            if self._stop.is_set():
                stop_deadline = stop_deadline or time.monotonic() + self._stop_grace_s
                if time.monotonic() >= stop_deadline:
                    return False
            batch.abandoned.wait(delay)
            delay = min(delay * 2, 10.0)
        return False

    def _settle(self, batch: _Batch, timeout: float | None = None) -> bool:
        """Wait for a batch's insert, then make its dead letters durable and commit its offsets."""
        assert batch.landed is not None and self._dlq is not None and self._consumer is not None
        try:
            landed = batch.landed.result(timeout)
        except TimeoutError:
            landed = False
        if not landed:
            batch.abandoned.set()
            if timeout is None:  # only the stop grace ends an unbounded wait
                log.error("giving up on an unwritten batch at shutdown; its offsets stay uncommitted")
                self._failed = True
            return False
        while not self._dlq.flush(5.0):
            log.warning("dead letters not yet acknowledged; offsets stay uncommitted until they are")
            if self._stop.is_set():
                self._failed = True
                return False
        self.stats.inserted += batch.rows
        self.stats.batches += 1
        positions = commit_positions(USAGE, batch.ranges, self._owned)
        if positions:
            try:
                self._consumer.commit(offsets=positions, asynchronous=False)
                self.stats.commits += 1
            except KafkaException as exc:  # the batch is in the ledger; a replay is deduplicated
                log.warning("offset commit failed (the batch will be replayed): %s", exc)
        return True

    # -- rebalancing -----------------------------------------------------------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._owned.update(tp.partition for tp in partitions)
        log.info("assigned partitions %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit the in-flight batch if it lands soon; otherwise abandon it (the next owner replays it)."""
        self._generation += 1
        pending, self._pending = self._pending, None
        if pending is not None:
            self._settle(pending, timeout=None if self._stop.is_set() else 10.0)
        self._owned.difference_update(tp.partition for tp in partitions)
        log.info("revoked partitions %s", sorted(tp.partition for tp in partitions))

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._generation += 1
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.abandoned.set()
        self._owned.difference_update(tp.partition for tp in partitions)
        log.warning("lost partitions %s; the in-flight batch will be replayed by their new owner", sorted(self._owned))

    def _ledger_column_types(self) -> list[str]:
        types = {row[0]: row[1] for row in self._client.query(f"DESCRIBE TABLE {self._table}").result_rows}
        return [types[name] for name in LEDGER_COLUMNS]

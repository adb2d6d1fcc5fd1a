"""The ledger sink: ``spendstream.usage`` into ``{db}.usage_ledger``, every event exactly once.

Why the ledger is exact (docs/architecture.md §7.1, §7.2):

* **Nothing is lost.** Offsets are committed explicitly (``last offset + 1`` per partition),
  synchronously, and only after the batch's insert has returned and its dead letters are
  acknowledged by the broker. A crash anywhere before that replays the batch from the last
  commit. Batches are committed in the order they were read, so a commit never covers a batch
  whose insert has not landed.
* **Nothing is counted twice.** A replay may write an event a second time. Two mechanisms
  remove the copy:

  1. Each insert carries ``insert_deduplication_token`` = the batch's ``(partition, first
     offset, last offset)`` ranges and a digest of its records. Retrying a failed or timed-out
     insert of the *same* batch (the common case: ClickHouse answered with an error after writing, or the connection
     dropped) is dropped by ClickHouse itself, so not even a duplicate part is written.
  2. A replay after a crash or rebalance usually has *different* boundaries (a different
     batch size, a batch cut short by the time limit, other partitions mixed in), so its token
     differs and its rows land again. Exactness then rests on the table: ``usage_ledger`` is a
     ReplacingMergeTree whose sorting key ends in ``event_id`` and whose other key columns and
     partition key are functions of the event itself, so every copy of an event has the same
     key and the same partition. Background merges collapse copies eventually, and ``FINAL``
     collapses them at read time, always. Every exact read (views, reports, tests) uses FINAL.

The sink is three parts, each in its own module:

* :mod:`spendstream.sink.decode`: values into ledger records or rejections, in Python (the exact path).
* :mod:`spendstream.sink.staging`: values grouped by writer schema and framed, undecoded, as an Avro
  container that ClickHouse reads and validates in SQL (the fast path: the hot path decodes nothing
  in Python).
* this module, the loop: consume, frame, hand the batch to a
  :class:`~spendstream.sink.ledger_writer.LedgerWriter` (one per ClickHouse client kind), then settle:
  dead letters acknowledged, offsets committed. A content refusal is bisected until the refused records
  are alone (they go to the DLQ); an outage retries the whole batch with the same tokens. Writing runs
  in a writer thread (chDB and the HTTP client release the GIL) so that framing batch N+1 overlaps
  writing batch N. Every verdict of a batch is taken against the ``now`` fixed when it was read, so a
  retried write produces the same rows and the same dead letters.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from spendstream.core.codec import SINGLE_OBJECT_MAGIC, fingerprint
from spendstream.core.config import Settings
from spendstream.core.placement import NO_PLACEMENT, Placement
from spendstream.core.policy import Policy
from spendstream.core.pricing import EMPTY_TABLE, PriceTable
from spendstream.core.schemas import history_versions
from spendstream.core.topics import USAGE
from spendstream.sink.dead_letters import DeadLetter, DeadLetterPublisher, source_of
from spendstream.sink.decode import Rejected, UsageDecoder, columns_of, reason_kind
from spendstream.sink.ledger_writer import LedgerWriter, is_content_error, ledger_writer_for, refusal_reason
from spendstream.sink.staging import SCHEMA_NAME, AvroGroup, WriterVersion, split_by_writer

log = logging.getLogger(__name__)


# -- batch bookkeeping (pure) ------------------------------------------------------------------


def offset_ranges(partitions: Sequence[int], offsets: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Per partition, the (first, last) offset of a batch read in order (first and last seen)."""
    last = dict(zip(partitions, offsets, strict=True))
    first = dict(zip(reversed(partitions), reversed(offsets), strict=True))
    return {partition: (first[partition], offset) for partition, offset in last.items()}


def dedup_token(ranges: dict[int, tuple[int, int]], values: Iterable[bytes | None]) -> str:
    """Deterministic insert_deduplication_token of a batch: its sorted partition offset ranges and a digest of its
    records. The digest tells apart batches at the same offsets of different topic lives (the memory-only broker of
    `spendstream dev` numbers every restart from 0 again), which ClickHouse would otherwise drop as retries."""
    digest = hashlib.blake2b(digest_size=16)
    for value in values:
        digest.update(value or b"")
    ranges_text = ",".join(f"{p}:{first}-{last}" for p, (first, last) in sorted(ranges.items()))
    return f"usage:{ranges_text}:{digest.hexdigest()}"


def commit_positions(topic: str, ranges: dict[int, tuple[int, int]], owned: Iterable[int]) -> list[TopicPartition]:
    """Offsets to commit after a batch landed: ``last + 1`` for every partition still owned."""
    mine = set(owned)
    return [TopicPartition(topic, p, last + 1) for p, (_, last) in sorted(ranges.items()) if p in mine]


# -- the service ----------------------------------------------------------------------------


@dataclass
class SinkStats:
    consumed: int = 0
    inserted: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    commits: int = 0
    insert_retries: int = 0
    staged_rows: int = 0
    avro_fallbacks: int = 0
    superseded: int = 0  # copies of an event_id the ledger already held (first version wins), not inserted


@dataclass
class _Written:
    rows: int = 0
    staged_rows: int = 0  # rows that went through ClickHouse's Avro reader and SQL validation
    fallbacks: int = 0  # groups ClickHouse could not read, decoded in Python instead
    superseded: int = 0  # rows not inserted: the ledger holds their event_id's first version
    rejected: list[Rejected] = field(default_factory=list)  # index = position in the batch

    def add(self, rows: int, rejected: list[Rejected]) -> None:
        self.rows += rows
        self.rejected += rejected


@dataclass
class _Batch:
    ranges: dict[int, tuple[int, int]]
    messages: list[Message]
    now: datetime  # every verdict on this batch is taken against this moment, retries included
    groups: list[AvroGroup]
    python_records: list[dict[str, Any]]  # decoded in Python from the start (values no group takes)
    python_indices: list[int]  # their positions in the batch
    python_rejected: list[Rejected]
    token: str
    abandoned: threading.Event = field(default_factory=threading.Event)
    landed: Future[_Written | None] | None = None


class LedgerSink:
    """Consumes usage events in batches, inserts them into the ledger, then commits offsets.

    ``run()`` blocks until :meth:`stop` (also wired to SIGTERM/SIGINT by the CLI) and returns
    an exit code. ``client`` lets a caller own the ClickHouse connection (chDB allows one
    directory per process); by default the sink connects with ``ledger_store.connect``. The sink
    writes through the :class:`LedgerWriter` of that client's kind (``ledger_writer_for``).
    ``avro_fast_path=False`` decodes everything in Python (the reference the fast path is
    measured and tested against).
    """

    def __init__(
        self,
        settings: Settings,
        client: Any = None,
        stop_grace_s: float = 30.0,
        avro_fast_path: bool = True,
        prices: PriceTable = EMPTY_TABLE,
        placement: Placement = NO_PLACEMENT,
    ) -> None:
        self.settings = settings
        self.stats = SinkStats()
        self._client = client
        self._stop = threading.Event()
        self._stop_grace_s = stop_grace_s
        self._decoder = UsageDecoder(
            timedelta(seconds=settings.max_future_skew_s), settings.schema_registry_url, prices
        )
        self._decoder.placement = placement
        self._placed_sql = placement.select_sql()
        names = [SCHEMA_NAME, *history_versions(SCHEMA_NAME)] if avro_fast_path else []
        self._versions = {SINGLE_OBJECT_MAGIC + fingerprint(name): WriterVersion.of(name) for name in names}
        self._ledger: LedgerWriter | None = None
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

    def set_policy(self, policy: Policy) -> None:
        """From the next event on (a new policy in force), price events without ``cost_nanos`` with its prices, and
        fill the team, division and org an event does not name as it places them (``core.placement``)."""
        placement = Placement.of(policy)
        self._decoder.prices, self._decoder.placement = policy.price_table, placement
        self._placed_sql = placement.select_sql()

    def stop(self) -> None:
        """Ask the sink to finish the batch in hand, commit it, and return from ``run``."""
        self._stop.set()

    # -- lifecycle -------------------------------------------------------------------------

    def run(self, ready: Callable[[], None] | None = None) -> int:
        from spendstream.core.ledger_store import connect, migrate

        if self._client is None:
            self._client = connect(self.settings)
        self._ledger = ledger = ledger_writer_for(self.settings, self._client)
        # clickhouse-connect logs a traceback for every value it cannot serialise; the sink names the
        # refused record itself, once, after bisecting (see _insert_isolating).
        logging.getLogger("clickhouse_connect.driver.transform").setLevel(logging.CRITICAL)
        applied = migrate(self._client, self.settings)
        if applied:
            log.info("ledger migrations applied: %s", ", ".join(applied))
        ledger.open(staged=bool(self._versions))
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
        log.info("sink consuming %s as group %s into %s", USAGE, self.settings.sink_group, ledger.table)
        try:
            self._loop()
        finally:
            self._consumer.close()  # revokes: _on_revoke settles anything still pending
            self._dlq.close()
            self._writer.shutdown(wait=True, cancel_futures=False)
            ledger.close()
        log.info("sink stopped: %s", self._progress_line(0.0, 0))
        return 1 if self._failed else 0

    def _loop(self) -> None:
        assert self._consumer is not None
        batch_s = self.settings.sink_batch_ms / 1000
        last_log, logged_rows, logged_consumed = time.monotonic(), 0, 0
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
            if now - last_log >= 10:  # progress only while there is traffic: an idle sink stays quiet
                if self.stats.consumed != logged_consumed:
                    rows = self.stats.inserted - logged_rows
                    log.info("sink progress: %s", self._progress_line(now - last_log, rows))
                last_log, logged_rows, logged_consumed = now, self.stats.inserted, self.stats.consumed
        if self._pending is not None and not self._failed:
            self._settle(self._pending)
            self._pending = None

    def _progress_line(self, seconds: float, rows: int) -> str:
        s = self.stats
        rate = f"{rows:,} rows in {seconds:.0f}s, " if seconds else ""
        return (
            f"{rate}consumed {s.consumed:,}, inserted {s.inserted:,}, "
            f"dead-lettered {sum(s.dead_lettered.values()):,} {dict(s.dead_lettered)}, "
            f"copies skipped {s.superseded:,} (their event_id is in the ledger), "
            f"batches {s.batches:,}, commits {s.commits:,}"
        )

    # -- one batch -------------------------------------------------------------------------

    def _prepare(self, messages: list[Message]) -> _Batch | None:
        """Frame a consumed batch for ClickHouse by writer schema; decode the rest in Python."""
        good = messages
        if any(map(Message.error, messages)):  # per-message work stays in C unless something is wrong
            good = []
            for msg in messages:
                err = msg.error()
                if err is None:
                    good.append(msg)
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", err)
        if not good:
            return None
        ranges = offset_ranges(list(map(Message.partition, good)), list(map(Message.offset, good)))
        now = datetime.now(UTC)
        values = list(map(Message.value, good))
        arrivals = [message.timestamp()[1] for message in good]  # as the processor reads them (lateness)
        by_header, others = split_by_writer(values, self._versions)
        groups = [
            AvroGroup.of(
                self._versions[header],
                values if len(indices) == len(values) else [values[i] for i in indices],
                indices,
                arrivals if len(indices) == len(values) else [arrivals[i] for i in indices],
            )
            for header, indices in by_header.items()
        ]
        decoded = self._decoder.decode([values[i] for i in others], now, [arrivals[i] for i in others])
        rejected = [Rejected(others[r.index], r.stage, r.reason) for r in decoded.rejected]
        self.stats.consumed += len(good)
        return _Batch(
            ranges,
            good,
            now,
            groups,
            decoded.records,
            [others[i] for i in decoded.kept],
            rejected,
            dedup_token(ranges, values),
        )

    def _insert(self, batch: _Batch) -> _Written | None:
        """Write one batch, retrying with backoff until it lands, is abandoned, or the stop grace ends."""
        delay = 0.2
        stop_deadline: float | None = None
        while not batch.abandoned.is_set():
            try:
                return self._write(batch)
            except Exception as exc:  # any ClickHouse or transport error: the same batch is retried
                self.stats.insert_retries += 1
                log.warning("ledger write of %d values failed (retrying in %.1fs): %s", len(batch.messages), delay, exc)
            if self._stop.is_set():
                stop_deadline = stop_deadline or time.monotonic() + self._stop_grace_s
                if time.monotonic() >= stop_deadline:
                    return None
            batch.abandoned.wait(delay)
            delay = min(delay * 2, 10.0)
        return None

    def _write(self, batch: _Batch) -> _Written:
        """Every insert of a batch; each carries its own deduplication token, so a retry is idempotent."""
        written = _Written()
        for group in batch.groups:
            self._write_group(batch, group, written)
        written.add(0, batch.python_rejected)
        self._insert_isolating(batch.python_records, batch.python_indices, batch.token, written)
        return written

    def _write_group(self, batch: _Batch, group: AvroGroup, written: _Written) -> None:
        """ClickHouse reads and validates one writer schema's values; what it cannot judge goes to Python."""
        assert self._ledger is not None
        token = f"{batch.token}:{group.version.name}"
        try:
            judged = self._ledger.judge(group, batch.now, self._decoder.max_future_skew)
        except Exception as exc:  # a corrupt body fails the whole block; an outage fails the Python insert too
            log.info("ClickHouse could not read %s values, decoding them in Python: %s", group.version.name, exc)
            judged = None
        if judged is None:
            log.info(
                "%s values did not come back from ClickHouse in place, decoding them in Python", group.version.name
            )
            written.fallbacks += 1
            self._write_in_python(batch, group.indices, f"{token}:py", written)
            return
        count = len(group.indices)
        excluded = judged.exact | judged.rejected.keys()
        try:
            superseded = self._ledger.insert_staged(count, excluded, token, self._placed_sql)
        except Exception as exc:
            if not is_content_error(exc):
                raise
            log.warning("the ledger refused staged %s values, isolating them in Python: %s", group.version.name, exc)
            written.fallbacks += 1
            self._write_in_python(batch, group.indices, f"{token}:py", written)
            return
        rejected = [Rejected(group.indices[row], "validate", reason) for row, reason in judged.rejected.items()]
        written.add(count - len(excluded) - superseded, rejected)
        written.superseded += superseded
        written.staged_rows += count - len(judged.exact)
        if judged.exact:
            self._write_in_python(batch, [group.indices[row] for row in sorted(judged.exact)], f"{token}:py", written)

    def _write_in_python(self, batch: _Batch, indices: list[int], token: str, written: _Written) -> None:
        messages = [batch.messages[i] for i in indices]
        decoded = self._decoder.decode(
            [message.value() for message in messages], batch.now, [message.timestamp()[1] for message in messages]
        )
        written.add(0, [Rejected(indices[r.index], r.stage, r.reason) for r in decoded.rejected])
        self._insert_isolating(decoded.records, [indices[i] for i in decoded.kept], token, written)

    def _insert_isolating(
        self, records: list[dict[str, Any]], indices: list[int], token: str, written: _Written
    ) -> None:
        """Insert records; if the ledger refuses them for their content, bisect until the refused ones are alone.

        A refused record becomes a dead letter, everything else lands. Each part carries a token derived
        from its position, so a retry after an outage repeats the same parts and ClickHouse drops repeats.
        Failures that are not about content (an outage) propagate and the whole batch is retried.
        """
        if not records:
            return
        assert self._ledger is not None
        try:
            superseded = self._ledger.insert_rows(columns_of(records), token)
        except Exception as exc:
            if not is_content_error(exc):
                raise
            if len(records) == 1:
                log.warning("the ledger refuses one record for its content; it goes to the DLQ: %s", exc)
                written.add(0, [Rejected(indices[0], "insert", refusal_reason(exc))])
                return
            middle = len(records) // 2
            self._insert_isolating(records[:middle], indices[:middle], f"{token}<", written)
            self._insert_isolating(records[middle:], indices[middle:], f"{token}>", written)
            return
        written.add(len(records) - superseded, [])
        written.superseded += superseded

    def _settle(self, batch: _Batch, timeout: float | None = None) -> bool:
        """Wait for a batch's writes, then make its dead letters durable and commit its offsets."""
        assert batch.landed is not None and self._dlq is not None and self._consumer is not None
        try:
            written = batch.landed.result(timeout)
        except TimeoutError:
            written = None
        if written is None:
            batch.abandoned.set()
            if timeout is None:  # only the stop grace ends an unbounded wait
                log.error("giving up on an unwritten batch at shutdown; its offsets stay uncommitted")
                self._failed = True
            return False
        for rejected in written.rejected:
            msg = batch.messages[rejected.index]
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
        while not self._dlq.flush(5.0):
            log.warning("dead letters not yet acknowledged; offsets stay uncommitted until they are")
            if self._stop.is_set():
                self._failed = True
                return False
        self.stats.inserted += written.rows
        self.stats.superseded += written.superseded
        self.stats.staged_rows += written.staged_rows
        self.stats.avro_fallbacks += written.fallbacks
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

"""Follow ``spendstream.usage`` so routing sees what every gateway observed, not only this one.

A background thread reads the tail of the usage topic (every partition, from ``lookback_s`` ago; no consumer group
offsets are committed: each gateway reads the whole stream and keeps nothing) and feeds the decoded events into a
``SharedProviderStats`` in batches. The gateway takes its routing snapshots from that same object. Its own calls
are observed as it meters them; their records, which carry its Emitter's id in the ``spendstream.origin`` header,
are skipped here before decoding, so nothing is counted twice and a lone gateway decodes nothing. (Records of a
spool replayed by the same process carry the id too; a spool left by an earlier process is read under the new id
and counts like another gateway's calls.)

Where reading starts: ``offsets_for_times`` finds the first offset at or after the look-back start; a broker that
answers with an earlier offset is corrected by skipping records whose timestamp is older, before decoding them.
With a ClickHouse server as the ledger, the follower first loads the look-back's calls and the month's spend per
provider from the ledger, then counts only records produced after that query (the ledger up to then, the stream
after it; calls still on their way into the ledger at that moment are the only ones missed). The embedded ledger
(chDB) belongs to the sink process and is not read.

Partitions added to the topic while the follower runs are read after a restart.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, tzinfo
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from spendstream.core.codec import AvroCodec, DecodeError
from spendstream.core.config import Settings
from spendstream.core.topics import ORIGIN_HEADER, USAGE
from spendstream.edge.topic_follower import follow_with_retries, topic_partitions
from spendstream.gateway.provider_stats import ProviderStats, RoutingStats, feed, load_from_ledger

log = logging.getLogger(__name__)


def month_start(now: datetime, tz: tzinfo) -> datetime:
    """Start of the calendar month of ``now`` in ``tz`` (the gateway's provider budget period)."""
    return now.astimezone(tz).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


class SharedProviderStats(ProviderStats):
    """``ProviderStats`` that the follower thread feeds while the gateway's event loop takes snapshots."""

    def __init__(self, window_s: float = 900.0, reservoir_size: int = 512, period_start: datetime | None = None):
        super().__init__(window_s, reservoir_size, period_start)
        self._lock = threading.RLock()

    def observe(self, provider: str, model: str, at: float, latency_ms: int, failed: bool) -> None:
        with self._lock:
            super().observe(provider, model, at, latency_ms, failed)

    def add_spend(self, provider: str, occurred_at: datetime, cost_nanos: int | None) -> None:
        with self._lock:
            super().add_spend(provider, occurred_at, cost_nanos)

    def reset_spend(self, period_start: datetime, spend: Mapping[str, int] | None = None) -> None:
        with self._lock:
            super().reset_spend(period_start, spend)

    def snapshot(self, now: float) -> RoutingStats:
        with self._lock:
            return super().snapshot(now)

    def feed(self, records: Iterable[Mapping[str, Any]]) -> int:
        """A batch under one lock acquisition (the gateway waits for at most one batch per snapshot)."""
        with self._lock:
            return feed(self, records)

    def adopt(self, loaded: ProviderStats) -> None:
        """Take over the calls and spend of ``loaded`` (from ``load_from_ledger``), replacing what is held."""
        with self._lock:
            self._calls = loaded._calls
            self._spend = loaded._spend
            self.period_start = loaded.period_start


def ledger_is_server(dsn: str) -> bool:
    """Only a ClickHouse server may be read by the gateway; a chDB directory is owned by the sink process."""
    return not dsn.startswith("chdb://")


class UsageFollower:
    """Reads ``spendstream.usage`` from ``lookback_s`` ago into ``stats`` until stopped."""

    def __init__(
        self,
        settings: Settings,
        *,
        timezone: tzinfo = UTC,
        stats: SharedProviderStats | None = None,
        lookback_s: float | None = None,
        warm_from_ledger: bool | None = None,
        batch_size: int = 2000,
        poll_timeout_s: float = 0.1,
        topic: str = USAGE,
        own_origin: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.own_origin = own_origin  # records with this ``spendstream.origin`` header are skipped (already observed)
        self.tz = timezone
        self.stats = stats or SharedProviderStats(period_start=month_start(datetime.now(UTC), timezone))
        self.lookback_s = self.stats.window_s if lookback_s is None else lookback_s
        if self.lookback_s <= 0:
            raise ValueError("lookback_s must be positive")
        self.warm_from_ledger = ledger_is_server(settings.ledger_dsn) if warm_from_ledger is None else warm_from_ledger
        self.batch_size = batch_size
        self.poll_timeout_s = poll_timeout_s
        self.topic = topic
        self.counts: Counter[str] = Counter()  # fed, own, skipped_old, bad_records, errors, ledger_warmups
        self._codec = AvroCodec("usage_event", settings.schema_registry_url)
        self._conf = {
            **settings.kafka_client_config(),
            "group.id": f"spendstream-usage-follower-{uuid.uuid4().hex}",  # never committed: offsets live here
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "latest",
            "fetch.wait.max.ms": 100,
        }
        self._stop = threading.Event()
        self._assigned = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> UsageFollower:
        self._thread = threading.Thread(target=self._run, name="spendstream-usage-follower", daemon=True)
        self._thread.start()
        return self

    def wait_assigned(self, timeout: float) -> bool:
        """True once every partition is assigned (records produced from then on will be read)."""
        return self._assigned.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> UsageFollower:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the consumer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        since_ms = int((time.time() - self.lookback_s) * 1000)
        if self.warm_from_ledger:
            since_ms = self._warm_up(since_ms)
        follow_with_retries(self._conf, lambda consumer: self._follow(consumer, since_ms), self._stop, self._on_error)

    def _on_error(self, exc: KafkaException) -> None:
        self.counts["errors"] += 1
        log.warning("usage follower: %s; retrying", exc)

    def _warm_up(self, since_ms: int) -> int:
        """Load the look-back from the ledger; returns the timestamp from which stream records count."""
        from spendstream.core.ledger_store import connect

        queried_ms = int(time.time() * 1000)
        try:
            client = connect(self.settings)
            try:
                loaded = load_from_ledger(
                    client,
                    self.settings.clickhouse_database,
                    max(1, math.ceil(self.lookback_s / 60)),
                    month_start(datetime.now(UTC), self.tz),
                    self.stats.reservoir_size,
                )
            finally:
                client.close()
        except Exception as exc:  # the stream alone still serves: routing must not wait on the ledger
            self.counts["errors"] += 1
            log.warning("usage follower: ledger warm-up failed (%s); reading the stream only", type(exc).__name__)
            return since_ms
        self.stats.adopt(loaded)
        self.counts["ledger_warmups"] += 1
        return queried_ms

    def _follow(self, consumer: Consumer, since_ms: int) -> None:
        partitions = topic_partitions(consumer, self.topic, self._stop)
        if partitions is None:
            return
        found = consumer.offsets_for_times([TopicPartition(self.topic, p, since_ms) for p in partitions], timeout=10)
        consumer.assign(
            [TopicPartition(self.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END) for tp in found]
        )
        self._assigned.set()
        while not self._stop.is_set():
            messages = consumer.consume(num_messages=self.batch_size, timeout=self.poll_timeout_s)
            if messages:
                self.stats.feed(self._decode(messages, since_ms))

    def _decode(self, messages: list[Any], since_ms: int) -> list[dict[str, Any]]:
        records = []
        own = (ORIGIN_HEADER, self.own_origin) if self.own_origin is not None else None
        skipped_own = 0
        for msg in messages:
            if msg.error() is not None or msg.value() is None:
                continue
            if own is not None and own in (msg.headers() or ()):
                skipped_own += 1
                continue
            kind, at_ms = msg.timestamp()
            if kind and at_ms < since_ms:  # kind 0: the broker gave no timestamp, so the record counts
                self.counts["skipped_old"] += 1
                continue
            try:
                records.append(self._codec.decode(msg.value()))
            except DecodeError as exc:  # the sink sends it to the DLQ; here it is only not counted
                self.counts["bad_records"] += 1
                log.debug("usage follower: undecodable record at %s/%d: %s", msg.partition(), msg.offset(), exc)
        self.counts["fed"] += len(records)
        self.counts["own"] += skipped_own
        return records

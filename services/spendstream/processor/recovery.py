"""Getting a worker's state back: its tables read to the true end of their changelogs, or rebuilt from the ledger.

* faust restores the tables from their changelogs on start and rebalance, but stops at the high watermark the
  embedded broker reports, which is one record BATCH short (see ``read_to_end``). ``OwnChangelogs`` applies the
  rest (``complete_restore``) and then seals the partitions this worker writes: faust keeps applying records it
  fetched beyond the watermark AFTER recovery ended, and an old value would overwrite a newer one in memory.
* ``HorizonAdoption`` takes every ``partials`` ids record into its partition's dedup horizon as faust applies it,
  and the table keeps only ``adopted_ids`` of it: whole records (about 43 bytes per id) are never all in memory,
  so a restart or rebalance with a full horizon peaks near the worker's steady state.
* A source partition with no state at all is rebuilt from the ledger (``rebuild_from_ledger``; why it is
  exact: ``ledger_rebuild``).
* ``read_window_totals``/``read_scope_totals`` read the changelogs with a group-less consumer, whether or not a
  worker runs (``spendstream processor --dump-totals``, tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import faust
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from faust.types import TP

from spendstream.processor.applied_ids import AppliedIds, Spill
from spendstream.processor.checkpoint import BatchOutput, Checkpoint
from spendstream.processor.internal_seal import seal_headers
from spendstream.processor.internal_topics import (
    DEFAULT_APP_ID,
    PARTIALS_TOPIC,
    ForgetMessage,
    PartialsMessage,
    WindowPartial,
    changelog_topic,
    scope_chunks,
    stage2_partition,
)
from spendstream.processor.ledger_rebuild import (
    RebuildPlan,
    SpendSource,
    fold_snapshot,
    recent_since_ms,
    sink_positions,
)
from spendstream.processor.spend_accounting import (
    adopted_ids,
    is_adopted,
    is_clock_key,
    is_ids_key,
    split_ids_key,
    split_window_key,
    totals_from_partials,
    window_total,
)
from spendstream.processor.stage_one import StageOne
from spendstream.processor.usage_reader import usage_offsets

log = logging.getLogger(__name__)


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


def read_changelog(kafka_conf: dict[str, Any], topic: str, timeout: float) -> dict[str, Any]:
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


def read_window_totals(kafka_conf: dict[str, Any], app_id: str = DEFAULT_APP_ID, timeout: float = 15.0) -> dict:
    """Window totals ``{(scope, period, start_epoch_s): (nanos, requests, tokens)}`` from the stage-1 changelog.

    Reads the ``partials`` changelog to its end with a group-less consumer, so it works whether or not a
    processor is running, and sums the newest value of each (window, source partition).
    """
    latest = read_changelog(kafka_conf, changelog_topic(app_id, "partials"), timeout)
    return {split_window_key(k): v for k, v in totals_from_partials(latest).items()}


def read_scope_totals(kafka_conf: dict[str, Any], app_id: str = DEFAULT_APP_ID, timeout: float = 15.0) -> dict:
    """The same totals as stage 2 holds them (its ``windows`` changelog): what decisions were based on."""
    latest = read_changelog(kafka_conf, changelog_topic(app_id, "windows"), timeout)
    return {split_window_key(k): window_total(v) for k, v in latest.items() if not is_clock_key(k)}


Adopt = Callable[[str, Any], Any]  # (key, value or None) of a changelog record -> the value the table keeps


class HorizonAdoption:
    """The dedup horizons of the source partitions whose ``partials`` changelog faust restores here, built record
    by record as faust applies it (``take``), in the changelog's order: an ids record is adopted, a tombstone
    forgets its record (``AppliedIds.adopt``/``forget``). ``StageOne.restore`` then takes over the horizons of
    its partitions; they stay here, so a rebalance that keeps a partition (faust reads on from where it stopped)
    adds to the horizon the worker kept writing."""

    def __init__(self, horizon_ms: int, spill: Spill | None = None) -> None:
        self.horizon_ms = horizon_ms
        self.spill = spill
        self.horizons: dict[int, AppliedIds] = {}

    def take(self, key: str, value: Any) -> Any:
        """The value the table keeps of a changelog record: ``adopted_ids`` of an ids record, else the value."""
        if not isinstance(key, str) or not is_ids_key(key):
            return value
        partition = split_ids_key(key)[0]
        if value is None:
            if (horizon := self.horizons.get(partition)) is not None:
                horizon.forget(key)
            return None
        if is_adopted(value):
            return value
        horizon = self.horizons.get(partition)
        if horizon is None:
            horizon = self.horizons[partition] = AppliedIds(self.horizon_ms, spill=self.spill)
        horizon.adopt(key, value)
        return adopted_ids(value)


class OwnChangelogs:
    """The changelog partitions this worker writes whose restore is complete (sealed): their tables ignore
    further changelog records from faust's recovery, because this worker's own writes are newer."""

    def __init__(self, kafka_conf: dict[str, Any], active_partitions: Callable[[faust.Table], list[int]]) -> None:
        self.kafka_conf = kafka_conf
        self.active_partitions = active_partitions
        self.sealed: set[TP] = set()
        self.adopters: dict[str, Adopt] = {}  # table name -> what its restored records pass through

    def guard(self, table: faust.Table, adopt: Adopt | None = None) -> None:
        """Make ``table`` drop the changelog records faust applies to a sealed partition, and keep ``adopt`` of
        the others (records are adopted before faust stores them, so a whole one is never kept)."""
        apply = table.apply_changelog_batch
        sealed = self.sealed
        if adopt is not None:
            self.adopters[table.name] = adopt

        def apply_unsealed(batch: Iterable[Any]) -> None:
            events = list(batch)
            kept = [event for event in events if event.message.tp not in sealed]
            if len(kept) < len(events):
                log.info("%s: ignored %d late changelog records", table.name, len(events) - len(kept))
            if adopt is not None:
                for event in kept:
                    event.value = adopt(event.key, event.value)
            apply(kept)

        table.apply_changelog_batch = apply_unsealed  # type: ignore[method-assign]

    def unseal_all(self) -> None:
        """A rebalance started: the next restore decides again which partitions are this worker's."""
        self.sealed.clear()

    async def complete_restore(self, table: faust.Table) -> None:
        """Apply the changelog records faust's recovery stops short of (see ``read_to_end``), then seal."""
        topic = table.changelog_topic.get_topic_name()
        partitions = self.active_partitions(table)
        adopt = self.adopters.get(table.name)

        def tail() -> list[tuple[int, Any, Any]]:
            consumer = Consumer({**self.kafka_conf, "group.id": f"{topic}-restore", "enable.auto.commit": False})
            try:
                return list(read_to_end(consumer, topic, partitions, 60.0, last_batch_only=True))
            finally:
                consumer.close()

        for _, key, value in await asyncio.to_thread(tail):
            if adopt is not None:
                value = adopt(key, value)
            if value is None:
                table.data.pop(key, None)
            else:
                table.data[key] = value
        self.sealed.update(TP(topic, partition) for partition in self.active_partitions(table))


def rebuild_from_ledger(
    stage: StageOne,
    empty: list[int],
    out: BatchOutput,
    *,
    kafka_conf: dict[str, Any],
    spend_source: SpendSource,
    sink_group: str,
    usage_group: str,
    dedup_horizon: timedelta,
) -> dict[int, int]:
    """Write the windows and recent ids of source partitions without state from the ledger (``ledger_rebuild``)
    as partials at the ledger sink's committed offsets, commit those offsets as stage 1's position once all of it
    is confirmed, and return where stage 1 reads each partition from."""
    read_at = time.time()
    positions = sink_positions(kafka_conf, sink_group, empty)
    holder = stage.holder
    policy, now_s = holder.policy, int(time.time())
    skew_s = int(stage.max_future_skew.total_seconds())
    plan = RebuildPlan(now_s, holder.lateness_s, holder.retention, holder.calendar, policy.timezone, skew_s)
    try:
        snapshot = spend_source(plan.query(recent_since_ms(read_at, now_s, dedup_horizon)))
    except Exception:
        log.error("cannot read the ledger: windows of partitions %s start from zero", empty, exc_info=True)
        return {}
    windows, recent = fold_snapshot(snapshot, policy, plan, stage.partitions, empty)
    now_ms = now_s * 1000
    by_target: dict[tuple[int, int], dict[str, list[WindowPartial]]] = {}  # (source, internal partition) -> scopes
    for p in empty:
        start = max(positions.get(p, -1), 0)
        for scope, entries in stage.seed(p, windows[p], recent[p], start, now_ms).items():
            by_target.setdefault((p, stage2_partition(scope, stage.partitions)), {})[scope] = entries
        log.info(
            "partition %d rebuilt from the ledger: %d windows, %d recent ids, reading from offset %d",
            p, len(windows[p]), len(recent[p]), start,
        )  # fmt: skip
    for source in empty:  # what stage 2 still holds of these partitions goes first (``ForgetMessage``)
        forget = ForgetMessage(source).encode()
        for target in range(stage.partitions):
            out.send(PARTIALS_TOPIC, None, forget, target, seal_headers(stage.seal, target, forget))
    for (source, target), scopes in by_target.items():
        for chunk in scope_chunks(scopes):
            value = PartialsMessage(source, now_s, now_ms, chunk).encode()
            out.send(PARTIALS_TOPIC, None, value, target, seal_headers(stage.seal, target, value))

    def commit(committed: Mapping[int, int]) -> None:
        consumer = Consumer({**kafka_conf, "group.id": usage_group, "enable.auto.commit": False})
        try:
            consumer.commit(offsets=usage_offsets(committed), asynchronous=False)
        finally:
            consumer.close()

    checkpoint = Checkpoint(out, commit)
    for p in empty:
        if positions.get(p, -1) >= 0:
            checkpoint.store_offset(p, positions[p])
    checkpoint.commit()
    return {p: positions[p] if positions.get(p, -1) >= 0 else OFFSET_BEGINNING for p in empty}

"""Stage 1's hot loop: a plain confluent-kafka consumer on the usage partitions faust assigned to this worker.

Measured on the build machine (``bench/bench_faust_baseline.py``): faust's stream moves ~11-12k usage events/s
through one worker, whatever the agent does, while a plain confluent-kafka consumer decodes ~100k/s. So the
usage topic is read here, without group membership, from the offsets committed to ``usage_group(app_id)``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from itertools import groupby
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from spendstream.core.metrics import PROCESSOR_BATCH_SECONDS, PROCESSOR_CONSUMED
from spendstream.core.topics import USAGE
from spendstream.processor.checkpoint import Checkpoint, Flushable

log = logging.getLogger(__name__)

FETCH_MAX_WAIT_MS = 50  # the embedded broker holds a fetch that found no data for the whole wait
PREFETCH_KBYTES = 16_384  # usage events fetched ahead of stage 1 (librdkafka's default, 64 MB, was a sixth of RSS)


def usage_group(app_id: str) -> str:
    """The consumer group whose committed usage offsets are stage 1's progress (and its lag)."""
    return f"{app_id}-usage"


def usage_offsets(positions: Mapping[int, int]) -> list[TopicPartition]:
    return [TopicPartition(USAGE, partition, offset) for partition, offset in positions.items()]


def by_partition(messages: list[Message]) -> dict[int, list[Message]]:
    """A consumed batch split by partition, each in offset order; errors are logged and left out. Grouped by a sort
    on ``Message.partition`` (stable, and mostly runs already) rather than a Python loop per message."""
    if any(map(Message.error, messages)):
        for message in messages:
            if message.error():
                log.warning("usage consumer: %s", message.error())
        messages = [message for message in messages if not message.error()]
    messages.sort(key=Message.partition)
    return {partition: list(group) for partition, group in groupby(messages, key=Message.partition)}


class UsageReader:
    """Stage 1's consumer, in a thread of its own (the event loop stays free for faust and stage 2).

    Each round reads up to ``batch_size`` times the number of partitions events, from whichever partitions
    librdkafka has them for (one partition may fill a round; a partition's batch writes each touched window once,
    so bigger batches mean fewer changelog records per event), hands every partition's events to ``process`` in
    offset order, then commits a ``Checkpoint``: ``output`` must confirm everything written before
    the next offsets are committed to ``usage_group``. Anything that goes wrong ends the process (``os._exit``),
    because its in-memory table may hold values whose changelog records were not confirmed; a restart restores
    from the changelog and replays from the committed offsets.
    """

    def __init__(
        self,
        kafka_conf: dict[str, Any],
        group: str,
        batch_size: int,
        wait_s: float,
        process: Callable[[int, list[Message]], None],
        output: Flushable,
    ) -> None:
        self._conf = {
            **kafka_conf,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.wait.max.ms": FETCH_MAX_WAIT_MS,
            # librdkafka prefetches up to 64 MB by default; ~2 rounds of batches keep the thread busy as well
            "queued.max.messages.kbytes": PREFETCH_KBYTES,
        }
        self._batch_size = batch_size
        self._wait_s = wait_s
        self._process = process
        self._output = output
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
            checkpoint = Checkpoint(
                self._output, lambda positions: consumer.commit(offsets=usage_offsets(positions), asynchronous=True)
            )
            consumed, seconds = PROCESSOR_CONSUMED.labels("usage"), PROCESSOR_BATCH_SECONDS.labels("usage")
            while not self._stopping.is_set():
                batch = by_partition(consumer.consume(self._batch_size * len(partitions), self._wait_s))
                if not batch:
                    continue
                started = time.perf_counter()
                for partition, messages in batch.items():
                    self._process(partition, messages)
                    checkpoint.store_offset(partition, messages[-1].offset() + 1)
                checkpoint.commit()
                consumed.inc(sum(len(messages) for messages in batch.values()))  # metrics once per batch
                seconds.observe(time.perf_counter() - started)
            if checkpoint.committed:
                consumer.commit(offsets=usage_offsets(checkpoint.committed), asynchronous=False)
            consumer.close()
        except Exception:
            self._die()

    @staticmethod
    def _die() -> None:
        log.critical("stage 1 failed; exiting so that a restart recovers from the changelog", exc_info=True)
        logging.shutdown()
        os._exit(70)

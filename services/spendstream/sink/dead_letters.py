"""Publish bad input to the dead-letter topic, losing nothing (docs/architecture.md §3, §7.3).

A dead letter keeps the original key and the original bytes as its value, so it can be
inspected and replayed as it arrived; the headers say why (``spendstream.dlq.reason``),
where it came from (``spendstream.dlq.source`` = ``topic/partition/offset``) and which
step refused it (``spendstream.dlq.stage``, e.g. ``decode`` or ``validate``).

A consumer that dead-letters a message may commit its offset only once the dead letter
is on the broker: call :meth:`DeadLetterPublisher.flush` and commit only if it returns True.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from spendstream.core.topics import DLQ_REASON_HEADER, DLQ_SOURCE_HEADER, DLQ_STAGE_HEADER, USAGE_DLQ


@dataclass(frozen=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    reason: str
    source: str
    stage: str

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            (DLQ_REASON_HEADER, self.reason.encode()),
            (DLQ_SOURCE_HEADER, self.source.encode()),
            (DLQ_STAGE_HEADER, self.stage.encode()),
        ]


def source_of(topic: str, partition: int, offset: int) -> str:
    return f"{topic}/{partition}/{offset}"


def dlq_headers(headers: Sequence[tuple[str, bytes | None]] | None) -> dict[str, str]:
    """A dead letter's spendstream headers as text (for tools and tests that read the DLQ)."""
    return {name: (value or b"").decode() for name, value in headers or () if name.startswith("spendstream.dlq.")}


class DeadLetterPublisher:
    """Asynchronous dead-letter producer that re-sends whatever the broker refused until it lands."""

    def __init__(self, kafka_config: dict[str, Any], topic: str = USAGE_DLQ) -> None:
        self.topic = topic
        self._producer = Producer({**kafka_config, "acks": "all", "linger.ms": 5, "message.timeout.ms": 30_000})
        self._lock = threading.Lock()
        self._unsent: list[DeadLetter] = []
        self._in_flight = 0
        self.published = 0

    def publish(self, letter: DeadLetter) -> None:
        """Queue one dead letter (never blocks for long: a full local queue is drained first)."""
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    value=letter.value,
                    key=letter.key,
                    headers=letter.headers(),
                    on_delivery=lambda err, msg, letter=letter: self._delivered(err, msg, letter),
                )
                break
            except BufferError:
                self._producer.poll(0.1)
        with self._lock:
            self._in_flight += 1
        self._producer.poll(0)

    def _delivered(self, err: KafkaError | None, _msg: Message, letter: DeadLetter) -> None:
        with self._lock:
            self._in_flight -= 1
            if err is None:
                self.published += 1
            else:
                self._unsent.append(letter)

    def flush(self, timeout: float) -> bool:
        """True once every dead letter published so far is acknowledged by the broker."""
        deadline = time.monotonic() + timeout
        while True:
            self._producer.flush(max(0.0, deadline - time.monotonic()))
            with self._lock:
                retry, self._unsent = self._unsent, []
                settled = not retry and self._in_flight == 0
            if settled:
                return True
            for letter in retry:
                self.publish(letter)
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def close(self, timeout: float = 10.0) -> bool:
        return self.flush(timeout)

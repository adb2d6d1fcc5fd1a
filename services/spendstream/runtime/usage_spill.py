"""Usage events the embedded broker still holds when ``dev`` stops, saved to disk and replayed at the next start.

The embedded broker keeps topics in memory only. When the sink could not write every usage event into
the ledger before shutdown, the events past its committed offsets are written to a spill file in the data
directory, byte for byte (key, value, headers, timestamp). The next ``dev`` start produces them again and
removes the file only once the broker acknowledged every one, so an interrupted replay is repeated (the
ledger keeps one row per ``event_id``), never lost.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition

from spendstream.core.topics import USAGE

SPILL_GLOB = "usage-spill-*.jsonl"


@dataclass(frozen=True)
class SpilledRecord:
    partition: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    timestamp_ms: int

    def to_line(self) -> str:
        return json.dumps(
            {
                "partition": self.partition,
                "key": _b64(self.key),
                "value": _b64(self.value),
                "headers": [[name, _b64(value)] for name, value in self.headers],
                "timestamp_ms": self.timestamp_ms,
            }
        )

    @classmethod
    def from_line(cls, line: str) -> SpilledRecord:
        data = json.loads(line)
        return cls(
            data["partition"],
            _unb64(data["key"]),
            _unb64(data["value"]),
            [(name, _unb64(value)) for name, value in data["headers"]],
            data["timestamp_ms"],
        )

    @classmethod
    def of(cls, message: Message) -> SpilledRecord:
        return cls(
            message.partition(), message.key(), message.value(), list(message.headers() or []), message.timestamp()[1]
        )


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def unconsumed_usage(consumer: Consumer, timeout: float) -> tuple[list[Message], bool]:
    """Usage records past the consumer's group's committed offsets, read to the end; and whether every partition was.

    Records are counted by reading them: the embedded broker's high watermark can lag behind what it holds.
    The consumer needs ``enable.partition.eof``; it is closed on return.
    """
    try:
        partitions = consumer.list_topics(USAGE, timeout=5).topics[USAGE].partitions
        committed = consumer.committed([TopicPartition(USAGE, p) for p in partitions], timeout=5)
        consumer.assign(
            [TopicPartition(USAGE, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING) for tp in committed]
        )
        unread: list[Message] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(partitions) and time.monotonic() < deadline:
            for message in consumer.consume(10_000, timeout=0.5):
                if message.error() is None:
                    unread.append(message)
                    at_end.discard(message.partition())
                elif message.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
        return unread, len(at_end) == len(partitions)
    finally:
        consumer.close()


def write_spill(data_dir: Path, records: list[SpilledRecord]) -> Path:
    """Write records to a new spill file atomically (a crash leaves the whole file or none)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = data_dir / f"usage-spill-{stamp}.jsonl"
    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as out:
        out.writelines(record.to_line() + "\n" for record in records)
        out.flush()
        os.fsync(out.fileno())
    partial.replace(path)
    return path


def spill_files(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob(SPILL_GLOB))


def read_spill(path: Path) -> Iterator[SpilledRecord]:
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield SpilledRecord.from_line(line)


def replay_spill(path: Path, producer: Producer, partitions: int) -> int:
    """Produce a spill file's records to the usage topic; remove the file once every one is acknowledged.

    Raises RuntimeError (the file stays) when the broker refuses or does not acknowledge a record.
    """
    failures: list[str] = []
    count = 0
    for record in read_spill(path):
        placement = {"partition": record.partition} if record.partition < partitions else {}
        while True:
            try:
                producer.produce(
                    USAGE,
                    value=record.value,
                    key=record.key,
                    headers=record.headers,
                    timestamp=record.timestamp_ms,
                    on_delivery=lambda err, _msg: failures.append(str(err)) if err else None,
                    **placement,
                )
                break
            except BufferError:
                producer.poll(0.1)
        count += 1
    if producer.flush(30) or failures:
        raise RuntimeError(f"could not replay {path}: {failures[:1] or 'the broker did not acknowledge'}; kept it")
    path.unlink()
    return count

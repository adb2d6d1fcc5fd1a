"""Test helpers shared by the edge tests: the stub LLM upstream, decision publishing, polling."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from confluent_kafka import Producer

from spendstream.core.codec import AvroCodec
from spendstream.core.events import Decision, Heartbeat
from spendstream.core.record_signature import RecordSigner
from spendstream.core.topics import ENFORCEMENT
from spendstream.gateway.stub_upstream import StubUpstream

__all__ = ["StubUpstream", "heartbeating", "publish_decisions", "publish_heartbeat", "wait_for"]


def publish_decisions(
    bootstrap: str, decisions: Iterable[Decision | tuple[str, None]], signer: RecordSigner | None = None
) -> None:
    """Publish decisions (or ``(scope, None)`` tombstones) keyed by scope, as the processor does (signed by
    ``signer``, as a processor with a signing key does)."""
    codec = AvroCodec("decision")
    producer = Producer({"bootstrap.servers": bootstrap})
    for item in decisions:
        if isinstance(item, Decision):
            key, value = item.scope.encode(), codec.encode(item.to_avro())
        else:
            key, value = item[0].encode(), None
        headers = signer.headers(ENFORCEMENT, key, value) if signer is not None else None
        producer.produce(ENFORCEMENT, key=key, value=value, headers=headers)
    assert producer.flush(10) == 0, "decisions not delivered"


def publish_heartbeat(
    bootstrap: str, policy_version: str = "", issued_at: datetime | None = None, signer: RecordSigner | None = None
) -> None:
    """A processor heartbeat, as a live worker publishes it every second."""
    beat = Heartbeat(worker="test-processor", policy_version=policy_version, issued_at=issued_at or datetime.now(UTC))
    producer = Producer({"bootstrap.servers": bootstrap})
    key, value = b"heartbeat:test-processor", AvroCodec("heartbeat").encode(beat.to_avro())
    headers = signer.headers(ENFORCEMENT, key, value) if signer is not None else None
    producer.produce(ENFORCEMENT, key=key, value=value, headers=headers)
    assert producer.flush(10) == 0, "heartbeat not delivered"


@contextmanager
def heartbeating(bootstrap: str, interval_s: float = 0.2) -> Iterator[None]:
    """Heartbeats every ``interval_s`` while the block runs, like a live processor (delivery not awaited)."""
    stop = threading.Event()
    producer = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 2000})
    codec = AvroCodec("heartbeat")

    def beat() -> None:
        while not stop.wait(interval_s):
            value = codec.encode(Heartbeat(worker="test-processor", interval_s=interval_s).to_avro())
            producer.produce(ENFORCEMENT, key=b"heartbeat:test-processor", value=value)
            producer.poll(0)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()

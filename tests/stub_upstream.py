"""Test helpers shared by the edge tests: the stub LLM upstream, decision publishing, polling."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from confluent_kafka import Producer

from spendstream.core.codec import AvroCodec
from spendstream.core.events import Decision
from spendstream.core.topics import ENFORCEMENT
from spendstream.gateway.stub_upstream import StubUpstream

__all__ = ["StubUpstream", "publish_decisions", "wait_for"]


def publish_decisions(bootstrap: str, decisions: Iterable[Decision | tuple[str, None]]) -> None:
    """Publish decisions (or ``(scope, None)`` tombstones) keyed by scope, as the processor does."""
    codec = AvroCodec("decision")
    producer = Producer({"bootstrap.servers": bootstrap})
    for item in decisions:
        if isinstance(item, Decision):
            producer.produce(ENFORCEMENT, key=item.scope.encode(), value=codec.encode(item.to_avro()))
        else:
            producer.produce(ENFORCEMENT, key=item[0].encode(), value=None)
    assert producer.flush(10) == 0, "decisions not delivered"


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()

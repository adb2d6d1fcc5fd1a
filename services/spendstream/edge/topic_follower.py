"""The consumer loop the edges share to follow a topic from a background thread without a consumer group.

The Enforcer (decisions), the edge policy follower and the gateway's usage follower each read one topic
into memory. What they have in common lives here: a consumer that is rebuilt after a broker error and
retried until asked to stop, and the wait for the topic's partitions to exist.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaException

log = logging.getLogger(__name__)


def follow_with_retries(
    conf: dict[str, Any],
    follow: Callable[[Consumer], None],
    stop: threading.Event,
    on_error: Callable[[KafkaException], None],
) -> None:
    """Run ``follow(consumer)`` until it returns or ``stop`` is set; a ``KafkaException`` is reported to
    ``on_error`` and retried a second later with the same consumer (librdkafka reconnects by itself)."""
    consumer: Consumer | None = None
    try:
        while not stop.is_set():
            try:
                if consumer is None:
                    consumer = Consumer(conf)
                follow(consumer)
                return
            except KafkaException as exc:
                on_error(exc)
                stop.wait(1.0)
    finally:
        if consumer is not None:
            consumer.close()


def topic_partitions(consumer: Consumer, topic: str, stop: threading.Event) -> list[int] | None:
    """The topic's partitions once the broker lists them (None if ``stop`` is set first)."""
    while not stop.is_set():
        try:
            meta = consumer.list_topics(topic, timeout=1).topics.get(topic)
        except KafkaException as exc:
            log.warning("%s metadata: %s", topic, exc)
            meta = None
        if meta is not None and meta.error is None and meta.partitions:
            return sorted(meta.partitions)
        stop.wait(1.0)
    return None

"""Processor heartbeats: ``heartbeat:<app_id>@<host>`` records on ``spendstream.enforcement``.

They are how the rest of the deployment knows a processor is alive and which policy it enforces: edges
(``Enforcer.staleness_s``) measure the time since the newest one, and ``spendstream policy apply`` waits for
one that carries the version it published; the value names the worker (``app_id@host:pid``). The key is never a
decision scope (``heartbeat`` is no dimension), so decision readers skip them by key. A worker that stops
cleanly deletes its key (a tombstone; a live worker on the same host writes it again within a second).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer

from spendstream.core.codec import AvroCodec
from spendstream.core.events import Heartbeat
from spendstream.core.policy import Policy
from spendstream.core.record_signature import RecordSigner, signature_headers
from spendstream.core.topics import ENFORCEMENT, HEARTBEAT_KEY_PREFIX


def worker_name(app_id: str) -> str:
    return f"{app_id}@{socket.gethostname()}:{os.getpid()}"


def heartbeat_key(app_id: str) -> bytes:
    """One key per app and host (not per process), so a worker restarted on the same host reuses its key and
    compaction keeps one record for it: the processor leaves no garbage on the compacted topic."""
    return HEARTBEAT_KEY_PREFIX + f"{app_id}@{socket.gethostname()}".encode()


class HeartbeatPublisher:
    """Publishes this worker's heartbeat with the policy ``current_policy()`` returns (never blocks)."""

    def __init__(
        self,
        kafka_conf: dict[str, Any],
        app_id: str,
        interval_s: float,
        current_policy: Callable[[], Policy],
        signer: RecordSigner | None = None,
    ) -> None:
        self.worker = worker_name(app_id)
        self._signer = signer
        self.key = heartbeat_key(app_id)
        self.interval_s = interval_s
        self._current_policy = current_policy
        self._codec = AvroCodec("heartbeat")
        self._producer = Producer({**kafka_conf, "linger.ms": 0})

    def beat(self) -> None:
        policy = self._current_policy()
        heartbeat = Heartbeat(
            worker=self.worker, policy_name=policy.name, policy_version=policy.version, interval_s=self.interval_s
        )
        self._produce(self._codec.encode(heartbeat.to_avro()))
        self._producer.poll(0)

    def close(self) -> None:
        """A clean stop: delete this worker's key, so compaction drops its heartbeats."""
        self._produce(None)
        self._producer.flush(5)

    def _produce(self, value: bytes | None) -> None:
        signed = signature_headers(self._signer, ENFORCEMENT, self.key, value)
        self._producer.produce(ENFORCEMENT, value, key=self.key, headers=signed)

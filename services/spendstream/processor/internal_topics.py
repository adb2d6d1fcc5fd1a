"""The processor's own topics, created before the worker starts.

Why up front: faust creates its internal topic and table changelogs itself, but only while the worker starts,
and stage 1's confluent-kafka producer writes to them with an explicit partition right after assignment. On a
loaded broker its metadata for a topic created a moment earlier could still be missing, and the produce failed
with ``_UNKNOWN_PARTITION``, ending the process. Creating the topics first and waiting until their metadata
lists every partition removes the race.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from spendstream.processor.checkpoint import json_value

DEFAULT_APP_ID = "spendstream-processor"
PARTIALS_TOPIC = "spendstream.processor.partials"
TABLES = ("partials", "windows", "scopes")  # faust table names of ``app.build_app``
ENTRIES_PER_MESSAGE = 2_000  # window totals in one message of a whole partition's windows (~150 KB of JSON)


def stage2_partition(scope: str, partitions: int) -> int:
    """Stable scope -> internal partition, so every window of a scope is evaluated by one stage-2 owner."""
    return zlib.crc32(scope.encode()) % partitions


class WindowPartial(NamedTuple):
    """One source partition's TOTAL of a window (``scope|period|start``), as stage 2 merges it."""

    window: str
    total_nanos: int
    requests: int
    tokens: int
    offset: int  # the last source offset the total includes: stage 2 keeps the highest


@dataclass(frozen=True)
class PartialsMessage:
    """What stage 1 (or a rebuild from the ledger) tells a stage-2 partition after a batch of one source partition.

    Wire format (JSON, unchanged since the first release): ``{"p": source partition, "at": newest occurred_at
    (epoch s), "w": the source partition's watermark (epoch ms), "s": {scope: [[window, total, requests, tokens,
    offset], ...]}}``.
    """

    source: int
    newest_event_s: int
    watermark_ms: int
    scopes: dict[str, list[WindowPartial]]

    def encode(self) -> bytes:
        return json_value({"p": self.source, "at": self.newest_event_s, "w": self.watermark_ms, "s": self.scopes})


def scope_chunks(scopes: dict[str, list[Any]], limit: int = ENTRIES_PER_MESSAGE) -> Iterator[dict[str, list[Any]]]:
    """Scopes with their window entries, in chunks of about ``limit`` entries: a rebuild from the ledger announces
    a whole partition's windows to stage 2 in messages far below the broker's size limit."""
    chunk: dict[str, list[Any]] = {}
    size = 0
    for scope, entries in scopes.items():
        if chunk and size + len(entries) > limit:
            yield chunk
            chunk, size = {}, 0
        chunk[scope] = entries
        size += len(entries)
    if chunk:
        yield chunk


@dataclass(frozen=True)
class ReevaluateMessage:
    """Asks a stage-2 partition to evaluate all its scopes again (a new policy is in force, a budget changed), and
    ``scopes`` of it even if it has seen no spend of them yet (a feature registered at $0 is shut off before its
    first call, not after a burst).

    Wire format: ``{"reevaluate": policy version}``, with ``"scopes": [...]`` when there are any.
    """

    policy_version: str
    scopes: tuple[str, ...] = ()

    def encode(self) -> bytes:
        named = {"scopes": list(self.scopes)} if self.scopes else {}
        return json_value({"reevaluate": self.policy_version, **named})


@dataclass(frozen=True)
class ForgetMessage:
    """Tells a stage-2 partition to drop what it holds of source partition ``source`` in every window: stage 1 is
    about to announce that partition rebuilt from the ledger, where an event may sit under another partition than
    the one it was read from (the ledger fills an org the event left out) and windows may be cut in a new timezone.
    Kept, the old share and the rebuilt one added up: after a timezone change a team's day read $2 of $1 spent.

    Wire format: ``{"forget": source partition}``.
    """

    source: int

    def encode(self) -> bytes:
        return json_value({"forget": self.source})


InternalMessage = PartialsMessage | ReevaluateMessage | ForgetMessage


def internal_message(value: dict[str, Any]) -> InternalMessage:
    """The typed form of a decoded internal-topic value."""
    if "forget" in value:
        return ForgetMessage(int(value["forget"]))
    if "reevaluate" in value:
        return ReevaluateMessage(value["reevaluate"], tuple(value.get("scopes", ())))
    scopes = {scope: [WindowPartial(*entry) for entry in entries] for scope, entries in value["s"].items()}
    return PartialsMessage(value["p"], value["at"], value.get("w", 0), scopes)


def changelog_topic(app_id: str, table: str) -> str:
    """faust's name for a table's changelog topic."""
    return f"{app_id}-{table}-changelog"


def internal_topics(app_id: str) -> dict[str, dict[str, str]]:
    """Every topic the processor writes besides the public ones, with its config (changelogs are compacted)."""
    compacted = {"cleanup.policy": "compact"}
    return {PARTIALS_TOPIC: {}, **{changelog_topic(app_id, table): compacted for table in TABLES}}


def ensure_internal_topics(kafka_conf: dict[str, Any], app_id: str, partitions: int, timeout: float = 60.0) -> None:
    """Create the missing internal topics and return once the broker's metadata shows all their partitions.

    Raises ``TimeoutError`` naming the topics still incomplete. Existing topics are left as they are.
    """
    admin = AdminClient(kafka_conf)
    wanted = internal_topics(app_id)
    existing = admin.list_topics(timeout=timeout).topics
    missing = [NewTopic(name, partitions, 1, config=config) for name, config in wanted.items() if name not in existing]
    if missing:
        for name, future in admin.create_topics(missing, operation_timeout=timeout).items():
            try:
                future.result(timeout)
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise RuntimeError(f"cannot create the processor topic {name}: {exc}") from exc
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        incomplete = [
            name
            for name in wanted
            if name not in topics or topics[name].error is not None or len(topics[name].partitions) < partitions
        ]
        if not incomplete:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"processor topics without metadata after {timeout:.0f}s: {', '.join(incomplete)}")
        time.sleep(0.2)

"""The ``notifications`` table: every notification's delivery state, the durable truth of the notifier.

A notification is recorded (``pending``) before the offsets of the record that caused it are committed, so a
crash between the two re-reads the record and ``record_new`` skips what is already there; every later state
(``failed`` with its attempts and last error, ``sent``, ``dead_letter``) replaces the earlier through
``revision``. A restarted notifier resumes every ``pending`` or ``failed`` row (``unfinished``).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

from spendstream.notifier.messages import Delivery

COLUMNS = [
    "notification_id", "source_id", "kind", "scope", "channel", "channel_kind", "audience", "title", "payload",
    "status", "attempts", "last_error", "created_at", "updated_at", "sent_at", "next_attempt_at", "revision",
]  # fmt: skip
STATUS_RANK = {"pending": 1, "failed": 2, "sent": 3, "dead_letter": 4}
STATUSES = tuple(STATUS_RANK)


def revision(delivery: Delivery) -> int:
    """Later in a notification's life is always larger: attempts first, then the status."""
    return delivery.attempts * 10 + STATUS_RANK[delivery.status]


class NotificationStore:
    """Reads and writes the table on a shared clickhouse-connect client (one call at a time)."""

    def __init__(self, client: Any, db: str) -> None:
        self.client = client
        self.db = db
        self._lock = threading.Lock()

    def _row(self, d: Delivery, now: datetime) -> list[Any]:
        return [
            d.notification_id, d.source_id, d.kind, d.scope, d.channel, d.channel_kind, list(d.audience), d.title,
            d.payload, d.status, d.attempts, d.last_error, d.created_at or now, now, d.sent_at, d.next_attempt_at,
            revision(d),
        ]  # fmt: skip

    def existing(self, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        with self._lock:
            rows = self.client.query(
                f"SELECT notification_id FROM {self.db}.notifications WHERE notification_id IN {{ids:Array(String)}}",
                parameters={"ids": ids},
            ).result_rows
        return {row[0] for row in rows}

    def has_source(self, source_id: str) -> bool:
        with self._lock:
            sql = f"SELECT count() FROM {self.db}.notifications WHERE source_id = {{s:String}}"
            rows = self.client.query(sql, parameters={"s": source_id}).result_rows
        return bool(rows[0][0])

    def record_new(self, deliveries: list[Delivery], now: datetime) -> list[Delivery]:
        """Insert the deliveries not recorded yet; returns them (the ones to deliver now)."""
        known = self.existing([d.notification_id for d in deliveries])
        fresh = [d for d in deliveries if d.notification_id not in known]
        for d in fresh:
            d.created_at = now
        self.write(fresh, now)
        return fresh

    def write(self, deliveries: list[Delivery], now: datetime | None = None) -> None:
        if not deliveries:
            return
        now = now or datetime.now(UTC)
        with self._lock:
            self.client.insert(
                f"{self.db}.notifications", [self._row(d, now) for d in deliveries], column_names=COLUMNS
            )

    def unfinished(self) -> list[Delivery]:
        """Every notification not yet sent nor given up: what a restarted notifier delivers."""
        with self._lock:
            rows = self.client.query(
                f"SELECT {', '.join(COLUMNS[:-1])} FROM {self.db}.notifications FINAL "
                "WHERE status IN ('pending', 'failed') ORDER BY created_at"
            ).result_rows
        return [_delivery(row) for row in rows]

    def listing(self, limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        """The newest notifications first, for the API, the dashboard and ``spendstream notifications list``."""
        return list_notifications(self.client, self.db, limit, status, self._lock)


def _delivery(row: tuple[Any, ...]) -> Delivery:
    values = dict(zip(COLUMNS, row, strict=False))
    return Delivery(
        notification_id=values["notification_id"],
        source_id=values["source_id"],
        kind=values["kind"],
        scope=values["scope"],
        channel=values["channel"],
        channel_kind=values["channel_kind"],
        audience=tuple(values["audience"]),
        title=values["title"],
        payload=values["payload"],
        status=values["status"],
        attempts=int(values["attempts"]),
        last_error=values["last_error"],
        created_at=_aware(values["created_at"]),
        sent_at=_aware(values["sent_at"]),
        next_attempt_at=_aware(values["next_attempt_at"]),
    )


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


LISTING_KEYS = (
    "created_at", "notification_id", "kind", "scope", "channel", "channel_kind", "audience", "status", "attempts",
    "last_error", "sent_at", "title",
)  # fmt: skip


def list_notifications(
    client: Any, db: str, limit: int = 50, status: str | None = None, lock: threading.Lock | None = None
) -> list[dict[str, Any]]:
    """Newest first; ``status`` one of pending, failed, sent, dead_letter (None: all)."""
    if status is not None and status not in STATUS_RANK:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    where = "WHERE status = {status:String}" if status else ""
    sql = (
        f"SELECT {', '.join(LISTING_KEYS)} FROM {db}.notifications FINAL {where} "
        "ORDER BY created_at DESC, notification_id LIMIT {limit:UInt32}"
    )
    params: dict[str, Any] = {"limit": limit, "status": status or ""}
    if lock is None:
        rows = client.query(sql, parameters=params).result_rows
    else:
        with lock:
            rows = client.query(sql, parameters=params).result_rows
    out = []
    for row in rows:
        item = dict(zip(LISTING_KEYS, row, strict=True))
        item["audience"] = list(item["audience"])
        for key in ("created_at", "sent_at"):
            item[key] = _aware(item[key])
        out.append(item)
    return out

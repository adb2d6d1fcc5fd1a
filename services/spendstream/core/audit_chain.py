"""The tamper-evident audit trail as pure functions (docs/architecture.md §7.9).

Each audit stream (decisions, alerts, policy versions, budget requests) is a hash chain: the record at position
``n`` (1, 2, ...) carries ``prev_hash`` (the hash of record ``n - 1``, zeros for the first) and
``record_hash = sha256(prev_hash | n | canonical(record))``, where ``canonical`` is sorted-key JSON of the record's
columns with times as UTC ISO strings to the microsecond, floats by ``repr`` and maps sorted. The ledger's audit
sink is the only writer of a stream (one topic partition each), so it computes the chain as it inserts.

``verify_chain`` replays a stream in position order and names the first record that does not fit: a modified
record (its hash differs from the recomputed one), a deleted record (a gap in positions, or a ``prev_hash`` that is
not the previous record's hash), a duplicated position. What a chain alone cannot show is the loss of its newest
records (a truncated tail looks like a shorter, intact chain) or a rewrite of a whole tail with fresh hashes: an
*anchor*, a (position, hash) kept outside the ledger (the sink publishes each stream's head to
``spendstream.audit.heads``), proves the chain still reaches that far with that hash.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

GENESIS = "0" * 64


def normalised(value: Any) -> Any:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): normalised(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normalised(v) for v in value]
    return value


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: the same for the values inserted and the values read back."""
    return json.dumps(normalised(record), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def link(prev_hash: str, position: int, record: Mapping[str, Any]) -> str:
    return hashlib.sha256(b"%s|%d|%s" % (prev_hash.encode(), position, canonical(record))).hexdigest()


@dataclass(frozen=True, slots=True)
class Head:
    """Where a stream's chain ends: its last position and that record's hash (position 0: empty)."""

    position: int = 0
    hash: str = GENESIS

    def next(self, record: Mapping[str, Any]) -> tuple[Head, str]:
        """The head after appending ``record``, and the ``prev_hash`` it is stored with."""
        position = self.position + 1
        return Head(position, link(self.hash, position, record)), self.hash


@dataclass(frozen=True, slots=True)
class ChainedRow:
    position: int
    record_id: str
    prev_hash: str
    record_hash: str
    record: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Break:
    """The first record of a stream that does not fit its chain."""

    stream: str
    position: int
    record_id: str
    problem: str
    expected: str
    found: str

    def __str__(self) -> str:
        return (
            f"{self.stream}: broken at position {self.position} (record {self.record_id}): {self.problem}; "
            f"expected {self.expected}, found {self.found}"
        )


@dataclass(frozen=True, slots=True)
class Verified:
    stream: str
    records: int
    head: Head


def verify_chain(stream: str, rows: Iterable[ChainedRow], anchor: Head | None = None) -> Verified | Break:
    """Replay ``rows`` (sorted by position) and return the verified head, or the first break."""
    head = Head()
    count = 0
    at_anchor: str | None = None
    for row in rows:
        expected_position = head.position + 1
        if row.position == head.position:
            return Break(stream, row.position, row.record_id, "a second record at this position", "one", "two")
        if row.position != expected_position:
            return Break(
                stream, expected_position, row.record_id,
                f"record {expected_position} is missing (deleted?): the next one present is at {row.position}",
                f"position {expected_position}", f"position {row.position}",
            )  # fmt: skip
        if row.prev_hash != head.hash:
            return Break(stream, row.position, row.record_id, "prev_hash is not the previous record's hash",
                         head.hash, row.prev_hash)  # fmt: skip
        recomputed = link(head.hash, row.position, row.record)
        if recomputed != row.record_hash:
            return Break(stream, row.position, row.record_id, "the record was modified after it was chained",
                         recomputed, row.record_hash)  # fmt: skip
        head = Head(row.position, row.record_hash)
        if anchor is not None and row.position == anchor.position:
            at_anchor = row.record_hash
        count += 1
    if anchor is not None and anchor.position > 0:
        found = at_anchor
        if found is None:
            return Break(stream, anchor.position, "-",
                         f"the anchored head is gone: the chain ends at {head.position} (records removed from the end)",
                         anchor.hash, "nothing")  # fmt: skip
        if found != anchor.hash:
            return Break(stream, anchor.position, "-", "the record at the anchored head was rewritten",
                         anchor.hash, found)  # fmt: skip
    return Verified(stream, count, head)

"""The event ids this API accepted lately, and a digest of each one's content: a copy with other content is told.

The ledger and the processor keep the first version of an event_id and dead-letter a copy with other content
(``conflicting_duplicate``), downstream and after the 202. A client that re-posted a corrected event got 202 and
never learned that its correction was dropped (a user session: $2.50 posted again as a correction of $0.0035, kept
at $0.0035). The 202 now lists such copies of what this process accepted lately. A copy of an event accepted
before this process started, or by another API process, is still only dead-lettered.
"""

from __future__ import annotations

from collections import OrderedDict
from hashlib import blake2b

from xxhash import xxh3_64_intdigest

from spendstream.core.events import UsageEvent

REMEMBERED = 200_000  # ids, about 150 bytes each


def identity(event: UsageEvent) -> bytes:
    """An event's identity in the ledger (org, team, event_id), in 16 bytes."""
    owner = f"{len(event.org)}:{event.org}{len(event.team)}:{event.team}".encode()
    return blake2b(owner + event.event_id.bytes, digest_size=16).digest()


def content(event: UsageEvent) -> int:
    """A digest of what an event says, but when: a retry without ``occurred_at`` is stamped anew at each arrival."""
    return xxh3_64_intdigest(event.model_dump_json(exclude={"occurred_at"}).encode())


class RecentEvents:
    """The newest ``size`` accepted events' identities and content digests, oldest forgotten first."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self.size = size
        self._digests: OrderedDict[bytes, int] = OrderedDict()

    def other_versions(self, events: list[UsageEvent]) -> list[int]:
        """The indices of ``events`` whose event_id was accepted earlier with other content."""
        digests = self._digests
        return [
            index
            for index, event in enumerate(events)
            if (known := digests.get(identity(event))) is not None and known != content(event)
        ]

    def remember(self, events: list[UsageEvent]) -> None:
        """Remember accepted events; a copy keeps the first version's digest, as the ledger keeps its row."""
        digests = self._digests
        for event in events:
            digests.setdefault(identity(event), content(event))
        while len(digests) > self.size:
            digests.popitem(last=False)

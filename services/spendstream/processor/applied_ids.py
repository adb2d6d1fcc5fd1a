"""The dedup horizon of one source partition: the event ids it applied recently, stored compactly.

Edges publish at least once, so stage 1 skips a copy of an event_id applied at ANOTHER offset within the
horizon (``spend_accounting`` explains why that keeps totals exact). At 30 k events/s a 15-minute horizon is
27 M ids. Dicts of ``bytes`` keys with the offset and content digest took 172 bytes per id (measured: 2 M ids,
344 MB). Here only the newest ids sit in such dicts (at most ``recent_limit``), older ones in runs: numpy
columns of 40 bytes per id (a 64-bit search key, the id's first half, offset, content digest, generation) sorted
by key and searched for a whole batch at once. The key is the xor of the id's halves, so key and first half
together are the whole id.
Runs are ordered by age and merged with their neighbour while it is not more than twice as large (at most
``max_run`` entries, which bounds the copy a merge makes), so a batch searches a few runs.

Expiry needs no search: every batch's new ids share a generation, the records that list them
(``ids#partition#first_offset``) expire oldest first, entries of expired generations read as absent, and a run
whose newest generation expired is dropped whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat
from typing import Any

import numpy as np

from spendstream.processor.spend_accounting import unpack_digests, unpack_ids

APPLY, COPY, CONFLICT = "apply", "copy", "conflict"
RECENT_LIMIT = 8_192  # ids kept in dicts before they move into a run (~2 MB; per source partition)
MAX_RUN = 4_194_304  # entries a merge may produce (168 MB of columns)


def _halves(ids: np.ndarray) -> np.ndarray:
    """The two 64-bit halves of each 16-byte id, one row per id."""
    return ids.view(np.uint64).reshape(-1, 2)


def _search_keys(ids: np.ndarray) -> np.ndarray:
    """A well-spread 64-bit key per 16-byte id (the xor of its halves: random bits of UUID v4 and v7 alike);
    equal keys of different ids are told apart by their first halves (key and first half give the second)."""
    halves = _halves(ids)
    return halves[:, 0] ^ halves[:, 1]


@dataclass
class _Run:
    """Entries sorted by search key; among equal ids (one live, older ones expired) the newest comes first."""

    keys: np.ndarray  # uint64
    firsts: np.ndarray  # uint64, the first half of each id
    offsets: np.ndarray  # int64
    digests: np.ndarray  # uint64, 0: unknown
    generations: np.ndarray  # int64
    newest_generation: int = field(init=False)

    def __post_init__(self) -> None:
        self.newest_generation = int(self.generations.max())

    def __len__(self) -> int:
        return len(self.keys)

    def nbytes(self) -> int:
        return sum(column.nbytes for column in (self.keys, self.firsts, self.offsets, self.digests, self.generations))

    @classmethod
    def of(cls, ids: list[bytes], offsets: list[int], digests: list[int], generations: np.ndarray) -> _Run:
        packed = np.frombuffer(b"".join(ids), dtype="S16")
        keys = _search_keys(packed)
        order = np.argsort(keys, kind="stable")
        return cls(
            keys[order],
            _halves(packed)[:, 0][order],
            np.array(offsets, dtype=np.int64)[order],
            np.array(digests, dtype=np.uint64)[order],
            generations[order],
        )

    def absorb(self, newer: _Run) -> _Run:
        """One run of both (``newer``'s entries before this run's equal keys)."""
        at = np.searchsorted(self.keys, newer.keys, side="left")
        return _Run(
            np.insert(self.keys, at, newer.keys),
            np.insert(self.firsts, at, newer.firsts),
            np.insert(self.offsets, at, newer.offsets),
            np.insert(self.digests, at, newer.digests),
            np.insert(self.generations, at, newer.generations),
        )


class AppliedIds:
    """The event ids one source partition applied within ``horizon_ms`` of arrival time, their offsets and
    content digests. Records are pruned oldest first, once the partition's newest arrival (Kafka timestamps, so
    a replay prunes alike) is more than the horizon past what it was when they were written."""

    def __init__(self, horizon_ms: int, recent_limit: int = RECENT_LIMIT, max_run: int = MAX_RUN) -> None:
        self.horizon_ms = horizon_ms
        self.recent_limit = recent_limit
        self.max_run = max_run
        self.newest_ms = 0
        self.records: dict[str, tuple[int, int]] = {}  # ids key -> (its newest arrival ms, generation)
        self._offsets: dict[bytes, int] = {}  # the newest ids (all live), in the order they were admitted
        self._digests: dict[bytes, int] = {}
        self._added: list[tuple[int, int]] = []  # (generation, ids it added to ``_offsets``), oldest first
        self._runs: list[_Run] = []  # oldest first
        self._generation = 0  # of the ids admitted last
        self._live = 0  # entries of older generations are expired

    def __len__(self) -> int:
        """Entries stored, expired ones not yet dropped included."""
        return len(self._offsets) + sum(len(run) for run in self._runs)

    def column_bytes(self) -> int:
        """Memory of the runs' columns (the dicts of the newest ids are bounded by ``recent_limit``)."""
        return sum(run.nbytes() for run in self._runs)

    def _in_runs(self, event_ids: list[bytes]) -> dict[bytes, tuple[int, int, int, int]]:
        """The live run entries of ``event_ids``: ``(offset, digest, run index, position)``."""
        if not self._runs or not event_ids:
            return {}
        wanted = np.frombuffer(b"".join(event_ids), dtype="S16")
        keys = _search_keys(wanted)
        firsts = _halves(wanted)[:, 0]
        order = np.argsort(keys)  # sorted needles: each binary search starts where the previous one ended
        sorted_keys = keys[order]
        found: dict[bytes, tuple[int, int, int, int]] = {}
        for index in range(len(self._runs) - 1, -1, -1):  # newest run first
            run = self._runs[index]
            at = np.searchsorted(run.keys, sorted_keys, side="left")
            inside = np.flatnonzero(at < len(run))
            same = inside[run.keys[at[inside]] == sorted_keys[inside]]
            for k in same.tolist():  # same key: usually the same id, applied before
                i = int(order[k])
                event_id = event_ids[i]
                if event_id in found:
                    continue
                j = int(at[k])
                while j < len(run) and run.keys[j] == keys[i]:
                    if run.firsts[j] == firsts[i] and run.generations[j] >= self._live:
                        found[event_id] = (int(run.offsets[j]), int(run.digests[j]), index, j)
                        break
                    j += 1
        return found

    def admit(self, entries: Iterable[tuple[bytes, int]]) -> list[bool]:
        """Which ``(event_id, offset)`` entries, in offset order, to apply: all but copies of an id applied at
        another offset. Admitted ids count as applied from now on (this batch's later copies are skipped).

        An id stored with the same offset is the same record replayed after a crash: it is admitted, and the
        per-key offsets of ``fold_batch`` decide which of its windows still need it.
        """
        return [verdict == APPLY for verdict in self.admit_versions((e, offset, 0) for e, offset in entries)]

    def admit_versions(self, entries: Iterable[tuple[bytes, int, int]]) -> list[str]:
        """``admit`` for ``(event_id, offset, content digest)``: APPLY, COPY (same content, or the first version's
        content unknown) or CONFLICT (another content under an id already applied: the first version wins)."""
        entries = list(entries)
        self._generation += 1
        earlier = self._in_runs([event_id for event_id, _, _ in entries])
        offsets, digests = self._offsets, self._digests
        before = len(offsets)
        verdicts: list[str] = []
        for event_id, offset, digest in entries:
            if earlier and event_id in earlier:
                first_offset, first_digest, index, position = earlier[event_id]
                if first_offset == offset:
                    if digest and not first_digest:
                        self._runs[index].digests[position] = digest
                        earlier[event_id] = (first_offset, digest, index, position)
                    verdicts.append(APPLY)
                else:
                    verdicts.append(CONFLICT if first_digest and digest and first_digest != digest else COPY)
                continue
            seen = offsets.setdefault(event_id, offset)
            if seen == offset:
                if digest:
                    digests.setdefault(event_id, digest)
                verdicts.append(APPLY)
                continue
            first = digests.get(event_id, 0)
            verdicts.append(CONFLICT if first and digest and first != digest else COPY)
        if len(offsets) > before:
            self._added.append((self._generation, len(offsets) - before))
        self._compact()
        return verdicts

    def first_offset(self, event_id: bytes) -> int | None:
        """The offset at which ``event_id`` was applied, if it is within the horizon."""
        found = self._offsets.get(event_id)
        if found is None and (earlier := self._in_runs([event_id])):
            found = earlier[event_id][0]
        return found

    def remember(self, key: str, value: Sequence[Any], entries: Iterable[tuple[bytes, int]] | None = None) -> None:
        """Adopt an ids record: just written (its ``entries`` admitted already) or restored from the changelog."""
        if entries is None:
            restored = unpack_ids(value)[1]
            digests = unpack_digests(value)
            self.admit_versions(
                (event_id, offset, digests[i] if i < len(digests) else 0)
                for i, (event_id, offset) in enumerate(restored)
            )
        self.records[key] = (int(value[0]), self._generation)
        self.newest_ms = max(self.newest_ms, int(value[0]))

    def expire(self) -> list[str]:
        """Forget the oldest records that fell behind the horizon; returns their keys (to delete)."""
        cutoff = self.newest_ms - self.horizon_ms
        gone: list[str] = []
        for key, (newest_ms, generation) in self.records.items():
            if newest_ms >= cutoff:
                break
            gone.append(key)
            self._live = max(self._live, generation + 1)
        for key in gone:
            del self.records[key]
        if gone:
            self._drop_expired()
        return gone

    def _drop_expired(self) -> None:
        live = self._live
        self._runs = [run for run in self._runs if run.newest_generation >= live]
        dead = sum(count for generation, count in self._added if generation < live)
        if dead:
            self._offsets = dict(islice(self._offsets.items(), dead, None))
            self._digests = {k: d for k, d in self._digests.items() if k in self._offsets}
            self._added = [(generation, count) for generation, count in self._added if generation >= live]

    def _compact(self) -> None:
        """Move the dicts' ids into a run once they hold ``recent_limit``; merge runs of similar size."""
        if len(self._offsets) < self.recent_limit:
            return
        ids = list(self._offsets)
        generations = np.repeat(
            np.array([g for g, _ in self._added], dtype=np.int64), [count for _, count in self._added]
        )
        digests = self._digests
        runs = self._runs
        runs.append(_Run.of(ids, list(self._offsets.values()), list(map(digests.get, ids, repeat(0))), generations))
        self._offsets, self._digests, self._added = {}, {}, []
        while len(runs) >= 2 and len(runs[-2]) <= 2 * len(runs[-1]) and len(runs[-2]) + len(runs[-1]) <= self.max_run:
            newer = runs.pop()
            runs[-1] = runs[-1].absorb(newer)

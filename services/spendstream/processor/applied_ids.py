"""The dedup horizon of one source partition: the event ids it applied recently, stored compactly, mostly on disk.

Edges publish at least once, so stage 1 skips a copy of an event_id applied at ANOTHER offset within the
horizon (``spend_accounting`` explains why that keeps totals exact). At 30 k events/s a 15-minute horizon is
27 M ids. Dicts of ``bytes`` keys with the offset and content digest took 172 bytes per id (measured: 2 M ids,
344 MB), numpy columns 40 bytes per id: 1.1 GB for a full horizon. So the newest ids sit in such dicts (at most
``recent_limit``), then in runs in memory: columns (a 64-bit search key, the id's first half, offset, content
digest, generation) sorted by key and searched for a whole batch at once. The key is the xor of the id's halves,
so key and first half together are the whole id. A run that reaches ``Spill.at`` entries moves to an unlinked
file (the page cache holds it, not the process) and keeps in memory only a blocked Bloom filter (12 bits per
entry: about 0.9 % of absent ids read a block) and every 64th key (where an id's block starts): 1.6 bytes per
id. Only an id the filter may hold costs a read (``os.pread`` of one 2.5 kB block): copies and the false
positives. The files are a cache: the horizon is rebuilt from the changelog's ids records on restart.
Runs are ordered by age and merged with their neighbour while it is not more than twice as large (disk runs
chunk by chunk, up to ``Spill.max_run`` entries, dropping expired entries), so a batch searches a few runs.

Expiry needs no search: every batch's new ids share a generation, the records that list them
(``ids#partition#first_offset``) expire oldest first, entries of expired generations read as absent, and a run
whose newest generation expired is dropped whole.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat
from pathlib import Path
from typing import Any

import numpy as np

from spendstream.processor.spend_accounting import unpack_digests, unpack_ids

APPLY, COPY, CONFLICT = "apply", "copy", "conflict"
RECENT_LIMIT = 8_192  # ids kept in dicts before they move into a run (~2 MB; per source partition)
SPILL_AT = 65_536  # entries of a run in memory (2.6 MB of columns) that move it to disk
MAX_RUN = 8_388_608  # entries a merge may produce (~4.5 min at 30 k/s: how long a run may outlive its ids)
ENTRY = np.dtype([("key", "<u8"), ("first", "<u8"), ("offset", "<i8"), ("digest", "<u8"), ("generation", "<i8")])
_DIGEST_AT = ENTRY.fields["digest"][1]
_MIX = np.uint64(0x9E3779B97F4A7C15)  # spreads keys that are not random (tests, non-UUID ids) over the filter
_PROBES = 5  # bits set per entry, all in one 64-bit word of the filter


@dataclass(frozen=True)
class Spill:
    """Where and how runs move to disk. ``directory`` None: the system's temporary directory."""

    directory: Path | None = None
    at: int = SPILL_AT
    max_run: int = MAX_RUN  # entries a merge may produce
    filter_bits: int = 12  # per entry
    sparse_every: int = 64  # keys of a disk run kept in memory: one per block read
    merge_chunk: int = 65_536  # entries read per file and step of a merge (2.6 MB)


def _halves(ids: np.ndarray) -> np.ndarray:
    """The two 64-bit halves of each 16-byte id, one row per id."""
    return ids.view(np.uint64).reshape(-1, 2)


def _search_keys(ids: np.ndarray) -> np.ndarray:
    """A well-spread 64-bit key per 16-byte id (the xor of its halves: random bits of UUID v4 and v7 alike);
    equal keys of different ids are told apart by their first halves (key and first half give the second)."""
    halves = _halves(ids)
    return halves[:, 0] ^ halves[:, 1]


class _Probes:
    """Where a batch of keys sits in any filter: a word chosen by the high 32 bits of the mixed key (scaled to
    the filter's size) and ``_PROBES`` bits of that word chosen by its low bits."""

    def __init__(self, keys: np.ndarray) -> None:
        mixed = keys * _MIX
        self.high = mixed >> np.uint64(32)
        mask = np.zeros(len(keys), dtype=np.uint64)
        for probe in range(_PROBES):
            mask |= np.uint64(1) << ((mixed >> np.uint64(6 * probe)) & np.uint64(63))
        self.mask = mask

    def words(self, size: int) -> np.ndarray:
        return (self.high * np.uint64(size)) >> np.uint64(32)


@dataclass
class _Run:
    """Entries sorted by search key, in memory; equal keys (one live id, older ones expired) in any order."""

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
        """One run of both."""
        at = np.searchsorted(self.keys, newer.keys, side="left")
        return _Run(
            np.insert(self.keys, at, newer.keys),
            np.insert(self.firsts, at, newer.firsts),
            np.insert(self.offsets, at, newer.offsets),
            np.insert(self.digests, at, newer.digests),
            np.insert(self.generations, at, newer.generations),
        )

    def entries(self) -> np.ndarray:
        table = np.empty(len(self), dtype=ENTRY)
        table["key"], table["first"], table["offset"] = self.keys, self.firsts, self.offsets
        table["digest"], table["generation"] = self.digests, self.generations
        return table

    def find(
        self, keys: np.ndarray, firsts: np.ndarray, _probes: _Probes, live: int
    ) -> list[tuple[int, int, int, int]]:
        """``(needle, position, offset, digest)`` of each live entry of the sorted needles ``keys``/``firsts``."""
        at = np.searchsorted(self.keys, keys, side="left")
        inside = np.flatnonzero(at < len(self))
        same = inside[self.keys[at[inside]] == keys[inside]]
        found = []
        for k in same.tolist():  # same key: usually the same id, applied before
            j = int(at[k])
            while j < len(self) and self.keys[j] == keys[k]:
                if self.firsts[j] == firsts[k] and self.generations[j] >= live:
                    found.append((k, j, int(self.offsets[j]), int(self.digests[j])))
                    break
                j += 1
        return found

    def set_digest(self, position: int, digest: int) -> None:
        self.digests[position] = digest


class _DiskRun:
    """A run in an unlinked file: in memory only its filter and every ``sparse_every``-th key."""

    def __init__(
        self, fd: int, length: int, sparse: np.ndarray, words: np.ndarray, newest_generation: int, every: int
    ) -> None:
        self._fd = fd
        self._length = length
        self._sparse = sparse
        self._words = words
        self._every = every
        self.newest_generation = newest_generation
        weakref.finalize(self, os.close, fd)

    def __len__(self) -> int:
        return self._length

    def nbytes(self) -> int:
        return self._sparse.nbytes + self._words.nbytes

    def read(self, start: int, stop: int) -> np.ndarray:
        size = ENTRY.itemsize
        return np.frombuffer(os.pread(self._fd, (stop - start) * size, start * size), dtype=ENTRY)

    def find(self, keys: np.ndarray, firsts: np.ndarray, probes: _Probes, live: int) -> list[tuple[int, int, int, int]]:
        words, mask = self._words[probes.words(len(self._words))], probes.mask
        maybe = np.flatnonzero(words & mask == mask)  # the ids this run may hold: copies and ~1 % others
        if not len(maybe):
            return []
        wanted = keys[maybe]
        # an id's equal keys lie from the block before the first block starting at or after it, to the last
        # block starting at or before it (one block unless a block starts with its key)
        starts = np.maximum(np.searchsorted(self._sparse, wanted, side="left") - 1, 0) * self._every
        stops = np.minimum(np.searchsorted(self._sparse, wanted, side="right") * self._every, self._length)
        stops = np.maximum(starts, stops)
        size = ENTRY.itemsize
        blocks = np.frombuffer(
            b"".join(
                os.pread(self._fd, (stop - start) * size, start * size)
                for start, stop in zip(starts.tolist(), stops.tolist(), strict=True)
            ),
            dtype=ENTRY,
        )
        owner = np.repeat(np.arange(len(maybe)), stops - starts)  # which wanted id each entry read is for
        hits = np.flatnonzero(
            (blocks["key"] == wanted[owner])
            & (blocks["first"] == firsts[maybe][owner])
            & (blocks["generation"] >= live)
        )
        positions = starts[owner[hits]] + hits - (np.cumsum(stops - starts) - (stops - starts))[owner[hits]]
        return [
            (int(maybe[o]), int(position), int(offset), int(digest))
            for o, position, offset, digest in zip(
                owner[hits].tolist(),
                positions.tolist(),
                blocks["offset"][hits].tolist(),
                blocks["digest"][hits].tolist(),
                strict=True,
            )
        ]

    def set_digest(self, position: int, digest: int) -> None:
        os.pwrite(self._fd, np.uint64(digest).tobytes(), position * ENTRY.itemsize + _DIGEST_AT)


class _DiskRunWriter:
    """Writes sorted entries to a new unlinked file, building its filter and sparse keys on the way."""

    def __init__(self, spill: Spill, capacity: int) -> None:
        fd, path = tempfile.mkstemp(prefix="horizon-", dir=spill.directory)
        os.unlink(path)  # nothing to clean up after a crash: the file goes with its descriptor
        self._fd = fd
        self._spill = spill
        self._words = np.zeros(max(1, -(-capacity * spill.filter_bits // 64)), dtype=np.uint64)
        self._sparse: list[np.ndarray] = []
        self._length = 0
        self._newest = -1

    def write(self, entries: np.ndarray) -> None:
        if not len(entries):
            return
        keys, every = entries["key"], self._spill.sparse_every
        self._sparse.append(keys[(-self._length) % every :: every].copy())
        probes = _Probes(keys)
        np.bitwise_or.at(self._words, probes.words(len(self._words)), probes.mask)
        data = memoryview(entries.tobytes())
        while data:
            data = data[os.write(self._fd, data) :]
        self._length += len(entries)
        self._newest = max(self._newest, int(entries["generation"].max()))

    def finish(self) -> _DiskRun | None:
        """The run written (None, file closed: no entry was)."""
        if not self._length:
            os.close(self._fd)
            return None
        sparse = np.concatenate(self._sparse)
        return _DiskRun(self._fd, self._length, sparse, self._words, self._newest, self._spill.sparse_every)


def _spilled(run: _Run, live: int, spill: Spill) -> _DiskRun | None:
    """``run``'s live entries on disk."""
    writer = _DiskRunWriter(spill, len(run))
    entries = run.entries()
    writer.write(entries[entries["generation"] >= live])
    return writer.finish()


def _interleaved(older: np.ndarray, newer: np.ndarray) -> np.ndarray:
    """One array of two arrays of entries sorted by key, still sorted (copied as rows of five 64-bit words, which
    numpy moves faster than records)."""
    at = np.searchsorted(older["key"], newer["key"]) + np.arange(len(newer))
    rows = np.empty((len(older) + len(newer), len(ENTRY)), dtype=np.uint64)
    from_newer = np.zeros(len(rows), dtype=bool)
    from_newer[at] = True
    rows[at] = np.ascontiguousarray(newer).view(np.uint64).reshape(-1, len(ENTRY))
    rows[~from_newer] = np.ascontiguousarray(older).view(np.uint64).reshape(-1, len(ENTRY))
    return rows.view(ENTRY).ravel()


def _merged(older: _DiskRun, newer: _DiskRun, live: int, spill: Spill) -> _DiskRun | None:
    """One disk run of the live entries of both, merged a chunk of each file at a time (bounded memory)."""
    writer = _DiskRunWriter(spill, len(older) + len(newer))
    chunk = spill.merge_chunk
    sources = [[older, 0, np.empty(0, dtype=ENTRY)], [newer, 0, np.empty(0, dtype=ENTRY)]]
    while True:
        for source in sources:
            run, read, pending = source
            if not len(pending) and read < len(run):
                source[2] = run.read(read, min(read + chunk, len(run)))
                source[1] = read + len(source[2])
        pendings = [pending for _, _, pending in sources]
        if not any(len(pending) for pending in pendings):
            return writer.finish()
        # up to the smallest last key of a file not read to its end: no unread entry sorts before it
        unread_limits = [pending["key"][-1] for run, read, pending in sources if read < len(run)]
        takes = [
            int(np.searchsorted(pending["key"], min(unread_limits), side="right")) if unread_limits else len(pending)
            for pending in pendings
        ]
        (olders, newers) = (pending[:take] for pending, take in zip(pendings, takes, strict=True))
        olders, newers = olders[olders["generation"] >= live], newers[newers["generation"] >= live]
        writer.write(_interleaved(olders, newers))
        for source, take in zip(sources, takes, strict=True):
            source[2] = source[2][take:]


class AppliedIds:
    """The event ids one source partition applied within ``horizon_ms`` of arrival time, their offsets and
    content digests. Records are pruned oldest first, once the partition's newest arrival (Kafka timestamps, so
    a replay prunes alike) is more than the horizon past what it was when they were written."""

    def __init__(self, horizon_ms: int, recent_limit: int = RECENT_LIMIT, spill: Spill | None = None) -> None:
        self.horizon_ms = horizon_ms
        self.spill = spill or Spill()
        self.recent_limit = min(recent_limit, self.spill.at)
        self.newest_ms = 0
        self.records: dict[str, tuple[int, int]] = {}  # ids key -> (its newest arrival ms, generation)
        self._offsets: dict[bytes, int] = {}  # the newest ids (all live), in the order they were admitted
        self._digests: dict[bytes, int] = {}
        self._added: list[tuple[int, int]] = []  # (generation, ids it added to ``_offsets``), oldest first
        self._runs: list[_Run | _DiskRun] = []  # oldest first
        self._generation = 0  # of the ids admitted last
        self._live = 0  # entries of older generations are expired
        self._behind: list[str] = []  # ids records read back from the changelog already behind the horizon

    def __len__(self) -> int:
        """Entries stored, expired ones not yet dropped included."""
        return len(self._offsets) + sum(len(run) for run in self._runs)

    def spilled(self) -> int:
        """Entries stored on disk."""
        return sum(len(run) for run in self._runs if isinstance(run, _DiskRun))

    def heap_bytes(self) -> int:
        """Memory of the runs: columns in memory, filters and sparse keys of those on disk (the dicts of the
        newest ids are bounded by ``recent_limit``)."""
        return sum(run.nbytes() for run in self._runs)

    def _in_runs(self, event_ids: list[bytes]) -> dict[bytes, tuple[int, int, int, int]]:
        """The live run entries of ``event_ids``: ``(offset, digest, run index, position)``."""
        if not self._runs or not event_ids:
            return {}
        wanted = np.frombuffer(b"".join(event_ids), dtype="S16")
        keys = _search_keys(wanted)
        order = np.argsort(keys)  # sorted needles: each binary search starts where the previous one ended
        sorted_keys, sorted_firsts = keys[order], _halves(wanted)[:, 0][order]
        probes = _Probes(sorted_keys)
        found: dict[bytes, tuple[int, int, int, int]] = {}
        for index in range(len(self._runs) - 1, -1, -1):  # newest run first
            for k, position, offset, digest in self._runs[index].find(sorted_keys, sorted_firsts, probes, self._live):
                found.setdefault(event_ids[int(order[k])], (offset, digest, index, position))
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
                        self._runs[index].set_digest(position, digest)
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

    def admit_new(self, event_ids: Sequence[bytes], offsets: Sequence[int], digests: Sequence[int]) -> bool:
        """``admit_versions`` for a batch whose ids are all new (none held, none twice, every digest known): all
        admitted at once by dict updates in C, where the usual batch spent ~0.5 us per event in a Python loop.
        False (nothing admitted) for any other batch: ``admit_versions`` then decides entry by entry."""
        held = self._offsets
        if (
            not event_ids
            or len(set(event_ids)) != len(event_ids)
            or not held.keys().isdisjoint(event_ids)
            or 0 in digests
            or self._in_runs(list(event_ids))
        ):
            return False
        self._generation += 1
        held.update(zip(event_ids, offsets, strict=True))
        self._digests.update(zip(event_ids, digests, strict=True))
        self._added.append((self._generation, len(event_ids)))
        self._compact()
        return True

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

    def adopt(self, key: str, value: Sequence[Any]) -> None:
        """Take in an ids record read back from the changelog, in the changelog's order (restore).

        A record already behind the horizon adds nothing: it is only deleted at the next ``expire`` (a worker that
        reads on from where it stopped reads again the records it wrote and expired since). A newer version of a
        record held (a batch replayed after a crash) adds its entries, all applied, and keeps the record's place
        and generation, so records still expire oldest first."""
        newest_ms = int(value[0])
        if newest_ms < self.newest_ms - self.horizon_ms:
            if key not in self.records:
                self._behind.append(key)
            return
        known = self.records.get(key)
        self.remember(key, value)
        if known is not None:
            self.records[key] = (max(known[0], newest_ms), known[1])

    def forget(self, key: str) -> None:
        """An ids record deleted in the changelog (restore): forget it and the entries of every generation older
        than the oldest record left (records are deleted oldest first; out of order, entries stay a while)."""
        if self.records.pop(key, None) is None:
            return
        oldest = next(iter(self.records.values()), None)
        self._live = max(self._live, self._generation + 1 if oldest is None else oldest[1])
        self._drop_expired()

    def expire(self) -> list[str]:
        """Forget the oldest records that fell behind the horizon; returns their keys (to delete)."""
        cutoff = self.newest_ms - self.horizon_ms
        gone: list[str] = self._behind
        self._behind = []
        for key, (newest_ms, generation) in self.records.items():
            if newest_ms >= cutoff:
                break
            gone.append(key)
            self._live = max(self._live, generation + 1)
        for key in gone:
            self.records.pop(key, None)
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
        """Move the dicts' ids into a run once they hold ``recent_limit``; merge runs of similar size, moving a
        run that reached ``spill.at`` entries to disk."""
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
        spill = self.spill
        while runs:
            newest = runs[-1]
            if isinstance(newest, _Run) and len(newest) >= spill.at:
                self._replace(1, _spilled(newest, self._live, spill))
                continue
            if len(runs) < 2 or len(runs[-2]) > 2 * len(newest):
                return
            older = runs[-2]
            if len(older) + len(newest) > spill.max_run:
                return
            if isinstance(older, _Run) and isinstance(newest, _Run):
                self._replace(2, older.absorb(newest))
            elif isinstance(older, _DiskRun) and isinstance(newest, _DiskRun):
                self._replace(2, _merged(older, newest, self._live, spill))
            else:
                return

    def _replace(self, count: int, run: _Run | _DiskRun | None) -> None:
        """Replace the newest ``count`` runs with ``run`` (None: with nothing, all their entries expired)."""
        del self._runs[-count:]
        if run is not None:
            self._runs.append(run)

"""The compact dedup horizon behaves exactly like the plain dict it replaces, across runs, spills to disk, merges
and expiry."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.processor.applied_ids import APPLY, CONFLICT, COPY, AppliedIds, Spill
from spendstream.processor.spend_accounting import (
    adopted_ids,
    ids_key,
    is_adopted,
    pack_ids,
    unpack_digests,
    unpack_ids,
)
from spendstream.processor.stage_one import SourcePartition, UsageItem, restore_sources


class DictIds:
    """The reference: every applied id in a dict, with its offset and content digest."""

    def __init__(self, horizon_ms: int) -> None:
        self.horizon_ms = horizon_ms
        self.offsets: dict[bytes, int] = {}
        self.digests: dict[bytes, int] = {}
        self.records: dict[str, tuple[int, list[tuple[bytes, int]]]] = {}
        self.newest_ms = 0

    def admit_versions(self, entries: Iterable[tuple[bytes, int, int]]) -> list[str]:
        verdicts = []
        for event_id, offset, digest in entries:
            seen = self.offsets.setdefault(event_id, offset)
            if seen == offset:
                if digest:
                    self.digests.setdefault(event_id, digest)
                verdicts.append(APPLY)
                continue
            first = self.digests.get(event_id, 0)
            verdicts.append(CONFLICT if first and digest and first != digest else COPY)
        return verdicts

    def remember(self, key: str, newest_ms: int, entries: list[tuple[bytes, int]]) -> None:
        self.records[key] = (newest_ms, entries)
        self.newest_ms = max(self.newest_ms, newest_ms)

    def expire(self) -> list[str]:
        cutoff = self.newest_ms - self.horizon_ms
        gone = []
        for key, (newest_ms, entries) in self.records.items():
            if newest_ms >= cutoff:
                break
            gone.append(key)
            for event_id, offset in entries:
                if self.offsets.get(event_id) == offset:
                    del self.offsets[event_id]
                    self.digests.pop(event_id, None)
        for key in gone:
            del self.records[key]
        return gone


# tiny limits: many runs in memory and on disk, merges of files chunk by chunk, blocks of 4 entries
TINY_SPILL = Spill(at=12, max_run=48, sparse_every=4, merge_chunk=7)
batches = st.lists(
    st.tuples(
        st.lists(st.tuples(st.integers(0, 40), st.sampled_from([0, 0, 7, 9])), min_size=1, max_size=12),
        st.integers(0, 400),  # arrival step (ms)
        st.booleans(),  # replay the previous batch's offsets (a restart from a lagging commit)
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(batches=batches, restore_at=st.integers(0, 40))
def test_compact_ids_agree_with_the_dict_through_runs_spills_merges_expiry_and_a_restore(
    batches: list[tuple[list[tuple[int, int]], int, bool]], restore_at: int
) -> None:
    compact = AppliedIds(1_000, recent_limit=5, spill=TINY_SPILL)  # tiny limits: many runs, merges and drops
    reference = DictIds(1_000)
    offset = arrival = 0
    previous: list[tuple[bytes, int, int]] = []
    table: dict[str, list[object]] = {}
    for step, (events, delay, replay) in enumerate(batches):
        arrival += delay
        if replay and previous:
            entries = previous
        else:
            entries = [(i.to_bytes(16, "big"), offset + n, digest) for n, (i, digest) in enumerate(events)]
            offset += len(events)
        previous = entries
        columns = [list(column) for column in zip(*entries, strict=True)]  # stage 1 tries ``admit_new`` first
        verdicts = [APPLY] * len(entries) if compact.admit_new(*columns) else compact.admit_versions(entries)
        assert verdicts == reference.admit_versions(entries)
        applied = [entry for entry, verdict in zip(entries, verdicts, strict=True) if verdict == APPLY]
        kept = [(event_id, at) for event_id, at, _ in applied]
        if kept:
            compact.newest_ms = max(compact.newest_ms, arrival)
            reference.newest_ms = max(reference.newest_ms, arrival)
            key = ids_key(0, kept[0][1])
            value = pack_ids(compact.newest_ms, kept, [digest for _, _, digest in applied])
            compact.remember(key, value, kept)
            reference.remember(key, reference.newest_ms, kept)
            table[key] = value
        gone = compact.expire()
        assert gone == reference.expire()
        for key in gone:
            table.pop(key, None)
        for i in range(41):
            event_id = i.to_bytes(16, "big")
            assert compact.first_offset(event_id) == reference.offsets.get(event_id)
        if step == restore_at:  # a restart: both come back from the ids records, oldest first
            compact, reference = AppliedIds(1_000, recent_limit=5, spill=TINY_SPILL), DictIds(1_000)
            for key in sorted(table, key=lambda k: int(k.rsplit("#", 1)[1])):
                compact.remember(key, table[key])
                restored = list(zip(unpack_ids(table[key])[1], unpack_digests(table[key]), strict=True))
                reference.admit_versions([(event_id, at, digest) for (event_id, at), digest in restored])
                reference.remember(key, int(table[key][0]), [entry for entry, _ in restored])  # type: ignore[arg-type]


def test_spilled_ids_take_under_2_heap_bytes_each_and_stay_found_with_their_content(tmp_path: Path) -> None:
    ids = AppliedIds(3_600_000, recent_limit=10_000, spill=Spill(tmp_path, at=20_000))
    entries = [(i.to_bytes(16, "little"), i, i) for i in range(200_000)]  # id 0: content unknown
    for start in range(0, len(entries), 5_000):
        assert set(ids.admit_versions(entries[start : start + 5_000])) == {APPLY}
    assert len(ids) == 200_000 and ids.spilled() >= 160_000
    assert ids.heap_bytes() < 2 * ids.spilled() + 40 * (len(ids) - ids.spilled())
    assert list(tmp_path.iterdir()) == []  # unlinked files: nothing is left behind by a crash
    assert ids.first_offset((123_456).to_bytes(16, "little")) == 123_456
    assert ids.admit_versions([((5).to_bytes(16, "little"), 2_000_000, 5)]) == [COPY]
    assert ids.admit_versions([((5).to_bytes(16, "little"), 2_000_001, 6)]) == [CONFLICT]
    zero = (0).to_bytes(16, "little")
    assert ids.admit_versions([(zero, 0, 77)]) == [APPLY]  # replayed at its offset: its content is learnt...
    assert ids.admit_versions([(zero, 9, 78), (zero, 10, 77)]) == [CONFLICT, COPY]  # ...on disk
    absent = [(i.to_bytes(16, "little"), 300_000 + i, 1) for i in range(200_000, 205_000)]
    assert set(ids.admit_versions(absent)) == {APPLY}


@pytest.mark.parametrize("spill_at", [2, 1_000], ids=["on disk", "in memory"])
def test_ids_whose_halves_swap_share_a_search_key_and_stay_apart(spill_at: int) -> None:
    ids = AppliedIds(3_600_000, recent_limit=2, spill=Spill(at=spill_at))
    first, swapped = b"A" * 8 + b"B" * 8, b"B" * 8 + b"A" * 8  # the same xor of halves
    assert ids.admit_versions([(first, 1, 11), (b"C" * 16, 2, 12)]) == [APPLY, APPLY]  # both into a run
    assert ids.heap_bytes() > 0 and (ids.spilled() == 2) == (spill_at == 2)
    assert ids.admit_versions([(swapped, 3, 13), (first, 4, 11)]) == [APPLY, COPY]
    assert ids.first_offset(swapped) == 3 and ids.first_offset(first) == 1


def test_a_restore_keeps_the_horizon_of_adopted_records_and_drops_adopted_leftovers(tmp_path: Path) -> None:
    """The worker's table keeps ``adopted_ids`` of the ids records its horizon holds. A rebalance that leaves a
    partition here restores only the records written since (faust reads on from where it stopped): the horizon
    stays and adopts what it lacks. After a break (no horizon of it here) adopted records are leftovers: dropped."""
    spill = Spill(tmp_path, at=1)
    starts = lambda _: (("day", 0),)  # noqa: E731
    source = SourcePartition(3, AppliedIds(3_600_000, spill=spill))
    first = [UsageItem(10 + n, 5, 1, ["team:x"], 1_700_000_000, bytes([n]) * 16, 100 + n) for n in range(3)]
    table: dict[str, Any] = {}
    for key, value in source.fold(first, 1_000, table.get, starts).ids_records:
        table[key] = adopted_ids(value)
    later = UsageItem(20, 5, 1, ["team:x"], 1_700_000_000, b"z" * 16, 200)
    elsewhere = SourcePartition(3, AppliedIds(3_600_000, spill=spill))  # the same record as faust restores it
    [(key, value)] = elsewhere.fold([later], 2_000, {}.get, starts).ids_records
    table[key] = value
    kept = restore_sources(table, [3], 3_600_000, spill, {3: source.applied})[3]
    assert kept.applied is source.applied and kept.applied.spilled() == 4
    assert all(is_adopted(value) for value in table.values())
    copies = [(bytes([n]) * 16, 30 + n, 100 + n) for n in range(3)] + [(b"z" * 16, 33, 200)]
    assert kept.applied.admit_versions(copies) == [COPY] * 4
    fresh = restore_sources(table, [3], 3_600_000, spill, {})[3]
    assert fresh.applied is not source.applied and table == {} and fresh.blank


def test_records_read_back_from_the_changelog_are_adopted_in_order_and_forgotten_at_their_tombstones(
    tmp_path: Path,
) -> None:
    """A restore hands each ids record to the horizon as faust applies it: a tombstone forgets its record, a newer
    version of a record adds its entries, and a record already behind the horizon adds nothing but is deleted."""
    ids = AppliedIds(60_000, recent_limit=2, spill=Spill(tmp_path, at=2))
    old, kept, replayed, stale = (bytes([n]) * 16 for n in (1, 2, 3, 4))
    ids.adopt("ids#0#10", pack_ids(1_000, [(old, 10)], [5]))
    ids.adopt("ids#0#11", pack_ids(2_000, [(kept, 11)], [6]))
    ids.adopt("ids#0#11", pack_ids(3_000, [(kept, 11), (replayed, 12)], [6, 7]))  # the batch replayed longer
    ids.forget("ids#0#10")
    ids.forget("ids#0#99")  # a record this horizon never held
    ids.adopt("ids#0#500", pack_ids(200_000, [(bytes([9]) * 16, 500)], [8]))
    ids.adopt("ids#0#5", pack_ids(100_000, [(stale, 5)], [9]))  # written and expired before: behind the horizon
    assert list(ids.records) == ["ids#0#11", "ids#0#500"]
    assert ids.admit_versions([(old, 20, 5), (kept, 21, 6), (replayed, 22, 7), (stale, 23, 9)]) == [
        APPLY,
        COPY,
        COPY,
        APPLY,
    ]
    assert ids.expire() == ["ids#0#5", "ids#0#11"]


def test_admit_new_takes_only_batches_of_new_ids_with_known_digests_and_changes_nothing_otherwise() -> None:
    ids = AppliedIds(1_000, recent_limit=3)  # the fourth id moves the dict into a run
    first = [i.to_bytes(16, "big") for i in range(4)]
    assert ids.admit_new(first, [0, 1, 2, 3], [7, 7, 7, 7])
    assert [ids.first_offset(event_id) for event_id in first] == [0, 1, 2, 3]
    new, held_in_run = (9).to_bytes(16, "big"), first[0]
    assert ids.admit_new([new], [4], [7])  # now held in the dict
    for event_ids, digests in (
        ([new, (10).to_bytes(16, "big")], [7, 7]),  # held in the dict
        ([held_in_run], [5]),  # held in a run
        ([(11).to_bytes(16, "big")] * 2, [7, 7]),  # twice in the batch
        ([(12).to_bytes(16, "big")], [0]),  # content unknown
        ([], []),
    ):
        before = len(ids)
        assert not ids.admit_new(event_ids, list(range(20, 20 + len(event_ids))), digests)
        assert len(ids) == before
    assert ids.admit_versions([((11).to_bytes(16, "big"), 20, 7), ((11).to_bytes(16, "big"), 21, 7)]) == [APPLY, COPY]

"""Retention of closed spend windows (pure): when a window may be deleted, and that pruning loses nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.core.events import lateness_problem
from spendstream.core.periods import HOUR, HOURLY_HISTORY, period_window, window_expiry
from spendstream.processor.spend_accounting import (
    Retention,
    Watermark,
    WindowCalendar,
    clock_key,
    ids_key,
    is_ids_key,
    restore_clock,
    split_window_key,
    totals_from_partials,
)
from spendstream.processor.stage_one import UsageItem, restore_sources

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "America/Santiago", "Australia/Lord_Howe", "Asia/Kolkata"]
DAY_S = 86_400


def utc(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())


def start_of(period: str, epoch_s: int, tz: str) -> int:
    return int(period_window(period, datetime.fromtimestamp(epoch_s, UTC), tz)[0].timestamp())


def test_expiry_of_each_period_in_berlin_across_both_dst_changes() -> None:
    late = 3600
    # 2025-03-30 has 23 hours in Berlin, 2025-10-26 has 25: days are counted as local dates, not 24 h steps
    assert window_expiry("day", utc(2025, 3, 28, 23), late, "Europe/Berlin", 1) == utc(2025, 3, 30, 22) + late
    assert window_expiry("day", utc(2025, 3, 28, 23), late, "Europe/Berlin", 0) == utc(2025, 3, 30, 22) + late
    assert window_expiry("day", utc(2025, 10, 24, 22), late, "Europe/Berlin", 1) == utc(2025, 10, 26, 23) + late
    assert window_expiry("day", utc(2025, 3, 28, 23), late, "Europe/Berlin", 7) == utc(2025, 4, 5, 22) + late
    # ISO week of Monday 2025-10-20 (CEST): kept to the end of the following week, which ends in CET
    assert window_expiry("week", utc(2025, 10, 19, 22), late, "Europe/Berlin", 7) == utc(2025, 11, 2, 23) + late
    assert window_expiry("month", utc(2024, 12, 31, 23), late, "Europe/Berlin", 7) == utc(2025, 2, 28, 23) + late
    assert window_expiry("quarter", utc(2025, 9, 30, 22), late, "Europe/Berlin", 7) == utc(2026, 3, 31, 22) + late
    hour = utc(2025, 3, 30, 1)
    assert window_expiry(HOUR, hour, late, "Europe/Berlin", 7) == hour + 3600 * (1 + HOURLY_HISTORY) + late


def test_expiry_where_local_midnight_does_not_exist() -> None:
    """Santiago skips 2024-09-08 00:00 (clocks go to 01:00): that day starts at the jump, 04:00 UTC."""
    day = start_of("day", utc(2024, 9, 7, 12), "America/Santiago")
    assert day == utc(2024, 9, 7, 4)
    assert window_expiry("day", day, 0, "America/Santiago", 1) == utc(2024, 9, 9, 3)  # 2024-09-09 00:00 -03


instants = st.integers(utc(2020, 1, 1), utc(2030, 12, 31))
lateness_st = st.integers(0, 3 * DAY_S)


@settings(max_examples=400, deadline=None)
@given(
    tz=st.sampled_from(ZONES), occurred=instants, lateness=lateness_st, delay=st.floats(0, 1), days=st.integers(0, 90)
)
def test_an_event_within_the_lateness_never_lands_in_an_expired_window(
    tz: str, occurred: int, lateness: int, delay: float, days: int
) -> None:
    """With the watermark at the event's own arrival (in-order timestamps), every window it lands in is live:
    so an event for a deleted window is later than the lateness and goes to the DLQ."""
    retention = Retention(tz, lateness, days)
    arrival = occurred + int(delay * lateness)
    for period, start in WindowCalendar(tz).starts(occurred):
        assert retention.live(period, start, arrival)
    assert lateness_problem(_at(occurred), _at(arrival), timedelta(seconds=lateness)) is None


def _at(epoch_s: int) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


@settings(max_examples=300, deadline=None)
@given(tz=st.sampled_from(ZONES), newest=instants, lateness=lateness_st, days=st.integers(1, 90))
def test_every_window_a_scope_evaluation_reads_is_live(tz: str, newest: int, lateness: int, days: int) -> None:
    """A scope is evaluated at its newest window per period; an event that triggers it arrived at most the
    lateness after its newest event. Everything the rules read from there is still kept: the hourly EWMA's 48
    hours and rolling 24 h, the daily spike rule's trailing local days, the current calendar windows."""
    retention = Retention(tz, lateness, days)
    watermark = newest + lateness
    hour = newest - newest % 3600
    for back in range(HOURLY_HISTORY + 1):
        assert retention.live(HOUR, hour - 3600 * back, watermark)
    day = start_of("day", newest, tz)
    for _ in range(days + 1):
        assert retention.live("day", day, watermark)
        day = start_of("day", day - 1, tz)
    for period in ("day", "week", "month", "quarter"):
        assert retention.live(period, start_of(period, newest, tz), watermark)


LONGEST = {"day": 25 * 3600, "week": 7 * DAY_S + 3600, "month": 31 * DAY_S + 3600, "quarter": 92 * DAY_S + 3600}


@settings(max_examples=300, deadline=None)
@given(tz=st.sampled_from(ZONES), at=instants, lateness=lateness_st, days=st.integers(0, 90))
def test_retention_is_bounded_and_grows_with_the_window_start(tz: str, at: int, lateness: int, days: int) -> None:
    """Memory is bounded: a window is kept at most its retention past its end; and expiry grows with the start,
    so the expired windows of a period are always its oldest ones."""
    for period, start in WindowCalendar(tz).starts(at):
        expiry = window_expiry(period, start, lateness, tz, days)
        if period == HOUR:
            assert expiry == start + 3600 + HOURLY_HISTORY * 3600 + lateness
            continue
        end = int(period_window(period, _at(start), tz)[1].timestamp())
        periods_kept = max(days, 1) if period == "day" else 1
        assert end + lateness < expiry <= end + lateness + periods_kept * LONGEST[period]
        following = window_expiry(period, end, lateness, tz, days)
        assert following > expiry


def test_expired_partials_are_the_partitions_own_windows_only() -> None:
    retention = Retention("UTC", 0, 1)
    old, new = utc(2025, 1, 1), utc(2025, 1, 10)
    keys = [
        f"user:a#b|c|hour|{old}#3",  # scope with the separators in it
        f"user:a#b|c|hour|{new}#3",
        f"team:x|day|{old}#3",
        f"team:x|day|{old}#4",  # another source partition's
        ids_key(3, 0),
        clock_key(3),
    ]
    assert retention.expired_partials(keys, 3, new) == [f"user:a#b|c|hour|{old}#3", f"team:x|day|{old}#3"]
    windows = [f"user:a#b|c|hour|{old}", f"team:x|month|{old}", f"team:x|month|{utc(2025, 2, 1)}"]
    assert retention.expired_windows(windows, utc(2025, 3, 1)) == [f"user:a#b|c|hour|{old}", f"team:x|month|{old}"]


def test_watermark_scans_once_per_hour_and_persists_only_progress() -> None:
    clock = Watermark(restore_clock({clock_key(2): [7_200_000]}, 2))
    assert clock.durable_ms == 7_200_000 and restore_clock({}, 2) == 0
    assert clock.scan_due() and not clock.scan_due()
    assert clock.after(5) == 7_200_000  # never goes back
    assert clock.persist(7_200_000) is None
    assert clock.persist(9_000_000) == [9_000_000] and not clock.scan_due()  # same hour (2)
    assert clock.persist(10_800_000) == [10_800_000] and clock.scan_due()


SCOPES = ["team:a", "user:u"]
LATENESS_S = 6 * 3600
T0 = utc(2025, 3, 25)  # the Berlin spring DST change falls inside the stream

stream_st = st.lists(
    st.tuples(
        st.integers(0, 10**6),  # cost
        st.sampled_from([SCOPES[:1], SCOPES]),
        st.integers(0, 10 * DAY_S),  # occurred, from T0
        st.integers(0, LATENESS_S + 3600),  # arrival delay: some too late
        st.integers(-3 * DAY_S, 0),  # out-of-order shift of the Kafka timestamp (applied to a few events)
        st.booleans(),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    stream=stream_st,
    batch=st.integers(1, 6),
    crashes=st.lists(st.tuples(st.integers(0, 40), st.lists(st.booleans(), min_size=1, max_size=30)), max_size=3),
)
def test_pruning_with_crashes_keeps_live_windows_exact_and_never_recreates_a_deleted_one(
    stream: list[tuple[int, list[str], int, int, int, bool]],
    batch: int,
    crashes: list[tuple[int, list[bool]]],
) -> None:
    """Model of stage 1 on one partition, as ``StageOne`` runs it: lateness check, ``SourcePartition.fold`` at
    the batch's watermark, a retention scan against the persisted watermark, the clock record. Every batch is flushed
    before the next one starts, offsets are committed every other batch; a crash loses ANY subset of the
    records of the batch in flight and the source is replayed from the committed offset. Kafka timestamps are
    in order except for a few events shifted back by up to three days."""
    calendar = WindowCalendar("Europe/Berlin")
    retention = Retention("Europe/Berlin", LATENESS_S, 1)
    events = []
    for i, (cost, scopes, occurred, delay, shift, shifted) in enumerate(sorted(stream, key=lambda e: e[2] + e[3])):
        arrival = T0 + occurred + delay + (shift if shifted else 0)
        events.append((i.to_bytes(16, "big"), cost, scopes, T0 + occurred, max(arrival, T0 + occurred)))
    log: list[tuple[str, object]] = []
    committed_offset = 0
    table: dict[str, object] = {}
    source = restore_sources(table, [0], 900_000)[0]
    clock = source.clock
    crash_at = sorted(crashes)
    position = steps = 0
    scanned_at = 0
    while position < len(events):
        chunk = events[position : position + batch]
        accepted = [
            (position + i, cost, 1, scopes, occurred, event_id, arrival)
            for i, (event_id, cost, scopes, occurred, arrival) in enumerate(chunk)
            if lateness_problem(_at(occurred), _at(arrival), timedelta(seconds=LATENESS_S)) is None
        ]
        flushed = len(log)
        writes: list[tuple[str, object]] = []
        if accepted:
            watermark_ms = clock.after(max(item[6] for item in accepted) * 1000)
            items = [UsageItem(*item[:6]) for item in accepted]
            starts = retention.live_starts(calendar.starts, watermark_ms // 1000)
            out = source.fold(items, watermark_ms, table.get, starts)
            assert not retention.expired_partials(out.changed, 0, watermark_ms // 1000)  # expired: skipped
            writes += [(key, list(out.touched[key])) for key in sorted(out.changed)]
            writes += out.ids_records
            writes += [(key, None) for key in out.expired]
            if clock.scan_due():
                scanned_at = clock.durable_ms // 1000
                writes += [(key, None) for key in retention.expired_partials(list(table), 0, scanned_at)]
            if (record := clock.persist(watermark_ms)) is not None:
                writes.append((clock_key(0), record))
        for key, value in writes:
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
            log.append((key, value))
        position += len(chunk)
        steps += 1
        if crash_at and crash_at[0][0] <= steps:  # during the batch: it is neither confirmed nor committed
            _, survives = crash_at.pop(0)
            log = log[:flushed] + [r for i, r in enumerate(log[flushed:]) if survives[i % len(survives)]]
            table = {}
            for key, value in log:
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
            source = restore_sources(table, [0], 900_000)[0]
            clock = source.clock
            position = committed_offset
        elif steps % 2 == 0:
            committed_offset = position

    final = clock.durable_ms // 1000

    def live(wkey: str, at: int) -> bool:
        _, period, start = split_window_key(wkey)
        return retention.live(period, start, at)

    truth: dict[str, list[int]] = {}
    for _, cost, scopes, occurred, arrival in events:
        if lateness_problem(_at(occurred), _at(arrival), timedelta(seconds=LATENESS_S)) is None:
            for wkey in calendar.window_keys(scopes, occurred):
                row = truth.setdefault(wkey, [0, 0, 0])
                row[0] += cost
                row[1] += 1
                row[2] += 1
    totals = totals_from_partials(table)
    assert {k: v for k, v in totals.items() if live(k, final)} == {
        k: tuple(v) for k, v in truth.items() if live(k, final)
    }
    assert not retention.expired_partials(list(table), 0, scanned_at)
    deleted: set[str] = set()  # once a window's tombstone is in the changelog, it is never written again
    for key, value in log:
        if value is None:
            deleted.add(key)
        elif not is_ids_key(key):
            assert key not in deleted, key


def test_applied_ids_clock_is_separate_from_the_retention_clock() -> None:
    """The dedup horizon keeps its own arrival clock; the watermark record is not an ids record or a partial."""
    table = {clock_key(0): [5_000], ids_key(0, 0): [4_000, ""]}
    source = restore_sources(table, [0], 1_000)[0]
    assert source.applied_high is None and source.applied.newest_ms == 4_000 and source.clock.durable_ms == 5_000
    assert not source.blank
    assert totals_from_partials(table) == {}

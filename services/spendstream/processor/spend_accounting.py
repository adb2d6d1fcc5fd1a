"""Exact spend accounting without Kafka transactions (pure functions; the faust wiring is in ``app.py``).

Why it is exact. Stage 1 runs per source partition of ``spendstream.usage``. A batch of events is folded
into *partials*: one value per ``(scope, period, window_start, source_partition)`` holding
``(total_nanos, requests, tokens, last_applied_offset)``. Each touched partial is written ONCE per batch into
a faust table, i.e. as ONE changelog record, so a total and the offset it covers change together or not at
all. Events are applied in offset order, so a partial always covers exactly the events of its key with
``offset <= last_applied_offset``. After a crash the worker restores the table from its changelog and
re-reads the source from the committed offset (the stage flushes the producer, changelog included, before it
commits); ``fold_batch`` skips every event at or below a key's ``last_applied_offset``. No event is counted
twice and none is lost, on a broker without transactions. Once a batch starts above every stored offset of its
partition, nothing can be skipped and ``fold_fresh`` computes the same result per scope instead of per window.

Stage 2 receives TOTALS, never deltas: ``(window, source_partition, total, requests, tokens, offset)``.
``merge_partial`` keeps the one with the highest offset, so a re-sent or replayed message changes nothing, and
the global window total is the sum over source partitions. Stage 1 re-announces every key a batch touched,
even when all its events were skipped as replays, which heals a crash between the table write and the send.

Window keys are strings (``scope|period|start_epoch_s``) because they are faust table keys and Kafka keys.
Periods tracked for every scope: ``day``, ``week``, ``month``, ``quarter`` (local calendar windows of the
policy timezone) and ``hour`` (UTC hour buckets: the rolling 24 h budget and the hourly spike baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from typing import NamedTuple

from spendstream.processor.periods import period_window

CALENDAR_PERIODS = ("day", "week", "month", "quarter")
HOUR = "hour"
TRACKED_PERIODS = (*CALENDAR_PERIODS, HOUR)
_QUARTER_HOUR_S = 900  # every UTC offset in use is a multiple of 15 minutes


class Partial(NamedTuple):
    """One source partition's share of a window, and the last source offset it includes."""

    total_nanos: int
    requests: int
    tokens: int
    offset: int


EMPTY = Partial(0, 0, 0, -1)


def window_key(scope: str, period: str, start_s: int) -> str:
    return f"{scope}|{period}|{start_s}"


def split_window_key(key: str) -> tuple[str, str, int]:
    scope, period, start = key.rsplit("|", 2)
    return scope, period, int(start)


def partial_key(wkey: str, partition: int) -> str:
    return f"{wkey}#{partition}"


def split_partial_key(key: str) -> tuple[str, int]:
    wkey, _, partition = key.rpartition("#")
    return wkey, int(partition)


class WindowCalendar:
    """Window starts (epoch seconds) of the tracked periods for an instant, memoised per quarter hour.

    ``period_window`` costs several microseconds (timezone arithmetic); every event needs five windows,
    and within one quarter hour they are all the same, so a batch mostly hits the memo.
    """

    def __init__(self, tz: tzinfo | str) -> None:
        self.tz = tz
        self._memo: dict[int, tuple[tuple[str, int], ...]] = {}

    def starts(self, epoch_s: int) -> tuple[tuple[str, int], ...]:
        bucket = epoch_s - epoch_s % _QUARTER_HOUR_S
        found = self._memo.get(bucket)
        if found is None:
            instant = datetime.fromtimestamp(bucket, UTC)
            calendar = [(p, int(period_window(p, instant, self.tz)[0].timestamp())) for p in CALENDAR_PERIODS]
            found = (*calendar, (HOUR, bucket - bucket % 3600))
            if len(self._memo) > 10_000:
                self._memo.clear()
            self._memo[bucket] = found
        return found

    def window_keys(self, scopes: Sequence[str], epoch_s: int) -> list[str]:
        starts = self.starts(epoch_s)
        return [f"{scope}|{period}|{start}" for scope in scopes for period, start in starts]


def fold_batch(
    items: Iterable[tuple[int, int, int, Sequence[str]]],
    partition: int,
    current: Callable[[str], Sequence[int] | None],
) -> tuple[dict[str, Partial], set[str]]:
    """Fold ``(offset, cost_nanos, tokens, window_keys)`` items of one source partition, in offset order.

    ``current(partial_key)`` reads the stored partial (None if absent). Returns every touched partial's value
    after the batch (to announce to stage 2) and the subset of keys whose value changed (to write to the
    table). Events at or below a key's stored offset were applied before a crash and are skipped.
    """
    out: dict[str, Partial] = {}
    changed: set[str] = set()
    suffix = f"#{partition}"
    for offset, cost, tokens, wkeys in items:
        for wkey in wkeys:
            pkey = wkey + suffix
            cur = out.get(pkey)
            if cur is None:
                stored = current(pkey)
                cur = Partial(*stored) if stored is not None else EMPTY
            if offset <= cur.offset:
                out[pkey] = cur
                continue
            out[pkey] = Partial(cur.total_nanos + cost, cur.requests + 1, cur.tokens + tokens, offset)
            changed.add(pkey)
    return out, changed


def fold_fresh(
    items: Iterable[tuple[int, int, int, Sequence[str], int]],
    partition: int,
    current: Callable[[str], Sequence[int] | None],
    starts: Callable[[int], tuple[tuple[str, int], ...]],
) -> dict[str, Partial]:
    """``fold_batch`` for a batch that starts above every stored offset of its partition (no replay).

    Items are ``(offset, cost_nanos, tokens, scopes, quarter_hour_bucket)``. Every event then applies, so the
    batch is first summed per (bucket, scope), a few dict operations per scope, and only then expanded into
    the windows of each bucket (``starts(bucket)``): the per-event cost does not grow with the number of
    tracked periods. Returns every touched partial (all of them changed).
    """
    by_bucket: dict[int, dict[str, list[int]]] = {}
    for offset, cost, tokens, scopes, bucket in items:
        acc = by_bucket.get(bucket)
        if acc is None:
            acc = by_bucket[bucket] = {}
        for scope in scopes:
            row = acc.get(scope)
            if row is None:
                acc[scope] = [cost, 1, tokens, offset]
            else:
                row[0] += cost
                row[1] += 1
                row[2] += tokens
                row[3] = offset
    out: dict[str, Partial] = {}
    suffix = f"#{partition}"
    for bucket, acc in by_bucket.items():
        for period, start in starts(bucket):
            tail = f"|{period}|{start}{suffix}"
            for scope, (cost, requests, tokens, offset) in acc.items():
                pkey = scope + tail
                cur = out.get(pkey)
                if cur is None:
                    stored = current(pkey)
                    cur = Partial(*stored) if stored is not None else EMPTY
                out[pkey] = Partial(
                    cur.total_nanos + cost, cur.requests + requests, cur.tokens + tokens, max(cur.offset, offset)
                )
    return out


def quarter_hour(epoch_s: int) -> int:
    """The memo bucket of ``WindowCalendar.starts`` an instant falls in."""
    return epoch_s - epoch_s % _QUARTER_HOUR_S


def merge_partial(parts: dict[str, list[int]], partition: int, value: Sequence[int]) -> bool:
    """Stage 2: adopt a partition's total if it covers a later offset; True if the window total changed."""
    key = str(partition)
    old = parts.get(key)
    if old is not None and old[3] >= value[3]:
        return False
    parts[key] = list(value)
    return old is None or old[:3] != list(value[:3])


def window_total(parts: Mapping[str, Sequence[int]]) -> tuple[int, int, int]:
    """Global ``(total_nanos, requests, tokens)`` of a window: the sum over its source partitions."""
    total = requests = tokens = 0
    for value in parts.values():
        total += value[0]
        requests += value[1]
        tokens += value[2]
    return total, requests, tokens


def lateness_problem(occurred_at: datetime, arrived_at: datetime, allowed_lateness: timedelta) -> str | None:
    """Why an event is too late to count, or None.

    Lateness is measured against the event's Kafka timestamp (when it was produced), not the processor's
    clock, so a replay after a crash judges every event exactly as the first pass did.
    """
    if arrived_at - occurred_at > allowed_lateness:
        return (
            f"late event: occurred_at {occurred_at.isoformat()} arrived {arrived_at - occurred_at} later, "
            f"beyond the allowed lateness {allowed_lateness}"
        )
    return None


def totals_from_partials(latest: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, int, int]]:
    """Window totals from the newest value of every stage-1 partial (e.g. read back from its changelog)."""
    totals: dict[str, list[int]] = {}
    for pkey, value in latest.items():
        wkey, _ = split_partial_key(pkey)
        acc = totals.setdefault(wkey, [0, 0, 0])
        acc[0] += value[0]
        acc[1] += value[1]
        acc[2] += value[2]
    return {k: (v[0], v[1], v[2]) for k, v in totals.items()}

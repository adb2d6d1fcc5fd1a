"""The exact-accounting core and scope evaluation, exhaustively (no broker needed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.core.events import Action, AlertKind, lateness_problem
from spendstream.core.periods import period_window, tracked_series
from spendstream.core.policy import parse_policy
from spendstream.processor.applied_ids import AppliedIds
from spendstream.processor.decision_publisher import (
    FAR_REFRESH_S,
    SPEND_REFRESH_S,
    ScopeEvaluation,
    alert_id_for,
    build_decision,
    decision_signature,
    evaluate_scope,
    needs_decision,
    needs_spend_refresh,
    next_version,
)
from spendstream.processor.spend_accounting import (
    EMPTY,
    IDS_PER_RECORD,
    Partial,
    Retention,
    WindowCalendar,
    fold_batch,
    fold_fresh,
    ids_key,
    is_ids_key,
    merge_partial,
    pack_ids,
    quarter_hour,
    split_ids_key,
    split_partial_key,
    split_window_key,
    totals_from_partials,
    unpack_ids,
    window_key,
    window_total,
)
from spendstream.processor.stage_one import SourcePartition, UsageItem, restore_sources

KEYS = ["team:a|day|0", "team:b|day|0", "user:u|month|86400", "feature:x|hour|3600"]
event_st = st.tuples(st.integers(0, 10**9), st.integers(0, 5000), st.lists(st.sampled_from(KEYS), unique=True))


def exact(events: list[tuple[int, int, list[str]]]) -> dict[str, tuple[int, int, int]]:
    out: dict[str, list[int]] = {}
    for cost, tokens, keys in events:
        for key in keys:
            row = out.setdefault(key, [0, 0, 0])
            row[0] += cost
            row[1] += 1
            row[2] += tokens
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(event_st, max_size=60),
    batch=st.integers(1, 8),
    crashes=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 400)), max_size=4),
)
def test_crash_and_replay_at_any_point_counts_every_event_exactly_once(
    events: list[tuple[int, int, list[str]]], batch: int, crashes: list[tuple[int, int]]
) -> None:
    """Model of stage 1 on one partition: the table changelog is an ordered log; a crash keeps a prefix of it
    that at least covers the last commit (faust flushes before committing), and the source is replayed from
    the committed offset with the restored table."""
    log: list[tuple[str, Partial]] = []
    committed_offset, committed_log = 0, 0
    table: dict[str, list[int]] = {}
    crash_at = sorted(crashes)
    position = 0
    steps = 0
    while position < len(events):
        chunk = events[position : position + batch]
        items = [(position + i, cost, tokens, keys, 1) for i, (cost, tokens, keys) in enumerate(chunk)]
        touched, changed = fold_batch(items, 3, table.get)
        assert set(changed) <= set(touched)
        for key in sorted(changed):
            table[key] = list(touched[key])
            log.append((key, touched[key]))
        position += len(chunk)
        steps += 1
        if steps % 2 == 0:  # commit every other batch
            committed_offset, committed_log = position, len(log)
        if crash_at and crash_at[0][0] <= steps:
            _, keep = crash_at.pop(0)
            log = log[: committed_log + keep % (len(log) - committed_log + 1)]
            table = {}
            for key, value in log:
                table[key] = list(value)
            position = committed_offset
    assert totals_from_partials(table) == exact(events)


def test_fold_batch_skips_applied_offsets_and_reannounces_them() -> None:
    stored = {"k#1": [100, 1, 10, 5]}
    touched, changed = fold_batch([(5, 7, 1, ["k"], 1), (6, 3, 2, ["k", "j"], 1)], 1, stored.get)
    assert touched == {"k#1": Partial(103, 2, 12, 6), "j#1": Partial(3, 1, 2, 6)}
    assert changed == {"k#1", "j#1"}
    touched, changed = fold_batch([(4, 7, 1, ["k"], 1)], 1, stored.get)
    assert touched == {"k#1": Partial(100, 1, 10, 5)} and changed == set()


SCOPES = ["org:o", "team:a", "team:b", "user:u|x", "feature:f"]
BERLIN = WindowCalendar("Europe/Berlin")
JAN_2025 = 1_735_689_600
HOUR_MS = 3_600_000
ALL_LIVE = Retention("Europe/Berlin", 86_400, 7)  # with watermark 0 (1970) every window is live
LIVE_STARTS = ALL_LIVE.live_starts(BERLIN.starts, 0)


def usage_items(rows: list[tuple]) -> list[UsageItem]:
    return [UsageItem(*row) for row in rows]


def distinct_totals(events: list[tuple[bytes, int, int, list[str], int]]) -> dict[str, tuple[int, int, int]]:
    """The truth: every event_id once, whatever copies of it were sent."""
    first: dict[bytes, tuple[int, int, list[str], int]] = {}
    for event_id, cost, tokens, scopes, at in events:
        first.setdefault(event_id, (cost, tokens, scopes, at))
    out: dict[str, list[int]] = {}
    for cost, tokens, scopes, at in first.values():
        for wkey in BERLIN.window_keys(scopes, at):
            row = out.setdefault(wkey, [0, 0, 0])
            row[0] += cost
            row[1] += 1
            row[2] += tokens
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def restore(log: list[tuple[str, object]]) -> dict[str, object]:
    """A table restored from its changelog: the newest value per key, tombstones (None) delete."""
    table: dict[str, object] = {}
    for key, value in log:
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return table


originals_st = st.lists(
    st.tuples(
        st.integers(0, 10**9),
        st.integers(0, 5000),
        st.lists(st.sampled_from(SCOPES), min_size=1, unique=True),
        st.integers(JAN_2025, JAN_2025 + 40 * 86400),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(
    originals=originals_st,
    resends=st.lists(st.tuples(st.integers(0, 24), st.integers(0, 40)), max_size=25),
    batch=st.integers(1, 8),
    crashes=st.lists(st.tuples(st.integers(0, 60), st.lists(st.booleans(), min_size=1, max_size=40)), max_size=4),
)
def test_copies_crashes_and_replays_in_any_interleaving_count_each_event_id_once(
    originals: list[tuple[int, int, list[str], int]],
    resends: list[tuple[int, int]],
    batch: int,
    crashes: list[tuple[int, list[bool]]],
) -> None:
    """Model of stage 1 on one partition with an at-least-once producer: every event is sent once, and some are
    sent again (same event_id, later offset). The changelog is an ordered log; a crash keeps everything up to the
    last commit and ANY subset of what came after it (partials without their ids, ids without their partials),
    then the table and the applied ids are restored from it and the source is replayed from the committed offset.
    """
    stream = [(i.to_bytes(16, "big"), *event) for i, event in enumerate(originals)]
    for which, position in resends:  # a copy of an event, somewhere after the original
        copy = stream[which % len(originals)]
        at = stream.index(copy) + 1
        stream.insert(at + position % (len(stream) - at + 1), copy)
    log: list[tuple[str, object]] = []
    committed_offset, committed_log = 0, 0
    table: dict[str, object] = {}
    source = restore_sources(table, [4], HOUR_MS)[4]
    crash_at = sorted(crashes)
    position = steps = 0
    while position < len(stream):
        items = [
            (position + i, cost, tokens, scopes, at, event_id)
            for i, (event_id, cost, tokens, scopes, at) in enumerate(stream[position : position + batch])
        ]
        out = source.fold(usage_items(items), position * 10, table.get, LIVE_STARTS)
        writes: list[tuple[str, object]] = [(key, list(out.touched[key])) for key in sorted(out.changed)]
        writes += out.ids_records
        writes += [(key, None) for key in out.expired]
        for key, value in writes:
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
            log.append((key, value))
        position += len(items)
        steps += 1
        if steps % 2 == 0:  # commit every other batch
            committed_offset, committed_log = position, len(log)
        if crash_at and crash_at[0][0] <= steps:
            _, survives = crash_at.pop(0)
            tail = log[committed_log:]
            log = log[:committed_log] + [r for i, r in enumerate(tail) if survives[i % len(survives)]]
            table = restore(log)
            source = restore_sources(table, [4], HOUR_MS)[4]
            position = committed_offset
    assert totals_from_partials(table) == distinct_totals(stream)


def test_fresh_batch_above_every_stored_offset_still_skips_copies_of_earlier_events() -> None:
    table: dict[str, list[int]] = {}
    source = SourcePartition(0, AppliedIds(HOUR_MS))
    first = [(0, 100, 1, ["team:a"], JAN_2025, b"a" * 16), (1, 200, 2, ["team:a"], JAN_2025, b"b" * 16)]
    out = source.fold(usage_items(first), 1_000, table.get, LIVE_STARTS)
    table.update({key: list(out.touched[key]) for key in out.changed})
    # offsets 2.. start above every stored offset (the fresh path): a copy of "a" and two copies of "c"
    later = [
        (2, 100, 1, ["team:a"], JAN_2025, b"a" * 16),
        (3, 7, 1, ["team:a"], JAN_2025, b"c" * 16),
        (4, 7, 1, ["team:a"], JAN_2025, b"c" * 16),
    ]
    assert source.applied_high == 1
    out = source.fold(usage_items(later), 2_000, table.get, LIVE_STARTS)
    table.update({key: list(out.touched[key]) for key in out.changed})
    month = BERLIN.window_keys(["team:a"], JAN_2025)[2]
    assert totals_from_partials(table)[month] == (307, 3, 4)
    assert [unpack_ids(value)[1] for _, value in out.ids_records] == [[(b"c" * 16, 3)]]


def test_a_copy_within_the_horizon_is_skipped_and_one_after_it_counts_again() -> None:
    source = SourcePartition(2, AppliedIds(HOUR_MS))
    table: dict[str, object] = {}

    def send(offset: int, event_id: bytes, arrival_ms: int) -> list[str]:
        item = [(offset, 5, 1, ["team:a"], JAN_2025, event_id)]
        out = source.fold(usage_items(item), arrival_ms, table.get, LIVE_STARTS)
        table.update({key: list(out.touched[key]) for key in out.changed})
        table.update(out.ids_records)
        for key in out.expired:
            del table[key]
        return out.expired

    assert send(0, b"x" * 16, 0) == []
    assert send(1, b"x" * 16, HOUR_MS) == []  # exactly one horizon later: still a copy
    assert send(2, b"y" * 16, HOUR_MS + 1) == [ids_key(2, 0)]  # the record of offset 0 expires
    month = BERLIN.window_keys(["team:a"], JAN_2025)[2]
    assert totals_from_partials(table)[month] == (10, 2, 2)
    assert send(3, b"x" * 16, HOUR_MS + 2) == []  # its original's record is gone: counted again
    assert totals_from_partials(table)[month] == (15, 3, 3)
    restored = restore_sources(table, [2], HOUR_MS)[2]
    assert restored.applied_high == 3 and set(restored.applied.records) == {ids_key(2, 2), ids_key(2, 3)}
    assert restored.applied.admit([(b"y" * 16, 9), (b"x" * 16, 3), (b"z" * 16, 10)]) == [False, True, True]


def test_ids_records_round_trip_are_split_and_ignored_by_window_totals() -> None:
    entries = [(i.to_bytes(16, "big"), 1_000 + i) for i in range(IDS_PER_RECORD + 3)]
    items = [(offset, 1, 1, ["org:o"], JAN_2025, event_id) for event_id, offset in entries]
    out = SourcePartition(5, AppliedIds(HOUR_MS)).fold(usage_items(items), 123, {}.get, LIVE_STARTS)
    assert [key for key, _ in out.ids_records] == [ids_key(5, 1_000), ids_key(5, 1_000 + IDS_PER_RECORD)]
    assert [entry for _, value in out.ids_records for entry in unpack_ids(value)[1]] == entries
    assert all(unpack_ids(value)[0] == 123 for _, value in out.ids_records)
    key = ids_key(5, 1_000)
    assert is_ids_key(key) and split_ids_key(key) == (5, 1_000) and not is_ids_key("org:o|day|0#5")
    table = {**{k: list(v) for k, v in out.touched.items()}, **dict(out.ids_records)}
    assert totals_from_partials(table) == distinct_totals([(e, 1, 1, ["org:o"], JAN_2025) for e, _ in entries])
    assert unpack_ids(pack_ids(7, [])) == (7, [])


fresh_event_st = st.tuples(
    st.integers(0, 10**9),
    st.integers(0, 5000),
    st.lists(st.sampled_from(SCOPES), unique=True),
    st.integers(1_735_689_600, 1_735_689_600 + 40 * 86400),  # January 2025 into February
)


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(fresh_event_st, max_size=60),
    stored_offsets=st.dictionaries(st.sampled_from(SCOPES), st.integers(0, 9)),
    tz=st.sampled_from(["UTC", "Europe/Berlin", "Asia/Kolkata"]),
)
def test_fold_fresh_equals_the_per_event_fold_when_the_batch_starts_above_every_stored_offset(
    events: list[tuple[int, int, list[str], int]], stored_offsets: dict[str, int], tz: str
) -> None:
    calendar = WindowCalendar(tz)
    stored: dict[str, list[int]] = {}
    for scope, offset in stored_offsets.items():  # earlier batches left partials in some windows
        for period, start in calendar.starts(1_735_689_600):
            stored[f"{scope}|{period}|{start}#2"] = [offset * 100, offset, offset * 3, offset]
    first = 10
    # every third event a refused call: no request
    fresh = [
        (first + i, cost, tokens, scopes, quarter_hour(at), int(i % 3 != 2))
        for i, (cost, tokens, scopes, at) in enumerate(events)
    ]
    per_event = [
        (first + i, c, t, calendar.window_keys(s, at), int(i % 3 != 2)) for i, (c, t, s, at) in enumerate(events)
    ]
    touched, changed = fold_batch(per_event, 2, stored.get)
    assert fold_fresh(fresh, 2, stored.get, calendar.starts) == touched
    assert changed == set(touched)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50)), min_size=1, max_size=30), st.randoms())
def test_stage2_merge_is_idempotent_and_order_free(announcements: list[tuple[int, int]], rng) -> None:  # type: ignore[no-untyped-def]
    """Totals grow with the offset; any order and any duplication ends at each partition's newest total."""
    values = [(p, [off * 10, off, off * 2, off]) for p, off in announcements]
    shuffled = values + values
    rng.shuffle(shuffled)
    parts: dict[str, list[int]] = {}
    for partition, value in shuffled:
        merge_partial(parts, partition, value)
    newest: dict[int, int] = {}
    for partition, off in announcements:
        newest[partition] = max(newest.get(partition, -1), off)
    assert window_total(parts) == (
        sum(o * 10 for o in newest.values()),
        sum(newest.values()),
        sum(o * 2 for o in newest.values()),
    )


def test_keys_round_trip() -> None:
    key = window_key("user:a|b", "day", 1700000000)
    assert split_window_key(key) == ("user:a|b", "day", 1700000000)
    assert split_partial_key(key + "#4") == (key, 4)
    assert EMPTY.offset == -1


@settings(max_examples=200, deadline=None)
@given(
    st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)),
    st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]),
)
def test_calendar_memo_agrees_with_period_window(instant: datetime, tz: str) -> None:
    calendar = WindowCalendar(tz)
    epoch = int(instant.timestamp())
    starts = dict(calendar.starts(epoch - epoch % 900))  # warm the memo from the bucket start
    starts = dict(calendar.starts(epoch))
    assert set(starts) == set(tracked_series())
    second = datetime.fromtimestamp(epoch, UTC)
    for period in ("day", "week", "month", "quarter"):
        assert starts[period] == int(period_window(period, second, tz)[0].timestamp())
    assert starts["hour"] == epoch - epoch % 3600


def test_lateness_is_judged_against_arrival() -> None:
    occurred = datetime(2025, 3, 1, 12, tzinfo=UTC)
    assert lateness_problem(occurred, occurred + timedelta(minutes=59), timedelta(hours=1)) is None
    reason = lateness_problem(occurred, occurred + timedelta(hours=2), timedelta(hours=1))
    assert reason is not None and reason.startswith("late event")


POLICY = parse_policy(
    """
timezone: UTC
fallback_models: {gpt-4o: gpt-4o-mini}
budgets:
  - {scope: "team:a", period: month, amount_usd: 100}
  - {scope: "team:a", period: rolling_24h, amount_usd: 30}
quotas:
  - {scope: "user:*", tokens_per_day: 1000}
allowed_models: {"team:a": [gpt-4o-mini]}
"""
)
MAR = int(datetime(2025, 3, 1, tzinfo=UTC).timestamp())
USD = 10**9


def _evaluate(windows: dict[str, tuple[int, int, int]], latest: dict[str, int], scope: str = "team:a"):  # type: ignore[no-untyped-def]
    return evaluate_scope(scope, latest, lambda k: windows.get(k, (0, 0, 0)), POLICY, datetime.fromtimestamp(MAR, UTC))


def test_month_budget_thresholds_and_the_most_restrictive_rule_wins() -> None:
    hour = MAR + 5 * 3600
    latest = {"month": MAR, "hour": hour}
    verdict = _evaluate({window_key("team:a", "month", MAR): (85 * USD, 1, 1)}, latest)
    assert verdict.action is Action.alert and verdict.limit_nanos == 100 * USD
    assert verdict.allowed_models == ["gpt-4o-mini"]
    verdict = _evaluate({window_key("team:a", "month", MAR): (95 * USD, 1, 1)}, latest)
    assert verdict.action is Action.fallback and verdict.fallback_models == {"gpt-4o": "gpt-4o-mini"}
    # rolling 24 h: 25 hourly buckets ending at the newest hour, $1.50 each = $37.50 > $30
    windows = {window_key("team:a", "hour", hour - 3600 * i): (USD * 3 // 2, 1, 1) for i in range(30)}
    verdict = _evaluate(windows, latest)
    assert verdict.action is Action.shutoff and verdict.spend_nanos == 75 * USD // 2 and verdict.period == "rolling_24h"
    # it lasts while the hours still inside the window add up to it: $37.50, 36, 34.50, 33, 31.50, 30 (still 100 %),
    # then $28.50 at the sixth hour boundary, a fallback
    assert verdict.expires_at == datetime.fromtimestamp(hour + 6 * 3600, UTC)
    assert {c.key.rsplit("|", 1)[-1] for c in verdict.crossings} >= {"shutoff"}


def test_user_token_quota_shuts_off() -> None:
    day = MAR
    verdict = _evaluate({window_key("user:u", "day", day): (1, 3, 1000)}, {"day": day}, "user:u")
    assert verdict.action is Action.shutoff and "tokens" in verdict.reason


def test_decisions_only_on_change_and_versions_increase() -> None:
    latest = {"month": MAR}
    shutoff = _evaluate({window_key("team:a", "month", MAR): (100 * USD, 1, 1)}, latest)
    assert needs_decision(None, shutoff)
    assert not needs_decision(decision_signature(shutoff), shutoff)
    allow = _evaluate({}, {"month": MAR})
    assert needs_decision(decision_signature(shutoff), allow)
    assert needs_decision(None, allow)  # the allowed-model list must reach the edges
    assert not needs_decision(decision_signature(allow), _evaluate({}, {"month": MAR + 31 * 86400}))
    # the same action against another limit (an approved increase, a registered feature approved): published again,
    # so that what the edges say of it is not the old limit's
    raised = evaluate_scope(
        "team:a", latest, lambda k: (300 * USD, 1, 1) if k == window_key("team:a", "month", MAR) else (0, 0, 0),
        POLICY.model_copy(update={"budgets": [POLICY.budgets[0].model_copy(update={"amount_nanos": 200 * USD})]}),
        datetime.fromtimestamp(MAR, UTC),
    )  # fmt: skip
    assert raised.action is Action.shutoff and needs_decision(decision_signature(shutoff), raised)
    now = datetime.now(UTC)
    assert next_version(0, now) >= int(now.timestamp() * 1e6)
    assert next_version(10**18, now) == 10**18 + 1


def test_a_budget_alert_is_republished_at_most_every_refresh_interval_while_its_scope_has_traffic() -> None:
    latest = {"month": MAR}
    alert = _evaluate({window_key("team:a", "month", MAR): (85 * USD, 1, 1)}, latest)
    assert alert.action is Action.alert and not needs_decision(decision_signature(alert), alert)
    now = datetime.now(UTC)
    published = next_version(0, now)  # its version is the clock of its publication
    soon, due = now + timedelta(seconds=SPEND_REFRESH_S / 2), now + timedelta(seconds=SPEND_REFRESH_S + 0.01)
    assert not needs_spend_refresh(alert, published, soon)
    assert needs_spend_refresh(alert, published, due)  # the same spend too: an edge may be refusing on its own
    fallback = _evaluate({window_key("team:a", "month", MAR): (95 * USD, 2, 2)}, latest)
    assert fallback.action is Action.fallback and needs_spend_refresh(fallback, published, due)
    shutoff = _evaluate({window_key("team:a", "month", MAR): (100 * USD, 3, 3)}, latest)
    assert not needs_spend_refresh(shutoff, published, due)  # edges refuse a shutoff without reserving
    assert not needs_spend_refresh(_evaluate({window_key("team:a", "month", MAR): (1, 1, 1)}, latest), 0, due)


def test_a_shutoff_that_critical_features_still_spend_under_is_refreshed_with_its_spend() -> None:
    """Critical features are throttled, not refused, by a budget's shutoff and keep spending: the shutoff is published
    again (at most every FAR_REFRESH_S) so its spend and reason say where the budget stands, not where it stood
    when it was issued. Without critical features, or under a hard cap that stops them too, nothing spends."""
    policy = parse_policy(
        "timezone: UTC\nfeatures: {support: {critical: true, throttle_rps: 2.0}}\nbudgets:\n"
        '  - {scope: "team:a", period: month, amount_usd: 100}\n'
        '  - {scope: "team:b", period: month, amount_usd: 100, hard_cap: true}\n'
    )

    def shutoff(scope: str, spent: int) -> ScopeEvaluation:
        windows = {window_key(scope, "month", MAR): (spent, 1, 1)}
        now = datetime.fromtimestamp(MAR, UTC)
        return evaluate_scope(scope, {"month": MAR}, lambda k: windows.get(k, (0, 0, 0)), policy, now)

    first, later = shutoff("team:a", 127 * USD), shutoff("team:a", 367 * USD)
    assert first.action is later.action is Action.shutoff and later.critical_throttle_rps
    assert "367" in later.reason and later.spend_nanos == 367 * USD
    now = datetime.now(UTC)
    published = next_version(0, now)
    assert not needs_spend_refresh(later, published, now + timedelta(seconds=FAR_REFRESH_S - 1))
    assert needs_spend_refresh(later, published, now + timedelta(seconds=FAR_REFRESH_S + 0.01))
    capped = shutoff("team:b", 150 * USD)
    assert capped.action is Action.shutoff and capped.hard_stop
    assert not needs_spend_refresh(capped, published, now + timedelta(hours=1))


def test_a_threshold_of_an_increased_limit_is_a_new_crossing_with_its_own_alert_id() -> None:
    """After an approved increase lifts a shutoff, reaching 80 % of the new limit must alert (and notify) again:
    the crossing, and the alert id the ledger and the notifier deduplicate on, name the limit that was crossed."""
    latest = {"month": MAR}
    windows = {window_key("team:a", "month", MAR): (85 * USD, 1, 1)}
    before = _evaluate(windows, latest)
    raised = POLICY.model_copy(update={"budgets": [b.model_copy(update={"amount_nanos": 200 * USD})
                                                   if b.period == "month" else b for b in POLICY.budgets]})  # fmt: skip
    windows = {window_key("team:a", "month", MAR): (170 * USD, 2, 2)}  # 85 % of the new $200
    after = evaluate_scope(
        "team:a", latest, lambda k: windows.get(k, (0, 0, 0)), raised, datetime.fromtimestamp(MAR, UTC)
    )
    (first,) = [c for c in before.crossings if c.kind is AlertKind.threshold]
    second = next(c for c in after.crossings if c.kind is AlertKind.threshold and c.limit_nanos == 200 * USD)
    assert second.key != first.key and alert_id_for("team:a", second) != alert_id_for("team:a", first)
    again = _evaluate({window_key("team:a", "month", MAR): (88 * USD, 3, 3)}, latest)
    (same,) = [c for c in again.crossings if c.kind is AlertKind.threshold]
    assert same.key == first.key  # the same limit crossed again in the same window: one alert


CAPPED = parse_policy(
    """
timezone: UTC
budgets:
  - {scope: "team:a", period: month, amount_usd: 100, hard_cap: true}
  - {scope: "team:a", period: day, amount_usd: 10, hard_cap: true}
  - {scope: "team:a", period: week, amount_usd: 1}
  - {scope: "user:*", period: day, amount_usd: 2, hard_cap: true}
"""
)


def _capped(windows: dict[str, tuple[int, int, int]], scope: str = "team:a"):  # type: ignore[no-untyped-def]
    latest = {"month": MAR, "week": MAR - 5 * 86400, "day": MAR}  # 2025-03-01 is a Saturday
    return evaluate_scope(scope, latest, lambda k: windows.get(k, (0, 0, 0)), CAPPED, datetime.fromtimestamp(MAR, UTC))


def test_a_hard_cap_below_its_alert_is_published_with_its_standing_from_the_first_traffic() -> None:
    """Edges hold a hard cap's requests against what remains from the scope's first traffic: the processor publishes
    an allow that carries the standing of the hard cap closest to its limit (not a soft budget's), with its period's
    end, and refreshes it like an alert while the scope has traffic."""
    verdict = _capped(
        {window_key("team:a", "month", MAR): (50 * USD, 1, 1), window_key("team:a", "day", MAR): (USD, 1, 1)}
    )
    assert verdict.action is Action.allow and verdict.tracks_hard_cap
    assert (verdict.spend_nanos, verdict.limit_nanos, verdict.period) == (USD, 10 * USD, "day")  # $9 left, not $50
    assert verdict.expires_at == datetime.fromtimestamp(MAR + 86400, UTC)
    now = datetime.now(UTC)
    assert not needs_decision(None, verdict) and needs_spend_refresh(verdict, 0, now)  # first traffic: published
    decision = build_decision("team:a", verdict, next_version(0, now), "v1", now)
    assert decision.action is Action.allow and decision.expires_at == verdict.expires_at
    assert (decision.spend_nanos, decision.limit_nanos) == (USD, 10 * USD)
    published = next_version(0, now)
    assert not needs_spend_refresh(verdict, published, now + timedelta(seconds=FAR_REFRESH_S - 1))  # 10 % spent
    assert needs_spend_refresh(verdict, published, now + timedelta(seconds=FAR_REFRESH_S + 0.01))
    near = _capped({window_key("team:a", "day", MAR): (6 * USD, 1, 1)})  # over half of the $10 cap: as an alert
    assert near.tracks_hard_cap and near.spend_nanos == 6 * USD
    assert not needs_spend_refresh(near, published, now + timedelta(seconds=SPEND_REFRESH_S / 2))
    assert needs_spend_refresh(near, published, now + timedelta(seconds=SPEND_REFRESH_S + 0.01))
    user = _capped({}, "user:u1")  # a template's hard cap holds every user on its own
    assert user.tracks_hard_cap and user.limit_nanos == 2 * USD
    # The soft weekly budget's alert is the decision: it carries that budget, as before
    alert = _capped({window_key("team:a", "week", MAR - 5 * 86400): (USD * 85 // 100, 1, 1)})
    assert alert.action is Action.alert and not alert.tracks_hard_cap and alert.limit_nanos == USD


def test_a_hard_cap_the_policy_dropped_is_withdrawn_from_the_edges() -> None:
    """A plain allow is published when the scope's standing was a hard cap's, so edges stop reserving against it."""
    tracked = _capped({})
    plain = _evaluate({}, {"month": MAR}, "team:b")
    assert not plain.tracks_hard_cap
    assert needs_decision(decision_signature(tracked), plain)
    assert not needs_decision(decision_signature(tracked), tracked)
    assert build_decision("team:b", plain, 1, "v1", datetime.now(UTC)).expires_at is None


def test_a_copy_with_other_content_is_a_conflict_and_survives_a_restore() -> None:
    from spendstream.processor.applied_ids import APPLY, CONFLICT, COPY
    from spendstream.processor.spend_accounting import content_digest

    first, other = content_digest(b"cost 3.7T"), content_digest(b"cost 0")
    item = UsageItem(10, 3_700 * USD, 15, ["team:x"], 1_700_000_000, b"e" * 16, first)
    source = SourcePartition(1, AppliedIds(HOUR_MS))
    out = source.fold([item], 1_000, {}.get, LIVE_STARTS)
    assert out.conflicts == ()
    table = dict(out.ids_records)
    restored = restore_sources(table, [1], HOUR_MS)[1]
    for state in (source.applied, restored.applied):
        assert state.admit_versions([(b"e" * 16, 11, first), (b"e" * 16, 12, other), (b"f" * 16, 13, other)]) == [
            COPY,
            CONFLICT,
            APPLY,
        ]
    copy = UsageItem(12, 0, 15, ["team:x"], 1_700_000_000, b"e" * 16, other)
    out = restore_sources(table, [1], HOUR_MS)[1].fold([copy], 2_000, {}.get, LIVE_STARTS)
    assert list(out.conflicts) == [(12, 10)] and not out.touched


def test_digests_of_an_earlier_digest_function_read_back_as_unknown_so_a_copy_is_dropped_not_dead_lettered() -> None:
    """An ids record written before the digest function changed (three elements, blake2b digests) must not make
    every retry of its events look like a conflicting duplicate after an upgrade."""
    from spendstream.processor.spend_accounting import DIGEST_FUNCTION, content_digest, unpack_digests

    digest = content_digest(b"event")
    item = UsageItem(10, 5 * USD, 15, ["team:x"], 1_700_000_000, b"e" * 16, digest)
    key, value = SourcePartition(1, AppliedIds(HOUR_MS)).fold([item], 1_000, {}.get, LIVE_STARTS).ids_records[0]
    assert value[3] == DIGEST_FUNCTION and unpack_digests(value) == [digest]
    earlier = value[:3]  # as an earlier release wrote it
    assert unpack_digests(earlier) == []
    copy = UsageItem(12, 5 * USD, 15, ["team:x"], 1_700_000_000, b"e" * 16, content_digest(b"same event, re-encoded"))
    out = restore_sources({key: earlier}, [1], HOUR_MS)[1].fold([copy], 2_000, {}.get, LIVE_STARTS)
    assert out.conflicts == () and not out.touched  # dropped as a copy, not counted
    out = restore_sources({key: value}, [1], HOUR_MS)[1].fold([copy], 2_000, {}.get, LIVE_STARTS)
    assert list(out.conflicts) == [(12, 10)] and not out.touched


def test_a_rolling_shutoff_from_a_late_event_is_not_issued_already_expired() -> None:
    """An attacker session: $6 on a $5 rolling_24h hard cap, posted with an occurred_at two hours back, got a shutoff
    whose expiry (the end of that event's hour) was already past: edges dropped it and served 150 of 300 requests.
    The window is the 24 hours before now, and the shutoff lasts until what is in it falls below the limit."""
    policy = parse_policy(
        'timezone: UTC\nbudgets:\n  - {scope: "feature:f", period: rolling_24h, amount_usd: 5, hard_cap: true}\n'
    )
    now = datetime(2025, 3, 1, 12, 30, tzinfo=UTC)
    event_hour = int(datetime(2025, 3, 1, 10, tzinfo=UTC).timestamp())
    windows = {window_key("feature:f", "hour", event_hour): (6 * USD, 1, 1)}
    verdict = evaluate_scope("feature:f", {"hour": event_hour}, lambda k: windows.get(k, (0, 0, 0)), policy, now, now)
    assert verdict.action is Action.shutoff and verdict.spend_nanos == 6 * USD
    # the $6 of 10:00 leaves the window at 11:00 the next day, once no 24 hours up to now hold it
    assert verdict.expires_at == datetime(2025, 3, 2, 11, tzinfo=UTC) > now


def test_a_scope_last_seen_in_windows_of_another_timezone_is_read_in_the_policys() -> None:
    """An attacker session: a policy moved from Pacific/Kiritimati to America/New_York; the rebuilt New York day
    held $2, but the scope's newest day window was Kiritimati's (it starts later), and the budget read its $1."""
    policy = parse_policy('timezone: America/New_York\nbudgets:\n  - {scope: "team:t", period: day, amount_usd: 1.5}\n')
    kiritimati_day = int(datetime(2026, 12, 7, 10, tzinfo=UTC).timestamp())  # Dec 8 00:00 in Kiritimati
    new_york_day = int(datetime(2026, 12, 7, 5, tzinfo=UTC).timestamp())  # Dec 7 00:00 in New York
    windows = {
        window_key("team:t", "day", kiritimati_day): (1 * USD, 1, 1),
        window_key("team:t", "day", new_york_day): (2 * USD, 2, 2),
    }
    seen = datetime(2026, 12, 7, 23, 5, tzinfo=UTC)
    verdict = evaluate_scope("team:t", {"day": kiritimati_day}, lambda k: windows.get(k, (0, 0, 0)), policy, seen, seen)
    assert verdict.action is Action.shutoff and verdict.spend_nanos == 2 * USD

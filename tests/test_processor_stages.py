"""The processor's collaborators, each driven directly (no broker, no faust): stage 1, stage 2, the internal
message, the checkpoint's flush-then-commit order and recovery from the changelog records a stage wrote."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, Message
from faust.serializers.codecs import get_codec
from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.core.codec import AvroCodec
from spendstream.core.events import UsageEvent
from spendstream.core.periods import period_window
from spendstream.core.policy import parse_policy
from spendstream.core.topics import DLQ_REASON_HEADER, ENFORCEMENT, USAGE, USAGE_DLQ
from spendstream.processor.checkpoint import Changelog, Checkpoint, json_value
from spendstream.processor.internal_topics import (
    PARTIALS_TOPIC,
    ForgetMessage,
    PartialsMessage,
    ReevaluateMessage,
    WindowPartial,
    internal_message,
    stage2_partition,
)
from spendstream.processor.policy_in_force import PolicyHolder
from spendstream.processor.scopes import scopes_for
from spendstream.processor.spend_accounting import clock_key, dedup_id, is_ids_key, owner_prefix, totals_from_partials
from spendstream.processor.stage_one import StageOne
from spendstream.processor.stage_two import ScopeState, StageTwo
from spendstream.processor.watched_windows import watched, watched_series

USD = 1_000_000_000
PARTITIONS = 4
LATENESS = timedelta(hours=1)
OCCURRED = datetime(2025, 1, 15, 12, 0, tzinfo=UTC)
MONTH = int(period_window("month", OCCURRED, "Europe/Berlin")[0].timestamp())
ALPHA_MONTH = f"team:alpha|month|{MONTH}"
POLICY_YAML = """
name: stages
timezone: Europe/Berlin
org: acme
thresholds: {alert: 0.80, fallback: 0.90, shutoff: 1.00}
budgets:
  - {scope: "team:alpha", period: month, amount_usd: %d}
pricing: {unknown_model: reject}
"""
CODEC = AvroCodec("usage_event")
ROOT = Path(__file__).resolve().parent.parent


class Recorded:
    """The records a stage sent, in order (the stand-in for its batch's producer)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes | None, int | None, dict[str, bytes]]] = []

    def send(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None, headers: Any = None
    ) -> None:
        self.records.append((topic, key, value, partition, dict(headers or [])))

    def on(self, topic: str) -> list[tuple[str, bytes | None, bytes | None, int | None, dict[str, bytes]]]:
        return [record for record in self.records if record[0] == topic]


def policy(budget_usd: int = 100) -> Any:
    return parse_policy(POLICY_YAML % budget_usd, "<test>")


def policy_with(budgets: str = "", rest: str = "") -> Any:
    """The test policy (team alpha at $100) with more ``budgets`` lines and more top-level ``rest``."""
    return parse_policy((POLICY_YAML % 100).replace("pricing:", budgets + "pricing:") + rest, "<test>")


def usage(offset: int, event: UsageEvent, arrival: datetime | None = None, partition: int = 1) -> Message:
    stamp = int((arrival or event.occurred_at + timedelta(seconds=1)).timestamp() * 1000)
    return Message(
        topic=USAGE,
        partition=partition,
        offset=offset,
        key=b"acme/alpha",
        value=CODEC.encode(event.to_avro()),
        timestamp=(TIMESTAMP_CREATE_TIME, stamp),
    )


def spend(usd: int, event_id: uuid.UUID | None = None, occurred: datetime = OCCURRED) -> UsageEvent:
    return UsageEvent(
        event_id=event_id or uuid.uuid4(),
        occurred_at=occurred,
        org="acme",
        team="alpha",
        provider="openai",
        model_requested="gpt-4o",
        input_tokens=10,
        output_tokens=5,
        cost_nanos=usd * USD,
    )


class Worker:
    """Stage 1 of one worker on a dict table, with the changelog it wrote (a restart restores from it)."""

    def __init__(
        self,
        changelog: list[tuple[str, Any]] | None = None,
        holder: PolicyHolder | None = None,
        rebuildable: bool = False,
    ) -> None:
        self.changelog = changelog if changelog is not None else []
        self.table: dict[str, Any] = {}
        for key, value in self.changelog:
            if value is None:
                self.table.pop(key, None)
            else:
                self.table[key] = value
        self.out = Recorded()
        self.holder = holder or PolicyHolder(policy(), LATENESS)
        self.stage = StageOne(
            self.holder,
            Changelog(self.table, "partials-changelog", self.out),
            self.out,
            PARTITIONS,
            allowed_lateness=LATENESS,
            max_future_skew=timedelta(minutes=5),
            dedup_horizon=timedelta(minutes=15),
        )
        self.holder.on_swap.append(self.stage.announce_newly_watched)  # as the processor's app wires them
        self.blank = self.stage.restore([1], {}, rebuildable)

    def process(self, messages: list[Message]) -> None:
        start = len(self.out.records)
        self.stage.process(1, messages)
        for topic, key, value, partition, _ in self.out.records[start:]:
            if topic == "partials-changelog":
                assert partition == 1  # the source partition's own changelog partition
                self.changelog.append((json.loads(key or b""), None if value is None else json.loads(value)))

    def month_total(self) -> tuple[int, int, int]:
        return totals_from_partials(self.table).get(ALPHA_MONTH, (0, 0, 0))

    def dead_letters(self) -> list[str]:
        return [headers[DLQ_REASON_HEADER].decode() for *_, headers in self.out.on(USAGE_DLQ)]


def test_stage_one_counts_each_event_id_once_within_a_batch_and_dead_letters_a_conflicting_copy() -> None:
    worker = Worker()
    original = spend(3)
    worker.process(
        [
            usage(0, original),
            usage(1, original),  # a re-send of the same event: skipped
            usage(2, spend(4)),
            usage(3, spend(50, event_id=original.event_id)),  # same id, other content: the first version wins
        ]
    )
    assert worker.month_total() == (7 * USD, 2, 30)
    assert len(worker.dead_letters()) == 1 and worker.dead_letters()[0].startswith("conflicting_duplicate")


def test_an_event_id_is_one_event_within_its_team_so_another_team_cannot_claim_it() -> None:
    """A token scoped to one team posted the ids another team's clients derive predictably (CloudEvents' source and
    id): the other team's real events on the same source partition were dead-lettered as conflicting copies, in
    the ledger (whose rows are keyed by team) but never in its budgets."""
    worker = Worker()
    claimed = uuid.uuid4()
    squatter = spend(1, event_id=claimed).model_copy(update={"team": "squatter"})
    worker.process([usage(0, squatter), usage(1, spend(40, event_id=claimed))])
    assert worker.month_total() == (40 * USD, 1, 15) and worker.dead_letters() == []
    worker.process([usage(2, spend(40, event_id=claimed))])  # alpha's retry: a copy, skipped
    worker.process([usage(3, spend(99, event_id=claimed))])  # alpha's other content under that id: a conflict
    assert worker.month_total() == (40 * USD, 1, 15)
    assert [reason.split(":")[0] for reason in worker.dead_letters()] == ["conflicting_duplicate"]
    squatters = totals_from_partials(worker.table)[ALPHA_MONTH.replace("team:alpha", "team:squatter")]
    assert squatters == (1 * USD, 1, 15)


def test_stage_one_after_a_restart_skips_copies_and_replays_of_what_it_applied() -> None:
    first = Worker()
    original = spend(3)
    first.process([usage(0, original), usage(1, spend(4))])
    restarted = Worker(first.changelog)
    assert restarted.blank == [] and restarted.stage.sources[1].applied_high == 1
    # offsets 0 and 1 again (the committed offset lagged), then a re-send of the original at a later offset
    restarted.process([usage(0, original), usage(1, spend(4, event_id=uuid.uuid4())), usage(2, original)])
    assert restarted.month_total() == (7 * USD, 2, 30)
    restarted.process([usage(3, spend(5))])
    assert restarted.month_total() == (12 * USD, 3, 45)


def test_stage_one_dead_letters_late_events_and_keeps_the_watermark_below_now_plus_the_skew() -> None:
    worker = Worker()
    late = spend(9, occurred=OCCURRED - timedelta(hours=2))
    worker.process([usage(0, late, arrival=OCCURRED), usage(1, spend(1), arrival=OCCURRED)])
    assert worker.month_total() == (1 * USD, 1, 15)
    assert len(worker.dead_letters()) == 1 and worker.dead_letters()[0].startswith("late event")
    assert worker.table[clock_key(1)] == [int(OCCURRED.timestamp() * 1000), "Europe/Berlin"]  # with the batch
    far = datetime(2100, 1, 1, tzinfo=UTC)  # a producer whose clock is far ahead
    worker.process([usage(2, spend(1, occurred=far), arrival=far)])
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    assert OCCURRED.timestamp() * 1000 < worker.table[clock_key(1)][0] <= now_ms + 5 * 60_000
    assert worker.month_total() == (1 * USD, 1, 15)  # the January window is still live


def test_stage_one_announces_totals_as_typed_messages_to_the_owner_of_each_scope() -> None:
    worker = Worker()
    worker.process([usage(7, spend(3)), usage(8, spend(4))])
    sent = worker.out.on(PARTIALS_TOPIC)
    messages = {partition: internal_message(json.loads(value or b"")) for _, _, value, partition, _ in sent}
    owner = stage2_partition("team:alpha", PARTITIONS)
    message = messages[owner]
    assert isinstance(message, PartialsMessage)
    assert message.source == 1 and message.newest_event_s == int(OCCURRED.timestamp())
    assert WindowPartial(ALPHA_MONTH, 7 * USD, 2, 30, 8) in message.scopes["team:alpha"]
    assert all(stage2_partition(scope, PARTITIONS) == p for p, m in messages.items() for scope in m.scopes)  # type: ignore[union-attr]


def test_a_batch_of_many_new_scopes_is_announced_in_messages_the_broker_accepts() -> None:
    """An attacker session: 20 posts of 1,000 events, each with its own user, feature, customer and project, made
    one announcement larger than the broker's 1 MB limit; the worker crashed on it at every restart, and every
    edge's enforcement view went stale."""
    watching = policy_with(
        '  - {scope: "user:*", period: day, amount_usd: 5}\n  - {scope: "feature:*", period: month, amount_usd: 50}\n',
        'quotas:\n  - {scope: "customer:*", requests_per_day: 100}\n',
    )
    worker = Worker(holder=PolicyHolder(watching, LATENESS))
    labels = "x" * 200  # long names make big messages
    events = [
        spend(1).model_copy(update={"user": f"{labels}-u{i}", "feature": f"{labels}-f{i}", "customer": f"c{i}"})
        for i in range(3_000)
    ]
    worker.process([usage(offset, event) for offset, event in enumerate(events)])
    sent = [value or b"" for _, _, value, _, _ in worker.out.on(PARTIALS_TOPIC)]
    assert len(sent) > PARTITIONS and max(map(len, sent)) < 1_000_000
    announced = {
        window.window
        for value in sent
        for entries in internal_message(json.loads(value)).scopes.values()  # type: ignore[union-attr]
        for window in entries
    }
    reads = watched(watching).reads
    assert announced == {wkey for wkey in totals_from_partials(worker.table) if reads(wkey)}  # each window once
    assert len(announced) > 9_000  # a user's day, a feature's month, a customer's day per event


def test_stage_one_counts_each_event_in_the_scopes_of_scopes_for_and_dead_letters_what_the_checks_reject() -> None:
    """Valid events count in exactly ``scopes_for``'s scopes; each invalid one goes to the DLQ with the reason
    ``usage_record_problem`` gives it, whichever way stage 1 read it."""
    holder = PolicyHolder(
        parse_policy(POLICY_YAML % 100 + "divisions: {eng: [alpha]}\nprojects: {apollo: alpha}\n", "<test>"), LATENESS
    )
    worker = Worker(holder=holder)
    attributions = [
        {"team": "alpha", "user": "u1", "model_served": "gpt-4o-mini"},
        {"project": "apollo", "customer": "c9", "environment": "prod"},  # team, division, org from the policy
        {"org": "other", "division": "ops", "feature": "chat", "user": "u1"},
        {"team": "alpha", "user": "u2"},
    ]
    events = [spend(1).model_copy(update={"team": "", **fields}) for fields in attributions]
    bad = {
        "input_tokens is negative: -1": {"input_tokens": -1},
        "cost_nanos is negative: -5": {"cost_nanos": -5},
        "cached_input_tokens + cache_write_tokens exceed input_tokens": {"cached_input_tokens": 11},
        "reasoning, audio and image output tokens exceed output_tokens": {"reasoning_tokens": 6},
        "missing provider or model_requested": {"provider": ""},
        # what the API and the gateway refuse, from a producer that bypasses them (an attacker session)
        "a blocked call reached no model and costs nothing, but cost_nanos is 1000000000": {"status": "blocked"},
        "team 'sa\\nles' contains the invisible or control character U+000A, so it would look like a name a policy "
        "scope names without being it": {"team": "sa\nles"},
        "team ' alpha' has leading or trailing whitespace, so no policy scope would match it": {"team": " alpha"},
    }
    invalid = [spend(1).model_copy(update=fields) for fields in bad.values()]
    worker.process([usage(offset, event) for offset, event in enumerate(events + invalid)])
    counted = {key.rsplit("|", 2)[0] for key in totals_from_partials(worker.table)}
    expected = {scope for event in events for scope in scopes_for(event.model_dump(), holder.policy)}
    assert counted == expected and "division:eng" in counted and "model:gpt-4o-mini" in counted
    assert worker.dead_letters() == list(bad)


def test_internal_messages_round_trip_in_the_wire_format() -> None:
    message = PartialsMessage(
        2, 1_700_000_000, 1_700_000_000_123, {"team:a": [WindowPartial("team:a|day|0", 5, 1, 9, 41)]}
    )
    wire = json.loads(message.encode())
    assert wire == {
        "p": 2,
        "at": 1_700_000_000,
        "w": 1_700_000_000_123,
        "s": {"team:a": [["team:a|day|0", 5, 1, 9, 41]]},
    }
    assert internal_message(wire) == message
    assert json.loads(ReevaluateMessage("v7").encode()) == {"reevaluate": "v7"}
    assert internal_message({"reevaluate": "v7"}) == ReevaluateMessage("v7")


class ScopeOwner:
    """Stage 2 of the internal partition that owns team:alpha, on dict tables."""

    def __init__(self, holder: PolicyHolder, scope: str = "team:alpha") -> None:
        self.scope = scope
        self.partition = stage2_partition(scope, PARTITIONS)
        self.out = Recorded()
        self.windows: dict[str, Any] = {}
        self.scopes: dict[str, Any] = {}
        self.stage = StageTwo(
            holder,
            Changelog(self.windows, "windows-changelog", self.out),
            Changelog(self.scopes, "scopes-changelog", self.out),
            self.out,
            PARTITIONS,
        )

    def decisions(self) -> list[str]:
        codec = AvroCodec("decision")
        mine = self.scope.encode()
        return [codec.decode(value)["action"] for _, key, value, *_ in self.out.on(ENFORCEMENT) if key == mine]

    def receive(self, sent: list[tuple[str, bytes | None, bytes | None, int | None, dict[str, bytes]]]) -> None:
        """Process the internal messages of ``sent`` that this owner's partition receives."""
        mine = [
            internal_message(json.loads(value or b""))
            for _, _, value, partition, _ in sent
            if partition == self.partition
        ]
        self.stage.process(self.partition, mine)


def test_stage_two_merges_totals_idempotently_decides_on_change_and_reevaluates_on_a_new_policy() -> None:
    worker = Worker()
    worker.process([usage(0, spend(60)), usage(1, spend(60))])
    owner = ScopeOwner(worker.holder)
    _, _, value, _, _ = next(r for r in worker.out.on(PARTIALS_TOPIC) if r[3] == owner.partition)
    message = internal_message(json.loads(value or b""))
    owner.stage.process(owner.partition, [message])
    assert owner.windows[ALPHA_MONTH] == {"1": [120 * USD, 2, 30, 1]}
    assert owner.decisions() == ["shutoff"]
    owner.stage.process(owner.partition, [message])  # a replayed message changes nothing
    assert owner.windows[ALPHA_MONTH] == {"1": [120 * USD, 2, 30, 1]} and owner.decisions() == ["shutoff"]
    state = ScopeState.from_json(owner.scopes["team:alpha"])
    assert state.partition == owner.partition and state.latest["month"] == MONTH and state.version > 0
    assert set(owner.scopes["team:alpha"]) == {"p", "latest", "seen", "sig", "version", "alerted"}
    assert ScopeState.from_json(state.to_json()) == state
    raised = policy(1_000)
    assert worker.holder.adopt(raised)
    owner.stage.process(owner.partition, [ReevaluateMessage(raised.version)])
    assert owner.decisions() == ["shutoff", "allow"]


def test_a_restored_stage_one_announces_every_window_again_so_a_stage_two_that_missed_them_converges() -> None:
    """After kill -9 and a rebalance a stage-2 owner was seen without the totals announced in the generation
    before; stage 1 had committed everything, so nothing would ever have been sent again."""
    first = Worker()
    first.process([usage(0, spend(60)), usage(1, spend(30))])
    restarted = Worker(first.changelog)
    assert restarted.stage.announce_restored([]) == 0 and restarted.out.on(PARTIALS_TOPIC) == []
    announced = restarted.stage.announce_restored([1])
    sent = restarted.out.on(PARTIALS_TOPIC)
    partial_keys = [key for key in restarted.table if not is_ids_key(key) and key != clock_key(1)]
    reads = watched(restarted.holder.policy).reads
    assert announced == len([key for key in partial_keys if reads(key.rpartition("#")[0])]) > 0
    owner = ScopeOwner(restarted.holder)  # a stage-2 owner that never saw the first worker's announcements
    for _, _, value, partition, _ in sent:
        message = internal_message(json.loads(value or b""))
        assert isinstance(message, PartialsMessage) and message.source == 1 and message.newest_event_s == 0
        assert message.watermark_ms == restarted.stage.sources[1].clock.durable_ms
        assert all(stage2_partition(scope, PARTITIONS) == partition for scope in message.scopes)
        if partition == owner.partition:
            owner.stage.process(owner.partition, [message])
    assert owner.windows[ALPHA_MONTH] == {"1": [90 * USD, 2, 30, 1]}
    assert owner.decisions() == ["fallback"]  # $90 of $100
    before = dict(owner.windows)
    for _, _, value, partition, _ in sent:  # announced again (another rebalance): nothing changes
        if partition == owner.partition:
            owner.stage.process(owner.partition, [internal_message(json.loads(value or b""))])
    assert owner.windows == before and owner.decisions() == ["fallback"]


def test_a_feature_registered_at_zero_is_shut_off_before_its_first_call() -> None:
    """A pending registration budgets its feature at $0; with no spend seen there was no decision until the first
    calls' usage arrived, and a burst of 60 calls passed 22 before the shutoff."""
    from spendstream.core.budget_lifecycle import Kind, new_request

    holder = PolicyHolder(policy(), LATENESS)
    now = datetime.now(UTC)
    holder.readjust(
        [new_request(Kind.feature, "feature:newfeat", "month", 3000 * USD, now, None, "vera", "x", now)], now
    )
    scope, out = "feature:newfeat", Recorded()
    partition = stage2_partition(scope, PARTITIONS)
    stage = StageTwo(holder, Changelog({}, "w", out), Changelog({}, "s", out), out, PARTITIONS)
    stage.process(partition, [ReevaluateMessage(holder.policy.version)])
    assert out.on(ENFORCEMENT) == []  # a scope without spend is evaluated only when named
    other = next(f"feature:f{i}" for i in range(100) if stage2_partition(f"feature:f{i}", PARTITIONS) != partition)
    stage.process(partition, [ReevaluateMessage(holder.policy.version, (scope, other))])
    codec = AvroCodec("decision")
    decided = [codec.decode(value) for _, key, value, *_ in out.on(ENFORCEMENT)]
    assert [(d["scope"], d["action"], d["limit_nanos"], d["spend_nanos"]) for d in decided] == [
        (scope, "shutoff", 0, 0)
    ]
    assert decided[0]["expires_at"] == period_window("month", now, "Europe/Berlin")[1]
    assert "stays at $0 until approved: `spendstream budget list --status pending`" in decided[0]["reason"]
    assert internal_message(json.loads(ReevaluateMessage("v", (scope,)).encode())) == ReevaluateMessage("v", (scope,))
    assert json.loads(ReevaluateMessage("v").encode()) == {"reevaluate": "v"}  # the wire format of every release


def test_stage_one_seeded_from_the_ledger_restores_the_same_memory() -> None:
    worker = Worker()
    assert worker.blank == [1]
    known = uuid.uuid4()
    recent = [(dedup_id(known.bytes, owner_prefix("acme", "alpha")), 1_000)]  # as ``fold_snapshot`` lists the ledger's
    scopes = worker.stage.seed(1, {ALPHA_MONTH: (9 * USD, 3, 40)}, recent, 50, 1_700_000_000_000)
    assert scopes == {"team:alpha": [WindowPartial(ALPHA_MONTH, 9 * USD, 3, 40, 49)]}
    changelog = [
        (json.loads(key or b""), None if value is None else json.loads(value))
        for _, key, value, _, _ in worker.out.on("partials-changelog")
    ]
    restarted = Worker(changelog)
    source = restarted.stage.sources[1]
    assert restarted.blank == [] and source.applied_high == 49 and source.clock.durable_ms == 1_700_000_000_000
    assert any(is_ids_key(key) for key in restarted.table)
    restarted.process([usage(50, spend(1, event_id=known)), usage(51, spend(2))])  # a copy of a ledger row
    assert restarted.month_total() == (11 * USD, 4, 55)


class Output:
    """A batch output whose confirmation can fail, logging flushes and commits in the order they happen."""

    def __init__(self) -> None:
        self.log: list[Any] = []
        self.fail = False

    def flush_now(self) -> None:
        if self.fail:
            raise RuntimeError("batch output not confirmed")
        self.log.append("flush")


def test_checkpoint_commits_offsets_only_after_the_flush_confirmed_the_batch() -> None:
    output = Output()
    checkpoint = Checkpoint(output, lambda positions: output.log.append(dict(positions)))
    checkpoint.store_offset(0, 10)
    checkpoint.store_offset(3, 4)
    checkpoint.commit()
    assert output.log == ["flush", {0: 10, 3: 4}]
    checkpoint.store_offset(0, 20)
    output.fail = True
    with pytest.raises(RuntimeError):
        checkpoint.commit()
    assert output.log == ["flush", {0: 10, 3: 4}] and checkpoint.committed == {0: 10, 3: 4}
    output.fail = False
    checkpoint.commit()
    assert output.log[-2:] == ["flush", {0: 20, 3: 4}]  # every partition read so far, each at its newest
    checkpoint.commit()
    assert output.log[-1] == "flush"  # nothing new consumed: the flush alone


def test_checkpoint_without_offsets_only_flushes() -> None:
    output = Output()
    Checkpoint(output).commit()
    assert output.log == ["flush"]


@settings(deadline=None)
@given(
    value=st.recursive(
        # finite floats only: the stages write no float (money and counts are integers), and a non-finite one has
        # no JSON spelling (msgspec writes null)
        st.none()
        | st.booleans()
        | st.integers(-(2**80), 2**80)
        | st.text()
        | st.floats(allow_nan=False, allow_infinity=False),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    )
)
def test_table_values_and_internal_messages_read_back_as_written(value: Any) -> None:
    """What both stages write (``json_value``) is read back by faust's JSON codec as the same value: money of any
    size stays an exact integer, text of any language stays text."""
    assert get_codec("json").loads(json_value(value)) == value
    message = PartialsMessage(
        3, 1_700_000_000, 1_700_000_000_123, {"team:ü": [WindowPartial("team:ü|day|0", 2**70, 1, 2, 9)]}
    )
    assert internal_message(get_codec("json").loads(message.encode())) == message


def test_a_blocked_call_without_a_cost_is_priced_at_nothing() -> None:
    """An attacker session: a blocked event posted without cost_nanos was priced from its tokens and counted against
    the team's budget and its chargeback."""
    worker = Worker()
    refused = spend(1).model_copy(update={"status": "blocked", "cost_nanos": None})
    worker.process([usage(0, refused)])
    assert worker.month_total()[0] == 0 and worker.dead_letters() == []


def test_a_refused_call_is_no_request_and_used_no_tokens() -> None:
    """An attacker session: 51 blocked events, $0 each, used up a user's request quota of 50 a day (a user refused
    by a team budget would use it up the same way, retrying)."""
    worker = Worker()
    refused = [spend(0).model_copy(update={"status": "blocked"}) for _ in range(3)]
    worker.process([usage(offset, event) for offset, event in enumerate([*refused, spend(2)])])
    assert worker.month_total() == (2 * USD, 1, 15)
    # the full path (an unpriced refused call) too
    worker.process([usage(9, spend(1).model_copy(update={"status": "blocked", "cost_nanos": None}))])
    assert worker.month_total() == (2 * USD, 1, 15)


def test_an_event_is_the_same_event_whether_it_names_the_org_the_policy_places_it_in_or_not() -> None:
    """An attacker session: one event_id posted without an org, then with the policy's org, was counted twice (the
    ledger, which writes the placed org, keeps one row): the second is the same event, the first version wins."""
    worker = Worker()
    unnamed = spend(3).model_copy(update={"org": ""})
    worker.process([usage(0, unnamed), usage(1, unnamed.model_copy(update={"org": "acme", "cost_nanos": 9 * USD}))])
    assert worker.month_total() == (3 * USD, 1, 15)  # the first version, once
    assert [reason.split(":")[0] for reason in worker.dead_letters()] == ["conflicting_duplicate"]


FLOOD_RULES = """quotas:
  - {scope: "user:*", requests_per_day: 1000}
spike_rules:
  - {name: runaway, kind: hourly_ewma, scope: "feature:*"}
"""


def test_stage_one_keeps_every_window_but_announces_only_those_a_rule_reads() -> None:
    """An attacker session: 50,000 events from one ingest token, each with its own user, feature, customer and
    project, took a worker to 1.6 GB at 1,336 events/s, stage 2 merging and evaluating twenty new windows per event.
    Stage 2 now hears of the windows some rule reads: here a user's day (the quota), a feature's hour (the spike
    rule) and team alpha's month; a customer or a project that no rule names costs it nothing."""
    flood = policy_with(rest=FLOOD_RULES)
    worker = Worker(holder=PolicyHolder(flood, LATENESS))
    events = [
        spend(1).model_copy(update={"user": f"u{i}", "feature": f"f{i}", "customer": f"c{i}", "project": f"p{i}"})
        for i in range(200)
    ]
    worker.process([usage(offset, event) for offset, event in enumerate(events)])
    stored = totals_from_partials(worker.table)
    assert len({wkey.partition("|")[0] for wkey in stored}) == 3 + 4 * 200  # org, team, model; 4 new per event
    announced = {
        window.window
        for _, _, value, _, _ in worker.out.on(PARTIALS_TOPIC)
        for entries in internal_message(json.loads(value or b"")).scopes.values()  # type: ignore[union-attr]
        for window in entries
    }
    series = {(wkey.partition("|")[0].partition(":")[0], wkey.split("|")[1]) for wkey in announced}
    assert series == {("user", "day"), ("feature", "hour"), ("team", "month")}
    assert len(announced) == 2 * 200 + 1
    assert len(stored) == 5 * (3 + 4 * 200)  # stage 1 still keeps every series of every scope


def test_a_budget_applied_later_starts_from_the_spend_stage_one_kept_for_its_scope() -> None:
    """No rule read feature:late's windows, so stage 2 never heard of them; a policy that budgets it at $50 once
    it spent $60 this month must shut it off at once, from the month's spend, not from $0."""
    worker = Worker()
    late = [spend(30).model_copy(update={"feature": "late"}) for _ in range(2)]
    worker.process([usage(offset, event) for offset, event in enumerate(late)])
    assert not any("feature:late" in (value or b"").decode() for _, _, value, _, _ in worker.out.on(PARTIALS_TOPIC))
    owner = ScopeOwner(worker.holder, "feature:late")
    before = len(worker.out.records)
    budgeted = policy_with('  - {scope: "feature:late", period: month, amount_usd: 50}\n')
    assert worker.holder.adopt(budgeted)
    sent = worker.out.records[before:]
    month = f"feature:late|month|{MONTH}"
    announced = [
        window
        for _, _, value, _, _ in sent
        for entries in internal_message(json.loads(value or b"")).scopes.values()  # type: ignore[union-attr]
        for window in entries
    ]
    assert announced == [WindowPartial(month, 60 * USD, 2, 30, 1)]  # the newly read window only, at its total
    owner.receive(sent)
    assert owner.decisions() == ["shutoff"]
    worker.holder.adopt(policy(200))  # back to a policy that does not read it: nothing more to announce
    assert len(worker.out.records) == before + len(sent)


def test_the_windows_a_scope_is_announced_are_those_its_rules_read() -> None:
    reference = parse_policy((ROOT / "infra" / "policy" / "default.yaml").read_text(), "default.yaml")
    assert watched_series("team:engineering", reference) == {"month"}
    assert watched_series("feature:ai_chatbot", reference) == {"month", "day", "hour"}  # budget, both spike rules
    assert watched_series("feature:never-named", reference) == {"day", "hour"}
    assert watched_series("user:bob", reference) == {"day"}  # the requests-per-day quota
    assert watched_series("customer:c-1", reference) == frozenset()
    assert watched_series("project:anything", reference) == frozenset()
    listed = policy_with(rest='allowed_models: {"team:beta": ["gpt-4o-mini"]}\n')
    assert watched_series("team:beta", listed) == {"day"}  # evaluated when it spends, so its list is published


def test_a_name_with_a_bar_in_it_is_enforced_as_its_own_scope() -> None:
    """Names may contain ``|``, which also separates a window key's parts: stage 1 announced ``user:bob|1``'s
    windows under the scope ``user:bob``, so stage 2 evaluated a scope without those windows and the user's
    budget never held (nor did a policy's budget for a team named ``eng|ops``)."""
    holder = PolicyHolder(policy_with('  - {scope: "user:*", period: day, amount_usd: 5}\n'), LATENESS)
    worker = Worker(holder=holder)
    worker.process([usage(offset, spend(4).model_copy(update={"user": "bob|1"})) for offset in range(2)])
    owner = ScopeOwner(holder, "user:bob|1")
    owner.receive(worker.out.on(PARTIALS_TOPIC))
    assert owner.decisions() == ["shutoff"]  # $8 of $5 today


def test_windows_cut_in_another_timezone_are_forgotten_for_a_rebuild_from_the_ledger() -> None:
    """An attacker session: after a policy moved from Asia/Kolkata to UTC, a budget applied for a feature that had
    spent $5 saw $0.00006 (its month window was keyed by the Kolkata month start) and every request passed. Windows
    are keyed by their start in the policy's timezone, so windows cut elsewhere are rebuilt from the ledger."""
    first = Worker()  # Europe/Berlin
    first.process([usage(0, spend(5)), usage(1, spend(7))])
    assert first.changelog[-1][1][1] == "Europe/Berlin"  # the clock record says where the windows were cut
    utc = PolicyHolder(parse_policy((POLICY_YAML % 100).replace("Europe/Berlin", "UTC"), "<t>"), LATENESS)
    kept = Worker(list(first.changelog), holder=utc)  # no ledger to rebuild from: what there is stays
    assert kept.blank == [] and kept.month_total() == (12 * USD, 2, 30)
    rebuilt = Worker(list(first.changelog), holder=utc, rebuildable=True)
    assert rebuilt.blank == [1]  # for ``rebuild_from_ledger``
    assert rebuilt.table == {} and rebuilt.stage.sources[1].blank
    forgotten = {json.loads(key or b"") for topic, key, value, *_ in rebuilt.out.records if value is None}
    assert forgotten == {key for key, _ in first.changelog}  # windows, ids and clock: tombstoned
    same = Worker(list(first.changelog), rebuildable=True)  # the same timezone: nothing to rebuild
    assert same.blank == [] and same.month_total() == (12 * USD, 2, 30)


def test_a_partition_rebuilt_from_the_ledger_replaces_what_stage_two_held_of_it() -> None:
    """After a timezone change a worker rebuilt its partitions from the ledger, where an event can sit under another
    partition than the one it was read from (the ledger fills an org the event left out): stage 2 added the old
    share and the rebuilt one, and a team's day read $2 of $1 spent. A rebuild first tells stage 2 to forget."""
    worker = Worker()
    worker.process([usage(0, spend(30)), usage(1, spend(30))])  # $60 from source partition 1
    owner = ScopeOwner(worker.holder)
    owner.receive(worker.out.on(PARTIALS_TOPIC))
    assert owner.windows[ALPHA_MONTH] == {"1": [60 * USD, 2, 30, 1]}
    rebuilt = PartialsMessage(4, 0, 0, {"team:alpha": [WindowPartial(ALPHA_MONTH, 60 * USD, 2, 30, 9)]})
    owner.stage.process(owner.partition, [ForgetMessage(1)])
    assert owner.windows[ALPHA_MONTH] == {} and owner.decisions() == []  # nothing evaluated on a forget alone
    owner.stage.process(owner.partition, [ForgetMessage(4), rebuilt])
    assert owner.windows[ALPHA_MONTH] == {"4": [60 * USD, 2, 30, 9]}  # the same $60, under the ledger's partition
    assert internal_message(json.loads(ForgetMessage(4).encode())) == ForgetMessage(4)


def test_a_model_budget_counts_the_models_dated_names_whichever_name_the_client_or_provider_used() -> None:
    """An attacker session: a budget on ``model:gpt-4o`` counted only calls named exactly ``gpt-4o``. A client asked
    for ``gpt-4o-2024-08-06`` or ``GPT-4O`` and passed a spent cap, and OpenAI answers ``gpt-4o`` requests as
    ``gpt-4o-2024-08-06``, so the processor counted the cap's spend under another scope and published it unspent.
    Every spelling of the model counts in its one scope."""
    holder = PolicyHolder(policy_with('  - {scope: "model:gpt-4o", period: month, amount_usd: 100}\n'), LATENESS)
    worker = Worker(holder=holder)
    names = [("gpt-4o", "gpt-4o-2024-08-06"), ("GPT-4O", ""), ("openai/gpt-4o", ""), ("gpt-4o-2024-11-20", "")]
    events = [
        spend(30).model_copy(update={"model_requested": requested, "model_served": served})
        for requested, served in names
    ]
    worker.process([usage(offset, event) for offset, event in enumerate(events)])
    owner = ScopeOwner(holder, "model:gpt-4o")
    owner.receive(worker.out.on(PARTIALS_TOPIC))
    assert owner.decisions()[-1] == "shutoff"  # $120 of $100
    counted = {key.rsplit("|", 2)[0] for key in totals_from_partials(worker.table) if key.startswith("model:")}
    assert counted == {"model:gpt-4o"}

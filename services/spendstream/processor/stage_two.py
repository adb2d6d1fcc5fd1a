"""Stage 2: the owner of a scope merges its windows' totals and decides (one actor per internal partition).

``StageTwo.process`` takes one internal partition's batch of ``PartialsMessage``/``ReevaluateMessage``: merge
each source partition's window TOTAL into the ``windows`` table (``merge_partial`` keeps the highest offset,
so a re-sent or replayed message changes nothing), then evaluate every touched scope (``decision_publisher``)
and publish a Decision to ``spendstream.enforcement`` when its action changes and an Alert to
``spendstream.alerts`` once per crossing. A scope's ``ScopeState`` lives in the ``scopes`` table. Windows
expired at the partition's watermark are skipped and pruned (``spend_accounting.Retention``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from spendstream.core.codec import AvroCodec
from spendstream.core.metrics import PROCESSOR_ALERTS, PROCESSOR_DECISIONS
from spendstream.core.record_signature import RecordSigner, signature_headers
from spendstream.core.topics import ALERTS, ENFORCEMENT
from spendstream.processor.budget_gauges import BUDGET_GAUGES
from spendstream.processor.checkpoint import Changelog, RecordSink
from spendstream.processor.decision_publisher import (
    build_alert,
    build_decision,
    decision_signature,
    evaluate_scope,
    needs_decision,
    needs_spend_refresh,
    next_version,
)
from spendstream.processor.internal_topics import (
    ForgetMessage,
    InternalMessage,
    PartialsMessage,
    ReevaluateMessage,
    stage2_partition,
)
from spendstream.processor.policy_in_force import PolicyHolder
from spendstream.processor.spend_accounting import (
    Retention,
    Watermark,
    clock_key,
    is_clock_key,
    merge_partial,
    restore_clock,
    split_window_key,
    window_total,
)

MAX_ALERTED = 256  # crossings remembered per scope (old windows' keys are dropped first)


@dataclass
class ScopeState:
    """What stage 2 remembers of a scope between batches.

    Stored in the ``scopes`` table as JSON under the short names of ``to_json``, the format of every release.
    """

    partition: int  # the internal partition that owns the scope
    latest: dict[str, int] = field(default_factory=dict)  # period -> newest window start (epoch s)
    seen: int = 0  # newest occurred_at (epoch s) of the scope's usage
    signature: list[Any] | None = None  # ``decision_signature`` of the last published Decision
    version: int = 0  # version of the last published Decision
    alerted: list[str] = field(default_factory=list)  # keys of the crossings already alerted, oldest first

    def to_json(self) -> dict[str, Any]:
        return {
            "p": self.partition,
            "latest": self.latest,
            "seen": self.seen,
            "sig": self.signature,
            "version": self.version,
            "alerted": self.alerted,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ScopeState:
        return cls(
            value["p"],
            dict(value["latest"]),
            value["seen"],
            value["sig"],
            value["version"],
            list(value["alerted"]),
        )


class StageTwo:
    """Stage 2 of a worker: merges, evaluates and publishes for every internal partition it is assigned."""

    def __init__(
        self,
        holder: PolicyHolder,
        windows: Changelog,
        scopes: Changelog,
        out: RecordSink,
        partitions: int,
        signer: RecordSigner | None = None,
    ) -> None:
        self.holder = holder
        self.signer = signer
        self.windows = windows
        self.scopes = scopes
        self.out = out
        self.partitions = partitions
        self.clocks: dict[int, Watermark] = {}  # internal partition -> its retention clock (its sources' newest)
        self._decision_codec = AvroCodec("decision")
        self._alert_codec = AvroCodec("alert")

    def forget_clocks(self) -> None:
        """Partitions may have moved: each clock is read again from the restored table on its next batch."""
        self.clocks.clear()

    def process(self, partition: int, messages: Sequence[InternalMessage]) -> None:
        """Merge and evaluate one internal partition's batch; nothing is durable before the checkpoint."""
        windows = self.windows
        dirty_windows: dict[str, dict[str, list[int]]] = {}
        states: dict[str, ScopeState] = {}
        retention = self.holder.retention
        clock = self.clocks.get(partition)
        if clock is None:
            clock = self.clocks[partition] = Watermark(restore_clock(windows.data, partition))
        partials = [message for message in messages if isinstance(message, PartialsMessage)]
        reevaluate = any(isinstance(message, ReevaluateMessage) for message in messages)
        watermark_ms = clock.after(max((message.watermark_ms for message in partials), default=0))
        watermark_s = watermark_ms // 1000
        for message in messages:  # in order: a forget drops what came before it, not what follows
            if isinstance(message, ForgetMessage):
                self._forget(partition, message.source, dirty_windows)
                continue
            if not isinstance(message, PartialsMessage):
                continue
            for scope, entries in message.scopes.items():
                state = states.get(scope)
                if state is None:
                    stored = self.scopes.get(scope)
                    state = states[scope] = ScopeState.from_json(stored) if stored else ScopeState(partition)
                latest = state.latest
                for entry in entries:
                    wkey = entry.window
                    _, period, start = split_window_key(wkey)
                    if not retention.live(period, start, watermark_s):
                        continue  # a source partition behind this one's watermark: never recreate a deleted window
                    parts = dirty_windows.get(wkey)
                    if parts is None:
                        parts = dict(windows.get(wkey) or {})
                    if merge_partial(parts, message.source, entry[1:]) or wkey in dirty_windows:
                        dirty_windows[wkey] = parts
                    if start > latest.get(period, -1):
                        latest[period] = start
                state.seen = max(state.seen, message.newest_event_s)
        for wkey, parts in dirty_windows.items():
            windows.put(partition, wkey, parts)
        if reevaluate:
            for scope, stored in list(self.scopes.data.items()):
                if stored["p"] == partition and scope not in states:
                    states[scope] = ScopeState.from_json(stored)
            for message in messages:  # named scopes without spend yet (a feature registered at $0)
                for scope in message.scopes if isinstance(message, ReevaluateMessage) else ():
                    if scope not in states and stage2_partition(scope, self.partitions) == partition:
                        states[scope] = ScopeState(partition)
        for scope, state in states.items():
            self._evaluate(scope, state, partition)
        if clock.scan_due():
            self._prune(partition, clock.durable_ms // 1000, retention)
        if (record := clock.persist(watermark_ms)) is not None:
            windows.put(partition, clock_key(partition), record)

    def _forget(self, partition: int, source: int, dirty_windows: dict[str, dict[str, list[int]]]) -> None:
        """Drop source partition ``source``'s share of every window of this internal partition (``ForgetMessage``).
        Nothing is evaluated for it: the rebuilt shares follow at once, and a scope is evaluated when they come."""
        key = str(source)
        for wkey in self.windows.key_snapshot():
            if is_clock_key(wkey) or stage2_partition(split_window_key(wkey)[0], self.partitions) != partition:
                continue
            parts = dirty_windows.get(wkey)
            if parts is None:
                parts = dict(self.windows.get(wkey) or {})
            if parts.pop(key, None) is not None:
                dirty_windows[wkey] = parts

    def _prune(self, partition: int, watermark_s: int, retention: Retention) -> None:
        """Tombstone this internal partition's expired windows (a scope's windows live in its ``stage2_partition``)."""
        mine = [
            k
            for k in self.windows.key_snapshot()
            if not is_clock_key(k) and stage2_partition(split_window_key(k)[0], self.partitions) == partition
        ]
        for wkey in retention.expired_windows(mine, watermark_s):
            self.windows.delete(partition, wkey)

    def _totals(self, wkey: str) -> tuple[int, int, int]:
        return window_total(self.windows.get(wkey) or {})

    def _evaluate(self, scope: str, state: ScopeState, partition: int) -> None:
        policy = self.holder.policy
        now = datetime.now(UTC)
        verdict = evaluate_scope(
            scope, state.latest, self._totals, policy, datetime.fromtimestamp(state.seen, UTC), now
        )
        BUDGET_GAUGES.update(scope, verdict.standings)
        alerted = state.alerted
        for crossing in verdict.crossings:
            if crossing.key not in alerted:
                alert = build_alert(scope, crossing, policy.version, now)
                key, value = scope.encode(), self._alert_codec.encode(alert.to_avro())
                self.out.send(ALERTS, key, value, headers=signature_headers(self.signer, ALERTS, key, value))
                PROCESSOR_ALERTS.labels(alert.kind.value).inc()
                alerted.append(crossing.key)
        state.alerted = alerted[-MAX_ALERTED:]
        if needs_decision(state.signature, verdict) or needs_spend_refresh(verdict, state.version, now):
            version = next_version(state.version, now)
            decision = build_decision(scope, verdict, version, policy.version, now)
            key, value = scope.encode(), self._decision_codec.encode(decision.to_avro())
            self.out.send(ENFORCEMENT, key, value, headers=signature_headers(self.signer, ENFORCEMENT, key, value))
            PROCESSOR_DECISIONS.labels(decision.action.value).inc()
            state.signature = decision_signature(verdict)
            state.version = version
        state.partition = partition
        self.scopes.put(partition, scope, state.to_json())

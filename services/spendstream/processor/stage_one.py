"""Stage 1: one worker's source partitions of ``spendstream.usage``, folded batch by batch into partials.

``StageOne.process`` takes one partition's batch (confluent-kafka messages in offset order): decode, validate,
check lateness, price events that lack ``cost_nanos`` (bad events go to ``spendstream.usage.dlq`` with a
reason), fold into the per-(window, source partition) partials of the ``partials`` table, counting each
event_id once (``SourcePartition.fold``), write each changed partial once, then the batch's applied ids, then
tombstones, and announce every touched partial's TOTAL to the stage-2 partition that owns its scope
(``PartialsMessage``). Everything goes to the batch's output; ``checkpoint.Checkpoint`` flushes it before the
source offsets are committed. Why the fold is exact: ``spend_accounting``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import chain
from typing import Any, NamedTuple

from confluent_kafka import Message

from spendstream.core.attribution import DIRECT_FIELDS, HIERARCHY
from spendstream.core.codec import AvroCodec, DecodeError
from spendstream.core.events import lateness_problem, name_fields_problem, usage_record_problem
from spendstream.core.matching import model_scope_name
from spendstream.core.metrics import PROCESSOR_DEAD_LETTERED
from spendstream.core.policy import Policy
from spendstream.core.pricing import CostOverflowError, UnknownModelError, price_record
from spendstream.core.topics import DLQ_REASON_HEADER, DLQ_SOURCE_HEADER, USAGE, USAGE_DLQ
from spendstream.processor.applied_ids import APPLY, CONFLICT, AppliedIds, Spill
from spendstream.processor.checkpoint import Changelog, RecordSink
from spendstream.processor.internal_seal import InternalSeal, seal_headers
from spendstream.processor.internal_topics import (
    ENTRIES_PER_MESSAGE,
    PARTIALS_TOPIC,
    PartialsMessage,
    WindowPartial,
    scope_chunks,
    stage2_partition,
)
from spendstream.processor.policy_in_force import PolicyHolder
from spendstream.processor.scopes import hierarchy_scopes, scopes_for
from spendstream.processor.spend_accounting import (
    IDS_PER_RECORD,
    QUARTER_HOUR_S,
    Partial,
    Watermark,
    adopted_ids,
    clock_key,
    clock_record,
    content_digest,
    dedup_id,
    fold_batch,
    fold_fresh,
    ids_key,
    is_adopted,
    is_clock_key,
    is_ids_key,
    pack_ids,
    partial_key,
    placed_owner,
    restore_clock,
    scope_of,
    split_ids_key,
    split_partial_key,
    windows_timezone,
)
from spendstream.processor.usage_decoder import FieldDecoder
from spendstream.processor.watched_windows import rule_footprint, watched

log = logging.getLogger(__name__)

Starts = Callable[[int], tuple[tuple[str, int], ...]]  # epoch s -> the live (period, window start) pairs


class UsageItem(NamedTuple):
    """A valid, priced usage event of one source partition, as the fold needs it."""

    offset: int
    cost_nanos: int
    tokens: int
    scopes: Sequence[str]
    occurred_s: int
    event_id: bytes  # its ``dedup_id``: the event_id within the (org, team) it is charged to
    digest: int = 0  # ``content_digest`` of the encoded event (0: unknown)
    # more of the event's scopes: stage 1 passes its two memoised lists (hierarchy, the rest) as they are, so the
    # fold sums every event of one list at once instead of scope by scope
    more_scopes: Sequence[str] = ()
    # 1 for a call that reached a model; 0 for one an edge refused (``blocked``): it used no tokens and is no request
    # (a user's refused attempts used up its request quota: an attacker session)
    requests: int = 1


class Stage1Batch(NamedTuple):
    """What one stage-1 batch writes: changed partials first, then its ids records, then tombstones."""

    touched: dict[str, Partial]  # every partial the batch touched (announced to stage 2)
    changed: Iterable[str]  # the partials whose value changed (written to the table)
    ids_records: list[tuple[str, list[Any]]]  # (ids key, value), written after the partials
    expired: list[str]  # ids records fallen behind the horizon, deleted last
    conflicts: Sequence[tuple[int, int]] = ()  # (offset, offset of the applied first version): to the DLQ


@dataclass
class SourcePartition:
    """Stage 1's memory of one source partition: the highest offset in any stored partial of it (None: no
    partial), the event ids it applied within the dedup horizon, and its retention clock."""

    partition: int
    applied: AppliedIds
    clock: Watermark = field(default_factory=Watermark)
    applied_high: int | None = None

    @property
    def blank(self) -> bool:
        """No partial, no ids, no clock: nothing of this partition survived (a rebuild from the ledger may help)."""
        return self.applied_high is None and not self.applied.records and not self.clock.durable_ms

    def fold(
        self,
        items: Sequence[UsageItem],
        newest_arrival_ms: int,
        current: Callable[[str], Sequence[int] | None],
        starts: Starts,
    ) -> Stage1Batch:
        """Fold a batch of this partition (``items`` in offset order), counting each event_id once.

        Copies of ids applied at another offset are dropped first (a copy with other content is a conflict: the
        first version wins); the rest folds with ``fold_fresh`` when it starts above every stored offset
        (nothing to skip), else event by event with ``fold_batch``. ``current`` reads a stored partial;
        ``starts`` gives an event's live windows, so windows expired at the batch's watermark are skipped.
        """
        applied = self.applied
        # the items' columns, transposed in C: offsets, costs, tokens, scopes, occurred_s, event_ids, digests, more
        columns = tuple(zip(*items, strict=True)) or ((),) * len(UsageItem._fields)
        ids, at, digested = columns[5], columns[0], columns[6]
        verdicts = None
        if not applied.admit_new(ids, at, digested):
            verdicts = applied.admit_versions(zip(ids, at, digested, strict=True))
        if verdicts is None or verdicts.count(APPLY) == len(verdicts):  # no copies: the usual batch
            kept, conflicts = items, []
        else:
            kept = [item for item, verdict in zip(items, verdicts, strict=True) if verdict == APPLY]
            conflicts = [
                (item.offset, applied.first_offset(item.event_id))
                for item, verdict in zip(items, verdicts, strict=True)
                if verdict == CONFLICT
            ]
            columns = tuple(zip(*kept, strict=True)) or ((),) * len(UsageItem._fields)
        offsets, costs, tokens, scopes, occurred, event_ids, digests, more, requests = columns
        applied.newest_ms = max(applied.newest_ms, newest_arrival_ms)
        high = -1 if self.applied_high is None else self.applied_high
        touched: dict[str, Partial] = {}
        changed: Iterable[str] = ()
        if kept and offsets[0] > high:
            buckets = [at - at % QUARTER_HOUR_S for at in occurred]  # ``quarter_hour``, inline
            # each event as two items with disjoint scope lists, every list's events in offset order
            fresh = chain(
                zip(offsets, costs, tokens, scopes, buckets, requests, strict=True),
                zip(offsets, costs, tokens, more, buckets, requests, strict=True),
            )
            touched = fold_fresh(fresh, self.partition, current, starts)
            changed = touched
        elif kept:
            replay = [
                (
                    item.offset,
                    item.cost_nanos,
                    item.tokens,
                    [
                        f"{scope}|{period}|{start}"
                        for scope in (*item.scopes, *item.more_scopes)
                        for period, start in starts(item.occurred_s)
                    ],
                    item.requests,
                )
                for item in kept
            ]
            touched, changed = fold_batch(replay, self.partition, current)
        if touched:
            self.applied_high = max(high, items[-1].offset)
        records: list[tuple[str, list[Any]]] = []
        for start in range(0, len(kept), IDS_PER_RECORD):
            end = start + IDS_PER_RECORD
            entries = list(zip(event_ids[start:end], offsets[start:end], strict=True))
            key = ids_key(self.partition, entries[0][1])
            value = pack_ids(applied.newest_ms, entries, digests[start:end])
            applied.remember(key, value, entries)
            records.append((key, value))
        return Stage1Batch(touched, changed, records, applied.expire(), tuple(conflicts))


def restore_sources(
    table: MutableMapping[str, Any],
    partitions: Iterable[int],
    horizon_ms: int,
    spill: Spill | None = None,
    horizons: MutableMapping[int, AppliedIds] | None = None,
) -> dict[int, SourcePartition]:
    """Stage 1's memory of ``partitions`` from its restored table: the highest stored offset of each, its applied
    ids and its persisted watermark.

    ``horizons`` are the worker's horizons by partition: its own, and those faust's restore built as it applied
    the changelog (``recovery.HorizonAdoption``), the table keeping only ``adopted_ids`` of each ids record. A
    whole record still in the table is adopted here (oldest first); with ``horizons`` the table then keeps only
    its ``adopted_ids`` (without, the table is left whole). An adopted value whose record the horizon does not hold
    is left over from a record deleted meanwhile, and is dropped. Horizons of other partitions are dropped: faust
    reads a partition that comes back from its start."""
    keep_whole = horizons is None
    horizons = {} if horizons is None else horizons
    partitions = list(partitions)
    for partition in [p for p in horizons if p not in partitions]:
        del horizons[partition]
    highs: dict[int, int] = {}
    ids_records: dict[int, list[tuple[int, str]]] = {partition: [] for partition in partitions}
    for key, value in table.items():
        if is_ids_key(key):
            partition, first_offset = split_ids_key(key)
            if partition in ids_records:
                ids_records[partition].append((first_offset, key))
        elif not is_clock_key(key) and (partition := split_partial_key(key)[1]) in ids_records:
            highs[partition] = max(highs.get(partition, -1), value[3])
    sources = {}
    for partition, records in ids_records.items():
        applied = horizons.get(partition) or AppliedIds(horizon_ms, spill=spill)
        horizons[partition] = applied
        for _, key in sorted(records):
            value = table[key]
            if not is_adopted(value):
                applied.adopt(key, value)
                if not keep_whole:
                    table[key] = adopted_ids(value)
            elif key not in applied.records:
                del table[key]
        clock = Watermark(restore_clock(table, partition))
        sources[partition] = SourcePartition(partition, applied, clock, highs.get(partition))
    return sources


_MICROSECOND = timedelta(microseconds=1)
_new_item = tuple.__new__
DIRECT_PREFIXES = tuple(f"{name}:" for name in DIRECT_FIELDS)
# the fast path's fields: what the checks of ``usage_record_problem`` and the fold read, in this order, but the
# strings (``SCOPE_SPANS``)
CHECKED_FIELDS = (
    "event_id",
    "occurred_at",
    "cost_nanos",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "latency_ms",
    "reasoning_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "input_image_tokens",
    "output_image_tokens",
    "cache_write_1h_tokens",
    "web_search_requests",
    "status",
)
MODEL_FIELDS = ("provider", "model_requested", "model_served")
# runs of consecutive string fields read as raw bytes, the keys of the memos of scopes: the hierarchy's (its scopes
# depend on the policy), then the direct fields' and the model's (together: the rest of the scopes)
SCOPE_SPANS = (HIERARCHY, DIRECT_FIELDS, MODEL_FIELDS)
# what an event whose spans miss a memo decodes: every string of the spans, checked as the codec would
SCOPE_FIELDS = ("provider", "model_requested", *HIERARCHY, *DIRECT_FIELDS, "model_served", "model_requested")
SCOPES_MEMO = 100_000  # attributions whose scopes each memo keeps (it starts over when full)


def _rest_scopes(rest: tuple[str, ...]) -> list[str]:
    """The scopes ``scopes_for`` adds after the hierarchy: the direct fields, then the model (served, else
    requested). ``rest`` holds the values of ``DIRECT_FIELDS``, ``model_served`` and ``model_requested``."""
    *direct, served, requested = rest
    scopes = [prefix + value for prefix, value in zip(DIRECT_PREFIXES, direct, strict=True) if value]
    if served or requested:
        scopes.append(f"model:{model_scope_name(served or requested)}")
    return scopes


def _at(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


class StageOne:
    """Stage 1 of a worker: the ``SourcePartition`` memory of the usage partitions it owns, and the fold of one
    partition's batch into ``partials`` (a ``Changelog``), the DLQ and the internal topic, all on ``out``."""

    def __init__(
        self,
        holder: PolicyHolder,
        partials: Changelog,
        out: RecordSink,
        partitions: int,
        *,
        allowed_lateness: timedelta,
        max_future_skew: timedelta,
        dedup_horizon: timedelta,
        spill: Spill | None = None,
        seal: InternalSeal | None = None,
    ) -> None:
        self.holder = holder
        self.seal = seal  # seals what goes to stage 2 (``internal_seal``)
        self.partials = partials
        self.out = out
        self.partitions = partitions
        self.allowed_lateness = allowed_lateness
        self.max_future_skew = max_future_skew
        self.horizon_ms = int(dedup_horizon.total_seconds() * 1000)
        self.spill = spill  # where the horizons' older runs go (``applied_ids``)
        self.sources: dict[int, SourcePartition] = {}
        self._codec = AvroCodec("usage_event")
        self._checked = FieldDecoder(self._codec, CHECKED_FIELDS, SCOPE_SPANS)
        self._scope_fields = FieldDecoder(self._codec, SCOPE_FIELDS)
        self._hierarchies_policy: Policy | None = None
        # the hierarchy span's bytes -> (``hierarchy_scopes`` under ``_hierarchies_policy``, ``owner_prefix``)
        self._hierarchies: dict[bytes, tuple[list[str], bytes]] = {}
        # the direct fields' and the model's spans, joined -> ``_rest_scopes`` (only events with a provider and a
        # requested model: a hit vouches for both)
        self._rests: dict[bytes, list[str]] = {}

    def restore(
        self, partitions: Iterable[int], horizons: MutableMapping[int, AppliedIds], rebuildable: bool = False
    ) -> list[int]:
        """Adopt the restored table's memory of ``partitions`` and the ``horizons`` restored with it; returns those
        to rebuild from the ledger: the blank ones, and with ``rebuildable`` (a ledger to rebuild from) those whose
        calendar windows were cut in another timezone than the policy's, forgotten first (``forget_partition``)."""
        self.sources = restore_sources(self.partials.data, partitions, self.horizon_ms, self.spill, horizons)
        timezone = self.holder.policy.timezone
        for partition in list(self.sources):
            cut_in = windows_timezone(self.partials.data, partition)
            if cut_in is None or cut_in == timezone or self.sources[partition].blank:
                continue
            if not rebuildable:
                log.error(
                    "partition %d's windows are cut in %s and the policy's timezone is %s, with no ledger to rebuild "
                    "them from: day, week, month and quarter budgets count from the windows of %s onwards",
                    partition, cut_in, timezone, timezone,
                )  # fmt: skip
                continue
            log.warning(
                "partition %d's windows are cut in %s and the policy's timezone is %s: rebuilding them from the "
                "ledger", partition, cut_in, timezone,
            )  # fmt: skip
            horizons[partition] = self.forget_partition(partition)
        return [partition for partition, source in self.sources.items() if source.blank]

    def forget_partition(self, partition: int) -> AppliedIds:
        """Forget all a partition holds (tombstones on the changelog): its windows, clock and applied ids, whose
        ledger rows the rebuild counts (an id kept here would count its event a second time when read again). It
        is blank, for ``recovery.rebuild_from_ledger`` to cut its windows again in the policy's timezone; returns
        its new, empty horizon."""
        for key in list(self.partials.data):
            if is_ids_key(key):
                mine = split_ids_key(key)[0] == partition
            else:
                mine = key == clock_key(partition) or (not is_clock_key(key) and split_partial_key(key)[1] == partition)
            if mine:
                self.partials.delete(partition, key)
        fresh = AppliedIds(self.horizon_ms, spill=self.spill)
        self.sources[partition] = SourcePartition(partition, fresh)
        return fresh

    def source(self, partition: int) -> SourcePartition:
        found = self.sources.get(partition)
        if found is None:
            found = self.sources[partition] = SourcePartition(partition, AppliedIds(self.horizon_ms, spill=self.spill))
        return found

    def process(self, partition: int, messages: Sequence[Message]) -> None:
        """Fold one partition's batch and write what it changed; nothing is durable before the checkpoint."""
        items, newest_ms, watermark_ms = self._accept(messages)
        if not items:
            return
        source = self.source(partition)
        clock = source.clock
        # a producer's clock far ahead must not expire every window: the watermark stops at now + the skew
        skew_ms = int(self.max_future_skew.total_seconds() * 1000)
        watermark_ms = clock.after(min(watermark_ms, int(time.time() * 1000) + skew_ms))
        retention = self.holder.retention
        starts = retention.live_starts(self.holder.calendar.starts, watermark_ms // 1000)
        batch = source.fold(items, newest_ms, self.partials.data.get, starts)
        if batch.conflicts:
            by_offset = {message.offset(): message for message in messages}
            for offset, first in batch.conflicts:
                reason = (
                    f"conflicting_duplicate: event_id already counted with other content (offset {first}); "
                    "the first version wins"
                )
                self._to_dlq(by_offset[offset], reason, "conflicting_duplicate")
        partials = self.partials
        touched = batch.touched
        for pkey in batch.changed:
            partials.put(partition, pkey, list(touched[pkey]))
        # after the partials: a crash may lose these ids (the replay skips their events by offset and records the
        # ids again), never the partials they vouch for
        for key, value in batch.ids_records:
            partials.put(partition, key, value, kept=adopted_ids(value))
        for key in batch.expired:
            partials.delete(partition, key)
        if clock.scan_due():
            for key in retention.expired_partials(partials.key_snapshot(), partition, clock.durable_ms // 1000):
                partials.delete(partition, key)
        if (record := clock.persist(watermark_ms)) is not None:
            partials.put(partition, clock_key(partition), clock_record(record[0], self.holder.policy.timezone))
        self._announce(partition, touched, max(item.occurred_s for item in items), watermark_ms)

    def _accept(self, messages: Sequence[Message]) -> tuple[list[UsageItem], int, int]:
        """The valid, priced events of a batch (the rest to the DLQ), the newest arrival of any decodable
        event and the newest arrival of an accepted one (Kafka timestamps, epoch ms).

        Most events take the fast path: the numbers the checks and the fold need read by ``usage_decoder``, checked
        with integer arithmetic, and the attribution's raw bytes looked up in the memos of scopes (an event whose
        bytes miss them decodes its attribution once: ``_learn_scopes``). An event it cannot read, one that fails
        a check and one without ``cost_nanos`` takes the full path (``_accept_decoded``), which decides and words
        every DLQ reason."""
        policy = self.holder.policy
        if policy is not self._hierarchies_policy:
            self._hierarchies_policy, self._hierarchies = policy, {}
        known_hierarchies, known_rests = self._hierarchies, self._rests
        fast = self._checked.decode
        skew_us = self.max_future_skew // _MICROSECOND  # the checks of ``usage_record_problem`` and
        lateness_us = self.allowed_lateness // _MICROSECOND  # ``lateness_problem``, in epoch microseconds
        items: list[UsageItem] = []
        append = items.append
        newest_ms = watermark_ms = 0
        for message in messages:
            value = message.value()
            kind, stamp_ms = message.timestamp()
            fields = fast(value) if kind and value else None
            if fields is not None:
                (
                    event_id,
                    occurred_us,
                    cost,
                    inputs,
                    outputs,
                    cached,
                    written,
                    latency,
                    reasoning,
                    in_audio,
                    out_audio,
                    in_image,
                    out_image,
                    written_1h,
                    searches,
                    status,
                    hierarchy,
                    direct,
                    model,
                ) = fields
                arrived_us = stamp_ms * 1000
                if not (
                    cost is None
                    or cost < 0
                    or (cost and status == "blocked")  # refused with the reason by the full path
                    # a bitwise or of ints is negative if any of them is
                    or inputs | outputs | cached | written | latency | reasoning | in_audio | out_audio < 0
                    or in_image | out_image | written_1h | searches < 0
                    or cached + written + in_audio + in_image > inputs
                    or reasoning + out_audio + out_image > outputs
                    or written_1h > written
                    or occurred_us < 0
                    or occurred_us > arrived_us + skew_us
                    or arrived_us - occurred_us > lateness_us
                ):
                    known = known_hierarchies.get(hierarchy)
                    lower = known_rests.get(rest := direct + model)
                    if known is None or lower is None:
                        learned = self._learn_scopes(value, hierarchy, rest, policy)
                        known, lower = learned or (None, None)
                    if known is not None:
                        upper, owner = known
                        if stamp_ms > newest_ms:
                            newest_ms = stamp_ms
                        if stamp_ms > watermark_ms:
                            watermark_ms = stamp_ms
                        served = status != "blocked"
                        item = _new_item(  # ``UsageItem(...)`` without its Python-level __new__
                            UsageItem,
                            (
                                message.offset(),
                                cost,
                                inputs + outputs if served else 0,
                                upper,
                                occurred_us // 1_000_000,
                                dedup_id(event_id, owner),
                                content_digest(value),
                                lower,
                                1 if served else 0,
                            ),
                        )
                        append(item)
                        continue
            decoded = self._accept_decoded(message)
            if decoded is not None:
                accepted, arrived_ms = decoded
                newest_ms = max(newest_ms, arrived_ms)
                if accepted is not None:
                    watermark_ms = max(watermark_ms, arrived_ms)
                    append(accepted)
        return items, newest_ms, watermark_ms

    def _learn_scopes(
        self, value: bytes, hierarchy: bytes, rest: bytes, policy: Policy
    ) -> tuple[tuple[list[str], bytes], list[str]] | None:
        """The scopes of an event whose attribution bytes missed a memo, memoised under those bytes (with the
        hierarchy's ``owner_prefix``): its strings decoded (so checked as the codec checks them). None if they do
        not decode, the event lacks a provider or a requested model, or a name cannot make a scope (the full path
        words why)."""
        fields = self._scope_fields.decode(value)
        if fields is None or not fields[0] or not fields[1]:
            return None
        named = dict(zip(SCOPE_FIELDS, fields, strict=True))
        if name_fields_problem(named):
            return None
        upper = self._hierarchies.get(hierarchy)
        if upper is None:
            if len(self._hierarchies) >= SCOPES_MEMO:
                self._hierarchies.clear()
            scopes = hierarchy_scopes(*fields[2 : 2 + len(HIERARCHY)], policy)
            upper = self._hierarchies[hierarchy] = (scopes, placed_owner(named["org"], named["team"], scopes))
        lower = self._rests.get(rest)
        if lower is None:
            if len(self._rests) >= SCOPES_MEMO:
                self._rests.clear()
            lower = self._rests[rest] = _rest_scopes(fields[2 + len(HIERARCHY) :])
        return upper, lower

    def _accept_decoded(self, message: Message) -> tuple[UsageItem | None, int] | None:
        """One event through the codec and the full checks: None if it does not decode (to the DLQ), else its
        item (None: it went to the DLQ) and its arrival (epoch ms)."""
        try:
            record = self._codec.decode(message.value())
        except DecodeError as exc:
            self._to_dlq(message, str(exc), "undecodable")
            return None
        policy = self.holder.policy
        kind, stamp_ms = message.timestamp()
        arrived = _at(stamp_ms / 1000) if kind else datetime.now(UTC)
        arrived_ms = stamp_ms if kind else int(arrived.timestamp() * 1000)
        occurred = record["occurred_at"]
        problem = usage_record_problem(record, arrived, self.max_future_skew) or lateness_problem(
            occurred, arrived, self.allowed_lateness
        )
        if problem:
            self._to_dlq(message, problem, "late" if problem.startswith("late event") else "invalid")
            return None, arrived_ms
        cost = record["cost_nanos"]
        if cost is None:
            try:
                cost = price_record(record, occurred, policy.price_table).cost_nanos  # as the ledger sink prices it
            except UnknownModelError as exc:
                self._to_dlq(message, f"unknown model, policy rejects it: {exc}", "unknown_model")
                return None, arrived_ms
            except CostOverflowError as exc:
                self._to_dlq(message, f"cost overflow: {exc}", "cost_overflow")
                return None, arrived_ms
            except ValueError as exc:
                self._to_dlq(message, f"cannot price: {exc}", "unpriceable")
                return None, arrived_ms
        served = record["status"] != "blocked"
        scopes = scopes_for(record, policy)
        item = UsageItem(
            message.offset(),
            cost,
            record["input_tokens"] + record["output_tokens"] if served else 0,
            scopes,
            int(occurred.timestamp()),
            dedup_id(record["event_id"].bytes, placed_owner(record["org"], record["team"], scopes)),
            content_digest(message.value()),
            requests=1 if served else 0,
        )
        return item, arrived_ms

    def _announce(self, partition: int, touched: Mapping[str, Partial], newest_event_s: int, watermark_ms: int) -> None:
        """One ``PartialsMessage`` per stage-2 partition with the totals of the windows of the scopes it owns that
        some rule reads (``watched_windows``)."""
        by_target: dict[int, dict[str, list[WindowPartial]]] = {}
        watched_series = watched(self.holder.policy).series  # at announce time: see ``announce_newly_watched``
        for pkey, value in touched.items():
            wkey, _ = split_partial_key(pkey)
            scope, series, _ = wkey.rsplit("|", 2)  # names may contain "|"
            if series not in watched_series(scope):
                continue
            target = by_target.setdefault(stage2_partition(scope, self.partitions), {})
            target.setdefault(scope, []).append(WindowPartial(wkey, *value))
        for target, scopes in by_target.items():
            self._send_partials(partition, target, newest_event_s, watermark_ms, scopes)

    def announce_restored(self, partitions: Iterable[int]) -> int:
        """Tell stage 2 again the total of every window these restored source partitions hold that some rule reads;
        returns how many.

        Stage 2's windows are derived from these announcements, and a stage-2 owner may miss some: after kill -9
        and a rebalance, a worker was seen holding windows without the totals of the source partitions announced
        in the generation before (a window short by two thirds, nothing re-sent because stage 1 had committed
        everything). Announcing the restored totals after every restore makes stage 2 converge to stage 1's exact
        state whatever it missed; ``merge_partial`` ignores a total it already holds, so a repeat changes nothing.
        ``newest_event_s`` is 0 (a repeat says nothing new of when a scope last spent) and the watermark is the
        one the partition persisted (never ahead of what stage 2 saw). Messages go out as they fill, so memory
        stays bounded (1.2 million partials: 4-5 s, in a thread; the event loop keeps serving faust)."""
        return self._announce_stored(set(partitions), watched(self.holder.policy).reads)

    def announce_newly_watched(self, before: Policy, after: Policy) -> int:
        """After ``before`` gave way to ``after`` (a policy applied, a budget adjustment in force): announce the
        stored totals of the windows ``after`` reads and ``before`` did not; returns how many.

        Called from the thread that swapped the policy, once ``holder.policy`` is ``after``, while stage 1 may be
        folding a batch. Nothing is missed: a batch writes its partials before it announces them, with the policy
        it finds at that moment, so a batch announced under ``before`` wrote its totals before this walk began,
        and any later one announces under ``after`` itself. A total announced twice changes nothing
        (``merge_partial`` keeps the highest offset)."""
        if rule_footprint(before) == rule_footprint(after):
            return 0
        was, now = watched(before).reads, watched(after).reads
        count = self._announce_stored(None, lambda wkey: now(wkey) and not was(wkey))
        if count:
            log.info("stage 1 announced %d window totals that policy %s reads and the one before did not",
                     count, after.version)  # fmt: skip
        return count

    def _announce_stored(self, wanted: set[int] | None, keep: Callable[[str], bool]) -> int:
        """Announce the stored total of every window ``keep`` accepts, of the source partitions ``wanted`` (None:
        every one held here), in messages sent as they fill."""
        if wanted is None:
            wanted = set(self.sources.copy())  # (a policy swap calls this from its own thread)
        watermarks = {partition: self.source(partition).clock.durable_ms for partition in wanted}
        targets: dict[str, int] = {}  # scope -> its stage-2 partition
        pending: dict[tuple[int, int], dict[str, list[WindowPartial]]] = {}  # (source, target) -> scopes
        sizes: dict[tuple[int, int], int] = {}
        data = self.partials.data
        count = 0
        for key in list(data):  # the keys only: a snapshot of the items would hold a tuple per partial
            if is_ids_key(key) or is_clock_key(key) or (value := data.get(key)) is None:
                continue
            wkey, source = split_partial_key(key)
            if source not in wanted or not keep(wkey):
                continue
            scope = scope_of(wkey)
            target = targets.get(scope)
            if target is None:
                target = targets[scope] = stage2_partition(scope, self.partitions)
            bucket = (source, target)
            pending.setdefault(bucket, {}).setdefault(scope, []).append(WindowPartial(wkey, *value))
            count += 1
            if (size := sizes.get(bucket, 0) + 1) < ENTRIES_PER_MESSAGE:
                sizes[bucket] = size
                continue
            sizes[bucket] = 0
            self._send_partials(source, target, 0, watermarks[source], pending.pop(bucket))
        for (source, target), scopes in pending.items():
            self._send_partials(source, target, 0, watermarks[source], scopes)
        return count

    def _send_partials(
        self, source: int, target: int, newest_event_s: int, watermark_ms: int, scopes: dict[str, list[WindowPartial]]
    ) -> None:
        # in chunks: a batch of 5,000 events with their own users, features and projects touches ~100,000 windows,
        # one message of which passed the broker's size limit and crashed the worker at every restart (an
        # attacker session: enforcement went stale for every team)
        for chunk in scope_chunks(scopes):
            value = PartialsMessage(source, newest_event_s, watermark_ms, chunk).encode()
            self.out.send(PARTIALS_TOPIC, None, value, target, seal_headers(self.seal, target, value))

    def seed(
        self,
        partition: int,
        windows: Mapping[str, tuple[int, int, int]],
        recent: Sequence[tuple[bytes, int]],
        start: int,
        now_ms: int,
    ) -> dict[str, list[WindowPartial]]:
        """Adopt a partition rebuilt from the ledger (``ledger_rebuild``): its window totals as partials at
        ``start - 1`` (stage 1 reads from ``start``), its recent ids as applied at offset -1 (no offset stage 1
        reads), its clock at ``now_ms``. Returns the window totals stage 2 reads, by scope."""
        source = self.source(partition)
        scopes: dict[str, list[WindowPartial]] = {}
        reads = watched(self.holder.policy).reads
        for wkey, (nanos, requests, tokens) in windows.items():
            value = [nanos, requests, tokens, start - 1]
            self.partials.put(partition, partial_key(wkey, partition), value)
            if reads(wkey):
                scopes.setdefault(scope_of(wkey), []).append(WindowPartial(wkey, *value))
        if windows:
            source.applied_high = start - 1
        applied = source.applied
        for chunk, first in enumerate(range(0, len(recent), IDS_PER_RECORD)):
            rows = recent[first : first + IDS_PER_RECORD]
            entries = [(event_id, -1) for event_id, _ in rows]
            applied.admit(entries)
            key, value = ids_key(partition, -1 - chunk), pack_ids(max(ms for _, ms in rows), entries)
            applied.remember(key, value, entries)
            self.partials.put(partition, key, value, kept=adopted_ids(value))
        source.clock = Watermark(now_ms)
        self.partials.put(partition, clock_key(partition), clock_record(now_ms, self.holder.policy.timezone))
        return scopes

    def _to_dlq(self, message: Message, reason: str, kind: str) -> None:
        PROCESSOR_DEAD_LETTERED.labels(kind).inc()  # bad input only, not the per-event path
        self.out.send(
            USAGE_DLQ,
            message.key(),
            message.value(),
            headers=[(DLQ_REASON_HEADER, reason.encode()), (DLQ_SOURCE_HEADER, f"{USAGE}/processor".encode())],
        )

"""Topic names and layouts: part of the public contract (docs/architecture.md §3)."""

from __future__ import annotations

from dataclasses import dataclass, field

USAGE = "spendstream.usage"
ENFORCEMENT = "spendstream.enforcement"
ALERTS = "spendstream.alerts"
POLICY = "spendstream.policy"
USAGE_DLQ = "spendstream.usage.dlq"
BUDGET_ADJUSTMENTS = "spendstream.budget_adjustments"  # budget requests and their steps, keyed by request id
AUDIT_HEADS = "spendstream.audit.heads"  # the audit chain's heads, anchored outside the ledger

HEARTBEAT_KEY_PREFIX = b"heartbeat:"  # enforcement-topic keys of processor heartbeats (never a decision scope)

DLQ_REASON_HEADER = "spendstream.dlq.reason"
DLQ_SOURCE_HEADER = "spendstream.dlq.source"
DLQ_STAGE_HEADER = "spendstream.dlq.stage"
# On every usage record an Emitter produces: that Emitter's (that process's) random id, so a gateway that follows
# the usage topic for routing skips its own calls without decoding them (it observed them as they were made).
ORIGIN_HEADER = "spendstream.origin"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(usage_partitions: int) -> list[TopicSpec]:
    """Every topic spendstream needs, with compaction where the contract says so."""
    compacted = {"cleanup.policy": "compact"}
    return [
        TopicSpec(USAGE, usage_partitions),
        TopicSpec(ENFORCEMENT, 1, compacted),
        TopicSpec(ALERTS, 1),
        TopicSpec(POLICY, 1, compacted),
        TopicSpec(USAGE_DLQ, 1),
        TopicSpec(BUDGET_ADJUSTMENTS, 1, compacted),
        TopicSpec(AUDIT_HEADS, 1, compacted),
    ]

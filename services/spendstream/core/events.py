"""Pydantic models that mirror ``schemas/*.avsc`` field by field (a test proves it).

Money fields are integer nano-USD. ``to_avro`` / ``from_avro`` convert between a model and
the plain dict the codec writes, without a round trip through JSON.

A UsageEvent's counts are strict integers (JSON ``"10"``, ``true`` or ``10.0`` are refused, not coerced) and
bounded per event: at most ``MAX_EVENT_TOKENS`` (10^11) in each token field and ``MAX_EVENT_COST_NANOS`` (10^16,
$10,000,000) of cost. Both are far above any real call, and keep every priced cost, and the sum of a billion
such events, within Int64 (Avro ``long``, ClickHouse ``Int64``).
"""

from __future__ import annotations

import calendar
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from operator import itemgetter
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationInfo, field_validator

from spendstream.core.attribution import (
    ATTRIBUTION_FIELDS,
    MAX_NAME_CHARS,
    WILDCARD_VALUE,
    Attribution,
    AttributionValue,
    attribution_value_problem,
    name_too_long_text,
    template_value_text,
)

NANOS_PER_USD = 1_000_000_000
INT64_MAX = 2**63 - 1
# Avro ``long`` and ClickHouse ``Int64``: a larger Python int would pass validation and then fail to encode.
Int64 = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
NonNegativeInt64 = Annotated[int, Field(ge=0, le=INT64_MAX)]
MAX_EVENT_TOKENS = 10**11  # per token field of one event; a whole 1 M-token context is 10**6
MAX_EVENT_COST_NANOS = 10**16  # $10,000,000 per event
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens")
# Counts that refine the four above (modalities, reasoning, cache TTL) or are billed per use (web searches).
DETAIL_FIELDS = (
    "reasoning_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "input_image_tokens",
    "output_image_tokens",
    "cache_write_1h_tokens",
    "web_search_requests",
)
TokenCount = Annotated[int, Strict(), Field(ge=0, le=MAX_EVENT_TOKENS)]
# The names an event's scopes are built from; usage_record_problem holds them to what AttributionValue and Name
# refuse at the edges (length, a template value), so a bad edge's event goes to the DLQ instead of stalling a stage.
NAME_FIELDS = (*ATTRIBUTION_FIELDS, "provider", "model_requested", "model_served")
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
MAX_TAGS, MAX_TAG_VALUE_CHARS = 64, 1024
# free labels, bounded so that no event is larger than a broker takes (a tag of a megabyte was accepted with 202)
Tags = Annotated[dict[Name, Annotated[str, Field(max_length=MAX_TAG_VALUE_CHARS)]], Field(max_length=MAX_TAGS)]
EventCostNanos = Annotated[int, Strict(), Field(ge=0, le=MAX_EVENT_COST_NANOS)]
StrictNonNegativeInt64 = Annotated[int, Strict(), Field(ge=0, le=INT64_MAX)]


class UsageStatus(StrEnum):
    ok = "ok"
    error = "error"
    blocked = "blocked"


class Action(StrEnum):
    """Enforcement actions, in increasing order of restriction."""

    allow = "allow"
    alert = "alert"
    fallback = "fallback"
    throttle = "throttle"
    shutoff = "shutoff"


# The restriction rank of each action (the schema's order), for the processor and the edges alike; keyed by the
# plain string, so an edge's ``"shutoff"`` and ``Action.shutoff`` find the same rank.
ACTION_RANK: dict[str, int] = {str(action): rank for rank, action in enumerate(Action)}
# While a scope has traffic, the processor publishes its budget's decision again at most this often (seconds), with
# the spend as it is then: edges reserve against it, and a refusal of an edge's own is confirmed or lifted this soon.
SPEND_REFRESH_S = 2.0


class AlertKind(StrEnum):
    threshold = "threshold"
    spike = "spike"
    forecast = "forecast"
    quota = "quota"
    policy = "policy"


class Severity(StrEnum):
    info = "info"
    warning = "warning"
    critical = "critical"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps must carry a timezone (naive datetimes are ambiguous)")
    return value.astimezone(UTC)


class _AvroModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_avro(self) -> dict[str, Any]:
        """The dict the Avro codec writes (pydantic keeps validated values in ``__dict__``)."""
        return dict(self.__dict__)

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> Self:
        """Build from a decoded Avro record, which the schema has already type-checked."""
        return cls.model_validate(record)


class UsageEvent(_AvroModel):
    """One LLM API call. Prompt and completion text are deliberately not fields. The attribution fields stand
    where the schema puts them; ``attribution`` reads them as one ``Attribution``."""

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: datetime = Field(default_factory=utcnow)
    org: AttributionValue = ""
    division: AttributionValue = ""
    team: AttributionValue = ""
    project: AttributionValue = ""
    feature: AttributionValue = ""
    user: AttributionValue = ""
    customer: AttributionValue = ""
    environment: AttributionValue = ""
    tags: Tags = Field(default_factory=dict)
    provider: Name
    model_requested: Name
    model_served: Name = ""
    input_tokens: TokenCount = 0
    output_tokens: TokenCount = 0
    cached_input_tokens: TokenCount = 0
    cache_write_tokens: TokenCount = 0
    cost_nanos: EventCostNanos | None = None
    price_source: Name = ""
    latency_ms: StrictNonNegativeInt64 = 0
    status: UsageStatus = UsageStatus.ok
    decision_applied: Name = ""
    cache_hit: Annotated[bool, Strict()] = False  # "yes" is not a boolean (an attacker session found it read as one)
    reasoning_tokens: TokenCount = 0
    input_audio_tokens: TokenCount = 0
    output_audio_tokens: TokenCount = 0
    input_image_tokens: TokenCount = 0
    output_image_tokens: TokenCount = 0
    cache_write_1h_tokens: TokenCount = 0
    web_search_requests: TokenCount = 0
    service_tier: Name = ""

    _utc = field_validator("occurred_at")(_as_utc)

    @field_validator("status")
    @classmethod
    def _blocked_costs_nothing(cls, status: UsageStatus, info: ValidationInfo) -> UsageStatus:
        """A call the edge refused reached no model: a cost on it would be spend that never happened (counted
        against its budgets and charged back). Cost is declared before status, so it is validated by now."""
        cost = info.data.get("cost_nanos")
        if status is UsageStatus.blocked and cost:
            raise ValueError(f"a blocked call reached no model and costs nothing, but cost_nanos is {cost}")
        return status

    @property
    def attribution(self) -> Attribution:
        return Attribution(**{name: getattr(self, name) for name in ATTRIBUTION_FIELDS})

    def to_avro(self) -> dict[str, Any]:
        record = dict(self.__dict__)
        record["event_id"] = str(self.event_id)
        return record


class Decision(_AvroModel):
    scope: str
    action: Action
    fallback_models: dict[str, str] = Field(default_factory=dict)
    throttle_rps: float | None = Field(None, ge=0)
    allowed_models: list[str] = Field(default_factory=list)
    reason: str = ""
    spend_nanos: Int64 = 0
    limit_nanos: Int64 = 0
    period: str = ""
    period_start: datetime | None = None
    expires_at: datetime | None = None
    version: NonNegativeInt64
    issued_at: datetime = Field(default_factory=utcnow)
    policy_version: str = ""
    critical_throttle_rps: dict[str, float] = Field(default_factory=dict)


class Heartbeat(_AvroModel):
    """A processor worker's proof of life (and of the policy version it enforces) on the enforcement topic."""

    worker: str
    policy_name: str = ""
    policy_version: str = ""
    interval_s: float = 1.0
    issued_at: datetime = Field(default_factory=utcnow)


class Alert(_AvroModel):
    alert_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    scope: str
    kind: AlertKind
    severity: Severity = Severity.warning
    message: str
    spend_nanos: Int64 = 0
    limit_nanos: Int64 = 0
    period: str = ""
    occurred_at: datetime = Field(default_factory=utcnow)
    policy_version: str = ""

    def to_avro(self) -> dict[str, Any]:
        record = dict(self.__dict__)
        record["alert_id"] = str(self.alert_id)
        return record


class PolicyRecord(_AvroModel):
    """A validated policy document as it travels on ``spendstream.policy``."""

    name: str
    version: str
    document: str
    published_at: datetime = Field(default_factory=utcnow)
    published_by: str = ""


_COUNTS_AND_COST = itemgetter(*TOKEN_FIELDS, "cost_nanos")
_DETAIL_OF = itemgetter(*DETAIL_FIELDS)
_NO_DETAIL = (0,) * len(DETAIL_FIELDS)


def _is_token_count(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_EVENT_TOKENS


def usage_bounds_problem(record: Mapping[str, Any]) -> str | None:
    """Why a usage record's token counts or cost are not integers within the per-event bounds, or None.

    For records that did not come through ``UsageEvent`` validation (the Emitter checks what it is handed, on
    every event it encodes): a few comparisons when all is well, a message naming the field otherwise.
    """
    try:
        i, o, c, w, cost = _COUNTS_AND_COST(record)
        if (
            type(i) is int
            and type(o) is int
            and type(c) is int
            and type(w) is int
            and 0 <= i <= MAX_EVENT_TOKENS
            and 0 <= o <= MAX_EVENT_TOKENS
            and 0 <= c <= MAX_EVENT_TOKENS
            and 0 <= w <= MAX_EVENT_TOKENS
            and (cost is None or (type(cost) is int and 0 <= cost <= MAX_EVENT_COST_NANOS))
            and ((detail := _DETAIL_OF(record)) == _NO_DETAIL or all(_is_token_count(d) for d in detail))
        ):
            return None
    except (KeyError, TypeError):
        pass
    counts = (*TOKEN_FIELDS, *DETAIL_FIELDS)
    for name, limit in (*((f, MAX_EVENT_TOKENS) for f in counts), ("cost_nanos", MAX_EVENT_COST_NANOS)):
        value = record.get(name, 0)
        if value is None and name == "cost_nanos":
            continue
        if type(value) is not int:
            return f"{name} must be an integer, got {value!r}"
        if value < 0:
            return f"{name} is negative: {value}"
        if value > limit:
            return f"{name} {value} exceeds the limit of {limit} per event"
    return None


def detail_subset_problem(record: Mapping[str, Any]) -> str | None:
    """Why the detail counts do not fit inside the four token counts they refine, or None.

    Audio and image prompt tokens are the uncached ones, so they share the prompt with cached reads and cache
    writes; reasoning, audio and image output tokens share the output; 1-hour cache writes are cache writes.
    """
    get = record.get
    inputs = get("cached_input_tokens", 0) + get("cache_write_tokens", 0)
    if inputs + get("input_audio_tokens", 0) + get("input_image_tokens", 0) > get("input_tokens", 0):
        return "cached, cache write, audio and image input tokens exceed input_tokens"
    if get("reasoning_tokens", 0) + get("output_audio_tokens", 0) + get("output_image_tokens", 0) > get(
        "output_tokens", 0
    ):
        return "reasoning, audio and image output tokens exceed output_tokens"
    if get("cache_write_1h_tokens", 0) > get("cache_write_tokens", 0):
        return "cache_write_1h_tokens exceed cache_write_tokens"
    return None


def name_fields_problem(record: Mapping[str, Any]) -> str | None:
    """Why an event's names cannot make scopes, or None: one longer than ``MAX_NAME_CHARS`` characters, or an
    attribution value of ``*``, whose scope (``user:*``) would be a policy template: its spend would count against,
    and its decision stop, every user."""
    for name in NAME_FIELDS:
        value = record.get(name) or ""
        if len(value) > MAX_NAME_CHARS:
            return name_too_long_text(name, len(value))
    for name in ATTRIBUTION_FIELDS:
        if record.get(name) == WILDCARD_VALUE:
            return template_value_text(name)
    # what the API and the gateway refuse (``attribution_value_problem``) is refused here too, for events that
    # reach the broker another way (an attacker session: "sa\nles" and "sal\u200bes" escaped team:sales's budget)
    for name in ATTRIBUTION_FIELDS:
        value = record.get(name) or ""
        if not (value.isascii() and value.isprintable() and value == value.strip()):
            problem = attribution_value_problem(name, value)
            if problem:
                return problem
    return None


def lateness_problem(occurred_at: datetime, arrived_at: datetime, allowed_lateness: timedelta) -> str | None:
    """Why an event is too late to count, or None.

    Lateness is measured against the event's Kafka timestamp (when it was produced), not the processor's
    clock, so a replay after a crash judges every event exactly as the first pass did.
    """
    if arrived_at - occurred_at > allowed_lateness:
        return (
            f"late event: occurred_at {occurred_at.isoformat()} arrived {duration_text(arrived_at - occurred_at)} "
            f"later, beyond the allowed lateness of {duration_text(allowed_lateness)}"
        )
    return None


def duration_text(duration: timedelta) -> str:
    """A duration as people read it, to the second: ``4 d 12 h 9 min 41 s``, ``1 h``, ``0 s``."""
    seconds = int(duration.total_seconds())
    parts = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {unit}")
    return " ".join(parts) or "0 s"


def ledger_expiry_problem(occurred_at: datetime, now: datetime, ttl_months: int) -> str | None:
    """Why the ledger would delete an event at once (its TTL, ``occurred_at + ttl_months`` months, has passed), or
    None. An event older than the processor's lateness but within the TTL is still real spend for the ledger."""
    months = occurred_at.year * 12 + occurred_at.month - 1 + ttl_months
    year, month = divmod(months, 12)
    last_day = calendar.monthrange(year, month + 1)[1]  # ClickHouse's month arithmetic keeps the day, clamped
    expires = occurred_at.replace(year=year, month=month + 1, day=min(occurred_at.day, last_day))
    if expires <= now:
        return (
            f"occurred_at {occurred_at.isoformat()} is older than the ledger keeps ({ttl_months} months, "
            "SPENDSTREAM_LEDGER_TTL_MONTHS): it would be deleted, not recorded"
        )
    return None


BLOCKED_WITH_COST = "a blocked call reached no model and costs nothing"


def usage_record_problem(record: dict[str, Any], now: datetime, max_future_skew: timedelta) -> str | None:
    """Why a decoded usage record must not enter the ledger, or None if it may.

    The Avro schema already guarantees types; this checks what a schema cannot say.
    Kept as one cheap function so the sink validates 100k records/s without pydantic.
    """
    event_id = record.get("event_id")
    if not event_id:
        return "missing event_id"
    if not isinstance(event_id, uuid.UUID):
        try:
            uuid.UUID(str(event_id))
        except ValueError:
            return f"event_id is not a UUID: {event_id!r}"
    for name in ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens", "latency_ms"):
        if record.get(name, 0) < 0:
            return f"{name} is negative: {record[name]}"
    for name in DETAIL_FIELDS:
        if record.get(name, 0) < 0:
            return f"{name} is negative: {record[name]}"
    cost = record.get("cost_nanos")
    if cost is not None and cost < 0:
        return f"cost_nanos is negative: {cost}"
    if cost and record.get("status") == "blocked":  # what the edges' events say (``_blocked_costs_nothing``)
        return f"{BLOCKED_WITH_COST}, but cost_nanos is {cost}"
    if record.get("cached_input_tokens", 0) + record.get("cache_write_tokens", 0) > record.get("input_tokens", 0):
        return "cached_input_tokens + cache_write_tokens exceed input_tokens"
    subset = detail_subset_problem(record)
    if subset:
        return subset
    occurred_at = record.get("occurred_at")
    if occurred_at is None:
        return "missing occurred_at"
    if occurred_at > now + max_future_skew:
        return f"occurred_at {occurred_at.isoformat()} is more than {max_future_skew} in the future"
    if not record.get("provider") or not record.get("model_requested"):
        return "missing provider or model_requested"
    return name_fields_problem(record)

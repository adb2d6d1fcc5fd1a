"""Decoding in Python: UsageEvent values into ledger records, or rejections with a dead-letter reason.

This is the sink's exact path (docs/architecture.md §7.1). The fast path frames values for ClickHouse
(:mod:`spendstream.sink.staging`) and only what SQL does not judge, or cannot read, comes here.
fastavro reads against a copy of the schema without logical types (timestamps stay integer
microseconds, which is also what a ``DateTime64(6)`` column stores); :func:`fast_problem_free` admits
the common record cheaply, and ``AvroCodec.decode`` with ``usage_record_problem`` pinpoint anything
unusual. Pure: no broker, no ledger.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any

import fastavro

from spendstream.core.attribution import MAX_NAME_CHARS, WILDCARD_VALUE
from spendstream.core.codec import SINGLE_OBJECT_MAGIC, AvroCodec, DecodeError, fingerprint
from spendstream.core.events import (
    ATTRIBUTION_FIELDS,
    BLOCKED_WITH_COST,
    DETAIL_FIELDS,
    NAME_FIELDS,
    usage_record_problem,
)
from spendstream.core.placement import NO_PLACEMENT
from spendstream.core.pricing import EMPTY_TABLE, CostOverflowError, PriceTable, UnknownModelError, price_record
from spendstream.core.schemas import load_schema_json

# Insert columns; ``ingested_at`` is filled in by its DEFAULT. ``arrived_at`` is when the event's message reached the
# broker (its Kafka timestamp, as the processor reads it): a rebuild of the budgets from the ledger leaves out what
# arrived later than the processor's allowed lateness, as the processor did.
LEDGER_COLUMNS = (
    "event_id",
    "occurred_at",
    "org",
    "division",
    "team",
    "project",
    "feature",
    "user",
    "customer",
    "environment",
    "tags",
    "provider",
    "model_requested",
    "model_served",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "cost_nanos",
    "price_source",
    "latency_ms",
    "status",
    "decision_applied",
    "cache_hit",
    *DETAIL_FIELDS,
    "service_tier",
    "arrived_at",
)
_ROW = itemgetter(*LEDGER_COLUMNS)
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_names = itemgetter(*NAME_FIELDS)  # the checks of ``name_fields_problem``, on a raw record
_attributions = itemgetter(*ATTRIBUTION_FIELDS)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _without_logical_types(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {key: _without_logical_types(value) for key, value in schema.items() if key != "logicalType"}
    if isinstance(schema, list):
        return [_without_logical_types(item) for item in schema]
    return schema


def fast_problem_free(record: dict[str, Any], future_limit_us: int) -> bool:
    """A cheap sufficient condition for ``usage_record_problem(...) is None`` on a raw record.

    ``record`` is decoded without logical types (``occurred_at`` in integer microseconds).
    True guarantees the full check passes; False only means "ask the full check", which
    also accepts UUID spellings other than the canonical lower-case one.
    """
    inp = record["input_tokens"]
    cached = record["cached_input_tokens"]
    written = record["cache_write_tokens"]
    cost = record["cost_nanos"]
    output = record["output_tokens"]
    audio_in, image_in = record["input_audio_tokens"], record["input_image_tokens"]
    reasoning, audio_out = record["reasoning_tokens"], record["output_audio_tokens"]
    image_out = record["output_image_tokens"]
    written_1h = record["cache_write_1h_tokens"]
    return bool(
        cached >= 0
        and written >= 0
        and min(audio_in, image_in, reasoning, audio_out, image_out, written_1h, record["web_search_requests"]) >= 0
        and cached + written + audio_in + image_in <= inp
        and reasoning + audio_out + image_out <= output
        and written_1h <= written
        and output >= 0
        and record["latency_ms"] >= 0
        and (cost is None or cost >= 0)
        and not (cost and record["status"] == "blocked")
        and record["occurred_at"] <= future_limit_us
        and record["provider"]
        and record["model_requested"]
        and _CANONICAL_UUID.fullmatch(record["event_id"])
        and WILDCARD_VALUE not in (attribution := _attributions(record))
        and all(value.isascii() and value.isprintable() and value == value.strip() for value in attribution)
        and max(map(len, _names(record))) <= MAX_NAME_CHARS
    )


def micros(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (no float on the way)."""
    return (moment - _EPOCH) // _MICROSECOND


@dataclass
class Rejected:
    index: int
    stage: str  # "decode", "validate" or "price"
    reason: str


@dataclass
class DecodedValues:
    records: list[dict[str, Any]]  # raw form: occurred_at in micros, event_id a string
    rejected: list[Rejected]
    kept: list[int] = field(default_factory=list)  # position of each record among the decoded values


class UsageDecoder:
    """Turns UsageEvent values into ledger records, or into rejections with a reason.

    Events that arrive without ``cost_nanos`` are priced here with ``price_record``, the function
    the processor prices them with, so the ledger holds what the spend windows counted.
    """

    def __init__(
        self, max_future_skew: timedelta, registry_url: str | None = None, prices: PriceTable = EMPTY_TABLE
    ) -> None:
        self.codec = AvroCodec("usage_event", registry_url)
        self.max_future_skew = max_future_skew
        self.prices = prices
        self.placement = NO_PLACEMENT  # fills what an event does not say as the processor counts it
        self._header = SINGLE_OBJECT_MAGIC + fingerprint("usage_event")
        self._raw_schema = fastavro.parse_schema(_without_logical_types(load_schema_json("usage_event")))

    def decode(
        self, values: Sequence[bytes | None], now: datetime, arrivals: Sequence[int] | None = None
    ) -> DecodedValues:
        """``arrivals``: when each value's message reached the broker (epoch ms); ``now`` for every one without."""
        future_limit_us = micros(now + self.max_future_skew)
        arrived = arrivals if arrivals is not None else [micros(now) // 1000] * len(values)
        read = fastavro.schemaless_reader
        raw_schema, header = self._raw_schema, self._header
        records: list[dict[str, Any]] = []
        rejected: list[Rejected] = []
        kept: list[int] = []
        for index, value in enumerate(values):
            if value is not None and value[:10] == header:
                stream = io.BytesIO(value)
                stream.seek(10)
                try:
                    record = read(stream, raw_schema, None)
                except Exception:  # corrupt body: the exact path below names the problem
                    record = None
                if record is not None and stream.tell() == len(value) and fast_problem_free(record, future_limit_us):
                    record["arrived_at"] = arrived[index]
                    if self._keep_priced(index, record, records, rejected):
                        kept.append(index)
                    continue
            if self._decode_exactly(index, value, now, arrived[index], records, rejected):
                kept.append(index)
        return DecodedValues(records, rejected, kept)

    def _keep_priced(
        self, index: int, record: dict[str, Any], records: list[dict[str, Any]], rejected: list[Rejected]
    ) -> bool:
        if record["cost_nanos"] is None:
            at = _EPOCH + record["occurred_at"] * _MICROSECOND
            try:
                price = price_record(record, at, self.prices)
            except UnknownModelError as exc:
                rejected.append(Rejected(index, "price", f"unknown model, policy rejects it: {exc}"))
                return False
            except CostOverflowError as exc:
                rejected.append(Rejected(index, "price", f"cost overflow: {exc}"))
                return False
            record["cost_nanos"], record["price_source"] = price.cost_nanos, price.source
        if self.placement is not NO_PLACEMENT:
            self.placement.place(record)
        records.append(record)
        return True

    def _decode_exactly(
        self,
        index: int,
        value: bytes | None,
        now: datetime,
        arrived_ms: int,
        records: list[dict[str, Any]],
        rejected: list[Rejected],
    ) -> bool:
        try:
            record = self.codec.decode(value or b"")
        except DecodeError as exc:
            rejected.append(Rejected(index, "decode", str(exc)))
            return False
        problem = usage_record_problem(record, now, self.max_future_skew)
        if problem is not None:
            rejected.append(Rejected(index, "validate", problem))
            return False
        record["event_id"] = str(record["event_id"])
        record["occurred_at"] = micros(record["occurred_at"])
        record["arrived_at"] = arrived_ms
        return self._keep_priced(index, record, records, rejected)


def columns_of(records: Sequence[dict[str, Any]]) -> list[Sequence[Any]]:
    """Ledger columns (in ``LEDGER_COLUMNS`` order) of raw records, transposed in C."""
    if not records:
        return [() for _ in LEDGER_COLUMNS]
    return list(zip(*map(_ROW, records), strict=True))


_REASON_KINDS = (
    ("unknown schema fingerprint", "unknown_schema"),
    ("missing event_id", "bad_event_id"),
    ("event_id is not a UUID", "bad_event_id"),
    ("hexadecimal UUID", "bad_event_id"),  # the uuid logical type refuses it while decoding
    ("with base 16", "bad_event_id"),  # ... or fails parsing its hex digits
    ("is negative", "negative_value"),
    ("exceed input_tokens", "cached_exceeds_input"),
    ("in the future", "future_occurred_at"),
    ("missing occurred_at", "missing_occurred_at"),
    ("missing provider or model_requested", "missing_provider_or_model"),
    ("characters (", "name_too_long"),
    ("(a policy template)", "template_value"),
    ("unknown model", "unknown_model"),
    (BLOCKED_WITH_COST, "blocked_with_cost"),
    ("the ledger refuses this record", "ledger_refused"),
)


def reason_kind(stage: str, reason: str) -> str:
    """A bounded label for a dead-letter reason (the full reason travels in the header)."""
    for needle, kind in _REASON_KINDS:
        if needle in reason:
            return kind
    return "undecodable" if stage == "decode" else "invalid"

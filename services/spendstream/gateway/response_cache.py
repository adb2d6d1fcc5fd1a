"""Exact-match response cache for the gateway: identical requests within a TTL are answered from memory.

- **Key**: sha256 of the canonical JSON (sorted keys, no whitespace) of the endpoint, the cache partition (the
  scope that opted in, so one tenant never receives another's answer) and the request body without the fields
  that do not change the answer (``user``, ``metadata``). Everything else counts: model, messages, temperature,
  tools, ``stream`` and ``stream_options`` (a streamed answer is stored as SSE events and only replayed to a
  streaming request of the same shape).
- **Bounds**: a TTL per entry and a total size in bytes (LRU eviction); an entry larger than
  ``max_entry_bytes`` is not stored. Entries live in this process's memory only, never on disk or in Kafka:
  caching keeps completion text in memory, which is why it is opt-in per scope (``CacheConfig.scopes``).
- **Streams**: ``StreamRecorder`` collects the SSE events the client was sent, split on event boundaries; only
  a stream that completed with status 200 becomes an entry. ``replay`` yields the stored events in order.
- **Metering**: a hit is a usage event with ``cache_hit=True``, ``cost_nanos=0`` and zero tokens (no provider
  consumed any), and ``tags["saved_nanos"]`` = what the original call's token counts cost now on the model that
  served it (``savings_tags``). The ledger then reports hit rate (``countIf(cache_hit) / count()``) and savings
  (``sum(toInt64OrZero(tags['saved_nanos']))``) without double counting spend.

Not thread-safe: one event loop (the gateway's) owns a cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from spendstream.core.events import UsageEvent, UsageStatus
from spendstream.core.matching import ScopeSet
from spendstream.core.pricing import EMPTY_TABLE, PriceTable, UnknownModelError, normalise_usage, price_usage

IGNORED_FIELDS = frozenset({"user", "metadata"})
ENTRY_OVERHEAD_BYTES = 256  # per-entry bookkeeping counted against max_bytes
_EVENT_END = re.compile(rb"\r?\n\r?\n")


class CacheConfig(BaseModel):
    """Gateway settings for the cache; ``scopes`` lists who opted in (``team:support``, ``feature:faq_bot``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scopes: list[str] = Field(
        default_factory=list, description="Scopes whose requests are cached (``team:*``: every team); empty: off."
    )
    ttl_s: float = Field(300.0, gt=0)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_entry_bytes: int = Field(1024 * 1024, ge=1)
    max_temperature: float | None = Field(
        None, ge=0, description="Cache only requests at or below this temperature (None: any)."
    )

    def partition(self, attribution: Mapping[str, str]) -> str | None:
        """The request's cache partition: the first opted-in scope (``dimension:value``, in attribution order) it
        belongs to, within its org and team. A scope other than a team's (``feature:faq``) may be named by several
        teams: each team has its own entries, so one team never receives another's answer. None if it did not opt
        in."""
        opted_in = self._opted_in
        if not opted_in:
            return None
        for dimension, value in attribution.items():
            if opted_in.covers(dimension, value):
                tenant = f"org:{attribution.get('org', '')}|team:{attribution.get('team', '')}"
                return f"{dimension}:{value}|{tenant}"
        return None

    @cached_property
    def _opted_in(self) -> ScopeSet:
        """``scopes`` compiled by the policy's scope matcher (read on every request, built once)."""
        return ScopeSet(self.scopes)

    def cacheable(self, body: Mapping[str, Any]) -> bool:
        if self.max_temperature is None:
            return True
        temperature = body.get("temperature", 1.0)
        return isinstance(temperature, int | float) and temperature <= self.max_temperature


def cache_key(body: Mapping[str, Any], endpoint: str, partition: str, model: str | None = None) -> str:
    """sha256 hex of the normalised request (with ``model``, if given, as the model it will be sent with); key order
    and JSON whitespace do not matter."""
    kept = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    if model is not None:
        kept["model"] = model
    canonical = json.dumps(
        [endpoint, partition, kept], sort_keys=True, separators=(",", ":"), allow_nan=False
    )  # ASCII escapes: text with lone surrogates (valid JSON escapes) still hashes
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A stored answer: a JSON body or the SSE events of a stream, plus what metering needs."""

    status: int
    content_type: str
    body: bytes = b""
    events: tuple[bytes, ...] = ()
    provider: str = ""
    model_served: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def streamed(self) -> bool:
        return bool(self.events)

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(e) for e in self.events) + ENTRY_OVERHEAD_BYTES


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    expired: int = 0
    evictions: int = 0
    too_large: int = 0


@dataclass
class ResponseCache:
    """LRU over ``max_bytes`` with a TTL; ``clock`` is monotonic seconds (injected for tests)."""

    ttl_s: float
    max_bytes: int
    max_entry_bytes: int
    clock: Callable[[], float] = time.monotonic
    stats: CacheStats = field(default_factory=CacheStats)
    _entries: OrderedDict[str, tuple[float, CachedResponse]] = field(default_factory=OrderedDict)
    _bytes: int = 0

    @classmethod
    def from_config(cls, config: CacheConfig, clock: Callable[[], float] = time.monotonic) -> ResponseCache:
        return cls(config.ttl_s, config.max_bytes, min(config.max_entry_bytes, config.max_bytes), clock)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedResponse | None:
        found = self._entries.get(key)
        if found is None:
            self.stats.misses += 1
            return None
        expires, entry = found
        if self.clock() >= expires:
            self._drop(key)
            self.stats.expired += 1
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry

    def put(self, key: str, entry: CachedResponse) -> bool:
        """Store an entry (replacing one under the same key); False if it is larger than ``max_entry_bytes``."""
        size = entry.size
        if size > self.max_entry_bytes:
            self.stats.too_large += 1
            return False
        if key in self._entries:
            self._drop(key)
        while self._entries and self._bytes + size > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.stats.evictions += 1
        self._entries[key] = (self.clock() + self.ttl_s, entry)
        self._bytes += size
        self.stats.stores += 1
        return True

    def _drop(self, key: str) -> None:
        _, entry = self._entries.pop(key)
        self._bytes -= entry.size


def make_entry(
    *,
    content_type: str,
    provider: str,
    model_served: str,
    raw_usage: Mapping[str, Any] | None,
    body: bytes = b"",
    events: tuple[bytes, ...] = (),
) -> CachedResponse | None:
    """An entry for a successful response, or None when its usage block is missing or malformed (without token
    counts a hit's savings would be unknown, so such answers are not cached)."""
    if not raw_usage:
        return None
    try:
        tokens = normalise_usage(provider, raw_usage)
    except (TypeError, ValueError):
        return None
    return CachedResponse(
        200, content_type, body, events, provider, model_served,
        tokens.input_tokens, tokens.output_tokens, tokens.cached_read, tokens.cache_write,
    )  # fmt: skip


def split_events(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE events (each with its blank-line terminator) and the incomplete rest."""
    events, end = [], 0
    for match in _EVENT_END.finditer(data):
        events.append(data[end : match.end()])
        end = match.end()
    return events, data[end:]


class StreamRecorder:
    """Collects the bytes a streaming client was sent as whole SSE events, up to a size limit.

    ``feed`` takes exactly what was written to the client; ``finish`` returns the events, or None when the
    stream outgrew the limit or ended mid-event (an incomplete stream must never be replayed).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._events: list[bytes] = []
        self._rest = b""
        self._size = 0
        self.abandoned = False

    def feed(self, data: bytes) -> None:
        if self.abandoned or not data:
            return
        self._size += len(data)
        if self._size > self.max_bytes:
            self.abandoned = True
            self._events, self._rest = [], b""
            return
        events, self._rest = split_events(self._rest + data)
        self._events.extend(events)

    def finish(self) -> tuple[bytes, ...] | None:
        if self.abandoned or self._rest.strip() or not self._events:
            return None
        return tuple(self._events)


def replay(entry: CachedResponse) -> Iterator[bytes]:
    """The stored SSE events of a streamed entry, in order, each a complete event."""
    yield from entry.events


def savings_tags(entry: CachedResponse, prices: PriceTable = EMPTY_TABLE, at: datetime | None = None) -> dict[str, str]:
    """Tags of a cache-hit usage event: ``cache: hit`` and ``saved_nanos``, the cost the call would have had
    (the stored token counts priced now on the model that served them). No ``saved_nanos`` without a price."""
    tags = {"cache": "hit"}
    try:
        saved = price_usage(
            entry.provider,
            entry.model_served,
            entry.input_tokens,
            entry.output_tokens,
            entry.cached_input_tokens,
            entry.cache_write_tokens,
            at,
            prices,
        )
    except (UnknownModelError, ValueError):
        return tags
    tags["saved_nanos"] = str(saved.cost_nanos)
    return tags


def cache_hit_event(
    *,
    entry: CachedResponse,
    attribution: Mapping[str, str],
    model_requested: str,
    latency_ms: int,
    decision: str,
    tags: Mapping[str, str],
    prices: PriceTable = EMPTY_TABLE,
    now: datetime | None = None,
) -> UsageEvent:
    """The usage event of a request answered from the cache: free, zero tokens, savings in the tags."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return UsageEvent(
        occurred_at=now,
        **attribution,
        tags={**tags, **savings_tags(entry, prices, now)},
        provider=entry.provider,
        model_requested=model_requested,
        model_served=entry.model_served,
        cost_nanos=0,
        price_source="cache",
        latency_ms=latency_ms,
        status=UsageStatus.ok,
        decision_applied=decision,
        cache_hit=True,
    )

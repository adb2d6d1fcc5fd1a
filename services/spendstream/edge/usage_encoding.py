"""The Emitter's encoder for usage events: the same bytes as ``AvroCodec.encode``, several times faster.

Why: encoding is what bounds how many events one edge process delivers per second. The generic path copies
the model into a dict, converts logical types and walks the schema in fastavro for every field. This one
reads the validated model's fields directly and writes the ``usage_event`` schema's fields in order. The groups
of fields that repeat from event to event are encoded once per distinct value and taken from bounded caches:
who pays (org to environment, with the partition key), the route (provider to model served) and the outcome
(status to service tier); so are strings and small integers. Only the event id, the timestamp, tags and the
counts are written per event, and every group is read by one ``itemgetter`` call.

Caches are keyed by value, so an int-valued float or a bool in a count would reuse an int's bytes: the caller
checks bounds and integer types first (``core.events.usage_bounds_problem``), as the Emitter does.

It is written for one schema version: ``UsageEncoder`` refuses to start if ``schemas/usage_event.avsc`` no
longer has the fields it writes, and any value it does not handle (an event built with ``model_construct``
holding a wrong type) goes through ``AvroCodec.encode``, which decides exactly as before.
"""

from __future__ import annotations

from binascii import hexlify
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any
from uuid import UUID

from spendstream.core.attribution import ATTRIBUTION_FIELDS
from spendstream.core.codec import AvroCodec
from spendstream.core.events import DETAIL_FIELDS, UsageEvent
from spendstream.core.schemas import load_schema_json

# (field name, Avro type as written in the schema) in schema order: what encode_body() writes.
FIELDS: tuple[tuple[str, Any], ...] = (
    ("event_id", {"type": "string", "logicalType": "uuid"}),
    ("occurred_at", {"type": "long", "logicalType": "timestamp-micros"}),
    *((name, "string") for name in ATTRIBUTION_FIELDS),
    ("tags", {"type": "map", "values": "string"}),
    ("provider", "string"),
    ("model_requested", "string"),
    ("model_served", "string"),
    *((name, "long") for name in ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens")),
    ("cost_nanos", ["null", "long"]),
    ("price_source", "string"),
    ("latency_ms", "long"),
    ("status", {"type": "enum", "name": "UsageStatus", "symbols": ["ok", "error", "blocked"], "default": "ok"}),
    ("decision_applied", "string"),
    ("cache_hit", "boolean"),
    *((name, "long") for name in DETAIL_FIELDS),
    ("service_tier", "string"),
)
_CACHE_ENTRIES = 16_384  # per cache; a full cache is emptied (old values stop repeating, new ones refill it)
_INT64_MIN, _INT64_LIMIT = -(2**63), 2**63
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_BYTE = tuple(bytes([b]) for b in range(128))
_STATUS = {"ok": b"\x00", "error": b"\x02", "blocked": b"\x04"}


def avro_long(value: int) -> bytes:
    """Zig-zag varint of a 64-bit signed integer."""
    if type(value) is not int or not _INT64_MIN <= value < _INT64_LIMIT:
        raise TypeError(f"not an Avro long: {value!r}")
    return varint((value << 1) ^ (value >> 63))


def varint(n: int) -> bytes:
    """Base-128 varint of a non-negative integer, low groups first."""
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if n < 0x200000:
        return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_LOW_BITS = 14  # a timestamp's varint: 2 bytes of its low 14 bits (a table), then the varint of the rest (cached)
# The varint groups of every 14-bit value, with continuation bits (about 0.7 MB): a lookup beats the bit arithmetic.
_LOW_GROUPS = tuple(bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80)) for n in range(1 << _LOW_BITS))
# Fields read in one call each (itemgetter runs in C), in groups that repeat together and are encoded once per
# distinct value: who pays (the partition key comes from it), which model, and the outcome after the counts.
_WHO = itemgetter("org", "division", "team", "project", "feature", "user", "customer", "environment")
_ROUTE = itemgetter("provider", "model_requested", "model_served")
_OUTCOME = itemgetter("status", "decision_applied", "cache_hit", *DETAIL_FIELDS, "service_tier")
# What changes from event to event, in schema order.
_OWN = itemgetter(
    "event_id", "occurred_at", "tags", "input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens",
    "cost_nanos", "price_source", "latency_ms",
)  # fmt: skip


def avro_string(value: str) -> bytes:
    data = value.encode()
    return avro_long(len(data)) + data


def avro_strings(values: tuple[str, ...]) -> bytes:
    """Several Avro strings, one after the other (a run of string fields of the schema)."""
    if any(type(value) is not str for value in values):
        raise TypeError("not a string")
    return b"".join(avro_string(value) for value in values)


class _Cache(dict):
    """value -> its Avro bytes, computed on a miss; emptied when full so memory stays bounded."""

    def __init__(self, encode: Any) -> None:
        super().__init__()
        self._encode = encode

    def __missing__(self, value: Any) -> bytes:
        if len(self) >= _CACHE_ENTRIES:
            self.clear()
        encoded = self[value] = self._encode(value)
        return encoded


class UsageEncoder:
    """Encode ``UsageEvent`` values (framed as ``codec`` frames them) and build their partition keys."""

    def __init__(self, codec: AvroCodec) -> None:
        actual = tuple((f["name"], f["type"]) for f in load_schema_json("usage_event")["fields"])
        if actual != FIELDS:
            raise RuntimeError("schemas/usage_event.avsc changed: update spendstream.edge.usage_encoding.FIELDS")
        self._codec = codec
        self._header: bytes | None = None
        self._strings = _Cache(avro_string)
        self._longs = _Cache(avro_long)
        self._high = _Cache(varint)  # a timestamp's bits above the low 14: they change every 8 ms
        self._who = _Cache(self._attribution)  # org..environment -> (partition key, their Avro strings)
        self._routes = _Cache(avro_strings)  # provider, model requested and served -> their Avro strings
        self._outcomes = _Cache(self._outcome)  # status..service_tier -> their Avro bytes

    def record(self, event: UsageEvent) -> tuple[bytes, bytes]:
        """The partition key (``org/team``: one producer partition per team keeps its events in order) and the
        framed Avro value of a validated event (bounds are checked by the caller)."""
        header = self._header
        if header is None:
            header = self._header = self._codec.frame_header()
        fields = event.__dict__
        try:
            key, who = self._who[_WHO(fields)]
            outcome = _OUTCOME(fields)
            if outcome[2].__class__ is not bool:  # True == 1: an int must not hit a boolean's cache entry
                raise TypeError("cache_hit")
            n = self._longs
            event_id, occurred_at, tags, inputs, outputs, cached, written, cost, price_source, latency = _OWN(fields)
            return key, b"".join(
                (
                    header,
                    _uuid(event_id) if event_id.__class__ is UUID else avro_string(str(event_id)),
                    self._timestamp(occurred_at),
                    who,
                    self._map(tags) if tags else b"\x00",
                    self._routes[_ROUTE(fields)],
                    n[inputs],
                    n[outputs],
                    n[cached],
                    n[written],
                    b"\x00" if cost is None else b"\x02" + n[cost],
                    self._strings[price_source],
                    n[latency] if latency.__class__ is int else avro_long(latency),
                    self._outcomes[outcome],
                )
            )
        except Exception:  # a value of an unexpected type: the generic encoder accepts or names it
            return f"{fields['org']}/{fields['team']}".encode(), self._codec.encode(event.to_avro())

    def _attribution(self, who: tuple[str, ...]) -> tuple[bytes, bytes]:
        """The partition key and the Avro strings of org..environment, each string from its cache: a new
        user of a known team costs one string encoding."""
        if any(value.__class__ is not str for value in who):
            raise TypeError("not a string")
        s = self._strings
        return f"{who[0]}/{who[2]}".encode(), b"".join([s[value] for value in who])

    def _outcome(self, outcome: tuple[Any, ...]) -> bytes:
        status, decision, cache_hit, *detail, service_tier = outcome
        n = self._longs
        return b"".join(
            (
                _STATUS[status],
                avro_strings((decision,)),
                b"\x01" if cache_hit is True else b"\x00" if cache_hit is False else _bad("cache_hit"),
                *(n[count] for count in detail),
                avro_strings((service_tier,)),
            )
        )

    def _timestamp(self, occurred_at: datetime) -> bytes:
        if occurred_at.__class__ is not datetime:
            raise TypeError("occurred_at")
        since = occurred_at - _EPOCH  # its fields in C beat dividing by a timedelta
        micros = (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds
        if not 1 << _LOW_BITS <= micros < _INT64_LIMIT:  # before 1970 or within its first 16 ms: no high bits
            return avro_long(micros)
        n = micros << 1  # the zig-zag of a non-negative long
        return _LOW_GROUPS[n & 0x3FFF] + self._high[n >> _LOW_BITS]

    def _map(self, tags: dict[str, str]) -> bytes:
        s = self._strings
        return b"".join((avro_long(len(tags)), *(s[k] + s[v] for k, v in tags.items()), b"\x00"))


def _uuid(value: UUID) -> bytes:
    """The Avro string of a UUID's canonical text (lower-case hex, 8-4-4-4-12).

    ``hexlify`` writes the 16 bytes as eight dash-separated groups of four digits in C; three dashes are
    dropped (formatting the 128-bit int and slicing text took twice as long).
    """
    h = hexlify(value.int.to_bytes(16), b"-", 2)
    return b"".join((b"H", h[:4], h[5:29], h[30:34], h[35:]))  # H: the Avro length (zig-zag 36)


def _bad(name: str) -> bytes:
    raise TypeError(name)

"""Let ClickHouse decode a batch of UsageEvents: Avro container files built from undecoded values.

A single-object encoded value is ``C3 01`` + fingerprint + the Avro body, so a batch of values
written with one schema becomes an Avro Object Container File without decoding anything in
Python: a header naming the writer schema, then one data block per value. ClickHouse reads it
with ``FORMAT Avro`` into a staging table, where SQL mirrors ``core.events.usage_record_problem``.

Why the rows ClickHouse accepts are exactly what fastavro would have read:

* Every value gets its own data block (count 1, its byte size, its sync marker), so a damaged
  value cannot shift the reading of its neighbours.
* After the body each block carries the row's position ``_i`` as a 4-byte Avro ``fixed``, then
  ``_a``, when its message reached the broker (its Kafka timestamp, epoch ms, 8 bytes).
  Sorted by ``_i``, the staging rows must be exactly the positions ``0 .. n-1``, and each row's
  *minimal* encoded length (:func:`encoded_length_sql`, computed from the values ClickHouse
  decoded) must equal the length of the value at its position; otherwise the whole group takes
  the Python path. Why that proves every row was read exactly as fastavro reads it: a body read
  past its end leaves fewer than the 12 bytes of ``_i`` and ``_a`` in a block that cannot be read
  past (an error). A body read short of its end (trailing bytes, which fastavro refuses and ClickHouse
  skips silently) consumed fewer bytes than its value has, and reading consumes at least the
  minimal length, so its row claims a position whose value is strictly shorter than its own.
  Such rows cannot claim their own positions, and among themselves they would have to form
  cycles of strictly decreasing lengths, which do not exist; so with the check passed every
  row read its own body exactly, with canonical encodings only.
* Longs needing a 10-byte varint (where decoders may disagree about bits past 64), invalid UTF-8
  (fastavro refuses it, ClickHouse ``String`` keeps it), duplicate map keys (a dict keeps the
  last, a ``Map`` keeps both), event ids not in canonical form and timestamps outside what
  ``DateTime64`` formats are not judged in SQL: those rows are marked :data:`EXACT` and go
  through the Python path, which names their problem precisely.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from itertools import chain
from typing import Any

from spendstream.core.attribution import (
    ATTRIBUTION_FIELDS,
    MAX_NAME_CHARS,
    WILDCARD_VALUE,
    name_too_long_text,
    template_value_text,
)
from spendstream.core.events import BLOCKED_WITH_COST, DETAIL_FIELDS, NAME_FIELDS

# The verdict of a row that SQL does not judge: it takes the exact (Python) path. No reason
# produced by ``usage_record_problem`` starts with this character.
EXACT = "\x01"
ROW_FIELD = "_i"  # the position of a row in its container, appended after the body
POSITION_SIZE = 4
ARRIVAL_FIELD = "_a"  # when the row's message reached the broker (epoch ms, little-endian), after ``_i``
_TAIL = struct.Struct("<Iq")  # ``_i`` and ``_a``
MAGIC = b"Obj\x01"
SQL_TIME_RANGE = (datetime(1900, 1, 1, tzinfo=UTC), datetime(2299, 12, 31, tzinfo=UTC))
# A name ``attribution_value_problem`` may refuse: a space at either end, a control or format character, a separator
# other than the space (Python's str.isprintable), or text not in NFC (checked beside it). Such rows take the
# Python path, which words the reason; ordinary non-ASCII names stay on this one.
_UNPLAIN_NAME_RE = (
    r"^[[:space:]]|[[:space:]]$|[\p{C}\p{Zl}\p{Zp}\x{00A0}\x{1680}\x{2000}-\x{200A}\x{202F}\x{205F}\x{3000}]"
)
_CANONICAL_UUID_RE = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
# Longs whose varint needs 10 bytes, where decoders may differ about bits past 64.
_HUGE = 1 << 62
_NON_NEGATIVE = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "latency_ms",
    *DETAIL_FIELDS,
)


def zigzag_varint(n: int) -> bytes:
    """Avro's encoding of a long: zig-zag, then little-endian base-128 varint."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


class _BlockPrefixes(dict[int, bytes]):
    """Value length -> the start of its data block: record count 1, then the block's byte size."""

    def __missing__(self, length: int) -> bytes:
        prefix = zigzag_varint(1) + zigzag_varint(length + _TAIL.size)
        self[length] = prefix
        return prefix


class ContainerWriter:
    """Builds Avro container files of framed values written with one schema, without decoding them.

    The container's schema is the writer schema between extra fields: the value's framing
    (``skip`` bytes, read as an Avro ``fixed`` that the staging table has no column for, so
    ClickHouse skips it) before it, and after it ``_i``, the row's position as a 4-byte little-endian
    ``fixed``, and ``_a``, its arrival (epoch ms, an 8-byte little-endian ``fixed``). So each block is
    ``prefix + value + position + arrival + sync`` and the whole file one C-level join.
    """

    def __init__(self, writer_schema: dict[str, Any], skip: int, sync: bytes | None = None) -> None:
        fields = [
            *writer_schema["fields"],
            {"name": ROW_FIELD, "type": _fixed("RowPosition", POSITION_SIZE)},
            {"name": ARRIVAL_FIELD, "type": _fixed("Arrival", 8)},
        ]
        if skip:
            fields.insert(0, {"name": "_framing", "type": _fixed("Framing", skip)})
        self.sync = sync or os.urandom(16)
        meta = {"avro.schema": json.dumps({**writer_schema, "fields": fields}).encode(), "avro.codec": b"null"}
        header = bytearray(MAGIC) + zigzag_varint(len(meta))
        for key, value in meta.items():
            header += zigzag_varint(len(key)) + key.encode() + zigzag_varint(len(value)) + value
        self.header = bytes(header + b"\x00" + self.sync)
        self._prefixes = _BlockPrefixes()

    def container(self, values: Sequence[bytes], arrivals: Sequence[int]) -> bytes:
        """One data block per value: count 1, byte size, the value, its position and arrival (epoch ms, one per
        value), the sync marker."""
        sync = self.sync
        tails = [_TAIL.pack(i, arrival) + sync for i, arrival in enumerate(arrivals)]
        prefixes = map(self._prefixes.__getitem__, map(len, values))
        return self.header + b"".join(chain.from_iterable(zip(prefixes, values, tails, strict=True)))


def _fixed(name: str, size: int) -> dict[str, Any]:
    return {"type": "fixed", "name": f"io.spendstream.sink.{name}", "size": size}


# -- SQL over the staging table ---------------------------------------------------------------


def _field_type(field: dict[str, Any]) -> str:
    """A schema field's type, reduced to the few shapes UsageEvent versions use."""
    kind = field["type"]
    if isinstance(kind, list):
        if kind == ["null", "long"]:
            return "nullable_long"
    elif isinstance(kind, dict):
        if kind["type"] in ("string", "long", "map", "enum") and (kind["type"] != "map" or kind["values"] == "string"):
            return kind["type"]
    elif kind in ("string", "long", "boolean"):
        return kind
    raise ValueError(f"field {field['name']}: Avro type {kind!r} has no staging column; extend avro_block")


_CLICKHOUSE_TYPES = {
    "string": "String",
    "enum": "String",
    "long": "Int64",
    "boolean": "Bool",
    "map": "Map(String, String)",
    "nullable_long": "Nullable(Int64)",
}


def staging_columns(schema: dict[str, Any]) -> list[tuple[str, str]]:
    """Staging columns for a schema: raw Avro values (``occurred_at`` in microseconds), then ``_i`` and ``_a``."""
    columns = [(f["name"], _CLICKHOUSE_TYPES[_field_type(f)]) for f in schema["fields"]]
    return [*columns, (ROW_FIELD, f"FixedString({POSITION_SIZE})"), (ARRIVAL_FIELD, "FixedString(8)")]


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _varints_len(longs: str) -> str:
    """Bytes of the zig-zag varints of an ``Array(Int64)``."""
    zigzag = "if(x >= 0, toUInt64(x) * 2, toUInt64(-(x + 1)) * 2 + 1)"
    steps = " + ".join(f"(z >= {1 << (7 * n)})" for n in range(1, 10))
    return f"arraySum(z -> 1 + {steps}, arrayMap(x -> {zigzag}, {longs}))"


def encoded_length_sql(schema: dict[str, Any], skip: int = 0) -> str:
    """SQL for ``skip`` + the minimal Avro encoded length of a staging row's body under ``schema``.

    Every varint of the row (longs, string lengths, map sizes) goes through one lambda: ClickHouse
    analyses the expression once per batch, and that cost grows with its size (a ``multiIf`` or
    a run of comparisons per field costs several times more than the whole check).
    """
    varints: list[str] = []  # Array(Int64) expressions
    payload: list[str] = [str(skip)]  # byte counts of string contents and fixed-size parts
    for field in schema["fields"]:
        col, kind = _quote(field["name"]), _field_type(field)
        if kind == "string":
            varints.append(f"[toInt64(length({col}))]")
            payload.append(f"length({col})")
        elif kind == "long":
            varints.append(f"[{col}]")
        elif kind in ("boolean", "enum"):  # one byte (an enum of fewer than 64 symbols)
            payload.append("1")
        elif kind == "nullable_long":  # the union branch index, then the long unless null
            varints.append(f"if(isNull({col}), [], [assumeNotNull({col})])")
            payload.append("1")
        else:  # a map of strings: one block of n entries, then the 0 that ends the map
            strings = f"arrayConcat(mapKeys({col}), mapValues({col}))"
            varints.append(f"if(empty({col}), [], [toInt64(length({col}))])")
            varints.append(f"arrayMap(s -> toInt64(length(s)), {strings})")
            payload.append(f"length(arrayStringConcat({strings})) + 1")
    return f"{_varints_len('arrayConcat(' + ', '.join(varints) + ')')} + " + " + ".join(payload)


def _micros(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _too_long_sql(name: str) -> str:
    """``name_too_long_text`` of a staging row's column, its length computed in SQL."""
    before, after = name_too_long_text(name, "\x00").split("\x00")
    return f"concat({_literal(before)}, toString(lengthUTF8({_quote(name)})), {_literal(after)})"


def problem_sql(schema: dict[str, Any], future_limit_us: int, max_future_skew: timedelta) -> str:
    """SQL mirroring ``usage_record_problem`` on a staging row: '' (accept), a reason, or :data:`EXACT`.

    The checks run in the same order and produce the same texts; ``occurred_at`` is formatted
    the way ``datetime.isoformat`` formats an aware UTC datetime.
    """
    kinds = {f["name"]: _field_type(f) for f in schema["fields"]}
    texts = [_quote(name) for name, kind in kinds.items() if kind in ("string", "enum")]
    maps = [_quote(name) for name, kind in kinds.items() if kind == "map"]
    # Valid pieces joined by an ASCII separator are valid exactly when every piece is (UTF-8
    # resynchronises at each separator), so one call checks every string of the row.
    separator = "'\\0'"
    pieces = texts + [f"arrayStringConcat(arrayConcat(mapKeys({m}), mapValues({m})), {separator})" for m in maps]
    every_string = f"concat({f', {separator}, '.join(pieces)})"
    duplicate_keys = " OR ".join(f"length(arrayDistinct(mapKeys({m}))) != length({m})" for m in maps) or "0"
    low, high = (_micros(moment) for moment in SQL_TIME_RANGE)
    iso = (
        "concat(formatDateTime(fromUnixTimestamp64Micro(occurred_at, 'UTC'), '%Y-%m-%dT%H:%i:%S'), "
        "if(occurred_at % 1000000 = 0, '', concat('.', leftPad(toString(occurred_at % 1000000), 6, '0'))), '+00:00')"
    )
    exact = _literal(EXACT)
    branches = [
        (f"NOT match(event_id, {_literal(_CANONICAL_UUID_RE)})", exact),
        (f"NOT isValidUTF8({every_string})", exact),
        (duplicate_keys, exact),
        (f"occurred_at < {low} OR occurred_at >= {high}", exact),
        (
            " OR ".join(f"NOT ({-_HUGE} <= {name} AND {name} < {_HUGE})" for name in (*_NON_NEGATIVE, "cost_nanos")),
            exact,
        ),
    ]
    branches += [(f"{n} < 0", f"concat('{n} is negative: ', toString({n}))") for n in _NON_NEGATIVE]
    branches += [
        ("ifNull(cost_nanos < 0, 0)", "concat('cost_nanos is negative: ', toString(assumeNotNull(cost_nanos)))"),
        (
            "status = 'blocked' AND ifNull(cost_nanos, 0) != 0",
            f"concat({_literal(BLOCKED_WITH_COST + ', but cost_nanos is ')}, toString(assumeNotNull(cost_nanos)))",
        ),
        (
            "toInt128(cached_input_tokens) + cache_write_tokens > input_tokens",
            "'cached_input_tokens + cache_write_tokens exceed input_tokens'",
        ),
        (
            "toInt128(cached_input_tokens) + cache_write_tokens + input_audio_tokens + input_image_tokens"
            " > input_tokens",
            "'cached, cache write, audio and image input tokens exceed input_tokens'",
        ),
        (
            "toInt128(reasoning_tokens) + output_audio_tokens + output_image_tokens > output_tokens",
            "'reasoning, audio and image output tokens exceed output_tokens'",
        ),
        ("cache_write_1h_tokens > cache_write_tokens", "'cache_write_1h_tokens exceed cache_write_tokens'"),
        (
            f"occurred_at > {future_limit_us}",
            f"concat('occurred_at ', {iso}, {_literal(f' is more than {max_future_skew} in the future')})",
        ),
        ("provider = '' OR model_requested = ''", "'missing provider or model_requested'"),
        *((f"lengthUTF8({_quote(name)}) > {MAX_NAME_CHARS}", _too_long_sql(name)) for name in NAME_FIELDS),
        *(
            (f"{_quote(name)} = {_literal(WILDCARD_VALUE)}", _literal(template_value_text(name)))
            for name in ATTRIBUTION_FIELDS
        ),
        # a name with anything but printable ASCII, or a space at either end: Python judges it
        # (``attribution_value_problem``)
        (
            " OR ".join(
                f"match({q}, {_literal(_UNPLAIN_NAME_RE)}) OR {q} != normalizeUTF8NFC({q})"
                for q in map(_quote, ATTRIBUTION_FIELDS)
            ),
            exact,
        ),
        ("cost_nanos IS NULL", exact),  # valid but unpriced: Python prices it (core.pricing.price_record)
    ]
    return "multiIf(" + ", ".join(f"{cond}, {verdict}" for cond, verdict in branches) + ", '')"


def ledger_select_sql(
    columns: Sequence[str], staging: str, excluded: Sequence[int], placed: Mapping[str, str] | None = None
) -> str:
    """The ledger columns of the staging rows not in ``excluded`` (raw values converted; ``placed``: the
    expressions that fill a row's team, division and org as the policy places it, ``core.placement``)."""
    converted = {
        "event_id": "toUUID(event_id)",
        "occurred_at": "fromUnixTimestamp64Micro(occurred_at, 'UTC')",
        "arrived_at": f"fromUnixTimestamp64Milli(reinterpretAsInt64({ARRIVAL_FIELD}), 'UTC')",
        **(placed or {}),
    }
    select = ", ".join(converted.get(name, _quote(name)) for name in columns)
    where = (
        f" WHERE reinterpretAsUInt32({ROW_FIELD}) NOT IN ({', '.join(map(str, sorted(excluded)))})" if excluded else ""
    )
    return f"SELECT {select} FROM {staging}{where}"

"""Stage 1's decoder of usage values: the fields the fold needs, read straight from the bytes.

Profiled in a worker (``bench/bench_processor.py``): ``AvroCodec.decode`` took ~15 us per event, a third of
the worker's time, because fastavro builds a dict of all 32 fields, a ``uuid.UUID`` and a ``datetime``. The
reader here is generated once from the current ``usage_event`` schema: straight-line code that walks every
field (strings are decoded, so bad UTF-8 is caught as before) and returns a tuple of the requested ones, the
``event_id`` as its 16 bytes and ``occurred_at`` as epoch microseconds (~3 us). A run of counters that are all
zero is read with one comparison. Stage 1 also asks for "spans": the raw bytes of a run of string fields, not
decoded, as keys of its memos of scopes (it decodes the fields once per distinct span: ``generate_reader``).

It only takes values it decodes exactly as the codec would: the current schema's single-object framing, a
canonical UUID text, an ``occurred_at`` a ``datetime`` can hold, no trailing bytes. For anything else it returns
None and the caller uses ``AvroCodec``, which decodes older schema versions and registry framing and words the
DLQ reason of a bad value, so no outcome changes.
"""

from __future__ import annotations

from binascii import unhexlify
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from spendstream.core.codec import AvroCodec
from spendstream.core.schemas import load_schema_json

Reader = Callable[[bytes], tuple[Any, ...] | None]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# occurred_at values a datetime holds (fastavro's conversion fails outside them)
_MIN_MICROS = (datetime(1, 1, 2, tzinfo=UTC) - _EPOCH) // datetime.resolution
_MAX_MICROS = (datetime(9999, 12, 30, tzinfo=UTC) - _EPOCH) // datetime.resolution


class UnsupportedSchema(ValueError):
    """The schema uses a type the generated reader does not handle (the codec then decodes everything)."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint of more than one byte (Avro int and long); raises IndexError/ValueError if malformed."""
    shift = value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value >> 1) ^ -(value & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


class _Source:
    """Straight-line Python for one reader: each ``emit_*`` appends the statements that read one value."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.counter = 0

    def add(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"

    def emit_long(self, depth: int, target: str) -> None:
        """A zigzag varint, of up to four bytes inline (below 2**27: counts, and costs below $0.13), longer ones
        by ``_varint`` (a call cost as much as the rest of a cost's decoding)."""
        self.add(depth, "b = buf[pos]")
        self.add(depth, "if b < 128:")
        self.add(depth + 1, f"{target} = (b >> 1) ^ -(b & 1)")
        self.add(depth + 1, "pos += 1")
        self.add(depth, "elif buf[pos + 1] < 128:")
        self.add(depth + 1, "b = (b & 127) | (buf[pos + 1] << 7)")
        self.add(depth + 1, f"{target} = (b >> 1) ^ -(b & 1)")
        self.add(depth + 1, "pos += 2")
        self.add(depth, "elif buf[pos + 2] < 128:")
        self.add(depth + 1, "b = (b & 127) | (buf[pos + 1] & 127) << 7 | buf[pos + 2] << 14")
        self.add(depth + 1, f"{target} = (b >> 1) ^ -(b & 1)")
        self.add(depth + 1, "pos += 3")
        self.add(depth, "elif buf[pos + 3] < 128:")
        self.add(depth + 1, "b = (b & 127) | (buf[pos + 1] & 127) << 7 | (buf[pos + 2] & 127) << 14")
        self.add(depth + 1, "b |= buf[pos + 3] << 21")
        self.add(depth + 1, f"{target} = (b >> 1) ^ -(b & 1)")
        self.add(depth + 1, "pos += 4")
        self.add(depth, "else:")
        self.add(depth + 1, f"{target}, pos = _varint(buf, pos)")

    def emit_timestamp(self, depth: int, target: str) -> None:
        """A zigzag varint of eight bytes (epoch microseconds of these decades) from one ``int.from_bytes`` and
        masks, any other length by ``_varint``. The eight 7-bit groups are packed in three steps, each halving
        the number of gaps (pairs of 7 bits, then of 14, then of 28): 13 integer operations instead of 23."""
        self.add(depth, 'b = int.from_bytes(buf[pos : pos + 8], "little")')
        self.add(depth, "if b & 0x8080808080808080 == 0x0080808080808080:")  # seven continuation bytes, then the last
        self.add(depth + 1, "b = (b & 0x007F007F007F007F) | (b >> 1 & 0x3F803F803F803F80)")
        self.add(depth + 1, "b = (b & 0x00003FFF00003FFF) | (b >> 2 & 0x0FFFC0000FFFC000)")
        self.add(depth + 1, "b = (b & 0x000000000FFFFFFF) | (b >> 4 & 0x00FFFFFFF0000000)")
        self.add(depth + 1, f"{target} = (b >> 1) ^ -(b & 1)")
        self.add(depth + 1, "pos += 8")
        self.add(depth, "else:")
        self.add(depth + 1, f"{target}, pos = _varint(buf, pos)")

    def emit_string(self, depth: int, target: str | None, raw: bool = False, skip: bool = False) -> None:
        """A string into ``target`` (its UTF-8 bytes if ``raw``); without a target only checked as UTF-8, or with
        ``skip`` not even that. A length past the end is caught by the next read or the final position check."""
        size = self.fresh("n")
        if skip:  # a one-byte length, not negative: skipped in one step
            self.add(depth, f"{size} = buf[pos]")
            self.add(depth, f"if {size} < 128 and not {size} & 1:")
            self.add(depth + 1, f"pos += 1 + ({size} >> 1)")
            self.add(depth, "else:")
            self.add(depth + 1, f"{size}, pos = _varint(buf, pos)")
            self.add(depth + 1, f"if {size} < 0:")
            self.add(depth + 2, "return None")
            self.add(depth + 1, f"pos += {size}")
            return
        self.add(depth, f"{size} = buf[pos]")
        self.add(depth, f"if {size} < 128 and not {size} & 1:")  # a one-byte length, not negative
        self.add(depth + 1, f"{size} >>= 1")
        self.add(depth + 1, "pos += 1")
        self.add(depth, "else:")
        self.add(depth + 1, f"{size}, pos = _varint(buf, pos)")
        self.add(depth + 1, f"if {size} < 0:")
        self.add(depth + 2, "return None")
        if target is None:
            self.add(depth, f"if {size}:")
            self.add(depth + 1, f"buf[pos : (pos := pos + {size})].decode()")
        elif raw:
            self.add(depth, f"{target} = buf[pos : (pos := pos + {size})]")
        else:
            self.add(depth, f"{target} = buf[pos : (pos := pos + {size})].decode()")

    def emit(self, depth: int, schema: Any, target: str | None) -> None:
        """Read one value of ``schema`` into ``target`` (None: a plain string nobody reads, only checked)."""
        if isinstance(schema, list):
            self.emit_union(depth, schema, target)
            return
        kind = schema.get("type") if isinstance(schema, dict) else schema
        logical = schema.get("logicalType") if isinstance(schema, dict) else None
        if isinstance(kind, (dict, list)):
            self.emit(depth, kind, target)
        elif kind == "string" and logical is None:
            self.emit_string(depth, target)
        elif kind == "string" and logical == "uuid":  # 36 characters, 32 of them hex: its 16 bytes
            self.add(depth, "if buf[pos] != 72:")  # 72: the length 36, zigzag
            self.add(depth + 1, "return None")
            if target is None:
                self.add(depth, "pos += 37")
            else:  # not hex, or a "-" too many made it odd-length: ValueError; four "-" anywhere: what ``UUID`` reads
                self.add(depth, f'{target} = unhexlify(buf[pos + 1 : (pos := pos + 37)].replace(b"-", b""))')
                self.add(depth, f"if len({target}) != 16:")
                self.add(depth + 1, "return None")
        elif kind in ("long", "int") and logical is None:
            self.emit_long(depth, target)
        elif kind == "long" and logical == "timestamp-micros":
            self.emit_timestamp(depth, target)
            self.add(depth, f"if not {_MIN_MICROS} <= {target} <= {_MAX_MICROS}:")
            self.add(depth + 1, "return None")
        elif kind == "boolean":
            self.add(depth, "b = buf[pos]")
            self.add(depth, "pos += 1")
            self.add(depth, "if b > 1:")
            self.add(depth + 1, "return None")
            self.add(depth, f"{target} = b == 1")
        elif kind == "enum":
            self.emit_long(depth, target)
            self.add(depth, f"if not 0 <= {target} < {len(schema['symbols'])}:")
            self.add(depth + 1, "return None")
            self.add(depth, f"{target} = {tuple(schema['symbols'])!r}[{target}]")
        elif kind == "null":
            self.add(depth, f"{target} = None")
        elif kind == "map":
            self.emit_map(depth, schema["values"], target)
        else:
            raise UnsupportedSchema(f"no generated reader for {schema!r}")

    def emit_union(self, depth: int, members: list[Any], target: str) -> None:
        branch = self.fresh("u")
        self.emit_long(depth, branch)
        for index, member in enumerate(members):
            self.add(depth, f"{'if' if index == 0 else 'elif'} {branch} == {index}:")
            self.emit(depth + 1, member, target)
        self.add(depth, "else:")
        self.add(depth + 1, "return None")

    def emit_map(self, depth: int, values: Any, target: str) -> None:
        count, key, item = self.fresh("c"), self.fresh("k"), self.fresh("v")
        self.add(depth, f"{target} = {{}}")
        self.add(depth, "if buf[pos] == 0:")  # the usual empty map
        self.add(depth + 1, "pos += 1")
        self.add(depth, "else:")
        depth += 1
        self.emit_long(depth, count)
        self.add(depth, f"while {count}:")
        self.add(depth + 1, f"if {count} < 0:")  # a negative count is followed by the block's size in bytes
        self.add(depth + 2, f"{count} = -{count}")
        self.emit_long(depth + 2, self.fresh("size"))
        self.add(depth + 1, f"for _ in range({count}):")
        self.emit_string(depth + 2, key)
        self.emit(depth + 2, values, item)
        self.add(depth + 2, f"{target}[{key}] = {item}")
        self.emit_long(depth + 1, count)


_NO_ZERO = object()


def _zero_value(schema: Any) -> Any:
    """The value a single zero byte encodes for ``schema`` (0, False, "", the first symbol), else ``_NO_ZERO``.
    Unions are left out: the usual one, ``cost_nanos``, is seldom null."""
    if isinstance(schema, dict):
        if schema.get("logicalType"):
            return _NO_ZERO
        if schema.get("type") == "enum":
            return schema["symbols"][0]
        schema = schema.get("type")
    if not isinstance(schema, str):
        return _NO_ZERO
    return {"long": 0, "int": 0, "boolean": False, "string": ""}.get(schema, _NO_ZERO)


def generate_reader(
    schema: dict[str, Any], wanted: Sequence[str], spans: Sequence[Sequence[str]] = (), header: bytes = b""
) -> Reader:
    """A function ``buf -> tuple of the wanted fields`` for a record of ``schema`` after ``header``, or None where
    the value has another header, is malformed or is outside what the codec would turn into the same result.

    Each of ``spans`` (a run of consecutive fields) adds, after the wanted fields, the raw bytes that encode those
    fields. Strings inside a span that are not wanted are skipped, NOT checked as UTF-8: a caller may only trust a
    span's bytes once it has seen the same bytes decoded (e.g. a memo keyed by them, filled by a reader that
    decodes those fields)."""
    names = [field["name"] for field in schema["fields"]]
    missing = [name for name in (*wanted, *(name for span in spans for name in span)) if name not in names]
    if missing:
        raise UnsupportedSchema(f"fields not in the schema: {', '.join(missing)}")
    opens: dict[int, int] = {}  # field index -> the span that starts there (in span order)
    closes: dict[int, int] = {}  # field index -> the span that ends there (in span order)
    skipped: set[int] = set()  # unwanted strings inside a span
    for number, span in enumerate(spans):
        first = names.index(span[0])
        if [names.index(name) for name in span] != list(range(first, first + len(span))):
            raise UnsupportedSchema(f"span fields are not consecutive in the schema: {', '.join(span)}")
        opens[first], closes[first + len(span) - 1] = number, number
        skipped.update(index for index in range(first, first + len(span)) if names[index] not in wanted)
    source = _Source()

    def emit_field(depth: int, index: int) -> None:
        field = schema["fields"][index]
        unread = field["type"] == "string" and field["name"] not in wanted
        if unread and index in skipped:
            source.emit_string(depth, None, skip=True)
        else:
            source.emit(depth, field["type"], None if unread else f"f{index}")

    def emit_run(depth: int, run: list[int]) -> None:
        """Fields that one zero byte each may encode: all of them at once when the bytes are zeros (most of a usage
        event's counters), else the first one alone and the rest as a run again."""
        if len(run) < 3:
            for index in run:
                emit_field(depth, index)
            return
        source.add(depth, f"if buf[pos : pos + {len(run)}] == {bytes(len(run))!r}:")
        for index in run:
            field = schema["fields"][index]
            if field["name"] in wanted:
                source.add(depth + 1, f"f{index} = {_zero_value(field['type'])!r}")
        source.add(depth + 1, f"pos += {len(run)}")
        source.add(depth, "else:")
        emit_field(depth + 1, run[0])
        emit_run(depth + 1, run[1:])

    source.add(0, "def read(buf):")
    source.add(1, f"if not buf.startswith({header!r}):")
    source.add(2, "return None")
    source.add(1, f"pos = {len(header)}")
    source.add(1, "try:")
    run: list[int] = []
    for index, field in enumerate(schema["fields"]):
        in_span = any(first <= index <= last for first, last in zip(opens, closes, strict=True))
        if not in_span and _zero_value(field["type"]) is not _NO_ZERO:
            run.append(index)
            continue
        emit_run(2, run)
        run = []
        if index in opens:
            source.add(2, f"s{opens[index]} = pos")
        emit_field(2, index)
        if index in closes:
            source.add(2, f"s{closes[index]} = buf[s{closes[index]} : pos]")
    emit_run(2, run)
    source.add(1, "except (IndexError, ValueError):")  # truncated, bad UTF-8, a varint too long
    source.add(2, "return None")
    source.add(1, "if pos != len(buf):")
    source.add(2, "return None")
    returned = [f"f{names.index(name)}" for name in wanted] + [f"s{number}" for number in range(len(spans))]
    source.add(1, f"return ({''.join(f'{name}, ' for name in returned)})")
    namespace: dict[str, Any] = {"_varint": _varint, "unhexlify": unhexlify}
    exec(compile("\n".join(source.lines), f"<usage reader of {schema['name']}>", "exec"), namespace)
    return namespace["read"]  # type: ignore[no-any-return]


class FieldDecoder:
    """``wanted`` fields (then the raw bytes of each of ``spans``: ``generate_reader``) of values framed with
    ``codec``'s current writer schema; None: let the codec decode."""

    def __init__(self, codec: AvroCodec, wanted: Sequence[str], spans: Sequence[Sequence[str]] = ()) -> None:
        # one generated function, called directly: ``decode(data) -> tuple | None``
        self.decode: Reader = generate_reader(load_schema_json(codec.schema_name), wanted, spans, codec.frame_header())

"""One Avro codec for every topic value.

Default framing is the Avro specification's single-object encoding: ``C3 01`` followed
by the little-endian CRC-64-AVRO fingerprint of the writer schema's canonical form.
With a schema registry configured, values use Confluent framing (``00`` + 4-byte schema
id). Decoding accepts both, and resolves any known writer version against the current
reader schema, which is what keeps schema evolution backward compatible.
"""

from __future__ import annotations

import io
import re
import struct
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro

from spendstream.core.schemas import (
    canonical_form,
    history_versions,
    load_schema_json,
    parsed_schema,
    wire_schema,
)

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = 0


class DecodeError(ValueError):
    """Bytes that are not a value of the expected schema; the message is the DLQ reason."""


def _crc64_avro_table() -> list[int]:
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    return table


_CRC64_TABLE = _crc64_avro_table()


def crc64_avro(data: bytes) -> int:
    """The Rabin fingerprint the Avro spec defines for single-object encoding."""
    fp = 0xC15D213AA4D7A795
    for byte in data:
        fp = (fp >> 8) ^ _CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp


def fingerprint(name: str) -> bytes:
    return struct.pack("<Q", crc64_avro(canonical_form(name).encode()))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _logical_fields(schema_json: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Top-level fields holding a timestamp-micros or a uuid (alone or in a union with null)."""
    timestamps, uuids = [], []
    for field in schema_json["fields"]:
        members = field["type"] if isinstance(field["type"], list) else [field["type"]]
        for member in members:
            if isinstance(member, dict) and member.get("logicalType") == "timestamp-micros":
                timestamps.append(field["name"])
            elif isinstance(member, dict) and member.get("logicalType") == "uuid":
                uuids.append(field["name"])
    return tuple(timestamps), tuple(uuids)


class AvroCodec:
    """Encode and decode one record type (``usage_event``, ``decision``, ``alert``, ``policy``)."""

    def __init__(self, schema_name: str, registry_url: str | None = None) -> None:
        self.schema_name = schema_name
        self.schema = parsed_schema(schema_name)
        # Encoding goes through a copy without logical types (same bytes on the wire) and converts
        # timestamps and UUIDs here: a third faster than fastavro's generic logical-type path.
        self._wire = wire_schema(schema_name)
        self._timestamp_fields, self._uuid_fields = _logical_fields(load_schema_json(schema_name))
        self._header = SINGLE_OBJECT_MAGIC + fingerprint(schema_name)
        # writer fingerprint -> writer schema (None = same as reader); every kept version decodes.
        self._writers: dict[bytes, dict[str, Any] | None] = {fingerprint(schema_name): None}
        for old in history_versions(schema_name):
            self._writers[fingerprint(old)] = parsed_schema(old)
        self._registry = _SchemaRegistry(registry_url, schema_name) if registry_url else None

    def frame_header(self) -> bytes:
        """The bytes every encoded value starts with (with a registry, the first call registers the schema)."""
        if self._registry is not None:
            return struct.pack(">bI", CONFLUENT_MAGIC, self._registry.schema_id(self.schema))
        return self._header

    def encode(self, record: dict[str, Any]) -> bytes:
        """Frame and encode; ``record`` may be modified in place (``to_avro()`` returns a fresh dict)."""
        buf = io.BytesIO()
        buf.write(self.frame_header())
        for name in self._timestamp_fields:
            value = record.get(name)
            if isinstance(value, datetime):
                record[name] = (value - _EPOCH) // _MICROSECOND
        for name in self._uuid_fields:
            value = record.get(name)
            if isinstance(value, uuid.UUID):
                record[name] = str(value)
        fastavro.schemaless_writer(buf, self._wire, record)
        return buf.getvalue()

    def decode(self, data: bytes) -> dict[str, Any]:
        if not data:
            raise DecodeError("empty value")
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < 10:
                raise DecodeError("truncated single-object header")
            try:
                writer = self._writers[data[2:10]]
            except KeyError:
                raise DecodeError(f"unknown schema fingerprint {data[2:10].hex()} for {self.schema_name}") from None
            body = data[10:]
        elif data[0] == CONFLUENT_MAGIC and len(data) >= 5:
            if self._registry is None:
                raise DecodeError("schema-registry framed value but no SPENDSTREAM_SCHEMA_REGISTRY_URL is set")
            writer = self._registry.writer_schema(struct.unpack(">I", data[1:5])[0])
            body = data[5:]
        else:
            raise DecodeError(f"not an Avro single-object or registry-framed value (starts {data[:4].hex()})")
        stream = io.BytesIO(body)
        try:
            if writer is None:
                record = fastavro.schemaless_reader(stream, self.schema, None)
            else:
                record = fastavro.schemaless_reader(stream, writer, self.schema)
        except Exception as exc:  # fastavro raises many types on corrupt input
            # fastavro's messages can name a buffer's memory address; drop it so equal input gives equal reasons.
            detail = re.sub(r" from <[^>]*>", "", str(exc))
            raise DecodeError(f"corrupt Avro body: {type(exc).__name__}: {detail}") from None
        if stream.tell() != len(body):
            raise DecodeError(f"{len(body) - stream.tell()} trailing bytes after the Avro record")
        return record  # type: ignore[return-value]


class _SchemaRegistry:
    """Confluent Schema Registry lookups, cached: one HTTP call per schema id per process."""

    def __init__(self, url: str, schema_name: str) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self._client = SchemaRegistryClient({"url": url})
        self._subject = f"spendstream.{schema_name}-value"
        self._id: int | None = None
        self._by_id: dict[int, dict[str, Any] | None] = {}

    def schema_id(self, schema: dict[str, Any]) -> int:
        if self._id is None:
            import json

            from confluent_kafka.schema_registry import Schema

            text = json.dumps(load_schema_json(self._subject.split(".", 1)[1].rsplit("-", 1)[0]))
            self._id = self._client.register_schema(self._subject, Schema(text, "AVRO"))
            self._by_id[self._id] = None
        return self._id

    def writer_schema(self, schema_id: int) -> dict[str, Any] | None:
        if schema_id not in self._by_id:
            import json

            try:
                text = self._client.get_schema(schema_id).schema_str
            except Exception as exc:
                raise DecodeError(f"schema id {schema_id} not found in the registry: {exc}") from None
            self._by_id[schema_id] = fastavro.parse_schema(json.loads(text))
        return self._by_id[schema_id]

"""The Avro schemas are the source of truth: models, codec and ledger DDL must agree with them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import fastavro
import pytest

from spendstream.core import events
from spendstream.core.codec import AvroCodec, DecodeError, crc64_avro
from spendstream.core.schemas import history_versions, load_schema_json, parsed_schema

MODELS = {
    "usage_event": events.UsageEvent,
    "decision": events.Decision,
    "alert": events.Alert,
    "policy": events.PolicyRecord,
    "heartbeat": events.Heartbeat,
}


def _avro_python_types(avro_type: Any) -> set[str]:
    if isinstance(avro_type, list):
        return set().union(*(_avro_python_types(t) for t in avro_type))
    if isinstance(avro_type, dict):
        logical = avro_type.get("logicalType")
        if logical in ("uuid",):
            return {"uuid"}
        if logical in ("timestamp-micros", "timestamp-millis"):
            return {"datetime"}
        return {avro_type["type"]}
    return {avro_type}


_PY_FOR_AVRO = {
    "string": {str},
    "long": {int},
    "int": {int},
    "double": {float},
    "boolean": {bool},
    "null": {type(None)},
    "map": {dict},
    "array": {list},
    "uuid": {uuid.UUID},
    "datetime": {datetime},
    "enum": set(),
}


def _annotation_types(annotation: Any) -> set[type]:
    """The plain Python types an annotation admits (Annotated metadata and Optional unwrapped)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _annotation_types(get_args(annotation)[0])
    if origin in (dict, list):
        return {origin}
    if origin in (Union, UnionType):
        return set().union(*(_annotation_types(arg) for arg in get_args(annotation)))
    return {annotation}


@pytest.mark.parametrize("schema_name", sorted(MODELS))
def test_models_mirror_schemas_field_by_field(schema_name: str) -> None:
    schema = load_schema_json(schema_name)
    model = MODELS[schema_name]
    assert [f["name"] for f in schema["fields"]] == list(model.model_fields), "same fields, same order"
    for avro_field in schema["fields"]:
        model_field = model.model_fields[avro_field["name"]]
        avro_types = _avro_python_types(avro_field["type"])
        py_types = _annotation_types(model_field.annotation)
        if "enum" in avro_types:
            enum_cls = next(t for t in py_types if isinstance(t, type) and issubclass(t, str))
            assert [m.value for m in enum_cls] == avro_field["type"]["symbols"], avro_field["name"]
            continue
        expected = set().union(*(_PY_FOR_AVRO[t] for t in avro_types))
        assert py_types == expected, f"{schema_name}.{avro_field['name']}: {py_types} != {expected}"
        assert ("default" in avro_field) == (not model_field.is_required()) or avro_field["name"] in (
            "event_id",
            "occurred_at",
            "issued_at",
            "alert_id",
            "published_at",
        ), f"{schema_name}.{avro_field['name']}: required in one, optional in the other"


def test_every_schema_field_default_is_valid_avro() -> None:
    for name in MODELS:
        fastavro.parse_schema(load_schema_json(name))


def _sample_usage() -> events.UsageEvent:
    return events.UsageEvent(
        org="acme",
        team="marketing",
        feature="ai_chatbot",
        user="u1",
        tags={"region": "eu"},
        provider="openai",
        model_requested="gpt-4o",
        model_served="gpt-4o-2024-08-06",
        input_tokens=1200,
        output_tokens=300,
        cached_input_tokens=200,
        cost_nanos=6_250_000,
        latency_ms=812,
        status=events.UsageStatus.ok,
    )


def test_round_trip_every_record_type() -> None:
    samples = {
        "usage_event": _sample_usage(),
        "decision": events.Decision(
            scope="team:marketing",
            action=events.Action.fallback,
            fallback_models={"gpt-4o": "gpt-4o-mini"},
            version=3,
            period="month",
            period_start=datetime(2026, 11, 1, tzinfo=UTC),
            critical_throttle_rps={"ai_chatbot": 2.0},
        ),
        "alert": events.Alert(scope="team:marketing", kind=events.AlertKind.threshold, message="80% of budget"),
        "policy": events.PolicyRecord(name="default", version="abc", document="{}"),
        "heartbeat": events.Heartbeat(worker="spendstream-processor@host:1", policy_version="abc"),
    }
    for name, sample in samples.items():
        codec = AvroCodec(name)
        assert type(sample).from_avro(codec.decode(codec.encode(sample.to_avro()))) == sample


def test_single_object_header_carries_the_schema_fingerprint() -> None:
    codec = AvroCodec("usage_event")
    data = codec.encode(_sample_usage().to_avro())
    assert data[:2] == b"\xc3\x01"
    from fastavro.schema import to_parsing_canonical_form

    canonical = to_parsing_canonical_form(load_schema_json("usage_event")).encode()
    assert int.from_bytes(data[2:10], "little") == crc64_avro(canonical)


def test_crc64_avro_matches_the_spec_value_for_null() -> None:
    # The Avro specification's fingerprint of the schema "null" (CRC-64-AVRO).
    assert crc64_avro(b'"null"') == 0x63DD24E7CC258F8A


def test_reader_on_current_schema_decodes_events_written_with_version_1() -> None:
    """Backward compatibility: what old edges wrote still decodes, with new fields defaulted."""
    v1 = parsed_schema("history/usage_event.v1")
    import io

    from spendstream.core.codec import SINGLE_OBJECT_MAGIC, fingerprint

    old = {k: v for k, v in _sample_usage().to_avro().items() if k not in ("cache_write_tokens", "price_source")}
    buf = io.BytesIO()
    buf.write(SINGLE_OBJECT_MAGIC + fingerprint("history/usage_event.v1"))
    fastavro.schemaless_writer(buf, v1, old)
    decoded = AvroCodec("usage_event").decode(buf.getvalue())
    assert decoded["cache_write_tokens"] == 0
    assert decoded["price_source"] == ""
    assert events.UsageEvent.from_avro(decoded).cost_nanos == 6_250_000


def test_current_schema_is_backward_compatible_with_every_older_version() -> None:
    """Every field added since an older version has a default, so a new reader never fails on old data."""
    for old in history_versions("usage_event"):
        old_fields = {f["name"] for f in load_schema_json(old)["fields"]}
        for field in load_schema_json("usage_event")["fields"]:
            if field["name"] not in old_fields:
                assert "default" in field, f"new field {field['name']} needs a default (reading {old})"


def _detailed_usage() -> events.UsageEvent:
    return _sample_usage().model_copy(
        update={"reasoning_tokens": 100, "cache_write_tokens": 50, "cache_write_1h_tokens": 20, "service_tier": "batch"}
    )


def test_reader_on_current_schema_decodes_events_written_with_version_2() -> None:
    """Old writer, new reader: an event from an edge on version 2 decodes with the detail fields at their
    defaults, and prices as it did."""
    import io

    from spendstream.core.codec import SINGLE_OBJECT_MAGIC, fingerprint

    v2 = "history/usage_event.v2"
    v2_fields = {f["name"] for f in load_schema_json(v2)["fields"]}
    old = {k: v for k, v in _detailed_usage().to_avro().items() if k in v2_fields}
    buf = io.BytesIO()
    buf.write(SINGLE_OBJECT_MAGIC + fingerprint(v2))
    fastavro.schemaless_writer(buf, parsed_schema(v2), old)
    decoded = AvroCodec("usage_event").decode(buf.getvalue())
    assert {name: decoded[name] for name in events.DETAIL_FIELDS} == dict.fromkeys(events.DETAIL_FIELDS, 0)
    assert decoded["service_tier"] == "" and decoded["cache_write_tokens"] == 50
    assert events.UsageEvent.from_avro(decoded).cost_nanos == 6_250_000


@pytest.mark.parametrize("old", history_versions("usage_event"))
def test_readers_on_older_versions_resolve_events_written_with_the_current_schema(old: str) -> None:
    """New writer, old reader: a reader that still holds an older schema (and learns the writer schema, as
    through a schema registry) reads the fields it knows and skips the new ones."""
    import io

    record = _detailed_usage().to_avro()
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed_schema("usage_event"), record)
    buf.seek(0)
    read = fastavro.schemaless_reader(buf, parsed_schema("usage_event"), parsed_schema(old))
    old_fields = [f["name"] for f in load_schema_json(old)["fields"]]
    assert list(read) == old_fields
    assert read == {name: record[name] for name in old_fields} | {"event_id": uuid.UUID(record["event_id"])}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"hello world", "not an Avro"),
        (b"\xc3\x01\x00\x00\x00\x00\x00\x00\x00\x00abc", "unknown schema fingerprint"),
        (b"\xc3\x01\x01", "truncated"),
        (b"\x00\x00\x00\x00\x01abc", "no SPENDSTREAM_SCHEMA_REGISTRY_URL"),
    ],
)
def test_undecodable_bytes_raise_decode_error_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        AvroCodec("usage_event").decode(data)


def test_truncated_body_is_a_decode_error() -> None:
    codec = AvroCodec("usage_event")
    data = codec.encode(_sample_usage().to_avro())
    with pytest.raises(DecodeError, match="corrupt Avro body"):
        codec.decode(data[:-20])


def test_the_usage_schema_carries_the_attribution_fields_in_their_order() -> None:
    """``core.attribution.Attribution`` is the one declaration of the eight fields; the event mirrors them."""
    from spendstream.core.attribution import ATTRIBUTION_FIELDS, Attribution
    from spendstream.core.events import UsageEvent

    names = [f["name"] for f in load_schema_json("usage_event")["fields"]]
    assert [n for n in names if n in ATTRIBUTION_FIELDS] == list(ATTRIBUTION_FIELDS)
    event = UsageEvent(provider="openai", model_requested="gpt-4o", team="web", customer="c1")
    assert event.attribution == Attribution(team="web", customer="c1")

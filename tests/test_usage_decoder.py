"""Stage 1's fast usage decoder reads exactly what the codec reads, and declines whatever the codec would decide
differently (so the codec's path keeps deciding it, DLQ reason included)."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro
import pytest
from confluent_kafka import Message
from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.codec import AvroCodec, DecodeError
from spendstream.core.events import UsageEvent
from spendstream.core.policy import parse_policy
from spendstream.core.schemas import load_schema_json, parsed_schema
from spendstream.core.topics import DLQ_REASON_HEADER, USAGE, USAGE_DLQ
from spendstream.processor.checkpoint import Changelog
from spendstream.processor.policy_in_force import PolicyHolder
from spendstream.processor.stage_one import StageOne
from spendstream.processor.usage_decoder import FieldDecoder, UnsupportedSchema

CODEC = AvroCodec("usage_event")
ALL_FIELDS = [field["name"] for field in load_schema_json("usage_event")["fields"]]
DECODER = FieldDecoder(CODEC, ALL_FIELDS)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def event(**changes: object) -> UsageEvent:
    base = UsageEvent(
        org="acme",
        team="ünïcode-team",
        user="u1",
        provider="openai",
        model_requested="gpt-4o",
        input_tokens=123_456_789,
        output_tokens=70,
        cached_input_tokens=64,
        reasoning_tokens=7,
        cost_nanos=2**40 + 3,
        tags={"k": "v", "ключ": "значение"},
        occurred_at=datetime(2025, 1, 15, 12, 0, 0, 123456, tzinfo=UTC),
    )
    return base.model_copy(update=changes)


def as_codec_reads(data: bytes) -> list[object]:
    record = CODEC.decode(data)
    record["event_id"] = record["event_id"].bytes
    record["occurred_at"] = (record["occurred_at"] - EPOCH) // timedelta(microseconds=1)
    return [record[name] for name in ALL_FIELDS]


@pytest.mark.parametrize(
    "sample",
    [
        event(),
        event(cost_nanos=None, tags={}),
        event(status="blocked", cache_hit=True, price_source="policy", service_tier="flex"),
        event(occurred_at=datetime(1969, 12, 31, 23, 59, tzinfo=UTC), latency_ms=10**12),
        event(cached_input_tokens=0, reasoning_tokens=0),  # every counter after the cost zero: read at once
        event(reasoning_tokens=0, web_search_requests=3),  # zeros, then a counter that is not
        event(reasoning_tokens=0, service_tier="priority"),
        event(occurred_at=datetime(9999, 1, 1, tzinfo=UTC)),  # timestamps of nine bytes and of two
        event(occurred_at=datetime(1970, 1, 1, 0, 0, 0, 100, tzinfo=UTC)),
    ],
)
def test_reads_every_field_as_the_codec_does(sample: UsageEvent) -> None:
    data = CODEC.encode(sample.to_avro())
    assert list(DECODER.decode(data) or ()) == as_codec_reads(data)


def test_reads_only_the_wanted_fields_in_the_order_asked() -> None:
    sample = event()
    data = CODEC.encode(sample.to_avro())
    wanted = FieldDecoder(CODEC, ["cost_nanos", "event_id", "team", "event_id"])
    assert wanted.decode(data) == (sample.cost_nanos, sample.event_id.bytes, sample.team, sample.event_id.bytes)


def body(record: dict[str, object]) -> bytes:
    """A current-schema value of a raw record (logical types already in wire form)."""
    out = io.BytesIO()
    fastavro.schemaless_writer(out, parsed_schema("usage_event"), record)
    return CODEC.frame_header() + out.getvalue()


def wire(**changes: object) -> dict[str, object]:
    record = event().to_avro()
    record["occurred_at"] = (record["occurred_at"] - EPOCH) // timedelta(microseconds=1)  # type: ignore[operator]
    record["event_id"] = str(record["event_id"])
    record.update(changes)
    return record


# longs of every varint length (1 to 10 bytes), either sign, near each length's boundaries
LONGS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([b for n in range(1, 64) for b in (2**n - 1, 2**n, -(2**n), -(2**n) - 1) if -(2**63) <= b < 2**63]),
)


@given(inputs=LONGS, cost=LONGS, latency=LONGS, micros=LONGS)
def test_reads_longs_of_every_length_as_the_codec_does(inputs: int, cost: int, latency: int, micros: int) -> None:
    data = body(wire(input_tokens=inputs, cost_nanos=cost, latency_ms=latency, occurred_at=micros))
    try:
        expected = as_codec_reads(data)
    except DecodeError:  # a timestamp no datetime holds: the codec's path decides
        assert DECODER.decode(data) is None
        return
    assert list(DECODER.decode(data) or ()) == expected


def test_declines_what_the_codec_rejects_or_reads_otherwise() -> None:
    good = CODEC.encode(event().to_avro())
    assert DECODER.decode(good) is not None
    v1 = AvroCodec("history/usage_event.v1")
    assert DECODER.decode(v1.frame_header() + good[10:]) is None  # another writer schema: the codec resolves it
    assert DECODER.decode(good[:-3]) is None  # truncated
    assert DECODER.decode(good + b"\x00") is None  # trailing bytes
    assert DECODER.decode(b"\x00\x00\x00\x00\x01" + good[10:]) is None  # registry framing
    not_canonical = body(wire(event_id=uuid.uuid4().hex))  # a UUID the codec parses, in another spelling
    assert DECODER.decode(not_canonical) is None and CODEC.decode(not_canonical)["event_id"]
    h = uuid.uuid4().hex
    moved = body(wire(event_id=f"{h[:7]}-{h[7:12]}-{h[12:18]}-{h[18:20]}-{h[20:]}"))  # dashes elsewhere
    assert DECODER.decode(moved)[0] == CODEC.decode(moved)["event_id"].bytes == bytes.fromhex(h)  # what UUID reads
    five_dashes = "01234567-89ab-cdef-0123-456789abcd-f"
    for bad_id in ("not-a-uuid", "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz", five_dashes, "-" * 36):
        with pytest.raises(DecodeError):
            CODEC.decode(body(wire(event_id=bad_id)))
        assert DECODER.decode(body(wire(event_id=bad_id))) is None
    bad_utf8 = body(wire(price_source="x" * 8))  # a field stage 1 does not use, corrupted: the codec rejects it
    bad_utf8 = bad_utf8.replace(b"x" * 8, b"\xff" * 8)
    with pytest.raises(DecodeError):
        CODEC.decode(bad_utf8)
    assert DECODER.decode(bad_utf8) is None


def test_a_span_is_the_raw_encoding_of_consecutive_fields_whose_strings_it_does_not_check() -> None:
    spans = FieldDecoder(CODEC, ["cost_nanos"], [("org", "division", "team", "project")])
    sample = event(team="alpha", project="apollo")
    cost, hierarchy = spans.decode(CODEC.encode(sample.to_avro())) or ()
    assert cost == sample.cost_nanos
    assert hierarchy == b"\x08acme" + b"\x00" + b"\x0aalpha" + b"\x0capollo"  # zigzag length, then UTF-8
    corrupted = body(wire(team="alpha")).replace(b"alpha", b"\xffalph")
    assert DECODER.decode(corrupted) is None  # what decodes the team rejects it
    assert (spans.decode(corrupted) or ())[1] == b"\x08acme\x00\x0a\xffalph\x00"  # the span only carries it
    long_team = spans.decode(CODEC.encode(event(team="t" * 100).to_avro())) or ()
    assert long_team[1] == b"\x08acme\x00\xc8\x01" + b"t" * 100 + b"\x00"  # a length of two bytes
    with pytest.raises(UnsupportedSchema):
        FieldDecoder(CODEC, [], [("org", "team")])  # not consecutive


def test_stage_one_dead_letters_an_attribution_that_is_not_utf8_whatever_it_read_before() -> None:
    """The fast path keys its memo of scopes by an attribution's raw bytes: bytes it never decoded still reach the
    codec, and the DLQ, with the codec's reason."""
    sent: list[tuple[str, dict[str, bytes]]] = []

    class Out:
        def send(self, topic: str, key: Any, value: Any, partition: Any = None, headers: Any = None) -> None:
            sent.append((topic, dict(headers or [])))

    policy = parse_policy("name: p\ntimezone: UTC\norg: acme\n", "<test>")
    stage = StageOne(
        PolicyHolder(policy, timedelta(days=1)),
        Changelog({}, "partials-changelog", Out()),
        Out(),
        6,
        allowed_lateness=timedelta(days=1),
        max_future_skew=timedelta(minutes=5),
        dedup_horizon=timedelta(minutes=15),
    )
    now = datetime.now(UTC).replace(microsecond=0)
    good = wire(team="alpha", occurred_at=(now - EPOCH) // timedelta(microseconds=1))
    values = [body(good), body({**good, "event_id": str(uuid.uuid4())}).replace(b"alpha", b"\xffalph")]
    stamp = int(now.timestamp() * 1000)
    messages = [
        Message(topic=USAGE, partition=1, offset=n, value=v, timestamp=(1, stamp)) for n, v in enumerate(values)
    ]
    stage.process(1, messages)
    reasons = [headers[DLQ_REASON_HEADER].decode() for topic, headers in sent if topic == USAGE_DLQ]
    assert len(reasons) == 1 and reasons[0].startswith("corrupt Avro body") and "utf-8" in reasons[0]

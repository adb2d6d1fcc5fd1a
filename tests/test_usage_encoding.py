"""The Emitter's usage encoder writes exactly the bytes and keys of the generic Avro path, for any event."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.core.codec import AvroCodec
from spendstream.core.events import MAX_EVENT_COST_NANOS, MAX_EVENT_TOKENS, UsageEvent
from spendstream.edge.emitter import attribution_key
from spendstream.edge.usage_encoding import UsageEncoder

CODEC = AvroCodec("usage_event")
names = st.one_of(st.sampled_from(["", "acme", "team-7", "gpt-4o"]), st.text(max_size=12))
zones = st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))])

events = st.builds(
    UsageEvent,
    occurred_at=st.datetimes(min_value=datetime(1969, 12, 31), max_value=datetime(2200, 1, 1), timezones=zones),
    org=names,
    division=names,
    team=names,
    project=names,
    feature=names,
    user=names,
    customer=names,
    environment=names,
    tags=st.dictionaries(names, names, max_size=3),
    provider=names,
    model_requested=names,
    model_served=names,
    input_tokens=st.integers(0, MAX_EVENT_TOKENS),
    output_tokens=st.integers(0, 300),
    cached_input_tokens=st.integers(0, MAX_EVENT_TOKENS),
    cache_write_tokens=st.integers(0, 20_000),
    cost_nanos=st.one_of(st.none(), st.integers(0, MAX_EVENT_COST_NANOS)),
    price_source=names,
    latency_ms=st.integers(0, 2**63 - 1),
    status=st.sampled_from(["ok", "error", "blocked"]),
    decision_applied=names,
    cache_hit=st.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(events, min_size=1, max_size=4))
def test_record_is_the_generic_key_and_value(batch: list[UsageEvent]) -> None:
    encoder = UsageEncoder(CODEC)
    for event in batch * 2:  # the second time from the encoder's caches
        assert encoder.record(event) == (attribution_key(event), CODEC.encode(event.to_avro()))

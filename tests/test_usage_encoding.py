"""The Emitter's usage encoder writes exactly the bytes and keys of the generic Avro path, for any event."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.core.attribution import attribution_value_problem
from spendstream.core.codec import AvroCodec
from spendstream.core.events import MAX_EVENT_COST_NANOS, MAX_EVENT_TOKENS, UsageEvent
from spendstream.edge.emitter import attribution_key
from spendstream.edge.usage_encoding import UsageEncoder

CODEC = AvroCodec("usage_event")
names = st.one_of(st.sampled_from(["", "acme", "team-7", "gpt-4o"]), st.text(max_size=12))
# what may attribute a call (no "*", no surrounding spaces: attribution_value_problem)
attributions = names.filter(lambda value: attribution_value_problem("team", value) is None)
zones = st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))])

events = st.builds(
    UsageEvent,
    occurred_at=st.datetimes(min_value=datetime(1969, 12, 31), max_value=datetime(2200, 1, 1), timezones=zones),
    org=attributions,
    division=attributions,
    team=attributions,
    project=attributions,
    feature=attributions,
    user=attributions,
    customer=attributions,
    environment=attributions,
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
    status=st.sampled_from(["ok", "error"]),  # (a blocked call costs nothing: test_hostile_input refuses one that does)
    decision_applied=names,
    cache_hit=st.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(events, min_size=1, max_size=4))
def test_record_is_the_generic_key_and_value(batch: list[UsageEvent]) -> None:
    encoder = UsageEncoder(CODEC)
    for event in batch * 2:  # the second time from the encoder's caches
        assert encoder.record(event) == (attribution_key(event), CODEC.encode(event.to_avro()))


def _outcome(encode: Callable[[UsageEvent], tuple[bytes, bytes]], event: UsageEvent) -> object:
    try:
        return encode(event)
    except Exception as exc:
        return type(exc)


def _generic(event: UsageEvent) -> tuple[bytes, bytes]:
    return attribution_key(event), CODEC.encode(event.to_avro())


def test_a_value_equal_to_a_cached_one_but_of_another_type_is_encoded_as_the_generic_path_does() -> None:
    """The encoder's caches are keyed by value and 1 == True: an unvalidated event must not reuse another's bytes."""
    encoder = UsageEncoder(CODEC)
    event = UsageEvent(team="t", provider="openai", model_requested="m", cache_hit=True)
    assert encoder.record(event) == _generic(event)
    for update in ({"cache_hit": 1}, {"cache_hit": 0}, {"cache_hit": "yes"}, {"status": "lost"}, {"user": 7}):
        odd = event.model_copy(update=update)
        assert _outcome(encoder.record, odd) == _outcome(_generic, odd), update


def test_timestamps_around_every_varint_group_boundary_are_the_generic_bytes() -> None:
    """The timestamp's low groups come from a table and its high ones from a cache: every split point is exact."""
    encoder = UsageEncoder(CODEC)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for bits in range(56):  # 2**56 microseconds before 1970 is before datetime.min
        for delta in (-1, 0, 1):
            micros = (1 << bits) + delta
            for at in (epoch + timedelta(microseconds=micros), epoch - timedelta(microseconds=micros)):
                event = UsageEvent(team="t", provider="openai", model_requested="m", occurred_at=at)
                assert encoder.record(event) == _generic(event), at

"""The ledger places an event that names no org or division (or, with a project, no team) as the processor counts
it: a user session found division roll-ups putting what the division's budget counted under (unattributed)."""

from __future__ import annotations

import threading
import time
from typing import Any

from confluent_kafka import Producer
from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.codec import AvroCodec
from spendstream.core.config import Settings
from spendstream.core.events import UsageEvent
from spendstream.core.ledger_store import connect
from spendstream.core.placement import NO_PLACEMENT, Placement
from spendstream.core.policy import parse_policy
from spendstream.core.topics import USAGE
from spendstream.processor.scopes import hierarchy_scopes
from spendstream.sink.ledger_sink import LedgerSink

POLICY = parse_policy(
    """
name: placed
org: acme
divisions: {go_to_market: [marketing, sales], engineering: [platform]}
projects: {campaigns: marketing, infra: platform}
"""
)
NAMES = {
    "org": st.sampled_from(["", "acme", "other"]),
    "division": st.sampled_from(["", "go_to_market", "engineering", "elsewhere"]),
    "team": st.sampled_from(["", "marketing", "sales", "platform", "unplaced"]),
    "project": st.sampled_from(["", "campaigns", "infra", "loose"]),
}


def _scopes(record: dict[str, str]) -> list[str]:
    return hierarchy_scopes(record["org"], record["division"], record["team"], record["project"], POLICY)


@given(st.fixed_dictionaries(NAMES))
def test_a_placed_row_names_exactly_the_scopes_the_processor_counts(record: dict[str, str]) -> None:
    placed = dict(record)
    Placement.of(POLICY).place(placed)
    counted = _scopes(record)
    assert _scopes(placed) == counted  # placing changes nothing the processor counts
    for dimension in ("org", "division", "team"):
        named = [s.partition(":")[2] for s in counted if s.startswith(dimension + ":")]
        assert placed[dimension] == (named[0] if named else "")
    assert all(placed[d] == record[d] for d in NAMES if record[d])  # what the event names is kept


def test_clickhouse_places_rows_as_python_does(settings: Settings) -> None:
    placement = Placement.of(POLICY)
    records = [dict(zip(NAMES, combo, strict=True)) for combo in _combinations()]
    client = connect(settings)
    try:
        rows = " UNION ALL ".join(
            "SELECT {} AS org, {} AS division, {} AS team, {} AS project".format(
                *(repr(r[name]) for name in ("org", "division", "team", "project"))
            )
            for r in records
        )
        exprs = placement.select_sql()
        got = client.query(
            f"SELECT {exprs['org']}, {exprs['division']}, {exprs['team']} FROM ({rows}) ORDER BY org, division, team, "
            "project"
        ).result_rows
    finally:
        client.close()
    expected = []
    for record in records:
        placed = dict(record)
        placement.place(placed)
        expected.append(((record["org"], record["division"], record["team"], record["project"]), placed))
    expected.sort(key=lambda pair: pair[0])
    assert [tuple(row) for row in got] == [(p["org"], p["division"], p["team"]) for _, p in expected]
    assert NO_PLACEMENT.select_sql() == {}


def _combinations() -> list[tuple[str, ...]]:
    from itertools import product

    return list(product(["", "acme"], ["", "engineering"], ["", "sales", "unplaced"], ["", "infra", "loose"]))


def _sink_rows(settings: Settings, events: list[UsageEvent], query: str, **kwargs: Any) -> list[tuple[Any, ...]]:
    """Publish ``events``, run a sink placing by ``POLICY`` until it has consumed and committed them, then query."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    codec = AvroCodec("usage_event")
    for ev in events:
        producer.produce(USAGE, codec.encode(ev.to_avro()), key=b"k")
    assert producer.flush(10) == 0
    sink = LedgerSink(settings, placement=Placement.of(POLICY), **kwargs)
    ready = threading.Event()
    thread = threading.Thread(target=sink.run, args=(ready.set,), daemon=True)
    thread.start()
    try:
        assert ready.wait(60)
        deadline = time.monotonic() + 60
        while (sink.stats.consumed < len(events) or sink.stats.commits < 1) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        sink.stop()
        thread.join(60)
    try:
        return sink.client.query(query).result_rows
    finally:
        sink.client.close()


def _run_sink(settings: Settings, events: list[UsageEvent], **kwargs: Any) -> dict[str, tuple[str, str, str]]:
    query = "SELECT toString(event_id), org, division, team FROM spendstream.usage_ledger FINAL"
    return {row[0]: tuple(row[1:]) for row in _sink_rows(settings, events, query, **kwargs)}


def _events() -> list[UsageEvent]:
    base = {"provider": "openai", "model_requested": "gpt-4o", "input_tokens": 10, "output_tokens": 1}
    return [
        UsageEvent(team="marketing", cost_nanos=5, **base),  # the Emitter's README example: no org, no division
        UsageEvent(project="infra", cost_nanos=5, **base),
        UsageEvent(team="sales", division="elsewhere", cost_nanos=5, **base),  # named: counted as named
        UsageEvent(team="marketing", **base),  # unpriced: the exact path
    ]


def test_the_sink_writes_the_placement_on_both_paths(settings: Settings) -> None:
    events = _events()
    rows = _run_sink(settings, events)
    assert [rows[str(ev.event_id)] for ev in events] == [
        ("acme", "go_to_market", "marketing"),
        ("acme", "engineering", "platform"),
        ("acme", "elsewhere", "sales"),
        ("acme", "go_to_market", "marketing"),
    ]


def test_the_sink_places_rows_without_its_fast_path_too(settings: Settings) -> None:
    events = _events()
    rows = _run_sink(settings, events, avro_fast_path=False)
    assert rows[str(events[0].event_id)] == ("acme", "go_to_market", "marketing")
    assert rows[str(events[1].event_id)] == ("acme", "engineering", "platform")


def test_a_placed_row_is_still_the_first_version_of_its_event(settings: Settings) -> None:
    """The row of an event without an org is written with the policy's org: a later copy of that event (without an
    org, other content) must still find it and be dropped, on the sink's SQL path too, as the processor keeps the
    first version."""
    base = {"provider": "openai", "model_requested": "gpt-4o", "input_tokens": 10, "output_tokens": 1}
    first = UsageEvent(team="marketing", cost_nanos=5, **base)
    later = first.model_copy(update={"cost_nanos": 7})
    for ev in (first, later):
        rows = _sink_rows(settings, [ev], "SELECT org, cost_nanos FROM spendstream.usage_ledger")
    assert rows == [("acme", 5)]

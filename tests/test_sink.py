"""The ledger sink: decoding and validation rules, dead letters, exact totals from several emitters."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from spendstream.core.codec import SINGLE_OBJECT_MAGIC, AvroCodec, DecodeError, fingerprint
from spendstream.core.config import Settings
from spendstream.core.events import UsageEvent, usage_record_problem
from spendstream.core.pricing import price_record
from spendstream.core.schemas import history_versions, load_schema_json, parsed_schema
from spendstream.core.topics import DLQ_REASON_HEADER, DLQ_SOURCE_HEADER, USAGE, USAGE_DLQ
from spendstream.sink.dead_letters import DLQ_STAGE_HEADER, dlq_headers
from spendstream.sink.decode import LEDGER_COLUMNS, UsageDecoder, columns_of, fast_problem_free, micros, reason_kind
from spendstream.sink.ledger_sink import LedgerSink, commit_positions, dedup_token, offset_ranges

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SKEW = timedelta(minutes=5)
CODEC = AvroCodec("usage_event")
REPO = Path(__file__).resolve().parents[1]


def raw_value(record: dict[str, Any]) -> bytes:
    """Encode a record that pydantic would refuse (negative tokens, empty ids) straight with fastavro."""
    buf = io.BytesIO()
    buf.write(SINGLE_OBJECT_MAGIC + fingerprint("usage_event"))
    fastavro.schemaless_writer(buf, parsed_schema("usage_event"), record)
    return buf.getvalue()


def event(**fields: Any) -> UsageEvent:
    base: dict[str, Any] = {"provider": "openai", "model_requested": "gpt-4o", "org": "acme", "team": "search"}
    return UsageEvent(**{**base, **fields})


def ledger_totals(client: Any, db: str = "spendstream") -> tuple[int, int, int]:
    count, unique, cost = client.query(
        f"SELECT count(), uniqExact(event_id), sum(ifNull(cost_nanos, 0)) FROM {db}.usage_ledger FINAL"
    ).result_rows[0]
    return int(count), int(unique), int(cost)


def ledger_ids(client: Any, db: str = "spendstream") -> list[uuid.UUID]:
    return [row[0] for row in client.query(f"SELECT event_id FROM {db}.usage_ledger FINAL").result_rows]


@contextmanager
def running_sink(settings: Settings) -> Iterator[LedgerSink]:
    """The sink in a thread of this process; its chDB client stays open for queries after it stopped."""
    sink = LedgerSink(settings)
    ready = threading.Event()
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(sink.run(ready.set)), daemon=True)
    thread.start()
    assert ready.wait(60), "sink did not start"
    try:
        yield sink
    finally:
        sink.stop()
        thread.join(60)
        assert not thread.is_alive()
        assert outcome == [0]


def wait_until(condition: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[Any]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"check-{uuid.uuid4()}", "auto.offset.reset": "earliest"}
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])  # no group join: the DLQ has one partition
    found: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(found) < expected and time.monotonic() < deadline:
            found.extend(m for m in consumer.consume(1000, 0.5) if m.error() is None)
    finally:
        consumer.close()
    return found


# -- pure rules -------------------------------------------------------------------------------

raw_records = st.fixed_dictionaries(
    {
        "event_id": st.one_of(st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()), st.text(max_size=40)),
        "occurred_at": st.integers(micros(NOW) - 10**12, micros(NOW) + 10**9),
        "org": st.just("acme"),
        "division": st.just(""),
        "team": st.text(max_size=3),
        "project": st.just(""),
        "feature": st.just(""),
        "user": st.just(""),
        "customer": st.just(""),
        "environment": st.just(""),
        "tags": st.just({}),
        "provider": st.sampled_from(["", "openai"]),
        "model_requested": st.sampled_from(["", "gpt-4o"]),
        "model_served": st.just(""),
        "input_tokens": st.integers(-3, 1000),
        "output_tokens": st.integers(-3, 1000),
        "cached_input_tokens": st.integers(-3, 600),
        "cache_write_tokens": st.integers(-3, 600),
        "cost_nanos": st.one_of(st.none(), st.integers(-5, 10**12)),
        "price_source": st.just(""),
        "latency_ms": st.integers(-3, 10**5),
        "status": st.sampled_from(["ok", "error", "blocked"]),
        "decision_applied": st.just(""),
        "cache_hit": st.booleans(),
        "reasoning_tokens": st.integers(-1, 400),
        "input_audio_tokens": st.integers(-1, 300),
        "output_audio_tokens": st.integers(-1, 300),
        "input_image_tokens": st.integers(-1, 300),
        "output_image_tokens": st.integers(-1, 300),
        "cache_write_1h_tokens": st.integers(-1, 300),
        "web_search_requests": st.integers(-1, 3),
        "service_tier": st.sampled_from(["", "batch"]),
    }
)


@given(raw_records)
@hyp_settings(max_examples=400, deadline=None)
def test_decoder_accepts_exactly_what_usage_record_problem_accepts(record: dict[str, Any]) -> None:
    decoded = UsageDecoder(SKEW).decode([raw_value(record)], NOW)
    try:
        logical = CODEC.decode(raw_value(record))
    except DecodeError as exc:  # the uuid logical type refuses a malformed event_id while decoding
        assert not fast_problem_free(record, micros(NOW + SKEW))
        assert decoded.records == []
        assert [(r.stage, r.reason) for r in decoded.rejected] == [("decode", str(exc))]
        assert reason_kind("decode", str(exc)) == "bad_event_id"
        return
    problem = usage_record_problem(logical, NOW, SKEW)
    if fast_problem_free(record, micros(NOW + SKEW)):
        assert problem is None
    if problem is None:
        assert decoded.rejected == []
        (ledger_row,) = decoded.records
        expected = {**record, "event_id": str(logical["event_id"])}
        if record["cost_nanos"] is None:  # unpriced events are priced as the processor prices them
            price = price_record(logical, logical["occurred_at"])
            expected |= {"cost_nanos": price.cost_nanos, "price_source": price.source}
        assert ledger_row == expected
    else:
        assert decoded.records == []
        assert [(r.stage, r.reason) for r in decoded.rejected] == [("validate", problem)]


def test_decoder_rejects_undecodable_bytes_with_the_codec_reason() -> None:
    good = CODEC.encode(event().to_avro())
    unknown = SINGLE_OBJECT_MAGIC + b"\x00" * 8 + good[10:]
    cases = [b"", b"not avro at all", unknown, good[:-3], good + b"\x00", None]
    decoded = UsageDecoder(SKEW).decode(cases, NOW)
    assert decoded.records == []
    assert [r.index for r in decoded.rejected] == list(range(len(cases)))
    assert {r.stage for r in decoded.rejected} == {"decode"}
    assert "unknown schema fingerprint" in decoded.rejected[2].reason
    assert reason_kind("decode", decoded.rejected[2].reason) == "unknown_schema"
    assert reason_kind("decode", decoded.rejected[1].reason) == "undecodable"


@pytest.mark.parametrize("old", history_versions("usage_event"))
def test_decoder_reads_older_schema_versions_through_the_exact_path(old: str) -> None:
    old_fields = {f["name"] for f in load_schema_json(old)["fields"]}
    current = event(occurred_at=NOW - timedelta(hours=1), cost_nanos=750).to_avro()
    buf = io.BytesIO(SINGLE_OBJECT_MAGIC + fingerprint(old))
    buf.seek(0, io.SEEK_END)
    fastavro.schemaless_writer(buf, parsed_schema(old), {k: v for k, v in current.items() if k in old_fields})
    decoded = UsageDecoder(SKEW).decode([buf.getvalue()], NOW)
    assert decoded.rejected == []
    (row,) = decoded.records
    assert row["event_id"] == current["event_id"]
    assert row["occurred_at"] == micros(NOW - timedelta(hours=1))
    assert row["cost_nanos"] == 750
    assert row["reasoning_tokens"] == 0 and row["service_tier"] == ""  # fields it did not have: their defaults


def test_columns_are_the_records_transposed_in_ledger_order() -> None:
    records = [{name: f"{name}{i}" for name in LEDGER_COLUMNS} for i in range(3)]
    columns = columns_of(records)
    assert len(columns) == len(LEDGER_COLUMNS)
    assert list(columns[LEDGER_COLUMNS.index("team")]) == ["team0", "team1", "team2"]
    assert columns_of([]) == [() for _ in LEDGER_COLUMNS]


def test_offset_ranges_are_the_first_and_last_offset_seen_per_partition() -> None:
    partitions = [3, 0, 3, 3, 0, 5]
    offsets = [10, 5, 11, 19, 6, 0]
    assert offset_ranges(partitions, offsets) == {3: (10, 19), 0: (5, 6), 5: (0, 0)}
    assert offset_ranges([], []) == {}


def test_dedup_token_and_commit_positions() -> None:
    ranges = {3: (10, 19), 0: (5, 5)}
    token = dedup_token(ranges, [b"a", b"b"])
    assert token == dedup_token(dict(reversed(ranges.items())), [b"a", b"b"])
    assert token.startswith("usage:0:5-5,3:10-19:")
    assert dedup_token({3: (10, 20), 0: (5, 5)}, [b"a", b"b"]) != token
    assert dedup_token(ranges, [b"a", b"c"]) != token  # same offsets, other records: another topic's life
    positions = commit_positions(USAGE, ranges, owned={0, 3, 4})
    assert [(tp.partition, tp.offset) for tp in positions] == [(0, 6), (3, 20)]
    assert [tp.partition for tp in commit_positions(USAGE, ranges, owned={3})] == [3]


@pytest.mark.parametrize(
    ("stage", "reason", "kind"),
    [
        ("validate", "missing event_id", "bad_event_id"),
        ("validate", "event_id is not a UUID: 'x'", "bad_event_id"),
        ("decode", "corrupt Avro body: ValueError: badly formed hexadecimal UUID string", "bad_event_id"),
        ("validate", "input_tokens is negative: -1", "negative_value"),
        ("validate", "cost_nanos is negative: -1", "negative_value"),
        ("validate", "cached_input_tokens + cache_write_tokens exceed input_tokens", "cached_exceeds_input"),
        ("validate", "occurred_at 2099-01-01T00:00:00+00:00 is more than 0:05:00 in the future", "future_occurred_at"),
        ("validate", "missing provider or model_requested", "missing_provider_or_model"),
        ("validate", "something new", "invalid"),
        ("decode", "corrupt Avro body: EOFError", "undecodable"),
    ],
)
def test_reason_kinds_are_bounded_labels(stage: str, reason: str, kind: str) -> None:
    assert reason_kind(stage, reason) == kind


# -- against the real broker and chDB ---------------------------------------------------------


def test_bad_input_goes_to_the_dlq_with_its_reason_and_good_events_land(settings: Settings) -> None:
    good = [event(cost_nanos=1000 + i, team=f"t{i % 3}") for i in range(200)]
    base = event().to_avro()
    future = NOW.replace(year=2099)
    bad: dict[str, tuple[bytes, str, str]] = {
        "garbage": (b"\x00\x01not-avro", "decode", "undecodable"),
        "unknown_fp": (SINGLE_OBJECT_MAGIC + b"\xff" * 8 + CODEC.encode(base)[10:], "decode", "unknown_schema"),
        "negative": (raw_value({**base, "input_tokens": -7}), "validate", "negative_value"),
        "no_id": (raw_value({**base, "event_id": ""}), "decode", "bad_event_id"),
        "future": (CODEC.encode(event(occurred_at=future).to_avro()), "validate", "future_occurred_at"),
        "no_provider": (raw_value({**base, "provider": ""}), "validate", "missing_provider_or_model"),
        "no_model": (raw_value({**base, "model_requested": ""}), "validate", "missing_provider_or_model"),
    }
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for i, ev in enumerate(good):
        producer.produce(USAGE, CODEC.encode(ev.to_avro()), key=b"acme/t", partition=i % 6)
        if i % 30 == 0:
            name = list(bad)[(i // 30) % len(bad)]
            producer.produce(USAGE, bad[name][0], key=name.encode(), partition=i % 6)
    for name, (value, _, _) in bad.items():  # at least one of each, wherever the loop put them
        producer.produce(USAGE, value, key=name.encode(), partition=5)
    assert producer.flush(10) == 0
    bad_sent = 7 + len(bad)

    with running_sink(settings) as sink:
        wait_until(lambda: sink.stats.consumed == len(good) + bad_sent and sink.stats.commits > 0, what="sink")
        wait_until(lambda: sink.stats.inserted == len(good), what="inserts")
    stats = sink.stats
    assert sum(stats.dead_lettered.values()) == bad_sent
    assert set(stats.dead_lettered) == {kind for _, _, kind in bad.values()}
    assert ledger_totals(sink.client) == (len(good), len(good), sum(1000 + i for i in range(200)))
    assert set(ledger_ids(sink.client)) == {ev.event_id for ev in good}
    sink.client.close()

    letters = consume_all(settings.kafka_bootstrap, USAGE_DLQ, bad_sent)
    assert len(letters) == bad_sent
    for letter in letters:
        headers = dlq_headers(letter.headers())
        value, stage, kind = bad[letter.key().decode()]
        assert letter.value() == value
        assert headers[DLQ_STAGE_HEADER] == stage
        assert reason_kind(stage, headers[DLQ_REASON_HEADER]) == kind
        topic, partition, offset = headers[DLQ_SOURCE_HEADER].split("/")
        assert topic == USAGE and 0 <= int(partition) < 6 and int(offset) >= 0


def encode_as(name: str, record: dict[str, Any]) -> bytes:
    """Single-object encode with any kept schema version, bypassing pydantic (so invalid values get through)."""
    fields = {f["name"] for f in load_schema_json(name)["fields"]}
    buf = io.BytesIO()
    buf.write(SINGLE_OBJECT_MAGIC + fingerprint(name))
    fastavro.schemaless_writer(buf, parsed_schema(name), {k: v for k, v in record.items() if k in fields})
    return buf.getvalue()


# what an event says (``arrived_at`` is when its message reached the broker: checked on its own)
CONTENT_COLUMNS = tuple(c for c in LEDGER_COLUMNS if c != "arrived_at")


def ledger_rows(client: Any) -> dict[str, tuple[Any, ...]]:
    """Every ledger row in the raw form the Python path works with (event_id text, occurred_at in micros)."""
    convert = {"event_id": "toString(event_id)", "occurred_at": "toUnixTimestamp64Micro(occurred_at)"}
    select = ", ".join(convert.get(c, f"toString({c})" if c == "status" else f"`{c}`") for c in CONTENT_COLUMNS)
    rows = client.query(f"SELECT {select} FROM spendstream.usage_ledger FINAL").result_rows
    return {row[0]: tuple(row) for row in rows}


def test_fast_path_matches_the_python_path_on_a_mixed_stream(settings: Settings) -> None:
    """Current, v1 and v2 schemas, invalid and corrupt values: ledger rows and dead letters as the Python path
    has them (detail counts, and the rules that fit them inside the token counts, included)."""
    v1, v2 = history_versions("usage_event")
    now = datetime.now(UTC)
    base = event(occurred_at=now - timedelta(hours=1)).to_avro()

    def valid(i: int) -> dict[str, Any]:
        return {
            **base,
            "event_id": str(uuid.UUID(int=i)),
            "occurred_at": base["occurred_at"] - timedelta(seconds=i),
            "team": f"t{i % 7}",
            "user": f"ü{i}",
            "tags": {"env": "prod", "i": str(i)} if i % 3 else {},
            "input_tokens": 100 + i,
            "cached_input_tokens": i % 50,
            "cache_write_tokens": i % 20,
            "cost_nanos": None if i % 5 == 0 else 0 if i % 3 == 2 else 1000 + i,  # a blocked call costs nothing
            "price_source": "genai-prices:openai/gpt-4o" if i % 2 else "",
            "status": ["ok", "error", "blocked"][i % 3],
            "cache_hit": i % 2 == 1,
            "output_tokens": 50 + i,
            "reasoning_tokens": i % 40,
            "output_audio_tokens": i % 3,
            "input_audio_tokens": i % 7,
            "input_image_tokens": i % 5,
            "cache_write_1h_tokens": (i % 20) // 2,
            "web_search_requests": i % 2,
            "service_tier": "batch" if i % 6 == 0 else "",
        }

    good = encode_as("usage_event", valid(1))
    readable: dict[bytes, bytes] = {}  # key -> value; ClickHouse reads every one of these
    for i in range(300):
        readable[f"current-{i}".encode()] = encode_as("usage_event", valid(i))
    for i in range(300, 400):
        readable[f"v1-{i}".encode()] = encode_as(v1, valid(i))
    for i in range(400, 450):
        readable[f"v2-{i}".encode()] = encode_as(v2, valid(i))
    invalid = {
        "negative": {"input_tokens": -7},
        "future": {"occurred_at": datetime(2099, 1, 1, 0, 0, 0, 1, tzinfo=UTC)},
        "no_provider": {"provider": ""},
        "cached_exceeds": {"cached_input_tokens": 10, "cache_write_tokens": 5, "input_tokens": 12},
        "no_id": {"event_id": ""},
        "upper_id": {"event_id": str(uuid.UUID(int=10**6)).upper()},  # valid, judged by the Python path
        "negative_cost": {"cost_nanos": -1},
        "negative_detail": {"web_search_requests": -1},
        "audio_exceeds": {
            "input_tokens": 12,
            "cached_input_tokens": 5,
            "cache_write_tokens": 0,
            "input_audio_tokens": 8,
        },
        "reasoning_exceeds": {"output_tokens": 10, "reasoning_tokens": 8, "output_image_tokens": 3},
        "hour_exceeds": {"cache_write_tokens": 4, "cache_write_1h_tokens": 5},
        "blocked_with_cost": {"status": "blocked", "cost_nanos": 5},
        "control_in_team": {"team": "sa\nles"},
        "invisible_in_team": {"team": "sal\u200bes"},
        "spaced_team": {"team": " sales"},
    }
    for n, (name, change) in enumerate(invalid.items()):
        readable[name.encode()] = encode_as("usage_event", {**valid(1000 + n), **change})
    readable[b"v1_negative"] = encode_as(v1, {**valid(2000), "latency_ms": -3})
    readable[b"bad_utf8"] = encode_as("usage_event", {**valid(2001), "org": "abc"}).replace(
        b"\x06abc", b"\x06\xff\xfe\xfd"
    )
    readable[b"unknown_fp"] = SINGLE_OBJECT_MAGIC + b"\xff" * 8 + good[10:]
    readable[b"garbage"] = b"\x00\x01not-avro"
    unreadable = {b"truncated": good[:-1], b"trailing": encode_as("usage_event", valid(2002)) + b"\x00"}

    def expected(values: dict[bytes, bytes]) -> tuple[dict[str, tuple[Any, ...]], dict[bytes, tuple[str, str]]]:
        decoded = UsageDecoder(timedelta(seconds=settings.max_future_skew_s)).decode(list(values.values()), now)
        keys = list(values)
        rows = {r["event_id"]: tuple(r[c] for c in CONTENT_COLUMNS) for r in decoded.records}
        return rows, {keys[r.index]: (r.stage, r.reason) for r in decoded.rejected}

    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for key, value in readable.items():
        producer.produce(USAGE, value, key=key, partition=0)
    assert producer.flush(10) == 0
    want_rows, want_letters = expected(readable)
    assert len(want_rows) == 451 and len(want_letters) == 18
    with running_sink(settings) as sink:
        wait_until(lambda: sink.stats.inserted == len(want_rows), what="the readable values")
        assert sink.stats.avro_fallbacks == 0
        unpriced = sum(1 for i in range(450) if i % 5 == 0)  # priced in Python, like the processor prices them
        assert sink.stats.staged_rows >= 450 - unpriced
        for key, value in unreadable.items():
            producer.produce(USAGE, value, key=key, partition=0)
        assert producer.flush(10) == 0
        everything = {**readable, **unreadable}
        want_rows, want_letters = expected(everything)
        wait_until(lambda: sink.stats.consumed == len(everything) and sink.stats.commits >= 2, what="the rest")
        wait_until(lambda: sink.stats.inserted == len(want_rows), what="the rest inserted")
        assert sink.stats.avro_fallbacks >= 1
    assert ledger_rows(sink.client) == want_rows
    produced = sink.client.query(  # every row, on both paths, has its message's arrival (the producer's time)
        "SELECT countIf(arrived_at BETWEEN fromUnixTimestamp64Milli({lo:Int64}) AND now64(3)) = count() "
        "FROM spendstream.usage_ledger",
        parameters={"lo": micros(now) // 1000 - 60_000},
    ).result_rows
    assert produced == [(True,)]
    assert sum(sink.stats.dead_lettered.values()) == len(want_letters)
    sink.client.close()
    letters = consume_all(settings.kafka_bootstrap, USAGE_DLQ, len(want_letters))
    got = {}
    for letter in letters:
        headers = dlq_headers(letter.headers())
        assert letter.value() == everything[letter.key()]
        got[letter.key()] = (headers[DLQ_STAGE_HEADER], without_addresses(headers[DLQ_REASON_HEADER]))
    assert got == {key: (stage, without_addresses(reason)) for key, (stage, reason) in want_letters.items()}


def without_addresses(reason: str) -> str:
    """fastavro's EOF message names the stream object's memory address, which differs per decode."""
    return re.sub(r" at 0x[0-9a-f]+", "", reason)


def test_the_python_path_alone_still_writes_the_ledger(settings: Settings) -> None:
    values = [event(cost_nanos=100 + i).to_avro() for i in range(50)]
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for record in values:
        producer.produce(USAGE, CODEC.encode(record), partition=1)
    assert producer.flush(10) == 0
    sink = LedgerSink(settings, avro_fast_path=False)
    ready = threading.Event()
    thread = threading.Thread(target=sink.run, args=(ready.set,), daemon=True)
    thread.start()
    try:
        assert ready.wait(60)
        wait_until(lambda: sink.stats.inserted == 50 and sink.stats.commits > 0, what="inserts")
    finally:
        sink.stop()
        thread.join(60)
    assert sink.stats.staged_rows == 0
    assert ledger_totals(sink.client) == (50, 50, sum(100 + i for i in range(50)))
    sink.client.close()


EMIT_SCRIPT = """
import sys, uuid
from datetime import UTC, datetime, timedelta
from spendstream.core.events import UsageEvent
from spendstream.edge.emitter import Emitter

bootstrap, seed, count, spool = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
start = datetime.now(UTC) - timedelta(days=1)
with Emitter(bootstrap_servers=bootstrap, spool_dir=spool) as em:
    for i in range(count):
        em.emit(UsageEvent(
            event_id=uuid.UUID(int=(seed << 64) | i), occurred_at=start + timedelta(seconds=i),
            org="acme", team=f"team{i % 5}", user=f"u{seed}-{i % 50}", provider="openai",
            model_requested="gpt-4o-mini", input_tokens=100 + i % 17, output_tokens=i % 29,
            cost_nanos=seed * 1000 + i * 7 + 1, latency_ms=i % 300))
    left = em.flush(120)
print(left)
sys.exit(1 if left else 0)
"""


def emitted_cost(seed: int, count: int) -> int:
    return sum(seed * 1000 + i * 7 + 1 for i in range(count))


def emit_in_subprocesses(bootstrap: str, seeds: list[int], count: int, tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", EMIT_SCRIPT, bootstrap, str(seed), str(count), str(tmp_path / f"spool{seed}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        for seed in seeds
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.decode()[-2000:]


@pytest.mark.slow
def test_three_emitting_processes_land_exactly_once(settings: Settings, tmp_path: Path) -> None:
    seeds, count = [1, 2, 3], 10_000
    settings = settings.model_copy(update={"sink_batch_size": 4000, "sink_batch_ms": 200})
    with running_sink(settings) as sink:
        emit_in_subprocesses(settings.kafka_bootstrap, seeds, count, tmp_path)
        wait_until(lambda: sink.stats.inserted >= len(seeds) * count, timeout=120, what="all rows")
    assert sink.stats.dead_lettered == {}
    count_final, unique, cost = ledger_totals(sink.client)
    assert (count_final, unique) == (len(seeds) * count, len(seeds) * count)
    assert cost == sum(emitted_cost(seed, count) for seed in seeds)
    expected = {uuid.UUID(int=(seed << 64) | i) for seed in seeds for i in range(count)}
    assert set(ledger_ids(sink.client)) == expected
    sink.client.close()


def test_ledger_migrate_twice_applies_nothing_the_second_time(offline_settings: Settings) -> None:
    env = {"SPENDSTREAM_DATA_DIR": str(offline_settings.data_dir), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "spendstream.cli", "ledger", "migrate"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "applied  0001_usage_ledger" in first.stdout
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "applied" not in second.stdout and "up to date" in second.stdout


def test_unpriced_events_land_priced_as_the_processor_prices_them(settings: Settings) -> None:
    from spendstream.core.pricing import PriceOverride, PriceTable, Rates

    table = PriceTable((PriceOverride("local", "llama-3.2-1b", Rates(Decimal("0.02"), Decimal("0.02"))),), "reject")
    events = [
        event(input_tokens=1000, output_tokens=100),  # genai-prices
        event(provider="local", model_requested="llama-3.2-1b", input_tokens=500, output_tokens=500),  # override
        event(input_tokens=10, output_tokens=1, cost_nanos=123),  # priced at the edge: kept as it is
        event(model_requested="no-such-model-anywhere", input_tokens=5),  # the table rejects unknown models
    ]
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for ev in events:
        producer.produce(USAGE, CODEC.encode(ev.to_avro()), key=b"acme/search")
    assert producer.flush(10) == 0
    sink = LedgerSink(settings, prices=table)
    ready = threading.Event()
    thread = threading.Thread(target=sink.run, args=(ready.set,), daemon=True)
    thread.start()
    try:
        assert ready.wait(60)
        wait_until(lambda: sink.stats.inserted == 3 and sum(sink.stats.dead_lettered.values()) == 1)
    finally:
        sink.stop()
        thread.join(60)
    try:
        rows = dict(
            sink.client.query(
                "SELECT toString(event_id), (cost_nanos, price_source) FROM spendstream.usage_ledger FINAL"
            ).result_rows
        )
    finally:
        sink.client.close()  # one chDB path per process: later tests open their own
    for ev in events[:2]:
        price = price_record(ev.to_avro(), ev.occurred_at, table)
        assert rows[str(ev.event_id)] == (price.cost_nanos, price.source)
    assert rows[str(events[0].event_id)][0] == 3_500_000  # 1000 x $2.50/M + 100 x $10/M
    assert rows[str(events[1].event_id)][0] == 20_000  # 1000 tokens x $0.02/M
    assert rows[str(events[2].event_id)] == (123, "")
    assert sink.stats.dead_lettered == {"unknown_model": 1}

"""The ledger sink: decoding and validation rules, dead letters, exact totals from several emitters."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
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
from spendstream.core.schemas import parsed_schema
from spendstream.core.topics import DLQ_REASON_HEADER, DLQ_SOURCE_HEADER, USAGE, USAGE_DLQ
from spendstream.sink.dead_letters import DLQ_STAGE_HEADER, dlq_headers
from spendstream.sink.ledger_sink import (
    LEDGER_COLUMNS,
    LedgerSink,
    UsageDecoder,
    columns_of,
    commit_positions,
    dedup_token,
    fast_problem_free,
    micros,
    reason_kind,
)

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
        assert ledger_row == {**record, "event_id": str(logical["event_id"])}
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


def test_decoder_reads_older_schema_versions_through_the_exact_path() -> None:
    from spendstream.core.schemas import history_versions, load_schema_json

    (old,) = history_versions("usage_event")
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


def test_columns_are_the_records_transposed_in_ledger_order() -> None:
    records = [{name: f"{name}{i}" for name in LEDGER_COLUMNS} for i in range(3)]
    columns = columns_of(records)
    assert len(columns) == len(LEDGER_COLUMNS)
    assert list(columns[LEDGER_COLUMNS.index("team")]) == ["team0", "team1", "team2"]
    assert columns_of([]) == [() for _ in LEDGER_COLUMNS]


def test_dedup_token_and_commit_positions() -> None:
    ranges = {3: (10, 19), 0: (5, 5)}
    assert dedup_token(ranges) == dedup_token(dict(reversed(ranges.items()))) == "usage:0:5-5,3:10-19"
    assert dedup_token({3: (10, 20), 0: (5, 5)}) != dedup_token(ranges)
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

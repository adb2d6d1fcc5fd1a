"""The edge Emitter against a real broker: delivery, spooling through outages, replay, restart."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from spendstream.core.codec import AvroCodec
from spendstream.core.config import Settings, load_settings
from spendstream.core.events import INT64_MAX, MAX_EVENT_COST_NANOS, MAX_EVENT_TOKENS, UsageEvent, UsageStatus
from spendstream.core.topics import USAGE
from spendstream.edge import emitter as emitter_module
from spendstream.edge.emitter import Emitter
from spendstream.edge.spool import Spool
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from spendstream.runtime.topic_admin import create_topics

PARTITIONS = 6
# Short timeouts keep outage tests quick; the defaults behave the same, only slower.
FAST = {"message.timeout.ms": 2_000, "request.timeout.ms": 1_000}


def _events(n: int, start: int = 0) -> list[UsageEvent]:
    """Events whose latency_ms is their emit order, so per-key order can be checked after consuming."""
    return [
        UsageEvent(
            org="acme",
            team=f"team{i % 7}",
            provider="openai",
            model_requested="gpt-4o-mini",
            input_tokens=100,
            output_tokens=20,
            cost_nanos=27_000,
            latency_ms=i,
        )
        for i in range(start, start + n)
    ]


def _consume(bootstrap: str, expected: int, timeout: float = 20.0) -> list[tuple[bytes, dict]]:
    """Everything on the usage topic, per partition in log order, until `expected` records or the timeout."""
    codec = AvroCodec("usage_event")
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "emitter-test", "enable.auto.commit": False})
    consumer.assign([TopicPartition(USAGE, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    out: list[tuple[bytes, dict]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(5000, 0.2):
                assert msg.error() is None, msg.error()
                out.append((msg.key(), codec.decode(msg.value())))
        for msg in consumer.consume(5000, 0.3):  # anything beyond `expected` (duplicates) shows up too
            out.append((msg.key(), codec.decode(msg.value())))
    finally:
        consumer.close()
    return out


def _ids(events: list[UsageEvent]) -> list[str]:
    return [str(e.event_id) for e in events]


def _assert_order_per_key(records: list[tuple[bytes, dict]]) -> None:
    """Within a key, first arrivals come in emit order (a resent duplicate may repeat an earlier one)."""
    seen: dict[bytes, list[int]] = defaultdict(list)
    for key, record in records:
        assert key == f"{record['org']}/{record['team']}".encode()
        if record["latency_ms"] not in seen[key]:
            seen[key].append(record["latency_ms"])
    for order in seen.values():
        assert order == sorted(order)


def _start_broker(port: int, tmp_path: Path, name: str) -> EmbeddedBroker:
    broker = EmbeddedBroker(port=port, log_path=tmp_path / f"{name}.log").start()
    create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=PARTITIONS)
    return broker


def test_every_event_arrives_exactly_once(settings: Settings, broker: EmbeddedBroker) -> None:
    events = _events(5000)
    with Emitter(settings=settings) as em:
        for event in events:
            em.emit(event)
        assert em.flush(20) == 0
        stats = em.stats
    records = _consume(broker.bootstrap, len(events))
    assert sorted(str(r["event_id"]) for _, r in records) == sorted(_ids(events))
    _assert_order_per_key(records)
    assert (stats.emitted, stats.sent, stats.spooled, stats.replayed, stats.failed) == (5000, 5000, 0, 0, 0)
    assert stats.queued == 0 and stats.spool_bytes == 0


def test_full_queue_overflows_to_the_spool_and_loses_nothing(settings: Settings, broker: EmbeddedBroker) -> None:
    events = _events(3000)
    with Emitter(settings=settings, max_queue=10) as em:
        for event in events:
            em.emit(event)
        assert em.flush(20) == 0
        stats = em.stats
    assert stats.spooled > 0 and stats.failed == 0 and stats.emitted == 3000
    assert stats.replayed == stats.spooled and stats.sent == 3000
    records = _consume(broker.bootstrap, len(events))
    assert {str(r["event_id"]) for _, r in records} == set(_ids(events))


def test_a_burst_beyond_both_inboxes_is_spooled_off_the_callers_thread(
    settings: Settings, broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the deque and the event inbox, emit() encodes and hands the record over: no disk write on the caller."""
    monkeypatch.setattr(emitter_module, "_INBOX_EVENTS", 10)  # a small event inbox: the burst overruns it
    writers: set[str] = set()
    real_append = Spool.append

    def append(spool: Spool, payloads: Sequence[bytes]) -> int:
        writers.add(threading.current_thread().name)
        return real_append(spool, payloads)

    monkeypatch.setattr(Spool, "append", append)
    events = _events(3000)
    with Emitter(settings=settings, max_queue=10) as em:
        for event in events:
            em.emit(event)
        assert em.flush(20) == 0
        stats = em.stats
    assert writers == {"spendstream-emitter"}
    assert stats.spooled > 1000 and stats.failed == 0 and stats.emitted == 3000
    assert stats.replayed == stats.spooled and stats.sent == 3000
    records = _consume(broker.bootstrap, len(events))
    assert {str(r["event_id"]) for _, r in records} == set(_ids(events))


def _varied_events() -> list[UsageEvent]:
    """Events exercising every field of the schema: tags, non-ASCII text, unpriced cost, extreme integers."""
    base = _events(1)[0]
    return [
        base,
        UsageEvent(
            occurred_at=datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
            org="ακμή",
            division="d" * 256,  # the longest name an event may carry
            team="t",
            project="p",
            feature="f",
            user="ユーザー",
            customer="c",
            environment="prod",
            tags={"region": "eu", "ключ": "значение", "": ""},
            provider="anthropic",
            model_requested="claude",
            model_served="claude-haiku",
            input_tokens=MAX_EVENT_TOKENS,
            output_tokens=64,
            cached_input_tokens=63,
            cache_write_tokens=8191,
            cost_nanos=None,
            price_source="override:x",
            latency_ms=INT64_MAX,
            status=UsageStatus.blocked,
            decision_applied="shutoff",
            cache_hit=True,
        ),
        base.model_copy(update={"event_id": uuid.uuid4(), "cost_nanos": MAX_EVENT_COST_NANOS, "status": "error"}),
    ]


def test_events_arrive_with_every_field_as_emitted(settings: Settings, broker: EmbeddedBroker) -> None:
    """The Emitter's own encoder writes what the generic codec writes, for every field and both queue paths."""
    queued, overflowed = _varied_events(), [e.model_copy(update={"event_id": uuid.uuid4()}) for e in _varied_events()]
    with Emitter(settings=settings, max_queue=len(queued)) as em:
        for event in [*queued, *overflowed]:  # the queue takes the first ones, emit() encodes the overflow
            em.emit(event)
        assert em.flush(20) == 0
        stats = em.stats
    assert (stats.sent, stats.failed) == (6, 0) and stats.spooled >= 3
    codec = AvroCodec("usage_event")
    expected = {str(e.event_id): (e, codec.encode(e.to_avro())) for e in [*queued, *overflowed]}
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": uuid.uuid4().hex})
    consumer.assign([TopicPartition(USAGE, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    values: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + 20
    while len(values) < len(expected) and time.monotonic() < deadline:
        values += [(m.key(), m.value()) for m in consumer.consume(100, 0.2) if m.error() is None]
    consumer.close()
    assert len(values) == len(expected)
    for key, value in values:
        record = codec.decode(value)
        event, generic_bytes = expected[str(record["event_id"])]
        assert value == generic_bytes
        assert UsageEvent.from_avro(record) == event
        assert key == f"{event.org}/{event.team}".encode()


def test_events_the_encoder_cannot_write_are_counted_failed(settings: Settings) -> None:
    """An unvalidated event with a wrong type is refused by the codec's own rules, never raised to the caller."""
    good = _events(1)[0]
    wrong = [
        good.model_copy(update={"event_id": uuid.uuid4(), "team": 7}),
        good.model_copy(update={"event_id": uuid.uuid4(), "tags": {"k": 1}}),
        good.model_copy(update={"event_id": uuid.uuid4(), "status": "lost"}),
        good.model_copy(update={"event_id": uuid.uuid4(), "latency_ms": 2**63}),
    ]
    with Emitter(settings=settings, max_queue=2) as em:
        for event in [*wrong, good]:
            em.emit(event)
        assert em.flush(20) == 0
        stats = em.stats
    assert (stats.emitted, stats.failed, stats.sent) == (5, 4, 1)


def test_an_event_larger_than_the_broker_takes_is_refused_alone(settings: Settings, broker: EmbeddedBroker) -> None:
    """librdkafka raises on a record over message.max.bytes in produce(); that cost the events after it in the same
    batch, uncounted (an attacker's megabyte of tags made other teams' calls vanish from the ledger)."""
    events = _events(40)
    huge = events[20].model_copy(update={"tags": {"pad": "x" * 1_100_000}})
    events[20] = huge
    with Emitter(settings=settings) as em:
        for event in events:
            em.emit(event)
        assert em.flush(20) == 0
        stats = em.stats
    records = _consume(broker.bootstrap, 39)
    assert sorted(str(r["event_id"]) for _, r in records) == sorted(_ids(events[:20] + events[21:]))
    assert (stats.emitted, stats.sent, stats.failed, stats.spooled) == (40, 39, 1, 0)


def test_unreachable_broker_spools_then_replays_in_order(tmp_path: Path) -> None:
    port = free_port()
    events = _events(3000)
    em = Emitter(f"127.0.0.1:{port}", settings=load_settings(data_dir=tmp_path), producer_config=FAST)
    try:
        for event in events:
            em.emit(event)
        assert em.flush(3) == 3000
        assert em.stats.spooled == 3000 and em.stats.sent == 0 and em.stats.spool_bytes > 0
        assert list((tmp_path / "spool").glob("*.seg"))
        broker = _start_broker(port, tmp_path, "late")
        try:
            assert em.flush(30) == 0
            stats = em.stats
            records = _consume(broker.bootstrap, len(events))
        finally:
            broker.stop()
    finally:
        em.close(0)
    assert sorted({str(r["event_id"]) for _, r in records}) == sorted(_ids(events))
    _assert_order_per_key(records)
    assert stats.replayed >= 3000 and stats.failed == 0 and stats.spool_bytes == 0
    assert not list((tmp_path / "spool").glob("*.seg"))


def test_broker_killed_mid_stream(tmp_path: Path) -> None:
    broker = _start_broker(free_port(), tmp_path, "first")
    em = Emitter(broker.bootstrap, settings=load_settings(data_dir=tmp_path), producer_config=FAST)
    try:
        before = _events(1000)
        for event in before:
            em.emit(event)
        assert em.flush(20) == 0
        assert em.stats.sent == 1000
        broker.kill()
        after = _events(2000, start=1000)
        for event in after[:1000]:
            em.emit(event)
        time.sleep(3)  # longer than message.timeout.ms: deliveries fail and the spool takes over
        for event in after[1000:]:
            em.emit(event)
        assert em.flush(2) > 0
        assert em.stats.spooled > 0
        broker = _start_broker(broker.port, tmp_path, "second")
        assert em.flush(40) == 0
        records = _consume(broker.bootstrap, len(after))
    finally:
        em.close(0)
        broker.stop()
    assert {str(r["event_id"]) for _, r in records} >= set(_ids(after))
    assert em.stats.failed == 0


def test_frozen_broker_loses_nothing(settings: Settings, broker: EmbeddedBroker) -> None:
    events = _events(3000)
    with Emitter(settings=settings, producer_config=FAST) as em:
        for event in events[:1000]:
            em.emit(event)
        assert em.flush(20) == 0
        broker.pause()
        try:
            for event in events[1000:2000]:
                em.emit(event)
            time.sleep(3.5)  # frozen for longer than message.timeout.ms
            for event in events[2000:]:
                em.emit(event)
            assert em.stats.spooled > 0
        finally:
            broker.resume()
        assert em.flush(40) == 0
        stats = em.stats
    records = _consume(broker.bootstrap, len(events))
    assert {str(r["event_id"]) for _, r in records} == set(_ids(events))
    assert stats.failed == 0 and stats.replayed > 0


def test_events_left_at_close_are_replayed_by_the_next_emitter(tmp_path: Path) -> None:
    port = free_port()
    settings = load_settings(data_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{port}")
    events = _events(2000)
    first = Emitter(settings=settings, producer_config=FAST)
    for event in events:
        first.emit(event)
    first.close(timeout=1)
    assert first.stats.spooled == 2000 and first.stats.sent == 0
    first.emit(events[0])  # after close: counted as failed, never raised
    assert first.stats.failed == 1
    broker = _start_broker(port, tmp_path, "later")
    try:
        with Emitter(settings=settings) as second:
            assert second.flush(30) == 0
            stats = second.stats
        records = _consume(broker.bootstrap, len(events))
    finally:
        broker.stop()
    assert {str(r["event_id"]) for _, r in records} == set(_ids(events))
    _assert_order_per_key(records)
    assert stats.emitted == 0 and stats.replayed >= 2000 and stats.spool_bytes == 0


def test_unwritable_spool_counts_failed_and_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    settings = load_settings(data_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{free_port()}")
    with Emitter(settings=settings, spool_dir=blocker / "spool", producer_config=FAST, max_queue=5) as em:
        for event in _events(50):
            em.emit(event)
        em.emit("not an event")  # type: ignore[arg-type]
        em.flush(2)
    assert em.stats.failed == 51 and em.stats.spooled == 0 and em.stats.emitted == 51


def test_full_spool_counts_failed(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{free_port()}", spool_max_bytes=1 << 16)
    em = Emitter(settings=settings, producer_config=FAST)
    for event in _events(1000):
        em.emit(event)
    em.close(timeout=2)
    stats = em.stats
    assert stats.spooled + stats.failed == 1000
    assert 0 < stats.spooled < 1000
    assert stats.spool_bytes <= 1 << 16


def test_a_replayed_chunk_leaves_the_spool_only_once_the_broker_acked_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replay without per-record acks: a chunk in flight when the broker freezes stays on disk and is resent."""
    monkeypatch.setattr(emitter_module, "_REPLAY_WINDOW", 500)  # several chunks
    monkeypatch.setattr(emitter_module, "Spool", functools.partial(Spool, segment_bytes=4096))  # ~20 records each
    port = free_port()
    events = _events(3000)
    # linger: a chunk waits in the producer long enough for the broker to be frozen before it is sent
    em = Emitter(
        f"127.0.0.1:{port}", settings=load_settings(data_dir=tmp_path), producer_config={**FAST, "linger.ms": 300}
    )
    broker = None
    try:
        for event in events:
            em.emit(event)
        assert em.flush(3) == 3000  # no broker yet: all of it in the spool
        broker = _start_broker(port, tmp_path, "late")
        deadline = time.monotonic() + 30
        while em.stats.replayed == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        broker.pause()  # the first chunk was acked, the second is in the producer
        try:
            replayed = em.stats.replayed
            assert 0 < replayed < 3000
            for _ in range(2):  # while in flight, then after its deliveries failed (message.timeout.ms)
                assert em.stats.spool_events >= 3000 - replayed
                time.sleep(3)
            assert em.stats.replayed == replayed
        finally:
            broker.resume()
        assert em.flush(40) == 0
        stats = em.stats
        records = _consume(broker.bootstrap, len(events))
    finally:
        em.close(0)
        if broker is not None:
            broker.stop()
    assert {str(r["event_id"]) for _, r in records} == set(_ids(events))
    assert stats.failed == 0 and stats.replayed >= 3000 and stats.spool_events == 0
    assert not list((tmp_path / "spool").glob("*.seg"))

"""End-to-end faults: emitter -> broker -> processor + sink -> ledger, with the invariants checked after each.

After every fault: no usage event is lost (every event_id emitted is in the ledger), none is counted twice
(ledger ``count()`` FINAL == ``uniqExact(event_id)`` == emitted), and the processor's window totals equal the
ledger's sums per scope and period, to the nano-dollar (docs/architecture.md §7).

The embedded broker is memory-only: a killed and restarted broker is empty (topics, data, group offsets and
the processor's changelogs are gone), so "no event lost" across a broker kill cannot hold end to end and is not
tested here (tests/test_emitter.py covers the edge side of it). The broker fault is a freeze (SIGSTOP, then
SIGCONT) longer than the producer's delivery timeout: deliveries fail, the emitter spools and replays, the
processor and the sink reconnect.
"""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from spendstream.core.config import Settings, load_settings
from spendstream.core.events import UsageEvent
from spendstream.core.ledger_store import connect
from spendstream.core.topics import DLQ_REASON_HEADER, DLQ_SOURCE_HEADER, USAGE, USAGE_DLQ
from spendstream.edge.emitter import Emitter, attribution_key
from spendstream.processor.recovery import read_window_totals
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.sink.ledger_sink import LedgerSink
from test_processor import start_worker, stop_worker
from test_sink import CODEC, consume_all, raw_value, wait_until
from test_sink_faults import committed_total, sink_process

PARTITIONS = 6
TEAMS = ("t0", "t1", "t2", "t3")
POLICY_YAML = "name: default\ntimezone: UTC\norg: acme\n"
PROCESSOR = "spendstream-processor"
# Short delivery timeouts make a frozen broker fail deliveries (and start the spool) within seconds.
FAST = {"message.timeout.ms": 2_000, "request.timeout.ms": 1_000}
# (dimension, period, ClickHouse function giving the window start in UTC, the policy timezone)
WINDOWS = [
    (dim, period, fn)
    for dim in ("org", "team", "feature", "user")
    for period, fn in (("hour", "toStartOfHour"), ("day", "toStartOfDay"), ("month", "toStartOfMonth"))
]


def make_events(count: int, seed: int) -> list[UsageEvent]:
    rng = random.Random(seed)
    return [
        UsageEvent(
            org="acme",
            team=rng.choice(TEAMS),
            feature=f"f{rng.randrange(3)}",
            user=f"u{rng.randrange(10)}",
            provider="openai",
            model_requested="gpt-4o-mini",
            input_tokens=rng.randrange(1, 2_000),
            output_tokens=rng.randrange(500),
            cost_nanos=rng.randrange(1, 5_000_000),
        )
        for _ in range(count)
    ]


def sink_lag(bootstrap: str, group: str) -> int:
    """Usage records past the group's committed offsets, counted by reading them.

    The embedded broker reports the high watermark as the base offset of the last record batch, so watermarks
    undercount; reading to the end of each partition does not.
    """
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False, "enable.partition.eof": True}
    )
    try:
        committed = consumer.committed([TopicPartition(USAGE, p) for p in range(PARTITIONS)], timeout=10)
        consumer.assign(
            [TopicPartition(USAGE, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING) for tp in committed]
        )
        unread, at_end = 0, set()
        deadline = time.monotonic() + 10
        while len(at_end) < PARTITIONS and time.monotonic() < deadline:
            for message in consumer.consume(10_000, timeout=0.5):
                if message.error() is None:
                    unread += 1
                elif message.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
        return unread if len(at_end) == PARTITIONS else max(unread, 1)
    finally:
        consumer.close()


def ledger_windows(client: Any) -> dict[tuple[str, str, int], tuple[int, int, int]]:
    """The ledger summed the way the processor keeps windows, for the scopes and periods in WINDOWS."""
    out: dict[tuple[str, str, int], tuple[int, int, int]] = {}
    for dim, period, fn in WINDOWS:
        rows = client.query(
            f"SELECT `{dim}`, toUnixTimestamp(toDateTime({fn}(occurred_at, 'UTC'), 'UTC')), "
            "sum(ifNull(cost_nanos, 0)), count(), sum(input_tokens + output_tokens) "
            f"FROM spendstream.usage_ledger FINAL GROUP BY 1, 2"
        ).result_rows
        for value, start, nanos, requests, tokens in rows:
            out[(f"{dim}:{value}", period, int(start))] = (int(nanos), int(requests), int(tokens))
    return out


def processor_windows(bootstrap: str) -> dict[tuple[str, str, int], tuple[int, int, int]]:
    wanted = {(dim, period) for dim, period, _ in WINDOWS}
    return {
        key: tuple(value)
        for key, value in read_window_totals({"bootstrap.servers": bootstrap}, PROCESSOR).items()
        if (key[0].split(":", 1)[0], key[1]) in wanted
    }


def ledger_state(client: Any) -> tuple[int, int, set[uuid.UUID]]:
    count, unique = client.query("SELECT count(), uniqExact(event_id) FROM spendstream.usage_ledger FINAL").result_rows[
        0
    ]
    ids = {row[0] for row in client.query("SELECT event_id FROM spendstream.usage_ledger FINAL").result_rows}
    return int(count), int(unique), ids


def assert_processor_matches_ledger(bootstrap: str, client: Any, timeout: float = 60.0) -> None:
    """Stage-1 window totals equal the ledger's sums for every (scope, period, window), to the nano-dollar."""
    expected = ledger_windows(client)
    assert expected
    deadline = time.monotonic() + timeout
    got: dict = {}
    while time.monotonic() < deadline:
        got = processor_windows(bootstrap)
        if got == expected:
            return
        time.sleep(0.5)
    wrong = {k: (got.get(k), expected.get(k)) for k in expected.keys() | got.keys() if got.get(k) != expected.get(k)}
    raise AssertionError(f"{len(wrong)} windows differ (processor, ledger), e.g. {list(wrong.items())[:5]}")


def assert_exact(client: Any, emitted: set[uuid.UUID]) -> None:
    """No event lost, none counted twice."""
    count, unique, ids = ledger_state(client)
    assert (count, unique) == (len(emitted), len(emitted))
    assert ids == emitted


class Traffic(threading.Thread):
    """Emits events through an Emitter at a steady pace, so faults land in the middle of the stream."""

    def __init__(self, emitter: Emitter, events: list[UsageEvent], seconds: float) -> None:
        super().__init__(daemon=True)
        self.emitter, self.events, self.seconds = emitter, events, seconds

    def run(self) -> None:
        chunk = max(1, len(self.events) // max(1, int(self.seconds * 20)))
        for i in range(0, len(self.events), chunk):
            for ev in self.events[i : i + chunk]:
                self.emitter.emit(ev)
            time.sleep(0.05)


class Services:
    """The processor and the sink as real processes (the sink may run in this process instead)."""

    def __init__(self, settings: Settings, root: Path) -> None:
        self.settings = settings
        self.root = root
        self.policy = root / "policy.yaml"
        self.policy.write_text(POLICY_YAML)
        self.processor: subprocess.Popen[bytes] | None = None
        self.sink: subprocess.Popen[bytes] | None = None

    def start_processor(self) -> None:
        self.processor = start_worker(self.settings.kafka_bootstrap, self.root / "processor", self.policy)

    def kill_processor(self) -> None:
        assert self.processor is not None and self.processor.poll() is None, self.processor_log()
        self.processor.send_signal(signal.SIGKILL)
        self.processor.wait(10)

    def start_sink(self) -> None:
        self.sink = sink_process(self.settings, self.root / "sink.log")

    def kill_sink(self) -> None:
        assert self.sink is not None and self.sink.poll() is None
        self.sink.send_signal(signal.SIGKILL)
        self.sink.wait(10)

    def drain_sink(self, timeout: float = 90.0) -> None:
        """Wait until the sink committed everything on the topic, then stop it cleanly (it owns the ledger)."""
        wait_until(lambda: sink_lag(self.settings.kafka_bootstrap, self.settings.sink_group) == 0, timeout, "sink")
        if self.sink is not None:
            self.sink.send_signal(signal.SIGTERM)
            assert self.sink.wait(60) == 0, (self.root / "sink.log").read_text()[-3000:]

    def processor_log(self) -> str:
        path = self.root / "processor" / "worker.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.processor is not None:
            stop_worker(self.processor)
        if self.sink is not None and self.sink.poll() is None:
            self.sink.kill()
            self.sink.wait(10)


@pytest.fixture
def services(settings: Settings, tmp_path: Path) -> Iterator[Services]:
    running = Services(settings, tmp_path)
    yield running
    running.stop()


@contextmanager
def sink_in_this_process(sink: LedgerSink) -> Iterator[LedgerSink]:
    """A LedgerSink in a thread; its chDB client stays open for the checks after it stopped."""
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
    assert outcome == [0]


def check_subprocess_ledger(services: Services, emitted: set[uuid.UUID]) -> None:
    services.drain_sink()
    client = connect(services.settings)  # the sink process has exited: this process may open its directory now
    try:
        assert_exact(client, emitted)
        assert_processor_matches_ledger(services.settings.kafka_bootstrap, client)
    finally:
        client.close()


def run_traffic(settings: Settings, events: list[UsageEvent], seconds: float, fault: Callable[[], None]) -> None:
    """Emit ``events`` over ``seconds`` while ``fault`` runs; every event must be delivered in the end."""
    with Emitter(settings=settings, producer_config=FAST) as emitter:
        traffic = Traffic(emitter, events, seconds)
        traffic.start()
        fault()
        traffic.join()
        assert emitter.flush(60) == 0
        assert emitter.stats.failed == 0


@pytest.mark.slow
def test_frozen_broker_during_traffic(settings: Settings, broker: EmbeddedBroker, services: Services) -> None:
    events = make_events(6_000, seed=1)
    services.start_processor()
    services.start_sink()

    def freeze() -> None:
        time.sleep(4)
        broker.pause()
        try:
            time.sleep(5)  # longer than the delivery timeout: the emitter spools
        finally:
            broker.resume()

    with Emitter(settings=settings, producer_config=FAST) as emitter:
        traffic = Traffic(emitter, events, 12)
        traffic.start()
        freeze()
        traffic.join()
        assert emitter.flush(60) == 0
        stats = emitter.stats
    assert stats.failed == 0 and stats.spooled > 0 and stats.replayed >= stats.spooled
    check_subprocess_ledger(services, {e.event_id for e in events})


@pytest.mark.slow
def test_processor_sigkilled_three_times(settings: Settings, services: Services) -> None:
    events = make_events(8_000, seed=2)
    services.start_sink()
    services.start_processor()
    rng = random.Random(5)

    def kill_three_times() -> None:
        for _ in range(3):
            time.sleep(rng.uniform(4.5, 6.5))  # ~4 s to join the group, then some work, then the crash
            services.kill_processor()
            services.start_processor()

    run_traffic(settings, events, 16, kill_three_times)
    check_subprocess_ledger(services, {e.event_id for e in events})


@pytest.mark.slow
def test_sink_sigkilled_twice(settings: Settings, services: Services) -> None:
    events = make_events(8_000, seed=3)
    services.start_processor()
    services.start_sink()

    def kill_twice() -> None:
        for _ in range(2):
            before = committed_total(settings.kafka_bootstrap, settings.sink_group)
            wait_until(lambda b=before: committed_total(settings.kafka_bootstrap, settings.sink_group) > b, 60, "sink")
            time.sleep(0.5)
            services.kill_sink()
            services.start_sink()

    run_traffic(settings, events, 10, kill_twice)
    check_subprocess_ledger(services, {e.event_id for e in events})


@pytest.mark.slow
def test_clickhouse_unavailable_for_a_while(settings: Settings, services: Services) -> None:
    """The ledger table is detached mid-stream: the sink retries with backoff and commits nothing meanwhile."""
    events = make_events(6_000, seed=4)
    services.start_processor()
    client = connect(settings)
    sink = LedgerSink(settings, client=client)
    try:
        with sink_in_this_process(sink):

            def outage() -> None:
                wait_until(lambda: sink.stats.inserted > 0, 60, "first inserts")
                client.command("DETACH TABLE spendstream.usage_ledger")
                try:
                    # A batch written just before the detach may still be committing; by the second failed
                    # attempt at the next batch (0.2 s of backoff later) that commit has landed.
                    wait_until(lambda: sink.stats.insert_retries >= 2, 60, "failed inserts")
                    committed = committed_total(settings.kafka_bootstrap, settings.sink_group)
                    wait_until(lambda: sink.stats.insert_retries >= 4, 60, "more failed inserts")
                    assert committed_total(settings.kafka_bootstrap, settings.sink_group) == committed
                finally:
                    client.command("ATTACH TABLE spendstream.usage_ledger")

            run_traffic(settings, events, 10, outage)
            wait_until(lambda: sink_lag(settings.kafka_bootstrap, settings.sink_group) == 0, 90, "sink")
        assert_exact(client, {e.event_id for e in events})
        assert_processor_matches_ledger(settings.kafka_bootstrap, client)
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.parametrize("trouble", ["full", "unwritable"])
def test_spool_full_or_unwritable_is_loud_and_emit_keeps_serving(
    settings: Settings,
    broker: EmbeddedBroker,
    services: Services,
    tmp_path: Path,
    trouble: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the broker frozen and nowhere to spool, events are lost, but counted, logged, and never raised.

    Running as root, chmod does not stop writes, so "unwritable" puts a file where the spool directory's
    parent should be. Events produced just before the freeze may still reach the log after their delivery
    timed out and they were counted as failed, so the ledger holds at least ``emitted - failed`` events and
    at most ``emitted``, each once; the events sent after the broker is back all land.
    """
    caplog.set_level(logging.WARNING, logger="spendstream.edge")
    services.start_processor()
    services.start_sink()
    if trouble == "full":
        em_settings = load_settings(
            kafka_bootstrap=settings.kafka_bootstrap, data_dir=tmp_path / "edge", spool_max_bytes=1 << 16
        )
        spool_dir = None
    else:
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("")
        em_settings, spool_dir = settings, blocker / "spool"
    before, during, after = make_events(2_000, 6), make_events(4_000, 7), make_events(2_000, 8)
    with Emitter(settings=em_settings, spool_dir=spool_dir, producer_config=FAST) as emitter:
        for ev in before:
            emitter.emit(ev)
        assert emitter.flush(30) == 0
        broker.pause()
        try:
            for ev in during:
                emitter.emit(ev)  # never raises
            wait_until(lambda: emitter.stats.failed > 0, 30, "events counted as lost")
            time.sleep(1)
            for ev in during[:200]:
                emitter.emit(ev)  # while the trouble lasts: a resend of events already emitted
        finally:
            broker.resume()
        assert emitter.flush(60) == 0
        for ev in after:
            emitter.emit(ev)  # keeps serving once the broker is back
        assert emitter.flush(30) == 0
        stats = emitter.stats
    assert stats.failed > 0 and stats.emitted == 8_200
    assert (stats.spooled > 0) == (trouble == "full")
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and "spool" in r.getMessage()]
    assert loud, "spool trouble must be logged at WARNING or above"

    services.drain_sink()
    client = connect(settings)
    try:
        count, unique, ids = ledger_state(client)
        emitted = {e.event_id for e in before + during + after}
        assert count == unique == len(ids)
        assert ids <= emitted
        assert {e.event_id for e in before + after} <= ids
        assert count >= stats.emitted - 200 - stats.failed  # the 200 resent events count once when they land
        assert_processor_matches_ledger(settings.kafka_bootstrap, client)
    finally:
        client.close()


class ThrottledSink(LedgerSink):
    """A ledger that accepts one small batch per 50 ms: far slower than the producers."""

    def _write(self, batch: Any) -> Any:
        time.sleep(0.05)
        return super()._write(batch)


@pytest.mark.slow
def test_slow_consumer_falls_behind_then_catches_up(settings: Settings, services: Services) -> None:
    slow = settings.model_copy(update={"sink_batch_size": 100, "sink_batch_ms": 20})
    events = make_events(10_000, seed=9)
    services.start_processor()
    client = connect(slow)
    peak = [0]
    try:
        with sink_in_this_process(ThrottledSink(slow, client=client)) as sink:
            with Emitter(settings=settings) as emitter:
                for ev in events:  # as fast as the caller can go
                    emitter.emit(ev)
                assert emitter.flush(30) == 0

            def caught_up() -> bool:
                lag = sink_lag(settings.kafka_bootstrap, settings.sink_group)
                peak[0] = max(peak[0], lag)
                return lag == 0

            wait_until(caught_up, 120, "the slow sink to catch up")
            assert sink.stats.batches >= len(events) // 100
        assert peak[0] > 1_000, "the producers should have run ahead of the throttled sink"
        assert_exact(client, {e.event_id for e in events})
        assert_processor_matches_ledger(settings.kafka_bootstrap, client)
    finally:
        client.close()


@pytest.mark.slow
def test_poison_messages_go_to_the_dlq_and_the_pipeline_continues(settings: Settings, services: Services) -> None:
    events = make_events(6_000, seed=10)
    services.start_processor()
    undecodable = b"\x00\x01 definitely not avro"
    invalid = raw_value({**events[0].to_avro(), "event_id": str(uuid.uuid4()), "input_tokens": -5})
    client = connect(settings)
    try:
        with sink_in_this_process(LedgerSink(settings, client=client)) as sink:

            def poison() -> None:
                time.sleep(3)
                producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
                key = attribution_key(events[0])
                producer.produce(USAGE, undecodable, key=key)
                producer.produce(USAGE, invalid, key=key)
                assert producer.flush(10) == 0

            run_traffic(settings, events, 8, poison)
            wait_until(lambda: sink_lag(settings.kafka_bootstrap, settings.sink_group) == 0, 90, "sink")
            assert sum(sink.stats.dead_lettered.values()) == 2
        assert_exact(client, {e.event_id for e in events})
        assert_processor_matches_ledger(settings.kafka_bootstrap, client)
    finally:
        client.close()
    letters = consume_all(settings.kafka_bootstrap, USAGE_DLQ, expected=4)
    by_source: dict[str, dict[bytes, str]] = {}
    for message in letters:
        headers = dict(message.headers() or [])
        source = headers[DLQ_SOURCE_HEADER].decode()
        service = "processor" if source.endswith("/processor") else "sink"
        by_source.setdefault(service, {})[message.value()] = headers[DLQ_REASON_HEADER].decode()
    assert set(by_source) == {"processor", "sink"}
    for reasons in by_source.values():
        assert set(reasons) == {undecodable, invalid}
        assert all(reasons.values())
    assert "input_tokens" in by_source["sink"][invalid]
    assert CODEC.decode(invalid)["input_tokens"] == -5  # schema-valid: only the meaning is wrong

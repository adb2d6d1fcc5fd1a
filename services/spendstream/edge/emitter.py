"""The edge Emitter: publish usage events without ever slowing down or failing a request.

``emit()`` only appends to an in-memory deque. One background thread encodes (Avro
single-object encoding), produces with an idempotent confluent-kafka producer, and owns the
disk spool. States of that thread:

* online, spool empty: events go straight to the producer.
* offline (a delivery failed, the producer queue was full, or the broker never answered):
  the producer is purged, every undelivered event goes to the spool in order, and so does
  every new event; the broker is probed with metadata requests once a second.
* online, spool not empty (replay): new events keep going to the spool tail, while the spool
  is replayed from its head in order, a chunk of records at a time; a segment is deleted only
  after all its events were acked. A failed replay delivery switches back to offline and replay
  restarts from the oldest segment still on disk (resends are fine: the ledger dedups by event_id).

librdkafka reports only failed deliveries (``delivery.report.only.error``): a Python callback and a
``Message`` per delivered event would cost about as much as producing it. A failure report carries
the event back (to the spool, or counted as failed when resending cannot help); a record that left
the producer without one was acked. So the delivered count is what was produced minus what was
reported failed minus what the producer still holds, and a replayed chunk counts as acked once the
producer holds nothing and no failure was reported for it.

An event whose token counts or cost are not integers within the per-event bounds (``core.events``; an event
built with ``model_construct`` or ``model_copy`` skips validation) is refused before it is encoded: counted as
failed and logged with the field, never raised to the caller, so one bad event cannot overflow a priced total
downstream.

When the deque is full, ``emit()`` leaves the event in a bounded inbox that the background thread
encodes and appends to the spool, so the caller neither encodes nor waits for a disk write. When
that inbox is full too, ``emit()`` encodes the event (a few microseconds) and leaves its bytes in a
second bounded inbox, which the background thread appends to the spool in batches: a burst that
outruns the background thread costs the caller an encoding, never a disk write or a lock held
across one. Only when both inboxes are full (the disk is slower than the callers) does ``emit()``
append to the spool itself. Memory stays bounded (``max_queue`` plus the inboxes) and nothing is
lost. Delivery is at-least-once; order is kept per key except across such an overflow.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import struct
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from spendstream.core.codec import AvroCodec
from spendstream.core.config import Settings, load_settings
from spendstream.core.events import UsageEvent, usage_bounds_problem
from spendstream.core.topics import ORIGIN_HEADER, USAGE
from spendstream.edge.metrics import EMITTERS
from spendstream.edge.spool import Spool
from spendstream.edge.usage_encoding import UsageEncoder

log = logging.getLogger(__name__)

_KEY_LEN = struct.Struct("<H")
_BATCH = 4096  # events taken from the deque per loop turn
_INBOX_EVENTS = 65_536  # overflow events waiting for the background thread to encode and spool them
_INBOX_RECORDS = 131_072  # overflow records encoded by emit() waiting to be spooled (a few hundred bytes each)
_REPLAY_WINDOW = 50_000  # replayed events per chunk: the next chunk is produced once this one is acked
_PROBE_INTERVAL_S = 1.0
_PROBE_TIMEOUT_S = 1.0
_SYNC_INTERVAL_S = 0.05
# With nothing to do, the thread waits this long in poll() (delivery reports wake it sooner). Each wake-up costs
# more than encoding a few events on a small VM, so at gateway rates (a few thousand events/s) fewer, fuller
# turns spend less: 20 ms against 5 ms cut the gateway's CPU per request by 5-8 % (bench/bench_gateway.py); the
# producer's own linger.ms is 20 ms too.
_IDLE_WAIT_S = 0.02
_LOUD_INTERVAL_S = 60.0
# Errors that resending cannot fix: the event is counted as failed instead of spooled forever.
_PERMANENT = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG_SIZE,
    }
)

DEFAULT_PRODUCER_CONFIG: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 20,
    # Acks are counted from what the producer no longer holds (see the module docstring); failures are reported.
    "delivery.report.only.error": True,
    "batch.num.messages": 10_000,
    "queue.buffering.max.messages": 200_000,
    # An unreachable or frozen broker fails deliveries within seconds, which starts spooling.
    "message.timeout.ms": 5_000,
    "request.timeout.ms": 3_000,
    "socket.connection.setup.timeout.ms": 3_000,
    "reconnect.backoff.ms": 100,
    "reconnect.backoff.max.ms": 1_000,
    "log.connection.close": False,
}


def pack(key: bytes, value: bytes) -> bytes:
    """A spool record: key length, key, value."""
    return _KEY_LEN.pack(len(key)) + key + value


def unpack(record: bytes) -> tuple[bytes, bytes]:
    (key_len,) = _KEY_LEN.unpack_from(record)
    return record[2 : 2 + key_len], record[2 + key_len :]


def attribution_key(event: UsageEvent) -> bytes:
    return f"{event.org}/{event.team}".encode()


_RECORD_OVERHEAD = 1024  # a record's framing and headers beside its key and value, within message.max.bytes


class RefusedEvent(ValueError):
    """A usage event outside the bounds every consumer relies on."""


def check_bounds(event: UsageEvent) -> None:
    """``RefusedEvent`` naming the field if the event's counts or cost are out of bounds."""
    problem = usage_bounds_problem(event.__dict__)
    if problem is not None:
        raise RefusedEvent(f"usage event {getattr(event, 'event_id', '?')} refused: {problem}")


@dataclass(frozen=True)
class EmitterStats:
    """A snapshot of the Emitter's counters (event counts, except spool_bytes)."""

    emitted: int  # emit() calls
    sent: int  # acked by the broker (replayed ones included; a resend is counted again)
    spooled: int  # written to the disk spool
    replayed: int  # acked by the broker after coming from the spool (counted when their chunk is acked)
    failed: int  # dropped: out of bounds, unencodable, spool full or unwritable, or rejected by the broker for good
    queued: int  # in memory: deque plus producer queue
    spool_bytes: int
    spool_events: int  # in the disk spool, waiting for replay


class _Throttled:
    """Log one line per kind of trouble per minute, with the count of what happened meanwhile."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def error(self, kind: str, message: str, *args: object) -> None:
        self.log(logging.ERROR, kind, message, *args)

    def log(self, level: int, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -_LOUD_INTERVAL_S) >= _LOUD_INTERVAL_S:
            suppressed = self._suppressed.pop(kind, 0)
            self._last[kind] = now
            log.log(level, message + " (%d more like it in the last minute)", *args, suppressed)
        else:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1


class _KafkaLog:
    """librdkafka's log lines, throttled: a down broker must not write a line per reconnect attempt."""

    def __init__(self, throttle: _Throttled) -> None:
        self._throttle = throttle
        self._log = logging.getLogger("spendstream.edge.kafka")

    def log(self, level: int, message: str, *args: object) -> None:
        if level >= logging.WARNING:
            text = message % args if args else message
            self._throttle.log(level, "kafka:" + text.split("]", 1)[0], "%s", text)
        else:
            self._log.log(level, message, *args)


class _Segment:
    """Replay bookkeeping for one spool segment: it may be deleted once every record was produced and acked."""

    __slots__ = ("id", "produced", "total")

    def __init__(self, seg_id: int, total: int) -> None:
        self.id = seg_id
        self.total = total
        self.produced = 0


class Emitter:
    """Non-blocking usage publishing with a disk spool (see the module docstring)."""

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        settings: Settings | None = None,
        spool_dir: Path | None = None,
        topic: str = USAGE,
        max_queue: int = 100_000,
        producer_config: dict[str, Any] | None = None,
    ) -> None:
        if settings is None:
            settings = (
                load_settings() if bootstrap_servers is None else load_settings(kafka_bootstrap=bootstrap_servers)
            )
        self._loud = _Throttled()
        conf = settings.kafka_client_config()
        if bootstrap_servers is not None:
            conf["bootstrap.servers"] = bootstrap_servers
        self._producer_conf = {**conf, **DEFAULT_PRODUCER_CONFIG, **(producer_config or {})}
        self._producer_conf["on_delivery"] = self._on_delivery
        self._producer_conf["error_cb"] = self._on_error
        self._producer_conf.setdefault("logger", _KafkaLog(self._loud))
        # librdkafka refuses a larger record in produce(); refused here first, it cannot cost its batch the others
        self._max_record_bytes = int(self._producer_conf.get("message.max.bytes", 1_000_000)) - _RECORD_OVERHEAD
        self._topic = topic
        self._max_queue = max_queue
        # This Emitter's id, on every record it produces (ORIGIN_HEADER); spooled records get it when replayed.
        self.origin = uuid.uuid4().hex.encode()
        self._headers = [(ORIGIN_HEADER, self.origin)]
        self._encoder = UsageEncoder(AvroCodec("usage_event", settings.schema_registry_url))
        self._queue: deque[UsageEvent] = deque()
        # Overflow handed over by emit() callers, spooled by the background thread (deque ops are atomic):
        # events, and once that inbox is full, spool records encoded by the caller.
        self._inbox: deque[UsageEvent] = deque()
        self._inbox_records: deque[bytes] = deque()
        # Counters written by the background thread only.
        self._taken = 0  # events and records taken from the deque and the inboxes
        self._sent = 0  # acked by producers already replaced; the current one's are derived (_acked_now)
        self._sent_seen = 0  # _sent plus _acked_now, as of the last loop turn (what stats shows)
        self._produced = 0  # records handed to the current producer (live and replayed)
        self._reported = 0  # failure reports served from the current producer
        self._spooled = 0
        self._replayed = 0
        self._failed = 0
        # Counters of emit() calls that neither queued nor handed over their event (written under _bypass_lock).
        self._bypassed = 0
        self._bypass_spooled = 0
        self._bypass_failed = 0
        self._bypass_lock = threading.Lock()
        self._spool_dir = Path(spool_dir or settings.spool_path)
        self._spool: Spool | None = None
        try:
            self._spool = Spool(self._spool_dir, settings.spool_max_bytes)
        except OSError as exc:
            self._loud.error(
                "spool", "spool directory %s unusable (%s); undeliverable events are lost", self._spool_dir, exc
            )
        self._online = False
        self._probe_at = 0.0
        self._synced_at = 0.0
        self._failed_live: list[tuple[bytes, bytes]] = []
        self._replay_trouble = False
        self._trouble = ""  # the first delivery error since the last state change, for the log
        self._fatal = False
        self._replay: deque[tuple[_Segment, list[bytes]]] = deque()
        self._segments: dict[int, _Segment] = {}
        self._replay_inflight = 0  # replayed records of the chunk not yet acked as a whole
        self._replay_reports = 0  # failure reports of that chunk
        self._in_hand = 0  # events taken from the deque or the inboxes and not yet produced or spooled
        self._turns = 0  # loop turns done, published with _pending for flush()
        self._pending = 0
        self._closed = False
        self._stop = threading.Event()
        self._producer = Producer(self._producer_conf)
        self._thread = threading.Thread(target=self._run, name="spendstream-emitter", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)
        EMITTERS.track(self)  # read at scrape time: no metric work per event

    # -- the request path --------------------------------------------------------------------
    def emit(self, event: UsageEvent) -> None:
        """Hand an event over; never blocks on the network and never raises."""
        try:
            if len(self._queue) < self._max_queue and not self._closed:
                self._queue.append(event)
            else:
                self._bypass(event)
        except Exception:
            log.exception("emit() failed unexpectedly")

    def _bypass(self, event: UsageEvent) -> None:
        """Deque full (or closed): leave the event for the background thread to encode and spool.

        If that inbox is full, encode here and leave the record for the background thread to spool; only if
        that inbox is full too (the disk is slower than the callers) is the spool written from here.
        """
        if self._closed:
            self._loud.error("closed", "emit() after close(): event %s dropped", getattr(event, "event_id", "?"))
            spooled = False
        elif len(self._inbox) < _INBOX_EVENTS:
            self._inbox.append(event)  # counted by the background thread when it takes it: no lock here
            return
        else:
            try:
                check_bounds(event)
                record = pack(*self._encoder.record(event))
            except RefusedEvent as exc:
                self._loud.error("refused", "%s", exc)
                spooled = False
            except Exception as exc:
                self._loud.error("encode", "cannot encode usage event: %s: %s", type(exc).__name__, exc)
                spooled = False
            else:
                if len(self._inbox_records) < _INBOX_RECORDS:
                    self._inbox_records.append(record)
                    return
                spooled = self._spool_append([record]) == 1
        with self._bypass_lock:
            self._bypassed += 1
            self._bypass_spooled += spooled
            self._bypass_failed += not spooled

    # -- observing and stopping --------------------------------------------------------------
    @property
    def stats(self) -> EmitterStats:
        spool_bytes = self._spool.bytes if self._spool is not None else 0
        with self._bypass_lock:
            bypassed, b_spooled, b_failed = self._bypassed, self._bypass_spooled, self._bypass_failed
        queued = len(self._queue) + len(self._inbox) + len(self._inbox_records)
        return EmitterStats(
            emitted=self._taken + queued + bypassed,
            sent=self._sent_seen,
            spooled=self._spooled + b_spooled,
            replayed=self._replayed,
            failed=self._failed + b_failed,
            queued=queued + self._in_hand + self._live_in_flight(),
            spool_bytes=spool_bytes,
            spool_events=self._spool_records(),
        )

    def flush(self, timeout: float = 30.0) -> int:
        """Wait until deque, producer and spool are drained (or the timeout); return events not yet delivered.

        The background thread publishes its count after each turn; two fresh turns are awaited
        so that a count taken before this call is never trusted.
        """
        deadline = time.monotonic() + timeout
        start = self._turns
        while self._thread.is_alive() and time.monotonic() < deadline:
            if (
                self._turns >= start + 2
                and self._pending == 0
                and not self._queue
                and not self._inbox
                and not self._inbox_records
            ):
                return 0
            time.sleep(0.005)
        return self._undelivered()

    def _undelivered(self) -> int:
        return (
            len(self._queue)
            + len(self._inbox)
            + len(self._inbox_records)
            + self._in_hand
            + self._live_in_flight()
            + len(self._failed_live)
            + self._spool_records()
        )

    def close(self, timeout: float = 30.0) -> None:
        """Flush, then stop; what could not be delivered stays in the spool for the next Emitter."""
        if self._stop.is_set():
            return
        atexit.unregister(self._at_exit)
        self.flush(timeout)
        self._stop.set()
        self._thread.join()
        EMITTERS.retire(self)

    def _at_exit(self) -> None:
        """An Emitter never closed still leaves its undelivered events in the spool at interpreter exit."""
        self.close(timeout=5.0)

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    # -- in flight: derived, since librdkafka reports failures only ---------------------------
    def _held(self) -> int:
        """Records the current producer may still hold (not acked, failure not yet reported).

        ``len(producer)`` also counts reports and log lines not yet served, so it is capped by the records
        produced and not reported failed: an over-estimate only until the next poll serves them.
        """
        return min(len(self._producer), self._produced - self._reported)

    def _acked_now(self) -> int:
        """Records the current producer got acked: produced, minus failure reports, minus what it still holds.

        Background thread only (it alone produces and serves reports, so the counts cannot move while this
        reads them); never an over-count.
        """
        return self._produced - self._reported - self._held()

    def _live_in_flight(self) -> int:
        """Events produced directly and not yet acked (the producer holds the replayed chunk too)."""
        return max(0, self._held() - (self._replay_inflight - self._replay_reports))

    # -- producer callbacks (run inside poll() on the background thread) ---------------------
    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is None:  # only with delivery.report.only.error overridden: counted by _acked_now
            return
        self._reported += 1
        if err.code() in _PERMANENT:
            self._failed += 1
            self._loud.error("rejected", "usage event rejected by the broker for good: %s", err)
        else:
            self._failed_live.append((msg.key(), msg.value()))
            self._trouble = self._trouble or str(err)

    def _on_replayed(self, err: KafkaError | None, _msg: Any) -> None:
        if err is None:
            return
        self._reported += 1
        self._replay_reports += 1
        if err.code() in _PERMANENT:
            self._failed += 1
            self._loud.error("rejected", "spooled usage event rejected by the broker for good: %s", err)
        else:  # the record is still on disk: replayed again after the broker is back
            self._replay_trouble = True
            self._trouble = self._trouble or str(err)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = True
            log.error("Kafka producer fatal error, recreating the producer: %s", err)
        else:
            log.debug("Kafka producer error: %s", err)

    # -- the background thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._online = self._probe()
            self._probe_at = time.monotonic() + _PROBE_INTERVAL_S
            if not self._online:
                log.warning(
                    "Kafka broker %s unreachable; spooling usage events", self._producer_conf["bootstrap.servers"]
                )
            while not self._stop.is_set():
                try:
                    if not self._step():
                        self._poll(_IDLE_WAIT_S)
                except Exception as exc:  # keep serving: a bug here must not stop usage publishing
                    self._loud.error("loop", "emitter loop error: %s: %s", type(exc).__name__, exc)
                    time.sleep(0.1)
                self._sent_seen = max(self._sent_seen, self._sent + self._acked_now())  # a counter never goes down
                self._pending = self._undelivered()
                self._turns += 1
        finally:
            self._shutdown()

    def _poll(self, timeout: float) -> None:
        """Serve delivery reports; a fatal producer error (raised here) gets the producer replaced."""
        try:
            self._producer.poll(timeout)
        except KafkaException as exc:
            if not exc.args[0].fatal():
                raise
            self._fatal = True

    def _step(self) -> bool:
        """One turn of the loop; False when there was nothing to do."""
        self._poll(0)
        busy = False
        if self._fatal or self._failed_live or self._replay_trouble:
            self._go_offline(self._trouble)
        n = min(len(self._queue), _BATCH)
        if n:
            busy = True
            self._in_hand = n
            self._forward([self._queue.popleft() for _ in range(n)])
            self._in_hand = 0
        overflowing = bool(self._inbox or self._inbox_records)
        if overflowing:
            busy = True
            self._spool_inbox()
        if self._online:
            if not overflowing:  # replay waits while emit() overflows: draining the inboxes spares callers work
                busy = self._replay_some() or busy
        elif time.monotonic() >= self._probe_at:
            if self._probe():
                log.warning("Kafka broker is back; replaying %d spooled usage events", self._spool_records())
                self._online = True
            else:
                self._probe_at = time.monotonic() + _PROBE_INTERVAL_S
        now = time.monotonic()
        if now - self._synced_at >= _SYNC_INTERVAL_S:
            self._synced_at = now
            self._sync()
        return busy

    def _spool_inbox(self) -> None:
        """Append what emit() handed over while the deque was full (taken from the left: in order): the events
        (encoded here), then the records emit() encoded once that inbox was full too."""
        inbox = self._inbox
        events = [inbox.popleft() for _ in range(len(inbox))]
        self._taken += len(events)
        self._in_hand = len(events)
        self._to_spool([pack(key, value) for key, value in self._encode(events)])
        inbox_records = self._inbox_records
        records = [inbox_records.popleft() for _ in range(len(inbox_records))]
        self._taken += len(records)
        self._in_hand = len(records)
        self._to_spool(records)
        self._in_hand = 0

    def _forward(self, events: list[UsageEvent]) -> None:
        self._taken += len(events)
        records = self._encode(events)
        if self._online and self._spool_records() == 0:
            produce = self._producer.produce
            topic, headers = self._topic, self._headers
            produced = 0
            try:
                for key, value in records:
                    # positional: keyword parsing would cost a third of the call (partition -1: by key)
                    produce(topic, value, key, -1, None, None, 0, headers)
                    produced += 1
            except (BufferError, KafkaException):  # a full queue, or a refusal: the rest waits in the spool
                pass
            finally:
                self._produced += produced
            if produced == len(records):
                return
            records = records[produced:]
        self._to_spool([pack(key, value) for key, value in records])

    def _encode(self, events: list[UsageEvent]) -> list[tuple[bytes, bytes]]:
        """Keys and values of the events within bounds; the others are counted as failed and logged."""
        records: list[tuple[bytes, bytes]] = []
        append = records.append
        record = self._encoder.record
        for event in events:
            try:
                if usage_bounds_problem(event.__dict__) is None:
                    key, value = encoded = record(event)
                    if len(key) + len(value) > self._max_record_bytes:
                        raise RefusedEvent(
                            f"usage event {event.event_id} is {len(value)} bytes, more than the broker takes "
                            f"(message.max.bytes {self._producer_conf.get('message.max.bytes', 1_000_000)})"
                        )
                    append(encoded)
                else:
                    check_bounds(event)  # raises, naming the field
            except RefusedEvent as exc:
                self._failed += 1
                self._loud.error("refused", "%s", exc)
            except Exception as exc:
                self._failed += 1
                self._loud.error("encode", "cannot encode usage event: %s: %s", type(exc).__name__, exc)
        return records

    def _replay_some(self) -> bool:
        """Produce the next chunk of spooled records once the previous one is acked, deleting its segments.

        Without success reports, a chunk is acked when the producer holds nothing any more and none of its
        records was reported failed (a failure switches to offline before this runs again).
        """
        if self._replay_inflight and (self._held() or self._replay_trouble):
            return False
        busy = self._settle_replayed_chunk()
        produce = self._producer.produce
        topic, headers, callback = self._topic, self._headers, self._on_replayed
        while self._replay_inflight < _REPLAY_WINDOW:
            if not self._replay:
                nxt = self._spool.read_next() if self._spool is not None else None
                if nxt is None:
                    break
                seg = _Segment(nxt[0], len(nxt[1]))
                self._segments[seg.id] = seg
                self._replay.append((seg, nxt[1]))
            seg, records = self._replay[0]
            while seg.produced < seg.total and self._replay_inflight < _REPLAY_WINDOW:
                key, value = unpack(records[seg.produced])
                try:
                    # the callback slot: a callback of None would make confluent-kafka ignore on_delivery's
                    produce(topic, value, key, -1, callback, None, 0, headers)
                except BufferError:
                    return True
                seg.produced += 1
                self._produced += 1
                self._replay_inflight += 1
                busy = True
            if seg.produced == seg.total:
                self._replay.popleft()
        return busy

    def _settle_replayed_chunk(self) -> bool:
        """The replayed chunk is acked (failures excepted, counted when reported): count it and delete every
        segment whose records were all produced."""
        self._replayed += self._replay_inflight - self._replay_reports
        self._replay_inflight = self._replay_reports = 0
        done = [seg for seg in self._segments.values() if seg.produced == seg.total]
        for seg in done:
            del self._segments[seg.id]
            self._spool.release(seg.id)  # type: ignore[union-attr]
        return bool(done)

    def _go_offline(self, why: str) -> None:
        """Stop producing: take back everything the producer holds, spool it in order, restart replay later.

        The producer is replaced: after timeouts its idempotence state (producer id, epoch,
        sequence numbers) may be refused by the broker (a restarted one forgot it, and some
        brokers fence a bumped epoch), while a new producer id is always accepted.
        """
        if self._online:
            log.warning("Kafka deliveries failing (%s); spooling usage events", why or "producer fatal error")
        self._online = False
        self._probe_at = time.monotonic() + _PROBE_INTERVAL_S
        self._reclaim()
        self._producer = Producer(self._producer_conf)
        self._fatal = False
        self._replay.clear()
        self._segments.clear()
        self._replay_inflight = self._replay_reports = 0
        self._replay_trouble = False
        self._trouble = ""
        if self._spool is not None:
            self._spool.rewind()

    def _reclaim(self) -> None:
        """Purge the producer and spool the live events it gave back (replayed ones are still on disk).

        Purged records come back as failure reports; what was acked before is counted as sent.
        """
        with contextlib.suppress(Exception):
            self._producer.purge(in_queue=True, in_flight=True, blocking=True)
        deadline = time.monotonic() + 2.0
        while self._held() and time.monotonic() < deadline:
            self._poll(0.01)
        lost = self._live_in_flight()
        if lost:
            self._loud.error("purge", "%d usage events not returned by the producer; they may be lost", lost)
            self._failed += lost
        # the replayed records of an unfinished chunk that were not reported failed were acked
        self._replayed += max(0, self._replay_inflight - self._replay_reports - self._held())
        acked = self._acked_now()
        self._produced = self._reported = 0
        self._sent += acked
        self._sent_seen = max(self._sent_seen, self._sent)
        self._replay_inflight = self._replay_reports = 0
        failed, self._failed_live = self._failed_live, []
        self._to_spool([pack(key, value) for key, value in failed])

    def _probe(self) -> bool:
        """Is the broker answering, with the topic's partitions led? (a metadata request)"""
        try:
            md = self._producer.list_topics(self._topic, timeout=_PROBE_TIMEOUT_S)
        except Exception:
            return False
        topic = md.topics.get(self._topic)
        return bool(
            topic is not None
            and topic.error is None
            and topic.partitions
            and all(p.leader >= 0 for p in topic.partitions.values())
        )

    # -- spool access ------------------------------------------------------------------------
    def _spool_records(self) -> int:
        return self._spool.records if self._spool is not None else 0

    def _to_spool(self, records: list[bytes]) -> None:
        if records:
            written = self._spool_append(records)
            self._spooled += written
            self._failed += len(records) - written

    def _spool_append(self, records: list[bytes]) -> int:
        """Append; trouble is counted by the caller and logged once a minute."""
        if self._spool is None:
            self._loud.error("spool", "no usable spool at %s: %d usage events lost", self._spool_dir, len(records))
            return 0
        try:
            written = self._spool.append(records)
        except OSError as exc:
            self._loud.error(
                "spool", "spool at %s unwritable (%s): %d usage events lost", self._spool_dir, exc, len(records)
            )
            return 0
        if written < len(records):
            self._loud.error(
                "spool-full",
                "spool at %s is full (%d bytes): %d usage events lost",
                self._spool_dir,
                self._spool.max_bytes,
                len(records) - written,
            )
        return written

    def _sync(self) -> None:
        if self._spool is not None:
            try:
                self._spool.sync()
            except OSError as exc:
                self._loud.error("spool-sync", "fsync of the spool at %s failed: %s", self._spool_dir, exc)

    def _shutdown(self) -> None:
        """Everything not acked ends on disk: producer leftovers first, then the deque, in order."""
        try:
            self._reclaim()
            self._closed = True
            rest = []
            while self._queue:
                rest.append(self._queue.popleft())
            if rest:
                self._online = False
                self._forward(rest)
        finally:
            self._closed = True
            self._spool_inbox()  # what emit() handed over before it saw the Emitter closed
            if self._spool is not None:
                try:
                    self._spool.sync()
                    self._spool.close()
                except OSError as exc:
                    log.error("closing the spool at %s failed: %s", self._spool_dir, exc)

"""Prometheus metrics of every spendstream service, in one registry per process: the counters services increment,
the collector registry that services read their own counters into, and the exposition.

Hot paths never touch a metric per event. Counters a service already keeps are read at scrape time by a
collector the service registers itself (:func:`register_collector`: the Emitter's in ``edge.metrics``, the
ledger sink's in ``sink.metrics``, the gateway's in ``gateway.metrics``); everything else is incremented once
per batch (``counter.inc(n)``) or once per HTTP request. Every labelled series
appears only once something was counted, so a process exposes the metrics of the services it runs.

Exposition: the HTTP services serve ``GET /metrics`` on their own port (the API through
:func:`instrument_app`, the gateway's own server through :func:`metrics_exposition` and
:class:`HttpLatency`); the others (sink, processor) start an HTTP server on
``SPENDSTREAM_METRICS_PORT`` (:func:`serve_metrics`). Consumer lag is sampled in a background thread
(:class:`ConsumerLagSampler`), never per message.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from spendstream.core.config import Settings

log = logging.getLogger(__name__)

# -- metrics incremented by the services ------------------------------------------------------------

API_INGEST_REQUESTS = Counter(
    "spendstream_api_ingest_requests",
    "POST /v1/usage and /v1/traces requests by outcome: accepted, partial (spans rejected), invalid (400), "
    "unauthorized (401), forbidden (403), too_large (413), unsupported (415), unacknowledged (503).",
    ["outcome"],
)
API_INGEST_EVENTS = Counter(
    "spendstream_api_ingest_events",
    "Usage events in POST /v1/usage and /v1/traces requests by outcome: accepted (on the broker), unacknowledged, "
    "or dead_lettered (GenAI spans that cannot be a usage event, on the DLQ with the reason).",
    ["outcome"],
)
AUDIT_SINK_RECORDS = Counter(
    "spendstream_audit_sink_records",
    "Records the audit sink wrote to the ledger, by kind: decision, alert, policy_version, budget_event, "
    "or rejected (undecodable).",
    ["kind"],
)
PROCESSOR_CONSUMED = Counter(
    "spendstream_processor_consumed",
    "Records consumed by the processor, by stage: usage (spendstream.usage) or scopes (the internal partials topic).",
    ["stage"],
)
PROCESSOR_DEAD_LETTERED = Counter(
    "spendstream_processor_dead_lettered",
    "Usage events the processor sent to spendstream.usage.dlq, by reason kind.",
    ["reason"],
)
PROCESSOR_DECISIONS = Counter(
    "spendstream_processor_decisions",
    "Decisions published to spendstream.enforcement, by action.",
    ["action"],
)
PROCESSOR_ALERTS = Counter(
    "spendstream_processor_alerts",
    "Alerts published to spendstream.alerts, by kind.",
    ["kind"],
)
PROCESSOR_BATCH_SECONDS = Histogram(
    "spendstream_processor_batch_duration_seconds",
    "Time to process one batch including the flush of its output, by stage.",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONSUMER_LAG = Gauge(
    "spendstream_consumer_lag",
    "Records on the topic not yet committed by the consumer group: high watermark minus committed offset, per "
    "partition (the same group-wide value on every member; aggregate with max by (partition)).",
    ["group", "topic", "partition"],
)
CONSUMER_LAG_SAMPLED = Gauge(
    "spendstream_consumer_lag_sampled_timestamp_seconds",
    "Unix time of the last successful consumer lag sample (a stale value means the broker did not answer).",
    ["group", "topic"],
)


# -- metrics read at scrape time from counters the services keep -------------------------------------


@dataclass(frozen=True)
class Family:
    """One metric family a :class:`StatsCollector` produces (``name`` without the ``_total`` suffix)."""

    name: str
    help: str
    kind: Literal["counter", "gauge"]
    labels: tuple[str, ...] = ()


Reading = Mapping[str, float | Mapping[tuple[str, ...], float]]  # family name -> value, or label values -> value


S = TypeVar("S")


class StatsCollector(Collector, Generic[S]):
    """Families read at scrape time from live objects of one kind, summed; ``retire`` keeps an object's final
    counter totals.

    Tracked objects are weakly referenced. Retiring folds counters (not gauges) into a running total, so a
    closed Emitter's sends stay counted and ``rate()`` sees no reset.
    """

    def __init__(self, families: Iterable[Family], read: Callable[[S], Reading]) -> None:
        self.families = {family.name: family for family in families}
        self._read = read
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()
        self._retired: Tally[tuple[str, tuple[str, ...]]] = Tally()
        self._lock = threading.Lock()

    def track(self, source: S) -> None:
        with self._lock:
            self._live.add(source)

    def retire(self, source: S) -> None:
        with self._lock:
            if source not in self._live:
                return
            self._live.discard(source)
            for key, value in self._samples(source):
                if self.families[key[0]].kind == "counter":
                    self._retired[key] += value

    def _samples(self, source: S) -> Iterator[tuple[tuple[str, tuple[str, ...]], float]]:
        for name, value in self._read(source).items():
            if isinstance(value, Mapping):
                for labels, v in value.items():
                    yield (name, labels), v
            else:
                yield (name, ()), value

    def describe(self) -> list[Metric]:
        return [self._family(family) for family in self.families.values()]

    def collect(self) -> list[Metric]:
        with self._lock:
            totals = Tally(self._retired)
            live = list(self._live)
        seen = bool(totals)
        for source in live:
            seen = True
            for key, value in self._samples(source):
                totals[key] += value
        if not seen:
            return []
        out = {name: self._family(family) for name, family in self.families.items()}
        for (name, labels), value in sorted(totals.items()):
            out[name].add_metric(list(labels), value)
        return list(out.values())

    @staticmethod
    def _family(family: Family) -> Metric:
        if family.kind == "counter":
            return CounterMetricFamily(family.name, family.help, labels=family.labels)
        return GaugeMetricFamily(family.name, family.help, labels=family.labels)


def register_collector(families: Iterable[Family], read: Callable[[S], Reading]) -> StatsCollector[S]:
    """A service's collector of counters read at scrape time from its own objects, in this process's registry.

    The service names its families and the ``read`` of its own objects (``edge.metrics``, ``sink.metrics``,
    ``gateway.metrics``); core only sums and exposes what they read.
    """
    collector = StatsCollector(families, read)
    REGISTRY.register(collector)
    return collector


# -- exposition ----------------------------------------------------------------------------------------


def serve_metrics(settings: Settings) -> int | None:
    """Start the ``/metrics`` HTTP server when ``metrics_port`` is set; returns the port it listens on."""
    if settings.metrics_port is None:
        return None
    server, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host)
    port = int(server.server_port)
    print(f"metrics on http://{settings.metrics_host}:{port}/metrics", flush=True)
    return port


LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _HttpLatencyCollector(Collector):
    """``spendstream_http_request_duration_seconds``, read at scrape time from each service's ``HttpLatency``
    (an observation is a bisect and two additions on the event loop, where a prometheus_client histogram took a
    lock per bucket and per sum: a tenth of a microsecond against about one, per request)."""

    NAME = "spendstream_http_request_duration_seconds"
    HELP = (
        "Time from request received to response finished (streamed responses included), by service, route and "
        "status class (1xx..5xx)."
    )

    def __init__(self) -> None:
        self.tables: list[HttpLatency] = []

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.NAME, self.HELP, labels=("service", "endpoint", "status_class"))]

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self.NAME, self.HELP, labels=("service", "endpoint", "status_class"))
        merged: dict[tuple[str, str, str], tuple[list[int], float]] = {}
        for table in list(self.tables):
            for (endpoint, status_class), (counts, total) in list(table.series.items()):
                key = (table.service, endpoint, f"{status_class}xx")
                seen, seconds = merged.get(key, ([0] * len(counts), 0.0))
                merged[key] = ([a + b for a, b in zip(seen, counts, strict=True)], seconds + total[0])
        for labels, (counts, seconds) in merged.items():
            cumulative, running = [], 0
            for bound, count in zip((*map(floatToGoString, LATENCY_BUCKETS_S), "+Inf"), counts, strict=True):
                running += count
                cumulative.append((bound, running))
            family.add_metric(list(labels), cumulative, seconds)
        return [family]


HTTP_LATENCY = _HttpLatencyCollector()
REGISTRY.register(HTTP_LATENCY)


class HttpLatency:
    """One service's ``spendstream_http_request_duration_seconds``: per (route, status class), a count per bucket
    and the sum, kept by the event loop that observes and read at scrape time."""

    def __init__(self, service: str) -> None:
        self.service = service
        # (endpoint, status // 100) -> (counts per bucket, the last for +Inf; [sum of seconds])
        self.series: dict[tuple[str, int], tuple[list[int], list[float]]] = {}
        HTTP_LATENCY.tables.append(self)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, status // 100)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = ([0] * (len(LATENCY_BUCKETS_S) + 1), [0.0])
        series[0][bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        series[1][0] += seconds


def metrics_exposition(accept: str) -> tuple[bytes, str]:
    """This process's metrics in the format the scraper's ``Accept`` header asks for: (body, content type)."""
    encoder, content_type = choose_encoder(accept)
    return encoder(REGISTRY), content_type


def instrument_app(app: Any, service: str) -> None:
    """Add ``GET /metrics`` and the request latency middleware to an aiohttp application (before it starts)."""
    from aiohttp import web

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = metrics_exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    latency = HttpLatency(service)

    @web.middleware
    async def observe_latency(request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        finally:
            resource = request.match_info.route.resource
            endpoint = resource.canonical if resource is not None else "unmatched"
            if endpoint != "/metrics":  # recorded once the response is written: not part of the latency it measures
                asyncio.get_running_loop().call_soon(latency.observe, endpoint, status, time.perf_counter() - started)

    app.router.add_get("/metrics", metrics)
    app.middlewares.insert(0, observe_latency)  # outermost: requests refused by other middlewares count too


# -- consumer lag --------------------------------------------------------------------------------------


class ConsumerLagSampler:
    """Samples a consumer group's lag on one topic every ``interval_s`` into ``spendstream_consumer_lag``.

    Uses its own consumer that never joins the group (it only reads committed offsets and watermarks), so
    sampling costs the service nothing per message and cannot trigger a rebalance. Lag is clamped at zero:
    the embedded broker reports the high watermark as the last record batch's base offset + 1, below the
    committed offset once a multi-record batch was consumed.
    """

    def __init__(self, settings: Settings, group: str, topic: str, interval_s: float = 5.0) -> None:
        self.group = group
        self.topic = topic
        self.interval_s = interval_s
        self._conf = {
            **settings.kafka_client_config(),
            "group.id": group,
            "enable.auto.commit": False,
            "client.id": "spendstream-lag",
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self, consumer: Any, timeout: float = 5.0) -> dict[int, int]:
        """Lag per partition (high watermark minus committed offset, or minus the low one before any commit)."""
        from confluent_kafka import TopicPartition

        metadata = consumer.list_topics(self.topic, timeout=timeout).topics[self.topic]
        if metadata.error is not None:
            raise RuntimeError(f"no metadata for {self.topic}: {metadata.error}")
        wanted = [TopicPartition(self.topic, p) for p in sorted(metadata.partitions)]
        committed = {tp.partition: tp.offset for tp in consumer.committed(wanted, timeout=timeout)}
        lag = {}
        for tp in wanted:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            done = committed.get(tp.partition, -1)
            lag[tp.partition] = max(0, high - (done if done >= 0 else low))
        for partition, n in lag.items():
            CONSUMER_LAG.labels(self.group, self.topic, str(partition)).set(n)
        CONSUMER_LAG_SAMPLED.labels(self.group, self.topic).set_to_current_time()
        return lag

    def start(self) -> ConsumerLagSampler:
        self._thread = threading.Thread(target=self._run, name="spendstream-lag", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        from confluent_kafka import Consumer

        consumer = Consumer(self._conf)
        try:
            while True:
                try:
                    self.sample(consumer)
                except Exception as exc:  # the broker may be down: the timestamp gauge shows the gap
                    log.debug("consumer lag sample of %s failed: %s", self.group, exc)
                if self._stop.wait(self.interval_s):
                    return
        finally:
            consumer.close()

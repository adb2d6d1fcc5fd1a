"""OpenTelemetry out: the gateway's calls as GenAI client spans and metrics, to an OTLP/HTTP endpoint.

Imported only when ``SPENDSTREAM_OTEL_EXPORTER_OTLP_ENDPOINT`` (or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``)
is set: a gateway without one loads neither this module nor the OpenTelemetry SDK. Each usage event the gateway
emits becomes, after the response was sent, one span and the metric points of the GenAI semantic conventions:

* span ``{operation} {model}`` (kind CLIENT) with ``gen_ai.operation.name``, ``gen_ai.provider.name``,
  ``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.usage.input_tokens`` / ``output_tokens`` /
  ``cache_read.input_tokens`` / ``cache_creation.input_tokens``, the cost as the conventions' cost proposal
  names it (``gen_ai.usage.cost.amount``, ``.currency``, ``.source`` = ``local``: priced by spendstream), and
  ``spendstream.event_id`` plus the attribution, to find the ledger row;
* ``gen_ai.client.token.usage`` (histogram, ``{token}``, ``gen_ai.token.type`` input or output),
  ``gen_ai.client.operation.duration`` (histogram, seconds) and ``gen_ai.client.operation.cost`` (histogram, USD).

The exported cost is a double, as the conventions define it; the ledger's integer nano-USD stays the record.
Providers are private to the gateway (no global tracer or meter provider is set); the exporters read the
standard ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_METRIC_EXPORT_INTERVAL``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from spendstream.core.events import ATTRIBUTION_FIELDS, NANOS_PER_USD, UsageEvent

# Gateway endpoint -> gen_ai.operation.name.
OPERATIONS = {
    "chat.completions": "chat",
    "messages": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
}
# The bucket boundaries the conventions advise for the two histograms.
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
COST_BUCKETS = [0.00001, 0.0001, 0.001, 0.01, 0.1, 1, 10, 100]


class GenAiTelemetry:
    """Spans and metrics of the gateway's calls, batched and exported in background threads."""

    def __init__(self, endpoint: str) -> None:
        resource = Resource.create({"service.name": "spendstream-gateway"})
        self._tracer_provider = TracerProvider(resource=resource)
        self._tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")))
        reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics"))
        self._meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        self._tracer = self._tracer_provider.get_tracer("spendstream.gateway")
        meter = self._meter_provider.get_meter("spendstream.gateway")
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )  # fmt: skip
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip
        self._cost = meter.create_histogram(
            "gen_ai.client.operation.cost", unit="USD", description="Cost of the GenAI operation.",
            explicit_bucket_boundaries_advisory=COST_BUCKETS,
        )  # fmt: skip

    def record(self, event: UsageEvent, endpoint: str) -> None:
        """One call's span and metric points (its usage event, as the gateway emitted it)."""
        operation = OPERATIONS.get(endpoint, endpoint)
        common: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": event.provider,
            "gen_ai.request.model": event.model_requested,
        }
        if event.model_served:
            common["gen_ai.response.model"] = event.model_served
        failed = event.status != "ok"
        metric_attributes = {**common, "error.type": str(event.status)} if failed else common
        ended = int(event.occurred_at.timestamp() * 1_000_000) * 1000
        started = ended - event.latency_ms * 1_000_000
        span = self._tracer.start_span(
            f"{operation} {event.model_requested}", kind=SpanKind.CLIENT, start_time=started,
            attributes={**common, **span_usage_attributes(event)},
        )  # fmt: skip
        if failed:
            span.set_attribute("error.type", str(event.status))
            span.set_status(Status(StatusCode.ERROR, f"spendstream status {event.status}"))
        span.end(end_time=ended)
        self._duration.record(timedelta(milliseconds=event.latency_ms).total_seconds(), metric_attributes)
        if not failed:
            self._tokens.record(event.input_tokens, {**common, "gen_ai.token.type": "input"})
            self._tokens.record(event.output_tokens, {**common, "gen_ai.token.type": "output"})
        if event.cost_nanos is not None:
            self._cost.record(event.cost_nanos / NANOS_PER_USD, metric_attributes)

    def shutdown(self) -> None:
        """Export what is pending and stop the exporters' threads."""
        self._tracer_provider.shutdown()
        self._meter_provider.shutdown()


def span_usage_attributes(event: UsageEvent) -> dict[str, Any]:
    """Token counts, cost and spendstream's own identifiers of a call, as span attributes."""
    attributes: dict[str, Any] = {
        "gen_ai.usage.input_tokens": event.input_tokens,
        "gen_ai.usage.output_tokens": event.output_tokens,
        "spendstream.event_id": str(event.event_id),
    }
    if event.cached_input_tokens:
        attributes["gen_ai.usage.cache_read.input_tokens"] = event.cached_input_tokens
    if event.cache_write_tokens:
        attributes["gen_ai.usage.cache_creation.input_tokens"] = event.cache_write_tokens
    if event.cost_nanos is not None:
        attributes["gen_ai.usage.cost.amount"] = event.cost_nanos / NANOS_PER_USD
        attributes["gen_ai.usage.cost.currency"] = "USD"
        attributes["gen_ai.usage.cost.source"] = "local"
    if event.cache_hit:
        attributes["spendstream.cache_hit"] = True
    for name in ATTRIBUTION_FIELDS:
        if value := getattr(event, name):
            attributes[f"spendstream.{name}"] = value
    return attributes

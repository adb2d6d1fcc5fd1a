"""OpenTelemetry out: a gateway with ``SPENDSTREAM_OTEL_EXPORTER_OTLP_ENDPOINT`` sends each call as a GenAI client
span and ``gen_ai.client.*`` metric points to an OTLP/HTTP receiver (a real socket, protobuf decoded); without the
setting it loads no OpenTelemetry code at all."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from spendstream.core.config import Settings, load_settings
from spendstream.edge.emitter import Emitter
from spendstream.edge.enforcer import Enforcer
from spendstream.gateway.app import Gateway, GatewayThread
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from stub_upstream import StubUpstream
from test_gateway import CHAT, gateway_config, http, read_usage

ROOT = Path(__file__).resolve().parents[1]


class OtlpReceiver:
    """A minimal OTLP/HTTP receiver on its own thread: keeps every decoded trace and metrics request."""

    def __init__(self) -> None:
        self.port = free_port()
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _receive(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        self.headers.append(dict(request.headers))
        body = await request.read()
        if request.path == "/v1/traces":
            self.traces.append(ExportTraceServiceRequest.FromString(body))
        else:
            self.metrics.append(ExportMetricsServiceRequest.FromString(body))
        return web.Response(body=b"", content_type="application/x-protobuf")

    def __enter__(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._receive)
        app.router.add_post("/v1/metrics", self._receive)
        self._runner = web.AppRunner(app)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in items}


@pytest.fixture
def upstream() -> Iterator[StubUpstream]:
    with StubUpstream() as stub:
        yield stub


def test_gateway_exports_genai_spans_and_metrics(
    settings: Settings, upstream: StubUpstream, broker: EmbeddedBroker, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20collector-token")
    with OtlpReceiver() as receiver:
        settings = load_settings(
            kafka_bootstrap=broker.bootstrap,
            data_dir=tmp_path / "data",
            otel_exporter_otlp_endpoint=f"http://127.0.0.1:{receiver.port}/",
        )
        enforcer = Enforcer(settings=settings).start()
        assert enforcer.wait_ready(10)
        emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
        gateway = Gateway(gateway_config(upstream, upstream), settings, enforcer=enforcer, emitter=emitter)
        with GatewayThread(gateway) as running:
            assert http(running.url + "/v1/chat/completions", CHAT)[0] == 200
            embeddings = {"model": "text-embedding-3-small", "input": ["x y z"]}
            assert http(running.url + "/v1/embeddings", embeddings)[0] == 200
            upstream.fail_status = 500
            assert http(running.url + "/v1/chat/completions", CHAT)[0] >= 500
        # the gateway's shutdown exported what was pending
        emitter.close(10)
        enforcer.stop()

    events = {e["event_id"].hex: e for e in read_usage(broker.bootstrap, 3)}
    spans = [s for t in receiver.traces for r in t.resource_spans for ss in r.scope_spans for s in ss.spans]
    assert len(spans) == 3
    resource = _attributes(receiver.traces[0].resource_spans[0].resource.attributes)
    assert resource["service.name"] == "spendstream-gateway"
    assert all(h.get("Authorization") == "Bearer collector-token" for h in receiver.headers)
    by_name = {span.name: span for span in spans if span.status.code != 2}
    chat = _attributes(by_name["chat gpt-4o"].attributes)
    event = events[chat["spendstream.event_id"].replace("-", "")]
    assert chat["gen_ai.operation.name"] == "chat" and chat["gen_ai.provider.name"] == "openai"
    assert (chat["gen_ai.request.model"], chat["gen_ai.response.model"]) == ("gpt-4o", "gpt-4o")
    assert (chat["gen_ai.usage.input_tokens"], chat["gen_ai.usage.output_tokens"]) == (4, 5)
    assert chat["gen_ai.usage.cost.amount"] == event["cost_nanos"] / 1e9 > 0
    assert (chat["gen_ai.usage.cost.currency"], chat["gen_ai.usage.cost.source"]) == ("USD", "local")
    assert chat["spendstream.team"] == event["team"] == "marketing"
    assert by_name["chat gpt-4o"].kind == 3  # SPAN_KIND_CLIENT
    duration_ns = by_name["chat gpt-4o"].end_time_unix_nano - by_name["chat gpt-4o"].start_time_unix_nano
    assert duration_ns == event["latency_ms"] * 1_000_000
    assert _attributes(by_name["embeddings text-embedding-3-small"].attributes)["gen_ai.operation.name"] == "embeddings"
    [failed] = [span for span in spans if span.status.code == 2]  # STATUS_CODE_ERROR
    assert _attributes(failed.attributes)["error.type"] == "error"

    metrics = {
        m.name: m
        for request in receiver.metrics
        for r in request.resource_metrics
        for scope in r.scope_metrics
        for m in scope.metrics
    }
    tokens = metrics["gen_ai.client.token.usage"]
    assert tokens.unit == "{token}"
    points = {
        (_attributes(p.attributes)["gen_ai.token.type"], _attributes(p.attributes)["gen_ai.request.model"]): p
        for p in tokens.histogram.data_points
    }
    assert (points["input", "gpt-4o"].count, points["input", "gpt-4o"].sum) == (1, 4)
    assert (points["output", "gpt-4o"].count, points["output", "gpt-4o"].sum) == (1, 5)
    assert ("input", "text-embedding-3-small") in points
    durations = metrics["gen_ai.client.operation.duration"]
    assert durations.unit == "s" and sum(p.count for p in durations.histogram.data_points) == 3
    errors = [p for p in durations.histogram.data_points if _attributes(p.attributes).get("error.type") == "error"]
    assert len(errors) == 1 and errors[0].count == 1
    cost = metrics["gen_ai.client.operation.cost"]
    labels = [(_attributes(p.attributes), p) for p in cost.histogram.data_points]
    [chat_cost] = [p for a, p in labels if a["gen_ai.request.model"] == "gpt-4o" and "error.type" not in a]
    assert (chat_cost.count, chat_cost.sum) == (1, pytest.approx(event["cost_nanos"] / 1e9))


OFF_SCRIPT = """
import sys
from stub_upstream import StubUpstream
from test_gateway import CHAT, gateway_config, http
from spendstream.core.config import load_settings
from spendstream.gateway.app import Gateway, GatewayThread

settings = load_settings(kafka_bootstrap=sys.argv[1], data_dir=sys.argv[2])
assert settings.otel_exporter_otlp_endpoint is None
with StubUpstream() as upstream, GatewayThread(Gateway(gateway_config(upstream, upstream), settings)) as gateway:
    assert http(gateway.url + "/v1/chat/completions", CHAT)[0] == 200
loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))
                or m == "spendstream.gateway.telemetry")
print("loaded:", loaded)
"""


def test_without_an_endpoint_no_opentelemetry_code_is_loaded(broker: EmbeddedBroker, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPENDSTREAM_", "OTEL_"))}
    env["PYTHONPATH"] = f"{ROOT / 'services'}:{ROOT / 'tests'}"
    done = subprocess.run(
        [sys.executable, "-c", OFF_SCRIPT, broker.bootstrap, str(tmp_path / "data")],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "loaded: []" in done.stdout, done.stdout

"""OTLP/HTTP ``POST /v1/traces`` of a running ``spendstream sink --with-api`` (real broker, real chDB ledger): the
OpenTelemetry SDK's own OTLP exporter posts GenAI spans that become usage events, attributed through the policy's
``otlp:`` mapping, counted once however often they are exported; non-GenAI spans are ignored, unattributable ones
go to the DLQ with the reason, and the endpoint refuses what the OTLP/HTTP spec says it must."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import brotli
import openai
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from spendstream.core.config import load_settings
from spendstream.core.events import UsageEvent
from spendstream.core.ledger_store import connect
from spendstream.core.policy import PolicyError, parse_policy
from spendstream.core.topics import USAGE_DLQ
from spendstream.gateway.telemetry import GenAiTelemetry
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from spendstream.sink.dead_letters import dlq_headers
from stub_upstream import StubUpstream, wait_for
from test_api_access import call, cli, create_token
from test_gateway import read_usage

POLICY = """
name: otel-ingest
projects: {checkout: payments}
otlp:
  service_name: feature
  attributes:
    deployment.environment.name: environment
    team: team
    acme.project: project
"""


@dataclass
class Stack:
    port: int
    env: dict[str, str]
    data_dir: Path
    process: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"


@pytest.fixture
def stack(tmp_path: Path, broker: EmbeddedBroker) -> Iterator[Stack]:
    """``spendstream sink --with-api``: the API beside the ledger sink, with the policy's otlp mapping."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    data_dir, port = tmp_path / "data", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPENDSTREAM_", "OTEL_"))}
    env |= {
        "SPENDSTREAM_DATA_DIR": str(data_dir), "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap,
        "SPENDSTREAM_API_PORT": str(port), "SPENDSTREAM_POLICY": str(policy), "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    log = (tmp_path / "sink.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "sink", "--with-api"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        assert wait_for(lambda: _healthy(port) or process.poll() is not None, 60, 0.2)
        assert process.poll() is None, (tmp_path / "sink.log").read_text()
        yield Stack(port, env, data_dir, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        log.close()


def _healthy(port: int) -> bool:
    try:
        return call(port, "GET", "/healthz").status == 200
    except OSError:
        return False


def _tracer_provider(exporter: SpanExporter, **resource: str) -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider that exports every span as it ends, and keeps a copy to export again."""
    kept = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout-assistant", **resource}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(SimpleSpanProcessor(kept))
    return provider, kept


def _chat_span(provider: TracerProvider, **attributes: Any) -> None:
    with provider.get_tracer("test").start_as_current_span("chat gpt-4o-mini") as span:
        span.set_attributes({
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
            "gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 300,
            "gen_ai.usage.cache_read.input_tokens": 200, **attributes,
        })  # fmt: skip


def _ledger_rows(stack: Stack, events: int) -> list[tuple[Any, ...]]:
    """The ledger's usage rows (FINAL: one per event_id) once it holds ``events``; stops the sink to read them."""

    def written() -> bool:
        done = cli(stack.env, "report", "mix", "--format", "json")
        return done.returncode == 0 and sum(row["requests"] for row in json.loads(done.stdout)["rows"]) >= events

    assert wait_for(written, 60, 0.5), "the sink did not write the events"
    stack.process.send_signal(signal.SIGTERM)
    assert stack.process.wait(60) == 0
    client = connect(load_settings(data_dir=stack.data_dir))
    try:
        return client.query(
            "SELECT team, feature, environment, input_tokens, cached_input_tokens, output_tokens, cost_nanos "
            "FROM spendstream.usage_ledger FINAL ORDER BY input_tokens DESC"
        ).result_rows
    finally:
        client.close()


def test_sdk_exports_genai_spans_counted_once_and_ignores_other_spans(stack: Stack, broker: EmbeddedBroker) -> None:
    token = create_token(stack.env, "--role", "ingest", "--team", "marketing")
    exporter = OTLPSpanExporter(
        endpoint=stack.endpoint, headers={"Authorization": f"Bearer {token}"}, compression=Compression.Gzip
    )
    provider, kept = _tracer_provider(exporter, team="marketing", **{"deployment.environment.name": "prod"})
    _chat_span(provider)
    with provider.get_tracer("test").start_as_current_span("GET /checkout") as plain:
        plain.set_attribute("http.request.method", "GET")  # no gen_ai.* attribute: not usage
    genai = [s for s in kept.get_finished_spans() if s.name.startswith("chat")]
    assert exporter.export(genai) is SpanExportResult.SUCCESS  # a re-export (a retrying exporter, a collector)
    _chat_span(provider, **{"gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 1,
                            "gen_ai.usage.cache_read.input_tokens": 0})  # fmt: skip

    published = read_usage(broker.bootstrap, 3)
    assert len(published) == 3, "each export of a GenAI span is one message; the HTTP span none"
    assert len({e["event_id"] for e in published}) == 2, "a re-exported span keeps its event_id"
    event = published[0]
    context = genai[0].get_span_context()
    assert event["event_id"] == uuid.uuid5(uuid.UUID("0b8f2a52-7c1e-5d3a-9f46-2e61c0d4b7a9"),
                                           f"{context.trace_id:032x}/{context.span_id:016x}")  # fmt: skip
    assert (event["team"], event["feature"], event["environment"]) == ("marketing", "checkout-assistant", "prod")
    assert (event["provider"], event["model_requested"], event["model_served"]) == (
        "openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18"
    )  # fmt: skip
    assert (event["input_tokens"], event["cached_input_tokens"], event["output_tokens"]) == (1200, 200, 300)
    assert event["tags"] == {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}

    rows = _ledger_rows(stack, events=2)  # the later span is on the same partition: both copies came before it
    assert len(rows) == 2, "the ledger counts the re-exported span once"
    assert rows[0][:6] == ("marketing", "checkout-assistant", "prod", 1200, 200, 300)
    assert rows[0][6] > 0, "priced like any usage event"
    provider.shutdown()


def _otlp_json(spans: list[dict[str, Any]], **resource: str) -> dict[str, Any]:
    def attrs(values: dict[str, Any]) -> list[dict[str, Any]]:
        typed = {str: "stringValue", int: "intValue", float: "doubleValue", bool: "boolValue"}
        return [{"key": k, "value": {typed[type(v)]: str(v) if type(v) is int else v}} for k, v in values.items()]

    for span in spans:
        span["attributes"] = attrs(span["attributes"])
    return {"resourceSpans": [{"resource": {"attributes": attrs({"service.name": "search", **resource})},
                               "scopeSpans": [{"scope": {"name": "manual"}, "spans": spans}]}]}  # fmt: skip


def _json_span(attributes: dict[str, Any], **kw: Any) -> dict[str, Any]:
    now = time.time_ns()
    return {"traceId": uuid.uuid4().hex, "spanId": uuid.uuid4().hex[:16], "name": "chat", "kind": 3,
            "startTimeUnixNano": str(now - 2_500_000_000), "endTimeUnixNano": str(now), "attributes": attributes,
            **kw}  # fmt: skip


def _read_dlq(bootstrap: str, expected: int) -> list[Any]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "enable.auto.commit": False})
    consumer.assign([TopicPartition(USAGE_DLQ, 0, OFFSET_BEGINNING)])
    found: list[Any] = []
    deadline = time.monotonic() + 15
    try:
        while len(found) < expected and time.monotonic() < deadline:
            found += [m for m in consumer.consume(10, 0.2) if m.error() is None]
    finally:
        consumer.close()
    return found


def test_otlp_json_gzip_attribution_and_dead_letters(stack: Stack, broker: EmbeddedBroker) -> None:
    token = create_token(stack.env, "--role", "ingest")
    anthropic = _json_span(
        {"gen_ai.operation.name": "chat", "gen_ai.system": "anthropic", "gen_ai.request.model": "claude-sonnet-4-5",
         "gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 40,
         "gen_ai.usage.cache_read.input_tokens": 300, "gen_ai.usage.cache_creation.input_tokens": 50,
         "acme.project": "checkout", "deployment.environment.name": "staging"},
        status={"code": 2, "message": "overloaded"},
    )  # fmt: skip
    orphan = _json_span({"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
                         "gen_ai.usage.input_tokens": 5, "gen_ai.usage.output_tokens": 1})  # fmt: skip
    agent = _json_span({"gen_ai.operation.name": "invoke_agent", "gen_ai.provider.name": "openai",
                        "gen_ai.usage.input_tokens": 105, "team": "search"})  # fmt: skip
    body = json.dumps(_otlp_json([anthropic, orphan, agent])).encode()
    reply = call(stack.port, "POST", "/v1/traces", gzip.compress(body), Content_Type="application/json",
                 Content_Encoding="gzip", Authorization=f"Bearer {token}")  # fmt: skip
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    partial = reply.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "1"  # int64 is a string in OTLP JSON
    assert f"span {orphan['spanId']}: no team attribution" in partial["errorMessage"]

    [event] = read_usage(broker.bootstrap, 1)
    assert (event["team"], event["project"], event["feature"], event["environment"]) == (
        "payments", "checkout", "search", "staging"
    ), "the project the policy gives a team brings the team"  # fmt: skip
    assert (event["provider"], event["model_requested"], event["status"]) == ("anthropic", "claude-sonnet-4-5", "error")
    # Anthropic's input_tokens excludes the cache: an instrumentation passing it through has the cache added.
    assert (event["input_tokens"], event["cached_input_tokens"], event["cache_write_tokens"]) == (450, 300, 50)
    assert event["latency_ms"] == 2500

    [letter] = _read_dlq(broker.bootstrap, 1)
    headers = dlq_headers(letter.headers())
    assert headers["spendstream.dlq.reason"].startswith("no team attribution")
    assert headers["spendstream.dlq.stage"] == "otlp"
    original = ExportTraceServiceRequest.FromString(letter.value())  # fit to be fixed and posted again
    [span] = original.resource_spans[0].scope_spans[0].spans
    assert span.span_id.hex() == orphan["spanId"]
    assert original.resource_spans[0].resource.attributes[0].value.string_value == "search"


def test_refusals_follow_the_otlp_http_spec(stack: Stack, broker: EmbeddedBroker) -> None:
    unauthenticated = OTLPSpanExporter(endpoint=stack.endpoint, timeout=5)
    provider, kept = _tracer_provider(InMemorySpanExporter(), team="marketing")
    _chat_span(provider)
    assert unauthenticated.export(kept.get_finished_spans()) is SpanExportResult.FAILURE
    raw = ExportTraceServiceRequest().SerializeToString()
    anonymous = call(stack.port, "POST", "/v1/traces", raw, Content_Type="application/x-protobuf")
    assert anonymous.status == 401 and anonymous.headers["content-type"] == "application/x-protobuf"
    assert "role ingest" in RpcStatus.FromString(anonymous.body).message  # a google.rpc.Status, as OTLP asks
    viewer = create_token(stack.env, "--role", "viewer")
    refused = call(stack.port, "POST", "/v1/traces", b"{}", Content_Type="application/json",
                   Authorization=f"Bearer {viewer}")  # fmt: skip
    assert refused.status == 403 and "has role viewer" in refused.json()["message"]

    token = create_token(stack.env, "--role", "ingest", "--team", "marketing")
    auth = {"Authorization": f"Bearer {token}"}
    unknown = call(stack.port, "POST", "/v1/traces", b"x", Content_Type="text/plain", **auth)
    assert unknown.status == 415
    assert "application/x-protobuf" in unknown.json()["message"]
    garbage = call(stack.port, "POST", "/v1/traces", b"\xff\xff\xff", Content_Type="application/x-protobuf", **auth)
    assert garbage.status == 400 and garbage.headers["content-type"] == "application/x-protobuf"
    assert "not an ExportTraceServiceRequest" in RpcStatus.FromString(garbage.body).message
    not_json = call(stack.port, "POST", "/v1/traces", b"{", Content_Type="application/json", **auth)
    assert not_json.status == 400 and "OTLP JSON" in not_json.json()["message"]
    bad_gzip = call(stack.port, "POST", "/v1/traces", b"plain", Content_Type="application/x-protobuf",
                    Content_Encoding="gzip", **auth)  # fmt: skip
    assert bad_gzip.status == 400

    empty = call(stack.port, "POST", "/v1/traces", raw, Content_Type="application/x-protobuf", **auth)
    assert empty.status == 200
    # Collectors may compress with brotli too; an encoding that cannot be inflated is a Status, not plain text.
    brotli_body = call(stack.port, "POST", "/v1/traces", brotli.compress(raw), Content_Type="application/x-protobuf",
                       Content_Encoding="br", **auth)  # fmt: skip
    assert brotli_body.status == 200, brotli_body.body
    assert not ExportTraceServiceResponse.FromString(empty.body).HasField("partial_success")
    other_team = _json_span({"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
                             "gen_ai.usage.input_tokens": 5, "team": "sales"})  # fmt: skip
    scoped = call(stack.port, "POST", "/v1/traces", json.dumps(_otlp_json([other_team])).encode(),
                  Content_Type="application/json", **auth)  # fmt: skip
    assert scoped.status == 200 and scoped.json()["partialSuccess"]["rejectedSpans"] == "1"
    assert "may report for team marketing only" in scoped.json()["partialSuccess"]["errorMessage"]
    assert read_usage(broker.bootstrap, 0, timeout=1) == [], "nothing refused was published"
    provider.shutdown()


def test_spans_of_the_openai_instrumentation_become_usage(stack: Stack, broker: EmbeddedBroker) -> None:
    token = create_token(stack.env, "--role", "ingest")
    exporter = OTLPSpanExporter(endpoint=stack.endpoint, headers={"Authorization": f"Bearer {token}"})
    provider, _ = _tracer_provider(exporter, team="support")
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        with StubUpstream() as upstream:
            client = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="sk-test")
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three four"}], max_tokens=6
            )
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
    [event] = read_usage(broker.bootstrap, 1)
    assert (event["team"], event["feature"], event["provider"]) == ("support", "checkout-assistant", "openai")
    assert (event["model_requested"], event["input_tokens"], event["output_tokens"]) == ("gpt-4o-mini", 4, 6)


def test_the_gateways_own_spans_are_not_counted_again(
    stack: Stack, broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway whose OpenTelemetry exporter points at this API: its call was already a usage event."""
    token = create_token(stack.env, "--role", "ingest")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"Authorization=Bearer%20{token}")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "team=platform")  # a team the mapping would attribute
    telemetry = GenAiTelemetry(f"http://127.0.0.1:{stack.port}")
    call_event = UsageEvent(team="marketing", provider="openai", model_requested="gpt-4o", input_tokens=1000,
                            output_tokens=100, cost_nanos=3_500_000, latency_ms=40)  # fmt: skip
    telemetry.record(call_event, "chat.completions")
    telemetry.shutdown()  # exports the span
    scraped = call(stack.port, "GET", "/metrics").body.decode()
    assert 'spendstream_api_ingest_requests_total{outcome="accepted"} 1.0' in scraped, "the span reached the API"
    assert read_usage(broker.bootstrap, 0, timeout=3) == [], "the call is not counted a second time"
    assert _read_dlq(broker.bootstrap, 1) == [], "nor dead-lettered for want of a team"


def test_the_mapping_follows_the_policy_in_force(stack: Stack, broker: EmbeddedBroker, tmp_path: Path) -> None:
    applied = tmp_path / "squads.yaml"
    applied.write_text("name: squads\notlp:\n  service_name: project\n  attributes: {squad: team}\n")
    done = cli(stack.env, "policy", "apply", "--wait", "0", str(applied))
    assert done.returncode in (0, 3), done.stderr  # 3: published, no processor runs here to confirm it
    token = create_token(stack.env, "--role", "ingest")
    span = _json_span({"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini",
                       "gen_ai.usage.input_tokens": 7, "gen_ai.usage.output_tokens": 2})  # fmt: skip
    reply = call(stack.port, "POST", "/v1/traces", json.dumps(_otlp_json([span], squad="growth")).encode(),
                 Content_Type="application/json", Authorization=f"Bearer {token}")  # fmt: skip
    assert reply.status == 200 and "partialSuccess" not in reply.json(), reply.body
    [event] = read_usage(broker.bootstrap, 1)
    assert (event["team"], event["project"], event["feature"]) == ("growth", "search", "")


def test_policy_otlp_mapping_is_validated_with_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as refused:
        parse_policy("name: x\notlp:\n  service_name: team\n  attributes:\n    team: squad\n", "p.yaml")
    assert "p.yaml:3: otlp.service_name: Input should be 'feature', 'project' or 'none'" in str(refused.value)
    assert "p.yaml:5: otlp.attributes.team: Input should be 'org', 'division', 'team'" in str(refused.value)
    assert parse_policy("name: x\n").version == parse_policy("name: x\notlp: null\n").version
    bad = tmp_path / "bad.yaml"
    bad.write_text("otlp:\n  attributes: {team: squad}\n")
    done = subprocess.run([sys.executable, "-m", "spendstream.cli", "policy", "validate", str(bad)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0 and f"{bad}:2: otlp.attributes.team" in done.stderr + done.stdout


def test_a_span_older_than_the_ledger_keeps_is_rejected_in_partial_success_a_late_one_accepted() -> None:
    """The ledger's TTL would delete the first; the second is late for budgets, but the ledger records it."""
    from datetime import UTC, datetime, timedelta

    from spendstream.api import otlp

    attributes = {"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o", "team": "search",
                  "gen_ai.usage.input_tokens": 5, "gen_ai.usage.output_tokens": 1}  # fmt: skip

    def span_days_ago(days: int) -> dict[str, Any]:
        span = _json_span(dict(attributes))
        for end in ("startTimeUnixNano", "endTimeUnixNano"):
            span[end] = str(int(span[end]) - days * 86_400 * 10**9)
        return span

    expired, late = span_days_ago(400), span_days_ago(2)
    export = otlp.decode_request(json.dumps(_otlp_json([expired, late])).encode(), "application/json")

    result = otlp.usage_from_request(export, datetime.now(UTC), timedelta(minutes=5), ledger_ttl_months=13)

    assert [str(e.occurred_at.date()) for e in result.events] == [str((datetime.now(UTC) - timedelta(days=2)).date())]
    [rejected] = result.rejected
    assert rejected.span_id == expired["spanId"] and "older than the ledger keeps" in rejected.reason


def test_spans_with_all_zero_ids_are_rejected_not_collapsed_into_one_event() -> None:
    """OTLP calls all-zero ids invalid; accepted, every such span of an exporter became one event and the rest
    were dropped as its copies, answered 200."""
    from datetime import UTC, datetime, timedelta

    from spendstream.api import otlp

    attributes = {"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o", "team": "search",
                  "gen_ai.usage.input_tokens": 5, "gen_ai.usage.output_tokens": 1}  # fmt: skip
    zero_trace = _json_span(dict(attributes), traceId="0" * 32)
    zero_span = _json_span(dict(attributes), spanId="0" * 16)
    good = _json_span(dict(attributes))
    export = otlp.decode_request(json.dumps(_otlp_json([zero_trace, zero_span, good])).encode(), "application/json")
    result = otlp.usage_from_request(export, datetime.now(UTC), timedelta(minutes=5), ledger_ttl_months=13)
    assert [e.tags["span_id"] for e in result.events] == [good["spanId"]]
    assert [r.span_id for r in result.rejected] == [zero_trace["spanId"], "0" * 16]
    assert all("all-zero trace id or span id is invalid" in r.reason for r in result.rejected)


def test_an_export_of_a_late_span_says_it_is_not_counted_in_budgets(stack: Stack) -> None:
    """``/v1/usage`` says so of a late event; an OTLP exporter got ``{}``. The spec's way: a ``partial_success``
    with no rejected span and a message."""
    token = create_token(stack.env, "--role", "ingest")
    late = _json_span({"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o", "team": "search",
                       "gen_ai.usage.input_tokens": 5, "gen_ai.usage.output_tokens": 1})  # fmt: skip
    for end in ("startTimeUnixNano", "endTimeUnixNano"):
        late[end] = str(int(late[end]) - 2 * 86_400 * 10**9)
    reply = call(stack.port, "POST", "/v1/traces", json.dumps(_otlp_json([late])).encode(),
                 Content_Type="application/json", Authorization=f"Bearer {token}")  # fmt: skip
    assert reply.status == 200, reply.body
    partial = reply.json()["partialSuccess"]
    assert "rejectedSpans" not in partial  # 0, the default, is left out of OTLP JSON
    assert partial["errorMessage"] == (
        f"1 span(s) older than the allowed lateness (e.g. span {late['spanId']}): recorded in the ledger, "
        "not counted in any budget"
    )

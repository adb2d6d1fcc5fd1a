"""OTLP/HTTP trace ingest (``POST /v1/traces``): GenAI spans become usage events (docs/architecture.md §5, §9).

Services already instrumented with OpenTelemetry's GenAI semantic conventions export their spans here, as to
any OTLP/HTTP receiver, and spendstream counts what they spent without a line of new code in the service.

* Encodings: binary protobuf (``application/x-protobuf``) and OTLP JSON (``application/json``: hex trace and
  span ids, lowerCamelCase keys), either one gzip- or brotli-compressed (``Content-Encoding: gzip`` or ``br``;
  aiohttp inflates it and holds the inflated size to the API's body limit).
* A span is a GenAI span when it carries ``gen_ai.provider.name`` (or the older ``gen_ai.system``): one key
  compared per attribute, nothing built for any other span. Agent, tool and other non-inference operations are
  skipped too (their tokens are those of the inference spans beneath them), and so are the gateway's own spans
  (``spendstream.event_id``): a gateway exporting to this endpoint has already emitted that call's usage event.
* ``event_id`` is the UUID5 of the trace and span ids: a span exported twice (a retrying exporter, a collector
  fanning out) is one usage event, counted once by the processor and the ledger.
* Attribution: ``service.name`` and the attributes the policy's ``otlp:`` section maps (core/otlp_attribution.py);
  a span attribute wins over a resource attribute; a project the policy gives a team brings that team.
* A GenAI span that cannot be a usage event (no team, a bad token count, no model) goes to
  ``spendstream.usage.dlq`` with the reason, as a one-span ExportTraceServiceRequest that can be fixed and
  re-posted, and is counted in the response's ``partial_success.rejected_spans`` with the reason.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from pydantic import ValidationError

from spendstream.core.events import UsageEvent, ledger_expiry_problem, usage_record_problem
from spendstream.core.otlp_attribution import DEFAULT_OTLP_ATTRIBUTION, OtlpAttribution

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
CONTENT_TYPES = (PROTOBUF, JSON)
# UUID5 namespace of event ids derived from (trace id, span id): fixed, so every API derives the same id.
EVENT_ID_NAMESPACE = uuid.UUID("0b8f2a52-7c1e-5d3a-9f46-2e61c0d4b7a9")
GENAI_MARKERS = frozenset({"gen_ai.provider.name", "gen_ai.system"})
# The attribute a spendstream gateway puts on its own spans: that call is already a usage event.
GATEWAY_EVENT_ID = "spendstream.event_id"
# Operations that are a call to a model; agent and tool spans aggregate or surround them.
INFERENCE_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "embeddings"})
# Names the conventions give some providers, and the provider ids prices are looked up by.
PROVIDER_ALIASES = {
    "aws.bedrock": "aws",
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "az.ai.openai": "azure",
    "az.ai.inference": "azure",
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "x_ai": "x-ai",
    "mistral_ai": "mistral",
}
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


class OtlpDecodeError(ValueError):
    """A body that is not an ExportTraceServiceRequest in the encoding it claims (HTTP 400)."""


@dataclass(frozen=True)
class RejectedSpan:
    trace_id: str
    span_id: str
    reason: str
    original: bytes  # a one-span ExportTraceServiceRequest: what the DLQ keeps, fit to be re-posted


@dataclass
class IngestResult:
    events: list[UsageEvent] = field(default_factory=list)
    rejected: list[RejectedSpan] = field(default_factory=list)


def decode_request(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """The request a body carries (aiohttp has inflated a gzip or brotli body); ``OtlpDecodeError`` otherwise."""
    request = ExportTraceServiceRequest()
    if content_type == PROTOBUF:
        try:
            request.ParseFromString(body)
        except (DecodeError, RecursionError) as exc:
            raise OtlpDecodeError(f"not an ExportTraceServiceRequest in protobuf: {exc}") from None
        return request
    try:
        document = json.loads(body)
        json_format.ParseDict(_ids_as_base64(document), request, ignore_unknown_fields=True)
    except (ValueError, RecursionError, json_format.ParseError) as exc:
        raise OtlpDecodeError(f"not an ExportTraceServiceRequest in OTLP JSON: {exc}") from None
    return request


def _ids_as_base64(document: Any) -> Any:
    """OTLP JSON writes trace and span ids as hex; protobuf's JSON mapping of ``bytes`` expects base64."""
    if not isinstance(document, dict):
        raise OtlpDecodeError("an OTLP JSON request is an object with resourceSpans")
    for resource_spans in _list(document.get("resourceSpans")):
        for scope_spans in _list(_dict(resource_spans).get("scopeSpans")):
            for span in _list(_dict(scope_spans).get("spans")):
                _hex_fields(_dict(span))
                for link in _list(span.get("links")):
                    _hex_fields(_dict(link))
    return document


def _hex_fields(item: dict[str, Any]) -> None:
    for name in _ID_FIELDS:
        value = item.get(name)
        if isinstance(value, str) and value:
            try:
                item[name] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise OtlpDecodeError(f"{name} {value[:40]!r} is not hex") from None


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise OtlpDecodeError(f"expected an array, got {type(value).__name__}")
    return value


def _dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise OtlpDecodeError(f"expected an object, got {type(value).__name__}")
    return value


def event_id(trace_id: bytes, span_id: bytes) -> uuid.UUID:
    return uuid.uuid5(EVENT_ID_NAMESPACE, f"{trace_id.hex()}/{span_id.hex()}")


def usage_from_request(
    request: ExportTraceServiceRequest,
    now: datetime,
    max_future_skew: timedelta,
    attribution: OtlpAttribution | None = None,
    project_teams: Mapping[str, str] | None = None,
    ledger_ttl_months: int | None = None,
) -> IngestResult:
    """The usage events of a request's GenAI spans, and the GenAI spans that cannot be one (with the reason;
    spans older than the ledger keeps, ``ledger_ttl_months``, among them)."""
    attribution = attribution or DEFAULT_OTLP_ATTRIBUTION
    project_teams = project_teams or {}
    result = IngestResult()
    for resource_spans in request.resource_spans:
        resource_attribution: dict[str, str] | None = None
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                if not any(kv.key in GENAI_MARKERS for kv in span.attributes):
                    continue  # not GenAI: nothing is built for it
                if resource_attribution is None:
                    resource_attribution = _attribution(_values(resource_spans.resource.attributes), attribution)
                span_attributes = _values(span.attributes)
                if GATEWAY_EVENT_ID in span_attributes:
                    continue  # the gateway metered this call: counting its span again would double the spend
                operation = span_attributes.get("gen_ai.operation.name")
                if operation is not None and operation not in INFERENCE_OPERATIONS:
                    continue
                try:
                    record = _usage_record(span, span_attributes, resource_attribution, attribution, project_teams)
                    usage = UsageEvent.model_validate(record)
                    problem = usage_record_problem(usage.__dict__, now, max_future_skew)
                    if problem is None and ledger_ttl_months is not None:
                        problem = ledger_expiry_problem(usage.occurred_at, now, ledger_ttl_months)
                    if problem is None and not usage.team:
                        problem = (
                            "no team attribution: set a 'team' resource attribute (OTEL_RESOURCE_ATTRIBUTES=team=...), "
                            "map one in the policy's otlp.attributes, or name a project the policy gives a team"
                        )
                except (ValidationError, ValueError) as exc:
                    problem = _reason(exc)
                if problem is None:
                    result.events.append(usage)
                else:
                    original = _one_span_request(resource_spans, scope_spans, span)
                    result.rejected.append(RejectedSpan(span.trace_id.hex(), span.span_id.hex(), problem, original))
    return result


def _usage_record(
    span: Any,
    span_attributes: dict[str, Any],
    resource_attribution: dict[str, str],
    attribution: OtlpAttribution,
    project_teams: Mapping[str, str],
) -> dict[str, Any]:
    if len(span.trace_id) != 16 or len(span.span_id) != 8:
        raise ValueError("the span needs a 16-byte trace id and an 8-byte span id (its idempotency key)")
    if not any(span.trace_id) or not any(span.span_id):  # every such span would be one event: the rest lost
        raise ValueError("an all-zero trace id or span id is invalid (OTLP); the ids are the span's idempotency key")
    if not span.start_time_unix_nano:
        raise ValueError("the span has no start time (start_time_unix_nano is 0)")
    record: dict[str, Any] = {**resource_attribution, **_attribution(span_attributes, attribution, service=False)}
    if record.get("project") and not record.get("team") and record["project"] in project_teams:
        record["team"] = project_teams[record["project"]]
    record.update(usage_fields(span_attributes))
    started, ended = span.start_time_unix_nano, span.end_time_unix_nano or span.start_time_unix_nano
    record.update(
        event_id=event_id(span.trace_id, span.span_id),
        occurred_at=datetime.fromtimestamp(started // 10**9, UTC).replace(microsecond=started % 10**9 // 1000),
        latency_ms=max(0, ended - started) // 10**6,
        status="error" if span.status.code == Status.STATUS_CODE_ERROR else "ok",
        tags={"trace_id": span.trace_id.hex(), "span_id": span.span_id.hex()},
    )
    return record


def usage_fields(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """UsageEvent fields from the ``gen_ai.*`` attributes of one span: provider, models and token counts.

    The conventions count cached reads and cache writes inside ``gen_ai.usage.input_tokens``, as spendstream
    does; an instrumentation that reports them beside it instead (more cached than input) has them added.
    ``gen_ai.usage.reasoning.output_tokens`` is part of ``gen_ai.usage.output_tokens`` and priced with it.
    """
    provider = str(attributes.get("gen_ai.provider.name") or attributes.get("gen_ai.system") or "")
    requested = attributes.get("gen_ai.request.model") or attributes.get("gen_ai.response.model") or ""
    fields: dict[str, Any] = {
        "provider": PROVIDER_ALIASES.get(provider, provider),
        "model_requested": str(requested),
        "model_served": str(attributes.get("gen_ai.response.model") or ""),
        "input_tokens": _count(attributes, "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"),
        "output_tokens": _count(attributes, "gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens"),
        "cached_input_tokens": _count(attributes, "gen_ai.usage.cache_read.input_tokens"),
        "cache_write_tokens": _count(attributes, "gen_ai.usage.cache_creation.input_tokens"),
    }
    cached = fields["cached_input_tokens"] + fields["cache_write_tokens"]
    if cached > fields["input_tokens"]:
        fields["input_tokens"] += cached
    return fields


def _count(attributes: Mapping[str, Any], *names: str) -> int:
    for name in names:
        value = attributes.get(name)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if type(value) is not int or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        return value
    return 0


def _attribution(values: Mapping[str, Any], attribution: OtlpAttribution, service: bool = True) -> dict[str, str]:
    found: dict[str, str] = {}
    if service and attribution.service_name != "none" and values.get("service.name"):
        found[attribution.service_name] = str(values["service.name"])
    for attribute, target in attribution.attributes.items():
        value = values.get(attribute)
        if value is not None and value != "":
            found[target] = str(value)
    return found


def _values(attributes: Iterable[Any]) -> dict[str, Any]:
    """Attribute key -> its scalar value (arrays, maps and bytes are left out: no field takes them)."""
    out: dict[str, Any] = {}
    for kv in attributes:
        kind = kv.value.WhichOneof("value")
        if kind in ("string_value", "int_value", "double_value", "bool_value"):
            out[kv.key] = getattr(kv.value, kind)
    return out


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'span'}: {e['msg']}" for e in exc.errors())
    return str(exc)


def _one_span_request(resource_spans: ResourceSpans, scope_spans: ScopeSpans, span: Any) -> bytes:
    single = ExportTraceServiceRequest()
    resource = single.resource_spans.add(resource=resource_spans.resource, schema_url=resource_spans.schema_url)
    resource.scope_spans.add(scope=scope_spans.scope, schema_url=scope_spans.schema_url).spans.append(span)
    return single.SerializeToString()


def response_body(rejected: list[RejectedSpan], content_type: str, warning: str = "") -> bytes:
    """ExportTraceServiceResponse: ``partial_success`` when a span was rejected, as the OTLP spec asks, or with
    ``rejected_spans`` 0 and a ``warning`` (the spec's way to tell an exporter something of spans it accepted)."""
    response = ExportTraceServiceResponse()
    if rejected:
        shown = "; ".join(f"span {r.span_id}: {r.reason}" for r in rejected[:3])
        more = f" (and {len(rejected) - 3} more)" if len(rejected) > 3 else ""
        response.partial_success.rejected_spans = len(rejected)
        response.partial_success.error_message = f"{len(rejected)} span(s) rejected: {shown}{more}"
        if warning:
            response.partial_success.error_message += f"; {warning}"
    elif warning:
        response.partial_success.error_message = warning
    if content_type == PROTOBUF:
        return response.SerializeToString()
    return json_format.MessageToJson(response, indent=None).encode()


def status_body(code: int, message: str, content_type: str) -> bytes:
    """A ``google.rpc.Status`` for a 4xx/5xx answer, in the request's encoding (OTLP/HTTP failures)."""
    status = RpcStatus(code=code, message=message)
    if content_type == PROTOBUF:
        return status.SerializeToString()
    return json_format.MessageToJson(status, indent=None).encode()

"""The API service: HTTP ingest for non-Python services, reports as JSON, the dashboard, admin.

Every endpoint but ``/healthz`` and ``/metrics`` needs a token (``tokens.py``): ``viewer`` reads reports
and the dashboard, ``ingest`` posts usage within its scope, ``admin`` (or ``SPENDSTREAM_ADMIN_TOKEN``)
does everything. Bodies are JSON only and no CORS header is ever sent, so a web page cannot post here.

``create_app(settings, ledger_client)`` takes an open ledger client so the embedded runtime can
share one chDB client between the sink and the API in one process (chDB allows one directory
per process). The chDB client is synchronous: every ledger call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import io
import json
import logging
import os
import tempfile
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from pydantic import ValidationError

from spendstream.analytics import reports
from spendstream.analytics.budgets import load_budgets
from spendstream.analytics.focus import export_focus
from spendstream.analytics.money import first_of_month, local_date, nanos_from_usd
from spendstream.analytics.readonly_sql import SQL_API_MAX_MEMORY_MB, SQL_API_MAX_ROWS, SQL_API_TIMEOUT_S, sql_report
from spendstream.analytics.report_registry import (
    MAX_REPORT_COUNT,
    REPORTS,
    ReportRangeError,
    build_report,
    report_day_problem,
)
from spendstream.analytics.report_timezone import report_timezone
from spendstream.analytics.rollup import rebuild_spend_daily
from spendstream.api import cloudevents, otlp
from spendstream.api.budget_requests import APPROVER_PATHS, FEATURE_IN_USE_WITHIN, add_routes
from spendstream.api.dashboard import render_page
from spendstream.api.otlp_policy import OTLP_POLICY, OtlpPolicy
from spendstream.api.recent_events import RecentEvents
from spendstream.api.tokens import CALLER, ApiToken, Role, TokenStore, new_read_token
from spendstream.core import topics
from spendstream.core.api_address import ApiAddress, remove_address, write_address
from spendstream.core.codec import AvroCodec
from spendstream.core.config import Settings
from spendstream.core.events import (
    INT64_MAX,
    NANOS_PER_USD,
    UsageEvent,
    lateness_problem,
    ledger_expiry_problem,
    usage_record_problem,
)
from spendstream.core.http_server_log import quiet_client_body_errors
from spendstream.core.ledger_spend import SPEND_WINDOWS_PATH, SpendQuery, query_spend
from spendstream.core.metrics import API_INGEST_EVENTS, API_INGEST_REQUESTS, instrument_app
from spendstream.core.pricing import PriceTable, UnknownModelError, price_record
from spendstream.gateway.keys import hash_key
from spendstream.notifier.store import list_notifications

MAX_BODY_BYTES = 5 * 1024 * 1024
OTLP_PATH = "/v1/traces"
MAX_BATCH_EVENTS = 5_000
LEDGER = web.AppKey("ledger", Any)
PRODUCER = web.AppKey("producer", Any)
SETTINGS = web.AppKey("settings", Settings)
MAX_BODY = web.AppKey("max_body", int)
MAX_EVENTS = web.AppKey("max_events", int)
CODEC = web.AppKey("codec", AvroCodec)
LEDGER_LOCK = web.AppKey("ledger_lock", asyncio.Lock)
TOKENS = web.AppKey("tokens", TokenStore)
READ_TOKEN = web.AppKey("read_token", str)
RECENT_EVENTS = web.AppKey("recent_events", RecentEvents)
TREND_DAYS = 30
# Per event, so that no price can turn one event into a cost (or a window sum) beyond Int64 nano-USD
# (it would take a price above $200,000 per million tokens): ten billion tokens per count is a thousand
# times the largest context window, and no single call costs $1,000,000.
PUBLIC_PATHS = frozenset({"/healthz", "/metrics"})
SESSION_COOKIE = "spendstream_token"
DASHBOARD_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"
log = logging.getLogger("spendstream.api")


class BadRequest(Exception):
    def __init__(self, problems: list[dict[str, Any]]) -> None:
        super().__init__(problems)
        self.problems = problems


def _field_of(message: str, event: UsageEvent) -> str:
    """The event field a ``usage_record_problem`` message is about: of the fields it names, the
    first that is empty (for "missing a or b"), else the first named."""
    named = [w for w in message.replace(",", " ").split() if w in UsageEvent.model_fields]
    empty = [name for name in named if not getattr(event, name)] if message.startswith("missing") else []
    return (empty or named or ["event"])[0]


def _unencodable_field(event: UsageEvent) -> str | None:
    """The first text field (or tag) that is not valid Unicode: JSON's ``\\ud800`` escapes decode to lone
    surrogates, which no UTF-8 encoder (Avro, the Kafka key, ClickHouse) can write."""
    for name, value in event.__dict__.items():
        texts = [*value.keys(), *value.values()] if name == "tags" else [value]
        for text in texts:
            if isinstance(text, str):
                try:
                    text.encode()
                except UnicodeEncodeError:
                    return name
    return None


def parse_batch(
    body: Any, now: datetime, max_future_skew: timedelta, max_events: int, ledger_ttl_months: int | None = None
) -> list[UsageEvent]:
    """Events of a request body (one object, an array, or ``{"events": [...]}``), all or none.

    Raises ``BadRequest`` naming every bad field as (index, field, message); ``OverflowError`` if
    the batch is larger than ``max_events``. ``event_id`` is required so a client retry is idempotent.
    One bad event refuses the whole batch: a client fixes and re-posts it, with no partial state to track.
    An event older than the ledger keeps (``ledger_ttl_months``) is refused: the ledger would delete it at once.
    """
    if isinstance(body, dict) and set(body) == {"events"}:
        body = body["events"]
        if not isinstance(body, list):
            raise BadRequest([{"index": None, "field": "events", "message": "must be an array of events"}])
    items = body if isinstance(body, list) else [body]
    if not items:
        raise BadRequest([{"index": None, "field": "events", "message": "the batch is empty"}])
    if len(items) > max_events:
        raise OverflowError(f"{len(items)} events in one request; at most {max_events}")
    events, indices, problems = [], [], []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append({"index": index, "field": None, "message": "an event must be a JSON object"})
            continue
        if not item.get("event_id"):
            problems.append(
                {"index": index, "field": "event_id", "message": "required, so that a retry is counted once"}
            )
            continue
        try:
            event = UsageEvent.model_validate(item)
        except ValidationError as exc:
            for error in exc.errors():
                field = ".".join(str(p) for p in error["loc"]) or None
                problems.append({"index": index, "field": field, "message": error["msg"].removeprefix("Value error, ")})
            continue
        field = _unencodable_field(event)
        if field is not None:
            problems.append(
                {"index": index, "field": field, "message": "contains a lone surrogate (not valid Unicode)"}
            )
            continue
        problem = usage_record_problem(event.__dict__, now, max_future_skew)
        if problem is None and ledger_ttl_months is not None:
            problem = ledger_expiry_problem(event.occurred_at, now, ledger_ttl_months)
        if problem is not None:
            problems.append({"index": index, "field": _field_of(problem, event), "message": problem})
            continue
        events.append(event)
        indices.append(index)
    first_index: dict[tuple[str, str, Any], int] = {}  # one event per (org, team, event_id): the ledger's identity
    for index, event in zip(indices, events, strict=True):
        identity = (event.org, event.team, event.event_id)
        if (first := first_index.setdefault(identity, index)) != index:  # answered "accepted" and kept once
            problems.append(
                {"index": index, "field": "event_id", "message": f"the same event as index {first} of this batch"}
            )
    if problems:
        raise BadRequest(problems)
    return events


# The longest a request's body may take to arrive, in SPENDSTREAM_API_HEADER_TIMEOUT_S (20 s: a minute).
BODY_TIMEOUT_HEADS = 3


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


async def post_usage(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    try:
        body = await request.json(loads=json.loads)
    except web.HTTPRequestEntityTooLarge:
        API_INGEST_REQUESTS.labels("too_large").inc()
        return _error(413, f"request body larger than {request.app[MAX_BODY]} bytes")
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, a 5000-digit number, nested too deep
        API_INGEST_REQUESTS.labels("invalid").inc()
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        return _error(400, f"body is not JSON: {reason}", problems=[{"index": None, "field": None, "message": reason}])
    cloud = cloudevents.is_cloudevents(request.content_type, request.headers)
    try:
        if cloud:
            body = usage_from_cloudevents(request.content_type, request.headers, body, request.app[MAX_EVENTS])
        now = datetime.now(UTC)
        skew = timedelta(seconds=settings.max_future_skew_s)
        events = parse_batch(body, now, skew, request.app[MAX_EVENTS], settings.ledger_ttl_months)
    except OverflowError as exc:
        API_INGEST_REQUESTS.labels("too_large").inc()
        return _error(413, str(exc))
    except BadRequest as exc:
        API_INGEST_REQUESTS.labels("invalid").inc()
        problems = exc.problems
        if cloud:  # name the CloudEvent attribute the client wrote: id, time, data.input_tokens
            problems = [{**p, "field": cloudevents.attribute_of(p["field"])} for p in problems]
        return _error(400, f"{len(problems)} problem(s); nothing was accepted", problems=problems)
    caller = _caller(request)
    if caller is None:  # revoked since the guard let the request in
        return _error(401, "the token was revoked")
    view = await request.app[OTLP_POLICY].current()
    outside = [
        (i, caller.scope_problem(e) or caller.org_problem(e, view.org) or caller.owner_problem(e, view.policy))
        for i, e in enumerate(events)
    ]
    field_of = cloudevents.attribute_of if cloud else str
    refused = [{"index": i, "field": field_of(p[0]), "message": p[1]} for i, p in outside if p is not None]
    if refused:
        API_INGEST_REQUESTS.labels("forbidden").inc()
        return _error(403, f"{len(refused)} event(s) outside this token's scope; nothing was accepted",
                      problems=refused)  # fmt: skip
    rejected = unpriceable(events, view.prices)
    if rejected:
        API_INGEST_REQUESTS.labels("invalid").inc()
        problems = [{"index": i, "field": field_of("model_requested"), "message": why} for i, why in rejected]
        return _error(400, f"{len(problems)} problem(s); nothing was accepted", problems=problems)
    failures = await asyncio.to_thread(_publish, request.app[PRODUCER], request.app[CODEC], events)
    if failures:
        API_INGEST_REQUESTS.labels("unacknowledged").inc()
        API_INGEST_EVENTS.labels("unacknowledged").inc(len(events))
        return _error(503, "the broker did not acknowledge every event; retry the request (it is idempotent)",
                      failed_event_ids=failures)  # fmt: skip
    API_INGEST_REQUESTS.labels("accepted").inc()
    API_INGEST_EVENTS.labels("accepted").inc(len(events))
    answer: dict[str, Any] = {"accepted": len(events), "event_ids": [str(e.event_id) for e in events]}
    late = late_events(events, now, timedelta(seconds=settings.processor_allowed_lateness_s))
    if late:  # recorded in the ledger (chargeback, reports), but no budget window counts them any more
        answer["not_counted_in_budgets"] = late
    recent = request.app[RECENT_EVENTS]
    if dropped := recent.other_versions(events):
        answer["other_versions_dropped"] = [
            {"index": index, "event_id": str(events[index].event_id), "field": "event_id",
             "message": "this event_id was accepted earlier with other content: the ledger and the budgets keep "
                        "the first version, and this one goes to spendstream.usage.dlq (conflicting_duplicate); "
                        "send a correction under a new event_id"}
            for index in dropped
        ]  # fmt: skip
    recent.remember(events)
    return web.json_response(answer, status=202)


def late_events(events: list[UsageEvent], now: datetime, allowed_lateness: timedelta) -> list[dict[str, Any]]:
    """The accepted events the processor will not count (it dead-letters them as late): the ledger records them."""
    late = []
    for index, event in enumerate(events):
        problem = lateness_problem(event.occurred_at, now, allowed_lateness)
        if problem is not None:
            late.append({"index": index, "event_id": str(event.event_id), "field": "occurred_at",
                         "message": f"{problem}: recorded in the ledger, not counted in any budget"})  # fmt: skip
    return late


def usage_from_cloudevents(content_type: str, headers: Any, body: Any, max_events: int) -> list[dict[str, Any]]:
    """The usage events of a CloudEvents request (structured, batch or binary mode), all or none."""
    if content_type == cloudevents.BATCH:
        if not isinstance(body, list):
            raise BadRequest([{"index": None, "field": None, "message": "a CloudEvents batch must be a JSON array"}])
        items = body
    else:
        items = [body if content_type == cloudevents.STRUCTURED else cloudevents.from_binary(headers, body)]
    if len(items) > max_events:
        raise OverflowError(f"{len(items)} events in one request; at most {max_events}")
    usage, problems = [], []
    for index, item in enumerate(items):
        try:
            usage.append(cloudevents.to_usage(item))
        except cloudevents.CloudEventProblem as exc:
            problems.append({"index": index, "field": exc.field, "message": str(exc)})
    if problems:
        raise BadRequest(problems)
    return usage


async def post_traces(request: web.Request) -> web.Response:
    """OTLP/HTTP ``POST /v1/traces``: GenAI spans become usage events (``api/otlp.py``)."""
    content_type = request.content_type
    answer_type = content_type if content_type in otlp.CONTENT_TYPES else otlp.JSON

    def failure(status: int, code: int, message: str, outcome: str) -> web.Response:
        API_INGEST_REQUESTS.labels(outcome).inc()
        return web.Response(status=status, body=otlp.status_body(code, message, answer_type), content_type=answer_type)

    if content_type not in otlp.CONTENT_TYPES:
        return failure(415, 3, f"Content-Type must be {' or '.join(otlp.CONTENT_TYPES)}, got {content_type!r}",
                       "unsupported")  # fmt: skip
    try:
        body = await request.read()
        export = otlp.decode_request(body, content_type)
    except web.HTTPRequestEntityTooLarge:
        return failure(413, 8, f"request body larger than {request.app[MAX_BODY]} bytes (after inflating)", "too_large")
    except (otlp.OtlpDecodeError, RequestPayloadError) as exc:
        return failure(400, 3, str(exc), "invalid")
    settings = request.app[SETTINGS]
    policy = await request.app[OTLP_POLICY].current()
    skew = timedelta(seconds=settings.max_future_skew_s)
    result = otlp.usage_from_request(
        export, datetime.now(UTC), skew, policy.attribution, policy.project_teams, settings.ledger_ttl_months
    )
    caller = _caller(request)
    if caller is None:  # revoked since the guard let the request in
        return failure(401, 16, "the token was revoked", "unauthorized")
    events, refused = [], []
    for event in result.events:
        problem = (
            caller.scope_problem(event)
            or caller.org_problem(event, policy.org)
            or caller.owner_problem(event, policy.policy)
        )
        if problem is None:
            events.append(event)
        else:
            trace_id, span_id = event.tags["trace_id"], event.tags["span_id"]
            refused.append(otlp.RejectedSpan(trace_id, span_id, f"{problem[0]}: {problem[1]}", b""))
    failures = await asyncio.to_thread(_publish, request.app[PRODUCER], request.app[CODEC], events) if events else []
    if result.rejected and not failures:
        failures = await asyncio.to_thread(_dead_letter, request.app[PRODUCER], result.rejected)
    if failures:
        API_INGEST_REQUESTS.labels("unacknowledged").inc()
        message = "the broker did not acknowledge every span; retry the export (it is idempotent)"
        return failure(503, 14, message, "unacknowledged")
    API_INGEST_REQUESTS.labels("accepted" if not (refused or result.rejected) else "partial").inc()
    API_INGEST_EVENTS.labels("accepted").inc(len(events))
    API_INGEST_EVENTS.labels("dead_lettered").inc(len(result.rejected))
    late = late_events(events, datetime.now(UTC), timedelta(seconds=settings.processor_allowed_lateness_s))
    warning = (
        f"{len(late)} span(s) older than the allowed lateness (e.g. span {events[late[0]['index']].tags['span_id']}): "
        "recorded in the ledger, not counted in any budget"
        if late
        else ""
    )
    body = otlp.response_body([*result.rejected, *refused], answer_type, warning)
    return web.Response(status=200, body=body, content_type=answer_type)


def _dead_letter(producer: Any, rejected: list[otlp.RejectedSpan]) -> list[str]:
    """Each rejected span on the DLQ with its reason; the ones the broker did not acknowledge."""
    failed: list[str] = []
    for span in rejected:
        producer.produce(
            topics.USAGE_DLQ,
            span.original,
            key=f"{span.trace_id}/{span.span_id}".encode(),
            headers=[
                (topics.DLQ_REASON_HEADER, span.reason.encode()),
                (topics.DLQ_SOURCE_HEADER, b"api POST /v1/traces"),
                (topics.DLQ_STAGE_HEADER, b"otlp"),
            ],
            on_delivery=lambda err, _msg, sid=span.span_id: err is None or failed.append(sid),
        )
        producer.poll(0)
    if producer.flush(15):
        failed.append("unacknowledged dead letters")
    return failed


def unpriceable(events: list[UsageEvent], prices: PriceTable | None) -> list[tuple[int, str]]:
    """(index, why) of the events without ``cost_nanos`` whose model the policy in force neither prices nor lets
    through (``pricing.unknown_model: reject``): refused here, with the reason, rather than accepted with 202 and
    dead-lettered by the processor where only its log would say so."""
    if prices is None:
        return []
    refused = []
    for i, event in enumerate(events):
        if event.cost_nanos is not None:
            continue
        try:
            price_record(event.__dict__, event.occurred_at, prices)
        except UnknownModelError as exc:
            refused.append((i, f"{exc}; the policy rejects unpriced models (pricing.unknown_model: reject): send "
                               "cost_nanos, or add the model to the policy's price overrides"))  # fmt: skip
        except ValueError:  # an overflow and the like: the processor words it
            continue
    return refused


def _publish(producer: Any, codec: AvroCodec, events: list[UsageEvent]) -> list[str]:
    """Produce a batch and wait for every acknowledgement; return the event_ids that failed."""
    failed: list[str] = []
    for event in events:
        eid = str(event.event_id)
        producer.produce(
            topics.USAGE,
            codec.encode(event.to_avro()),
            key=f"{event.org}/{event.team}".encode(),
            on_delivery=lambda err, _msg, eid=eid: err is None or failed.append(eid),
        )
        producer.poll(0)
    remaining = producer.flush(15)
    if remaining:
        failed.append(f"{remaining} event(s) unacknowledged")
    return failed


def _date_param(query: Any, name: str) -> date | None:
    text = query.get(name)
    if not text:
        return None
    try:
        day = date.fromisoformat(text) if name != "month" else date.fromisoformat(text + "-01")
    except ValueError:
        shape = "YYYY-MM" if name == "month" else "YYYY-MM-DD"
        raise BadRequest([{"index": None, "field": name, "message": f"expected {shape}, got {text!r}"}]) from None
    problem = report_day_problem(day, monthly=name == "month")
    if problem is not None:
        raise BadRequest([{"index": None, "field": name, "message": problem}])
    return day


def _int_param(query: Any, name: str) -> int | None:
    text = query.get(name)
    if not text:
        return None
    if not text.isdigit() or not 0 < int(text) <= MAX_REPORT_COUNT:
        raise BadRequest([{"index": None, "field": name, "message": f"expected 1..{MAX_REPORT_COUNT}, got {text!r}"}])
    return int(text)


async def get_report(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    if kind not in REPORTS:
        return _error(404, f"no report {kind!r}; available: {', '.join(REPORTS)}")
    q = request.query
    try:
        options = {
            "month": _date_param(q, "month"),
            "as_of": _date_param(q, "as_of"),
            "start": _date_param(q, "from"),
            "end": _date_param(q, "to"),
            "weeks": _int_param(q, "weeks"),
            "limit": _int_param(q, "limit"),
            "by": q.get("by"),
        }
        timezone = await _report_timezone(request)
        report = await _ledger_call(
            request,
            functools.partial(build_report, timezone=timezone),
            kind, request.app[LEDGER], request.app[SETTINGS], options, datetime.now(UTC),
        )  # fmt: skip
    except BadRequest as exc:
        return _error(400, "bad query parameter", problems=exc.problems)
    except ReportRangeError as exc:
        return _error(400, "bad query parameter", problems=[{"index": None, "field": exc.field, "message": str(exc)}])
    except ValueError as exc:
        return _error(400, str(exc))
    return web.json_response(report.to_json())


async def post_sql(request: web.Request) -> web.Response:
    """``{"query": "SELECT ...", "timeout_s": 30, "max_memory_mb": 4096}``: one read-only statement over the
    ledger (``spendstream sql`` while the running stack holds the embedded ledger), with ``readonly=1`` and at
    most ``SQL_API_TIMEOUT_S`` seconds, since the ledger's other readers wait meanwhile."""
    try:
        body = await request.json()
        query = body["query"]
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query must be a statement")
        timeout = body.get("timeout_s", SQL_API_TIMEOUT_S)
        memory = body.get("max_memory_mb", SQL_API_MAX_MEMORY_MB)
        for name, value, most in (
            ("timeout_s", timeout, SQL_API_TIMEOUT_S),
            ("max_memory_mb", memory, SQL_API_MAX_MEMORY_MB),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= most:
                raise ValueError(f"{name} must be a whole number from 1 to {most}")
    except (KeyError, TypeError, ValueError) as exc:
        return _error(400, f"bad sql request: {type(exc).__name__}: {exc}")
    settings = request.app[SETTINGS]
    try:
        report = await _ledger_call(
            request, sql_report, request.app[LEDGER], settings, query, False, timeout, memory, SQL_API_MAX_ROWS
        )
    except Exception as exc:  # the engine's own message names what is wrong with the statement
        return _error(400, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return web.json_response(report.to_json())


async def get_spend_windows(request: web.Request) -> web.Response:
    """Spend per attribution and time bucket from one ledger snapshot (``core.ledger_spend``): what a processor
    that lost its window state rebuilds them from, when the ledger is embedded in this process."""
    try:
        query = SpendQuery.from_params(request.query)
    except ValueError as exc:
        return _error(400, f"bad query parameter: {exc}")
    db = request.app[SETTINGS].clickhouse_database
    return web.json_response(await _ledger_call(request, query_spend, request.app[LEDGER], db, query))


EXPORT_TYPES = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet"}


def _write_focus(client: Any, db: str, month: date, fmt: str) -> tuple[Any, int]:
    """The export in a temporary file (rewound): the ledger lock is held while it is written, never while a slow
    client downloads it."""
    spool = tempfile.TemporaryFile()  # noqa: SIM115 (handed to the caller, which closes it)
    try:
        if fmt == "csv":
            text = io.TextIOWrapper(spool, encoding="utf-8", newline="")
            rows = export_focus(client, db, month, fmt, text)
            text.flush()
            text.detach()
        else:
            rows = export_focus(client, db, month, fmt, spool)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool, rows


async def get_focus_export(request: web.Request) -> web.StreamResponse:
    """``GET /v1/exports/focus?month=YYYY-MM&format=csv|parquet``: the month's FOCUS 1.2 rows as a file."""
    fmt = request.query.get("format", "csv")
    try:
        month = _date_param(request.query, "month")
        if month is None:
            raise BadRequest([{"index": None, "field": "month", "message": "required, YYYY-MM"}])
        if fmt not in EXPORT_TYPES:
            raise BadRequest([{"index": None, "field": "format", "message": f"expected csv or parquet, got {fmt!r}"}])
    except BadRequest as exc:
        return _error(400, "bad query parameter", problems=exc.problems)
    db = request.app[SETTINGS].clickhouse_database
    spool, rows = await _ledger_call(request, _write_focus, request.app[LEDGER], db, month, fmt)
    with spool:
        response = web.StreamResponse(headers={
            "Content-Type": EXPORT_TYPES[fmt],
            "Content-Disposition": f'attachment; filename="focus-{month:%Y-%m}.{fmt}"',
            "X-Spendstream-Rows": str(rows),
        })  # fmt: skip
        await response.prepare(request)
        while chunk := await asyncio.to_thread(spool.read, 1 << 20):
            await response.write(chunk)
        await response.write_eof()
    return response


async def _ledger_call(request: web.Request, fn: Any, *args: Any) -> Any:
    async with request.app[LEDGER_LOCK]:
        return await asyncio.to_thread(fn, *args)


async def _report_timezone(request: web.Request) -> str:
    """The policy in force's timezone, which reports cut periods in as budgets and the report e-mails are; the
    default policy's (``SPENDSTREAM_TIMEZONE``) before there is one."""
    view = await request.app[OTLP_POLICY].current()
    return report_timezone(view.policy, request.app[SETTINGS])


async def _feature_users(request: web.Request, feature: str) -> dict[str, tuple[int, int]]:
    """Who used ``feature`` recently (``budget_requests.post_feature`` refuses to hold another team's at $0)."""
    settings, now = request.app[SETTINGS], datetime.now(UTC)
    ledger = reports.Ledger(request.app[LEDGER], settings.clickhouse_database, await _report_timezone(request))
    return await _ledger_call(request, reports.feature_users, ledger, feature, now - FEATURE_IN_USE_WITHIN, now)


def dashboard_html(client: Any, settings: Settings, now: datetime, timezone: str) -> str:
    """Everything the page shows, read in one go; periods cut in ``timezone``, the policy in force's."""
    ledger = reports.Ledger(client, settings.clickhouse_database, timezone)
    today = local_date(now, timezone)
    trend_start = now.date() - timedelta(days=TREND_DAYS - 1)
    return render_page(
        now=now,
        trend=reports.spend_trend(ledger, trend_start, now.date()),
        trend_start=trend_start,
        chargeback=reports.chargeback(ledger, today, now),
        forecast=reports.forecast(ledger, now),
        mix=reports.model_mix(ledger, first_of_month(today), today),
        decisions=reports.active_decisions(ledger, now),
        alerts=reports.recent_alerts(ledger, 15),
        policy_version=reports.budgets_policy_version(ledger, today),
        notifications=list_notifications(client, settings.clickhouse_database, 10),
    )


async def get_dashboard(request: web.Request) -> web.Response:
    timezone = await _report_timezone(request)
    html = await _ledger_call(
        request, dashboard_html, request.app[LEDGER], request.app[SETTINGS], datetime.now(UTC), timezone
    )
    return web.Response(text=html, content_type="text/html")


async def get_notifications(request: web.Request) -> web.Response:
    """``GET /v1/notifications?status=&limit=``: newest first, with delivery state (never a secret: none is stored)."""
    status = request.query.get("status") or None
    try:
        limit = _int_param(request.query, "limit") or 50
        rows = await _ledger_call(
            request, list_notifications, request.app[LEDGER], request.app[SETTINGS].clickhouse_database, limit, status
        )  # fmt: skip
    except BadRequest as exc:
        return _error(400, "bad query parameter", problems=exc.problems)
    except ValueError as exc:
        return _error(400, "bad query parameter", problems=[{"index": None, "field": "status", "message": str(exc)}])
    plain = [{k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()} for row in rows]
    return web.json_response({"notifications": plain})


def _verify_audit(client: Any, db: str, anchors: dict[str, Any]) -> dict[str, Any]:
    from spendstream.sink.audit_verify import report, verify_ledger

    code, text = report(verify_ledger(client, db, anchors), len(anchors))
    return {"code": code, "report": text}


async def get_audit_verify(request: web.Request) -> web.Response:
    """``spendstream audit verify`` for a ledger this process owns (anchors read before the ledger)."""
    from spendstream.sink.audit_verify import read_anchors

    settings = request.app[SETTINGS]
    anchors = await asyncio.to_thread(read_anchors, settings.kafka_client_config())
    db = settings.clickhouse_database
    return web.json_response(await _ledger_call(request, _verify_audit, request.app[LEDGER], db, anchors))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def required_role(request: web.Request) -> Role | None:
    """The role an endpoint needs (None: open)."""
    if request.path in PUBLIC_PATHS:
        return None
    if request.path.startswith("/v1/admin/"):
        return "admin"
    if APPROVER_PATHS.match(request.path):
        return "approver"
    if request.path in ("/v1/usage", OTLP_PATH) and request.method not in ("GET", "HEAD"):
        return "ingest"
    return "viewer"


def _caller(request: web.Request) -> ApiToken | None:
    """The token a request presents: ``Authorization: Bearer``, or for a read, the dashboard's cookie."""
    header = request.headers.get("Authorization", "")
    admin = request.app[SETTINGS].admin_token
    if admin is not None and hmac.compare_digest(header.encode(), f"Bearer {admin.get_secret_value()}".encode()):
        return ApiToken(sha256=hash_key(admin.get_secret_value()), name="SPENDSTREAM_ADMIN_TOKEN", role="admin")
    scheme, _, presented = header.partition(" ")
    if scheme != "Bearer":
        presented = request.cookies.get(SESSION_COOKIE, "") if request.method in ("GET", "HEAD") else ""
    return request.app[TOKENS].lookup(presented.strip()) if presented.strip() else None


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


@web.middleware
async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Authentication, roles and JSON-only bodies, before any handler runs."""
    needed = required_role(request)
    if needed is None:
        return await handler(request)
    if request.method == "OPTIONS":
        return _error(405, "no cross-origin requests: this API answers no CORS preflight")
    if request.path == "/" and "token" in request.query:
        return _open_dashboard(request)
    caller = _caller(request)
    missing = request.match_info.http_exception
    if missing is not None and caller is not None:  # a typo, not a missing right: say so to any known token
        verb = "no endpoint" if missing.status == 404 else "method not allowed:"
        return _error(missing.status, f"{verb} {request.method} {request.path} (the API's endpoints: README, API)")
    refused = _refusal(request, needed, caller)
    if refused is None:
        request[CALLER] = caller  # who is asking, for handlers that record it (budget requests)
        unread = await _read_body(request)
        return unread if unread is not None else await handler(request)
    if needed == "ingest":
        API_INGEST_REQUESTS.labels({401: "unauthorized", 403: "forbidden", 415: "unsupported"}[refused.status]).inc()
    if request.path == OTLP_PATH:
        return _as_otlp_status(refused, request.content_type)
    return refused


async def _read_body(request: web.Request) -> web.Response | None:
    """Read an authorized request's body within ``BODY_TIMEOUT_HEADS`` times the header timeout (handlers then read
    it from memory): a client
    sending a byte a second held a connection and its handler for minutes (an attacker session). The answer if it
    did not arrive whole: 408, or 413 past the size limit (in OTLP's format on its path)."""
    if not request.body_exists:
        return None
    limit = BODY_TIMEOUT_HEADS * request.app[SETTINGS].api_header_timeout_s
    try:
        async with asyncio.timeout(limit):
            await request.read()
    except TimeoutError:
        return _error(408, f"the request body did not arrive within {limit:g} s")
    except web.HTTPRequestEntityTooLarge:
        return _unread(request, 413, 8, f"request body larger than {request.app[MAX_BODY]} bytes", "too_large")
    except RequestPayloadError as exc:  # a body its Content-Encoding cannot decode, a broken chunked framing
        return _unread(request, 400, 3, f"the request body cannot be read: {exc}", "invalid")
    return None


def _unread(request: web.Request, status: int, otlp_code: int, message: str, outcome: str) -> web.Response:
    """The answer to a body that could not be read whole, in OTLP's format on its path."""
    if request.path in ("/v1/usage", OTLP_PATH):
        API_INGEST_REQUESTS.labels(outcome).inc()
    if request.path == OTLP_PATH:
        answer_type = request.content_type if request.content_type in otlp.CONTENT_TYPES else otlp.JSON
        return web.Response(
            status=status, body=otlp.status_body(otlp_code, message, answer_type), content_type=answer_type
        )
    return _error(status, message)


def _as_otlp_status(refused: web.Response, content_type: str) -> web.Response:
    """OTLP/HTTP exporters read every 4xx answer as a ``google.rpc.Status`` in the request's encoding."""
    answer_type = content_type if content_type in otlp.CONTENT_TYPES else otlp.JSON
    code = {401: 16, 403: 7}.get(refused.status, 3)  # UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT
    message = json.loads(cast(bytes, refused.body))["error"]
    response = web.Response(status=refused.status, body=otlp.status_body(code, message, answer_type),
                            content_type=answer_type)  # fmt: skip
    if "WWW-Authenticate" in refused.headers:
        response.headers["WWW-Authenticate"] = refused.headers["WWW-Authenticate"]
    return response


def _refusal(request: web.Request, needed: Role, caller: ApiToken | None) -> web.Response | None:
    """Why the caller may not make this request (401, 403, 415), or None."""
    how = f"'Authorization: Bearer <token>' with role {needed}" + ("" if needed == "admin" else " or admin")
    how += f" (`spendstream api token create --role {needed}`)"
    no_admin = request.app[SETTINGS].admin_token is None and not request.app[TOKENS].any_with_role("admin")
    if needed == "admin" and no_admin and (caller is None or caller.role != "admin"):
        return _error(403, "admin endpoints are disabled: set SPENDSTREAM_ADMIN_TOKEN or create an admin token "
                      "(`spendstream api token create --role admin`)")  # fmt: skip
    if caller is None:
        response = _error(401, f"{request.method} {request.path} needs {how}")
        response.headers["WWW-Authenticate"] = 'Bearer realm="spendstream"'
        return response
    if not caller.allows(needed):
        return _error(403, f"token {caller.name!r} has role {caller.role}; {request.method} {request.path} needs {how}")
    if request.method == "POST" and not _is_json(request.content_type) and request.path != OTLP_PATH:
        return _error(415, f"Content-Type must be application/json, got {request.content_type!r}")
    return None


def _open_dashboard(request: web.Request) -> web.StreamResponse:
    """``GET /?token=...``: a viewer token from the printed URL becomes an HttpOnly, same-site cookie and
    the browser is sent to ``/``, so the token leaves the address bar and history."""
    token = request.app[TOKENS].lookup(request.query["token"])
    if token is None:
        return _error(401, "the token in the URL is not a viewer token (`spendstream api token create --role viewer`)")
    if not token.allows("viewer"):
        return _error(403, f"token {token.name!r} has role {token.role}; the dashboard needs viewer (`spendstream api "
                      "token create --role viewer`)")  # fmt: skip
    response = web.Response(status=303, headers={"Location": "/"})
    response.set_cookie(SESSION_COOKIE, request.query["token"], httponly=True, samesite="Strict", path="/")
    return response


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Content-Security-Policy"] = DASHBOARD_CSP if response.content_type == "text/html" else API_CSP
    if request.path not in PUBLIC_PATHS:
        response.headers["Cache-Control"] = "no-store"


async def post_budgets(request: web.Request) -> web.Response:
    """Load a month's budgets: ``{"month": "YYYY-MM", "policy_version": "...", "budgets": [{scope, period,
    limit_usd | limit_nanos}]}``."""
    try:
        body = await request.json()
        month = date.fromisoformat(body["month"] + "-01")
        problem = report_day_problem(month, monthly=True)
        if problem is not None:
            return _error(400, f"bad budgets document: month {problem}")
        lines = []
        for i, b in enumerate(body["budgets"]):
            field = f"budgets[{i}].limit_nanos" if "limit_nanos" in b else f"budgets[{i}].limit_usd"
            limit = b["limit_nanos"] if "limit_nanos" in b else _usd_limit(b["limit_usd"], field)
            if not isinstance(limit, int) or isinstance(limit, bool):
                raise ValueError(f"{field} must be an integer")
            if not 0 <= limit <= INT64_MAX:
                raise ValueError(
                    f"{field} must be between 0 and {INT64_MAX:,} nano-USD (USD {INT64_MAX // NANOS_PER_USD:,})"
                )
            lines.append((str(b["scope"]), str(b.get("period", "month")), limit))
        loaded = await _ledger_call(
            request, load_budgets, request.app[LEDGER], request.app[SETTINGS].clickhouse_database, lines, month,
            str(body.get("policy_version", "")),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        return _error(400, f"bad budgets document: {type(exc).__name__}: {exc}")
    return web.json_response({"loaded": loaded, "month": month.isoformat()})


def _usd_limit(value: Any, field: str) -> int:
    """A USD amount as nanos, refusing what cannot be one (NaN, infinity, beyond Int64)."""
    max_usd = INT64_MAX // NANOS_PER_USD
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{field} must be a number of USD")
    try:
        nanos = nanos_from_usd(value)
    except (ArithmeticError, ValueError) as exc:
        raise ValueError(f"{field} must be a number between 0 and {max_usd:,} USD, got {value!r}") from exc
    if not 0 <= nanos <= INT64_MAX:
        raise ValueError(f"{field} must be between 0 and {max_usd:,} USD, got {value!r}")
    return nanos


async def post_rollup_rebuild(request: web.Request) -> web.Response:
    """Recompute ``spend_daily`` for ``{"from": "YYYY-MM-DD", "to": "YYYY-MM-DD"}`` from the exact ledger."""
    try:
        body = await request.json()
        start, end = date.fromisoformat(body["from"]), date.fromisoformat(body["to"])
    except (KeyError, TypeError, ValueError) as exc:
        return _error(400, f"expected {{'from': 'YYYY-MM-DD', 'to': 'YYYY-MM-DD'}}: {exc}")
    db = request.app[SETTINGS].clickhouse_database
    groups = await _ledger_call(request, rebuild_spend_daily, request.app[LEDGER], db, start, end)
    return web.json_response({"rebuilt_groups": groups, "from": start.isoformat(), "to": end.isoformat()})


def server_options(settings: Settings) -> dict[str, Any]:
    """Options for ``web.run_app`` and ``web.AppRunner``: aiohttp's keep-alive timer runs from a connection's
    opening and from each response, so it also closes a connection whose request head never ends (slowloris)."""
    return {"keepalive_timeout": settings.api_header_timeout_s}


def create_app(
    settings: Settings,
    ledger_client: Any = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_events: int = MAX_BATCH_EVENTS,
) -> web.Application:
    """The aiohttp application; opens (and later closes) its own ledger client unless given one."""
    quiet_client_body_errors()
    app = web.Application(client_max_size=max_body_bytes, middlewares=[guard])
    app[SETTINGS] = settings
    app[READ_TOKEN] = new_read_token()
    app[RECENT_EVENTS] = RecentEvents()
    local_reader = ApiToken(sha256=hash_key(app[READ_TOKEN]), name="local CLI", role="viewer")
    app[TOKENS] = TokenStore(settings.api_tokens_path, extra=[local_reader])
    app.on_response_prepare.append(_security_headers)
    app[MAX_BODY] = max_body_bytes
    app[MAX_EVENTS] = max_events
    app[CODEC] = AvroCodec("usage_event", settings.schema_registry_url)
    app[LEDGER_LOCK] = asyncio.Lock()
    app.router.add_post("/v1/usage", post_usage)
    app.router.add_post(OTLP_PATH, post_traces)
    app[OTLP_POLICY] = OtlpPolicy(settings)
    app.router.add_get("/v1/reports/{kind}", get_report)
    app.router.add_get(SPEND_WINDOWS_PATH, get_spend_windows)

    app.router.add_get("/v1/exports/focus", get_focus_export)
    app.router.add_get("/v1/notifications", get_notifications)
    app.router.add_post("/v1/sql", post_sql)
    app.router.add_post("/v1/admin/budgets", post_budgets)
    app.router.add_post("/v1/admin/rollup/rebuild", post_rollup_rebuild)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/audit/verify", get_audit_verify)
    add_routes(app, settings, _feature_users)
    app.router.add_get("/", get_dashboard)
    instrument_app(app, "api")

    async def resources(app: web.Application) -> Any:
        from confluent_kafka import Producer

        from spendstream.core.ledger_store import connect, migrate

        owned = ledger_client is None
        app[LEDGER] = await asyncio.to_thread(connect, settings) if owned else ledger_client
        await asyncio.to_thread(migrate, app[LEDGER], settings)
        app[PRODUCER] = Producer(
            {**settings.kafka_client_config(), "client.id": f"spendstream-api-{uuid.uuid4().hex[:6]}",
             "acks": "all", "linger.ms": 5}
        )  # fmt: skip
        address = ApiAddress(f"http://{settings.api_host}:{settings.api_port}", os.getpid(), app[READ_TOKEN])
        try:
            write_address(settings.api_address_path, address)
        except OSError as exc:
            log.warning("cannot write %s (the CLI will not find this API): %s", settings.api_address_path, exc)
        yield
        await asyncio.to_thread(app[OTLP_POLICY].stop)
        remove_address(settings.api_address_path, os.getpid())
        await asyncio.to_thread(app[PRODUCER].flush, 10)
        if owned:
            app[LEDGER].close()

    app.cleanup_ctx.append(resources)
    return app

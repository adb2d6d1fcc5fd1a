"""The gateway: an OpenAI/Anthropic-compatible proxy that attributes, enforces, forwards and meters.

Per request: authenticate the virtual key, parse the body once, ask the Enforcer (memory only), forward
over a pooled keep-alive connection (``upstream_client``), and emit exactly one UsageEvent, also for blocked and
failed requests. Prompt and completion text are neither logged nor put in events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple
from zoneinfo import ZoneInfo

from spendstream.core.attribution import MAX_NAME_CHARS, attribution_value_problem
from spendstream.core.config import ConfigError, Settings
from spendstream.core.events import SPEND_REFRESH_S, UsageStatus
from spendstream.core.matching import model_scope_name
from spendstream.core.metrics import HttpLatency, metrics_exposition
from spendstream.core.money_text import usd_text
from spendstream.core.policy import Policy
from spendstream.core.pricing import PriceTable, has_own_price, has_price
from spendstream.core.providers import dialects
from spendstream.edge.call_event import build_event
from spendstream.edge.emitter import Emitter
from spendstream.edge.enforcer import Enforcer
from spendstream.edge.reservation import Refusal, Reservation
from spendstream.edge.verdict import Verdict
from spendstream.gateway.complexity import HEADER as COMPLEXITY_HEADER
from spendstream.gateway.complexity import Assessment, ComplexityHeaderError, assess
from spendstream.gateway.config import GatewayConfig
from spendstream.gateway.cost_estimate import output_tokens_asked, prompt_tokens_asked, request_cost_estimate
from spendstream.gateway.http_server import (
    BodyTooLarge,
    HttpServer,
    MalformedBody,
    Request,
    Response,
    StreamedResponse,
    error_body,
)
from spendstream.gateway.keys import HEADER_FIELDS, KeysFile, KeyStore, VirtualKey
from spendstream.gateway.metering import (
    StreamMeter,
    answered_bytes,
    estimated_body_usage,
    usage_of_body,
    usage_problem,
)
from spendstream.gateway.metrics import GATEWAYS
from spendstream.gateway.provider_stats import EMPTY_STATS, ProviderStats, RoutingStats
from spendstream.gateway.response_cache import (
    CacheConfig,
    CachedResponse,
    ResponseCache,
    StreamRecorder,
    cache_hit_event,
    cache_key,
    make_entry,
    replay,
)
from spendstream.gateway.routing import (
    NoRouteError,
    Route,
    RoutePlan,
    RoutingPolicyView,
    ThresholdsView,
    TokenEstimate,
    pick_route,
    plan_route,
    remaining_bound,
    routing_tags,
    with_requested_cost,
)
from spendstream.gateway.upstream_client import UpstreamResponse
from spendstream.gateway.upstreams import Upstreams, UpstreamUnavailable
from spendstream.gateway.usage_follower import UsageFollower

if TYPE_CHECKING:
    from spendstream.gateway.telemetry import GenAiTelemetry

log = logging.getLogger(__name__)

# Blocking outcomes -> (error code, error type) of the OpenAI-style error body.
_BLOCK_ERRORS = {
    "shutoff": ("budget_exceeded", "insufficient_quota"),
    "throttle": ("rate_limit_exceeded", "rate_limit_error"),
    "deny_model": ("model_not_allowed", "permission_error"),
    "unavailable": ("enforcement_unavailable", "service_unavailable"),
}
# Headers passed on to upstreams (besides content type and the upstream's own auth).
# The Responses API's calls on stored responses and its input token count (``Gateway.stored_response``).
_STORED_RESPONSE = re.compile(r"/v1/responses/(?:(input_tokens)|[A-Za-z0-9_-]+(?:/(cancel|input_items))?)")
_STORED_RESPONSE_METHODS = {"input_tokens": ("POST",), "cancel": ("POST",), "input_items": ("GET",)}
_FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta", "openai-organization", "openai-project", "accept")
_RESPONSE_HEADERS = ("x-request-id", "request-id", "openai-processing-ms", "retry-after", "retry-after-ms")
# Upstream rate-limit headers (x-ratelimit-remaining-tokens, anthropic-ratelimit-requests-reset, ...) are passed on
# too: the OpenAI and Anthropic SDKs pace their retries by them.
_RATE_LIMIT_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
STATS_REFRESH_S = 5.0  # how often routing takes a fresh snapshot of observed latency and error rates
KEYS_POLL_S = 1.0  # how often the keys file is checked for changes: a revoked key is refused within about this
MAX_ANSWERED_AS = 4096  # model names remembered as answered under another model's name
FIRST_ANSWER_WAIT_S = 10.0  # how long the first call of a name without a price holds its other calls back
MAX_ROUTE_PLANS = 4096  # route plans kept between two snapshots (requested model x tier x environment x ...)
METER_BATCH_S = 0.01  # answered requests are metered together, at most this long after their answer


def _is_unicode(text: str) -> bool:
    """False for lone surrogates (JSON ``\\ud800`` escapes, header bytes that are not UTF-8), which the usage
    event could not be encoded with: the request would be served but never metered."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _refuse_non_finite(constant: str) -> float:
    """``json.loads`` accepts NaN and Infinity, which are not JSON: no provider would take them, and the cache key
    (canonical JSON) cannot be built from them."""
    raise ValueError(f"{constant} is not a JSON value")


class RepeatedKey(ValueError):
    """A JSON object names a key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object of the request body, refused if it repeats a key: the gateway reads the last copy (``model``,
    ``max_tokens``, ``n``), and an upstream or a proxy before it may read the first, so a body with two ``model``
    keys passed an allowed-model list and a hard cap's estimate under one name and was served under the other (an
    attacker session)."""
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise RepeatedKey(
                    f"request body names the key {json.dumps(key)[:80]} twice in one object: an upstream may read "
                    "either copy; send each key once"
                )
            seen.add(key)
    return found


# json.loads with parse_constant builds a decoder per call; one is enough.
_BODY_DECODER = json.JSONDecoder(parse_constant=_refuse_non_finite, object_pairs_hook=_unique_keys)


def _header_safe(text: str) -> str:
    """A response header value: printable ASCII only (model names and reasons can come from the request)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:300])


def _is_json_type(content_type: str) -> bool:
    """Only JSON bodies are parsed: a ``text/plain`` or form post is refused, not guessed at (``content_type`` is
    the lower-cased media type, ``application/octet-stream`` when the header is missing)."""
    if content_type == "application/json":
        return True
    return content_type.startswith("application/") and content_type.endswith("+json")


async def _cut_short(out: StreamedResponse, anthropic: bool, message: str) -> None:
    """End a stream that broke so the client can tell: an SSE error event (which the OpenAI and Anthropic SDKs
    raise), then the connection closes without the terminating chunk, so the body is visibly incomplete."""
    if anthropic:
        payload = {"type": "error", "error": {"type": "api_error", "message": message}}
        event = b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
    else:
        payload = {"error": {"message": message, "type": "api_error", "code": "stream_interrupted", "param": None}}
        event = b"data: " + json.dumps(payload).encode() + b"\n\n"
    try:
        if out.prepared:
            await out.write(event)
    except ConnectionError:
        pass  # the client is gone (it may be why the stream broke)
    out.abort()


class _Refusal(NamedTuple):
    """Why a request body is refused, and the status that says so."""

    status: int
    message: str


@dataclass(frozen=True)
class Endpoint:
    name: str  # tag value, e.g. chat.completions
    anthropic: bool = False
    streams: bool = True
    include_usage: bool = False  # OpenAI stream_options.include_usage applies
    routable: bool = True  # cost-aware routing and the response cache apply (not to embeddings)
    kind: str = "openai"  # the provider kind whose dialect reads its responses


# The paths the provider dialects serve (spendstream.core.providers), by the kinds the gateway proxies.
ENDPOINTS = {
    spec.path: Endpoint(
        spec.name, dialect.kind == "anthropic", spec.streams, spec.include_usage, spec.routable, dialect.kind
    )
    for dialect in dialects()
    if dialect.kind in ("openai", "anthropic")
    for spec in dialect.endpoints
}


@dataclass(slots=True)
class _Call:
    """One request as it is served: who made it, what it asked for, and what was decided (for its usage event)."""

    started: float  # perf_counter at arrival: the event's latency
    endpoint: Endpoint
    attribution: dict[str, str]
    model: str  # as requested
    provider: str  # the provider that serves it (the routed one once routing chose)
    tags: dict[str, str]
    verdict: Verdict | None = None
    route: Route | None = None  # set when routing chose another model or provider than the one requested
    reservation: Reservation | None = None  # its estimated cost, held until its real cost settles it
    body: dict[str, Any] | None = None  # the request as sent: its prompt is estimated if the answer has no usage
    body_bytes: int = 0  # its size as sent

    def prompt_tokens(self) -> int:
        """The most input tokens the request can be billed for, as its reservation holds them (bytes, images,
        documents): for an answer that did not say (a prompt of token ids or a long tool description is far more
        tokens than its words)."""
        assert self.verdict is not None
        return prompt_tokens_asked(self.provider, self.verdict.model, self.body or {}, self.body_bytes)[0]

    def output_tokens_asked(self) -> int:
        """The most output tokens the request let the provider bill (an estimate never passes it)."""
        return output_tokens_asked(self.body or {})

    def model_headers(self) -> dict[str, str]:
        """What happened to the requested model, named for what it was: a routing rewrite (why, and the estimated
        saving) and a budget fallback (the Enforcer replaced the model it was asked about) are told apart."""
        assert self.verdict is not None
        headers: dict[str, str] = {}
        route = self.route
        if route is not None:
            headers["X-Spendstream-Routed-From"] = _header_safe(self.model)
            headers["X-Spendstream-Route-Reason"] = _header_safe(route.reason)
            if route.requested_cost_estimate_nanos is not None and route.routed_cost_estimate_nanos is not None:
                saving = route.requested_cost_estimate_nanos - route.routed_cost_estimate_nanos
                headers["X-Spendstream-Route-Saving-Nanos"] = str(saving)
        asked = route.model if route is not None else self.model
        if self.verdict.model != asked:
            headers["X-Spendstream-Fallback-From"] = _header_safe(asked)
        if self.verdict.model != self.model:
            headers["X-Spendstream-Model"] = _header_safe(self.verdict.model)
        return headers


@dataclass(frozen=True, slots=True)
class _Answer:
    """A successful JSON answer as sent: its usage block is read, and with a ``cache_key`` it is cached, after the
    client has it."""

    body: bytes
    content_type: str
    cache_key: str | None


def fill_from_policy(attribution: dict[str, str], policy: Policy) -> str | None:
    """The org and division a request does not name, from the policy: its team's division and org, else the
    policy's org, as the processor counts the request, so the ledger's rows and ``report top --by org`` say so too.

    Returns why the request is refused when it names another division or org than the policy gives its team (or
    another org than the policy's): an event's own division and org are counted instead of its team's, so a
    caller could step out of its division's or org's hard cap, and charge another department, by naming one; or
    a feature or a project the policy gives other teams (``Policy.owner_problem``)."""
    team = attribution.get("team")
    for parent in policy.ancestors.get(f"team:{team}", ()) if team else ():
        dimension, _, value = parent.partition(":")
        if dimension not in ("division", "org"):
            continue
        named = attribution.get(dimension)
        if not named:
            attribution[dimension] = value
        elif named != value:
            return f"team {team!r} is in {dimension} {value!r} by the policy; a request cannot name {named!r}"
    org = attribution.get("org")
    if policy.org and org and org != policy.org:
        return f"the policy's org is {policy.org!r}; a request cannot name {org!r}"
    if not org and policy.org:
        attribution["org"] = policy.org
    owned = policy.owner_problem(team or "", attribution.get("feature", ""), attribution.get("project", ""))
    return None if owned is None else owned[1]


def refusal_verdict(refusal: Refusal, model: str) -> Verdict:
    """What a client is told when this gateway's reservations refuse its request. Requests in flight holding what
    remains: 429 (SDKs retry it), a second from now, when they settle. What this gateway settled since the last
    decision: 402, retry after the processor's next decision, which confirms it (a shutoff, with the period's end)
    or lifts it; never the period's end on this gateway's word alone. The message gives the processor's figure
    and this gateway's count apart: the count may include requests the decision had counted already."""
    limit = usd_text(refusal.limit_nanos)
    if refusal.starting:
        reason = (
            f"the spend of this hard cap of {limit} is not known yet: no spend processor has reported since this "
            "gateway started (it reports once its budgets are restored); retry in a few seconds"
        )
        return Verdict("unavailable", model, SPEND_REFRESH_S, reason, refusal.scope)
    if refusal.decided_nanos is None:
        standing = f"no spend reported by the processor yet for this hard cap of {limit}"
    else:
        standing = f"the last decision: {usd_text(refusal.decided_nanos)} of {limit} spent"
    counted = (
        f"this gateway counted {usd_text(refusal.settled_nanos)} of its requests from half a second before that "
        "decision on (some may be in that spend already)"
    )
    if refusal.larger_nanos:
        part = (
            f"more than this gateway worker's part ({refusal.share}: the workers share what remains) of what remains"
            if refusal.share != 1
            else "more than remains"
        )
        reason = (
            f"this request may cost up to {usd_text(refusal.larger_nanos)} (its max_tokens, or 32,768 output tokens "
            "without one, for each of its n completions, and the most its images, documents and web searches may "
            f"cost), {part} of this hard cap of {limit} "
            f"({standing}; {counted} and holds {usd_text(refusal.held_nanos)} for requests in flight): set "
            "max_tokens (or n) lower"
        )
        return Verdict("shutoff", model, SPEND_REFRESH_S, reason, refusal.scope)
    if refusal.throttle_rps is not None:
        reason = (
            f"critical feature throttled to {refusal.throttle_rps:g} requests/s: this gateway's requests used its part "
            f"of what remained of the budget ({standing})"
        )
        return Verdict("throttle", model, refusal.retry_after_s, reason, refusal.scope)
    if refusal.in_flight:
        reason = (
            f"requests in flight at this gateway hold what remains of the budget ({standing}; {counted} and holds "
            f"{usd_text(refusal.held_nanos)} for requests in flight); retry in a second"
        )
        return Verdict("throttle", model, 1.0, reason, refusal.scope)
    reason = (
        f"this gateway's requests used its part of what remained of the budget ({standing}; {counted}); "
        "the processor confirms this with its shutoff or lifts it within seconds"
    )
    return Verdict("shutoff", model, SPEND_REFRESH_S, reason, refusal.scope)


def error_response(
    status: int,
    message: str,
    code: str,
    kind: str,
    *,
    anthropic: bool = False,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """An OpenAI-style error (``http_server.error_body``) as a response."""
    body = error_body(code, message, kind, anthropic=anthropic)
    return Response(status, body, {**(headers or {}), "Content-Type": "application/json"})


def json_response(body: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status, json.dumps(body).encode(), {**(headers or {}), "Content-Type": "application/json"})


def _refine_attribution(attribution: dict[str, str], headers: Mapping[str, str]) -> tuple[int, str] | None:
    """Fill the fields a key leaves open from its caller's ``X-Spendstream-*`` headers, or (status, why) refused.

    A header refines a key, it never overrides it: a field the key fixes (its team, say) can be repeated but not
    changed (403), or a key pinned to a team could charge another team or step out of its team's hard cap. A value
    must be one that a policy scope can name (not ``*``, no surrounding spaces, at most ``MAX_NAME_CHARS``), and
    given once (two ``X-Spendstream-Team`` headers name no one team)."""
    repeated = getattr(headers, "repeated", "")
    if repeated:
        return 400, f"header {repeated} is given more than once: give it once"
    for header, field in HEADER_FIELDS.items():
        value = headers.get(header)
        if not value:
            continue
        if not _is_unicode(value):
            return 400, f"header {header} is not valid UTF-8"
        fixed = attribution.get(field)
        if fixed and value != fixed:
            return 403, f"this key is bound to {field} {fixed!r}; header {header} cannot change it"
        problem = attribution_value_problem(field, value)
        if problem:
            return 400, f"header {header}: {problem}"
        attribution[field] = value
    return None


_ATTRIBUTION_HEADERS = frozenset(header.lower() for header in HEADER_FIELDS)


def _ignored_attribution(attribution: Mapping[str, str], headers: Mapping[str, str]) -> str | None:
    """Why a request whose key takes no attribution headers is refused for sending one, or None: a header that
    only repeats what the key sets changes nothing, any other would be ignored, and the call charged to what the
    key says instead of what its caller meant (an attacker session: ``X-Spendstream-Team: sales`` was served and
    charged to no team)."""
    repeated = getattr(headers, "repeated", "")
    if repeated:  # the first copy may repeat the key's value and the next name another team
        return f"header {repeated} is given more than once: give it once"
    for header, field in HEADER_FIELDS.items():
        value = headers.get(header)
        if value and value != attribution.get(field):
            return (
                f"this key takes no attribution headers, so {header} would be ignored and the call charged as the "
                "key says: drop the header, or use a key minted with `spendstream gateway keygen "
                "--allow-header-attribution`"
            )
    return None


class Gateway:
    """The gateway's HTTP server, its handlers and what they share across requests."""

    def __init__(
        self,
        config: GatewayConfig,
        settings: Settings,
        *,
        keys: KeyStore | None = None,
        enforcer: Enforcer | None = None,
        emitter: Emitter | None = None,
        routing: RoutingPolicyView | None = None,
        thresholds: ThresholdsView | None = None,
        timezone: str = "UTC",
        cache: CacheConfig | None = None,
        clock: Callable[[], datetime] | None = None,
        prices: PriceTable | None = None,
        hierarchy: Mapping[str, str] | None = None,
        policy: Policy | None = None,
        budget_share: Fraction = Fraction(1),
        meter_batch_s: float = METER_BATCH_S,
    ) -> None:
        self.config = config
        self.meter_batch_s = meter_batch_s  # 0: each request metered as soon as it is answered
        self.budget_share = budget_share  # of each scope's remaining budget this process may reserve
        # None: real time. A clock (aware datetimes) stamps events and judges decision expiry instead, so the
        # demo can replay a past day through a real gateway.
        self.clock = clock
        self.settings = settings
        # Keys from a file are reloaded when it changes (and on SIGHUP, see ``reload_keys``).
        self.keys_file = KeysFile(config.keys_file, config.keys) if keys is None and config.keys_file else None
        if keys is None:
            keys = self.keys_file.load() if self.keys_file is not None else KeyStore(config.keys)
        self.keys = keys
        self._keys_watch: asyncio.Task[None] | None = None
        self.enforcer = enforcer
        self.emitter = emitter
        self._owns_enforcer = enforcer is None
        self._owns_emitter = emitter is None
        # With a policy the gateway prices and resolves scopes exactly as the processor and the sink do.
        self.prices = prices if prices is not None else config.pricing.table()
        self.hierarchy = dict(hierarchy) if hierarchy is not None else config.hierarchy
        self.policy = policy  # its allowed models and request quotas hold until the Enforcer reads the policy topic
        self.upstreams = Upstreams(config)
        self.counts: Counter[str] = Counter()
        # Cost-aware routing (the policy's routing section and default thresholds) and the opt-in response cache.
        self.routing = routing
        self.thresholds = thresholds
        self.tz = ZoneInfo(timezone)
        self.cache_config = cache or config.cache
        self.cache = ResponseCache.from_config(self.cache_config)
        self.provider_stats = ProviderStats()
        self.follower: UsageFollower | None = None  # with routing: every gateway's calls, from the usage topic
        self._stats: RoutingStats = EMPTY_STATS
        self._stats_at = -math.inf
        self._plans: dict[tuple[object, ...], RoutePlan] = {}
        self._kinds = {
            kind: frozenset(name for name, p in config.providers.items() if p.kind == kind)
            for kind in ("openai", "anthropic")
        }
        self.telemetry: GenAiTelemetry | None = None  # GenAI spans and metrics, only with an OTLP endpoint
        self._http: HttpServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unmetered: list[tuple[Any, ...]] = []  # answered requests whose events are built in the next batch
        # (provider, model sent) -> the model its upstream answered as, where that is another model's scope: a name
        # such as an Azure deployment's (``prod-deployment``) answered as ``gpt-4o-2024-08-06`` is held to the
        # decisions and hard caps of ``model:gpt-4o``, where the processor counts its spend (``served_model``).
        self._answered_as: dict[tuple[str, str], str] = {}
        # Names without a price of their own, by (provider, scope name): those answered as themselves, and those whose
        # first call is in flight (since when): until its answer says which model such a name is, one call at a time.
        self._names_answered_as_such: set[tuple[str, str]] = set()
        self._first_calls: dict[tuple[str, str], float] = {}
        self._listed: dict[tuple[str, str, int], bool] = {}
        self.decisions: Counter[str] = Counter()  # verdicts applied, by action (read at scrape time)
        GATEWAYS.track(self)  # request counts and upstream failures, read at scrape time

    # -- lifecycle -------------------------------------------------------------------------------
    def server(self) -> HttpServer:
        """The HTTP server of the gateway's routes. A connection must deliver a whole request head within
        ``header_timeout_s`` of its opening and of each response (slow headers, slowloris), and is closed if it
        does not."""
        routes = {("POST", path): self.proxy for path in ENDPOINTS}
        routes[("GET", "/v1/models")] = self.models
        routes[("POST", "/v1/messages/count_tokens")] = self.count_tokens
        routes[("GET", "/healthz")] = self.health
        routes[("GET", "/metrics")] = self.metrics
        latency = HttpLatency("gateway")
        server = HttpServer(
            routes,
            head_timeout_s=self.config.header_timeout_s,
            max_body_bytes=self.config.max_body_bytes,
            not_found=self.not_found,
            observe=lambda route, status, seconds: route != "/metrics" and latency.observe(route, status, seconds),
        )
        self._http = server
        return server

    async def start(self) -> None:
        """Start what serves requests: the Enforcer, the Emitter, routing's follower, the keys-file watch."""
        self._loop = asyncio.get_running_loop()  # (asking for it per request costs a getpid() system call)
        if self.enforcer is None:
            self.enforcer = Enforcer(
                settings=self.settings,
                fail_closed=self.config.fail_closed,
                max_staleness_s=self.config.max_staleness_s,
                hierarchy=self.hierarchy if self.policy is None and self.hierarchy else None,  # else the policy's
                clock=self.clock,
                policy=self.policy,
                budget_share=self.budget_share,
            ).start()
        if self.emitter is None:
            self.emitter = await asyncio.to_thread(Emitter, settings=self.settings)
        if self.settings.otel_exporter_otlp_endpoint and self.telemetry is None:
            from spendstream.gateway.telemetry import GenAiTelemetry  # no SDK import without an endpoint

            self.telemetry = GenAiTelemetry(self.settings.otel_exporter_otlp_endpoint)
        if self.routing is not None:
            self._start_follower()
        if self.keys_file is not None:
            self._keys_watch = asyncio.create_task(self._watch_keys_file())

    def _start_follower(self) -> None:
        """Routing learns from every gateway's calls on the usage topic; this gateway's own calls are observed as
        they are metered (``_meter``), so the follower skips the records its Emitter produced."""
        own = getattr(self.emitter, "origin", None)  # an Emitter's id; a stand-in emitter (tests) may have none
        self.follower = UsageFollower(self.settings, timezone=self.tz, own_origin=own).start()
        self.provider_stats = self.follower.stats

    def _follow_policy_in_force(self) -> None:
        """The gateway routes and prices by the policy in force, as its Enforcer reads it from ``spendstream.policy``
        (whether or not it was started with a policy file): a `spendstream policy apply` changes routing,
        thresholds, timezone and prices too."""
        if self.enforcer is None:
            return
        policy = self.enforcer.policy
        if (
            policy is None
            or policy is self.policy
            or (self.policy is not None and policy.version == self.policy.version)
        ):
            return
        self.policy = policy
        self.routing, self.thresholds, self.tz = policy.routing, policy.thresholds, ZoneInfo(policy.timezone)
        self.prices = policy.price_table
        self._plans.clear()
        if self.routing is not None and self.follower is None:
            self._start_follower()
        log.info("gateway routes and prices by policy %s %s", policy.name, policy.version)

    async def _watch_keys_file(self) -> None:
        """Reload the keys file when it changes; nothing it holds may stop the watch (a byte that was not UTF-8 did,
        and revoked keys kept working until a restart: an attacker session)."""
        assert self.keys_file is not None
        while True:
            await asyncio.sleep(KEYS_POLL_S)
            try:
                if self.keys_file.changed():
                    self.reload_keys()
            except Exception:
                log.exception("keys file %s: cannot reload it; will try again at its next change", self.keys_file.path)

    def reload_keys(self) -> None:
        """Read the keys file again; a file that cannot be parsed leaves in force the keys it still lists (a key
        deleted in the same edit as a bad entry is revoked), and a deleted file revokes its keys (deleting it must
        not leave them working until the next restart)."""
        if self.keys_file is None:
            return
        if not self.keys_file.path.exists():
            self.keys = self.keys_file.load(missing_ok=True)
            log.warning("keys file %s deleted: its keys are revoked (%d inline keys remain)",
                        self.keys_file.path, len(self.keys))  # fmt: skip
            return
        try:
            self.keys = self.keys_file.load()
        except ConfigError as exc:
            before, self.keys = len(self.keys), self.keys_file.still_listed(self.keys)
            log.error("%s; of the %d keys loaded before, the %d the file still lists stay in force (the others are "
                      "revoked)", exc, before, len(self.keys))  # fmt: skip
            return
        log.info("keys file %s reloaded: %d virtual keys", self.keys_file.path, len(self.keys))

    async def stop(self) -> None:
        """Stop them, flushing the Emitter (after the server stopped taking requests)."""
        self._meter_pending()
        if self._keys_watch is not None:
            self._keys_watch.cancel()
        self.upstreams.close()
        if self._owns_enforcer and self.enforcer is not None:
            await asyncio.to_thread(self.enforcer.stop)
        if self._owns_emitter and self.emitter is not None:
            await asyncio.to_thread(self.emitter.close, 10.0)
        if self.follower is not None:
            await asyncio.to_thread(self.follower.stop)
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.shutdown)
        GATEWAYS.retire(self)

    # -- handlers --------------------------------------------------------------------------------
    def _authenticate(self, request: Request) -> VirtualKey | None:
        presented = request.headers.get("Authorization", "")
        if presented[:7].lower() == "bearer ":
            presented = presented[7:].strip()
        else:
            presented = request.headers.get("x-api-key") or request.headers.get("api-key") or ""
        if not presented or not _is_unicode(presented):  # (bytes that are not UTF-8 are no key of ours)
            return None
        return self.keys.lookup(presented)

    async def health(self, request: Request) -> Response:
        enforcer, emitter = self.enforcer, self.emitter
        staleness = enforcer.staleness_s if enforcer is not None else math.inf
        body = {
            "enforcer_ready": bool(enforcer and enforcer.ready),
            "enforcer_staleness_s": None if math.isinf(staleness) else round(staleness, 3),
            "emitter": emitter.stats.__dict__ if emitter is not None else None,
            "upstream_failures": dict(self.upstreams.failures),
            "upstream_failovers": self.upstreams.failovers,
            "requests": dict(self.counts),
            "pid": os.getpid(),  # with several gateway workers on the port: which one answered
        }
        return json_response(body)

    async def metrics(self, request: Request) -> Response:
        body, content_type = metrics_exposition(request.headers.get("Accept", ""))
        return Response(200, body, {"Content-Type": content_type})

    async def not_found(self, request: Request) -> Response:
        assert self._http is not None
        stored = _STORED_RESPONSE.fullmatch(request.path)
        if stored is not None:
            return await self.stored_response(request, stored.group(1) or stored.group(2))
        methods = self._http.methods_of(request.path)
        if methods:
            message = f"{request.method} is not served on {request.path} (use {', '.join(methods)})"
            return error_response(405, message, "method_not_allowed", "invalid_request_error",
                                  headers={"Allow": ", ".join(methods)})  # fmt: skip
        return error_response(404, f"no such endpoint: {request.path}", "not_found", "invalid_request_error")

    async def models(self, request: Request) -> Response:
        return await self._pass_through(request, "model_list", anthropic=False, with_body=False)

    async def stored_response(self, request: Request, action: str | None) -> Response:
        """The Responses API's calls on responses already made (retrieve, delete, cancel, list input items) and its
        input token count (``action``: ``input_tokens``, ``cancel``, ``input_items`` or None for the response
        itself)."""
        allowed = _STORED_RESPONSE_METHODS.get(action or "", ("GET", "DELETE"))
        if request.method not in allowed:
            message = f"{request.method} is not served on {request.path} (use {', '.join(allowed)})"
            return error_response(405, message, "method_not_allowed", "invalid_request_error",
                                  headers={"Allow": ", ".join(allowed)})  # fmt: skip
        with_body = action == "input_tokens"  # a cancel is a POST without a body
        return await self._pass_through(request, "stored_response", anthropic=False, with_body=with_body)

    async def count_tokens(self, request: Request) -> Response:
        """Anthropic's token counting."""
        return await self._pass_through(request, "token_count", anthropic=True, with_body=True)

    async def _pass_through(self, request: Request, outcome: str, *, anthropic: bool, with_body: bool) -> Response:
        """A call that costs nothing (a model list, a token count, a stored response), passed through to the
        provider as it came (query included): neither metered nor held to budgets, but it takes a virtual key like
        every call, and is counted by ``outcome``. With a body, the body's model picks the provider."""
        key = self._authorized(request, anthropic)
        if isinstance(key, Response):
            return key
        provider = self.config.anthropic_provider if anthropic else self.config.openai_provider
        payload: bytes | None = None
        headers: dict[str, str] = {}
        if with_body:
            read = await self._json_body(request, anthropic)
            if isinstance(read, Response):
                return read
            body, payload = read
            provider, headers = self.config.provider_for(body["model"], anthropic), {"Content-Type": "application/json"}
        if anthropic:
            headers["anthropic-version"] = self.config.anthropic_version
        for name in _FORWARDED_HEADERS:
            value = request.headers.get(name)
            if value:
                headers[name] = value
        target = request.path + (f"?{request.query}" if request.query else "")
        try:
            response, _ = await self.upstreams.send(provider, request.method, target, payload, headers)
            async with response:
                data = await response.read()
        except UpstreamUnavailable as exc:
            self.counts["upstream_unavailable"] += 1
            message = f"no upstream answered: {exc}"
            return error_response(502, message, "upstream_unavailable", "api_error", anthropic=anthropic)
        except (TimeoutError, ConnectionError) as exc:
            self.counts["upstream_unavailable"] += 1
            message = f"upstream failed mid-response: {type(exc).__name__}"
            return error_response(502, message, "upstream_error", "api_error", anthropic=anthropic)
        self.counts[outcome] += 1
        content_type = response.headers.get("content-type", "application/json")
        return Response(response.status, data, {"Content-Type": content_type})

    async def proxy(self, request: Request) -> Response | StreamedResponse:
        """One proxied call; an unexpected failure answers 500 and is logged by type only (no request text)."""
        try:
            return await self._proxy(request)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            self.counts["internal_error"] += 1
            log.error(
                "gateway error on %s: %s", request.path, type(exc).__name__, exc_info=log.isEnabledFor(logging.DEBUG)
            )
            return error_response(500, "internal gateway error", "internal_error", "api_error")

    async def _proxy(self, request: Request) -> Response | StreamedResponse:
        started = time.perf_counter()
        endpoint = ENDPOINTS[request.path]
        anthropic = endpoint.anthropic
        key = self._authorized(request, anthropic)
        if isinstance(key, Response):
            return key
        read = await self._json_body(request, anthropic)
        if isinstance(read, Response):
            return read
        body, raw = read
        if endpoint.name == "responses" and body.get("background") is True:
            self.counts["bad_request"] += 1
            message = (
                "background responses are not served through the gateway: their usage arrives only when the response "
                "is retrieved later, so it could be neither metered nor held to a budget; send it without background"
            )
            return error_response(400, message, "unsupported_parameter", "invalid_request_error")
        self._follow_policy_in_force()
        model = body["model"]
        attribution = key.as_dict()
        if key.allow_header_attribution:
            refused = _refine_attribution(attribution, request.headers)
            if refused is not None:
                status, message = refused
                self.counts["bad_request" if status == 400 else "forbidden_attribution"] += 1
                kind = "invalid_request_error" if status == 400 else "permission_error"
                return error_response(status, message, "invalid_attribution", kind, anthropic=anthropic)
        elif not _ATTRIBUTION_HEADERS.isdisjoint(request.headers) and (
            ignored := _ignored_attribution(attribution, request.headers)
        ):
            self.counts["bad_request"] += 1
            return error_response(400, ignored, "invalid_attribution", "invalid_request_error", anthropic=anthropic)
        # the policy in force places the call, whether or not this gateway was started with a policy file
        in_force = self.policy or (self.enforcer.policy if self.enforcer is not None else None)
        if in_force is not None and (misplaced := fill_from_policy(attribution, in_force)):
            self.counts["forbidden_attribution"] += 1
            return error_response(403, misplaced, "invalid_attribution", "permission_error", anthropic=anthropic)
        provider = self.config.provider_for(model, anthropic)
        tags = {**key.tags, "endpoint": endpoint.name}
        if key.name:
            tags["key"] = key.name
        call = _Call(started, endpoint, attribution, model, provider, tags)
        route: Route | None = None
        assessment: Assessment | None = None
        if self.routing is not None and endpoint.routable:
            costs: dict[tuple[str, str], int | None] = {}  # estimated costs priced for this request
            try:
                assessment = assess(body, request.headers.get(COMPLEXITY_HEADER))
                route = self._route(model, provider, assessment, attribution, None, endpoint, costs)
            except ComplexityHeaderError as exc:
                self.counts["bad_request"] += 1
                return error_response(400, str(exc), "invalid_request", "invalid_request_error", anthropic=anthropic)
            except NoRouteError as exc:
                self.counts["no_route"] += 1
                return error_response(403, str(exc), "model_not_allowed", "permission_error", anthropic=anthropic)
            tags["complexity"] = assessment.tier.value
        assert self.enforcer is not None
        verdict = call.verdict = self.enforcer.check(model=route.model if route else model, **attribution)
        sent = route.model if route else model
        answered_as = self._answered_as.get((route.provider if route else provider, model_scope_name(sent)))
        if answered_as is not None and not verdict.blocked:
            # the decisions of the model it is answered as: a blocking one holds (a fallback to another name does not
            # apply to this name, which the upstream alone resolves)
            served_verdict = self.enforcer.check(model=answered_as, **attribution)
            if served_verdict.blocked:
                verdict = call.verdict = Verdict(served_verdict.action, verdict.model, *served_verdict[2:])
        if answered_as is None and not verdict.blocked:
            verdict = call.verdict = self._first_call_of(route.provider if route else provider, sent, verdict)
        if verdict.blocked:
            self.counts[verdict.action] += 1
            if route is not None:
                call.provider = route.provider
            self._emit(call, route.model if route else model, None, UsageStatus.blocked)
            return self._blocked(verdict, anthropic)
        if route is not None and assessment is not None:
            # An alert (or fallback) outcome bounds the remaining budget: route again with that bound, unless the
            # Enforcer's fallback map already replaced the model.
            bound = remaining_bound(verdict.action, self.thresholds) if self.thresholds is not None else None
            if bound is not None and verdict.model == route.model:
                route = self._route(model, provider, assessment, attribution, bound, endpoint, costs)
                verdict = call.verdict = Verdict(verdict.action, route.model, *verdict[2:])
            tags.update(routing_tags(route, provider, model))
            call.provider = route.provider
            if (route.provider, route.model) != (provider, model):
                call.route = route
        served = verdict.model
        if self.prices.unknown_model == "reject" and not has_price(call.provider, served, self.prices):
            self.counts["model_not_priced"] += 1
            message = (
                f"model {served!r} of provider {call.provider!r} has no price, and the policy rejects unpriced models "
                "(pricing.unknown_model: reject): its calls could be neither metered nor held to a budget; use a "
                "priced model, or give it a price in the policy's pricing.overrides"
            )
            return error_response(400, message, "model_not_priced", "invalid_request_error", anthropic=anthropic)
        scopes = {**attribution, "model": self._answered_as.get((call.provider, model_scope_name(served)), served)}
        held = self.enforcer.reserve(lambda: self._estimate(call.provider, served, body, raw), **scopes)
        if isinstance(held, Refusal) and self._unmetered:
            # Requests answered but not yet metered still hold their estimates: settle them with their real
            # costs, then ask again, so batching never refuses what metering each at once would have served.
            self._meter_pending()
            held = self.enforcer.reserve(lambda: self._estimate(call.provider, served, body, raw), **scopes)
        if isinstance(held, Refusal):
            verdict = call.verdict = refusal_verdict(held, served)
            self.counts[verdict.action] += 1
            self._emit(call, served, None, UsageStatus.blocked)
            return self._blocked(verdict, anthropic)
        call.reservation = held
        key_ = self._cache_key(body, endpoint, attribution, verdict.model)
        if key_ is not None:
            hit = self.cache.get(key_)
            if hit is not None:
                return await self._from_cache(request, call, hit)
        return await self._forward(request, call, body, raw, key_)

    def _route(
        self,
        model: str,
        provider: str,
        assessment: Assessment,
        attribution: Mapping[str, str],
        remaining: float | None,
        endpoint: Endpoint,
        costs: dict[tuple[str, str], int | None],
    ) -> Route:
        """``choose_route`` in two steps: the plan (eligibility, tiers, reasons; the same for every request with
        these inputs until the stats snapshot or the minute of the price table changes) is reused, and only the
        pricing and scoring of this request's token estimate run per request."""
        assert self.routing is not None
        now = time.time()
        if now - self._stats_at >= STATS_REFRESH_S:
            today = datetime.now(self.tz) if self.clock is None else self.clock().astimezone(self.tz)
            month_start = today.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            if self.provider_stats.period_start != month_start:
                self.provider_stats.reset_spend(month_start)
            self._stats, self._stats_at = self.provider_stats.snapshot(now), now
            self._plans.clear()
        environment = attribution.get("environment", "")
        key = (model, provider, assessment.tier, environment, remaining, endpoint.anthropic, int(now // 60))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= MAX_ROUTE_PLANS:
                self._plans.clear()
            plan = self._plans[key] = plan_route(
                model,
                assessment.tier,
                environment,
                remaining,
                self.routing,
                self._stats,
                requested_provider=provider,
                prices=self.prices,
                compatible_providers=self._kinds["anthropic" if endpoint.anthropic else "openai"],
            )
        output = assessment.output_tokens or self.routing.default_output_tokens
        return pick_route(
            plan,
            self.routing,
            estimate=TokenEstimate(assessment.input_tokens, output),
            prices=self.prices,
            priced=costs,
        )

    def _estimate(self, provider: str, model: str, body: dict[str, Any], raw: bytes) -> int:
        return request_cost_estimate(provider, model, body, raw, self.prices)

    def _cache_key(
        self, body: dict[str, Any], endpoint: Endpoint, attribution: Mapping[str, str], model: str
    ) -> str | None:
        """The cache key of a request whose scope opted in (computed on the body as it will be sent)."""
        if not endpoint.routable:
            return None
        partition = self.cache_config.partition(attribution)
        if partition is None or not self.cache_config.cacheable(body):
            return None
        return cache_key(body, endpoint.name, partition, model)

    async def _from_cache(self, request: Request, call: _Call, entry: CachedResponse) -> Response | StreamedResponse:
        """Answer from the cache: replay the stored stream or body; the usage event is free and says what it saved."""
        verdict = call.verdict
        assert verdict is not None
        self.counts["cache_hit"] += 1
        headers = {"X-Spendstream-Decision": verdict.action, "X-Spendstream-Cache": "hit", **call.model_headers()}
        out: Response | StreamedResponse
        if entry.streamed:
            out = request.stream(200, {**headers, "Content-Type": entry.content_type, "Cache-Control": "no-cache"})
            await out.prepare()
            for event in replay(entry):
                await out.write(event)
            await out.write_eof()
        else:
            out = Response(entry.status, entry.body, {**headers, "Content-Type": entry.content_type})
        self._emit(call, entry.model_served, None, UsageStatus.ok, hit=entry)
        return out

    def _authorized(self, request: Request, anthropic: bool) -> VirtualKey | Response:
        """The request's virtual key, or the 401 that refuses it (counted)."""
        key = self._authenticate(request)
        if key is None:
            self.counts["unauthorized"] += 1
            return error_response(
                401, "invalid or missing API key", "invalid_api_key", "authentication_error", anthropic=anthropic
            )
        return key

    async def _json_body(self, request: Request, anthropic: bool) -> tuple[dict[str, Any], bytes] | Response:
        """(body, raw bytes), or the answer that refuses the body (counted as a bad request)."""
        body, raw, refusal = await self._read_json(request)
        if refusal is not None:
            self.counts["bad_request"] += 1
            return error_response(
                refusal.status, refusal.message, "invalid_request", "invalid_request_error", anthropic=anthropic
            )
        assert body is not None
        return body, raw

    async def _read_json(self, request: Request) -> tuple[dict[str, Any] | None, bytes, _Refusal | None]:
        """(body, raw bytes, None) or (None, b"", why the request is refused)."""
        if not _is_json_type(request.content_type):
            return None, b"", _Refusal(415, f"Content-Type must be application/json, got {request.content_type!r}")
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return (
                None,
                b"",
                _Refusal(413, f"request body of {request.content_length} bytes exceeds the limit of {limit} bytes"),
            )
        try:
            raw = await request.read(limit, self.config.body_timeout_s)
        except BodyTooLarge:
            return None, b"", _Refusal(413, f"request body exceeds the limit of {limit} bytes")
        except TimeoutError:
            return None, b"", _Refusal(408, f"request body not received within {self.config.body_timeout_s:g} s")
        except MalformedBody as exc:
            return None, b"", _Refusal(400, str(exc))
        except ConnectionError:
            return None, b"", _Refusal(400, "request body could not be read")
        try:
            body = _BODY_DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
        except RepeatedKey as exc:
            return None, b"", _Refusal(400, str(exc))
        except ValueError as exc:  # also invalid UTF-8 and numbers of more than 4300 digits
            return None, b"", _Refusal(400, f"request body is not valid JSON: {exc}")
        except RecursionError:
            return None, b"", _Refusal(400, "request body is not valid JSON: nested too deeply")
        if not isinstance(body, dict):
            return None, b"", _Refusal(400, "request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return None, b"", _Refusal(400, "you must provide a model parameter (a non-empty string)")
        if not _is_unicode(model):
            return None, b"", _Refusal(400, "the model parameter is not valid Unicode (it contains a lone surrogate)")
        if not (model.isascii() and model.isprintable()):
            # a look-alike (a Greek omicron, a non-breaking hyphen) or a control character names no model a budget
            # or an allowed-model list can name, however a lenient upstream reads it (an attacker session)
            return None, b"", _Refusal(400, "the model parameter must be printable ASCII, as every model's name is")
        if len(model) > MAX_NAME_CHARS:
            return None, b"", _Refusal(400, f"the model parameter is longer than {MAX_NAME_CHARS} characters")
        for flag in ("stream", "background"):  # a truthy non-boolean would be served unmetered by a lax upstream
            value = body.get(flag)
            if value is not None and not isinstance(value, bool):
                return None, b"", _Refusal(400, f"'{flag}' must be true or false, got {json.dumps(value)[:40]}")
        return body, raw, None

    def _blocked(self, verdict: Verdict, anthropic: bool) -> Response:
        code, kind = _BLOCK_ERRORS[verdict.action]
        headers = {"X-Spendstream-Decision": verdict.action, "X-Spendstream-Scope": verdict.scope}
        if verdict.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(verdict.retry_after_s)))
        scope = verdict.scope or "this gateway"
        messages = {
            "shutoff": f"budget exceeded for {scope}: {verdict.reason}; it lifts when the period ends (Retry-After) "
            f"or when the limit is raised (for a budget: `spendstream budget request {scope} AMOUNT --overage "
            "--reason WHY`, which an approver grants)",
            "throttle": f"rate limited for {scope}: {verdict.reason}",
            "deny_model": verdict.reason,
            "unavailable": f"spend enforcement unavailable: {verdict.reason}",
        }
        return error_response(
            verdict.http_status, messages[verdict.action], code, kind, anthropic=anthropic, headers=headers
        )

    async def _forward(
        self, request: Request, call: _Call, body: dict[str, Any], raw: bytes, cache_key_: str | None
    ) -> Response | StreamedResponse:
        endpoint, model, provider, verdict = call.endpoint, call.model, call.provider, call.verdict
        assert verdict is not None
        headers = {"Content-Type": "application/json"}
        for name in _FORWARDED_HEADERS:
            value = request.headers.get(name)
            if value:
                headers[name] = value
        if endpoint.anthropic and "anthropic-version" not in headers:
            headers["anthropic-version"] = self.config.anthropic_version
        out_headers = {"X-Spendstream-Decision": verdict.action}
        rewrite = verdict.model != model
        if rewrite or call.route is not None:
            out_headers.update(call.model_headers())
        if rewrite:
            body["model"] = verdict.model
        stream = endpoint.streams and body.get("stream") is True
        injected = False
        if stream and endpoint.include_usage:
            options = body.get("stream_options")
            if not isinstance(options, dict) or not options.get("include_usage"):
                body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                injected = True
        payload = json.dumps(body, separators=(",", ":")).encode() if rewrite or injected else raw
        call.body, call.body_bytes = body, len(payload)
        try:
            response, target = await self.upstreams.send(provider, "POST", request.path, payload, headers)
        except UpstreamUnavailable as exc:
            self.counts["upstream_unavailable"] += 1
            self._emit(call, verdict.model, None, UsageStatus.error)
            return error_response(
                502, f"no upstream answered: {exc}", "upstream_unavailable", "api_error", anthropic=endpoint.anthropic
            )
        except asyncio.CancelledError:  # the gateway is stopping: the call may have reached the upstream
            self._emit_cut(call)
            raise
        call.tags["upstream"] = target.base_url
        upstream_headers = response.headers
        for name in _RESPONSE_HEADERS:
            value = upstream_headers.get(name)
            if value:
                out_headers[name] = value
        for name, value in upstream_headers.items():
            if name.startswith(_RATE_LIMIT_PREFIXES):
                out_headers[name] = value
        status = UsageStatus.ok if response.status < 400 else UsageStatus.error
        self.counts[status.value] += 1
        media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if stream and response.status == 200 and not _is_json_type(media_type):
            return await self._stream(request, call, body, response, target.kind, injected, out_headers, cache_key_)
        # (a stream asked for and answered as one JSON body, as some servers do, is metered as that body)
        try:
            async with response:
                data = await response.read()
        except (TimeoutError, ConnectionError) as exc:
            self._emit(call, verdict.model, None, UsageStatus.error)
            return error_response(
                502, f"upstream failed mid-response: {type(exc).__name__}", "upstream_error", "api_error"
            )
        except asyncio.CancelledError:
            self._emit_cut(call)
            raise
        content_type = response.headers.get("content-type", "application/json")
        if status is UsageStatus.ok:  # its usage block is read once the answer is sent
            answer = _Answer(data, content_type, cache_key_ if response.status == 200 else None)
            self._emit(call, verdict.model, None, status, answer=answer)
        else:
            self._emit(call, verdict.model, None, status)
        return Response(response.status, data, {**out_headers, "Content-Type": content_type})

    async def _stream(
        self,
        request: Request,
        call: _Call,
        body: dict[str, Any],
        response: UpstreamResponse,
        kind: str,
        injected: bool,
        out_headers: dict[str, str],
        cache_key_: str | None,
    ) -> StreamedResponse:
        """Forward an SSE stream as it arrives. A stream the upstream cuts short (closed, broken or silent past
        ``read_timeout_s``) ends with an error event and no terminating chunk, and is metered with what was streamed.
        """
        assert call.verdict is not None
        meter = StreamMeter(kind, drop_usage_chunk=injected)
        recorder = StreamRecorder(self.cache.max_entry_bytes) if cache_key_ is not None else None
        status = UsageStatus.ok
        content_type = response.headers.get("content-type", "text/event-stream")
        out = request.stream(200, {**out_headers, "Content-Type": content_type, "Cache-Control": "no-cache"})
        completed = False
        try:
            async with response:
                await out.prepare()
                async for chunk in response.iter_chunks():
                    data = meter.feed(chunk)
                    if data:
                        await out.write(data)
                        if recorder is not None:
                            recorder.feed(data)
                rest = meter.finish()
                if rest:
                    await out.write(rest)
                    if recorder is not None:
                        recorder.feed(rest)
            await out.write_eof()
            completed = True
        except (TimeoutError, ConnectionError) as exc:
            call.tags["stream_error"] = type(exc).__name__
            message = f"the upstream stream was interrupted ({type(exc).__name__}); the response is incomplete"
            await _cut_short(out, call.endpoint.anthropic, message)
        except asyncio.CancelledError:  # the gateway is stopping and the stream outlived the grace period
            call.tags["stream_error"] = "GatewayStopping"
            await _cut_short(out, call.endpoint.anthropic, "the gateway is stopping; the response is incomplete")
            raise
        finally:
            served = meter.model or call.verdict.model
            usage = meter.usage
            problem = usage_problem(usage, call.provider, meter.text_bytes) if completed else None
            if not completed or problem is not None:  # cut short, or no usable usage block
                if problem is not None and usage:
                    self._unusable_usage(call, served, problem)
                status = UsageStatus.ok if completed else UsageStatus.error
                usage, estimated = meter.usage_so_far(call.prompt_tokens, call.output_tokens_asked())
                if estimated:
                    call.tags["usage"] = "estimated"
            self._emit(call, served, usage, status)
        events = recorder.finish() if recorder is not None and status is UsageStatus.ok else None
        if cache_key_ is not None and events:
            self._loop.call_soon(  # type: ignore[union-attr]
                self._store, cache_key_, content_type, call.provider, served, meter.usage, b"", events
            )
        return out

    def _emit_cut(self, call: _Call) -> None:
        """Meter a call the gateway's stop cut short before an answer arrived: an error event tagged
        ``error: gateway_stopping``, so the ledger shows the call was made (what it cost is unknown here)."""
        assert call.verdict is not None
        call.tags["error"] = "gateway_stopping"
        self._emit(call, call.verdict.model, None, UsageStatus.error)

    def _emit(
        self,
        call: _Call,
        served: str,
        raw_usage: dict[str, Any] | None,
        status: UsageStatus,
        *,
        hit: CachedResponse | None = None,
        answer: _Answer | None = None,
    ) -> None:
        """Meter the request: its one usage event, served by ``served`` (the model that answered, or would have),
        with the usage of ``raw_usage`` or, for an ``answer``, of its body; a cache ``hit`` is metered as one.

        The event is built after the response was written, with those of the other requests answered within
        ``METER_BATCH_S``: reading usage blocks, pricing and building events add nothing to the client's wait, and
        a batch costs less CPU than its requests one at a time (the interpreter's caches stay warm). Events keep
        their order. An answer to cache is metered (and stored) at once, so the next identical request finds it;
        ``flush_metering`` and ``stop`` meter what is pending.
        """
        latency_ms = int((time.perf_counter() - call.started) * 1000)
        now = datetime.now(UTC) if self.clock is None else self.clock()
        pending = self._unmetered
        pending.append((call, served, raw_usage, status, hit, answer, latency_ms, now))
        loop = self._loop
        assert loop is not None
        if not self.meter_batch_s or (answer is not None and answer.cache_key is not None):
            loop.call_soon(self._meter_pending)
        elif len(pending) == 1:
            loop.call_later(self.meter_batch_s, self._meter_pending)

    def _meter_pending(self) -> None:
        pending, self._unmetered = self._unmetered, []
        for item in pending:
            try:
                self._meter(*item)
            except Exception:  # one request's metering bug must not cost the others theirs
                self.counts["meter_errors"] += 1
                log.exception("could not meter a request")

    def flush_metering(self, timeout_s: float = 10.0) -> None:
        """Meter the requests answered so far now (from any thread): their events are then in the Emitter."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._meter_pending()
            return

        async def meter() -> None:
            self._meter_pending()

        asyncio.run_coroutine_threadsafe(meter(), loop).result(timeout_s)

    def _meter(
        self,
        call: _Call,
        served: str,
        raw_usage: dict[str, Any] | None,
        status: UsageStatus,
        hit: CachedResponse | None,
        answer: _Answer | None,
        latency_ms: int,
        now: datetime,
    ) -> None:
        assert call.verdict is not None and self.emitter is not None
        self.decisions[call.verdict.action] += 1
        if answer is not None:
            raw_usage, served_by_upstream = usage_of_body(answer.body, call.endpoint.kind)
            served = served_by_upstream or served
            problem = usage_problem(raw_usage, call.provider, lambda: answered_bytes(answer.body))
            if problem is not None:  # an answer that says nothing usable of its cost
                if raw_usage:
                    self._unusable_usage(call, served, problem)
                raw_usage = estimated_body_usage(
                    answer.body, call.endpoint.kind, call.prompt_tokens, call.output_tokens_asked()
                )
                call.tags["usage"] = "estimated"
        try:
            if hit is not None:
                event = cache_hit_event(
                    entry=hit,
                    attribution=call.attribution,
                    model_requested=call.model,
                    latency_ms=latency_ms,
                    decision=call.verdict.action,
                    tags=call.tags,
                    prices=self.prices,
                    now=now,
                )
            else:
                event_of = partial(
                    build_event,
                    attribution=call.attribution,
                    provider=call.provider,
                    model_requested=call.model,
                    model_served=served,
                    latency_ms=latency_ms,
                    status=status,
                    decision=call.verdict.action,
                    prices=self.prices,
                    now=now,
                )
                event = event_of(raw_usage=raw_usage, tags=call.tags)
                if "usage_error" in event.tags and "usage_error" not in call.tags:  # priced beyond the per-event bound
                    self.counts["usage_out_of_range"] += 1
                    log.warning(
                        "usage reported for a %s/%s call is out of range (%s); it is metered with zero tokens, "
                        "tagged usage_error",
                        call.provider, served, event.tags["usage_error"],
                    )  # fmt: skip
                event = with_requested_cost(event, self.prices)
        except Exception:  # a metering bug must not fail the request; the log says which request shape
            self.counts["meter_errors"] += 1
            log.exception("could not build the usage event (provider %s, model %s)", call.provider, call.model)
            if call.reservation is not None:  # what it cost is not known: held as estimated
                self.enforcer.settle(call.reservation, call.reservation.nanos)  # type: ignore[union-attr]
        else:
            if call.reservation is not None:
                self.enforcer.settle(call.reservation, event.cost_nanos or 0)  # type: ignore[union-attr]
            if hit is None and status is not UsageStatus.blocked:  # an answer came: the name's first call is over
                answered = (event.model_served or call.verdict.model) if status is UsageStatus.ok else None
                self._learn_answered_as(call.provider, call.verdict.model, answered)
            self.emitter.emit(event)
            if self.follower is not None and self.follower.own_origin is not None:
                self.provider_stats.observe_event(event)
            if self.telemetry is not None:
                self.telemetry.record(event, call.endpoint.name)
        if answer is not None and answer.cache_key is not None and call.tags.get("usage") != "estimated":
            self._store(answer.cache_key, answer.content_type, call.provider, served, raw_usage, answer.body)

    def _unusable_usage(self, call: _Call, served: str, problem: str) -> None:
        """Count and log an upstream's usage block that cannot be metered by (the call is estimated, tagged why)."""
        self.counts["usage_out_of_range"] += 1
        call.tags["usage_error"] = problem
        log.warning(
            "usage reported for a %s/%s call cannot be metered by (%s); it is metered at an estimate, tagged "
            "usage_error", call.provider, served, problem,
        )  # fmt: skip

    def _first_call_of(self, provider: str, sent: str, verdict: Verdict) -> Verdict:
        """``verdict``, or a throttle while the first call of a name without a price of its own is in flight: what
        model the upstream answers it as is not known until then, so concurrent first calls all passed a spent cap of
        that model (30 of a deployment name did; an attacker session). A first answer that never comes frees the
        name after ``FIRST_ANSWER_WAIT_S``."""
        key = (provider, model_scope_name(sent))
        if key in self._names_answered_as_such:
            return verdict
        listed_key = (provider, sent, id(self.prices))
        listed = self._listed.get(listed_key)
        if listed is None:
            if len(self._listed) >= MAX_ANSWERED_AS:
                self._listed.clear()
            listed = self._listed[listed_key] = has_own_price(provider, sent, self.prices)
        if listed:
            return verdict
        now = time.monotonic()
        since = self._first_calls.get(key)
        if since is not None and now - since < FIRST_ANSWER_WAIT_S:
            reason = (
                f"this gateway does not know yet which model {sent!r} is (a name without a price of its own is held to "
                "the model its upstream answers it as): its first call is in flight; retry in a second"
            )
            return Verdict("throttle", verdict.model, 1.0, reason, f"model:{key[1]}")
        if len(self._first_calls) >= MAX_ANSWERED_AS:
            self._first_calls.clear()
        self._first_calls[key] = now
        return verdict

    def _learn_answered_as(self, provider: str, sent: str, answered: str | None) -> None:
        """Remember that ``provider`` answered ``sent`` (by its scope's name: its spellings share what is learned)
        as ``answered`` when that is another model's scope, unless ``sent`` is a model with a price of its own: one
        answer of a router's fallback must not hold every team's ``gpt-4o-mini`` to ``gpt-4o``'s decisions (an
        attacker session). A name answered as itself again is forgotten; ``answered`` None: the call failed, which
        only ends the name's first call."""
        key = (provider, model_scope_name(sent))
        self._first_calls.pop(key, None)
        if answered is None:  # a failed call says nothing of the model
            return
        if model_scope_name(answered) == key[1] or has_own_price(provider, sent, self.prices):
            self._answered_as.pop(key, None)
            if model_scope_name(answered) == key[1]:
                if len(self._names_answered_as_such) >= MAX_ANSWERED_AS:
                    self._names_answered_as_such.clear()
                self._names_answered_as_such.add(key)
        elif self._answered_as.get(key) != answered:
            if len(self._answered_as) >= MAX_ANSWERED_AS:
                self._answered_as.clear()
            self._answered_as[key] = answered

    def _store(
        self,
        key: str,
        content_type: str,
        provider: str,
        served: str,
        raw_usage: dict[str, Any] | None,
        body: bytes,
        events: tuple[bytes, ...] = (),
    ) -> None:
        """Cache a successful answer (run after it was sent; a request arriving meanwhile is read only after this
        ran, so it finds the entry)."""
        entry = make_entry(
            content_type=content_type,
            provider=provider,
            model_served=served,
            raw_usage=raw_usage,
            body=body,
            events=events,
        )
        if entry is not None:
            self.cache.put(key, entry)


async def serve(gateway: Gateway, host: str, port: int, *, reuse_port: bool = False) -> tuple[HttpServer, int]:
    """Start the gateway and its server on ``host:port``; (the server, the port it listens on)."""
    server = gateway.server()
    await gateway.start()
    try:
        bound = await server.start(host, port, reuse_port=reuse_port)
    except BaseException:
        await gateway.stop()
        raise
    return server, bound


async def shut_down(gateway: Gateway, server: HttpServer) -> None:
    """Stop taking requests, let those in flight finish (up to ``shutdown_timeout_s``), then stop the gateway."""
    await server.shutdown(gateway.config.shutdown_timeout_s)
    await gateway.stop()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The gateway's event loop: uvloop's (libuv), where it is installed (cuts the loop's own CPU per request)."""
    try:
        import uvloop
    except ImportError:  # not on this platform
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class GatewayThread:
    """The gateway on its own event loop in a background thread (tests, benchmarks, the demo)."""

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 0) -> None:
        self.gateway = gateway
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> GatewayThread:
        started = threading.Event()

        async def main() -> None:
            self._stopped = asyncio.Event()
            try:
                server, self.port = await serve(self.gateway, self.host, self.port)
            except BaseException as exc:
                self._error = exc
                started.set()
                return
            started.set()
            await self._stopped.wait()
            await shut_down(self.gateway, server)

        def run() -> None:
            loop = self._loop = new_event_loop()
            try:
                loop.run_until_complete(main())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="spendstream-gateway", daemon=True)
        self._thread.start()
        started.wait(30)
        if self._error is not None:
            raise RuntimeError(f"gateway did not start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(30)
            self._thread = None

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

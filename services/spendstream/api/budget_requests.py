"""Budget requests over HTTP: temporary increases, overage requests, feature registrations, approvals, denials.

The state is the compacted topic ``spendstream.budget_adjustments`` (``core.budget_lifecycle``): each call reads
it and the policy in force to their ends, checks the step and publishes the request's next version, acknowledged
by the broker before the answer. The principal of every step is the name of the token that made the call
(``tokens.py``); an approval needs an ``approver`` token whose level the policy's ``approvals`` allows for the
scope and the amount. Calls are serialised within the process, so two approvals of one request cannot both pass.

| method and path | role | body |
|---|---|---|
| ``GET /v1/budget/requests`` | viewer | ``?status=&kind=&scope=`` filters |
| ``POST /v1/budget/requests`` | viewer | ``{scope, amount_usd, reason, kind?: increase/overage, period?, until?}`` |
| ``POST /v1/budget/increases`` | approver | the same; granted at once within the caller's authority |
| ``POST /v1/budget/requests/{id}/approve`` and ``.../deny`` | approver | ``{reason}`` |
| ``POST /v1/features`` | viewer | ``{name, monthly_cost_usd, reason}`` |
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from spendstream.api.tokens import CALLER, ApiToken
from spendstream.core.attribution import attribution_value_problem, check_scope
from spendstream.core.budget_lifecycle import (
    BudgetRequest,
    Kind,
    LifecycleError,
    Status,
    decide,
    grant,
    latest_by_id,
    new_request,
)
from spendstream.core.config import Settings
from spendstream.core.money_text import usd_text
from spendstream.core.periods import budget_period, period_window
from spendstream.core.policy import MAX_AMOUNT_NANOS, Policy
from spendstream.core.policy_log import read_policy_log
from spendstream.core.pricing import whole_nanos
from spendstream.core.record_signature import RecordSigner, RecordVerifier, signature_headers, vouched_for
from spendstream.core.topics import BUDGET_ADJUSTMENTS

APPROVER_PATHS = re.compile(r"^/v1/budget/(increases|requests/[^/]+/(approve|deny))$")
LIFECYCLE_LOCK = web.AppKey("lifecycle_lock", asyncio.Lock)
# async (request, feature) -> {team: (served requests, spend nanos)} under the feature within FEATURE_IN_USE_WITHIN
FEATURE_USERS = web.AppKey("feature_users", Any)
FEATURE_IN_USE_WITHIN = timedelta(days=35)
SETTINGS = web.AppKey("lifecycle_settings", Settings)


def read_requests(
    kafka_conf: dict[str, Any], timeout: float = 10.0, verifier: RecordVerifier | None = None
) -> dict[str, BudgetRequest]:
    """Every request in its newest state: the topic read from its beginning to its end, without a group (with a
    ``verifier``, only the steps signed with its key pair: one published by another client is no step)."""
    consumer = Consumer({**kafka_conf, "group.id": "spendstream-budget-reader", "enable.auto.commit": False})
    records: list[BudgetRequest] = []
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(BUDGET_ADJUSTMENTS, 0), timeout=timeout)
        if high <= 0:
            return {}
        consumer.assign([TopicPartition(BUDGET_ADJUSTMENTS, 0, OFFSET_BEGINNING)])
        position = 0
        # past the reported end too, until a poll finds nothing (the embedded broker reports a batch's base offset)
        while (message := consumer.poll(timeout if position < high else 0.2)) is not None:
            if message.error() or message.value() is None:
                continue
            position = message.offset() + 1
            if not vouched_for(verifier, BUDGET_ADJUSTMENTS, message):
                continue
            try:
                records.append(BudgetRequest.from_json(message.value()))
            except (ValueError, KeyError, TypeError):
                continue  # what the processor logs and ignores is no request either
        if position < high:
            raise RuntimeError(f"could not read {BUDGET_ADJUSTMENTS} to its end (offset {position} of {high})")
        return latest_by_id(records)
    finally:
        consumer.close()


def publish(kafka_conf: dict[str, Any], request: BudgetRequest, signer: RecordSigner | None = None) -> None:
    """Publish one step (signed by ``signer``) and wait for the broker's acknowledgement."""
    errors: list[str] = []
    producer = Producer({**kafka_conf, "acks": "all"})
    key, value = request.id.encode(), request.to_json()
    producer.produce(
        BUDGET_ADJUSTMENTS, value, key=key,
        headers=signature_headers(signer, BUDGET_ADJUSTMENTS, key, value),
        on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
    )  # fmt: skip
    if producer.flush(15) or errors:
        raise RuntimeError(f"the broker did not acknowledge request {request.id}: {errors or 'timeout'}")


def request_json(request: BudgetRequest) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(request.to_json())
    out["amount_usd"] = format(Decimal(request.amount_nanos).scaleb(-9).normalize(), "f")  # never 1E-9 or 2E+3
    return out


# -- parsing -----------------------------------------------------------------------------------------------------


def _field(body: dict[str, Any], name: str, required: bool = True) -> Any:
    if name not in body or body[name] in (None, ""):
        if required:
            raise LifecycleError(f"{name}: required")
        return None
    return body[name]


def _amount(body: dict[str, Any], name: str) -> int:
    value = _field(body, name)
    if isinstance(value, bool) or not isinstance(value, int | str | float):
        raise LifecycleError(f"{name}: a number of USD")
    try:
        nanos = whole_nanos(Decimal(str(value)))
    except (InvalidOperation, ArithmeticError):
        raise LifecycleError(f"{name}: a number of USD, got {value!r}") from None
    except ValueError as exc:
        raise LifecycleError(f"{name}: {exc}") from None
    if not 0 < nanos <= MAX_AMOUNT_NANOS:
        raise LifecycleError(f"{name}: more than 0 and at most 1,000,000,000 USD, got {value!r}")
    return nanos


MAX_INCREASE_DAYS = 366  # a temporary increase is temporary: a lasting one is a change of the policy


def _until(body: dict[str, Any], policy: Policy, now: datetime) -> datetime | None:
    """``until``: a date (the adjustment lasts through that local day) or an ISO time (local if naive), within
    ``MAX_INCREASE_DAYS`` from now (``9999-12-31`` made an increase permanent, and answered 500)."""
    text = _field(body, "until", required=False)
    if text is None:
        return None
    try:
        if len(str(text)) == 10:
            at = datetime.combine(date.fromisoformat(text) + timedelta(days=1), time(), policy.tz)
        else:
            at = datetime.fromisoformat(text)
            at = at if at.tzinfo else at.replace(tzinfo=policy.tz)
        at = at.astimezone(UTC)
    except (TypeError, ValueError):
        raise LifecycleError(f"until: expected YYYY-MM-DD or an ISO date-time, got {text!r}") from None
    except OverflowError:  # the last day there is
        at = datetime.max.replace(tzinfo=UTC)
    if at > now + timedelta(days=MAX_INCREASE_DAYS):
        raise LifecycleError(
            f"until: at most {MAX_INCREASE_DAYS} days ahead (got {text}); a lasting budget belongs in the policy"
        )
    return at


def _budget_request(body: dict[str, Any], policy: Policy, by: str, now: datetime, direct: bool) -> BudgetRequest:
    try:
        kind = Kind(str(body.get("kind") or "increase")) if not direct else Kind.increase
    except ValueError:
        raise LifecycleError(f"kind: increase or overage, got {body.get('kind')!r}") from None
    if kind is Kind.feature:
        raise LifecycleError("kind: register a feature with POST /v1/features")
    scope = str(_field(body, "scope"))
    try:
        check_scope(scope)
        period = budget_period(str(body.get("period") or "month")).name
    except ValueError as exc:
        raise LifecycleError(f"scope/period: {exc}") from None
    if not any(b.scope == scope and b.period == period for b in policy.budgets):
        raise LifecycleError(f"scope: the policy in force has no {period} budget for {scope} to increase")
    until = _until(body, policy, now)
    if kind is Kind.overage:
        if until is not None:  # with one, a day budget's overage went on adding its amount every day for years
            raise LifecycleError("until: an overage lasts to the end of the period it is for; leave until out")
        until = period_window(period, now, policy.tz)[1]
    if until is None:
        raise LifecycleError("until: a temporary increase needs an expiry (YYYY-MM-DD: through that day)")
    reason = str(_field(body, "reason"))
    return new_request(kind, scope, str(period), _amount(body, "amount_usd"), now, until, by, reason, now)


# -- handlers ----------------------------------------------------------------------------------------------------


async def _state(request: web.Request) -> tuple[Policy, dict[str, BudgetRequest]]:
    conf = request.app[SETTINGS].kafka_client_config()

    def read() -> tuple[Policy, dict[str, BudgetRequest]]:
        settings = request.app[SETTINGS]
        found = read_policy_log(conf, settings.schema_registry_url, verifier=settings.record_verifier())
        if found.in_force is None:
            raise LifecycleError("no policy is in force yet (spendstream policy apply FILE)", 409)
        return found.in_force.policy, read_requests(conf, verifier=settings.record_verifier())

    return await asyncio.to_thread(read)


def _error(exc: Exception) -> web.Response:
    status = exc.status if isinstance(exc, LifecycleError) else 503
    return web.json_response({"error": str(exc)}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise LifecycleError(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise LifecycleError("body must be a JSON object")
    return body


def _caller(request: web.Request) -> ApiToken:
    """The authenticated caller the API's guard admitted: its name is who requests or decides."""
    caller = request.get(CALLER)
    if caller is None:
        raise LifecycleError("the token was revoked", 401)
    return caller


async def list_requests(request: web.Request) -> web.Response:
    try:
        _, requests = await _state(request)
    except (LifecycleError, RuntimeError, KafkaException) as exc:
        return _error(exc)
    wanted = {k: request.query[k] for k in ("status", "kind", "scope") if request.query.get(k)}
    rows = [
        request_json(r)
        for r in sorted(requests.values(), key=lambda r: r.requested_at)
        if all(str(getattr(r, k)) == v for k, v in wanted.items())
    ]
    return web.json_response({"requests": rows})


async def _step(request: web.Request, make: Any) -> web.Response:
    """Read the state, make the next step (``make(body, policy, requests, caller, now)``), publish it."""
    try:
        caller = _caller(request)
        body = await _body(request)
        async with request.app[LIFECYCLE_LOCK]:
            policy, requests = await _state(request)
            step = make(body, policy, requests, caller, datetime.now(UTC))
            settings = request.app[SETTINGS]
            await asyncio.to_thread(publish, settings.kafka_client_config(), step, settings.record_signer())
    except (LifecycleError, RuntimeError, KafkaException) as exc:
        return _error(exc)
    return web.json_response(request_json(step), status=201 if step.step in ("requested", "approved") else 200)


async def post_request(request: web.Request) -> web.Response:
    return await _step(
        request, lambda body, policy, _r, caller, now: _budget_request(body, policy, caller.name, now, False)
    )


async def post_increase(request: web.Request) -> web.Response:
    def make(body: dict[str, Any], policy: Policy, requests: Any, caller: Any, now: datetime) -> BudgetRequest:
        if not caller.level:
            raise LifecycleError(
                f"token {caller.name!r} has no approval level: a direct increase needs an approver", 403
            )
        asked = _budget_request(body, policy, caller.name, now, True)
        return grant(asked, caller.name, caller.level, policy.approval_rules, now, requests.values())

    return await _step(request, make)


def _decision(approve: bool) -> Any:
    async def handler(request: web.Request) -> web.Response:
        request_id = request.match_info["id"]

        def make(body: dict[str, Any], policy: Policy, requests: dict[str, BudgetRequest], caller: Any, now: datetime):
            found = requests.get(request_id)
            if found is None:
                raise LifecycleError(f"no budget request {request_id!r} (spendstream budget list)", 404)
            reason = str(_field(body, "reason"))
            return decide(
                found, approve, caller.name, caller.level, reason, policy.approval_rules, now, requests.values()
            )

        return await _step(request, make)

    return handler


async def post_feature(request: web.Request) -> web.Response:
    try:
        name = str(_field(await _body(request), "name"))
        if problem := attribution_value_problem("feature", name):  # "*" would budget every feature at $0
            raise LifecycleError(f"name: {problem}", 400)
        users = await request.app[FEATURE_USERS](request, name)
    except LifecycleError as exc:
        return _error(exc)
    except Exception as exc:  # whoever it would stop is unknown: refused, and said why
        return _error(LifecycleError(f"cannot read from the ledger who uses feature {name}: {exc}", 503))

    def make(body: dict[str, Any], policy: Policy, requests: dict[str, BudgetRequest], caller: Any, now: datetime):
        scope = check_scope_or_error(f"feature:{name}")
        taken = [
            r
            for r in requests.values()
            if r.kind is Kind.feature and r.scope == scope and r.status is not Status.denied
        ]
        if taken:
            raise LifecycleError(f"feature {name} is registered already ({taken[0].id}, {taken[0].status})", 409)
        if any(budget.scope == scope for budget in policy.budgets):  # else a registration would raise that budget
            raise LifecycleError(
                f"feature {name} has a budget in the policy in force already: ask for more with "
                f"`spendstream budget request {scope} AMOUNT --until YYYY-MM-DD --reason WHY`",
                409,
            )
        # a registration is for a new feature: pending, it holds the feature at $0, and a viewer could stop a
        # feature teams already run (granted, it would cap it): a feature in use gets its budget in the policy
        if users:
            used = ", ".join(
                f"team {team or '(unattributed)'}: {requests:,} requests, {usd_text(spend)}"
                for team, (requests, spend) in sorted(users.items())
            )
            raise LifecycleError(
                f"feature {name} is in use already ({used} in the last {FEATURE_IN_USE_WITHIN.days} days): a "
                "registration would hold it at $0 until approved and stop them. Give it a budget in the policy: "
                f'budgets: - {{scope: "{scope}", period: month, amount_usd: N}}',
                409,
            )
        registration = new_request(
            Kind.feature, scope, "month", _amount(body, "monthly_cost_usd"), now, None, caller.name,
            str(_field(body, "reason")), now,
        )  # fmt: skip
        rules = policy.approval_rules
        if registration.amount_nanos <= (rules.feature_threshold_nanos or 0):
            return grant(registration, "policy: at or below approvals.feature_threshold", "", rules, now)
        return registration

    return await _step(request, make)


def check_scope_or_error(scope: str) -> str:
    try:
        return check_scope(scope)
    except ValueError as exc:
        raise LifecycleError(f"name: {exc}") from None


def add_routes(app: web.Application, settings: Settings, feature_users: Any) -> None:
    app[SETTINGS] = settings
    app[FEATURE_USERS] = feature_users
    app[LIFECYCLE_LOCK] = asyncio.Lock()
    app.router.add_get("/v1/budget/requests", list_requests)
    app.router.add_post("/v1/budget/requests", post_request)
    app.router.add_post("/v1/budget/increases", post_increase)
    app.router.add_post("/v1/budget/requests/{id}/approve", _decision(True))
    app.router.add_post("/v1/budget/requests/{id}/deny", _decision(False))
    app.router.add_post("/v1/features", post_feature)

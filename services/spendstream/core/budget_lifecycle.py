"""The budget lifecycle as pure functions: requests, approvals by level, temporary increases and what they make
the limit of a budget at a given instant (docs/architecture.md §3, §5).

A *request* (an increase, an overage at 100 %, or a new feature's projected monthly cost) is one record on the
compacted topic ``spendstream.budget_adjustments``, keyed by its id; each step (requested, approved, denied,
expired) republishes the whole record with its new status and the step that made it, so the topic's newest record
per id is the request's state and every record is an audit entry (who, when, why).

An approved request is an *adjustment*: ``amount_nanos`` added to the ``(scope, period)`` budget from
``starts_at`` until ``expires_at`` (exclusive; None: standing). The limit in force at ``t`` is a pure function of
the policy and the adjustments, ``base + sum(active at t)``: expiry is a matter of time, nothing is republished
for it to take effect. A feature registration is the budget of a feature the policy does not budget: its projected
cost once approved, zero (no spend) while pending or denied.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from spendstream.core.events import INT64_MAX
from spendstream.core.money_text import exact_usd_text
from spendstream.core.policy import Approvals, Budget, Policy


class Kind(StrEnum):
    increase = "increase"  # a temporary or standing increase of a budget
    overage = "overage"  # asked for at 100 %: the scope's shutoff lifts once it is approved
    feature = "feature"  # a new feature's projected monthly cost


class Status(StrEnum):
    pending = "pending"
    approved = "approved"
    denied = "denied"
    expired = "expired"


class LifecycleError(ValueError):
    """A request or decision that is not allowed; ``status`` is the HTTP status that says why (400/403/404/409)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class BudgetRequest:
    """One request in its current state plus the step that produced this version of it (the audit entry)."""

    id: str
    kind: Kind
    scope: str
    period: str
    amount_nanos: int
    starts_at: datetime
    expires_at: datetime | None
    status: Status
    requested_by: str
    requested_at: datetime
    reason: str
    step: str  # requested | approved | denied | expired
    step_by: str
    step_at: datetime
    step_reason: str
    approver_level: str = ""

    def to_json(self) -> bytes:
        data = asdict(self)
        for name in ("starts_at", "expires_at", "requested_at", "step_at"):
            data[name] = data[name].isoformat() if data[name] is not None else None
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> BudgetRequest:
        """Raises ``ValueError`` (or ``KeyError``/``TypeError``) for anything but a well-formed record: a follower
        skips what it cannot use rather than compare a naive time or add a string to a limit."""
        data: dict[str, Any] = json.loads(raw)
        for name in ("starts_at", "expires_at", "requested_at", "step_at"):
            if data[name] is None and name != "expires_at":
                raise ValueError(f"{name} is required")
            data[name] = datetime.fromisoformat(data[name]) if data[name] is not None else None
            if data[name] is not None and data[name].tzinfo is None:
                raise ValueError(f"{name} has no timezone")
        amount = data["amount_nanos"]
        if type(amount) is not int or not 0 < amount <= INT64_MAX:
            raise ValueError(f"amount_nanos must be a positive Int64, got {amount!r}")
        data["kind"], data["status"] = Kind(data["kind"]), Status(data["status"])
        return cls(**data)

    def active_at(self, at: datetime) -> bool:
        """Whether the adjustment adds to its budget at ``at`` (from ``starts_at``, until ``expires_at`` exclusive)."""
        return (
            self.status is Status.approved
            and self.starts_at <= at
            and (self.expires_at is None or at < self.expires_at)
        )


MAX_REASON_CHARS = 2_000


def _check_reason(reason: str) -> None:
    """A reason is plain text an approver reads in a terminal and the audit trail keeps: an escape sequence in it
    cleared an approver's screen and printed "approved by CFO" (an attacker session); a line break faked rows."""
    if not reason.strip():
        raise LifecycleError("a reason is required: the audit trail says why")
    if len(reason) > MAX_REASON_CHARS:
        raise LifecycleError(f"the reason is longer than {MAX_REASON_CHARS:,} characters ({len(reason):,})")
    if not reason.isprintable():
        hidden = next(char for char in reason if not char.isprintable())
        raise LifecycleError(
            f"the reason contains the control or invisible character U+{ord(hidden):04X} (a line break, an escape "
            "sequence): write it as one line of plain text"
        )


def new_request(
    kind: Kind,
    scope: str,
    period: str,
    amount_nanos: int,
    starts_at: datetime,
    expires_at: datetime | None,
    by: str,
    reason: str,
    at: datetime,
) -> BudgetRequest:
    if amount_nanos <= 0:
        raise LifecycleError("the amount must be positive")
    if expires_at is not None and expires_at <= starts_at:
        raise LifecycleError(f"the expiry {expires_at.isoformat()} is not after the start {starts_at.isoformat()}")
    _check_reason(reason)
    return BudgetRequest(
        id=f"{kind}-{uuid.uuid4().hex[:12]}", kind=kind, scope=scope, period=period, amount_nanos=amount_nanos,
        starts_at=starts_at, expires_at=expires_at, status=Status.pending, requested_by=by, requested_at=at,
        reason=reason, step="requested", step_by=by, step_at=at, step_reason=reason,
    )  # fmt: skip


def approval_problem(
    rules: Approvals, level_name: str, scope: str, amount_nanos: int, granted_nanos: int = 0
) -> str | None:
    """Why an approver of ``level_name`` may not approve ``amount_nanos`` for ``scope`` (None: it may).

    ``granted_nanos`` is what approved, unexpired adjustments already add to the same budget: the ceiling bounds
    the budget's total increase, so splitting an amount into smaller requests does not get around it."""
    if not level_name:
        return "only an approver token with a level may approve (spendstream api token create --role approver)"
    level = rules.level(level_name)
    if level is None:
        return f"approval level {level_name!r} is not in the policy's approvals.levels"
    dimension = scope.partition(":")[0]
    if dimension not in level.dimensions:
        return f"level {level.name} approves for {', '.join(level.dimensions)} scopes, not {dimension}"
    total = amount_nanos + granted_nanos
    if level.max_nanos is not None and total > level.max_nanos:
        ceiling = f"level {level.name} approves at most {exact_usd_text(level.max_nanos)}"
        if granted_nanos:
            return (
                f"{ceiling} on {scope}, which already has {exact_usd_text(granted_nanos)} of approved increases; "
                f"this would bring them to {exact_usd_text(total)}"
            )
        return f"{ceiling}, this is {exact_usd_text(amount_nanos)}"
    return None


def granted_nanos(request: BudgetRequest, others: Iterable[BudgetRequest], at: datetime) -> int:
    """What the approved, unexpired adjustments other than ``request`` add to its budget at ``at``."""
    return sum(
        other.amount_nanos
        for other in others
        if other.id != request.id
        and (other.scope, other.period) == (request.scope, request.period)
        and other.status is Status.approved
        and (other.expires_at is None or at < other.expires_at)
    )


def level_rank(rules: Approvals, level_name: str) -> int:
    """The position of a level on the policy's ladder (lowest first); -1 for a level the policy does not name."""
    names = [level.name for level in rules.levels]
    return names.index(level_name) if level_name in names else -1


def decide(
    request: BudgetRequest,
    approve: bool,
    by: str,
    level: str,
    reason: str,
    rules: Approvals,
    at: datetime,
    others: Iterable[BudgetRequest] = (),
) -> BudgetRequest:
    """The request approved or denied by ``by`` (an authenticated principal of approval ``level``); ``others`` are
    the other requests, whose approved increases count against the approver's ceiling.

    A pending request may be approved or denied; a denied one may still be approved on appeal to a higher level
    than the denier's; an approved or expired one is final."""
    open_to = (Status.pending, Status.denied) if approve else (Status.pending,)
    if request.status not in open_to:
        raise LifecycleError(
            f"request {request.id} is {request.status}; it cannot be {'approved' if approve else 'denied'}", 409
        )
    if approve and request.expires_at is not None and request.expires_at <= at:
        raise LifecycleError(
            f"request {request.id} ended {request.expires_at.isoformat()}: an approval now would change nothing", 409
        )
    if by == request.requested_by:
        raise LifecycleError(f"{by} requested {request.id} and may not also decide it", 403)
    _check_reason(reason)
    if request.status is Status.denied and level_rank(rules, level) <= level_rank(rules, request.approver_level):
        raise LifecycleError(
            f"{by} may not overturn {request.id}: it was denied by {request.step_by} ({request.approver_level}); "
            f"an appeal needs a level above {request.approver_level}",
            403,
        )
    granted = granted_nanos(request, others, at) if approve else 0
    problem = approval_problem(rules, level, request.scope, request.amount_nanos, granted)
    if problem is not None:
        raise LifecycleError(f"{by} may not decide {request.id}: {problem}", 403)
    status, step = (Status.approved, "approved") if approve else (Status.denied, "denied")
    return replace(request, status=status, step=step, step_by=by, step_at=at, step_reason=reason, approver_level=level)


def grant(
    request: BudgetRequest, by: str, level: str, rules: Approvals, at: datetime, others: Iterable[BudgetRequest] = ()
) -> BudgetRequest:
    """A request its own author may approve at once: a direct increase by an approver (within its ceiling, the
    approved increases in ``others`` counted), or a feature at or below the threshold (``by`` is then the policy)."""
    if level:
        granted = granted_nanos(request, others, at)
        problem = approval_problem(rules, level, request.scope, request.amount_nanos, granted)
        if problem is not None:
            raise LifecycleError(f"{request.requested_by} may not grant this: {problem}", 403)
    return replace(
        request, status=Status.approved, step="approved", step_by=by, step_at=at,
        step_reason=request.reason, approver_level=level,
    )  # fmt: skip


def expire(request: BudgetRequest) -> BudgetRequest:
    """The audit entry of an approved adjustment that ended (it stopped counting at ``expires_at`` already)."""
    assert request.expires_at is not None
    return replace(
        request, status=Status.expired, step="expired", step_by="spendstream processor",
        step_at=request.expires_at, step_reason="the adjustment reached its expiry", approver_level="",
    )  # fmt: skip


def effective_limit(
    base_nanos: int | None, requests: Iterable[BudgetRequest], scope: str, period: str, at: datetime
) -> int | None:
    """The limit of the ``(scope, period)`` budget at ``at``: its base plus every adjustment active then (capped at
    Int64). None: no budget (no base and no feature registration)."""
    mine = [r for r in requests if r.scope == scope and r.period == period]
    if base_nanos is None and any(r.kind is Kind.feature and r.status is not Status.denied for r in mine):
        base_nanos = 0  # a registered feature is budgeted, at zero until approved; a denied one is as it was
    if base_nanos is None:
        return None  # an increase of a budget the policy does not have changes nothing
    return min(base_nanos + sum(r.amount_nanos for r in mine if r.active_at(at)), INT64_MAX)


def adjusted_policy(policy: Policy, requests: Iterable[BudgetRequest], at: datetime) -> Policy:
    """``policy`` with every adjusted budget at its effective limit at ``at``; same version (what the operator
    applied), same everything else. Budgets no request names are the very same objects."""
    by_budget: dict[tuple[str, str], list[BudgetRequest]] = {}
    for request in requests:
        by_budget.setdefault((request.scope, request.period), []).append(request)
    if not by_budget:
        return policy
    budgets: list[Budget] = []
    for budget in policy.budgets:
        mine = by_budget.pop((budget.scope, str(budget.period)), None)
        if mine is None:
            budgets.append(budget)
            continue
        limit = effective_limit(budget.limit_nanos, mine, budget.scope, str(budget.period), at)
        budgets.append(budget if limit == budget.limit_nanos else budget.model_copy(update={"amount_nanos": limit}))
    for (scope, period), mine in by_budget.items():
        limit = effective_limit(None, mine, scope, period, at)
        if limit is not None:
            budgets.append(
                Budget(
                    scope=scope,
                    period=period,
                    amount_nanos=limit,
                    thresholds=policy.thresholds,
                    fallback_models=policy.fallback_models,
                )
            )
    return policy.model_copy(update={"budgets": budgets})


def next_expiry(requests: Iterable[BudgetRequest], after: datetime) -> datetime | None:
    """The earliest instant after ``after`` at which an approved adjustment starts or ends (a limit changes)."""
    times = [
        t
        for r in requests
        if r.status is Status.approved
        for t in (r.starts_at, r.expires_at)
        if t is not None and t > after
    ]
    return min(times, default=None)


def latest_by_id(records: Iterable[BudgetRequest]) -> dict[str, BudgetRequest]:
    """The newest version of every request: its latest step (topic order among steps of the same time). An older
    step read later is a replay (an "approved" after its "expired" would approve the increase again): ignored."""
    out: dict[str, BudgetRequest] = {}
    for record in records:
        if supersedes_step(record, out.get(record.id)):
            out[record.id] = record
    return out


def supersedes_step(step: BudgetRequest, current: BudgetRequest | None) -> bool:
    """Whether ``step`` is a request's newer state than ``current``: it was taken at the same time or later."""
    return current is None or step.step_at >= current.step_at

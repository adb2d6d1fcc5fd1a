"""The spend policy: a YAML document validated by pydantic, identified by a content hash.

API:

- ``load_policy(path) -> Policy`` / ``parse_policy(text, source_name) -> Policy``; both raise ``PolicyError``
  whose message names the file, the line and the field of every problem (``default.yaml:12: budgets.3.period:
  Input should be 'day', ...``), mapped from pydantic's error locations to YAML node marks.
- ``Policy.version``: sha256 (16 hex) of the canonical JSON, so comment or layout edits do not change it.
- ``Policy.to_json()`` (canonical document, what ``spendstream.policy`` carries) and ``Policy.summary()``
  (text for ``spendstream policy show``).
- Lookups the processor needs per event: ``policy.tz``, ``policy.ancestors`` (team/project -> parent scopes),
  ``policy.feature(name)``, ``policy.is_critical(feature)``, ``policy.price_table``, and
  ``policy.matching_budgets(scope)`` (the processor evaluates them, edges hold hard caps by them).

Money in the YAML is human (``amount_usd: 8000``, ``min_spend_usd: "12.5"``) and becomes integer nano-USD via
Decimal; floats never appear because the YAML loader reads every float literal as a Decimal.
Scopes are ``dimension:value``; ``dimension:*`` is a template that gives every value its own budget or quota.
"""

from __future__ import annotations

import difflib
import gc
import hashlib
import json
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, tzinfo
from decimal import Decimal, InvalidOperation
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from spendstream.core.attribution import DIMENSIONS, HIERARCHY, AttributionValue, check_scope
from spendstream.core.matching import is_template
from spendstream.core.money_text import usd_text
from spendstream.core.notification_policy import Notifications
from spendstream.core.otlp_attribution import OtlpAttribution
from spendstream.core.periods import budget_period_names, known_timezone
from spendstream.core.pricing import (
    DEFAULT_UNKNOWN_RATES,
    PriceOverride,
    PriceTable,
    Rates,
    unpriced_model_problem,
    usd_to_nanos,
    whole_nanos,
)
from spendstream.core.routing_policy import RoutingPolicy


class PolicyError(ValueError):
    """A policy that cannot be used; ``problems`` lists ``file:line: field: message`` strings."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def check_period(value: object) -> str:
    """A budget period's name, one of the registered periods (``core.periods``)."""
    names = budget_period_names()
    if isinstance(value, str) and value in names:
        return value
    expected = " or ".join([", ".join(f"'{name}'" for name in names[:-1]), f"'{names[-1]}'"])
    raise PydanticCustomError("enum", "Input should be {expected}", {"expected": expected})


PeriodName = Annotated[str, BeforeValidator(check_period)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# The largest amount a policy may name: one billion USD. Far above any real LLM budget, and small enough that
# nine such amounts still add up inside Int64 nano-USD (9.2e18), the ledger's and the windows' money type.
MAX_AMOUNT_USD = Decimal(1_000_000_000)
MAX_AMOUNT_NANOS = usd_to_nanos(MAX_AMOUNT_USD)


def _money(usd: Decimal | None, nanos: int | None, what: str, required: bool = True) -> int | None:
    if usd is not None and nanos is not None:
        raise ValueError(f"give {what}_usd or {what}_nanos, not both")
    if usd is not None:
        if usd < 0:
            raise ValueError(f"{what}_usd must not be negative")
        try:
            return whole_nanos(usd)
        except ValueError as exc:
            raise ValueError(f"{what}_usd: {exc}") from None
    if nanos is None and required:
        raise ValueError(f"{what}_usd (or {what}_nanos) is required")
    return nanos


class Thresholds(_Model):
    """Fractions of the limit at which each action starts; ``null`` disables a step. Exact Decimals."""

    alert: Decimal | None = Field(Decimal("0.80"), gt=0)
    fallback: Decimal | None = Field(Decimal("0.90"), gt=0)
    shutoff: Decimal | None = Field(Decimal("1.00"), gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        steps = [v for v in (self.alert, self.fallback, self.shutoff) if v is not None]
        if steps != sorted(steps):
            raise ValueError("thresholds must satisfy alert <= fallback <= shutoff")
        return self


class Budget(_Model):
    """A spend limit for one scope (or every value of a ``dimension:*`` template) and period."""

    scope: str
    period: PeriodName = "month"
    amount_usd: Decimal | None = Field(None, exclude=True, le=MAX_AMOUNT_USD)
    amount_nanos: int | None = Field(None, ge=0, le=MAX_AMOUNT_NANOS)
    thresholds: Thresholds | None = None  # None: the policy's default thresholds
    fallback_models: dict[str, str] | None = None  # None: the policy's fallback map
    # At shutoff, stop every request of the scope, critical features included (default: they are throttled).
    hard_cap: bool = False

    _check_scope = field_validator("scope")(check_scope)

    @model_validator(mode="after")
    def _to_nanos(self) -> Budget:
        object.__setattr__(self, "amount_nanos", _money(self.amount_usd, self.amount_nanos, "amount"))
        object.__setattr__(self, "amount_usd", None)
        return self

    @property
    def limit_nanos(self) -> int:
        return self.amount_nanos or 0

    @property
    def id(self) -> str:
        return f"{self.scope}/{self.period}"

    @property
    def is_template(self) -> bool:
        return is_template(self.scope)

    @property
    def dimension(self) -> str:
        return self.scope.partition(":")[0]


class Quota(_Model):
    """Per-day request and token caps for a scope (usually the template ``user:*``)."""

    scope: str
    requests_per_day: int | None = Field(None, ge=0)
    tokens_per_day: int | None = Field(None, ge=0)

    _check_scope = field_validator("scope")(check_scope)

    @model_validator(mode="after")
    def _something(self) -> Quota:
        if self.requests_per_day is None and self.tokens_per_day is None:
            raise ValueError("a quota needs requests_per_day or tokens_per_day")
        return self


class Feature(_Model):
    """Critical features are throttled, never shut off, whatever budget is exhausted (their own, their team's,
    the org's, ...) unless that budget is a ``hard_cap``, and exempt from emergency stops. ``teams``: the teams
    whose calls may name the feature (empty: any team); the gateway and team-bound ingest tokens refuse the
    others, so a team past its budget cannot name another's critical feature to be throttled instead of stopped,
    nor spend another team's feature budget."""

    critical: bool = False
    throttle_rps: float | None = Field(None, gt=0, allow_inf_nan=False)
    teams: tuple[AttributionValue, ...] = Field((), exclude_if=lambda teams: not teams)  # unset: the version stays


class SpikeRule(_Model):
    """``daily``: today > factor x trailing average daily spend; ``hourly_ewma``: this hour > factor x EWMA."""

    name: str
    kind: Literal["daily", "hourly_ewma"]
    scope: str = "feature:*"
    factor: Decimal = Field(Decimal(3), gt=1)
    window_days: int = Field(7, ge=1, le=90)
    min_history_days: int = Field(3, ge=1)
    alpha: Decimal = Field(Decimal("0.3"), gt=0, le=1)
    min_history_hours: int = Field(6, ge=1)
    min_spend_usd: Decimal | None = Field(None, exclude=True, le=MAX_AMOUNT_USD)
    min_spend_nanos: int | None = Field(None, ge=0, le=MAX_AMOUNT_NANOS)
    action: Literal["alert", "emergency_stop"] = "alert"

    _check_scope = field_validator("scope")(check_scope)

    @model_validator(mode="after")
    def _check(self) -> SpikeRule:
        object.__setattr__(
            self, "min_spend_nanos", _money(self.min_spend_usd, self.min_spend_nanos, "min_spend", required=False) or 0
        )
        object.__setattr__(self, "min_spend_usd", None)
        if self.action == "emergency_stop" and not self.scope.startswith("feature:"):
            raise ValueError(
                "action emergency_stop stops non-critical features, so scope must be feature:* or feature:<name>"
            )
        if self.min_history_days > self.window_days:
            raise ValueError("min_history_days must not exceed window_days")
        return self


class LongContextRow(_Model):
    """The rates of every token of a call whose prompt exceeds ``above_input_tokens`` (USD per million)."""

    above_input_tokens: int = Field(gt=0)
    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)
    cache_read_per_mtok: Decimal | None = Field(None, ge=0)
    cache_write_per_mtok: Decimal | None = Field(None, ge=0)


class PriceRow(_Model):
    """USD per million tokens as Decimal strings; cache prices default to the input price, the 1-hour cache write
    price to the cache write price, audio and image prices to the input or output price, reasoning to output."""

    provider: str = "*"
    model: str = "*"
    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)
    cache_read_per_mtok: Decimal | None = Field(None, ge=0)
    cache_write_per_mtok: Decimal | None = Field(None, ge=0)
    cache_write_1h_per_mtok: Decimal | None = Field(None, ge=0)
    reasoning_per_mtok: Decimal | None = Field(None, ge=0)
    input_audio_per_mtok: Decimal | None = Field(None, ge=0)
    output_audio_per_mtok: Decimal | None = Field(None, ge=0)
    input_image_per_mtok: Decimal | None = Field(None, ge=0)
    output_image_per_mtok: Decimal | None = Field(None, ge=0)
    per_request_usd: Decimal = Field(Decimal(0), ge=0)
    web_search_per_1000_usd: Decimal = Field(Decimal(0), ge=0)
    long_context: LongContextRow | None = None
    batch_multiplier: Decimal | None = Field(None, ge=0, le=1)
    effective_from: date | datetime | None = None
    effective_to: date | datetime | None = None

    def rates(self) -> Rates:
        long = self.long_context
        return Rates(
            self.input_per_mtok,
            self.output_per_mtok,
            self.cache_read_per_mtok,
            self.cache_write_per_mtok,
            self.cache_write_1h_per_mtok,
            self.reasoning_per_mtok,
            self.input_audio_per_mtok,
            self.output_audio_per_mtok,
            self.input_image_per_mtok,
            self.output_image_per_mtok,
            self.per_request_usd,
            self.web_search_per_1000_usd,
            long.above_input_tokens if long is not None else None,
            Rates(long.input_per_mtok, long.output_per_mtok, long.cache_read_per_mtok, long.cache_write_per_mtok)
            if long is not None
            else None,
            self.batch_multiplier,
        )


class Pricing(_Model):
    unknown_model: Literal["default_price", "reject"] = "default_price"
    default_price: PriceRow | None = None
    overrides: list[PriceRow] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Pricing:
        for row in self.overrides:
            if row.provider == "*" or row.model == "*":
                raise ValueError("every override row needs its provider and model")
        return self

    def table(self, tz: tzinfo = UTC) -> PriceTable:
        """The price table; an effective date means local midnight in ``tz``, a naive datetime is local time too."""

        def instant(value: datetime | date | None) -> datetime | None:
            if value is None:
                return None
            if not isinstance(value, datetime):
                value = datetime.combine(value, time(), tz)
            return value if value.tzinfo is not None else value.replace(tzinfo=tz)

        rows = tuple(
            PriceOverride(r.provider, r.model, r.rates(), instant(r.effective_from), instant(r.effective_to))
            for r in self.overrides
        )
        default = self.default_price.rates() if self.default_price is not None else DEFAULT_UNKNOWN_RATES
        return PriceTable(rows, self.unknown_model, default)


class ApprovalLevel(_Model):
    """One rung of the approval ladder: the scope dimensions it may approve for and its amount ceiling."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    dimensions: tuple[str, ...] = (*HIERARCHY, "feature")
    max_usd: Decimal | None = Field(None, exclude=True, gt=0, le=MAX_AMOUNT_USD)
    max_nanos: int | None = Field(None, gt=0, le=MAX_AMOUNT_NANOS)  # None: no ceiling

    @field_validator("dimensions")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [d for d in value if d not in DIMENSIONS]
        if unknown:
            raise ValueError(f"unknown dimensions {unknown}; use {', '.join(DIMENSIONS)}")
        return value

    @model_validator(mode="after")
    def _to_nanos(self) -> ApprovalLevel:
        object.__setattr__(self, "max_nanos", _money(self.max_usd, self.max_nanos, "max", required=False))
        object.__setattr__(self, "max_usd", None)
        return self


def _reference_levels() -> tuple[ApprovalLevel, ...]:
    """The reference framework's ladder: manager, director, VP, board."""
    return (
        ApprovalLevel(name="manager", dimensions=("team", "project", "feature"), max_usd=Decimal(1_000)),
        ApprovalLevel(name="director", dimensions=("division", "team", "project", "feature"), max_usd=Decimal(5_000)),
        ApprovalLevel(name="vp", dimensions=(*HIERARCHY, "feature"), max_usd=Decimal(25_000)),
        ApprovalLevel(name="board", dimensions=DIMENSIONS),
    )


class Approvals(_Model):
    """Who may approve what (``approvals:``): budget increases, overage requests and feature registrations.

    An approver token names one level; a level approves an amount for a scope when the scope's dimension is
    among its ``dimensions`` and the amount is at most its ceiling. A feature whose projected monthly cost is
    above ``feature_threshold`` needs such an approval before it may spend.
    """

    levels: tuple[ApprovalLevel, ...] = Field(default_factory=_reference_levels)
    feature_threshold_usd: Decimal | None = Field(None, exclude=True, ge=0, le=MAX_AMOUNT_USD)
    feature_threshold_nanos: int | None = Field(None, ge=0, le=MAX_AMOUNT_NANOS)

    @model_validator(mode="after")
    def _check(self) -> Approvals:
        names = [level.name for level in self.levels]
        if not names:
            raise ValueError("approval levels: name at least one (or leave approvals out for the reference ladder)")
        if len(names) != len(set(names)):
            raise ValueError("approval level names must be unique")
        # Levels are read lowest first (a denial is overturned only by a level listed after it), so a ceiling
        # must not fall on the way up: a later level that may approve less would outrank a higher one.
        for lower, higher in zip(self.levels, self.levels[1:], strict=False):
            lower_cap = MAX_AMOUNT_NANOS + 1 if lower.max_nanos is None else lower.max_nanos
            higher_cap = MAX_AMOUNT_NANOS + 1 if higher.max_nanos is None else higher.max_nanos
            if higher_cap < lower_cap:
                raise ValueError(
                    f"approval levels are listed lowest first; {higher.name!r} may approve less than "
                    f"{lower.name!r} before it: order them by ceiling"
                )
        threshold = _money(self.feature_threshold_usd, self.feature_threshold_nanos, "feature_threshold", False)
        object.__setattr__(self, "feature_threshold_nanos", usd_to_nanos(2_000) if threshold is None else threshold)
        object.__setattr__(self, "feature_threshold_usd", None)
        return self

    def level(self, name: str) -> ApprovalLevel | None:
        return next((level for level in self.levels if level.name == name), None)


OPTIONAL_SECTIONS = ("otlp", "notifications", "approvals")  # sections added after policies were first versioned


def _close_name(value: str, known: list[str]) -> str | None:
    """The name ``value`` was probably meant to be: one that differs only in case, else a close spelling."""
    same = [name for name in known if name.casefold() == value.casefold()]
    if same:
        return same[0]
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.8)
    return close[0] if close else None


class Policy(_Model):
    """The whole policy; build it with ``parse_policy`` / ``load_policy`` to get file/line error messages."""

    name: str = "default"
    timezone: str = "UTC"
    org: str = ""
    divisions: dict[str, list[str]] = Field(default_factory=dict)  # division -> its teams
    projects: dict[str, str] = Field(default_factory=dict)  # project -> its team
    thresholds: Thresholds = Field(default_factory=Thresholds)
    fallback_models: dict[str, str] = Field(default_factory=dict)  # expensive model -> cheaper model
    default_throttle_rps: float = Field(1.0, gt=0, allow_inf_nan=False)
    budgets: list[Budget] = Field(default_factory=list)
    quotas: list[Quota] = Field(default_factory=list)
    allowed_models: dict[str, list[str]] = Field(default_factory=dict)  # scope -> the only models it may call
    features: dict[str, Feature] = Field(default_factory=dict)
    spike_rules: list[SpikeRule] = Field(default_factory=list)
    pricing: Pricing = Field(default_factory=Pricing)
    routing: RoutingPolicy | None = None
    otlp: OtlpAttribution | None = None  # None: the defaults of core/otlp_attribution.py
    notifications: Notifications | None = None  # owners, channels, scheduled reports (notifier)
    approvals: Approvals | None = None  # None: the reference ladder (``approval_rules``)

    _version: str = PrivateAttr("")

    _timezone = field_validator("timezone")(known_timezone)

    @field_validator("allowed_models")
    @classmethod
    def _allowed_scopes(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for scope in value:
            check_scope(scope)
        return value

    @model_validator(mode="after")
    def _resolve(self) -> Policy:
        seen: dict[str, str] = {}
        for division, teams in self.divisions.items():
            for team in teams:
                if team in seen:
                    raise ValueError(f"team {team!r} is in divisions {seen[team]!r} and {division!r}")
                seen[team] = division
        ids = [b.id for b in self.budgets]
        if len(ids) != len(set(ids)):
            raise ValueError(f"duplicate budgets (scope/period): {sorted({i for i in ids if ids.count(i) > 1})}")
        names = [r.name for r in self.spike_rules]
        if len(names) != len(set(names)):
            raise ValueError("spike rule names must be unique")
        resolved = [
            b.model_copy(
                update={
                    "thresholds": b.thresholds if b.thresholds is not None else self.thresholds,
                    "fallback_models": b.fallback_models if b.fallback_models is not None else self.fallback_models,
                }
            )
            for b in self.budgets
        ]
        object.__setattr__(self, "budgets", resolved)
        self._version = hashlib.sha256(self.to_json().encode()).hexdigest()[:16]
        return self

    # -- identity and presentation ----------------------------------------------------------------------------

    @property
    def version(self) -> str:
        return self._version

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, Decimals as strings, money in nanos): hashed for ``version``."""
        # A section a policy leaves out keeps the version the policy had before the section existed.
        unset = {name for name in OPTIONAL_SECTIONS if getattr(self, name) is None}
        return json.dumps(self.model_dump(mode="json", exclude=unset), sort_keys=True, separators=(",", ":"))

    def timezone_warning(self, configured: str | None) -> str | None:
        """When ``SPENDSTREAM_TIMEZONE`` was set (``configured``; None: left unset) to another timezone than this
        policy's, say that the policy's governs: budgets, reports and report e-mails cut periods by it, and the
        setting only names the default policy's, before any policy is in force."""
        if configured is None or configured == self.timezone:
            return None
        return (
            f"SPENDSTREAM_TIMEZONE is {configured} but policy {self.name} has timezone {self.timezone}: budgets, "
            f"reports and report e-mails cut days and months by {self.timezone} (SPENDSTREAM_TIMEZONE only applies "
            f"before any policy is in force); to cut by {configured}, set `timezone: {configured}` in the policy and "
            "apply it, else unset SPENDSTREAM_TIMEZONE"
        )

    def fallback_price_warnings(self) -> list[str]:
        """``field: problem`` for each fallback model without a list price: a typo in a cheaper model's name would be
        priced at the default rates (often above the model it replaces) or refused, and the upstream would not know
        it either. Warnings, not errors: a self-hosted model may be meant, priced by default on purpose."""
        overridden = [row.model for row in self.pricing.overrides]
        maps = [("fallback_models", self.fallback_models)]
        maps += [(f"budgets.{i}.fallback_models", b.fallback_models or {}) for i, b in enumerate(self.budgets)]
        warnings, seen = [], set()
        for field, fallbacks in maps:
            for source, target in fallbacks.items():
                if (source, target) in seen:  # budgets without a map of their own carry the policy's
                    continue
                seen.add((source, target))
                problem = unpriced_model_problem(target, overridden)
                if problem is not None:
                    warnings.append(f"{field}.{source}: {problem}")
        return warnings

    def scope_warnings(self) -> list[str]:
        """``field: problem`` for each rule whose scope the calls this policy places cannot carry as written: another
        org than ``org``, a division ``divisions`` does not list, a team or project that differs from one it lists
        only in case or by a typo. Matching is exact, so such a rule never applies (a ``team:Support`` hard cap
        validated and was never enforced). Warnings, not errors: teams may be left out of ``divisions``."""
        teams = sorted({team for members in self.divisions.values() for team in members})
        named = [(f"budgets.{i}.scope", b.scope) for i, b in enumerate(self.budgets)]
        named += [(f"quotas.{i}.scope", q.scope) for i, q in enumerate(self.quotas)]
        named += [(f"allowed_models.{scope}", scope) for scope in self.allowed_models]
        named += [(f"spike_rules.{i}.scope", r.scope) for i, r in enumerate(self.spike_rules)]
        warnings = []
        for field, scope in named:
            dimension, _, value = scope.partition(":")
            if not value or is_template(scope):
                continue
            if dimension == "org" and self.org and value != self.org:
                warnings.append(
                    f"{field}: {scope}: the policy's org is {self.org!r}; the edges refuse calls naming another "
                    "org, so this rule never applies"
                )
            elif dimension == "division" and self.divisions and value not in self.divisions:
                close = _close_name(value, list(self.divisions))
                hint = f" (did you mean division:{close}?)" if close else ""
                warnings.append(f"{field}: {scope}: divisions: lists no division {value!r}{hint}")
            elif (known := {"team": teams, "project": list(self.projects)}.get(dimension)) and value not in known:
                close = _close_name(value, known)
                if close:
                    warnings.append(
                        f"{field}: {scope}: the policy names {dimension} {close!r}, not {value!r} (matching is "
                        f"exact: calls of {dimension}:{close} never count here); did you mean {dimension}:{close}?"
                    )
        for name, spec in sorted(self.features.items()):
            if spec.critical and not spec.teams:
                warnings.append(
                    f"features.{name}: a critical feature without teams: any team whose keys may name features "
                    f"can name {name} and be throttled instead of stopped past its budget; list its teams "
                    f"(teams: [...])"
                )
        return warnings

    def feature_owner_problem(self, team: str, feature: str) -> str | None:
        """Why a call of ``team`` may not name ``feature`` (the policy lists the teams it belongs to), or None."""
        spec = self.features.get(feature) if feature else None
        if spec is None or not spec.teams or team in spec.teams:
            return None
        return (
            f"feature {feature!r} belongs to team {', '.join(spec.teams)} by the policy; a call of team "
            f"{team or '(none)'!r} cannot name it"
        )

    def project_owner_problem(self, team: str, project: str) -> str | None:
        """Why a call of ``team`` may not name ``project`` (the policy's ``projects`` give it another team), or
        None. A project's spend counts toward its own budgets and the team the policy puts it under, so naming
        another team's project would charge that team's budgets and could shut them off."""
        owner = self.projects.get(project) if project else None
        if owner is None or owner == team:
            return None
        return (
            f"project {project!r} belongs to team {owner!r} by the policy; a call of team {team or '(none)'!r} "
            "cannot name it"
        )

    def owner_problem(self, team: str, feature: str, project: str) -> tuple[str, str] | None:
        """(field, why) if a call of ``team`` names a feature or a project the policy gives other teams, or None."""
        if problem := self.feature_owner_problem(team, feature):
            return "feature", problem
        if problem := self.project_owner_problem(team, project):
            return "project", problem
        return None

    def summary(self) -> str:
        lines = [f"policy {self.name} version {self.version} (timezone {self.timezone})"]
        t = self.thresholds
        lines.append(f"default thresholds: alert {t.alert}, fallback {t.fallback}, shutoff {t.shutoff}")
        lines.append(f"budgets ({len(self.budgets)}):")
        for b in self.budgets:
            cap = "  hard cap" if b.hard_cap else ""
            lines.append(f"  {b.scope:<36} {b.period:<12} {usd_text(b.limit_nanos)}{cap}")
        for q in self.quotas:
            requests = "no request limit" if q.requests_per_day is None else f"{q.requests_per_day} requests/day"
            tokens = "no token limit" if q.tokens_per_day is None else f"{q.tokens_per_day} tokens/day"
            lines.append(f"quota {q.scope}: {requests}, {tokens}")
        crit = sorted(n for n, f in self.features.items() if f.critical)
        lines.append(f"critical features: {', '.join(crit) or '-'}")
        for r in self.spike_rules:
            lines.append(f"spike rule {r.name}: {r.kind} x{r.factor} on {r.scope} -> {r.action}")
        for scope, models in self.allowed_models.items():
            lines.append(f"allowed models for {scope}: {', '.join(models)}")
        lines.append(f"price overrides: {len(self.pricing.overrides)}; unknown models: {self.pricing.unknown_model}")
        if self.notifications is not None:
            n = self.notifications
            lines.append(
                f"notifications: {len(n.channels)} channels, {len(n.people)} people, {len(n.scopes)} owned scopes, "
                f"{len(n.reports)} scheduled reports"
            )
        rules = self.approval_rules
        for level in rules.levels:
            ceiling = "no ceiling" if level.max_nanos is None else f"up to {usd_text(level.max_nanos)}"
            lines.append(f"approval level {level.name}: {ceiling} for {', '.join(level.dimensions)}")
        lines.append(f"new features above {usd_text(rules.feature_threshold_nanos or 0)}/month need approval")
        return "\n".join(lines)

    # -- lookups ------------------------------------------------------------------------------------------------

    @cached_property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def matching_budgets(self, scope: str) -> list[Budget]:
        """Budgets for this concrete scope: its own plus its dimension's templates (exact ones first); every user
        gets its own ``user:*`` budget, keyed by its own scope."""
        # Indexed once per budget list, kept beside it: a copy with other budgets (``model_copy``, as budget increases
        # make) carries this policy's attributes, so a cached_property would answer with the old budgets.
        index = self.__dict__.get("budget_index")
        if index is None or index[0] is not self.budgets:
            exact: dict[str, list[Budget]] = {}
            templates: dict[str, list[Budget]] = {}
            for budget in self.budgets:
                if budget.is_template:
                    templates.setdefault(budget.dimension, []).append(budget)
                else:
                    exact.setdefault(budget.scope, []).append(budget)
            index = self.__dict__["budget_index"] = (self.budgets, exact, templates)
        _, exact, templates = index
        return [*exact.get(scope, ()), *templates.get(scope.partition(":")[0], ())]

    @cached_property
    def ancestors(self) -> dict[str, tuple[str, ...]]:
        """``team:x`` / ``project:y`` -> the scopes above it, nearest first (``division:..``, ``org:..``)."""
        org = (f"org:{self.org}",) if self.org else ()
        out: dict[str, tuple[str, ...]] = {}
        for division, teams in self.divisions.items():
            for team in teams:
                out[f"team:{team}"] = (f"division:{division}", *org)
        for project, team in self.projects.items():
            out[f"project:{project}"] = (f"team:{team}", *out.get(f"team:{team}", org))
        return out

    @cached_property
    def parent_scopes(self) -> dict[str, str]:
        """Each scope's direct parent (``team:x`` -> ``division:y`` -> ``org:z``), the Enforcer's hierarchy."""
        parents: dict[str, str] = {}
        for scope, chain in self.ancestors.items():
            for child, parent in zip((scope, *chain), chain, strict=False):
                parents.setdefault(child, parent)
        return parents

    @cached_property
    def approval_rules(self) -> Approvals:
        return self.approvals or _REFERENCE_APPROVALS

    def feature(self, name: str) -> Feature:
        return self.features.get(name) or _NON_CRITICAL

    def is_critical(self, feature: str) -> bool:
        spec = self.features.get(feature)
        return spec is not None and spec.critical

    @cached_property
    def critical_throttle_rps(self) -> dict[str, float]:
        """Critical feature -> the rate it is throttled to where others are shut off."""
        return {name: self.throttle_rps(name) for name, spec in sorted(self.features.items()) if spec.critical}

    def throttle_rps(self, feature: str) -> float:
        spec = self.features.get(feature)
        return (spec.throttle_rps if spec is not None else None) or self.default_throttle_rps

    @cached_property
    def price_table(self) -> PriceTable:
        return self.pricing.table(self.tz)


_NON_CRITICAL = Feature()
_REFERENCE_APPROVALS = Approvals()


# -- YAML loading with line numbers ------------------------------------------------------------------------------


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML (libyaml's parser when present) that reads every float literal as a Decimal.

    Money and ratios stay exact; ``.nan``/``.inf`` become Decimal NaN or Infinity so that validation rejects
    them naming the field they were given for.
    """


def _yaml_decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal:
    text = loader.construct_scalar(node).replace("_", "").lower()
    special = {".nan": "NaN", ".inf": "Infinity", "+.inf": "Infinity", "-.inf": "-Infinity"}
    try:
        return Decimal(special.get(text, text))
    except InvalidOperation:  # YAML 1.1 floats Decimal does not read, e.g. sexagesimal 1:30.5
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is not a decimal number", node.start_mark
        ) from None


_Loader.add_constructor("tag:yaml.org,2002:float", _yaml_decimal)


def _node_for(root: yaml.Node | None, loc: tuple[int | str, ...]) -> yaml.Node | None:
    """The deepest YAML node along a pydantic error location (keys and list indices)."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    node = value
                    break
            else:
                return node
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def _duplicate_keys(root: yaml.Node | None) -> tuple[list[tuple[int, str, str]], bool]:
    """``(line, field, message)`` for every key given twice in one mapping (YAML would keep only the last), and
    whether any node is reached twice (through an alias).

    Each node is visited once, however many aliases point at it.
    """
    found: list[tuple[int, str, str]] = []
    visited: set[int] = set()
    shared = False
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    while stack:
        node, path = stack.pop()
        if id(node) in visited:
            shared = True
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key, value in node.value:
                field = f"{path}.{key.value}" if path else str(key.value)
                if isinstance(key, yaml.ScalarNode):
                    if key.value in first_line:
                        message = f"duplicate key (first given on line {first_line[key.value]})"
                        found.append((key.start_mark.line + 1, field, message))
                    first_line.setdefault(key.value, key.start_mark.line + 1)
                stack.append((value, field))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}.{i}") for i, item in enumerate(node.value))
    return sorted(found), shared


def _alias_expansion_problem(root: yaml.Node | None) -> str | None:
    """Why the document's aliases must be refused: recursive, or expanding it past what validation can read.

    A policy is validated as the tree its aliases expand to, so nine nested lists of nine aliases (a "billion
    laughs" document of a few hundred bytes) would keep validation busy for hours. Sizes are computed once per
    distinct node (linear), expanded sizes may at most double the document (floor: 1,000,000 nodes).
    """
    if root is None:
        return None
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = (
            [n for pair in node.value for n in pair]
            if isinstance(node, yaml.MappingNode)
            else node.value
            if isinstance(node, yaml.SequenceNode)
            else []
        )
        if children_done:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            continue
        if id(node) in on_path:
            return "an alias refers to a node that contains it (a recursive document)"
        on_path.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                return "an alias refers to a node that contains it (a recursive document)"
            if id(child) not in sizes:
                stack.append((child, False))
    limit = max(2 * len(sizes), 1_000_000)
    if sizes[id(root)] > limit:
        return f"aliases expand the document to {sizes[id(root)]:,} nodes (at most {limit:,})"
    return None


def _compose_and_construct(text: str) -> tuple[yaml.Node | None, object]:
    """Parse once: the node tree (for error lines) and the Python data built from it."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else None)
    finally:
        loader.dispose()


@contextmanager
def _no_gc_pauses() -> Iterator[None]:
    """Pause the cyclic garbage collector while a document's objects are built.

    A policy builds only acyclic objects (nodes, dicts, models), but millions of them: every generation-2
    collection rescans all of them, which made validation of 120,000 budgets take minutes instead of seconds.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse_policy(text: str, source_name: str = "<policy>") -> Policy:
    """Validate a YAML policy; every problem is reported as ``source:line: field: message``.

    Linear in the size of the document: one libyaml parse, one construction, one pydantic validation.
    """
    with _no_gc_pauses():
        return _parse_policy(text, source_name)


def _parse_policy(text: str, source_name: str) -> Policy:
    try:
        root, data = _compose_and_construct(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise PolicyError([f"{source_name}:{line}: YAML syntax: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([f"{source_name}:1: YAML syntax: {exc}"]) from None
    duplicates, shared = _duplicate_keys(root)
    if shared and (problem := _alias_expansion_problem(root)):
        raise PolicyError([f"{source_name}:1: YAML aliases: {problem}"])
    if duplicates:
        raise PolicyError([f"{source_name}:{line}: {field}: {message}" for line, field, message in duplicates])
    if data is None:
        empty = "the file is empty (no YAML document); a policy without any rule is written as {}"
        raise PolicyError([f"{source_name}:1: (policy): {empty}"])
    if not isinstance(data, dict):
        raise PolicyError([f"{source_name}:1: (policy): the policy must be a YAML mapping"])
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            node = _node_for(root, loc)
            line = node.start_mark.line + 1 if node is not None else 1
            field = ".".join(str(p) for p in loc) or "(policy)"
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden" and loc:
                known = [name for name in _policy_field_names() if name != loc[-1]]  # (a field of another section)
                close = difflib.get_close_matches(str(loc[-1]), known, n=1)
                message = f"unknown field {loc[-1]!r}" + (f" (did you mean {close[0]}?)" if close else "")
            problems.append(f"{source_name}:{line}: {field}: {message}")
        raise PolicyError(problems) from None


@lru_cache(maxsize=1)
def _policy_field_names() -> tuple[str, ...]:
    """Every field name a policy may use, at any depth: what an unknown field is most likely a typo of."""
    names: set[str] = set()
    pending: list[Any] = [Policy]
    seen: set[Any] = set()
    while pending:
        annotation = pending.pop()
        if annotation in seen:
            continue
        seen.add(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for name, info in annotation.model_fields.items():
                names.add(info.alias or name)
                pending.append(info.annotation)
        else:
            pending.extend(typing.get_args(annotation))
    return tuple(sorted(names))


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read policy: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        problem = f"{path}:{line}: encoding: byte 0x{raw[exc.start]:02x} at column {column} is not valid UTF-8"
        raise PolicyError([problem]) from None
    return parse_policy(text, str(path))


def policy_from_json(document: str) -> Policy:
    """Rebuild a policy from ``Policy.to_json()`` (what ``spendstream.policy`` records carry)."""
    return parse_policy(document, "<policy record>")

"""The ``routing:`` section of the policy file: model tiers per environment, the provider matrix, budget rules.

Example (see ``infra/policy/default.yaml``)::

    routing:
      environments:
        development:            # free or local models only
          local_only: true
          tiers:
            simple: [local/llama-3.2-1b]
            medium: [local/llama-3.2-3b]
            complex: [local/llama-3.2-3b]
        production:
          tiers:
            simple: [openai/gpt-4o-mini, anthropic/claude-3-haiku]
            medium: [openai/gpt-4o-mini, anthropic/claude-3-5-haiku]
            complex: [openai/gpt-4o, anthropic/claude-3-5-sonnet]
      providers:
        openai: {priority: 1, monthly_budget_usd: 20000}
        anthropic: {priority: 2}
        local: {priority: 3, local: true}
      weights: {cost: 0.5, latency: 0.2, error_rate: 0.2, priority: 0.1}
      budget_rules:
        - {remaining_at_most: 0.20, downgrade_steps: 1}

A candidate is ``provider/model``; the provider part must be a key of ``providers``, and provider names are the
gateway's provider names (its ``providers`` configuration), since the gateway forwards to them. Every check that can
be made without traffic (unknown provider, a non-local provider in a ``local_only`` environment, an empty tier,
duplicate rules) fails validation, so a bad routing section never reaches a gateway. Ratios are Decimals like the
rest of the policy; money is integer nano-USD.
"""

from __future__ import annotations

from decimal import Decimal
from functools import cached_property
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spendstream.core.pricing import usd_to_nanos

# Task complexity tiers, cheapest first (the order is the downgrade order). The gateway's classifier names the
# same tiers (``spendstream.gateway.complexity.Tier``); edges do not import the processor, so both spell them out.
TIER_NAMES = ("simple", "medium", "complex")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Candidate(NamedTuple):
    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


def parse_candidate(value: str) -> Candidate:
    provider, sep, model = value.partition("/")
    if not sep or not provider or not model or any(c.isspace() for c in value):
        raise ValueError(f"candidate {value!r} must be provider/model, e.g. openai/gpt-4o-mini")
    return Candidate(provider, model)


class Tiers(_Model):
    """Candidate models per tier, as ``provider/model`` strings; every tier needs at least one."""

    simple: list[str] = Field(min_length=1)
    medium: list[str] = Field(min_length=1)
    complex: list[str] = Field(min_length=1)

    @field_validator("simple", "medium", "complex")
    @classmethod
    def _candidates(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_candidate(item)
        if len(value) != len(set(value)):
            raise ValueError("a tier lists the same candidate twice")
        return value

    @cached_property
    def parsed(self) -> dict[str, tuple[Candidate, ...]]:
        """Candidates per tier, parsed once (the gateway asks on every routed request)."""
        return {tier: tuple(map(parse_candidate, getattr(self, tier))) for tier in ("simple", "medium", "complex")}

    def of(self, tier: str) -> tuple[Candidate, ...]:
        return self.parsed[str(tier)]


class EnvironmentRouting(_Model):
    """Routing of one environment. ``local_only`` restricts it to providers marked ``local`` (free or self-hosted);
    ``allowed_providers`` (if given) restricts it further."""

    tiers: Tiers
    local_only: bool = False
    allowed_providers: list[str] | None = None


class ProviderSpec(_Model):
    """One row of the provider matrix. Lower ``priority`` is preferred. A provider whose spend in the current
    calendar month (policy timezone) reached ``monthly_budget`` is not routed to while another candidate remains."""

    priority: int = Field(1, ge=0)
    local: bool = Field(False, description="Free or self-hosted: allowed in local_only environments.")
    monthly_budget_usd: Decimal | None = Field(None, exclude=True, ge=0)
    monthly_budget_nanos: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _to_nanos(self) -> ProviderSpec:
        if self.monthly_budget_usd is not None and self.monthly_budget_nanos is not None:
            raise ValueError("give monthly_budget_usd or monthly_budget_nanos, not both")
        if self.monthly_budget_usd is not None:
            object.__setattr__(self, "monthly_budget_nanos", usd_to_nanos(self.monthly_budget_usd))
            object.__setattr__(self, "monthly_budget_usd", None)
        return self


class Weights(_Model):
    """Weights of the provider score (lower score wins); they need not sum to 1, they are normalised."""

    cost: Decimal = Field(Decimal("0.5"), ge=0)
    latency: Decimal = Field(Decimal("0.2"), ge=0)
    error_rate: Decimal = Field(Decimal("0.2"), ge=0)
    priority: Decimal = Field(Decimal("0.1"), ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> Weights:
        if self.cost + self.latency + self.error_rate + self.priority == 0:
            raise ValueError("at least one weight must be positive")
        return self


class BudgetRule(_Model):
    """When the remaining budget fraction is at most ``remaining_at_most``, route ``downgrade_steps`` tiers
    cheaper. (The edge learns the fraction from enforcement decisions: an ``alert`` decision at the default 0.80
    threshold means at most 0.20 remains.)"""

    remaining_at_most: Decimal = Field(gt=0, le=1)
    downgrade_steps: int = Field(1, ge=1, le=len(TIER_NAMES) - 1)


class RoutingPolicy(_Model):
    environments: dict[str, EnvironmentRouting] = Field(min_length=1)
    default_environment: str | None = Field(
        None, description="Environment whose routing applies to requests without an environment (None: no routing)."
    )
    providers: dict[str, ProviderSpec] = Field(min_length=1)
    weights: Weights = Field(default_factory=Weights)
    budget_rules: list[BudgetRule] = Field(default_factory=lambda: [BudgetRule(remaining_at_most=Decimal("0.20"))])
    allow_upgrade: bool = Field(
        False, description="Route to a model estimated dearer than the requested one (False: keep the requested)."
    )
    default_output_tokens: int = Field(
        500, ge=1, description="Output tokens assumed for cost estimates when the request sets no max_tokens."
    )
    unknown_latency_ms: int = Field(
        2000, ge=0, description="Latency assumed for a provider/model with too few observations."
    )
    min_samples: int = Field(20, ge=1, description="Observations needed before latency and error rate count.")
    max_error_rate: Decimal = Field(
        Decimal("0.5"), gt=0, le=1, description="Candidates failing more often are skipped while others remain."
    )

    @model_validator(mode="after")
    def _check(self) -> RoutingPolicy:
        problems = []
        for env_name, env in self.environments.items():
            for provider in env.allowed_providers or ():
                if provider not in self.providers:
                    problems.append(f"environments.{env_name}.allowed_providers: unknown provider {provider!r}")
            for tier in TIER_NAMES:
                for candidate in env.tiers.of(tier):
                    where = f"environments.{env_name}.tiers.{tier}: {candidate}"
                    spec = self.providers.get(candidate.provider)
                    if spec is None:
                        problems.append(f"{where}: provider {candidate.provider!r} is not in providers")
                    elif env.local_only and not spec.local:
                        problems.append(f"{where}: environment is local_only but provider is not local")
                    elif env.allowed_providers is not None and candidate.provider not in env.allowed_providers:
                        problems.append(f"{where}: provider is not in allowed_providers")
        if self.default_environment is not None and self.default_environment not in self.environments:
            problems.append(f"default_environment {self.default_environment!r} is not in environments")
        thresholds = [r.remaining_at_most for r in self.budget_rules]
        if len(thresholds) != len(set(thresholds)):
            problems.append("budget_rules: two rules have the same remaining_at_most")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def environment(self, name: str) -> EnvironmentRouting | None:
        """The routing of an environment; an empty name falls back to ``default_environment``."""
        if not name:
            return self.environments.get(self.default_environment) if self.default_environment else None
        return self.environments.get(name)

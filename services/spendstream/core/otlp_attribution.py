"""The policy's ``otlp:`` section: which OpenTelemetry attributes attribute a GenAI span (docs/architecture.md §5).

A span ingested on ``POST /v1/traces`` is charged to the attribution its resource and span attributes name:

```yaml
otlp:
  service_name: feature        # service.name -> feature (default), project, or none
  attributes:                  # attribute -> attribution field; a span attribute wins over a resource one
    deployment.environment.name: environment
    team: team
```

Without the section the defaults below apply. Part of the policy, so a bad mapping is reported like every
other policy problem (``policy.yaml:7: otlp.attributes.team: Input should be 'org', 'division', ...``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

AttributionField = Literal["org", "division", "team", "project", "feature", "user", "customer", "environment"]
AttributeName = Annotated[str, StringConstraints(min_length=1, max_length=255, strip_whitespace=True)]

DEFAULT_ATTRIBUTES: dict[str, AttributionField] = {
    "deployment.environment.name": "environment",
    "deployment.environment": "environment",  # the name before semantic conventions 1.27
    "team": "team",
}


class OtlpAttribution(BaseModel):
    """How a GenAI span's attributes become a usage event's attribution."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    service_name: Literal["feature", "project", "none"] = "feature"
    attributes: dict[AttributeName, AttributionField] = Field(default_factory=lambda: dict(DEFAULT_ATTRIBUTES))


DEFAULT_OTLP_ATTRIBUTION = OtlpAttribution()

"""Who an LLM call is charged to: the eight attribution fields, declared once.

A usage event carries them (``UsageEvent``, in the schema's order), a gateway virtual key fixes them for its
callers (``VirtualKey``), ``instrument()`` and the Enforcer take them per client or per request, and every
dimension a policy scope may name is one of them (or ``model``). ``HIERARCHY`` is the part a policy's parent map
fills in (a team's division and org); the others are counted as given.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict


class Attribution(BaseModel):
    """The attribution of a call; an empty field attributes nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    org: str = ""
    division: str = ""
    team: str = ""
    project: str = ""
    feature: str = ""
    user: str = ""
    customer: str = ""
    environment: str = ""

    def as_dict(self) -> dict[str, str]:
        """The eight fields by name, in ``ATTRIBUTION_FIELDS`` order (empty ones included)."""
        return {name: getattr(self, name) for name in ATTRIBUTION_FIELDS}


ATTRIBUTION_FIELDS: tuple[str, ...] = tuple(Attribution.model_fields)
HIERARCHY = ("org", "division", "team", "project")
DIRECT_FIELDS = tuple(name for name in ATTRIBUTION_FIELDS if name not in HIERARCHY)
DIMENSIONS = (*ATTRIBUTION_FIELDS, "model")  # what a scope ``dimension:value`` may name
_SCOPE_RE = re.compile(rf"^({'|'.join(DIMENSIONS)}):(\*|[^\s*]+)$")


def check_scope(value: str) -> str:
    """A scope as policies, notifications and budget requests name it: ``dimension:value`` or ``dimension:*``."""
    if not _SCOPE_RE.match(value):
        raise ValueError(f"scope must be dimension:value or dimension:* with dimension one of {', '.join(DIMENSIONS)}")
    return value

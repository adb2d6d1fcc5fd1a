"""Who an LLM call is charged to: the eight attribution fields, declared once.

A usage event carries them (``UsageEvent``, in the schema's order), a gateway virtual key fixes them for its
callers (``VirtualKey``), ``instrument()`` and the Enforcer take them per client or per request, and every
dimension a policy scope may name is one of them (or ``model``). ``HIERARCHY`` is the part a policy's parent map
fills in (a team's division and org); the others are counted as given.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

from spendstream.core.matching import model_scope_name

# Names, not text: a longer one is a bug or an attack (a scope key of megabytes stalls whatever carries it).
MAX_NAME_CHARS = 256
WILDCARD_VALUE = "*"  # a policy's scope template ("user:*"): never the value of one call's attribution


def template_value_text(field: str) -> str:
    """Why ``*`` is refused as ``field``'s value (the edges, the ingest API, the processor and the sink say it so)."""
    return f"{field} '*' names every {field} (a policy template), not the one that made this call"


def name_too_long_text(field: str, length: int | str) -> str:
    """Why a name of ``length`` characters is refused (``length`` may be SQL that computes it)."""
    return f"{field} is longer than {MAX_NAME_CHARS} characters ({length})"


def attribution_value_problem(field: str, value: str) -> str | None:
    """Why ``value`` cannot attribute a call, or None: ``*`` would make the scope ``user:*``, the policy's template
    for every user (its spend would stop them all); surrounding spaces, an invisible character or another Unicode
    spelling of the same text make a name that looks like one a policy names but escapes its scope
    (``"product "``, ``"product\u200b"`` and a decomposed ``"équipe"`` are not ``team:product``/``team:équipe``);
    and a name is at most ``MAX_NAME_CHARS`` characters."""
    if value == WILDCARD_VALUE:
        return template_value_text(field)
    if value != value.strip():
        return f"{field} {value[:40]!r} has leading or trailing whitespace, so no policy scope would match it"
    if len(value) > MAX_NAME_CHARS:
        return name_too_long_text(field, len(value))
    if not value.isprintable():  # control and format characters (zero-width, bidi), separators other than space
        hidden = next(char for char in value if not char.isprintable())
        return (
            f"{field} {value[:40]!r} contains the invisible or control character U+{ord(hidden):04X}, so it would "
            "look like a name a policy scope names without being it"
        )
    if not value.isascii() and not unicodedata.is_normalized("NFC", value):
        return (
            f"{field} {value[:40]!r} is not in Unicode normal form NFC (the same text spelt with other code points "
            "would be another scope): normalise it to NFC"
        )
    return None


def _attribution_value(value: str, info: ValidationInfo) -> str:
    problem = attribution_value_problem(info.field_name or "value", value)
    if problem:
        raise ValueError(problem)
    return value


AttributionValue = Annotated[str, AfterValidator(_attribution_value)]


class Attribution(BaseModel):
    """The attribution of a call; an empty field attributes nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    org: AttributionValue = ""
    division: AttributionValue = ""
    team: AttributionValue = ""
    project: AttributionValue = ""
    feature: AttributionValue = ""
    user: AttributionValue = ""
    customer: AttributionValue = ""
    environment: AttributionValue = ""

    def as_dict(self) -> dict[str, str]:
        """The eight fields by name, in ``ATTRIBUTION_FIELDS`` order (empty ones included)."""
        return {name: getattr(self, name) for name in ATTRIBUTION_FIELDS}


ATTRIBUTION_FIELDS: tuple[str, ...] = tuple(Attribution.model_fields)
HIERARCHY = ("org", "division", "team", "project")
DIRECT_FIELDS = tuple(name for name in ATTRIBUTION_FIELDS if name not in HIERARCHY)
DIMENSIONS = (*ATTRIBUTION_FIELDS, "model")  # what a scope ``dimension:value`` may name
_SCOPE_RE = re.compile(rf"^({'|'.join(DIMENSIONS)}):(\*|[^\s*]+)$")


def check_scope(value: str) -> str:
    """A scope as policies, notifications and budget requests name it: ``dimension:value`` or ``dimension:*``; a
    model by the name its scope goes by (``core.matching.model_scope_name``), so what a rule names is what it
    holds."""
    if not _SCOPE_RE.match(value):
        raise ValueError(f"scope must be dimension:value or dimension:* with dimension one of {', '.join(DIMENSIONS)}")
    dimension, _, name = value.partition(":")
    if dimension == "model" and not (name.isascii() and name.isprintable()):
        raise ValueError(
            f"{value!r}: model names are printable ASCII (a look-alike character would name a model no call is made "
            "to: the gateway refuses such names)"
        )
    if dimension == "model" and name != "*" and (canonical := model_scope_name(name)) != name:
        raise ValueError(
            f"write model:{canonical}: a model's scope is its name without capitals, a provider's prefix or a dated "
            f"snapshot or -latest suffix, and it holds for all of them ({value} would be read as model:{canonical})"
        )
    return value

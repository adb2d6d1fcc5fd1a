"""Which models and scopes a policy entry covers: the one matcher of the processor, the Enforcer and the gateway.

- Model lists (``allowed_models``, a Decision's ``allowed_models``) hold names and globs: ``*`` matches any run
  of characters, ``/`` included (``local/*``, ``llama-*``, ``gpt-4o*``); every other character is literal and
  matching is case-sensitive. ``ModelMatcher`` compiles a list once (one regular expression for all its globs)
  and remembers its answer per model name.
- A model's scope (``model:gpt-4o``) is named by ``model_scope_name``: the model without its provider's dated
  snapshot or ``-latest`` suffix, a registered provider's ``openai/`` prefix, surrounding spaces or capitals, so
  a budget, quota or decision on ``model:gpt-4o`` holds for ``gpt-4o-2024-08-06``, ``GPT-4o`` and
  ``openai/gpt-4o`` alike, whichever name the client asked for and the provider answered with.
- Scope patterns are ``dimension:value`` or the template ``dimension:*`` (every value of the dimension);
  ``scope_matches`` says whether a pattern covers a concrete scope, ``template_of`` names a scope's template, and
  ``ScopeSet`` compiles a list of patterns for a lookup per request (the gateway's cache opt-in).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache

from spendstream.core.providers.registry import provider_names

GLOB = "*"

# A provider's dated snapshot or alias of a model (``gpt-4o-2024-08-06``, ``claude-3-5-sonnet-20241022``,
# ``claude-3-5-sonnet-latest``, ``gpt-4-0613``): the same model to a policy that names ``gpt-4o``.
_SNAPSHOT_SUFFIX = re.compile(r"-(?:20\d\d-?\d\d-?\d\d|\d{4}|latest)$")


def base_model(model: str) -> str:
    """``model`` without a provider's snapshot date or ``-latest`` alias suffix."""
    return _SNAPSHOT_SUFFIX.sub("", model)


# Where a model is named through a router or a cloud rather than its maker: ``openrouter/openai/gpt-4o``,
# ``bedrock/...``, ``vertex_ai/...`` (a registered provider's name, ``openai/``, too).
_ROUTERS = frozenset({"openrouter", "bedrock", "vertex_ai", "vertex", "azure_ai", "litellm", "litellm_proxy", "models"})
# Bedrock's model ids: ``anthropic.claude-3-5-sonnet-20241022-v2:0``, with an inference profile's region (``us.``,
# ``apac.``, ``us-gov.``, ``global.``), or as an ARN (``arn:aws:bedrock:...:foundation-model/<id>``).
_BEDROCK_ID = re.compile(r"^(?:[a-z-]+\.)?(?:anthropic|meta|mistral|amazon|cohere|ai21|deepseek)\.(.+?)(?::\d+)?$")
# Vertex's ``@20241022`` snapshot, a tag that names no size (``:latest``, OpenRouter's ``:beta``, ``:nitro``,
# ``:free``; ``llama3:8b`` is another model), a ``-v2`` revision of a snapshot.
_VERSION_SUFFIX = re.compile(r"(?:@[\w.-]+|:(?:latest|beta|nitro|floor|online|extended|free|thinking)|-v\d+)$")
_DATED_SUFFIX = re.compile(r"[-.](?:20\d\d-?\d\d-?\d\d|\d{4}|latest)$")


@lru_cache(maxsize=4096)
def model_scope_name(model: str) -> str:
    """The value of ``model``'s scope: the model its maker names, whatever spelling a client, a router or a
    provider used (a budget on ``gpt-4o`` let ``gpt-4o-2024-08-06``, ``claude-3.5-sonnet`` or Bedrock's
    ``anthropic.claude-3-5-sonnet-20241022-v2:0`` through; attacker sessions), so the name requested and the name
    served land in one scope: compatibility forms folded (fullwidth letters), lower-cased, stripped, without a
    router's or provider's prefixes (``openrouter/openai/``, ``openai:``), Bedrock's and Vertex's id forms, or a
    dated snapshot, ``-latest``, ``@date`` or ``-v2`` suffix; Claude's ``3.5`` is its maker's ``3-5``. A
    fine-tune (``ft:gpt-4o-...``) is a model of its own."""
    name = unicodedata.normalize("NFKC", model).strip().lower()
    if name.startswith("arn:"):
        name = name.rpartition("/")[2]
    while True:
        head, separator, rest = name.partition("/") if "/" in name else name.partition(":")
        if not (separator and rest and (head in _ROUTERS or head in provider_names() or not head)):
            break
        name = rest.lstrip("/")
    bedrock = _BEDROCK_ID.match(name)
    if bedrock:
        name = bedrock[1]
    for suffix in (_VERSION_SUFFIX, _DATED_SUFFIX, _VERSION_SUFFIX):
        name = suffix.sub("", name) or name
    if name.startswith("claude-"):
        name = re.sub(r"(?<=\d)\.(?=\d)", "-", name)
    return name or model


def is_glob(entry: str) -> bool:
    return GLOB in entry


def _glob_regex(entry: str) -> str:
    return ".*".join(re.escape(part) for part in entry.split(GLOB))


_MEMO_MAX = 4096  # models remembered per list (the names a deployment calls are few)


class ModelMatcher:
    """A compiled model list: ``model in matcher`` is True for an exact entry or a glob that matches.

    Answers are remembered per model name, so the request path pays one dict lookup, not a regex match.
    """

    __slots__ = ("_exact", "_glob", "_memo", "entries")

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries: tuple[str, ...] = tuple(dict.fromkeys(entries))
        self._exact = frozenset(e for e in self.entries if not is_glob(e))
        globs = [_glob_regex(e) for e in self.entries if is_glob(e)]
        self._glob = re.compile("|".join(globs), re.DOTALL).fullmatch if globs else None
        self._memo: dict[object, bool] = {}

    def __contains__(self, model: object) -> bool:
        found = self._memo.get(model)
        if found is None:
            found = model in self._exact or (
                self._glob is not None and isinstance(model, str) and self._glob(model) is not None
            )
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[model] = found
        return found

    def __repr__(self) -> str:
        return f"ModelMatcher({list(self.entries)!r})"

    def describe(self) -> str:
        """The entries, sorted, for messages (``llama-3.2-1b, local/*``)."""
        return ", ".join(sorted(self.entries))


def template_of(scope: str) -> str:
    """``user:u1`` -> ``user:*``: the template whose budgets, quotas and lists every user gets."""
    return scope.partition(":")[0] + ":" + GLOB


def is_template(pattern: str) -> bool:
    return pattern.endswith(":" + GLOB)


def scope_matches(pattern: str, scope: str) -> bool:
    """Does ``pattern`` (``team:web``, ``team:*`` or the global ``*``) cover the concrete ``scope``?"""
    if pattern in (scope, GLOB):
        return True
    return is_template(pattern) and scope.startswith(pattern[:-1]) and len(scope) > len(pattern) - 1


class ScopeSet:
    """Scope patterns compiled once: ``covers(dimension, value)`` is ``scope_matches`` against any of them, for
    one concrete scope, in a set lookup or two."""

    __slots__ = ("_everything", "_templates", "_values")

    def __init__(self, patterns: Iterable[str]) -> None:
        values: dict[str, set[str]] = {}
        templates: dict[str, set[str]] = {}  # dimension -> the value prefixes before the ``*`` (mostly ``""``)
        self._everything = False
        for pattern in patterns:
            dimension, _, value = pattern.partition(":")
            if pattern == GLOB:
                self._everything = True
            elif is_template(pattern):
                templates.setdefault(dimension, set()).add(value[:-1])
            else:
                values.setdefault(dimension, set()).add(value)
        self._templates = {dimension: tuple(found) for dimension, found in templates.items()}
        self._values = {dimension: frozenset(found) for dimension, found in values.items()}

    def __bool__(self) -> bool:
        return self._everything or bool(self._templates) or bool(self._values)

    def covers(self, dimension: str, value: str) -> bool:
        if not value:
            return False
        if self._everything:
            return True
        found = self._values.get(dimension)
        if found is not None and value in found:
            return True
        prefixes = self._templates.get(dimension, ())
        return any(value.startswith(prefix) and len(value) > len(prefix) for prefix in prefixes)

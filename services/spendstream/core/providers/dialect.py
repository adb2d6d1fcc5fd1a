"""What a provider kind's API looks like to spendstream: one ``Dialect`` subclass per kind.

A dialect knows the provider's usage block (and turns it into spendstream's token convention), the usage
carried by its stream events, its SDK's response objects (for ``instrument()``), the gateway endpoints it
serves and how it counts cached tokens. Pricing, the gateway and ``instrument()`` ask the registry
(:mod:`spendstream.core.providers`) for the dialect instead of knowing providers themselves, so adding a
provider is one module that registers one dialect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol


class NormalisedUsage(NamedTuple):
    """Token counts in spendstream's convention: ``input_tokens`` includes ``cached_read`` and ``cache_write``."""

    input_tokens: int
    cached_read: int
    cache_write: int
    output_tokens: int


class UsageDetail(NamedTuple):
    """What a call used beyond the four counts: each token count is part of one of them (audio and image prompt
    tokens are the uncached ones), web searches are priced per search, and the service tier picks the price list
    (``batch`` for the batch API, ``flex`` or ``priority``; empty for the standard one)."""

    reasoning_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    input_image_tokens: int = 0
    output_image_tokens: int = 0
    cache_write_1h_tokens: int = 0
    web_search_requests: int = 0
    service_tier: str = ""


NO_DETAIL = UsageDetail()
# Names providers give their standard tier: the standard price list.
_STANDARD_TIERS = frozenset({"", "default", "standard", "auto", "on_demand"})


def service_tier(value: Any) -> str:
    """A provider's service tier as spendstream names it ("" for the standard one)."""
    tier = str(value or "").lower()
    return "" if tier in _STANDARD_TIERS else tier


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A path the gateway serves for this kind; ``name`` is the ``endpoint`` tag of its usage events."""

    path: str
    name: str
    streams: bool = True
    include_usage: bool = False  # OpenAI's stream_options.include_usage applies
    routable: bool = True  # cost-aware routing and the response cache apply (not to embeddings)


@dataclass(frozen=True, slots=True)
class SdkResource:
    """A ``create`` method of the kind's SDK client that ``instrument()`` wraps: where it is, and its tag."""

    path: tuple[str, ...]
    endpoint: str
    include_usage: bool = False


class StreamState(Protocol):
    """What a stream meter keeps while a stream passes: the usage block so far, the served model, and whether
    the usage block that closes the stream arrived."""

    usage: dict[str, Any]
    usage_final: bool
    model: str


def count(raw: Mapping[str, Any], *path: str) -> int:
    """A token count at ``path`` in a usage block (0 when absent); a negative count is a broken upstream."""
    value: Any = raw
    for key in path:
        if type(value) is not dict and not isinstance(value, Mapping):  # (dict first: the ABC check is slow)
            return 0
        value = value.get(key)
    if value is None:
        return 0
    tokens = int(value)
    if tokens < 0:
        raise ValueError(f"negative token count at {'.'.join(path)}: {tokens}")
    return tokens


def as_dict(usage: Any) -> dict[str, Any]:
    """An SDK usage object (pydantic model) or dict as a plain dict."""
    if usage is None:
        return {}
    if isinstance(usage, dict):
        return usage
    dump = getattr(usage, "model_dump", None)
    return dump() if dump is not None else {}


class Dialect:
    """The OpenAI-compatible baseline; a provider kind overrides what its API does differently."""

    kind: ClassVar[str]
    providers: ClassVar[frozenset[str]]  # provider names whose usage blocks this dialect reads
    sdk_module: ClassVar[str] = ""  # top-level module of the SDK client ``instrument()`` wraps ("" for none)
    sdk_resources: ClassVar[tuple[SdkResource, ...]] = ()
    endpoints: ClassVar[tuple[Endpoint, ...]] = ()
    stream_markers: ClassVar[tuple[bytes, ...]] = (b'"usage"',)  # bytes of a stream event that may carry usage

    def usage(self, raw: Mapping[str, Any]) -> NormalisedUsage:
        """The usage block in spendstream's convention (input includes cached reads and cache writes)."""
        raise NotImplementedError

    def detail(self, raw: Mapping[str, Any]) -> UsageDetail:
        """Reasoning, audio and image tokens, 1-hour cache writes, web searches and tier in the usage block."""
        return NO_DETAIL

    def response_usage(self, payload: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        """(usage block, served model) of a non-streamed JSON response."""
        usage = payload.get("usage")
        return (usage if isinstance(usage, dict) else {}), str(payload.get("model") or "")

    def stream_event(self, state: StreamState, payload: Mapping[str, Any]) -> bool:
        """Record the usage and model of one parsed stream event; True if it carries usage and nothing else."""
        state.model = state.model or str(payload.get("model") or "")
        usage = payload.get("usage")
        if isinstance(usage, dict):
            state.usage = usage
            state.usage_final = True
            return not payload.get("choices")
        return False

    def estimated_usage(
        self, state: StreamState, prompt_tokens: Callable[[], int], output_tokens: int
    ) -> dict[str, Any]:
        """A usage block for a stream cut short before its closing usage: estimated token counts."""
        return {"prompt_tokens": prompt_tokens(), "completion_tokens": output_tokens}

    def sdk_item(self, item: Any, usage: dict[str, Any], served: str) -> tuple[dict[str, Any], str]:
        """(usage, served model) after an SDK response or stream item."""
        seen = getattr(item, "usage", None)
        return (as_dict(seen) if seen is not None else usage), getattr(item, "model", None) or served

    def sdk_usage_only(self, item: Any) -> bool:
        """An SDK stream item that carries usage and nothing else (one the caller did not ask for)."""
        return getattr(item, "usage", None) is not None and not getattr(item, "choices", None)

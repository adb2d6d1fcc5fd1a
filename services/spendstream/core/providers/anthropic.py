"""Anthropic Messages API (direct, on Bedrock and on Vertex).

``input_tokens`` EXCLUDES ``cache_read_input_tokens`` and ``cache_creation_input_tokens``, so both are added
to reach spendstream's convention. A stream reports usage twice: ``message_start`` carries the input counts
(and a first output count), ``message_delta`` the final cumulative counts. ``cache_creation`` splits cache
writes by TTL (``ephemeral_5m_input_tokens``, ``ephemeral_1h_input_tokens``: the 1-hour ones cost more),
``server_tool_use.web_search_requests`` counts web searches, and ``service_tier`` says ``batch`` for the
Message Batches API. Thinking tokens are output tokens, not counted apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from spendstream.core.providers.dialect import (
    Dialect,
    Endpoint,
    NormalisedUsage,
    SdkResource,
    StreamState,
    UsageDetail,
    as_dict,
    count,
    service_tier,
)
from spendstream.core.providers.registry import register


class AnthropicDialect(Dialect):
    kind = "anthropic"
    providers = frozenset({"anthropic", "bedrock-anthropic", "anthropic-vertex"})
    sdk_module = "anthropic"
    sdk_resources = (SdkResource(("messages",), "messages"),)
    endpoints = (Endpoint("/v1/messages", "messages"),)

    def usage(self, raw: Mapping[str, Any]) -> NormalisedUsage:
        read = count(raw, "cache_read_input_tokens")
        write = count(raw, "cache_creation_input_tokens")
        return NormalisedUsage(count(raw, "input_tokens") + read + write, read, write, count(raw, "output_tokens"))

    def detail(self, raw: Mapping[str, Any]) -> UsageDetail:
        return UsageDetail(
            cache_write_1h_tokens=count(raw, "cache_creation", "ephemeral_1h_input_tokens"),
            web_search_requests=count(raw, "server_tool_use", "web_search_requests"),
            service_tier=service_tier(raw.get("service_tier")),
        )

    def stream_event(self, state: StreamState, payload: Mapping[str, Any]) -> bool:
        message = payload.get("message")
        if isinstance(message, dict):
            state.model = state.model or str(message.get("model") or "")
            if isinstance(message.get("usage"), dict):
                state.usage.update(message["usage"])
        if isinstance(payload.get("usage"), dict):
            state.usage.update({k: v for k, v in payload["usage"].items() if v is not None})
            state.usage_final = state.usage_final or payload.get("type") == "message_delta"
        return False

    def estimated_usage(
        self, state: StreamState, prompt_tokens: Callable[[], int], output_tokens: int
    ) -> dict[str, Any]:
        """The opening usage block's input counts (exact), output at least what the text forwarded amounts to."""
        usage = dict(state.usage)
        if not isinstance(usage.get("input_tokens"), int):
            usage["input_tokens"] = prompt_tokens()
        opening = usage.get("output_tokens")
        usage["output_tokens"] = max(opening if isinstance(opening, int) else 0, output_tokens)
        return usage

    def sdk_item(self, item: Any, usage: dict[str, Any], served: str) -> tuple[dict[str, Any], str]:
        message = getattr(item, "message", None)
        if message is not None:  # message_start
            return {**usage, **as_dict(getattr(message, "usage", None))}, getattr(message, "model", None) or served
        if getattr(item, "type", None) == "message":  # a whole (non-streamed) message
            return {**usage, **as_dict(getattr(item, "usage", None))}, getattr(item, "model", None) or served
        delta = {k: v for k, v in as_dict(getattr(item, "usage", None)).items() if v is not None}
        return ({**usage, **delta} if delta else usage), served

    def sdk_usage_only(self, item: Any) -> bool:
        return False


ANTHROPIC = register(AnthropicDialect())

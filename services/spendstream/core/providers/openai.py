"""OpenAI and OpenAI-compatible APIs: chat completions, completions, embeddings and the Responses API.

Cached reads are already inside the prompt count (``prompt_tokens_details.cached_tokens`` is a subset of
``prompt_tokens``, ``input_tokens_details.cached_tokens`` of ``input_tokens``); OpenAI bills no cache writes.
Streams carry usage only in a last chunk, and only when the request set ``stream_options.include_usage``.
Reasoning and audio tokens are in ``completion_tokens_details`` / ``output_tokens_details`` (parts of the output)
and ``prompt_tokens_details`` (audio prompt tokens; the Realtime API says which cached tokens were audio).
The service tier and the Responses API's web searches are not in the usage block but beside it: they are
copied into it when the response is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spendstream.core.providers.dialect import (
    Dialect,
    Endpoint,
    NormalisedUsage,
    SdkResource,
    StreamState,
    UsageDetail,
    count,
    service_tier,
)
from spendstream.core.providers.registry import register


class OpenAIDialect(Dialect):
    kind = "openai"
    providers = frozenset({"openai", "azure", "azure-openai"})
    sdk_module = "openai"
    sdk_resources = (
        SdkResource(("chat", "completions"), "chat.completions", include_usage=True),
        SdkResource(("completions",), "completions", include_usage=True),
        SdkResource(("embeddings",), "embeddings"),
    )
    endpoints = (
        Endpoint("/v1/chat/completions", "chat.completions", include_usage=True),
        Endpoint("/v1/completions", "completions", include_usage=True),
        Endpoint("/v1/embeddings", "embeddings", streams=False, routable=False),
        # Not routed or cached: a response may continue a stored one (``previous_response_id``) on its provider.
        Endpoint("/v1/responses", "responses", routable=False),
    )

    def usage(self, raw: Mapping[str, Any]) -> NormalisedUsage:
        if "prompt_tokens" in raw:  # chat completions, completions, embeddings
            return NormalisedUsage(
                count(raw, "prompt_tokens"),
                count(raw, "prompt_tokens_details", "cached_tokens"),
                0,
                count(raw, "completion_tokens"),
            )
        return NormalisedUsage(  # Responses API
            count(raw, "input_tokens"),
            count(raw, "input_tokens_details", "cached_tokens"),
            0,
            count(raw, "output_tokens"),
        )

    def detail(self, raw: Mapping[str, Any]) -> UsageDetail:
        chat = "prompt_tokens" in raw
        prompt = "prompt_tokens_details" if chat else "input_tokens_details"
        output = "completion_tokens_details" if chat else "output_tokens_details"
        realtime = "input_token_details" in raw  # the Realtime API's spelling, with cached audio broken out
        audio_in = count(raw, "input_token_details" if realtime else prompt, "audio_tokens")
        cached_audio = count(raw, "input_token_details", "cached_tokens_details", "audio_tokens")
        return UsageDetail(
            reasoning_tokens=count(raw, output, "reasoning_tokens"),
            input_audio_tokens=max(audio_in - cached_audio, 0),
            output_audio_tokens=count(raw, "output_token_details" if realtime else output, "audio_tokens"),
            input_image_tokens=count(raw, prompt, "image_tokens"),
            web_search_requests=count(raw, "web_search_requests"),
            service_tier=service_tier(raw.get("service_tier")),
        )

    def response_usage(self, payload: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        usage, model = super().response_usage(payload)
        return _with_call_fields(usage, payload), model

    def stream_event(self, state: StreamState, payload: Mapping[str, Any]) -> bool:
        usage_only = super().stream_event(state, payload)
        if isinstance(payload.get("usage"), dict):
            state.usage = _with_call_fields(state.usage, payload)
        elif isinstance(payload.get("response"), dict) and isinstance(payload["response"].get("usage"), dict):
            # Responses API stream: response.completed carries the whole response
            state.model = state.model or str(payload["response"].get("model") or "")
            state.usage, state.usage_final = _with_call_fields(payload["response"]["usage"], payload["response"]), True
        return usage_only

    def sdk_item(self, item: Any, usage: dict[str, Any], served: str) -> tuple[dict[str, Any], str]:
        usage, served = super().sdk_item(item, usage, served)
        tier = service_tier(getattr(item, "service_tier", None))
        return ({**usage, "service_tier": tier} if tier and usage else usage), served


def _with_call_fields(usage: dict[str, Any], response: Mapping[str, Any]) -> dict[str, Any]:
    """The usage block with what the response says beside it: the service tier and the web searches it ran."""
    if not usage:
        return usage
    extra: dict[str, Any] = {}
    tier = service_tier(response.get("service_tier"))
    if tier:
        extra["service_tier"] = tier
    output = response.get("output")
    if isinstance(output, list):
        searches = sum(1 for item in output if isinstance(item, dict) and item.get("type") == "web_search_call")
        if searches:
            extra["web_search_requests"] = searches
    return {**usage, **extra} if extra else usage


OPENAI = register(OpenAIDialect())

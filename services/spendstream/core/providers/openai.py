"""OpenAI and OpenAI-compatible APIs: chat completions, completions, embeddings and the Responses API.

Cached reads are already inside the prompt count (``prompt_tokens_details.cached_tokens`` is a subset of
``prompt_tokens``, ``input_tokens_details.cached_tokens`` of ``input_tokens``); OpenAI bills no cache writes.
Streams carry usage only in a last chunk, and only when the request set ``stream_options.include_usage``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spendstream.core.providers.dialect import Dialect, Endpoint, NormalisedUsage, SdkResource, count
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


OPENAI = register(OpenAIDialect())

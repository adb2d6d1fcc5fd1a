"""Google Gemini (AI Studio and Vertex AI).

``usageMetadata.promptTokenCount`` includes ``cachedContentTokenCount``; thinking tokens
(``thoughtsTokenCount``) are billed as output but are not part of ``candidatesTokenCount``, so they are
added. Every stream chunk carries the cumulative ``usageMetadata``; the served model is ``modelVersion``.
Gemini's OpenAI-compatible endpoint answers with an OpenAI usage block, read as OpenAI's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spendstream.core.providers.dialect import Dialect, NormalisedUsage, StreamState, count
from spendstream.core.providers.openai import OPENAI
from spendstream.core.providers.registry import register


class GoogleDialect(Dialect):
    kind = "google"
    providers = frozenset({"google", "google-gla", "google-vertex", "gemini", "vertex"})
    stream_markers = (b'"usageMetadata"', b'"usage"')

    def usage(self, raw: Mapping[str, Any]) -> NormalisedUsage:
        if "promptTokenCount" not in raw:
            return OPENAI.usage(raw)
        return NormalisedUsage(
            count(raw, "promptTokenCount"),
            count(raw, "cachedContentTokenCount"),
            0,
            count(raw, "candidatesTokenCount") + count(raw, "thoughtsTokenCount"),
        )

    def response_usage(self, payload: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        usage = payload.get("usageMetadata")
        if not isinstance(usage, dict):
            return OPENAI.response_usage(payload)
        return usage, str(payload.get("modelVersion") or "")

    def stream_event(self, state: StreamState, payload: Mapping[str, Any]) -> bool:
        usage = payload.get("usageMetadata")
        if not isinstance(usage, dict):
            return OPENAI.stream_event(state, payload)
        state.model = state.model or str(payload.get("modelVersion") or "")
        state.usage = usage
        state.usage_final = "candidatesTokenCount" in usage or "thoughtsTokenCount" in usage
        return False


GOOGLE = register(GoogleDialect())

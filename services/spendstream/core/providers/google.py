"""Google Gemini (AI Studio and Vertex AI).

``usageMetadata.promptTokenCount`` includes ``cachedContentTokenCount``; thinking tokens
(``thoughtsTokenCount``) are billed as output but are not part of ``candidatesTokenCount``, so they are
added. Every stream chunk carries the cumulative ``usageMetadata``; the served model is ``modelVersion``.
Gemini's OpenAI-compatible endpoint answers with an OpenAI usage block, read as OpenAI's. Token counts by
modality (``promptTokensDetails``, ``cacheTokensDetails``, ``candidatesTokensDetails``: lists of
``{"modality": "AUDIO", "tokenCount": n}``) give the audio and image tokens. Long-context prices (above
200k prompt tokens for Gemini 2.5 Pro) follow from ``promptTokenCount``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spendstream.core.providers.dialect import Dialect, NormalisedUsage, StreamState, UsageDetail, count
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

    def detail(self, raw: Mapping[str, Any]) -> UsageDetail:
        if "promptTokenCount" not in raw:
            return OPENAI.detail(raw)
        prompt = _by_modality(raw.get("promptTokensDetails"))
        cached = _by_modality(raw.get("cacheTokensDetails"))
        output = _by_modality(raw.get("candidatesTokensDetails"))
        return UsageDetail(
            reasoning_tokens=count(raw, "thoughtsTokenCount"),
            input_audio_tokens=max(prompt.get("AUDIO", 0) - cached.get("AUDIO", 0), 0),
            output_audio_tokens=output.get("AUDIO", 0),
            input_image_tokens=max(prompt.get("IMAGE", 0) - cached.get("IMAGE", 0), 0),
            output_image_tokens=output.get("IMAGE", 0),
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


def _by_modality(details: Any) -> dict[str, int]:
    """``[{"modality": "AUDIO", "tokenCount": 7}, ...]`` as ``{"AUDIO": 7, ...}``."""
    found: dict[str, int] = {}
    for item in details if isinstance(details, list) else ():
        if isinstance(item, dict):
            modality = str(item.get("modality") or "")
            found[modality] = found.get(modality, 0) + count(item, "tokenCount")
    return found


GOOGLE = register(GoogleDialect())

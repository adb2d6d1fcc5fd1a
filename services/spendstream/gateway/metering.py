"""Reading usage out of gateway responses, streamed or not (the event itself: ``spendstream.edge.metering``).

Only usage blocks and model names are read from responses: completion text is never kept.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

log = logging.getLogger(__name__)

_EVENT_END = re.compile(rb"\r?\n\r?\n")


def _data_of(event: bytes) -> Any:
    """The JSON payload of one SSE event (its ``data:`` lines joined), or None."""
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        return json.loads(b"\n".join(lines))
    except ValueError:
        return None


class StreamMeter:
    """Reads usage out of an SSE stream while it passes through.

    ``feed`` returns the bytes to forward now: only complete events, so an event can be inspected whole.
    With ``drop_usage_chunk`` the OpenAI usage-only chunk (which the gateway asked for on the client's behalf)
    is not forwarded, so the client sees the stream it asked for.
    """

    def __init__(self, kind: str, drop_usage_chunk: bool = False) -> None:
        self.kind = kind
        self.drop_usage_chunk = drop_usage_chunk
        self.usage: dict[str, Any] = {}
        self.model = ""
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._buffer + chunk
        end, out = 0, []
        for match in _EVENT_END.finditer(data):
            event = data[end : match.end()]
            end = match.end()
            if (b'"usage"' in event or (not self.model and b'"model"' in event)) and self._inspect(event):
                continue
            out.append(event)
        self._buffer = data[end:]
        return b"".join(out)

    def finish(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        if rest and b'"usage"' in rest:
            self._inspect(rest)
        return rest

    def _inspect(self, event: bytes) -> bool:
        """Record usage and model; True if the event must not be forwarded."""
        payload = _data_of(event)
        if not isinstance(payload, dict):
            return False
        if self.kind == "anthropic":
            message = payload.get("message")
            if isinstance(message, dict):
                self.model = self.model or str(message.get("model") or "")
                if isinstance(message.get("usage"), dict):
                    self.usage.update(message["usage"])
            if isinstance(payload.get("usage"), dict):
                self.usage.update({k: v for k, v in payload["usage"].items() if v is not None})
            return False
        self.model = self.model or str(payload.get("model") or "")
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            return self.drop_usage_chunk and not payload.get("choices")
        return False


def usage_of_body(body: bytes) -> tuple[dict[str, Any], str]:
    """(usage block, served model) of a non-streamed JSON response; empty when absent or not JSON."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
        return {}, ""
    if not isinstance(payload, dict):
        return {}, ""
    usage = payload.get("usage")
    return (usage if isinstance(usage, dict) else {}), str(payload.get("model") or "")

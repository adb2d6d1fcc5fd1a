"""Reading usage out of gateway responses, streamed or not (the event itself: ``spendstream.edge.call_event``).

Only usage blocks and model names are read from responses: completion text is never kept. Where a provider
kind keeps them is its dialect's business (``spendstream.core.providers``); this module frames the stream.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

from spendstream.core.events import MAX_EVENT_TOKENS
from spendstream.core.providers import dialect_for, dialect_of_kind

log = logging.getLogger(__name__)

_EVENT_END = re.compile(rb"\r?\n\r?\n")
# Fields of stream events that carry generated text (OpenAI chat and completions, Anthropic deltas).
_TEXT_FIELDS = frozenset({"content", "text", "partial_json", "thinking", "arguments", "refusal", "reasoning_content"})
_HELD_BYTES = 1 << 20  # forwarded bytes kept before their text is counted (a stream cut short is estimated from it)


# Tokens of generated text estimated from its UTF-8 bytes: English runs about 4.5 bytes a token and CJK about 3 (a
# character each), so 3 never estimates a text much below what it was billed (characters / 4 read 4,000 CJK
# characters as 1,000 tokens; an attacker session).
OUTPUT_BYTES_PER_TOKEN = 3


def _text_bytes(value: Any, key: str = "") -> int:
    """UTF-8 bytes of generated text in one parsed stream event or answer (a tool call's arguments included:
    Anthropic's whole ``tool_use`` blocks carry them as an ``input`` object)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass")) if key in _TEXT_FIELDS else 0
    if key == "input" and isinstance(value, dict):
        return len(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(_text_bytes(v, k) for k, v in value.items())
    if isinstance(value, list):
        return sum(_text_bytes(v, key) for v in value)
    return 0


def _event_text_bytes(payload: dict[str, Any]) -> int:
    """UTF-8 bytes of generated text in one stream event. The Responses API repeats its text in the events that
    close an item (``response.output_text.done``, ``response.content_part.done``, ...): only its deltas count."""
    kind = payload.get("type")
    if isinstance(kind, str) and kind.startswith("response."):
        delta = payload.get("delta")
        return _text_bytes(delta, "text") if kind.endswith(".delta") else 0
    return _text_bytes(payload)


def text_tokens(text_bytes: int, at_most: int) -> int:
    """Output tokens estimated from ``text_bytes`` of generated text, at most what the request let the provider
    bill (``at_most``: its ``max_tokens`` times its completions), however much text came back."""
    return min(-(-text_bytes // OUTPUT_BYTES_PER_TOKEN), at_most)


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
        self.dialect = dialect_of_kind(kind)
        self._markers = self.dialect.stream_markers
        self.drop_usage_chunk = drop_usage_chunk
        self.usage: dict[str, Any] = {}
        self.usage_final = False  # the usage block that closes the stream arrived (not only Anthropic's opening one)
        self.model = ""
        self._buffer = b""
        # Forwarded bytes, read for their text only if the stream is cut short (or in batches past _HELD_BYTES).
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._text_bytes = 0

    def feed(self, chunk: bytes) -> bytes:
        data = self._buffer + chunk
        end, out = 0, []
        for match in _EVENT_END.finditer(data):
            event = data[end : match.end()]
            end = match.end()
            if self._may_carry_usage(event) and self._inspect(event):
                continue
            out.append(event)
        self._buffer = data[end:]
        forwarded = b"".join(out)
        if forwarded:
            self._held.append(forwarded)
            self._held_bytes += len(forwarded)
            if self._held_bytes > _HELD_BYTES:
                self._count_held_text()
        return forwarded

    def _may_carry_usage(self, event: bytes) -> bool:
        return any(marker in event for marker in self._markers) or (not self.model and b'"model"' in event)

    def _count_held_text(self) -> None:
        for chunk in self._held:
            for event in _EVENT_END.split(chunk):
                payload = _data_of(event)
                if isinstance(payload, dict):
                    self._text_bytes += _event_text_bytes(payload)
        self._held, self._held_bytes = [], 0

    def usage_so_far(self, prompt_tokens: Callable[[], int], at_most: int) -> tuple[dict[str, Any], bool]:
        """The usage to meter for a stream cut short, and whether it is estimated: the closing usage block if it
        arrived (and counts some), else output tokens estimated from the text forwarded (providers bill what they
        streamed) and input tokens from the opening usage block (Anthropic) or ``prompt_tokens()``."""
        if self.usage_final and _problem(self.dialect.usage, self.dialect.detail, self.usage, self.text_bytes) is None:
            return self.usage, False
        self._count_held_text()
        output = text_tokens(self._text_bytes, at_most)
        return self.dialect.estimated_usage(self, prompt_tokens, output), True

    def text_bytes(self) -> int:
        """UTF-8 bytes of the text forwarded so far."""
        self._count_held_text()
        return self._text_bytes

    def finish(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        if rest and any(marker in rest for marker in self._markers):
            self._inspect(rest)
        return rest

    def _inspect(self, event: bytes) -> bool:
        """Record usage and model; True if the event must not be forwarded."""
        payload = _data_of(event)
        if not isinstance(payload, dict):
            return False
        return self.dialect.stream_event(self, payload) and self.drop_usage_chunk


class _NoStream:
    """What ``Dialect.estimated_usage`` reads of a stream, for a whole answer: no usage block seen."""

    usage: dict[str, Any] = {}  # noqa: RUF012 (read only)
    usage_final = False
    model = ""


def estimated_body_usage(body: bytes, kind: str, prompt_tokens: Callable[[], int], at_most: int) -> dict[str, Any]:
    """A usage block for an answer that carried no usable one: output tokens estimated from the text it returned
    (at most ``at_most``), input tokens from ``prompt_tokens()``. A provider bills what it generated whether or not
    it said so, so such an answer is metered at an estimate, tagged, rather than at $0."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        payload = None
    output = text_tokens(_text_bytes(payload), at_most)
    return dialect_of_kind(kind).estimated_usage(_NoStream(), prompt_tokens, output)


def counts_tokens(usage: dict[str, Any], provider: str, answered_bytes: Callable[[], int] = lambda: 0) -> bool:
    """Whether a usage block is one to meter by (``usage_problem`` finds nothing wrong with it)."""
    return usage_problem(usage, provider, answered_bytes) is None


def usage_problem(usage: dict[str, Any], provider: str, answered_bytes: Callable[[], int] = lambda: 0) -> str | None:
    """Why a usage block is not one to meter by, or None. The answer is then estimated instead of metered at $0 or
    at a token (attacker sessions): an absent block, one of nulls and zeros (no model answers without reading a
    prompt), one whose counts are not whole numbers (``true``, ``1.5``) or are negative or beyond the per-event bound
    anywhere (``reasoning_tokens: -9000``), more cached than input tokens, and one that counts no output tokens for
    an answer with text (``answered_bytes()``: its generated text, asked only then)."""
    dialect = dialect_for(provider)
    return _problem(dialect.usage, dialect.detail, usage, answered_bytes)


def _whole_counts(value: Any, key: str = "") -> bool:
    """Every count of a usage block (``*_tokens``, ``*_requests``) is an int, not a bool or a float."""
    if isinstance(value, dict):
        return all(_whole_counts(v, k) for k, v in value.items())
    if key.endswith(("_tokens", "_requests")) and value is not None:
        return type(value) is int
    return True


def _problem(
    read: Callable[[dict[str, Any]], Any],
    detail: Callable[[dict[str, Any]], Any],
    usage: dict[str, Any],
    answered_bytes: Callable[[], int],
) -> str | None:
    if not usage:
        return "no usage block"
    if not _whole_counts(usage):
        return "a token count is not a whole number"
    try:
        input_tokens, cached, written, output_tokens = counts = read(usage)
        detailed = detail(usage)
    except (TypeError, ValueError) as exc:
        return str(exc)[:200]
    if not all(0 <= count <= MAX_EVENT_TOKENS for count in (*counts, *detailed[:7])):
        return f"token counts out of range (at most {MAX_EVENT_TOKENS} each)"
    if cached + written > input_tokens:
        return "more cached than input tokens"
    if input_tokens + output_tokens == 0:
        return "no tokens counted"
    if output_tokens == 0 and answered_bytes() > 0:
        return "no output tokens for an answer with text"
    return None


def answered_bytes(body: bytes) -> int:
    """UTF-8 bytes of the text a non-streamed answer generated (0 when it is not JSON)."""
    try:
        return _text_bytes(json.loads(body))
    except (ValueError, RecursionError):
        return 0


def usage_of_body(body: bytes, kind: str = "openai") -> tuple[dict[str, Any], str]:
    """(usage block, served model) of a non-streamed JSON response; empty when absent or not JSON."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
        return {}, ""
    if not isinstance(payload, dict):
        return {}, ""
    return dialect_of_kind(kind).response_usage(payload)

"""What a request may cost before it is sent: the amount the gateway holds against a budget while it is in flight.

Held amounts are what keep concurrent requests from passing a budget together (``edge/reservation.py``), so the
estimate must not fall short of what the provider can bill:

- every completion a request asks for (``n``, and ``best_of``, which legacy completions generate and bill even
  when fewer are returned), each up to its ``max_tokens``; a request that sets no limit holds the longest answer
  most models give;
- the prompt once whatever ``n`` is: its text at 2 bytes a token (a text of one-letter words costs that much:
  4, the usual rule for English, let such prompts pass a hard cap; JSON syntax counts too);
  each image at the most tokens its provider bills for one image; a document or file (a PDF, a file id, audio or
  video by reference), whose size cannot be read from the request, the model's whole context window, and so is
  context the provider adds from what it stores (a Responses API ``previous_response_id`` or ``conversation``, a
  stored ``prompt`` template, results of a ``file_search`` or remote ``mcp`` tool);
- the prompt never more than the model's context window (the provider refuses a longer one);
- web searches: a search tool's ``max_uses``, else ``UNBOUNDED_WEB_SEARCHES``;
- the service tier the request asks for (``priority`` costs more than the standard tier), and an answer that may be
  audio (``modalities``) at the audio output price.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from spendstream.core.events import MAX_EVENT_COST_NANOS
from spendstream.core.pricing import (
    EMPTY_TABLE,
    CostOverflowError,
    PriceTable,
    UnknownModelError,
    context_window,
    price_usage,
)
from spendstream.core.providers import UsageDetail

# Output tokens held for each completion of a request that sets no max_tokens: the longest answer of most chat
# models (GPT-4.1 and Claude Sonnet give 32 k; a few reasoning models more). Set max_tokens to hold less.
UNBOUNDED_OUTPUT_TOKENS = 32_768
PROMPT_BYTES_PER_TOKEN = 2
_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_COMPLETIONS = ("n", "best_of")

# The most prompt tokens one image is billed as, by the providers' published rules: OpenAI's high-detail tiles
# (at most 8 of 512 px: 85 + 8 x 170) or 32 px patches (at most 1,536, times the model's multiplier, 2.46 the
# largest), with GPT-4o mini's multiplied tiles (2,833 + 8 x 5,667); Anthropic's ~1,600 of an image scaled to
# 1.15 megapixels; Gemini's 768 px tiles of 258 tokens. Another provider holds the largest of these.
IMAGE_TOKENS = {"openai": 3_779, "azure": 3_779, "anthropic": 1_800, "google": 4_128}
_IMAGE_TOKENS_MULTIPLIED = {"gpt-4o-mini": 2_833 + 8 * 5_667}
_IMAGE_TOKENS_OTHERWISE = max(IMAGE_TOKENS.values())
# Prompt tokens held for a document or file when the model's context window is not known.
UNSIZED_PROMPT_TOKENS = 200_000
# Searches held for a web search tool that sets no max_uses (the provider bills each one).
UNBOUNDED_WEB_SEARCHES = 20

_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
# unsized input: documents and files by reference, and a Responses API item the provider stores (``item_reference``)
_FILE_PARTS = frozenset({"file", "input_file", "document", "input_audio_file", "video_url", "item_reference"})
_GEMINI_INLINE = ("inline_data", "inlineData")
_GEMINI_FILE = ("file_data", "fileData")
_WEB_SEARCH = "web_search"
# Fields and tools that make the provider add input the request does not carry (an attacker session held a request
# continuing a 128 k-token conversation at $0.0003)
_STORED_CONTEXT = ("previous_response_id", "conversation", "mcp_servers")
# tool types (and their dated variants: ``web_fetch_20250910``, ``mcp_toolset``) whose results enter the prompt
_STORED_CONTEXT_TOOLS = ("file_search", "mcp", "web_fetch", "code_interpreter")
# A body without any of these cannot name an image, a file, a search or stored context: the walk is skipped. A JSON
# escape (``\u0069mage_url``) spells one without its bytes (an attacker session), so it always takes the walk.
_MEDIA_MARKERS = (
    b"image", b"file", b"document", b"inline", b"video", b"web_search", b"previous_response", b"conversation",
    b"prompt", b"mcp", b"item_reference", b"web_fetch", b"code_interpreter", b"\\u",
)  # fmt: skip
_TIERS = frozenset({"priority", "flex"})


class PromptMedia(NamedTuple):
    """What a request's prompt holds beyond text: images, unsized files, and the bytes of inline image data
    (counted as images, not as text)."""

    images: int = 0
    files: int = 0
    inline_image_bytes: int = 0


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def output_tokens_asked(body: Mapping[str, Any]) -> int:
    """The most output tokens the request lets the provider bill: per completion, times the completions. A body
    that sets several limits is held at the largest, whichever one its provider reads (``max_tokens: 1`` beside
    ``max_completion_tokens: 1000000`` passed a hard cap; an attacker session)."""
    per_completion = max(
        (limit for name in _OUTPUT_LIMITS if (limit := _count(body.get(name))) is not None),
        default=UNBOUNDED_OUTPUT_TOKENS,
    )
    completions = max([1, *(count for name in _COMPLETIONS if (count := _count(body.get(name))) is not None)])
    return per_completion * completions


def _parts(value: Any, depth: int = 0) -> Iterator[Mapping[str, Any]]:
    """Every JSON object of a prompt (messages, their content parts, tool results nested in them)."""
    if depth > 12:
        return
    if isinstance(value, Mapping):
        yield value
        for item in value.values():
            if isinstance(item, (Mapping, list)):
                yield from _parts(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (Mapping, list)):
                yield from _parts(item, depth + 1)


def _inline_image_bytes(part: Mapping[str, Any]) -> int:
    """The bytes of a part's inline (base64) image data: a data URL, an Anthropic base64 source."""
    for holder in (part.get("image_url"), part, part.get("source")):
        if isinstance(holder, Mapping):
            holder = holder.get("url", holder.get("data"))
        if isinstance(holder, str) and (holder.startswith("data:") or len(holder) > 4096):
            return len(holder)
    return 0


def prompt_media(body: Mapping[str, Any]) -> PromptMedia:
    """The images and files of a request's prompt (OpenAI chat and Responses, Anthropic, Gemini shapes)."""
    images = files = inline = 0
    for name in ("messages", "input", "contents", "system", "instructions"):
        for part in _parts(body.get(name)):
            kind = part.get("type")
            if kind in _IMAGE_PARTS:
                images += 1
                inline += _inline_image_bytes(part)
            elif kind in _FILE_PARTS:
                files += 1
            else:
                gemini = next((part[key] for key in (*_GEMINI_INLINE, *_GEMINI_FILE) if key in part), None)
                if isinstance(gemini, Mapping):
                    mime = str(gemini.get("mimeType", gemini.get("mime_type", "")))
                    if mime.startswith("image/"):
                        images += 1
                        data = gemini.get("data")
                        inline += len(data) if isinstance(data, str) else 0
                    else:
                        files += 1
    return PromptMedia(images, files, inline)


def adds_stored_context(body: Mapping[str, Any]) -> bool:
    """Whether the provider adds to the prompt context it stores (an earlier response or conversation, a stored
    prompt template and its variables) or fetches (file search, remote MCP servers, fetched web pages, a code
    interpreter's files): none of it is in the body."""
    if any(body.get(name) for name in _STORED_CONTEXT) or isinstance(body.get("prompt"), Mapping):
        return True
    tools = body.get("tools")
    return any(
        isinstance(tool, Mapping) and str(tool.get("type", "")).startswith(_STORED_CONTEXT_TOOLS)
        for tool in (tools if isinstance(tools, list) else ())
    )


def web_searches_asked(body: Mapping[str, Any]) -> int:
    """The web searches a request lets the provider bill: each search tool's ``max_uses`` (else
    ``UNBOUNDED_WEB_SEARCHES``); a search model's ``web_search_options`` one."""
    searches = 1 if isinstance(body.get("web_search_options"), Mapping) else 0
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, Mapping) and str(tool.get("type", "")).startswith(_WEB_SEARCH):
            uses = _count(tool.get("max_uses"))
            searches += UNBOUNDED_WEB_SEARCHES if uses is None else uses
    return searches


def image_tokens(provider: str, model: str) -> int:
    """The most prompt tokens one image of ``model`` is billed as."""
    for prefix, tokens in _IMAGE_TOKENS_MULTIPLIED.items():
        if model.startswith(prefix):
            return tokens
    return IMAGE_TOKENS.get(provider, _IMAGE_TOKENS_OTHERWISE)


def prompt_tokens_asked(provider: str, model: str, body: Mapping[str, Any], body_bytes: int) -> tuple[int, int]:
    """(prompt tokens, of which image tokens) the request can be billed for."""
    window = context_window(provider, model)
    media = prompt_media(body)
    text = (body_bytes - media.inline_image_bytes) // PROMPT_BYTES_PER_TOKEN + 1
    images = media.images * image_tokens(provider, model)
    if media.files or adds_stored_context(body):
        text += window or UNSIZED_PROMPT_TOKENS
    if window is not None and text + images > window:
        images = min(images, window)
        text = window - images
    return text + images, images


def request_cost_estimate(
    provider: str, model: str, body: Mapping[str, Any], raw: bytes, prices: PriceTable = EMPTY_TABLE
) -> int:
    """The most a request (``body``, parsed from ``raw``) should cost, in nano-USD; 0 for a model without a price
    (what it costs is not known here), the per-event ceiling for one whose estimate is beyond it (it cannot fit
    in any budget)."""
    tier = body.get("service_tier")
    detail = UsageDetail(service_tier=tier) if isinstance(tier, str) and tier in _TIERS else UsageDetail()
    prompt = len(raw) // PROMPT_BYTES_PER_TOKEN + 1
    output = output_tokens_asked(body)
    if any(marker in raw for marker in _MEDIA_MARKERS):  # a text-only request skips the walk
        prompt, images = prompt_tokens_asked(provider, model, body, len(raw))
        detail = detail._replace(input_image_tokens=images, web_search_requests=web_searches_asked(body))
    modalities = body.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:  # the answer may be all audio, dearer than text
        detail = detail._replace(output_audio_tokens=output)
    try:
        priced = price_usage(provider, model, prompt, output, overrides=prices, detail=detail)
    except CostOverflowError:
        return MAX_EVENT_COST_NANOS
    except (UnknownModelError, ValueError):
        return 0
    return priced.cost_nanos

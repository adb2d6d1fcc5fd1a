"""What the gateway holds for a request in flight: never less than what the provider can bill for it."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.events import MAX_EVENT_COST_NANOS
from spendstream.core.pricing import PriceTable, context_window, price_usage
from spendstream.core.providers import UsageDetail
from spendstream.gateway.cost_estimate import (
    UNBOUNDED_OUTPUT_TOKENS,
    UNBOUNDED_WEB_SEARCHES,
    image_tokens,
    output_tokens_asked,
    prompt_media,
    request_cost_estimate,
    web_searches_asked,
)

limits = st.sampled_from(["max_tokens", "max_completion_tokens", "max_output_tokens"])


@given(
    limit_name=limits,
    per_completion=st.integers(1, 100_000),
    n=st.integers(1, 128),
    best_of=st.integers(1, 20),
    billed_fraction=st.fractions(0, 1),
    prompt_bytes=st.integers(0, 400_000),
)
def test_the_estimate_covers_every_completion_the_provider_can_bill(
    limit_name: str, per_completion: int, n: int, best_of: int, billed_fraction, prompt_bytes: int
) -> None:
    body = {"model": "gpt-4o", limit_name: per_completion, "n": n, "best_of": best_of}
    billed_output = int(per_completion * max(n, best_of) * billed_fraction)
    billed = price_usage("openai", "gpt-4o", prompt_bytes // 4, billed_output).cost_nanos
    assert request_cost_estimate("openai", "gpt-4o", body, b"x" * prompt_bytes) >= billed


def test_completions_multiply_the_output_and_bad_values_count_as_one() -> None:
    assert output_tokens_asked({"max_tokens": 50, "n": 8}) == 400
    assert output_tokens_asked({"max_tokens": 50, "n": 2, "best_of": 5}) == 250
    assert output_tokens_asked({"max_tokens": 50, "n": True}) == 50  # a bool is not a count
    assert output_tokens_asked({"max_tokens": 50, "n": "8"}) == 50
    assert output_tokens_asked({"max_tokens": 50, "n": -3}) == 50


def test_a_request_setting_several_output_limits_is_held_at_the_largest() -> None:
    """An attacker session: ``max_tokens: 1`` beside ``max_completion_tokens: 1000000`` was held at one token."""
    assert output_tokens_asked({"max_tokens": 1, "max_completion_tokens": 1_000_000}) == 1_000_000
    assert output_tokens_asked({"max_completion_tokens": 7, "max_output_tokens": 9, "n": 2}) == 18


def test_a_request_without_an_output_limit_holds_the_longest_answer_for_each_completion() -> None:
    assert output_tokens_asked({}) == UNBOUNDED_OUTPUT_TOKENS
    assert output_tokens_asked({"n": 4}) == 4 * UNBOUNDED_OUTPUT_TOKENS
    assert output_tokens_asked({"max_tokens": None}) == UNBOUNDED_OUTPUT_TOKENS


def test_an_estimate_beyond_any_price_holds_the_ceiling_and_an_unknown_model_holds_nothing() -> None:
    # 0 here would hold nothing for the request: it must hold more than any budget can give
    huge = {"max_tokens": 10**30}
    assert request_cost_estimate("openai", "gpt-4o", huge, b"x" * 100) == MAX_EVENT_COST_NANOS
    rejecting = PriceTable(unknown_model="reject")
    assert request_cost_estimate("openai", "no-such-model-xyz", {"max_tokens": 10}, b"x" * 100, rejecting) == 0


def _estimate(provider: str, model: str, body: dict) -> int:
    return request_cost_estimate(provider, model, body, json.dumps(body).encode())


def _openai_image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "high"}}


IMAGE_SHAPES = {
    "openai chat": (
        "openai",
        "gpt-4o",
        lambda parts: {"messages": [{"role": "user", "content": parts}]},
        _openai_image,
    ),
    "openai responses": (
        "openai",
        "gpt-4.1-nano",
        lambda parts: {"input": [{"role": "user", "content": parts}]},
        lambda url: {"type": "input_image", "image_url": url},
    ),
    "anthropic": (
        "anthropic",
        "claude-sonnet-4-5",
        lambda parts: {"messages": [{"role": "user", "content": parts}]},
        lambda url: {"type": "image", "source": {"type": "url", "url": url}},
    ),
    "gemini": (
        "google",
        "gemini-2.5-flash",
        lambda parts: {"contents": [{"role": "user", "parts": parts}]},
        lambda url: {"file_data": {"mime_type": "image/png", "file_uri": url}},
    ),
}


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@given(images=st.integers(1, 12), billed_fraction=st.fractions(0, 1))
def test_images_hold_the_most_their_provider_bills_for_them(shape: str, images: int, billed_fraction) -> None:
    """A review: an image URL is a few bytes of JSON but up to thousands of prompt tokens; the estimate counted
    the bytes, so concurrent image requests could pass a hard cap by what their images cost."""
    provider, model, wrap, image = IMAGE_SHAPES[shape]
    body = {"model": model, "max_tokens": 50, **wrap([image(f"https://example.com/{i}.png") for i in range(images)])}
    billed_images = int(images * image_tokens(provider, model) * billed_fraction)
    prompt = billed_images + len(json.dumps(body)) // 4  # the text: what its bytes say at most
    billed = price_usage(provider, model, prompt, 50, detail=UsageDetail(input_image_tokens=billed_images))
    assert _estimate(provider, model, body) >= billed.cost_nanos
    assert prompt_media(body).images == images


def test_inline_image_data_counts_as_an_image_not_as_text() -> None:
    """A base64 image of 300 kB is 1,445 tokens at most, not the 100,000 its bytes would read as text."""
    data = base64.b64encode(b"\x89PNG" + b"\0" * 300_000).decode()
    body = {
        "model": "gpt-4o",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": [_openai_image(f"data:image/png;base64,{data}")]}],
    }
    media = prompt_media(body)
    assert media.images == 1 and media.inline_image_bytes > 400_000
    held = _estimate("openai", "gpt-4o", body)
    assert held >= price_usage("openai", "gpt-4o", 3_779, 10).cost_nanos
    assert held < price_usage("openai", "gpt-4o", 10_000, 10).cost_nanos
    anthropic = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    assert prompt_media({"messages": [{"role": "user", "content": [anthropic]}]}).inline_image_bytes == len(data)


def test_gpt_4o_mini_images_hold_its_multiplied_tiles() -> None:
    assert image_tokens("openai", "gpt-4o-mini") == 2_833 + 8 * 5_667
    assert image_tokens("openai", "gpt-4o") < image_tokens("openai", "gpt-4o-mini")


@pytest.mark.parametrize(
    "part",
    [
        {"type": "file", "file": {"file_id": "file-abc"}},
        {"type": "input_file", "file_url": "https://example.com/report.pdf"},
        {"type": "document", "source": {"type": "url", "url": "https://example.com/report.pdf"}},
        {"fileData": {"mimeType": "application/pdf", "fileUri": "gs://bucket/report.pdf"}},
    ],
)
def test_a_document_holds_the_models_whole_context_window(part: dict) -> None:
    """A PDF by reference may be a hundred pages: nothing in the request says how many tokens it is."""
    body = {"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": [part]}]}
    assert prompt_media(body).files == 1
    window = context_window("openai", "gpt-4o")
    assert window is not None
    assert _estimate("openai", "gpt-4o", body) == price_usage("openai", "gpt-4o", window, 10).cost_nanos


@pytest.mark.parametrize(
    "fields",
    [
        {"previous_response_id": "resp_abc"},
        {"conversation": "conv_abc"},
        {"prompt": {"id": "pmpt_abc", "variables": {"doc": {"type": "input_file", "file_id": "file-abc"}}}},
        {"tools": [{"type": "file_search", "vector_store_ids": ["vs_abc"]}]},
        {"tools": [{"type": "mcp", "server_label": "docs", "server_url": "https://mcp.example.com"}]},
        {"input": [{"type": "item_reference", "id": "msg_abc"}, {"role": "user", "content": "go on"}]},
        {"mcp_servers": [{"type": "url", "url": "https://mcp.example.com", "name": "docs"}]},  # Anthropic's connector
        {"tools": [{"type": "mcp_toolset", "mcp_server_name": "docs"}]},
        {"tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}]},
        {"tools": [{"type": "code_interpreter", "container": {"type": "auto", "file_ids": ["file-abc"]}}]},
    ],
)
def test_context_the_provider_adds_from_what_it_stores_holds_the_whole_context_window(fields: dict) -> None:
    """A Responses API request continuing a conversation of 128 k tokens was held at $0.0003 (an attacker session):
    the provider bills the stored context, which the body does not carry."""
    body = {"model": "gpt-4o", "max_output_tokens": 10, "input": "go on", **fields}
    window = context_window("openai", "gpt-4o")
    assert window is not None
    assert _estimate("openai", "gpt-4o", body) == price_usage("openai", "gpt-4o", window, 10).cost_nanos


def test_the_prompt_never_holds_more_than_the_context_window() -> None:
    many = {
        "model": "gpt-4o",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": [_openai_image(f"https://example.com/{i}.png") for i in range(200)]}],
    }
    assert _estimate("openai", "gpt-4o", many) <= price_usage("openai", "gpt-4o", 128_000, 10).cost_nanos


def test_web_searches_hold_max_uses_or_the_default() -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "news?"}]}
    tool = {"type": "web_search_20250305", "name": "web_search"}
    assert web_searches_asked({**body, "tools": [{**tool, "max_uses": 3}]}) == 3
    assert web_searches_asked({**body, "tools": [tool]}) == UNBOUNDED_WEB_SEARCHES
    assert web_searches_asked({"web_search_options": {}}) == 1
    plain = _estimate("anthropic", "claude-sonnet-4-5", body)
    searching = _estimate("anthropic", "claude-sonnet-4-5", {**body, "tools": [{**tool, "max_uses": 3}]})
    assert searching - plain >= 3 * 10_000_000  # $10 per 1,000 searches


def test_the_priority_tier_holds_its_price_and_a_hostile_tier_is_ignored() -> None:
    body = {"model": "gpt-4o", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]}
    priority = _estimate("openai", "gpt-4o", {**body, "service_tier": "priority"})
    hostile = _estimate("openai", "gpt-4o", {**body, "service_tier": ["priority"]})  # priced as the standard tier
    assert _estimate("openai", "gpt-4o", body) <= hostile < priority


def test_a_hostile_body_is_estimated_without_error() -> None:
    deep: object = "file"
    for _ in range(5_000):
        deep = [deep]
    for body in (
        {"model": "gpt-4o", "messages": deep},
        {"model": "gpt-4o", "messages": [{"content": [{"type": "image_url", "image_url": 7}]}]},
        {"model": "gpt-4o", "tools": [{"type": "web_search", "max_uses": -1}, "web_search", None]},
        {"model": "gpt-4o", "contents": [{"parts": [{"inline_data": {"mime_type": 5, "data": None}}]}]},
    ):
        assert request_cost_estimate("openai", "gpt-4o", body, b"image file " * 10) > 0


def test_an_answer_that_may_be_audio_holds_the_audio_output_price() -> None:
    body = {"model": "gpt-realtime", "max_tokens": 1000, "messages": [{"role": "user", "content": "say hi"}]}
    spoken = _estimate("openai", "gpt-realtime", {**body, "modalities": ["text", "audio"]})
    assert (
        spoken
        >= price_usage("openai", "gpt-realtime", 0, 1000, detail=UsageDetail(output_audio_tokens=1000)).cost_nanos
    )
    assert spoken > _estimate("openai", "gpt-realtime", body)


def test_a_json_escape_does_not_hide_an_image_and_a_prompt_of_one_letter_words_is_held_whole() -> None:
    """An attacker session: ``"\\u0069mage_url"`` spelt forty images without the bytes the walk looked for, and a
    prompt of ``"a a a ..."`` (2 bytes a token) passed a hard cap held at 4 bytes a token."""
    image = _openai_image("https://example.com/x.png")
    body = {"model": "gpt-4o", "max_tokens": 1, "messages": [{"role": "user", "content": [image] * 40}]}
    plain = json.dumps(body).encode()
    escaped = plain.replace(b"image_url", b"\\u0069mage_url")
    assert json.loads(escaped) == body
    assert request_cost_estimate("openai", "gpt-4o", body, escaped) >= request_cost_estimate(
        "openai", "gpt-4o", body, plain
    )
    words = {"model": "gpt-4o", "max_tokens": 1, "messages": [{"role": "user", "content": "a " * 6000}]}
    billed = price_usage("openai", "gpt-4o", 6000, 1).cost_nanos  # one token a word
    assert _estimate("openai", "gpt-4o", words) >= billed

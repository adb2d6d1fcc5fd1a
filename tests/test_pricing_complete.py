"""Complete pricing: reasoning, audio and image tokens, cache writes by TTL, long-context tiers, the batch API,
per-request and per-search prices, and list prices imported offline.

Worked examples: usage blocks as each provider documents them, priced at the providers' list prices (kept in
``tests/data/list_prices.json``, genai-prices' data format, so a newer genai-prices cannot move the figures).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from genai_prices import data_snapshot

from spendstream.core import pricing
from spendstream.core.config import Settings
from spendstream.core.events import UsageEvent, UsageStatus, usage_record_problem
from spendstream.core.policy import parse_policy
from spendstream.core.pricing import UsageDetail, price_record, price_usage, use_price_data
from spendstream.edge.call_event import build_event
from spendstream.edge.emitter import Emitter
from spendstream.edge.enforcer import Enforcer
from spendstream.gateway.app import Gateway, GatewayThread
from spendstream.gateway.metering import StreamMeter, usage_of_body
from stub_upstream import StubUpstream
from test_gateway import CHAT, gateway_config, http, read_usage

LIST_PRICES = Path(__file__).parent / "data" / "list_prices.json"
AT = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def list_prices() -> Iterator[None]:
    assert use_price_data(LIST_PRICES) == 7
    yield
    data_snapshot.set_custom_snapshot(None)
    pricing._MEMO.clear()


def metered(provider: str, model: str, usage: dict[str, Any]) -> UsageEvent:
    """The usage event the gateway or instrument() builds from a provider's usage block."""
    return build_event(
        attribution={"team": "search"},
        provider=provider,
        model_requested=model,
        model_served=model,
        raw_usage=usage,
        latency_ms=1,
        status=UsageStatus.ok,
        decision="allow",
        tags={},
        now=AT,
    )


def test_openai_chat_completion_with_reasoning_and_cached_tokens(list_prices: None) -> None:
    usage = {  # https://platform.openai.com/docs/api-reference/chat/object (usage), o3 with a cached prefix
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 192,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    event = metered("openai", "o3", usage)
    assert (event.input_tokens, event.cached_input_tokens, event.output_tokens) == (2006, 1920, 300)
    assert event.reasoning_tokens == 192  # part of the 300 output tokens, billed at the output rate
    # 86 uncached at $2/M + 1920 cached at $0.50/M + 300 output at $8/M
    assert event.cost_nanos == 86 * 2_000 + 1920 * 500 + 300 * 8_000 == 3_532_000


def test_openai_responses_api_reasoning_flex_tier_and_web_search(list_prices: None) -> None:
    body = {  # https://platform.openai.com/docs/guides/reasoning (the usage of a Responses API reasoning call)
        "object": "response",
        "model": "o3-2025-04-16",
        "service_tier": "flex",
        "output": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}, {"type": "message"}],
        "usage": {
            "input_tokens": 75,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 1186,
            "output_tokens_details": {"reasoning_tokens": 1024},
            "total_tokens": 1261,
        },
    }
    usage, model = usage_of_body(json.dumps(body).encode())
    event = metered("openai", model, usage)
    assert (event.reasoning_tokens, event.service_tier, event.web_search_requests) == (1024, "flex", 1)
    assert event.price_source == "genai-prices:openai/o3+flex"
    assert event.cost_nanos == 75 * 1_000 + 1186 * 4_000  # flex: half the standard $2/M and $8/M
    standard = price_usage("openai", "o3", 75, 1186, at=AT)
    assert standard.cost_nanos == 75 * 2_000 + 1186 * 8_000 == 9_638_000


def test_openai_audio_tokens_are_priced_at_the_audio_rates(list_prices: None) -> None:
    usage = {
        "prompt_tokens": 1100,
        "completion_tokens": 600,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 1000},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 500},
    }
    event = metered("openai", "gpt-4o-mini-audio-preview", usage)
    assert (event.input_audio_tokens, event.output_audio_tokens) == (1000, 500)
    # text 100 in at $0.15/M and 100 out at $0.60/M; audio 1000 in at $10/M and 500 out at $20/M
    assert event.cost_nanos == 100 * 150 + 1000 * 10_000 + 100 * 600 + 500 * 20_000 == 20_075_000


def test_anthropic_cache_writes_by_ttl_web_search_and_the_batch_api(list_prices: None) -> None:
    usage = {  # https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching (1-hour cache duration)
        "input_tokens": 2048,
        "cache_read_input_tokens": 1800,
        "cache_creation_input_tokens": 248,
        "output_tokens": 503,
        "cache_creation": {"ephemeral_1h_input_tokens": 100, "ephemeral_5m_input_tokens": 148},
    }
    event = metered("anthropic", "claude-sonnet-4-5", usage)
    assert (event.input_tokens, event.cached_input_tokens, event.cache_write_tokens) == (4096, 1800, 248)
    assert event.cache_write_1h_tokens == 100
    tokens = 2048 * 3_000 + 1800 * 300 + 148 * 3_750 + 100 * 6_000 + 503 * 15_000
    assert event.cost_nanos == tokens == 15_384_000

    searched = {**usage, "server_tool_use": {"web_search_requests": 1}, "service_tier": "standard"}
    assert metered("anthropic", "claude-sonnet-4-5", searched).cost_nanos == tokens + 10_000_000  # $10 per 1000

    batch = metered("anthropic", "claude-sonnet-4-5", {**searched, "service_tier": "batch"})
    assert batch.service_tier == "batch" and batch.price_source.endswith("+batch")
    # every token at half price; web search has no batch price, so the standard one applies
    assert batch.cost_nanos == 2048 * 1_500 + 1800 * 150 + 148 * 1_875 + 100 * 3_000 + 503 * 7_500 + 10_000_000


def test_anthropic_long_context_prices_every_token_of_a_large_prompt(list_prices: None) -> None:
    usage = {"input_tokens": 150_000, "cache_read_input_tokens": 60_000, "output_tokens": 1000}
    event = metered("anthropic", "claude-sonnet-4-5", usage)
    assert event.input_tokens == 210_000  # above 200k: $6/M input, $0.60/M cache read, $22.50/M output
    assert event.cost_nanos == 150_000 * 6_000 + 60_000 * 600 + 1000 * 22_500 == 958_500_000


def test_gemini_thinking_tokens_are_billed_as_output(list_prices: None) -> None:
    usage = {  # https://ai.google.dev/gemini-api/docs/thinking (usageMetadata of a thinking response)
        "promptTokenCount": 11,
        "candidatesTokenCount": 1011,
        "totalTokenCount": 2171,
        "thoughtsTokenCount": 1149,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 11}],
    }
    event = metered("google", "gemini-2.5-pro", usage)
    assert (event.output_tokens, event.reasoning_tokens) == (2160, 1149)
    assert event.cost_nanos == 11 * 1_250 + 2160 * 10_000 == 21_613_750


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (200_000, 200_000 * 1_250 + 1500 * 10_000),  # at the threshold: the base prices
        (250_000, 250_000 * 2_500 + 1500 * 15_000),  # above it: $2.50/M in, $15/M out for the whole call
    ],
)
def test_gemini_long_context_tier_follows_the_prompt_size(list_prices: None, prompt: int, expected: int) -> None:
    usage = {"promptTokenCount": prompt, "candidatesTokenCount": 1000, "thoughtsTokenCount": 500}
    assert metered("gemini", "gemini-2.5-pro", usage).cost_nanos == expected


def test_gemini_audio_prompt_tokens_by_modality(list_prices: None) -> None:
    usage = {
        "promptTokenCount": 1100,
        "candidatesTokenCount": 50,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 100}, {"modality": "AUDIO", "tokenCount": 1000}],
    }
    event = metered("google", "gemini-2.5-flash", usage)
    assert event.input_audio_tokens == 1000
    assert event.cost_nanos == 100 * 300 + 1000 * 1_000 + 50 * 2_500 == 1_155_000


def test_embeddings_and_per_request_prices(list_prices: None) -> None:
    embedding = metered("openai", "text-embedding-3-small", {"prompt_tokens": 8, "total_tokens": 8})
    assert embedding.cost_nanos == 8 * 20  # $0.02/M
    search = metered("openai", "gpt-4o-search-preview", {"prompt_tokens": 10, "completion_tokens": 20})
    assert search.cost_nanos == 10 * 2_500 + 20 * 10_000 + 35_000_000  # $35 per 1000 requests


def test_gateway_stream_meter_reads_the_anthropic_cache_ttl_split() -> None:
    events = [
        {"type": "message_start", "message": {"model": "claude-sonnet-4-5", "usage": {
            "input_tokens": 10, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 0, "output_tokens": 1,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 300}}}},
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "message_delta", "usage": {"output_tokens": 40}},
    ]  # fmt: skip
    meter = StreamMeter("anthropic")
    meter.feed(b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events))
    event = metered("anthropic", meter.model, meter.usage)
    assert (event.cache_write_tokens, event.cache_write_1h_tokens, event.output_tokens) == (300, 300, 40)


def test_events_priced_later_carry_their_detail_to_the_processor_and_the_sink(list_prices: None) -> None:
    record = UsageEvent(
        provider="anthropic",
        model_requested="claude-sonnet-4-5",
        input_tokens=1000,
        output_tokens=100,
        cache_write_tokens=400,
        cache_write_1h_tokens=400,
        service_tier="batch",
    ).to_avro()
    assert price_record(record, AT).cost_nanos == 600 * 1_500 + 400 * 3_000 + 100 * 7_500


def test_detail_counts_that_do_not_fit_their_token_counts_are_refused() -> None:
    base = UsageEvent(provider="openai", model_requested="o3", input_tokens=10, output_tokens=10).to_avro()
    now = datetime.now(UTC)
    skew = timedelta(minutes=5)
    assert usage_record_problem({**base, "reasoning_tokens": 11}, now, skew) == (
        "reasoning, audio and image output tokens exceed output_tokens"
    )
    assert usage_record_problem({**base, "cache_write_1h_tokens": 1}, now, skew) == (
        "cache_write_1h_tokens exceed cache_write_tokens"
    )
    with pytest.raises(ValueError, match="exceed the token counts"):
        price_usage("openai", "o3", 10, 10, detail=UsageDetail(input_audio_tokens=11))


POLICY = """
pricing:
  unknown_model: reject
  overrides:
    - provider: vllm
      model: llama-70b
      input_per_mtok: "0.50"
      output_per_mtok: "1.50"
      cache_write_1h_per_mtok: "1.00"
      reasoning_per_mtok: "2.00"
      per_request_usd: "0.0001"
      web_search_per_1000_usd: "5"
      batch_multiplier: "0.5"
      long_context:
        above_input_tokens: 100000
        input_per_mtok: "1.00"
        output_per_mtok: "3.00"
"""


def test_price_overrides_price_every_kind_of_usage() -> None:
    table = parse_policy(POLICY).price_table
    detail = UsageDetail(reasoning_tokens=40, cache_write_1h_tokens=100, web_search_requests=2)
    cost = price_usage("vllm", "llama-70b", 1000, 100, 0, 100, AT, table, detail).cost_nanos
    # 900 input at $0.50/M, 100 1h cache writes at $1/M, 60 output at $1.50/M, 40 reasoning at $2/M,
    # 2 searches at $5/1000, one request at $0.0001
    assert cost == 900 * 500 + 100 * 1_000 + 60 * 1_500 + 40 * 2_000 + 2 * 5_000_000 + 100_000
    batch = price_usage("vllm", "llama-70b", 1000, 100, 0, 0, AT, table, UsageDetail(service_tier="batch"))
    assert batch.cost_nanos == (1000 * 500 + 100 * 1_500 + 100_000) // 2
    long = price_usage("vllm", "llama-70b", 100_001, 100, at=AT, overrides=table)
    assert long.cost_nanos == 100_001 * 1_000 + 100 * 3_000 + 100_000


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendstream.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_prices_import_and_show_through_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "SPENDSTREAM_DATA_DIR": str(tmp_path / "data")}
    env.pop("SPENDSTREAM_POLICY", None)
    negotiated = json.loads(LIST_PRICES.read_text())
    negotiated[1]["models"][0]["prices"]["cache_write_1h_mtok"]["base"] = 5.55  # not a list price: proves the file
    table = tmp_path / "data.json"
    table.write_text(json.dumps(negotiated))

    imported = _cli("prices", "import", str(table), env=env)
    assert imported.returncode == 0, imported.stderr
    assert "7 models" in imported.stdout and (tmp_path / "data" / "prices.json").exists()

    shown = _cli("prices", "show", "claude-sonnet-4-5", env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "anthropic/claude-sonnet-4-5: genai-prices:anthropic/claude-sonnet-4-5, standard tier" in lines[0]
    assert any(line.split() == ["input", "3000000000", "per", "1M", "tokens"] for line in lines)
    assert any(line.split()[-5:] == ["TTL", "5550000000", "per", "1M", "tokens"] for line in lines)
    assert any(line.split() == ["web", "search", "10000000", "per", "search"] for line in lines)
    assert "prompts above 200000 input tokens (every token of the call):" in lines

    batch = _cli("prices", "show", "o3", "--tier", "batch", env=env)
    assert any(line.split() == ["output", "4000000000", "per", "1M", "tokens"] for line in batch.stdout.splitlines())


def test_a_price_file_that_cannot_be_used_is_refused_with_its_problem(tmp_path: Path) -> None:
    env = {**os.environ, "SPENDSTREAM_DATA_DIR": str(tmp_path / "data")}
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "openai", "models": [{"id": "x"}]}]')
    refused = _cli("prices", "import", str(broken), env=env)
    assert refused.returncode == 1 and "not genai-prices data" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "data" / "prices.json").exists()

    started = _cli("topics", "create", env={**env, "SPENDSTREAM_PRICE_DATA_FILE": str(broken)})
    assert started.returncode == 2 and "price_data_file:" in started.stderr and "Traceback" not in started.stderr


def test_amounts_in_price_files_are_read_as_decimals(tmp_path: Path) -> None:
    table = tmp_path / "prices.json"
    data = json.loads(LIST_PRICES.read_text())
    data[0]["models"][2]["prices"]["input_mtok"] = 0.075  # not exactly representable as a float
    table.write_text(json.dumps(data))
    (provider, *_) = pricing.read_price_data(table)
    assert provider.models[2].prices.input_mtok == Decimal("0.075")


@pytest.fixture
def gateway(settings: Settings, tmp_path: Path) -> Iterator[tuple[GatewayThread, StubUpstream]]:
    enforcer = Enforcer(settings=settings).start()
    assert enforcer.wait_ready(10)
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    try:
        with StubUpstream() as primary, StubUpstream() as secondary:
            config = gateway_config(primary, secondary)
            with GatewayThread(Gateway(config, settings, enforcer=enforcer, emitter=emitter)) as running:
                yield running, primary
    finally:
        emitter.close(10)
        enforcer.stop()


def test_the_gateway_meters_reasoning_tokens_and_prices_them_streamed_or_not(
    list_prices: None, gateway: tuple[GatewayThread, StubUpstream], settings: Settings
) -> None:
    running, upstream = gateway
    upstream.reported_usage = {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 0},
    }
    chat = {**CHAT, "model": "o3"}
    assert http(running.url + "/v1/chat/completions", chat)[0] == 200
    status, _, streamed = http(running.url + "/v1/chat/completions", {**chat, "stream": True})
    assert status == 200 and b'"usage"' not in streamed
    events = read_usage(settings.kafka_bootstrap, 2)
    assert [(e["reasoning_tokens"], e["cached_input_tokens"], e["cost_nanos"]) for e in events] == [
        (192, 1920, 3_532_000)
    ] * 2

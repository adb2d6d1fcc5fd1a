"""Provider dialects: adding a provider is one module, and pricing, metering and instrument() use it."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from spendstream.core.config import Settings
from spendstream.core.events import UsageStatus
from spendstream.core.pricing import PriceOverride, PriceTable, Rates, normalise_usage
from spendstream.core.providers import Dialect, NormalisedUsage, SdkResource, StreamState, dialect_for, register
from spendstream.core.providers import registry as provider_registry
from spendstream.edge.call_event import build_event
from spendstream.edge.emitter import Emitter
from spendstream.edge.enforcer import Enforcer
from spendstream.edge.instrument import instrument
from spendstream.gateway.metering import StreamMeter
from test_gateway import read_usage


class AcmeDialect(Dialect):
    """A provider whose usage block nests counts under ``billed_units`` and whose cached reads are outside them."""

    kind = "acme"
    providers = frozenset({"acme"})
    sdk_module = "acme_sdk"
    sdk_resources = (SdkResource(("generations",), "generations"),)
    stream_markers = (b'"billed_units"',)

    def usage(self, raw: Mapping[str, Any]) -> NormalisedUsage:
        units = raw.get("billed_units") or {}
        cached = int(units.get("cached_tokens", 0))
        return NormalisedUsage(int(units["input_tokens"]) + cached, cached, 0, int(units["output_tokens"]))

    def stream_event(self, state: StreamState, payload: Mapping[str, Any]) -> bool:
        if payload.get("event") == "done":
            state.usage, state.usage_final = dict(payload["meta"]), True
            state.model = str(payload.get("model_id") or state.model)
        return False

    def sdk_item(self, item: Any, usage: dict[str, Any], served: str) -> tuple[dict[str, Any], str]:
        meta = getattr(item, "meta", None)
        return (dict(meta) if meta else usage), getattr(item, "model_id", None) or served


ACME_PRICES = PriceTable(
    overrides=(
        PriceOverride(
            "acme",
            "acme-large",
            Rates(input_per_mtok=Decimal("2"), output_per_mtok=Decimal("8"), cache_read_per_mtok=Decimal("0.5")),
        ),
    ),
    unknown_model="reject",
)
ACME_USAGE = {"billed_units": {"input_tokens": 1000, "output_tokens": 200, "cached_tokens": 3000}}
# 1000 uncached at $2/M (2000 nanos each), 3000 cached at $0.50/M (500), 200 output at $8/M (8000)
ACME_COST = 1000 * 2000 + 3000 * 500 + 200 * 8000


@pytest.fixture
def acme() -> Iterator[Dialect]:
    saved = {name: dict(getattr(provider_registry, name)) for name in ("_BY_KIND", "_BY_PROVIDER", "_BY_SDK")}
    yield register(AcmeDialect())
    for name, table in saved.items():
        setattr(provider_registry, name, table)


def test_a_registered_dialect_is_priced_and_metered_from_its_usage_block(acme: Dialect) -> None:
    assert dialect_for("ACME") is acme
    assert normalise_usage("acme", ACME_USAGE) == (4000, 3000, 0, 200)
    event = build_event(
        attribution={"team": "t"},
        provider="acme",
        model_requested="acme-large",
        model_served="acme-large",
        raw_usage=ACME_USAGE,
        latency_ms=5,
        status=UsageStatus.ok,
        decision="allow",
        tags={},
        prices=ACME_PRICES,
    )
    assert (event.input_tokens, event.cached_input_tokens, event.output_tokens) == (4000, 3000, 200)
    assert event.cost_nanos == ACME_COST
    assert event.price_source == "override:acme/acme-large"


def test_a_registered_dialect_reads_its_stream_events(acme: Dialect) -> None:
    meter = StreamMeter("acme")
    stream = (
        b'data: {"event": "text", "text": "hello"}\n\n'
        b'data: {"event": "done", "model_id": "acme-large", "meta": '
        + str(ACME_USAGE).replace("'", '"').encode()
        + b"}\n\n"
    )
    forwarded = meter.feed(stream[:30]) + meter.feed(stream[30:]) + meter.finish()
    assert forwarded == stream  # the client gets every byte
    assert meter.usage == ACME_USAGE and meter.usage_final and meter.model == "acme-large"
    assert normalise_usage("acme", meter.usage_so_far(lambda: 0, 100)[0]).input_tokens == 4000


class _Generations:
    def create(self, **kwargs: Any) -> Any:
        return SimpleNamespace(text="hi", model_id="acme-large", meta=ACME_USAGE)


class AcmeClient:
    """The shape of the provider's SDK client: ``client.generations.create(...)``."""

    __module__ = "acme_sdk.client"

    def __init__(self) -> None:
        self.generations = _Generations()


def test_instrument_meters_a_client_of_a_registered_dialect(acme: Dialect, settings: Settings, tmp_path: Path) -> None:
    enforcer = Enforcer(settings=settings).start()
    assert enforcer.wait_ready(10)
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    try:
        client = instrument(AcmeClient(), team="research", provider="acme", enforcer=enforcer, emitter=emitter)
        assert client.generations.create(model="acme-large", prompt="x").text == "hi"
        emitter.flush(10)
    finally:
        emitter.close(10)
        enforcer.stop()
    [event] = read_usage(settings.kafka_bootstrap, 1)
    assert (event["provider"], event["team"], event["tags"]["endpoint"]) == ("acme", "research", "generations")
    assert (event["input_tokens"], event["cached_input_tokens"], event["output_tokens"]) == (4000, 3000, 200)
    # No price table was given to instrument(): acme-large is not in genai-prices, so it is flagged at the default.
    assert event["tags"].get("price") == "unknown_model" and event["cost_nanos"] > 0


def test_an_sdk_no_dialect_speaks_is_refused_with_the_supported_ones() -> None:
    with pytest.raises(TypeError, match="supports openai and anthropic clients, not AcmeClient"):
        instrument(AcmeClient(), enforcer=object(), emitter=object())  # type: ignore[arg-type]


def test_a_cut_responses_stream_counts_its_text_once() -> None:
    """The Responses API repeats an item's text in the events that close it: a stream cut after them (before
    ``response.completed``) is estimated from the deltas alone."""
    meter = StreamMeter("openai")
    where = {"item_id": "m", "output_index": 0, "content_index": 0}
    events = [
        {"type": "response.output_text.delta", **where, "delta": "word" * 10},  # 40 characters
        {"type": "response.output_text.done", **where, "text": "word" * 10},
        {"type": "response.content_part.done", **where, "part": {"type": "output_text", "text": "word" * 10}},
        {"type": "response.output_item.done", "output_index": 0, "item": {"content": [{"text": "word" * 10}]}},
    ]
    for event in events:
        meter.feed(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
    usage, estimated = meter.usage_so_far(lambda: 7, 100)
    assert estimated and (usage["prompt_tokens"], usage["completion_tokens"]) == (7, 14)  # 40 bytes, 3 a token


def test_a_usage_block_that_is_absent_empty_or_malformed_is_not_metered_by() -> None:
    """An attacker session: an upstream's ``{"prompt_tokens": -5, ...}`` or more cached than input tokens was
    metered at $0, without the estimate a missing block gets."""
    from spendstream.gateway.metering import counts_tokens

    assert counts_tokens({"prompt_tokens": 3, "completion_tokens": 8}, "openai")
    for broken in (
        {},
        {"prompt_tokens": None, "completion_tokens": None},
        {"prompt_tokens": 0, "completion_tokens": 0},
        {"prompt_tokens": -5, "completion_tokens": -100},
        {"prompt_tokens": 0, "completion_tokens": 0, "prompt_tokens_details": {"cached_tokens": 5}},
        {"prompt_tokens": "many"},
        {"prompt_tokens": 10, "completion_tokens": True},
        {"prompt_tokens": 10, "completion_tokens": 1.5},
        {"prompt_tokens": 10, "completion_tokens": 99_999_999_999_999},
        {"prompt_tokens": 10, "completion_tokens": 900, "completion_tokens_details": {"reasoning_tokens": -9000}},
    ):
        assert not counts_tokens(broken, "openai"), broken
    # no output counted for an answer with text: its output is estimated; an answer without text may count none
    assert not counts_tokens({"prompt_tokens": 1000}, "openai", lambda: 6_000)
    assert counts_tokens({"prompt_tokens": 1000}, "openai", lambda: 0)
    assert not counts_tokens({"input_tokens": 10, "server_tool_use": {"web_search_requests": -1}}, "anthropic")


def test_a_tool_call_answered_whole_counts_its_arguments_as_text() -> None:
    """An attacker session: Anthropic's non-streamed ``tool_use`` block without usage was estimated at 0 output."""
    from spendstream.gateway.metering import answered_bytes

    block = {"type": "tool_use", "id": "t", "name": "f", "input": {"query": "x" * 300}}
    assert answered_bytes(json.dumps({"content": [block]}).encode()) > 300


def test_an_answer_is_estimated_from_its_bytes_and_never_past_what_the_request_let_it_bill() -> None:
    """Characters / 4 read 4,000 CJK characters as 1,000 tokens (about 4,000 billed), and 40,000 words returned to a
    ``max_tokens: 5`` request as 50,000 tokens (an attacker session): 3 bytes a token, at most what was asked."""
    from spendstream.gateway.metering import estimated_body_usage, text_tokens

    cjk = json.dumps({"choices": [{"message": {"content": "漢" * 4_000}}]}, ensure_ascii=False).encode()
    assert estimated_body_usage(cjk, "openai", lambda: 7, 10_000) == {"prompt_tokens": 7, "completion_tokens": 4_000}
    long = json.dumps({"choices": [{"message": {"content": "word " * 40_000}}]}).encode()
    assert estimated_body_usage(long, "openai", lambda: 7, 5)["completion_tokens"] == 5
    assert text_tokens(10, 100) == 4 and text_tokens(0, 100) == 0

"""Response cache: keys, TTL, LRU by bytes, opt-in, stream recording and replay, metering of hits."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.codec import AvroCodec
from spendstream.core.pricing import PriceOverride, PriceTable, Rates, price_usage
from spendstream.gateway.response_cache import (
    ENTRY_OVERHEAD_BYTES,
    CacheConfig,
    CachedResponse,
    ResponseCache,
    StreamRecorder,
    cache_hit_event,
    cache_key,
    make_entry,
    replay,
    savings_tags,
)

BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
    "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
}
PRICES = PriceTable((PriceOverride("openai", "gpt-4o-mini", Rates(Decimal("0.15"), Decimal("0.60"))),))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(body: bytes = b'{"ok":true}', **kw: object) -> CachedResponse:
    return CachedResponse(status=200, content_type="application/json", body=body, **kw)  # type: ignore[arg-type]


def test_key_ignores_key_order_and_whitespace() -> None:
    reordered = json.loads(json.dumps(dict(reversed(list(BODY.items())))))
    spaced = json.loads(json.dumps(BODY, indent=4))
    key = cache_key(BODY, "chat.completions", "team:a")
    assert cache_key(reordered, "chat.completions", "team:a") == key == cache_key(spaced, "chat.completions", "team:a")
    assert len(key) == 64 and int(key, 16) >= 0


def test_key_ignores_user_and_metadata_only() -> None:
    key = cache_key(BODY, "chat.completions", "team:a")
    assert cache_key({**BODY, "user": "u1", "metadata": {"x": "y"}}, "chat.completions", "team:a") == key
    for changed in (
        {**BODY, "model": "gpt-4o"},
        {**BODY, "temperature": 0.7},
        {**BODY, "tools": []},
        {**BODY, "messages": [{"role": "user", "content": "What is the capital of Spain?"}]},
        {**BODY, "stream": True},
        {**BODY, "stream": True, "stream_options": {"include_usage": True}},
    ):
        assert cache_key(changed, "chat.completions", "team:a") != key
    assert cache_key(BODY, "chat.completions", "team:b") != key
    assert cache_key(BODY, "completions", "team:a") != key


def test_key_of_text_with_lone_surrogates() -> None:
    body = json.loads('{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}')
    assert cache_key(body, "e", "p") != cache_key({**body, "messages": []}, "e", "p")


@given(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=6))
def test_key_is_a_function_of_content(body: dict) -> None:
    shuffled = dict(sorted(body.items(), reverse=True))
    assert cache_key(body, "e", "p") == cache_key(shuffled, "e", "p")


def test_identical_requests_hit_different_ones_miss() -> None:
    cache = ResponseCache(ttl_s=60, max_bytes=10_000, max_entry_bytes=5_000)
    key = cache_key(BODY, "chat.completions", "team:a")
    assert cache.get(key) is None
    cache.put(key, entry())
    assert cache.get(cache_key(dict(BODY), "chat.completions", "team:a")) == entry()
    assert cache.get(cache_key({**BODY, "temperature": 1}, "chat.completions", "team:a")) is None
    assert (cache.stats.hits, cache.stats.misses, cache.stats.stores) == (1, 2, 1)


def test_ttl_expires() -> None:
    clock = Clock()
    cache = ResponseCache(ttl_s=30, max_bytes=10_000, max_entry_bytes=5_000, clock=clock)
    cache.put("k", entry())
    clock.now += 29.9
    assert cache.get("k") is not None
    clock.now += 0.1
    assert cache.get("k") is None
    assert cache.stats.expired == 1 and len(cache) == 0 and cache.bytes_used == 0


def test_lru_eviction_by_bytes() -> None:
    size = len(b"x" * 100) + ENTRY_OVERHEAD_BYTES
    cache = ResponseCache(ttl_s=60, max_bytes=3 * size, max_entry_bytes=3 * size)
    for key in "abc":
        cache.put(key, entry(b"x" * 100))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", entry(b"x" * 100))
    assert cache.get("b") is None and cache.get("a") is not None
    assert cache.bytes_used == 3 * size and cache.stats.evictions == 1
    assert not cache.put("huge", entry(b"x" * (3 * size)))
    assert cache.stats.too_large == 1


def test_replacing_an_entry_keeps_the_byte_count_exact() -> None:
    cache = ResponseCache(ttl_s=60, max_bytes=10_000, max_entry_bytes=5_000)
    cache.put("k", entry(b"x" * 10))
    cache.put("k", entry(b"x" * 20))
    assert cache.bytes_used == 20 + ENTRY_OVERHEAD_BYTES and len(cache) == 1


def test_opt_in_per_scope_and_temperature() -> None:
    config = CacheConfig(scopes=["feature:faq_bot", "team:support"], max_temperature=0.2)
    assert config.partition({"team": "marketing", "feature": "faq_bot"}) == "feature:faq_bot|org:|team:marketing"
    assert config.partition({"team": "marketing", "feature": ""}) is None
    assert CacheConfig().partition({"team": "support"}) is None
    assert config.cacheable({"temperature": 0}) and not config.cacheable({"temperature": 0.7})
    assert not config.cacheable({})  # the provider default temperature is 1


def test_opt_in_scopes_match_like_the_policys_scopes() -> None:
    """A ``dimension:*`` template opts in every value, each in its own partition, as a policy template does."""
    config = CacheConfig(scopes=["team:*", "feature:faq_bot"])
    assert config.partition({"team": "support", "feature": "faq_bot"}) == "team:support|org:|team:support"
    assert config.partition({"team": "", "feature": "faq_bot"}) == "feature:faq_bot|org:|team:"
    assert config.partition({"team": "", "user": "u1"}) is None
    assert CacheConfig(scopes=["*"]).partition({"org": "", "team": "web"}) == "team:web|org:|team:web"


def test_a_scope_several_teams_name_caches_each_teams_answers_apart() -> None:
    """An attacker session: with ``feature:faq`` opted in, a key of another team naming the same feature was served
    marketing's cached completion. A scope's partition is within its org and team."""
    config = CacheConfig(scopes=["feature:faq"])
    marketing = config.partition({"org": "acme", "team": "marketing", "feature": "faq"})
    sales = config.partition({"org": "acme", "team": "sales", "feature": "faq"})
    other_org = config.partition({"org": "globex", "team": "marketing", "feature": "faq"})
    assert len({marketing, sales, other_org}) == 3
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    assert cache_key(body, "chat", marketing) != cache_key(body, "chat", sales)  # type: ignore[arg-type]


SSE = [
    b'data: {"id":"c1","model":"gpt-4o-mini","choices":[{"delta":{"content":"Par"}}]}\n\n',
    b'data: {"id":"c1","choices":[{"delta":{"content":"is"}}]}\n\n',
    b"event: ping\r\ndata: {}\r\n\r\n",
    b"data: [DONE]\n\n",
]


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_stream_recorded_across_any_chunking_replays_the_same_events(cuts: list[int]) -> None:
    data = b"".join(SSE)
    recorder = StreamRecorder(max_bytes=10_000)
    pos = 0
    for cut in cuts:
        recorder.feed(data[pos : pos + cut])
        pos += cut
    recorder.feed(data[pos:])
    events = recorder.finish()
    assert events == tuple(SSE)
    stored = CachedResponse(200, "text/event-stream", events=events, provider="openai", model_served="gpt-4o-mini")
    assert list(replay(stored)) == SSE and stored.streamed


def test_incomplete_or_oversized_streams_are_not_stored() -> None:
    cut = StreamRecorder(max_bytes=10_000)
    cut.feed(SSE[0] + SSE[1][:10])
    assert cut.finish() is None
    big = StreamRecorder(max_bytes=50)
    for event in SSE:
        big.feed(event)
    assert big.abandoned and big.finish() is None
    assert StreamRecorder(max_bytes=10).finish() is None


AT = datetime(2025, 6, 1, tzinfo=UTC)


def test_entries_from_responses_keep_token_counts() -> None:
    made = make_entry(
        content_type="application/json",
        provider="anthropic",
        model_served="claude-3-haiku",
        raw_usage={"input_tokens": 10, "cache_read_input_tokens": 90, "output_tokens": 5},
        body=b"{}",
    )
    assert made is not None
    assert (made.input_tokens, made.cached_input_tokens, made.output_tokens) == (100, 90, 5)
    assert make_entry(content_type="x", provider="openai", model_served="m", raw_usage={}) is None
    bad = {"prompt_tokens": -1}
    assert make_entry(content_type="x", provider="openai", model_served="m", raw_usage=bad) is None


def test_savings_are_the_cost_the_call_would_have_had() -> None:
    stored = entry(provider="openai", model_served="gpt-4o-mini", input_tokens=1000, output_tokens=200)
    expected = price_usage("openai", "gpt-4o-mini", 1000, 200, at=AT, overrides=PRICES).cost_nanos
    assert expected == 150_000 + 120_000
    assert savings_tags(stored, PRICES, AT) == {"cache": "hit", "saved_nanos": str(expected)}
    reject = PriceTable(unknown_model="reject")
    assert savings_tags(entry(provider="x", model_served="nope", input_tokens=1), reject, AT) == {"cache": "hit"}


def test_hit_becomes_a_free_usage_event_that_encodes() -> None:
    stored = entry(provider="openai", model_served="gpt-4o-mini", input_tokens=1000, output_tokens=200)
    event = cache_hit_event(
        entry=stored,
        attribution={"team": "support", "feature": "faq_bot"},
        model_requested="gpt-4o-mini",
        latency_ms=1,
        decision="allow",
        tags={"endpoint": "chat.completions"},
        prices=PRICES,
    )
    assert event.cache_hit and event.cost_nanos == 0
    assert (event.input_tokens, event.output_tokens) == (0, 0)
    assert event.tags["saved_nanos"] == "270000" and event.tags["endpoint"] == "chat.completions"
    decoded = AvroCodec("usage_event").decode(AvroCodec("usage_event").encode(event.to_avro()))
    assert decoded["cache_hit"] is True and decoded["tags"]["saved_nanos"] == "270000"

"""Cost-aware routing and the response cache in the gateway: stub upstreams, real broker, usage read back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from spendstream.core.config import Settings
from spendstream.core.events import Decision
from spendstream.core.policy import parse_policy
from spendstream.core.pricing import price_usage
from spendstream.edge.emitter import Emitter
from spendstream.edge.enforcer import Enforcer
from spendstream.gateway.app import Gateway, GatewayThread
from spendstream.gateway.config import GatewayConfig, ProviderConfig, UpstreamConfig
from spendstream.gateway.response_cache import CacheConfig
from spendstream.runtime.embedded_broker import EmbeddedBroker
from stub_upstream import StubUpstream, publish_decisions, wait_for
from test_gateway import HEADER_KEY, KEYS, http, read_usage

POLICY = parse_policy(
    """
routing:
  default_environment: production
  environments:
    development:
      local_only: true
      tiers: {simple: [local/llama-3.2-1b], medium: [local/llama-3.2-3b], complex: [local/llama-3.2-3b]}
    production:
      tiers:
        simple: [openai/gpt-4o-mini]
        medium: [openai/gpt-4o-mini]
        complex: [openai/gpt-4o, anthropic/claude-3-5-sonnet]
  providers:
    openai: {priority: 1}
    anthropic: {priority: 2}
    local: {priority: 3, local: true}
pricing:
  overrides:
    - {provider: local, model: llama-3.2-1b, input_per_mtok: "0.02", output_per_mtok: "0.02"}
    - {provider: local, model: llama-3.2-3b, input_per_mtok: "0.05", output_per_mtok: "0.05"}
"""
)
SIMPLE = {"model": "gpt-4o", "messages": [{"role": "user", "content": "What is the capital of France?"}]}


@pytest.fixture
def routed(settings: Settings, tmp_path: Path) -> Iterator[tuple[GatewayThread, StubUpstream]]:
    with StubUpstream() as upstream:
        config = GatewayConfig(
            keys=KEYS,
            providers={
                name: ProviderConfig(kind=kind, upstreams=[UpstreamConfig(base_url=upstream.url)])
                for name, kind in (("openai", "openai"), ("anthropic", "anthropic"), ("local", "openai"))
            },
            model_routes={"llama": "local"},
            pricing={"overrides": [o.model_dump(mode="json") for o in POLICY.pricing.overrides]},
        )
        enforcer = Enforcer(settings=settings).start()
        assert enforcer.wait_ready(10)
        emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
        cache = CacheConfig(scopes=["team:marketing"])
        gateway = Gateway(
            config, settings, enforcer=enforcer, emitter=emitter, routing=POLICY.routing,
            thresholds=POLICY.thresholds, cache=cache,
        )  # fmt: skip
        with GatewayThread(gateway) as running:
            yield running, upstream
        emitter.close(10)
        enforcer.stop()


def test_routing_by_complexity_environment_and_header(routed, broker: EmbeddedBroker) -> None:
    gateway, upstream = routed
    url = gateway.url + "/v1/chat/completions"
    status, headers, _ = http(url, SIMPLE, key=HEADER_KEY)
    assert status == 200 and upstream.last_body["model"] == "gpt-4o-mini"
    assert headers["X-Spendstream-Model"] == "gpt-4o-mini"
    status, _, _ = http(url, SIMPLE, key=HEADER_KEY, headers={"X-Spendstream-Complexity": "complex"})
    assert status == 200 and upstream.last_body["model"] == "gpt-4o"
    status, _, body = http(url, SIMPLE, key=HEADER_KEY, headers={"X-Spendstream-Complexity": "hard"})
    assert status == 400 and b"simple, medium, complex" in body
    dev = {"X-Spendstream-Environment": "development"}
    assert http(url, SIMPLE, key=HEADER_KEY, headers=dev)[0] == 200
    assert upstream.last_body["model"] == "llama-3.2-1b"
    status, _, body = http(gateway.url + "/v1/messages", {**SIMPLE, "max_tokens": 5}, key=HEADER_KEY, headers=dev)
    assert status == 403 and b"development" in body  # no local model speaks the Anthropic API
    assert (
        http(gateway.url + "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["x"]}, HEADER_KEY)[0] == 200
    )

    events = read_usage(broker.bootstrap, 4)
    by_served = {e["model_served"]: e for e in events}
    mini = by_served["gpt-4o-mini"]
    assert mini["model_requested"] == "gpt-4o" and mini["tags"]["route_tier"] == "simple"
    assert mini["tags"]["requested_model"] == "openai/gpt-4o" and mini["tags"]["complexity"] == "simple"
    n_in, n_out = mini["input_tokens"], mini["output_tokens"]
    expected = price_usage("openai", "gpt-4o", n_in, n_out, at=mini["occurred_at"]).cost_nanos
    assert mini["tags"]["requested_cost_nanos"] == str(expected) and expected > mini["cost_nanos"]
    assert by_served["gpt-4o"]["tags"]["route_reason"] == "requested"
    local = by_served["llama-3.2-1b"]
    assert local["provider"] == "local" and local["environment"] == "development"
    assert "route_tier" not in by_served["text-embedding-3-small"]["tags"]


def test_cache_hits_replay_and_are_metered(routed, broker: EmbeddedBroker) -> None:
    gateway, _ = routed
    url = gateway.url + "/v1/chat/completions"
    first = http(url, SIMPLE)
    second = http(url, json.loads(json.dumps(SIMPLE, indent=2)))
    assert first[0] == second[0] == 200 and first[2] == second[2]
    assert second[1]["X-Spendstream-Cache"] == "hit" and "X-Spendstream-Cache" not in first[1]
    streamed = [http(url, {**SIMPLE, "stream": True}) for _ in range(2)]
    assert streamed[0][2] == streamed[1][2] and streamed[1][1]["X-Spendstream-Cache"] == "hit"
    assert streamed[0][2].endswith(b"data: [DONE]\n\n")
    other = http(url, {**SIMPLE, "messages": [{"role": "user", "content": "What is the capital of Spain?"}]})
    assert other[0] == 200 and "X-Spendstream-Cache" not in other[1]
    assert http(url, SIMPLE, key=HEADER_KEY)[1].get("X-Spendstream-Cache") is None  # team platform did not opt in

    events = read_usage(broker.bootstrap, 6)
    hits = [e for e in events if e["cache_hit"]]
    assert len(hits) == 2 and all(e["cost_nanos"] == 0 and e["input_tokens"] == 0 for e in hits)
    # A hit saves what its original call cost (the same token counts on the same model).
    missed_costs = {str(e["cost_nanos"]) for e in events if not e["cache_hit"]}
    assert all(h["tags"]["saved_nanos"] in missed_costs and int(h["tags"]["saved_nanos"]) > 0 for h in hits)
    assert len(events) == 6 and sum(not e["cache_hit"] for e in events) == 4
    assert gateway.gateway.cache.stats.hits == 2


def test_headers_tell_a_routing_rewrite_from_a_budget_fallback(routed, broker: EmbeddedBroker) -> None:
    gateway, upstream = routed
    url = gateway.url + "/v1/chat/completions"
    status, headers, _ = http(url, SIMPLE, key=HEADER_KEY)  # routing picks the simple tier's model
    assert status == 200 and upstream.last_body["model"] == "gpt-4o-mini"
    assert (headers["X-Spendstream-Model"], headers["X-Spendstream-Routed-From"]) == ("gpt-4o-mini", "gpt-4o")
    assert headers["X-Spendstream-Route-Reason"].startswith("tier simple")
    assert int(headers["X-Spendstream-Route-Saving-Nanos"]) > 0
    assert headers["X-Spendstream-Decision"] == "allow" and "X-Spendstream-Fallback-From" not in headers

    complex_ = {"X-Spendstream-Complexity": "complex"}
    status, headers, _ = http(url, SIMPLE, key=HEADER_KEY, headers=complex_)  # served as requested
    assert status == 200 and not {h for h in headers if h.startswith(("X-Spendstream-Rout", "X-Spendstream-Fall"))}

    fallback = {"gpt-4o": "claude-3-haiku"}
    publish_decisions(
        broker.bootstrap, [Decision(scope="team:platform", action="fallback", version=1, fallback_models=fallback)]
    )
    assert wait_for(lambda: "X-Spendstream-Fallback-From" in http(url, SIMPLE, key=HEADER_KEY, headers=complex_)[1], 5)
    status, headers, _ = http(url, SIMPLE, key=HEADER_KEY, headers=complex_)
    assert (headers["X-Spendstream-Decision"], headers["X-Spendstream-Fallback-From"]) == ("fallback", "gpt-4o")
    assert headers["X-Spendstream-Model"] == "claude-3-haiku" and "X-Spendstream-Routed-From" not in headers


def test_absurd_usage_of_a_routed_call_records_no_requested_cost(routed, broker: EmbeddedBroker) -> None:
    gateway, upstream = routed
    # Beyond the per-event bounds: not metered by but estimated, with the reason, so no cost is made up from them
    # (and none is $0: an attacker session)
    upstream.reported_usage = {"prompt_tokens": 5 * 10**15, "completion_tokens": 5 * 10**15}
    status, headers, _ = http(gateway.url + "/v1/chat/completions", SIMPLE, key=HEADER_KEY)
    assert status == 200 and headers["X-Spendstream-Model"] == "gpt-4o-mini"
    (event,) = read_usage(broker.bootstrap, 1)
    assert 0 < event["input_tokens"] < 1_000 and 0 < event["output_tokens"] < 1_000 and event["cost_nanos"] > 0
    assert event["tags"]["usage"] == "estimated" and "out of range" in event["tags"]["usage_error"]
    assert int(event["tags"].get("requested_cost_nanos", 0)) < 10**9

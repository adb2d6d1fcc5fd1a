"""The gateway end to end: real broker, stub upstreams in-process, usage read back from spendstream.usage."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from spendstream.core.codec import AvroCodec
from spendstream.core.config import ConfigError, Settings, load_settings
from spendstream.core.events import Decision
from spendstream.core.pricing import price_usage
from spendstream.core.topics import USAGE
from spendstream.edge.emitter import Emitter
from spendstream.edge.enforcer import Enforcer
from spendstream.gateway.app import Gateway, GatewayThread
from spendstream.gateway.config import GatewayConfig, ProviderConfig, UpstreamConfig, load_gateway_config
from spendstream.gateway.keys import KeyStore, VirtualKey, hash_key
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics
from stub_upstream import StubUpstream, publish_decisions, wait_for

KEY = "sk-ss-test-marketing"
HEADER_KEY = "sk-ss-test-platform"
KEYS = [
    VirtualKey(sha256=hash_key(KEY), name="mkt", org="acme", team="marketing", feature="ai_chatbot", user="u1"),
    VirtualKey(sha256=hash_key(HEADER_KEY), name="platform", team="platform", allow_header_attribution=True),
]
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "four words of prompt"}], "max_tokens": 5}


def http(
    url: str, body: Any = None, key: str | None = KEY, headers: dict[str, str] | None = None, raw: bytes | None = None
):
    """POST (or GET without a body); returns (status, headers, bytes) for every status."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def read_usage(bootstrap: str, expected: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    """Every usage event on the topic once ``expected`` have arrived (and half a second for any extra)."""
    codec = AvroCodec("usage_event")
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "enable.auto.commit": False})
    partitions = consumer.list_topics(USAGE, timeout=10).topics[USAGE].partitions
    consumer.assign([TopicPartition(USAGE, p, OFFSET_BEGINNING) for p in partitions])
    events: list[dict[str, Any]] = []
    deadline, settle = time.monotonic() + timeout, None
    try:
        while time.monotonic() < deadline and (settle is None or time.monotonic() < settle):
            for msg in consumer.consume(100, 0.1):
                if msg.error() is None:
                    events.append(codec.decode(msg.value()))
            if len(events) >= expected and settle is None:
                settle = time.monotonic() + 0.5
    finally:
        consumer.close()
    return events


@pytest.fixture
def upstreams() -> Iterator[tuple[StubUpstream, StubUpstream]]:
    with StubUpstream() as primary, StubUpstream() as secondary:
        yield primary, secondary


def gateway_config(primary: StubUpstream, secondary: StubUpstream, **overrides: Any) -> GatewayConfig:
    return GatewayConfig(
        keys=KEYS,
        providers={
            "openai": ProviderConfig(
                kind="openai", upstreams=[UpstreamConfig(base_url=primary.url), UpstreamConfig(base_url=secondary.url)]
            ),
            "anthropic": ProviderConfig(kind="anthropic", upstreams=[UpstreamConfig(base_url=primary.url)]),
        },
        **overrides,
    )


@pytest.fixture
def gateway(settings: Settings, upstreams, tmp_path: Path) -> Iterator[GatewayThread]:
    enforcer = Enforcer(settings=settings).start()
    assert enforcer.wait_ready(10)
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    config = gateway_config(*upstreams, max_body_bytes=64 * 1024)
    with GatewayThread(Gateway(config, settings, enforcer=enforcer, emitter=emitter)) as running:
        yield running
    emitter.close(10)
    enforcer.stop()


def test_requests_answered_just_before_a_stop_are_metered(
    settings: Settings, upstreams, tmp_path: Path, broker: EmbeddedBroker
) -> None:
    """Usage events are built in batches after the answers; stopping the gateway meters what is pending."""
    enforcer = Enforcer(settings=settings).start()
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    gateway = Gateway(gateway_config(*upstreams), settings, enforcer=enforcer, emitter=emitter, meter_batch_s=30.0)
    with GatewayThread(gateway) as running:
        statuses = [http(running.url + "/v1/chat/completions", CHAT)[0] for _ in range(5)]
        assert len(gateway._unmetered) == 5  # a batch 30 s long: nothing metered yet
    emitter.close(10)
    enforcer.stop()
    assert statuses == [200] * 5
    assert len(read_usage(broker.bootstrap, 5)) == 5


def test_each_request_becomes_one_usage_event(gateway: GatewayThread, broker: EmbeddedBroker, upstreams) -> None:
    primary, _ = upstreams
    status, headers, body = http(gateway.url + "/v1/chat/completions", CHAT)
    assert status == 200, body
    reply = json.loads(body)
    assert reply["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 5,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert headers["X-Spendstream-Decision"] == "allow"
    assert primary.last_headers.get("authorization") is None  # the virtual key never reaches the provider

    status, _, streamed = http(gateway.url + "/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 3})
    assert status == 200
    chunks = [line for line in streamed.decode().split("\n\n") if line]
    assert chunks[-1] == "data: [DONE]" and len(chunks) == 5  # 3 words, the stop chunk, [DONE]
    assert b'"usage"' not in streamed  # the usage chunk the gateway asked for is not shown to the client
    assert primary.last_body["stream_options"] == {"include_usage": True}

    message = {"model": "claude-3-5-sonnet-latest", "max_tokens": 7, "messages": [{"role": "user", "content": "a b"}]}
    assert http(gateway.url + "/v1/messages", message, headers={"anthropic-version": "2023-06-01"})[0] == 200
    status, _, streamed = http(gateway.url + "/v1/messages", {**message, "stream": True})
    assert status == 200 and b"message_stop" in streamed
    assert http(gateway.url + "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["x y z"]})[0] == 200
    # headers refine what the key leaves open (its team may be repeated, not changed)
    headers = {"X-Spendstream-Team": "platform", "X-Spendstream-User": "u9", "X-Spendstream-Feature": "ai_lead_scorer"}
    assert (
        http(gateway.url + "/v1/completions", {"model": "gpt-4o-mini", "prompt": "p q"}, HEADER_KEY, headers)[0] == 200
    )
    # a key that takes no headers refuses one it would ignore, and names how to mint one that takes them; a header
    # repeating what the key sets changes nothing (an attacker session: a call was charged to no team)
    completion = {"model": "gpt-4o-mini", "prompt": "p q"}
    status, _, refused = http(gateway.url + "/v1/completions", completion, KEY, {"X-Spendstream-Team": "sales"})
    assert status == 400 and "--allow-header-attribution" in json.loads(refused)["error"]["message"]
    assert http(gateway.url + "/v1/completions", completion, KEY, {"X-Spendstream-User": "u2"})[0] == 400
    status, _, models = http(gateway.url + "/v1/models")
    assert status == 200 and json.loads(models)["data"]

    events = read_usage(broker.bootstrap, 6)
    assert len(events) == 6 and len({e["event_id"] for e in events}) == 6
    by_shape = {(e["model_requested"], e["tags"]["endpoint"], e["output_tokens"]): e for e in events}
    expected = [
        ("gpt-4o", "chat.completions", 4, 5, "openai"),
        ("gpt-4o", "chat.completions", 4, 3, "openai"),
        ("claude-3-5-sonnet-latest", "messages", 2, 7, "anthropic"),
        ("text-embedding-3-small", "embeddings", 3, 0, "openai"),
        ("gpt-4o-mini", "completions", 2, 8, "openai"),
    ]
    for model, endpoint, n_in, n_out, provider in expected:
        event = by_shape[(model, endpoint, n_out)]
        assert (event["input_tokens"], event["provider"], event["status"]) == (n_in, provider, "ok")
        assert event["cost_nanos"] == price_usage(provider, model, n_in, n_out, at=event["occurred_at"]).cost_nanos
        assert event["cost_nanos"] > 0 and event["price_source"]
    claude = [e for e in events if e["provider"] == "anthropic"]
    assert len(claude) == 2 and all(e["input_tokens"] == 2 and e["output_tokens"] == 7 for e in claude)
    chat = by_shape[("gpt-4o", "chat.completions", 5)]
    assert (chat["org"], chat["team"], chat["feature"], chat["user"], chat["tags"]["key"]) == (
        "acme",
        "marketing",
        "ai_chatbot",
        "u1",
        "mkt",
    )
    refined = by_shape[("gpt-4o-mini", "completions", 8)]
    assert (refined["team"], refined["user"], refined["feature"]) == ("platform", "u9", "ai_lead_scorer")
    assert all("four words" not in json.dumps(e, default=str) for e in events)  # no prompt text in events
    # a header naming a user that looks like "u9" but is not (a zero-width space, sent as UTF-8): refused
    hidden = {"X-Spendstream-User": "u9\u200b".encode().decode("latin-1")}
    status, _, said = http(gateway.url + "/v1/completions", {"model": "gpt-4o-mini", "prompt": "p"}, HEADER_KEY, hidden)
    assert status == 400 and b"invisible or control character" in said, said


def test_decisions_change_the_gateway_within_a_second(gateway: GatewayThread, broker: EmbeddedBroker, upstreams):
    primary, _ = upstreams
    url = gateway.url + "/v1/chat/completions"

    def after(decision: Decision, expected_status: int) -> tuple[int, Any, bytes]:
        publish_decisions(broker.bootstrap, [decision])
        published = time.monotonic()
        assert wait_for(lambda: http(url, CHAT)[0] == expected_status, 1.0), decision
        assert time.monotonic() - published < 1.0
        return http(url, CHAT)

    fallback = Decision(scope="team:marketing", action="fallback", version=1, fallback_models={"gpt-4o": "gpt-4o-mini"})
    publish_decisions(broker.bootstrap, [fallback])
    assert wait_for(lambda: "X-Spendstream-Model" in http(url, CHAT)[1], 1.0)
    status, headers, body = http(url, CHAT)
    assert (status, headers["X-Spendstream-Model"], headers["X-Spendstream-Fallback-From"]) == (
        200,
        "gpt-4o-mini",
        "gpt-4o",
    )
    assert primary.last_body["model"] == "gpt-4o-mini" and json.loads(body)["model"] == "gpt-4o-mini"

    status, headers, body = after(Decision(scope="user:*", action="throttle", throttle_rps=0.0, version=1), 429)
    assert int(headers["Retry-After"]) >= 1 and json.loads(body)["error"]["code"] == "rate_limit_exceeded"

    reason = "monthly budget of $8,000 spent"
    status, headers, body = after(Decision(scope="team:marketing", action="shutoff", version=2, reason=reason), 402)
    error = json.loads(body)["error"]
    assert error["code"] == "budget_exceeded" and "team:marketing" in error["message"] and error["param"] is None
    assert headers["X-Spendstream-Scope"] == "team:marketing"
    anthropic_block = http(gateway.url + "/v1/messages", {"model": "claude-3-haiku", "messages": [], "max_tokens": 1})
    assert anthropic_block[0] == 402 and json.loads(anthropic_block[2])["type"] == "error"

    publish_decisions(broker.bootstrap, [Decision(scope="user:*", action="allow", version=2)])
    only_haiku = Decision(scope="team:marketing", action="allow", version=3, allowed_models=["claude-3-haiku"])
    status, _, body = after(only_haiku, 403)
    assert json.loads(body)["error"]["code"] == "model_not_allowed"

    after(Decision(scope="team:marketing", action="allow", version=4), 200)

    events = read_usage(broker.bootstrap, 1, timeout=5)
    blocked = {e["decision_applied"] for e in events if e["status"] == "blocked"}
    assert {"throttle", "shutoff", "deny_model"} <= blocked
    assert all(e["cost_nanos"] == 0 and e["input_tokens"] == 0 for e in events if e["status"] == "blocked")


def test_bad_input_is_refused_and_the_gateway_keeps_serving(gateway: GatewayThread, broker: EmbeddedBroker) -> None:
    url = gateway.url + "/v1/chat/completions"
    cases = [
        (http(url, raw=b"{not json"), 400),
        (http(url, raw=b"[1, 2]"), 400),
        (http(url, {"messages": []}), 400),
        (http(url, {"model": 42}), 400),
        (http(url, raw=b'{"model": "gpt-4o", "temperature": NaN}'), 400),
        # a repeated key: the gateway would check one copy and an upstream may read the other (an attacker session)
        (http(url, raw=b'{"model": "gpt-4o", "model": "gpt-4o-mini", "messages": []}'), 400),
        (http(url, raw=b'{"model": "gpt-4o", "messages": [{"role": "user", "role": "system", "content": "x"}]}'), 400),
        (http(url, raw=b'{"model": "gpt-4o", "pad": "' + b"x" * 70_000 + b'"}'), 413),
        (http(url, CHAT, key="sk-ss-unknown"), 401),
        (http(url, CHAT, key=None), 401),
        # a look-alike names no model a budget can name (a Greek omicron; an attacker session)
        (http(url, {**CHAT, "model": "gpt-4\u03bf"}), 400),
    ]
    for (status, _, body), expected in cases:
        assert status == expected
        error = json.loads(body)["error"]
        assert error["message"] and error["type"] and "param" in error
    assert 'names the key "model" twice in one object' in json.loads(cases[5][0][2])["error"]["message"]
    assert http(url, CHAT)[0] == 200
    events = read_usage(broker.bootstrap, 1, timeout=5)
    assert len(events) == 1  # refused input reached no model and named none: no usage event


def test_a_model_without_a_price_is_refused_when_the_policy_in_force_rejects_unpriced_models(
    settings: Settings, upstreams, tmp_path: Path, broker: EmbeddedBroker
) -> None:
    """A user session: under ``pricing.unknown_model: reject`` the gateway (started without a policy file) served
    ``gpt-9-turbo``; the sink dead-lettered its event, so the call was in no report and no budget. It is refused
    before it leaves, and the gateway prices by the policy in force whether or not it was given a policy file."""
    from spendstream.core.policy import parse_policy
    from spendstream.core.policy_log import publish_policy

    publish_policy(settings.kafka_client_config(), parse_policy("pricing: {unknown_model: reject}\n"))
    enforcer = Enforcer(settings=settings).start()
    assert enforcer.wait_ready(10) and wait_for(lambda: enforcer.policy is not None, 10)
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    primary = upstreams[0]
    try:
        with GatewayThread(Gateway(gateway_config(*upstreams), settings, enforcer=enforcer, emitter=emitter)) as gw:
            url = gw.url + "/v1/chat/completions"
            before = primary.requests
            status, _, body = http(url, {**CHAT, "model": "gpt-9-turbo"})
            assert status == 400 and primary.requests == before
            error = json.loads(body)["error"]
            assert error["code"] == "model_not_priced" and "pricing.overrides" in error["message"]
            assert http(url, CHAT)[0] == 200
    finally:
        emitter.close(10)
        enforcer.stop()


def test_failover_to_the_secondary_upstream(settings: Settings, upstreams, tmp_path: Path) -> None:
    primary, secondary = upstreams
    enforcer = Enforcer(settings=settings).start()
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    gateway = Gateway(gateway_config(primary, secondary), settings, enforcer=enforcer, emitter=emitter)
    with GatewayThread(gateway) as running:
        primary.fail_status = 503
        status, _, _ = http(running.url + "/v1/chat/completions", CHAT)
        assert status == 200 and secondary.requests == 1
        assert gateway.upstreams.failures[primary.url] == 1
        streamed = http(running.url + "/v1/chat/completions", {**CHAT, "stream": True})
        assert streamed[0] == 200 and secondary.requests == 2
        secondary.fail_status = 500
        status, _, _ = http(running.url + "/v1/chat/completions", CHAT)
        assert status == 500  # the last upstream's answer is passed on
        health = json.loads(http(running.url + "/healthz")[2])
        assert health["upstream_failures"] == {primary.url: 3, secondary.url: 1}
    events = read_usage(settings.kafka_bootstrap, 3)
    assert sorted(e["status"] for e in events) == ["error", "ok", "ok"]
    assert {e["tags"]["upstream"] for e in events if e["status"] == "ok"} == {secondary.url}
    emitter.close(10)
    enforcer.stop()


def test_broker_down_requests_served_and_usage_delivered_later(upstreams, tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
    settings = load_settings(kafka_bootstrap=broker.bootstrap, data_dir=tmp_path / "data")
    enforcer = Enforcer(settings=settings).start()
    assert enforcer.wait_ready(10)
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    try:
        with GatewayThread(Gateway(gateway_config(*upstreams), settings, enforcer=enforcer, emitter=emitter)) as gw:
            assert http(gw.url + "/v1/chat/completions", CHAT)[0] == 200
            assert wait_for(lambda: emitter.stats.sent >= 1, 10)
            broker.kill()
            for _ in range(5):
                assert http(gw.url + "/v1/chat/completions", CHAT)[0] == 200  # fail-open
            assert wait_for(lambda: emitter.stats.spooled >= 5, 30)
            broker = EmbeddedBroker(port=broker.port, log_path=tmp_path / "broker2.log").start()
            create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
            assert emitter.flush(60) == 0
        events = read_usage(broker.bootstrap, 5)
        assert len(events) == 5 and all(e["team"] == "marketing" and e["status"] == "ok" for e in events)
    finally:
        emitter.close(5)
        enforcer.stop()
        broker.stop()


def test_config_file_and_openai_client_compatibility(settings: Settings, upstreams, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    primary, _ = upstreams
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"- {{sha256: {hash_key(KEY)}, team: marketing}}\n")
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(
        "keys_file: keys.yaml\n"
        f"providers:\n  openai:\n    upstreams: [{{base_url: '{primary.url}'}}]\n"
        f"  anthropic:\n    kind: anthropic\n    upstreams: [{{base_url: '{primary.url}'}}]\n"
        "hierarchy: {'team:marketing': 'division:growth'}\n"
        "pricing:\n  overrides:\n"
        "    - {provider: openai, model: gpt-4o, input_per_mtok: '1', output_per_mtok: '2.5'}\n"
    )
    config = load_gateway_config(config_path)
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    gateway = Gateway(config, settings, emitter=emitter)  # builds its own Enforcer from settings and config
    with GatewayThread(gateway) as running:
        client = openai.OpenAI(api_key=KEY, base_url=running.url + "/v1", max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi there"}])
        assert reply.usage.prompt_tokens == 2
        text = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(model="gpt-4o", messages=[], stream=True)
            if chunk.choices
        )
        assert text == " ".join(["word"] * 8)
        publish_decisions(settings.kafka_bootstrap, [Decision(scope="division:growth", action="shutoff", version=1)])
        assert wait_for(lambda: gateway.enforcer.check(team="marketing", model="gpt-4o").blocked, 5)
        with pytest.raises(openai.APIStatusError) as blocked:
            client.chat.completions.create(model="gpt-4o", messages=[])
        assert blocked.value.status_code == 402 and blocked.value.code == "budget_exceeded"
        assert "division:growth" in blocked.value.message
    emitter.close(10)
    events = read_usage(settings.kafka_bootstrap, 3)
    costs = sorted(e["cost_nanos"] for e in events)
    assert costs == [0, 0 * 1000 + 8 * 2500, 2 * 1000 + 8 * 2500]  # override rates, in nanos per token
    assert {e["price_source"] for e in events if e["cost_nanos"]} == {"override:openai/gpt-4o"}


def test_anthropic_token_counting_is_passed_through_unmetered(
    settings: Settings, gateway: GatewayThread, upstreams
) -> None:
    anthropic = pytest.importorskip("anthropic")
    primary, _ = upstreams
    client = anthropic.Anthropic(api_key=KEY, base_url=gateway.url, max_retries=0)
    counted = client.messages.count_tokens(
        model="claude-3-5-sonnet-latest", messages=[{"role": "user", "content": "four words of prompt"}]
    )
    assert counted.input_tokens == 4 and primary.last_headers["anthropic-version"]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(api_key="sk-wrong", base_url=gateway.url, max_retries=0).messages.count_tokens(
            model="claude-3-5-sonnet-latest", messages=[{"role": "user", "content": "x"}]
        )
    client.messages.create(model="claude-3-5-sonnet-latest", max_tokens=3, messages=[{"role": "user", "content": "x"}])
    (event,) = read_usage(settings.kafka_bootstrap, 1)  # the message, not the count: counting costs nothing
    assert event["tags"]["endpoint"] == "messages"
    counts = json.loads(http(gateway.url + "/healthz")[2])["requests"]
    assert counts["token_count"] == 1 and counts["unauthorized"] >= 1


def test_the_openai_responses_api_is_proxied_metered_and_held_to_budgets(
    settings: Settings, gateway: GatewayThread, upstreams
) -> None:
    """``client.responses.create`` through the gateway, plain and streamed: the SDK reads the answer, the usage event
    carries the Responses API's token counts and cost, and a shutoff stops it like a chat call."""
    openai = pytest.importorskip("openai")
    primary, _ = upstreams
    client = openai.OpenAI(api_key=KEY, base_url=gateway.url + "/v1", max_retries=0)
    reply = client.responses.create(model="gpt-4o-mini", input="three words here", max_output_tokens=6)
    assert reply.output_text == " ".join(["word"] * 6) and reply.usage.input_tokens == 3
    with client.responses.stream(model="gpt-4o-mini", input=[{"role": "user", "content": "two words"}]) as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == " ".join(["word"] * 8) and final.usage.output_tokens == 8
    assert "stream_options" not in primary.last_body  # chat's include_usage is not the Responses API's
    events = read_usage(settings.kafka_bootstrap, 2)
    shapes = sorted((e["tags"]["endpoint"], e["input_tokens"], e["output_tokens"], e["status"]) for e in events)
    assert shapes == [("responses", 2, 8, "ok"), ("responses", 3, 6, "ok")]
    for event in events:
        cost = price_usage(
            "openai", "gpt-4o-mini", event["input_tokens"], event["output_tokens"], at=event["occurred_at"]
        )
        assert event["cost_nanos"] == cost.cost_nanos > 0
    with pytest.raises(openai.BadRequestError):  # a provider's 400 reaches the client as it is
        client.responses.create(model="gpt-4o-mini", input="x", max_output_tokens=-5)
    # Calls on stored responses cost nothing: passed through, unmetered (counted apart)
    assert client.responses.retrieve(reply.id).output_text == reply.output_text
    assert list(client.responses.input_items.list(reply.id, limit=5)) == [] and primary.last_query == "limit=5"
    assert client.responses.input_tokens.count(model="gpt-4o-mini", input="four words of input").input_tokens == 4
    assert client.responses.delete(reply.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(reply.id)
    with pytest.raises(openai.BadRequestError) as cancel:  # a POST without a body, passed through as it is
        client.responses.cancel(reply.id)
    assert "background" in cancel.value.message
    status, headers, _ = http(gateway.url + f"/v1/responses/{reply.id}/cancel")  # a GET where only POST is served
    assert status == 405 and headers["Allow"] == "POST"
    assert http(gateway.url + f"/v1/responses/{reply.id}", key="sk-wrong")[0] == 401
    assert json.loads(http(gateway.url + "/healthz")[2])["requests"]["stored_response"] == 6
    with pytest.raises(openai.BadRequestError) as background:  # its usage would come later, unmetered
        client.responses.create(model="gpt-4o-mini", input="x", background=True)
    assert "background responses are not served" in background.value.message
    publish_decisions(settings.kafka_bootstrap, [Decision(scope="team:marketing", action="shutoff", version=1)])
    assert wait_for(lambda: http(gateway.url + "/v1/responses", {"model": "gpt-4o-mini", "input": "x"})[0] == 402, 5)
    with pytest.raises(openai.APIStatusError) as blocked:
        client.responses.create(model="gpt-4o-mini", input="x")
    assert blocked.value.status_code == 402


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("providers: {openai: {upstreams: []}}", "providers.openai.upstreams"),
        ("max_body_bytes: 10", "max_body_bytes"),
        ("model_routes: {llama: nowhere}", "nowhere"),
        ("colour: blue", "colour"),
        ("keys: [{sha256: abc}]", "keys.0.sha256"),
        ("- not a mapping", "must be a mapping"),
    ],
)
def test_bad_gateway_config_is_named(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_gateway_config(path)


def test_keys_file_problems_are_named(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("- {sha256: " + hash_key("a") + ", tem: typo}\n")
    with pytest.raises(ConfigError, match="entry 0: tem"):
        KeyStore.load(path)
    path.write_text(f"keys:\n  - {{sha256: {hash_key('a')}}}\n  - {{sha256: {hash_key('a')}}}\n")
    with pytest.raises(ConfigError, match="listed twice"):
        KeyStore.load(path)
    path.write_text(f"keys:\n  - {{sha256: {hash_key('a')}, team: t}}\n")
    store = KeyStore.load(path)
    assert store.lookup("a").team == "t" and store.lookup("b") is None


def test_a_request_without_org_or_division_is_attributed_as_the_policy_places_its_team() -> None:
    """A key minted with --team only: the ledger row names the org and division the processor counts it under."""
    from spendstream.core.policy import parse_policy
    from spendstream.gateway.app import fill_from_policy

    policy = parse_policy("org: acme\ndivisions: {growth: [marketing]}\n")
    attribution = {"team": "marketing"}
    assert fill_from_policy(attribution, policy) is None
    assert attribution == {"team": "marketing", "division": "growth", "org": "acme"}
    same = {"team": "marketing", "org": "acme", "division": "growth"}
    assert fill_from_policy(same, policy) is None and same["division"] == "growth"
    lone = {"team": "sales"}
    assert fill_from_policy(lone, policy) is None and lone == {"team": "sales", "org": "acme"}
    # naming another division or org would step out of its hard caps and charge another department: refused
    moved = fill_from_policy({"team": "marketing", "division": "technology"}, policy)
    assert moved == "team 'marketing' is in division 'growth' by the policy; a request cannot name 'technology'"
    assert "the policy's org is 'acme'" in (fill_from_policy({"team": "sales", "org": "shadow"}, policy) or "")


def test_a_request_cannot_name_a_project_the_policy_gives_another_team() -> None:
    """A project counts toward the team the policy puts it under: an attacker session's marketing key, allowed
    header attribution, named engineering's project and shut off its budget."""
    from spendstream.core.policy import parse_policy
    from spendstream.gateway.app import fill_from_policy

    policy = parse_policy("projects: {eng-platform: engineering, mkt-site: marketing}\n")
    refused = fill_from_policy({"team": "marketing", "project": "eng-platform"}, policy)
    assert refused == (
        "project 'eng-platform' belongs to team 'engineering' by the policy; a call of team 'marketing' cannot name it"
    )
    assert fill_from_policy({"team": "marketing", "project": "mkt-site"}, policy) is None
    assert fill_from_policy({"team": "engineering", "project": "eng-platform"}, policy) is None
    assert fill_from_policy({"team": "marketing", "project": "unlisted"}, policy) is None


def test_a_keys_file_with_a_bad_entry_still_revokes_the_keys_it_no_longer_lists(tmp_path: Path) -> None:
    """An edit that deletes one key and adds a broken entry cannot be loaded; the keys loaded before stay in force,
    but not the deleted one (it kept working until the file was fixed)."""
    from spendstream.gateway.keys import KeysFile

    path = tmp_path / "keys.yaml"
    inline = VirtualKey(sha256=hash_key("inline"), team="ops")
    path.write_text(f"- {{sha256: {hash_key('kept')}, team: a}}\n- {{sha256: {hash_key('gone')}, team: b}}\n")
    keys_file = KeysFile(path, [inline])
    before = keys_file.load()
    path.write_text(f"- {{sha256: {hash_key('kept')}, team: a}}\n- {{sha256: {hash_key('new')}, user: '*'}}\n")
    with pytest.raises(ConfigError, match="names every user"):
        keys_file.load()
    after = keys_file.still_listed(before)
    assert after.lookup("kept") is not None and after.lookup("inline") is not None
    assert after.lookup("gone") is None and after.lookup("new") is None
    # an attacker session: a Latin-1 byte (a comment saved in another encoding) stopped the gateway's watch of the
    # file for good, so revoked keys kept working; it is a ConfigError like any other broken file
    path.write_bytes(b"# r\xe9vis\xe9\n" + f"- {{sha256: {hash_key('kept')}, team: a}}\n".encode())
    with pytest.raises(ConfigError, match="not UTF-8"):
        keys_file.load()
    latin = keys_file.still_listed(before)
    assert latin.lookup("kept") is not None and latin.lookup("gone") is None


@pytest.mark.parametrize(("key", "first"), [(HEADER_KEY, "alice"), (KEY, "u1")])
def test_a_spendstream_header_given_twice_is_refused(gateway: GatewayThread, key: str, first: str) -> None:
    """An attacker session: two X-Spendstream-User headers were accepted (the first won); they name no one user.
    A key that takes no headers refuses them too, even when the first repeats the key's own user."""
    from http.client import HTTPConnection
    from urllib.parse import urlsplit

    address = urlsplit(gateway.url)
    connection = HTTPConnection(address.hostname, address.port, timeout=10)
    try:
        connection.putrequest("POST", "/v1/chat/completions")
        for name, value in (("Authorization", f"Bearer {key}"), ("Content-Type", "application/json"),
                            ("X-Spendstream-User", first), ("X-Spendstream-User", "bob")):  # fmt: skip
            connection.putheader(name, value)
        body = json.dumps(CHAT).encode()
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        assert response.status == 400 and b"x-spendstream-user is given more than once" in response.read()
    finally:
        connection.close()
    assert (
        http(gateway.url + "/v1/chat/completions", CHAT, key=HEADER_KEY, headers={"X-Spendstream-User": "a"})[0] == 200
    )


def test_a_name_answered_as_a_shut_off_model_is_held_to_that_models_decisions(
    gateway: GatewayThread, broker: EmbeddedBroker, upstreams
) -> None:
    """An attacker session: with ``model:gpt-4o`` shut off, a deployment name (Azure's ``prod-deployment``) that the
    upstream answers as ``gpt-4o-2024-08-06`` was served without end: the processor counted its spend under
    ``model:gpt-4o``, but the gateway checked the name asked for. Once an answer says which model a name is, that
    model's decisions hold for the name."""
    primary = upstreams[0]
    publish_decisions(
        broker.bootstrap, [Decision(scope="model:gpt-4o", action="shutoff", version=1, reason="model budget spent")]
    )
    alias = {**CHAT, "model": "prod-deployment"}
    url = gateway.url + "/v1/chat/completions"
    assert wait_for(lambda: http(url, CHAT)[0] == 402, 10)
    primary.answers_as = "gpt-4o-2024-08-06"
    try:
        assert http(url, alias)[0] == 200  # nothing says yet what it is
        assert primary.last_body["model"] == "prod-deployment"
        assert wait_for(lambda: http(url, alias)[0] == 402, 5)  # metered within 10 ms: then known
        status, headers, _ = http(url, alias)
        assert (status, headers["X-Spendstream-Scope"]) == (402, "model:gpt-4o")
        assert http(url, {**alias, "model": "PROD-Deployment"})[0] == 402  # its spellings share what was learned
        # a model with a price of its own is not taken for another on one answer (a router's fallback answered
        # gpt-4o-mini as gpt-4o once, and every team's gpt-4o-mini was refused after; an attacker session)
        mini = {**CHAT, "model": "gpt-4o-mini"}
        assert http(url, mini)[0] == 200
        gateway.gateway.flush_metering()  # its answer is metered: what it was answered as is known
        assert http(url, mini)[0] == 200
        primary.answers_as = None  # the name now answers as itself: it is its own model again
        publish_decisions(broker.bootstrap, [Decision(scope="model:gpt-4o", action="allow", version=2)])
        assert wait_for(lambda: http(url, alias)[0] == 200, 10)
    finally:
        primary.answers_as = None


def test_the_first_call_of_a_name_without_a_price_is_the_only_one_in_flight(
    gateway: GatewayThread, broker: EmbeddedBroker, upstreams
) -> None:
    """An attacker session: 30 concurrent first calls of a deployment name all passed a spent ``model:gpt-4o`` cap
    (it was not known yet which model the name is). Until its first answer says so, the others wait (429)."""
    from concurrent.futures import ThreadPoolExecutor

    primary = upstreams[0]
    publish_decisions(
        broker.bootstrap, [Decision(scope="model:gpt-4o", action="shutoff", version=1, reason="model budget spent")]
    )
    url = gateway.url + "/v1/chat/completions"
    assert wait_for(lambda: http(url, CHAT)[0] == 402, 10)
    fresh = {**CHAT, "model": "azure-eu-deployment"}
    primary.answers_as, primary.hang_s = "gpt-4o-2024-08-06", 1.0
    try:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: http(url, fresh), range(6)))
    finally:
        primary.answers_as, primary.hang_s = None, 0.0
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200, 429, 429, 429, 429, 429], statuses
    waited = next(headers for status, headers, _ in answers if status == 429)
    assert waited["Retry-After"] == "1" and waited["X-Spendstream-Scope"] == "model:azure-eu-deployment"
    gateway.gateway.flush_metering()
    assert http(url, fresh)[0] == 402  # answered as gpt-4o: its shutoff holds
    # a name answered as itself is free from then on, and a listed model never waits
    plain = {**CHAT, "model": "my-local-model"}
    assert http(url, plain)[0] == 200
    gateway.gateway.flush_metering()
    assert [http(url, plain)[0] for _ in range(3)] == [200, 200, 200]

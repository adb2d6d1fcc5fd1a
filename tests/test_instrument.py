"""spendstream.instrument on real openai/anthropic clients: verdicts before calls, one usage event after each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spendstream.core.config import Settings
from spendstream.core.events import Decision
from spendstream.edge.emitter import Emitter
from spendstream.edge.enforcer import Enforcer
from spendstream.edge.instrument import SpendBlocked, instrument
from stub_upstream import StubUpstream, publish_decisions, wait_for
from test_gateway import read_usage

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

MESSAGES = [{"role": "user", "content": "three word prompt"}]


@pytest.fixture
def edge(settings: Settings, tmp_path: Path) -> Iterator[tuple[Enforcer, Emitter]]:
    enforcer = Enforcer(settings=settings).start()
    assert enforcer.wait_ready(10)
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    yield enforcer, emitter
    emitter.close(10)
    enforcer.stop()


@pytest.fixture
def stub() -> Iterator[StubUpstream]:
    with StubUpstream() as running:
        yield running


def test_openai_and_anthropic_calls_are_metered(edge, stub: StubUpstream, settings: Settings) -> None:
    enforcer, emitter = edge
    client = instrument(
        openai.OpenAI(api_key="k", base_url=stub.url + "/v1", max_retries=0),
        team="marketing",
        feature="ai_chatbot",
        enforcer=enforcer,
        emitter=emitter,
    )
    reply = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert reply.usage.completion_tokens == 4
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2, stream=True))
    assert all(chunk.choices for chunk in chunks)  # the usage chunk it asked for itself is not handed on
    assert stub.last_body["stream_options"] == {"include_usage": True}
    client.embeddings.create(model="text-embedding-3-small", input="a b")

    claude = instrument(
        anthropic.Anthropic(api_key="k", base_url=stub.url, max_retries=0),
        team="support",
        enforcer=enforcer,
        emitter=emitter,
    )
    claude.messages.create(model="claude-3-5-sonnet-latest", max_tokens=3, messages=MESSAGES)
    with claude.messages.create(model="claude-3-5-sonnet-latest", max_tokens=6, messages=MESSAGES, stream=True) as s:
        assert [event.type for event in s][-1] == "message_stop"

    async def async_calls() -> None:
        aclient = instrument(
            openai.AsyncOpenAI(api_key="k", base_url=stub.url + "/v1", max_retries=0),
            team="sales",
            enforcer=enforcer,
            emitter=emitter,
        )
        await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=9)
        stream = await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        assert len([chunk async for chunk in stream]) == 9  # 8 words and the stop chunk
        aclaude = instrument(
            anthropic.AsyncAnthropic(api_key="k", base_url=stub.url, max_retries=0),
            team="sales",
            enforcer=enforcer,
            emitter=emitter,
        )
        stream = await aclaude.messages.create(model="claude-3-haiku", max_tokens=2, messages=MESSAGES, stream=True)
        async for _ in stream:
            pass

    asyncio.run(async_calls())
    assert emitter.flush(10) == 0
    events = read_usage(settings.kafka_bootstrap, 8)
    assert len(events) == 8 and all(e["status"] == "ok" and e["cost_nanos"] > 0 for e in events)
    shapes = sorted(
        (e["team"], e["provider"], e["tags"]["endpoint"], e["input_tokens"], e["output_tokens"]) for e in events
    )
    assert shapes == [
        ("marketing", "openai", "chat.completions", 3, 2),
        ("marketing", "openai", "chat.completions", 3, 4),
        ("marketing", "openai", "embeddings", 2, 0),
        ("sales", "anthropic", "messages", 3, 2),
        ("sales", "openai", "chat.completions", 3, 8),
        ("sales", "openai", "chat.completions", 3, 9),
        ("support", "anthropic", "messages", 3, 3),
        ("support", "anthropic", "messages", 3, 6),
    ]
    assert sum(1 for e in events if e["feature"] == "ai_chatbot") == 3


def test_decisions_change_the_instrumented_client_within_a_second(edge, stub: StubUpstream, settings: Settings) -> None:
    enforcer, emitter = edge
    client = instrument(
        openai.OpenAI(api_key="k", base_url=stub.url + "/v1", max_retries=0),
        team="marketing",
        user="u7",
        enforcer=enforcer,
        emitter=emitter,
    )

    def outcome() -> int:
        try:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        except SpendBlocked as blocked:
            return blocked.status_code
        return 200

    def after(decision: Decision, expected: int) -> None:
        publish_decisions(settings.kafka_bootstrap, [decision])
        published = time.monotonic()
        assert wait_for(lambda: outcome() == expected, 1.0), decision
        assert time.monotonic() - published < 1.0

    after(Decision(scope="team:marketing", action="fallback", version=1, fallback_models={"gpt-4o": "o-mini"}), 200)
    assert wait_for(lambda: outcome() == 200 and stub.last_body["model"] == "o-mini", 1.0)
    after(Decision(scope="user:u7", action="throttle", throttle_rps=0.0, version=1), 429)
    after(Decision(scope="team:marketing", action="shutoff", version=2, reason="budget spent"), 402)
    with pytest.raises(SpendBlocked, match="team:marketing: budget spent"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    publish_decisions(settings.kafka_bootstrap, [Decision(scope="user:u7", action="allow", version=2)])
    after(Decision(scope="team:marketing", action="allow", version=3, allowed_models=["gpt-4o-mini"]), 403)
    after(Decision(scope="team:marketing", action="allow", version=4), 200)
    assert emitter.flush(10) == 0
    events = read_usage(settings.kafka_bootstrap, 1, timeout=5)
    assert {"fallback", "throttle", "shutoff", "deny_model", "allow"} <= {e["decision_applied"] for e in events}
    assert all(e["cost_nanos"] == 0 for e in events if e["status"] == "blocked")


def test_failed_calls_emit_an_error_event(edge, stub: StubUpstream, settings: Settings) -> None:
    enforcer, emitter = edge
    client = instrument(
        openai.OpenAI(api_key="k", base_url=stub.url + "/v1", max_retries=0),
        team="t",
        enforcer=enforcer,
        emitter=emitter,
    )
    stub.fail_status = 500
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert emitter.flush(10) == 0
    (event,) = read_usage(settings.kafka_bootstrap, 1, timeout=5)
    assert (event["status"], event["cost_nanos"], event["team"]) == ("error", 0, "t")


def test_only_known_clients_are_accepted(edge) -> None:
    enforcer, emitter = edge
    with pytest.raises(TypeError, match="openai and anthropic"):
        instrument(object(), enforcer=enforcer, emitter=emitter)

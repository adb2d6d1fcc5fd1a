"""Edges enforce the policy in force from the first request: allowed-model globs, request quotas counted at the
edge, and bounded usage events. Real broker, the ``spendstream`` CLI (policy apply, gateway) and HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from spendstream.core.codec import AvroCodec
from spendstream.core.events import Decision, UsageEvent
from spendstream.core.topics import USAGE
from spendstream.edge.emitter import Emitter
from spendstream.edge.enforcer import Enforcer
from spendstream.gateway.keys import hash_key
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from stub_upstream import StubUpstream, publish_decisions, wait_for

KEY = "sk-ss-test-edge-policy"
QUOTA = 20
# Not named "default": the newest valid record on spendstream.policy is in force, whatever its name.
POLICY = f"""
name: acme-prod
org: acme
quotas:
  - {{scope: "user:*", requests_per_day: {QUOTA}}}
allowed_models:
  "environment:development": [llama-3.2-1b, "local/*"]
features:
  ai_chatbot: {{critical: true, throttle_rps: 2.0, teams: [support]}}
"""


def post(
    url: str, body: dict[str, Any], headers: dict[str, str], key: str = KEY
) -> tuple[int, dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", f"Bearer {key}")
    for name, value in headers.items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.load(exc)


def test_a_team_cannot_name_a_feature_the_policy_gives_another_team(gateway_url: str) -> None:
    """A review found: marketing, shut off, named support's critical ``ai_chatbot`` on its key (header
    attribution) and was throttled at 2 requests/s instead of stopped, spending support's feature budget."""
    url = gateway_url + "/v1/chat/completions"
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    named = {"X-Spendstream-Team": "marketing", "X-Spendstream-Feature": "ai_chatbot"}
    status, _, body = post(url, chat, named)
    assert status == 403, body
    assert body["error"]["message"] == (
        "feature 'ai_chatbot' belongs to team support by the policy; a call of team 'marketing' cannot name it"
    )
    assert post(url, chat, {**named, "X-Spendstream-Team": "support"})[0] == 200
    assert post(url, chat, {"X-Spendstream-Team": "marketing", "X-Spendstream-Feature": "campaigns"})[0] == 200


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendstream.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def gateway_url(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[str]:
    """``spendstream policy apply`` of POLICY, then ``spendstream gateway`` (no SPENDSTREAM_POLICY, no processor)."""
    env = {
        **os.environ,
        "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap,
        "SPENDSTREAM_DATA_DIR": str(tmp_path / "data"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("SPENDSTREAM_POLICY", None)
    env.pop("SPENDSTREAM_GATEWAY_CONFIG", None)
    policy = tmp_path / "acme.yaml"
    policy.write_text(POLICY)
    applied = cli(env, "policy", "apply", "--wait", "0", str(policy))
    assert applied.returncode == 0, applied.stderr
    with StubUpstream() as upstream:
        config = tmp_path / "gateway.json"
        config.write_text(
            json.dumps(
                {
                    "keys": [{"sha256": hash_key(KEY), "name": "t", "org": "acme", "allow_header_attribution": True}],
                    "providers": {
                        "openai": {"kind": "openai", "upstreams": [{"base_url": upstream.url}]},
                        "anthropic": {"kind": "anthropic", "upstreams": [{"base_url": upstream.url}]},
                    },
                }
            )
        )
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "spendstream.cli", "gateway", "--config", str(config), "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:

            def enforcer_ready() -> bool:
                try:
                    with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                        return bool(json.load(response)["enforcer_ready"])
                except OSError:
                    return False

            if not wait_for(lambda: proc.poll() is not None or enforcer_ready(), 60, 0.1) or proc.poll() is not None:
                proc.terminate()
                pytest.fail(f"gateway never reported enforcer_ready:\n{proc.communicate(timeout=30)[1][-3000:]}")
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


def test_first_disallowed_call_is_refused_and_globs_are_honoured(gateway_url: str) -> None:
    dev = {"X-Spendstream-Environment": "development", "X-Spendstream-User": "dev1"}
    # No processor runs: the list comes from the policy itself, so the very first call is refused.
    status, headers, body = post(
        f"{gateway_url}/v1/embeddings", {"model": "text-embedding-3-small", "input": "hello"}, dev
    )
    assert status == 403, body
    assert body["error"]["code"] == "model_not_allowed"
    assert headers["X-Spendstream-Scope"] == "environment:development"
    assert "local/*" in body["error"]["message"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert post(f"{gateway_url}/v1/chat/completions", {"model": "local/qwen", **chat}, dev)[0] == 200
    assert post(f"{gateway_url}/v1/chat/completions", {"model": "gpt-4o", **chat}, dev)[0] == 403
    assert (
        post(f"{gateway_url}/v1/chat/completions", {"model": "gpt-4o", **chat}, {"X-Spendstream-User": "p1"})[0] == 200
    )


def test_request_quota_holds_under_concurrency_before_any_decision(gateway_url: str) -> None:
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    burst = {"X-Spendstream-User": "burst"}
    with ThreadPoolExecutor(max_workers=2 * QUOTA) as pool:
        statuses = sorted(pool.map(lambda _: post(f"{gateway_url}/v1/chat/completions", chat, burst)[0], range(60)))
    assert statuses == [200] * QUOTA + [402] * (60 - QUOTA)
    status, headers, body = post(f"{gateway_url}/v1/chat/completions", chat, burst)
    assert (status, headers["X-Spendstream-Scope"]) == (402, "user:burst")
    assert "requests quota used up" in body["error"]["message"]
    assert int(headers["Retry-After"]) > 0
    assert post(f"{gateway_url}/v1/chat/completions", chat, {"X-Spendstream-User": "other"})[0] == 200


def test_processor_lists_with_globs_are_honoured_by_the_enforcer(broker: EmbeddedBroker) -> None:
    publish_decisions(
        broker.bootstrap,
        [
            Decision(
                scope="environment:development",
                action="alert",
                version=1,
                allowed_models=["llama-3.2-1b", "llama-3.2-3b", "local/*"],
            )
        ],
    )
    with Enforcer(broker.bootstrap) as enforcer:
        assert enforcer.wait_ready(10)
        assert enforcer.check(environment="development", model="local/qwen").action == "alert"
        refused = enforcer.check(environment="development", model="gpt-4o")
        assert (refused.action, refused.scope) == ("deny_model", "environment:development")


def test_enforcer_follows_the_newest_valid_policy(broker: EmbeddedBroker, tmp_path: Path) -> None:
    env = {**os.environ, "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap}
    env.pop("SPENDSTREAM_POLICY", None)
    with Enforcer(broker.bootstrap) as enforcer:
        assert enforcer.wait_ready(10)
        assert enforcer.check(environment="development", model="gpt-4o").action == "allow"
        first = tmp_path / "first.yaml"
        first.write_text("name: first\nallowed_models:\n  'environment:development': ['local/*']\n")
        assert cli(env, "policy", "apply", "--wait", "0", str(first)).returncode == 0
        assert wait_for(lambda: enforcer.check(environment="development", model="gpt-4o").action == "deny_model", 10)
        second = tmp_path / "second.yaml"
        second.write_text("name: second\nallowed_models:\n  'environment:development': ['gpt-*']\n")
        assert cli(env, "policy", "apply", "--wait", "0", str(second)).returncode == 0
        assert wait_for(lambda: enforcer.check(environment="development", model="gpt-4o").action == "allow", 10)
        assert enforcer.check(environment="development", model="local/qwen").action == "deny_model"


def test_emitter_refuses_out_of_bounds_events_without_raising(broker: EmbeddedBroker, tmp_path: Path) -> None:
    good = UsageEvent(provider="openai", model_requested="gpt-4o", input_tokens=10, cost_nanos=5)
    # model_copy and model_construct skip validation: the Emitter is the last line before the topic.
    poison = [
        good.model_copy(update={"event_id": uuid.uuid4(), "input_tokens": 10**16}),
        good.model_copy(update={"event_id": uuid.uuid4(), "cost_nanos": 10**17}),
        good.model_copy(update={"event_id": uuid.uuid4(), "output_tokens": "10"}),
    ]
    with Emitter(broker.bootstrap, spool_dir=tmp_path / "spool") as emitter:
        for event in [*poison, good]:
            emitter.emit(event)  # never raises
        assert emitter.flush(10) == 0
        stats = emitter.stats
    assert (stats.failed, stats.sent) == (3, 1)
    codec = AvroCodec("usage_event")
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": uuid.uuid4().hex})
    partitions = consumer.list_topics(USAGE, timeout=10).topics[USAGE].partitions
    consumer.assign([TopicPartition(USAGE, p, OFFSET_BEGINNING) for p in partitions])
    seen: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not seen:
        seen += [str(codec.decode(m.value())["event_id"]) for m in consumer.consume(10, 0.2) if m.error() is None]
    consumer.close()
    assert seen == [str(good.event_id)]


@pytest.mark.slow
def test_fresh_dev_stack_refuses_the_first_disallowed_call(tmp_path: Path) -> None:
    """``spendstream dev`` with the reference policy: development may call only llama-3.2-* and local/*."""
    gateway_port = free_port()
    env = {
        **os.environ,
        "SPENDSTREAM_DATA_DIR": str(tmp_path / "data"),
        "SPENDSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "SPENDSTREAM_GATEWAY_PORT": str(gateway_port),
        "SPENDSTREAM_API_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("SPENDSTREAM_GATEWAY_CONFIG", "SPENDSTREAM_POLICY"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "dev", "--stub-upstream"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        key = ""
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline and "ready; Ctrl-C stops everything" not in "".join(seen[-1:]):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            if "dev key" in line:
                key = line.split()[3]
        assert key and "ready" in seen[-1], "".join(seen[-40:])
        url = f"http://127.0.0.1:{gateway_port}/v1/embeddings"
        dev = {"X-Spendstream-Environment": "development", "X-Spendstream-Team": "engineering"}
        for _ in range(4):  # the first call already, and every one after it
            status, _, body = post(url, {"model": "text-embedding-3-small", "input": "hello"}, dev, key)
            assert (status, body["error"]["code"]) == (403, "model_not_allowed"), body
        status, _, body = post(url, {"model": "local/nomic-embed-text", "input": "hello"}, dev, key)
        assert status == 200, body
    finally:
        proc.send_signal(signal.SIGINT)  # dev stops its services in order
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_gateway_routes_by_the_policy_applied_after_its_start(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A gateway started with the reference policy routes a simple gpt-4o question to a cheaper model; once
    `spendstream policy apply` puts a policy without a `routing:` section in force, it serves the model asked for."""
    kinds = ("openai", "anthropic")
    reference = Path(__file__).resolve().parents[1] / "infra" / "policy" / "default.yaml"
    text = reference.read_text()
    unrouted = tmp_path / "unrouted.yaml"
    unrouted.write_text(text[: text.index("\nrouting:")].replace("name: default", "name: unrouted"))
    env = {**os.environ, "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap, "SPENDSTREAM_POLICY": str(reference)}
    env.pop("SPENDSTREAM_GATEWAY_CONFIG", None)
    assert cli(env, "policy", "apply", "--wait", "0", str(reference)).returncode == 0
    with StubUpstream() as upstream:
        config = tmp_path / "gateway.json"
        providers = {kind: {"kind": kind, "upstreams": [{"base_url": upstream.url}]} for kind in kinds}
        keys = [{"sha256": hash_key(KEY), "name": "t", "org": "acme", "allow_header_attribution": True}]
        config.write_text(json.dumps({"keys": keys, "providers": providers}))
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "spendstream.cli", "gateway", "--config", str(config), "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        question = {"model": "gpt-4o", "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 3}

        def served_by() -> str | None:
            headers = {"X-Spendstream-Team": "engineering", "X-Spendstream-User": f"router-{uuid.uuid4()}"}
            try:
                status, answer_headers, _ = post(f"http://127.0.0.1:{port}/v1/chat/completions", question, headers)
            except OSError:
                return None
            return answer_headers.get("X-Spendstream-Model", question["model"]) if status == 200 else None

        try:
            assert wait_for(lambda: served_by() == "gpt-4o-mini", 60, 0.2), "the reference policy's routing"
            assert cli(env, "policy", "apply", "--wait", "0", str(unrouted)).returncode == 0
            assert wait_for(lambda: served_by() == "gpt-4o", 20, 0.2), "still routed after the new policy"
        finally:
            proc.terminate()
            proc.wait(30)

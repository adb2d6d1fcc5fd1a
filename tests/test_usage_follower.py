"""The usage follower: routing learns from every gateway's calls through spendstream.usage (real broker)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Producer

import spendstream.gateway.app as gateway_app
from spendstream.core.codec import AvroCodec
from spendstream.core.config import Settings
from spendstream.core.events import UsageEvent, UsageStatus
from spendstream.core.policy import parse_policy
from spendstream.core.topics import USAGE
from spendstream.edge.emitter import Emitter
from spendstream.edge.enforcer import Enforcer
from spendstream.gateway.app import Gateway, GatewayThread
from spendstream.gateway.config import GatewayConfig, ProviderConfig, UpstreamConfig
from spendstream.gateway.usage_follower import SharedProviderStats, UsageFollower, ledger_is_server, month_start
from stub_upstream import StubUpstream, wait_for
from test_gateway import HEADER_KEY, KEYS, http

CODEC = AvroCodec("usage_event")
POLICY = parse_policy(
    """
routing:
  default_environment: production
  min_samples: 5
  max_error_rate: "0.2"
  environments:
    production:
      tiers:
        simple: [openai/gpt-4o-mini]
        medium: [openai/gpt-4o-mini]
        complex: [openai/gpt-4o, backup/gpt-4o]
  providers:
    openai: {priority: 1}
    backup: {priority: 2}
pricing:
  overrides:
    - {provider: backup, model: gpt-4o, input_per_mtok: "5", output_per_mtok: "20"}
"""
)
COMPLEX = {"X-Spendstream-Complexity": "complex"}
SIMPLE = {"model": "gpt-4o", "messages": [{"role": "user", "content": "What is the capital of France?"}]}


def call(provider: str, model: str, status: UsageStatus, at: datetime, latency_ms: int = 100) -> UsageEvent:
    """A usage event as another gateway would publish it."""
    return UsageEvent(
        occurred_at=at, team="platform", provider=provider, model_requested=model, model_served=model,
        input_tokens=10, output_tokens=5, latency_ms=latency_ms, status=status,
        cost_nanos=0 if status is UsageStatus.blocked else 1000,  # a refused call costs nothing
    )  # fmt: skip


def publish(bootstrap: str, events: list[tuple[UsageEvent | bytes, datetime]]) -> None:
    """Publish as a plain producer (no spendstream edge): values with the given record timestamps."""
    producer = Producer({"bootstrap.servers": bootstrap})
    for item, at in events:
        value = item if isinstance(item, bytes) else CODEC.encode(item.to_avro())
        producer.produce(USAGE, key=b"acme/platform", value=value, timestamp=int(at.timestamp() * 1000))
    assert producer.flush(10) == 0, "usage events not delivered"


def test_follower_reads_the_lookback_and_skips_older_and_undecodable_records(settings: Settings) -> None:
    now = datetime.now(UTC)
    old = now - timedelta(minutes=20)
    recent = now - timedelta(minutes=2)
    publish(
        settings.kafka_bootstrap,
        [
            (call("openai", "gpt-4o", UsageStatus.error, old), old),  # before the 10-minute look-back
            (call("openai", "gpt-4o", UsageStatus.ok, recent, 300), recent),
            (call("openai", "gpt-4o", UsageStatus.error, recent, 900), recent),
            (call("openai", "gpt-4o", UsageStatus.blocked, recent), recent),  # never reached a provider
            (b"\xc3\x01 not avro", recent),
        ],
    )
    stats = SharedProviderStats(period_start=month_start(recent, UTC))  # (2 minutes ago may be last month)
    with UsageFollower(settings, stats=stats, lookback_s=600) as follower:
        assert follower.wait_assigned(10)
        assert wait_for(lambda: follower.counts["fed"] == 3, 10)
        live = datetime.now(UTC)
        publish(settings.kafka_bootstrap, [(call("anthropic", "claude-3-5-haiku", UsageStatus.ok, live), live)])
        assert wait_for(lambda: follower.counts["fed"] == 4, 10)
        assert follower.counts["skipped_old"] == 1 and follower.counts["bad_records"] == 1
    snapshot = stats.snapshot(time.time())
    gpt = snapshot.models[("openai", "gpt-4o")]
    assert (gpt.samples, gpt.errors, gpt.p50_ms, gpt.p95_ms) == (2, 1, 300, 900)
    assert snapshot.models[("anthropic", "claude-3-5-haiku")].samples == 1
    assert snapshot.provider_spend_nanos == {"openai": 2000, "anthropic": 1000}  # priced this month (blocked: $0)


def test_only_a_clickhouse_server_is_read_for_warm_up() -> None:
    assert not ledger_is_server("chdb:///var/lib/spendstream/ledger")
    assert ledger_is_server("http://analytics:secret@clickhouse:8123")


@pytest.fixture
def two_providers(
    settings: Settings, tmp_path: Path
) -> Iterator[tuple[Gateway, GatewayThread, dict[str, StubUpstream]]]:
    """A routing gateway whose providers openai and backup (both OpenAI-compatible) have their own stub."""
    with StubUpstream() as primary, StubUpstream() as backup:
        config = GatewayConfig(
            keys=KEYS,
            providers={
                "openai": ProviderConfig(kind="openai", upstreams=[UpstreamConfig(base_url=primary.url)]),
                "backup": ProviderConfig(kind="openai", upstreams=[UpstreamConfig(base_url=backup.url)]),
                "anthropic": ProviderConfig(kind="anthropic", upstreams=[UpstreamConfig(base_url=primary.url)]),
            },
            pricing={"overrides": [o.model_dump(mode="json") for o in POLICY.pricing.overrides]},
        )
        enforcer = Enforcer(settings=settings).start()
        assert enforcer.wait_ready(10)
        emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
        gateway = Gateway(config, settings, enforcer=enforcer, emitter=emitter, routing=POLICY.routing)
        with GatewayThread(gateway) as running:
            assert gateway.follower is not None and gateway.follower.wait_assigned(10)
            yield gateway, running, {"openai": primary, "backup": backup}
        emitter.close(10)
        enforcer.stop()
    assert gateway.follower is not None and gateway.follower._thread is None  # stopped with the gateway


def test_errors_seen_by_another_gateway_steer_routing_away(two_providers, monkeypatch, settings: Settings) -> None:
    monkeypatch.setattr(gateway_app, "STATS_REFRESH_S", 0.1, raising=False)
    _, running, stubs = two_providers
    url = running.url + "/v1/chat/completions"
    assert http(url, SIMPLE, key=HEADER_KEY, headers=COMPLEX)[0] == 200
    assert (stubs["openai"].requests, stubs["backup"].requests) == (1, 0)  # cheaper and preferred

    now = datetime.now(UTC)
    publish(settings.kafka_bootstrap, [(call("openai", "gpt-4o", UsageStatus.error, now), now) for _ in range(30)])

    def routed_to_backup() -> bool:
        assert http(url, SIMPLE, key=HEADER_KEY, headers=COMPLEX)[0] == 200
        return stubs["backup"].requests > 0

    assert wait_for(routed_to_backup, 10, interval=0.2)
    assert stubs["backup"].last_body["model"] == "gpt-4o"


def test_own_calls_are_counted_once(two_providers) -> None:
    gateway, running, stubs = two_providers
    for _ in range(3):
        assert http(running.url + "/v1/chat/completions", SIMPLE, key=HEADER_KEY)[0] == 200
    assert stubs["openai"].last_body["model"] == "gpt-4o-mini"

    def samples() -> int:
        observed = gateway.provider_stats.snapshot(time.time()).models.get(("openai", "gpt-4o-mini"))
        return observed.samples if observed else 0

    assert wait_for(lambda: samples() >= 3, 10)
    follower = gateway.follower
    assert follower is not None
    # Observed as metered; their records come back with this gateway's origin header and are skipped undecoded.
    assert wait_for(lambda: follower.counts["own"] == 3, 10)
    time.sleep(0.5)  # anything counted a second time would have arrived by now
    assert samples() == 3 and follower.counts["fed"] == 0


def test_warm_up_from_the_ledger_then_only_newer_stream_records(ledger, settings: Settings) -> None:
    now = datetime.now(UTC)
    earlier = max(now - timedelta(minutes=3), month_start(now, UTC))  # the follower counts this month's spend
    rows = [
        [uuid.uuid4(), earlier, "openai", "gpt-4o", "gpt-4o", 400, "error", 2_000],
        [uuid.uuid4(), earlier, "openai", "gpt-4o", "gpt-4o", 200, "ok", 3_000],
        [uuid.uuid4(), now - timedelta(days=40), "openai", "gpt-4o", "gpt-4o", 200, "ok", 9_000],  # last month
    ]
    columns = ["event_id", "occurred_at", "provider", "model_requested", "model_served", "latency_ms", "status",
               "cost_nanos"]  # fmt: skip
    ledger.insert("spendstream.usage_ledger", rows, column_names=columns)
    # Already in the ledger, and still on the topic: read from the ledger only.
    publish(settings.kafka_bootstrap, [(call("openai", "gpt-4o", UsageStatus.error, earlier), earlier)])
    with UsageFollower(settings, lookback_s=600, warm_from_ledger=True) as follower:
        assert follower.wait_assigned(10)
        assert follower.counts["ledger_warmups"] == 1
        live = datetime.now(UTC)
        publish(settings.kafka_bootstrap, [(call("openai", "gpt-4o", UsageStatus.ok, live), live)])
        assert wait_for(lambda: follower.counts["fed"] == 1, 10)
        assert follower.counts["skipped_old"] == 1
    gpt = follower.stats.snapshot(time.time()).models[("openai", "gpt-4o")]
    assert (gpt.samples, gpt.errors) == (3, 1)
    assert follower.stats.snapshot(time.time()).provider_spend_nanos == {"openai": 6_000}

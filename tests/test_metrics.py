"""Prometheus metrics move with real traffic: gateway and API /metrics, the sink process's metrics server,
emitter gauges, consumer lag, and the Prometheus/Grafana files that scrape and chart them."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from spendstream.api.app import create_app
from spendstream.api.tokens import add_token
from spendstream.core import metrics
from spendstream.core.config import Settings, load_settings
from spendstream.core.events import Decision, UsageEvent
from spendstream.core.ledger_store import connect, migrate
from spendstream.core.topics import USAGE
from spendstream.edge import metrics as edge_metrics
from spendstream.edge.emitter import Emitter
from spendstream.edge.enforcer import Enforcer
from spendstream.gateway import metrics as gateway_metrics
from spendstream.gateway.app import Gateway, GatewayThread
from spendstream.gateway.config import GatewayConfig, ProviderConfig, UpstreamConfig
from spendstream.gateway.keys import VirtualKey, hash_key
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from spendstream.sink import metrics as sink_metrics
from stub_upstream import StubUpstream, publish_decisions, publish_heartbeat, wait_for

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-ss-metrics-marketing"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "two words"}], "max_tokens": 3}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def local_value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def post(url: str, body: Any, key: str | None = KEY) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def usage(**kw: Any) -> UsageEvent:
    return UsageEvent(
        event_id=uuid.uuid4(), occurred_at=datetime.now(UTC), org="acme", team="web", provider="openai",
        model_requested="gpt-4o-mini", input_tokens=10, output_tokens=5, cost_nanos=4_500, **kw,
    )  # fmt: skip


# -- gateway ---------------------------------------------------------------------------------------


@pytest.fixture
def gateway(settings: Settings, tmp_path: Path) -> Iterator[tuple[GatewayThread, str, Emitter]]:
    """A gateway whose first OpenAI upstream is down: every allowed request fails over to the stub."""
    dead = f"http://127.0.0.1:{free_port()}"
    enforcer = Enforcer(settings=settings).start()
    assert enforcer.wait_ready(10)
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
    with StubUpstream() as stub:
        upstreams = [UpstreamConfig(base_url=dead, connect_timeout_s=1), UpstreamConfig(base_url=stub.url)]
        config = GatewayConfig(
            keys=[VirtualKey(sha256=hash_key(KEY), name="mkt", org="acme", team="marketing")],
            providers={
                "openai": ProviderConfig(kind="openai", upstreams=upstreams),
                "anthropic": ProviderConfig(kind="anthropic", upstreams=[UpstreamConfig(base_url=stub.url)]),
            },
        )
        with GatewayThread(Gateway(config, settings, enforcer=enforcer, emitter=emitter)) as running:
            yield running, dead, emitter
    emitter.close(10)
    enforcer.stop()


def test_gateway_metrics_count_requests_decisions_latency_and_failovers(gateway, broker: EmbeddedBroker) -> None:
    running, dead, emitter = gateway
    chat = running.url + "/v1/chat/completions"
    before = scrape(running.url + "/metrics")
    statuses = [post(chat, CHAT) for _ in range(3)]
    statuses.append(post(chat, CHAT, key="sk-wrong"))
    publish_heartbeat(broker.bootstrap)  # a processor is alive (read before the decision): staleness is finite
    publish_decisions(broker.bootstrap, [Decision(scope="team:marketing", action="shutoff", version=1)])

    def blocked() -> bool:
        statuses.append(post(chat, CHAT))
        return statuses[-1] == 402

    assert wait_for(blocked, 5, interval=0.05)
    running.gateway.flush_metering()
    assert emitter.flush(10) == 0
    after = scrape(running.url + "/metrics")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok, unauthorized, shutoff = statuses.count(200), statuses.count(401), statuses.count(402)
    assert ok >= 3 and unauthorized == 1 and shutoff == 1 and ok + unauthorized + shutoff == len(statuses)
    latency = "spendstream_http_request_duration_seconds_count"
    endpoint = {"service": "gateway", "endpoint": "/v1/chat/completions"}
    assert delta(latency, **endpoint, status_class="2xx") == ok
    assert delta(latency, **endpoint, status_class="4xx") == unauthorized + shutoff
    assert delta("spendstream_http_request_duration_seconds_sum", **endpoint, status_class="2xx") > 0
    assert not any(dict(labels).get("endpoint") == "/metrics" for _, labels in after)
    assert delta("spendstream_gateway_decisions_total", action="allow") == ok
    assert delta("spendstream_gateway_decisions_total", action="shutoff") == shutoff
    assert delta("spendstream_gateway_requests_total", outcome="ok") == ok
    assert delta("spendstream_gateway_requests_total", outcome="unauthorized") == unauthorized
    assert delta("spendstream_gateway_requests_total", outcome="shutoff") == shutoff
    assert delta("spendstream_gateway_upstream_failures_total", upstream=dead) == ok
    assert delta("spendstream_gateway_upstream_failovers_total") == ok
    # every served or blocked request became one usage event, and the broker acked each
    assert delta("spendstream_emitter_emitted_total") == ok + shutoff
    assert delta("spendstream_emitter_sent_total") == ok + shutoff
    assert math.isfinite(value(after, "spendstream_enforcer_staleness_seconds"))


# -- API ---------------------------------------------------------------------------------------------


def test_api_metrics_count_accepted_and_rejected_ingest(settings: Settings) -> None:
    client = connect(settings)
    migrate(client, settings)

    def event() -> dict[str, Any]:
        return json.loads(usage().model_dump_json())

    async def exercise() -> tuple[Samples, Samples, list[int]]:
        auth = {"Authorization": f"Bearer {add_token(settings.api_tokens_path, 'admin', 'metrics-test')}"}
        async with TestClient(TestServer(create_app(settings, client)), headers=auth) as http:
            before = parse(await (await http.get("/metrics")).text())
            statuses = []
            for body in ([event(), event()], {"events": [event(), event(), event()]}, [{"event_id": ""}]):
                statuses.append((await http.post("/v1/usage", json=body)).status)
            as_json = {"Content-Type": "application/json"}
            statuses.append((await http.post("/v1/usage", data=b"{not json", headers=as_json)).status)
            statuses.append((await http.get("/v1/reports/nope")).status)
            after = parse(await (await http.get("/metrics")).text())
            return before, after, statuses

    try:
        before, after, statuses = asyncio.run(exercise())
    finally:
        client.close()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert statuses == [202, 202, 400, 400, 404]
    assert delta("spendstream_api_ingest_requests_total", outcome="accepted") == 2
    assert delta("spendstream_api_ingest_requests_total", outcome="invalid") == 2
    assert delta("spendstream_api_ingest_events_total", outcome="accepted") == 5
    latency = "spendstream_http_request_duration_seconds_count"
    assert delta(latency, service="api", endpoint="/v1/usage", status_class="2xx") == 2
    assert delta(latency, service="api", endpoint="/v1/usage", status_class="4xx") == 2
    assert delta(latency, service="api", endpoint="/v1/reports/{kind}", status_class="4xx") == 1


# -- emitter -----------------------------------------------------------------------------------------


def test_emitter_gauges_follow_its_stats_and_counters_survive_close(settings: Settings, tmp_path: Path) -> None:
    sent = local_value("spendstream_emitter_sent_total")
    with Emitter(settings=settings, spool_dir=tmp_path / "live") as live:
        for _ in range(100):
            live.emit(usage())
        assert live.flush(10) == 0
        assert local_value("spendstream_emitter_sent_total") - sent == 100

    spooled, emitted = (
        local_value("spendstream_emitter_spooled_total"),
        local_value("spendstream_emitter_emitted_total"),
    )
    offline = Emitter(f"127.0.0.1:{free_port()}", settings=settings, spool_dir=tmp_path / "offline")
    try:
        for _ in range(40):
            offline.emit(usage())
        assert wait_for(lambda: local_value("spendstream_emitter_spool_events") == 40, 10)
        assert local_value("spendstream_emitter_spool_bytes") == offline.stats.spool_bytes > 0
        assert local_value("spendstream_emitter_spooled_total") - spooled == 40
        assert local_value("spendstream_emitter_queued_events") == 0
    finally:
        offline.close(timeout=0.5)
    # a closed Emitter's totals stay counted; its spool is no longer this process's backlog
    assert local_value("spendstream_emitter_emitted_total") - emitted == 40
    assert local_value("spendstream_emitter_spool_events") == 0


# -- consumer lag --------------------------------------------------------------------------------------


def test_consumer_lag_is_high_watermark_minus_committed_offset(settings: Settings, tmp_path: Path) -> None:
    group = f"lag-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for i in range(30):
        producer.produce(USAGE, b"x", partition=i % 3)
        assert producer.flush(10) == 0  # one record per batch: the embedded broker's watermark counts batches
    sampler = metrics.ConsumerLagSampler(settings, group, USAGE)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    try:
        assert sampler.sample(consumer) == {0: 10, 1: 10, 2: 10, 3: 0, 4: 0, 5: 0}
        consumer.commit(offsets=[TopicPartition(USAGE, 0, 4), TopicPartition(USAGE, 1, 10)], asynchronous=False)
        assert sampler.sample(consumer) == {0: 6, 1: 0, 2: 10, 3: 0, 4: 0, 5: 0}
    finally:
        consumer.close()
    assert local_value("spendstream_consumer_lag", group=group, topic=USAGE, partition="0") == 6
    assert local_value("spendstream_consumer_lag_sampled_timestamp_seconds", group=group, topic=USAGE) > 0


# -- the sink process ----------------------------------------------------------------------------------


def test_sink_process_serves_inserted_dead_lettered_audit_and_lag(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "SPENDSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SPENDSTREAM_DATA_DIR": str(tmp_path / "sink"),
        "SPENDSTREAM_METRICS_PORT": str(port),
        "SPENDSTREAM_METRICS_LAG_INTERVAL_S": "0.2",
        "SPENDSTREAM_SINK_BATCH_MS": "100",
    }
    env.pop("SPENDSTREAM_CLICKHOUSE_DSN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "sink"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    n = 300
    try:
        with Emitter(settings=settings, spool_dir=tmp_path / "spool") as emitter:
            for _ in range(n):
                emitter.emit(usage())
            assert emitter.flush(10) == 0
        bad = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        bad.produce(USAGE, b"not avro", b"acme/web")
        assert bad.flush(10) == 0
        publish_decisions(settings.kafka_bootstrap, [Decision(scope="team:web", action="alert", version=1)])
        samples: Samples = {}

        def caught_up() -> bool:
            nonlocal samples
            try:
                samples = scrape(url)
            except OSError:
                return proc.poll() is not None
            lags = [v for (name, _), v in samples.items() if name == "spendstream_consumer_lag"]
            return (
                value(samples, "spendstream_sink_inserted_total") == n
                and value(samples, "spendstream_audit_sink_records_total", kind="decision") == 1
                and len(lags) == 6
                and sum(lags) == 0
            )

        assert wait_for(caught_up, 30, interval=0.2), samples
        assert value(samples, "spendstream_sink_consumed_total") == n + 1
        assert value(samples, "spendstream_sink_dead_lettered_total", reason="undecodable") == 1
        assert value(samples, "spendstream_sink_commits_total") >= 1
        group = {"group": "spendstream-sink", "topic": USAGE}
        assert value(samples, "spendstream_consumer_lag_sampled_timestamp_seconds", **group) > time.time() - 5
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read() if proc.stdout else ""
    assert f"metrics on http://127.0.0.1:{port}/metrics" in output and "Traceback" not in output


# -- Prometheus and Grafana provisioning -----------------------------------------------------------------

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PROMETHEUS = yaml.safe_load((ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
GRAFANA = ROOT / "infra" / "grafana"


def _environment(service: str) -> dict[str, Any]:
    return {**COMPOSE["x-spendstream"]["environment"], **COMPOSE["services"][service].get("environment", {})}


def test_prometheus_scrapes_every_service_where_it_serves_metrics() -> None:
    targets: dict[str, str] = {}
    for job in PROMETHEUS["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets.update({t.split(":")[0]: t.split(":")[1] for t in static["targets"]})
        for dns in job.get("dns_sd_configs", []):
            targets.update({name: str(dns["port"]) for name in dns["names"]})
    assert set(targets) >= {"processor", "sink", "gateway", "api"}
    defaults = Settings()
    assert targets["gateway"] == str(defaults.gateway_port)
    assert targets["api"] == str(defaults.api_port)
    for service in ("processor", "sink"):
        env = _environment(service)
        assert str(env["SPENDSTREAM_METRICS_PORT"]) == targets[service]
        assert env["SPENDSTREAM_METRICS_HOST"] == "0.0.0.0"
    processor_job = next(j for j in PROMETHEUS["scrape_configs"] if j["job_name"] == "processor")
    assert "dns_sd_configs" in processor_job, "two processor replicas: discover each one"
    assert {"prometheus", "grafana"} <= set(COMPOSE["services"])


def _defined_series() -> set[str]:
    """Every series defined in core and by the services that register their own collectors."""
    names = set()
    modules = (metrics, edge_metrics, gateway_metrics, sink_metrics)
    for collector in (obj for module in modules for obj in vars(module).values() if hasattr(obj, "describe")):
        if isinstance(collector, type):
            continue
        for family in collector.describe():
            suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_count", "_sum"]}
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def test_grafana_dashboard_charts_only_defined_metrics_from_provisioned_sources() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "spendstream.yaml").read_text())
    by_uid = {s["uid"]: s for s in sources["datasources"]}
    assert {s["type"] for s in by_uid.values()} == {"prometheus", "grafana-clickhouse-datasource"}
    dashboard = json.loads((GRAFANA / "dashboards" / "spendstream.json").read_text())
    defined = _defined_series()
    used_metrics, used_tables = set(), set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            uid = target["datasource"]["uid"]
            assert uid in by_uid, panel["title"]
            if by_uid[uid]["type"] == "prometheus":
                used_metrics.update(re.findall(r"spendstream_[a-z_]+", target["expr"]))
            else:
                used_tables.update(re.findall(r"spendstream\.([a-z_]+)", target["rawSql"]))
    assert used_metrics and not used_metrics - defined, used_metrics - defined
    migrations = "".join(p.read_text() for p in (ROOT / "schemas" / "clickhouse").glob("*.sql"))
    assert used_tables and all(re.search(rf"\b{table}\b", migrations) for table in used_tables), used_tables
    assert load_settings().clickhouse_database == "spendstream"


def test_http_latency_counts_each_request_in_the_first_bucket_that_holds_it() -> None:
    latency = metrics.HttpLatency("unit-test")
    for seconds in (0.001, 0.0011, 60.0, 61.0):
        latency.observe("/x", 204, seconds)
    samples = {
        (sample.name, sample.labels.get("le")): sample.value
        for family in metrics.HTTP_LATENCY.collect()
        for sample in family.samples
        if sample.labels.get("service") == "unit-test"
    }
    bucket = "spendstream_http_request_duration_seconds_bucket"
    assert samples[(bucket, "0.001")] == 1  # le: a request of exactly 1 ms is in the 1 ms bucket
    assert samples[(bucket, "0.0025")] == 2 and samples[(bucket, "60.0")] == 3 and samples[(bucket, "+Inf")] == 4
    assert samples[("spendstream_http_request_duration_seconds_count", None)] == 4
    assert samples[("spendstream_http_request_duration_seconds_sum", None)] == pytest.approx(121.0021)

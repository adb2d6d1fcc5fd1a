"""Security: keys hashed at rest and compared in constant time; secrets, prompts and completions never reach
logs, Kafka or ClickHouse; admin endpoints need the token; Kafka security settings reach every client; the
analytics ClickHouse user and ``spendstream sql`` are read-only."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from spendstream.analytics.readonly_sql import WriteRefused, sql_report
from spendstream.api.app import create_app
from spendstream.api.tokens import add_token
from spendstream.core.config import Settings, load_settings
from spendstream.core.ledger_store import connect, migrate
from spendstream.edge.emitter import Emitter
from spendstream.edge.enforcer import Enforcer
from spendstream.gateway import keys as keys_module
from spendstream.gateway.app import Gateway, GatewayThread
from spendstream.gateway.config import GatewayConfig, ProviderConfig, UpstreamConfig
from spendstream.gateway.keys import KeyStore, VirtualKey, hash_key, new_key
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.sink.ledger_sink import LedgerSink

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "services" / "spendstream"


# -- virtual keys --------------------------------------------------------------------------------


def test_virtual_keys_are_stored_as_hashes_and_compared_in_constant_time() -> None:
    key = new_key()
    store = KeyStore([VirtualKey(sha256=hash_key(key), name="k", team="t")])
    assert store.lookup(key) is not None and store.lookup(key + "x") is None and store.lookup("") is None
    assert key not in repr(vars(store)) and key not in repr(list(vars(store).values()))
    with pytest.raises(ValueError):  # an entry cannot carry the key itself
        VirtualKey.model_validate({"sha256": hash_key(key), "key": key})
    with pytest.raises(ValueError):
        VirtualKey.model_validate({"sha256": key})
    lookup = inspect.getsource(KeyStore.lookup)
    assert "hmac.compare_digest" in lookup and "==" not in lookup
    assert "hmac" in keys_module.__dict__


# -- secrets, prompts and completions stay out of logs, Kafka and ClickHouse ----------------------

MARKER = f"zq-private-{uuid.uuid4().hex}"  # in every prompt and every completion
PROVIDER_KEY = f"sk-provider-{uuid.uuid4().hex}"
VIRTUAL_KEY = f"sk-ss-{uuid.uuid4().hex}"
WRONG_KEY = f"sk-ss-wrong-{uuid.uuid4().hex}"
SECRETS = {"marker": MARKER, "provider key": PROVIDER_KEY, "virtual key": VIRTUAL_KEY, "wrong key": WRONG_KEY}


class MarkerUpstream:
    """An LLM upstream whose every answer contains MARKER; it records the Authorization headers it gets."""

    def __init__(self) -> None:
        self.auth: list[str] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.auth.append(request.headers.get("Authorization") or request.headers.get("x-api-key") or "")
        body = await request.json()
        model = body["model"]
        if request.path == "/v1/embeddings":
            usage = {"prompt_tokens": 2, "total_tokens": 2}
            return web.json_response({"model": model, "data": [{"embedding": [0.1], "note": MARKER}], "usage": usage})
        anthropic = request.path == "/v1/messages"
        if anthropic:
            usage = {"input_tokens": 3, "output_tokens": 4}
            reply = {"model": model, "content": [{"type": "text", "text": MARKER}], "usage": usage}
        else:
            usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
            reply = {"model": model, "choices": [{"message": {"role": "assistant", "content": MARKER}}], "usage": usage}
        if not body.get("stream"):
            return web.json_response(reply)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        if anthropic:
            events = [
                {
                    "type": "message_start",
                    "message": {"model": model, "usage": {"input_tokens": 3, "output_tokens": 0}},
                },
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": MARKER}},
                {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}},
            ]
        else:
            events = [
                {"model": model, "choices": [{"index": 0, "delta": {"content": MARKER}}]},
                {"model": model, "choices": [], "usage": usage},
            ]
        for event in events:
            await out.write(f"data: {json.dumps(event)}\n\n".encode())
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    def __enter__(self) -> MarkerUpstream:
        app = web.Application()
        for path in ("/v1/chat/completions", "/v1/messages", "/v1/embeddings"):
            app.router.add_post(path, self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        self._thread.start()

        async def start() -> int:
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        port = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def post(url: str, body: Any, key: str = VIRTUAL_KEY, raw: bytes | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def drive_gateway(settings: Settings, tmp_path: Path) -> int:
    """Every endpoint, streamed and not, plus refused requests; returns how many usage events they make."""
    prompt = [{"role": "user", "content": f"please keep {MARKER} secret"}]
    with MarkerUpstream() as upstream:
        enforcer = Enforcer(settings=settings).start()
        assert enforcer.wait_ready(10)
        emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
        config = GatewayConfig(
            keys=[VirtualKey(sha256=hash_key(VIRTUAL_KEY), name="sec", team="security", allow_header_attribution=True)],
            providers={
                "openai": ProviderConfig(upstreams=[UpstreamConfig(base_url=upstream.url, api_key_env="SS_TEST_KEY")]),
                "anthropic": ProviderConfig(
                    kind="anthropic", upstreams=[UpstreamConfig(base_url=upstream.url, api_key_env="SS_TEST_KEY")]
                ),
            },
        )
        with GatewayThread(Gateway(config, settings, enforcer=enforcer, emitter=emitter)) as gateway:
            url = gateway.url
            for stream in (False, True):
                status, body = post(
                    url + "/v1/chat/completions", {"model": "gpt-4o", "messages": prompt, "stream": stream}
                )
                assert status == 200 and MARKER.encode() in body  # the client does get its completion
                message = {"model": "claude-3-5-haiku-latest", "max_tokens": 9, "messages": prompt, "stream": stream}
                status, body = post(url + "/v1/messages", message)
                assert status == 200 and MARKER.encode() in body
            assert post(url + "/v1/embeddings", {"model": "text-embedding-3-small", "input": [MARKER]})[0] == 200
            assert post(url + "/v1/chat/completions", {"model": "gpt-4o", "messages": prompt}, key=WRONG_KEY)[0] == 401
            bad_json = f'{{"model": "gpt-4o", "messages": "{MARKER}"'.encode()
            assert post(url + "/v1/chat/completions", None, raw=bad_json)[0] == 400
        emitter.close(10)
        enforcer.stop()
        assert upstream.auth and all(PROVIDER_KEY in a for a in upstream.auth)  # the key was in use
    return 5


def all_topic_bytes(bootstrap: str) -> bytes:
    """Keys, values and headers of every record of every topic on the broker, from the beginning."""
    topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "enable.auto.commit": False})
    chunks: list[bytes] = []
    try:
        for topic, meta in topics.items():
            for partition in meta.partitions:
                tp = TopicPartition(topic, partition)
                _, high = consumer.get_watermark_offsets(tp, timeout=10)
                if high <= 0:
                    continue
                consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
                seen, deadline = 0, time.monotonic() + 10
                while seen < high and time.monotonic() < deadline:
                    for msg in consumer.consume(500, 0.2):
                        if msg.error() is not None:
                            continue
                        seen = max(seen, msg.offset() + 1)
                        chunks += [msg.key() or b"", msg.value() or b"", repr(msg.headers()).encode()]
                assert seen >= high, f"could not read {topic}[{partition}] to its end"
    finally:
        consumer.close()
    return b"\n".join(chunks)


def all_ledger_bytes(client: Any) -> tuple[bytes, list[str]]:
    """Every row of every table (and view) outside ClickHouse's own databases, as raw TSV."""
    tables = client.query(
        "SELECT database, name FROM system.tables WHERE database NOT IN ('system', 'INFORMATION_SCHEMA', "
        "'information_schema') AND engine NOT IN ('MaterializedView')"
    ).result_rows
    dump = [client.raw_query(f"SELECT * FROM `{db}`.`{name}` FORMAT TSVRaw") for db, name in tables]
    return b"\n".join(dump), [f"{db}.{name}" for db, name in tables]


def test_secrets_prompts_and_completions_never_reach_logs_kafka_or_the_ledger(
    settings: Settings,
    broker: EmbeddedBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SS_TEST_KEY", PROVIDER_KEY)
    caplog.set_level(logging.DEBUG)
    metered = drive_gateway(settings, tmp_path)

    client = connect(settings)
    migrate(client, settings)
    event = {
        "event_id": str(uuid.uuid4()), "occurred_at": datetime.now(UTC).isoformat(), "provider": "openai",
        "model_requested": "gpt-4o", "input_tokens": 3, "output_tokens": 4, "team": "security",
    }  # fmt: skip

    async def ingest(http: TestClient) -> None:
        for field in ("prompt", "completion", "messages"):
            response = await http.post("/v1/usage", json={**event, "event_id": str(uuid.uuid4()), field: MARKER})
            assert response.status == 400, await response.text()
        assert (await http.post("/v1/usage", json=event)).status == 202

    async def run_api() -> None:
        auth = {"Authorization": f"Bearer {add_token(settings.api_tokens_path, 'ingest', 'security')}"}
        async with TestClient(TestServer(create_app(settings, client)), headers=auth) as http:
            await ingest(http)

    try:
        asyncio.run(run_api())
        sink = LedgerSink(settings, client)
        worker = threading.Thread(target=sink.run, daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        while sink.stats.inserted < metered + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        sink.stop()
        worker.join(60)
        assert sink.stats.inserted == metered + 1, sink.stats
        ledger, tables = all_ledger_bytes(client)
    finally:
        client.close()
    assert "spendstream.usage_ledger" in tables and b"security" in ledger  # the dump really holds the rows
    topics = all_topic_bytes(broker.bootstrap)
    assert b"security" in topics
    out, err = capfd.readouterr()
    logs = caplog.text + out + err
    for what, secret in SECRETS.items():
        assert secret.encode() not in topics, f"{what} found on a Kafka topic"
        assert secret.encode() not in ledger, f"{what} found in the ledger"
        assert secret not in logs, f"{what} found in the logs"


# -- admin endpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["s3cret-admin", None])
def test_admin_endpoints_need_the_token(offline_settings: Settings, ledger: Any, token: str | None) -> None:
    settings = load_settings(data_dir=offline_settings.data_dir, admin_token=token)
    body = {"from": "2026-01-01", "to": "2026-01-02"}

    async def check(http: TestClient) -> None:
        for path in ("/v1/admin/rollup/rebuild", "/v1/admin/budgets"):
            attempts = {
                "none": {},
                "wrong": {"Authorization": "Bearer wrong"},
                "no bearer": {"Authorization": str(token)},
                "prefix": {"Authorization": f"Bearer {str(token)[:-1]}"},
                "longer": {"Authorization": f"Bearer {token}x"},
            }
            for name, headers in attempts.items():
                response = await http.post(path, json=body, headers=headers)
                assert response.status == (401 if token else 403), (path, name)
                assert "error" in await response.json()
            right = await http.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
            assert right.status == (403 if token is None else 200 if path.endswith("rebuild") else 400), path
        assert (await http.get("/healthz")).status == 200  # the rest of the API stays open

    async def run() -> None:
        async with TestClient(TestServer(create_app(settings, ledger))) as http:
            await check(http)

    asyncio.run(run())


# -- Kafka and ClickHouse credentials -------------------------------------------------------------


def test_kafka_security_settings_reach_the_client_config(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    settings = load_settings(
        data_dir=tmp_path,
        kafka_bootstrap="kafka-1:9093,kafka-2:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="spend",
        kafka_sasl_password="pa55-word",
        kafka_ssl_ca_location=ca,
        clickhouse_dsn="https://writer:ch-pa55@clickhouse:8443",
    )
    conf = settings.kafka_client_config()
    assert conf.pop("logger").name == "spendstream.kafka"
    assert conf == {
        "bootstrap.servers": "kafka-1:9093,kafka-2:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "spend",
        "sasl.password": "pa55-word",
        "ssl.ca.location": str(ca),
    }
    assert settings.ledger_dsn == "https://writer:ch-pa55@clickhouse:8443"
    assert "pa55-word" not in repr(settings) and "pa55-word" not in str(settings.model_dump())
    # librdkafka checks the CA file when a client is built, so the edge clients get a SASL_PLAINTEXT variant.
    settings = settings.model_copy(update={"kafka_ssl_ca_location": None, "kafka_security_protocol": "SASL_PLAINTEXT"})
    # librdkafka checks the CA file when a client is built, so the edge clients get a SASL_PLAINTEXT variant.
    settings = settings.model_copy(update={"kafka_ssl_ca_location": None, "kafka_security_protocol": "SASL_PLAINTEXT"})
    emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool", producer_config={"message.timeout.ms": 1000})
    try:
        assert emitter._producer_conf["sasl.password"] == "pa55-word"
    finally:
        emitter.close(0.1)
    enforcer = Enforcer(settings=settings)
    assert enforcer._conf["security.protocol"] == "SASL_PLAINTEXT" and enforcer._conf["sasl.username"] == "spend"
    assert enforcer._policy_follower is not None and enforcer._policy_follower._conf["sasl.username"] == "spend"


def kafka_client_constructions() -> dict[str, str]:
    """Every ``Producer(``/``Consumer(``/``AdminClient(`` call in the services -> the source of its scope."""
    found: dict[str, str] = {}
    for path in sorted(SERVICES.rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        scopes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("Producer", "Consumer", "AdminClient"):
                enclosing = [s for s in scopes if s.lineno <= node.lineno <= (s.end_lineno or s.lineno)]
                outer = min(enclosing, key=lambda s: s.lineno) if enclosing else tree
                where = f"{path.relative_to(SERVICES)}:{node.lineno}"
                found[where] = ast.get_source_segment(source, outer) or source
    return found


# Scopes whose client gets its librdkafka config from a caller, each of which passes kafka_client_config().
CONFIG_FROM_CALLER = {
    "sink/dead_letters.py",
    "runtime/topic_admin.py",
    "processor/checkpoint.py",
    "processor/policy_in_force.py",
    "processor/recovery.py",
    "processor/usage_reader.py",
    "processor/heartbeat.py",
    "core/policy_log.py",
    "edge/policy_follower.py",
    "edge/topic_follower.py",
    "processor/internal_topics.py",
    "processor/ledger_rebuild.py",
    "processor/budget_adjustments.py",
    "processor/decision_guard.py",
    "processor/internal_seal.py",
    "api/budget_requests.py",
    "sink/audit_verify.py",
}
# Clients of the embedded broker only (`spendstream dev`, the broker's health check): it has no security settings.
EMBEDDED_ONLY = {  # always a local broker
    "runtime/embedded_broker.py",
    "runtime/dev_stack.py",
    "runtime/demo.py",
    "runtime/policy_memory.py",
}


def test_every_kafka_client_gets_the_configured_security_settings() -> None:
    constructions = kafka_client_constructions()
    assert len(constructions) >= 8  # the scan finds the services' clients
    bypassing = []
    for where, scope in constructions.items():
        module = where.split(":")[0]
        if module in EMBEDDED_ONLY or module in CONFIG_FROM_CALLER or "kafka_client_config()" in scope:
            continue
        bypassing.append(where)
    assert not bypassing, f"Kafka clients built without Settings.kafka_client_config(): {bypassing}"
    callers = "\n".join(p.read_text() for p in SERVICES.rglob("*.py"))
    assert "DeadLetterPublisher(kafka)" in callers or "DeadLetterPublisher(settings.kafka_client_config()" in callers
    assert "create_topics(settings.kafka_client_config()" in callers


def test_the_processor_passes_kafka_security_settings_to_faust() -> None:
    source = (SERVICES / "processor" / "app.py").read_text()
    call = source[source.index("faust.App(") :]
    call = call[: call.index("\n    )")]
    assert "broker_credentials" in call


def test_the_analytics_clickhouse_user_is_read_only() -> None:
    root = ET.parse(ROOT / "infra" / "clickhouse" / "users.xml").getroot()
    user = root.find("users/analytics")
    assert user is not None
    profile = root.find(f"profiles/{user.findtext('profile')}")
    assert profile is not None and profile.findtext("readonly") == "1"
    assert user.findtext("access_management") in (None, "0")


def test_spendstream_sql_refuses_writes_by_default(offline_settings: Settings, ledger: Any) -> None:
    before = ledger.query("SELECT count() FROM system.tables WHERE database = 'spendstream'").result_rows[0][0]
    refused = [
        "INSERT INTO usage_ledger (event_id, provider, model_requested) VALUES (generateUUIDv4(), 'x', 'y')",
        "DROP TABLE usage_ledger",
        "  /* hidden */ -- comment\n ( TRUNCATE TABLE usage_ledger)",
        "ALTER TABLE usage_ledger DELETE WHERE 1",
        "CREATE TABLE evil (x Int8) ENGINE = Memory",
        "OPTIMIZE TABLE usage_ledger FINAL",
        "",
    ]
    for query in refused:
        with pytest.raises(WriteRefused):
            sql_report(ledger, offline_settings, query)
    sneaky = [
        "SELECT 1 SETTINGS readonly = 0",
        "WITH 1 AS x INSERT INTO usage_ledger (event_id, provider, model_requested) SELECT generateUUIDv4(), 'a', 'b'",
        "SELECT * FROM usage_ledger; DROP TABLE usage_ledger",
    ]
    for query in sneaky:
        with pytest.raises(Exception) as raised:
            sql_report(ledger, offline_settings, query)
        assert not isinstance(raised.value, AssertionError)
    assert sql_report(ledger, offline_settings, "SELECT count() AS n FROM usage_ledger").rows == [{"n": 0}]
    after = ledger.query("SELECT count() FROM system.tables WHERE database = 'spendstream'").result_rows[0][0]
    assert after == before


def test_spendstream_sql_command_exits_non_zero_on_a_write(tmp_path: Path) -> None:
    env = {**os.environ, "SPENDSTREAM_DATA_DIR": str(tmp_path)}
    migrate = [sys.executable, "-m", "spendstream.cli", "ledger", "migrate"]
    assert subprocess.run(migrate, env=env, capture_output=True, timeout=120).returncode == 0
    command = [sys.executable, "-m", "spendstream.cli", "sql", "DROP TABLE usage_ledger"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "refused" in result.stderr
    check = [
        sys.executable,
        "-m",
        "spendstream.cli",
        "sql",
        "SELECT count() AS n FROM usage_ledger",
        "--format",
        "json",
    ]
    result = subprocess.run(check, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture(autouse=True)
def _no_leftover_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """These tests read SPENDSTREAM_* settings; none may leak in from the developer's shell."""
    for name in list(os.environ):
        if name.startswith("SPENDSTREAM_"):
            monkeypatch.delenv(name)
    yield

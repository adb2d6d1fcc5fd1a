"""Hostile input against every parser that faces the outside: the Avro decoder, the API's JSON ingest and
the gateway's request parsing. Each bad input gets a clear 4xx (or a DecodeError with a reason, which is what
sends a value to the DLQ), never a 5xx or another exception, and the service keeps serving afterwards."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from spendstream.api.app import BadRequest, create_app, late_events, parse_batch
from spendstream.api.tokens import add_token
from spendstream.core.attribution import attribution_value_problem
from spendstream.core.codec import SINGLE_OBJECT_MAGIC, AvroCodec, DecodeError, fingerprint
from spendstream.core.config import Settings
from spendstream.core.events import MAX_EVENT_COST_NANOS, UsageEvent, usage_record_problem
from spendstream.core.policy import parse_policy
from spendstream.edge.emitter import Emitter
from spendstream.edge.enforcer import Enforcer
from spendstream.gateway.app import Gateway, GatewayThread
from spendstream.gateway.config import GatewayConfig, ProviderConfig, UpstreamConfig
from spendstream.gateway.keys import VirtualKey, hash_key
from spendstream.runtime.embedded_broker import EmbeddedBroker
from stub_upstream import StubUpstream
from test_gateway import http, read_usage

CODEC = AvroCodec("usage_event")
HEADER = SINGLE_OBJECT_MAGIC + fingerprint("usage_event")
NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
SKEW = timedelta(minutes=5)
INT64_MAX = 2**63 - 1


def zigzag(n: int) -> bytes:
    """An Avro long of any size (a Python int), as a hostile writer would produce it."""
    n = (n << 1) ^ (n >> 200)  # sign-fill wide enough for the huge values these tests write
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def good_encoding(**kw: Any) -> bytes:
    fields = {"provider": "openai", "model_requested": "gpt-4o", "tags": {"k": "v"}, "input_tokens": 7, **kw}
    return CODEC.encode(UsageEvent(occurred_at=NOW, **fields).to_avro())


def decode_or_reason(data: bytes) -> str | None:
    """The decoder's verdict: a DecodeError reason, or the ledger's judgement of the decoded record."""
    try:
        record = CODEC.decode(data)
    except DecodeError as exc:
        assert str(exc), "a DecodeError must carry its reason (it becomes the DLQ reason)"
        return str(exc)
    return usage_record_problem(record, NOW, SKEW)


# -- the Avro decoder ----------------------------------------------------------------------------

FUZZ = hyp_settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_raise_decode_error_or_are_judged(data: bytes) -> None:
    decode_or_reason(data)
    decode_or_reason(HEADER + data)  # past the framing, into the Avro body


@FUZZ
@given(st.data())
def test_truncated_and_bit_flipped_encodings(data: st.DataObject) -> None:
    value = good_encoding(
        team=data.draw(st.text(max_size=5).filter(lambda team: attribution_value_problem("team", team) is None)),
        cost_nanos=data.draw(st.integers(0, MAX_EVENT_COST_NANOS)),
    )
    cut = data.draw(st.integers(0, len(value) - 1))
    assert decode_or_reason(value[:cut]) is not None  # a truncated value never passes as a record
    flipped = bytearray(value)
    for position in data.draw(st.lists(st.integers(0, len(value) * 8 - 1), min_size=1, max_size=6)):
        flipped[position // 8] ^= 1 << (position % 8)
    decode_or_reason(bytes(flipped))


@pytest.mark.parametrize(
    "body",
    [
        zigzag(2**40),  # event_id: a string that claims a terabyte
        zigzag(2**62),
        zigzag(-(2**40)),  # a negative length
        zigzag(10**40),  # a varint far wider than 64 bits
        b"\xff" * 64,  # a varint that never ends
        zigzag(36) + str(uuid.uuid4()).encode() + zigzag(2**40) + b"0" * 16,  # occurred_at beyond any datetime
    ],
    ids=["tb-string", "eb-string", "negative-length", "wide-varint", "endless-varint", "huge-timestamp"],
)
def test_absurd_lengths_and_varints_allocate_nothing(body: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as raised:
            CODEC.decode(HEADER + body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(raised.value)
    assert peak < 4 * 1024 * 1024, f"decoding {body[:12].hex()} allocated {peak} bytes"


def test_huge_map_block_count_and_wide_longs() -> None:
    """A tags map claiming 2**40 entries stops at the end of the data. A long wider than 64 bits is not
    refused (fastavro wraps it, as a 64-bit reader does), but what comes out still fits an Int64 column and
    is judged like any other record."""
    value = good_encoding()
    tags_at = value.index(b"\x02\x02k\x02v\x00")  # one block of one entry "k" -> "v", then the end marker
    with pytest.raises(DecodeError):
        CODEC.decode(value[:tags_at] + zigzag(2**40) + b"\x02k\x02v" * 3)
    tokens_at = value.index(zigzag(7), tags_at + 6)
    for wide in (2**63, 2**64, 2**70, 2**200, -(2**64)):
        data = value[:tokens_at] + zigzag(wide) + value[tokens_at + 1 :]
        try:
            record = CODEC.decode(data)
        except DecodeError:
            continue
        assert -(2**63) <= record["input_tokens"] <= INT64_MAX
        problem = usage_record_problem(record, NOW, SKEW)
        assert problem is None or "input_tokens" in problem


# -- the API's JSON ingest (pure part) -----------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
hostile_strings = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=6)


def event_dict(**kw: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "occurred_at": NOW.isoformat(),
        "provider": "openai",
        "model_requested": "gpt-4o",
        "input_tokens": 3,
        **kw,
    }


@FUZZ
@given(
    st.one_of(
        json_values,
        st.builds(
            event_dict,
            team=hostile_strings,
            tags=st.dictionaries(hostile_strings, hostile_strings, max_size=2),
            input_tokens=st.one_of(st.integers(), st.integers(2**62, 2**80), st.text(max_size=3), st.booleans()),
            cost_nanos=st.one_of(st.none(), st.integers(-(2**70), 2**70)),
            latency_ms=st.integers(-(2**70), 2**70),
        ),
    )
)
def test_parse_batch_accepts_only_events_the_codec_can_write(body: Any) -> None:
    """Every event ``parse_batch`` accepts can be encoded and published; everything else is a BadRequest."""
    try:
        events = parse_batch(body, NOW, SKEW, max_events=10)
    except (BadRequest, OverflowError):
        return
    for event in events:
        CODEC.encode(event.to_avro())
        f"{event.org}/{event.team}".encode()  # the Kafka key of the event


# -- the API over HTTP ---------------------------------------------------------------------------


def api_cases() -> list[tuple[str, bytes, str, int]]:
    """(name, body, content type, expected status); every body is refused whole."""
    ev = json.dumps(event_dict()).encode()

    def with_fields(**kw: Any) -> bytes:
        return json.dumps(event_dict(**kw)).encode()

    deep_tags = json.dumps(event_dict(tags={})).replace('"tags": {}', '"tags": ' + '{"a":' * 3000 + "1" + "}" * 3000)
    return [
        ("deep-array", b"[" * 20_000 + b"]" * 20_000, "application/json", 400),
        ("deep-object", deep_tags.encode(), "application/json", 400),
        ("lone-surrogate-team", with_fields(team="\ud800x"), "application/json", 400),
        ("lone-surrogate-tag-key", with_fields(tags={"\udfff": "v"}), "application/json", 400),
        ("blocked-with-a-cost", with_fields(status="blocked", cost_nanos=5 * 10**9), "application/json", 400),
        ("template-user", with_fields(user="*"), "application/json", 400),  # user:* would shut off every user
        ("template-customer", with_fields(customer="*"), "application/json", 400),
        ("spaced-team", with_fields(team="product "), "application/json", 400),
        # names that look like a policy's but escape its scope: zero-width, bidi override, a decomposed accent
        ("zero-width-team", with_fields(team="marketing\u200b"), "application/json", 400),
        ("bidi-override-user", with_fields(user="al\u202eice"), "application/json", 400),
        ("control-character-feature", with_fields(feature="chat\nbot"), "application/json", 400),
        ("decomposed-team", with_fields(team="e\u0301quipe"), "application/json", 400),
        ("feature-of-900-kb", with_fields(feature="f" * 900_000), "application/json", 413),
        ("feature-of-257-chars", with_fields(feature="f" * 257), "application/json", 400),
        ("model-of-257-chars", with_fields(model_requested="m" * 257), "application/json", 400),
        ("tag-of-a-megabyte", with_fields(tags={"pad": "x" * 1_000_000}), "application/json", 413),
        ("tag-of-2000-chars", with_fields(tags={"pad": "x" * 2000}), "application/json", 400),
        ("65-tags", with_fields(tags={str(i): "v" for i in range(65)}), "application/json", 400),
        ("service-tier-of-300-chars", with_fields(service_tier="x" * 300), "application/json", 400),
        ("tokens-beyond-int64", with_fields(input_tokens=2**63), "application/json", 400),
        ("tokens-10e30", with_fields(output_tokens=10**30), "application/json", 400),
        ("cost-beyond-int64", with_fields(cost_nanos=2**64), "application/json", 400),
        ("latency-beyond-int64", with_fields(latency_ms=2**70), "application/json", 400),
        ("5000-digit-number", b'{"input_tokens": ' + b"9" * 5000 + b"}", "application/json", 400),
        ("negative-tokens", with_fields(input_tokens=-1), "application/json", 400),
        ("negative-cost", with_fields(cost_nanos=-1), "application/json", 400),
        ("float-tokens", with_fields(input_tokens=1.5), "application/json", 400),
        ("nan-tokens", ev.replace(b'"input_tokens": 3', b'"input_tokens": NaN'), "application/json", 400),
        ("tokens-as-object", with_fields(input_tokens={"n": 1}), "application/json", 400),
        ("tags-not-strings", with_fields(tags={"a": [1]}), "application/json", 400),
        ("event-id-number", with_fields(event_id=5), "application/json", 400),
        ("no-event-id", with_fields(event_id=None), "application/json", 400),
        ("prompt-field", with_fields(prompt="hello"), "application/json", 400),
        ("status-unknown", with_fields(status="exploded"), "application/json", 400),
        ("cache-hit-as-text", with_fields(cache_hit="yes"), "application/json", 400),
        ("date-beyond-9999", with_fields(occurred_at=10**20), "application/json", 400),
        ("older-than-the-ledger-keeps", with_fields(occurred_at="2020-01-01T00:00:00Z"), "application/json", 400),
        ("truncated", ev[:-7], "application/json", 400),
        ("invalid-utf8", b'{"event_id": "\xff\xfe"}', "application/json", 400),
        ("empty-body", b"", "application/json", 400),
        ("json-null", b"null", "application/json", 400),
        ("json-string", b'"event"', "application/json", 400),
        ("events-not-array", b'{"events": {"a": 1}}', "application/json", 400),
        ("empty-batch", b"[]", "application/json", 400),
        ("form-body", b"event_id=1&provider=x", "application/x-www-form-urlencoded", 415),
        ("text-plain-json", ev, "text/plain", 415),  # what a page's no-cors fetch can send
        ("binary-body", b"\x00\x01\x02\xc3\x01" * 10, "application/octet-stream", 415),
        ("batch-over-limit", json.dumps([event_dict() for _ in range(11)]).encode(), "application/json", 413),
        ("body-over-limit", b"[" + b",".join([ev] * 600) + b"]", "application/json", 413),
    ]


def test_api_ingest_refuses_hostile_bodies_and_keeps_serving(settings: Settings, broker: EmbeddedBroker) -> None:
    accepted: list[str] = []

    async def body(http_client: TestClient) -> None:
        for name, data, content_type, expected in api_cases():
            response = await http_client.post("/v1/usage", data=data, headers={"Content-Type": content_type})
            text = await response.text()
            assert response.status == expected, (name, response.status, text[:300])
            assert response.content_type == "application/json", name
            reply = json.loads(text)
            assert isinstance(reply["error"], str) and reply["error"], name
            good = event_dict(
                team="\u00e9quipe \U0001f4b8",
                tags={"emoji": "\U0001f4b8", "nul": "\x00"},
                occurred_at=datetime.now(UTC).isoformat(),
            )
            response = await http_client.post("/v1/usage", json=good)
            assert response.status == 202, (f"after {name}", await response.text())
            accepted.append(good["event_id"])
        two_days_ago = (datetime.now(UTC) - timedelta(days=2)).isoformat()
        late = {**good, "event_id": str(uuid.uuid4()), "occurred_at": two_days_ago}
        response = await http_client.post("/v1/usage", json=late)  # the ledger records it; no budget counts it
        assert response.status == 202, await response.text()
        [said] = (await response.json())["not_counted_in_budgets"]
        assert said["event_id"] == late["event_id"] and "recorded in the ledger" in said["message"]
        accepted.append(late["event_id"])

    async def run() -> None:
        ingest = {"Authorization": f"Bearer {add_token(settings.api_tokens_path, 'ingest', 'hostile')}"}
        app = create_app(settings, max_body_bytes=64 * 1024, max_events=10)
        async with TestClient(TestServer(app), headers=ingest) as http_client:
            await body(http_client)

    asyncio.run(run())
    published = read_usage(broker.bootstrap, len(accepted))
    assert sorted(str(e["event_id"]) for e in published) == sorted(accepted)  # nothing bad slipped through
    assert {(e["team"], e["tags"]["nul"]) for e in published} == {("\u00e9quipe \U0001f4b8", "\x00")}


# -- the gateway ---------------------------------------------------------------------------------

KEY = "sk-ss-hostile-input"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}
MESSAGE = {"model": "claude-3-5-haiku-latest", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
EMBED = {"model": "text-embedding-3-small", "input": ["a b"]}
GOOD = {"/v1/chat/completions": CHAT, "/v1/messages": MESSAGE, "/v1/embeddings": EMBED}


@pytest.fixture
def gateway(settings: Settings, tmp_path: Path) -> Iterator[GatewayThread]:
    with StubUpstream() as upstream:
        enforcer = Enforcer(settings=settings).start()
        assert enforcer.wait_ready(10)
        emitter = Emitter(settings=settings, spool_dir=tmp_path / "spool")
        config = GatewayConfig(
            keys=[VirtualKey(sha256=hash_key(KEY), name="fuzz", team="qa", allow_header_attribution=True)],
            providers={
                "openai": ProviderConfig(upstreams=[UpstreamConfig(base_url=upstream.url)]),
                "anthropic": ProviderConfig(kind="anthropic", upstreams=[UpstreamConfig(base_url=upstream.url)]),
            },
            max_body_bytes=32 * 1024,
        )
        policy = parse_policy("org: acme\ndivisions: {quality: [qa]}\n")  # the key's team qa is in division quality
        with GatewayThread(Gateway(config, settings, enforcer=enforcer, emitter=emitter, policy=policy)) as running:
            yield running
        emitter.close(10)
        enforcer.stop()


def gateway_cases(good: dict[str, Any]) -> list[tuple[str, bytes, dict[str, str], int]]:
    """(name, raw body, extra headers, expected status) for one endpoint."""
    raw = json.dumps(good).encode()
    surrogate_model = json.dumps({**good, "model": "\ud800"}).encode()
    return [
        ("deep-array", b"[" * 5_000 + b"]" * 5_000, {}, 400),
        ("deep-object", raw[:-1] + b',"x":' + b'{"a":' * 5000 + b"1" + b"}" * 5001, {}, 400),
        ("5000-digit-number", raw[:-1] + b',"n":' + b"9" * 5000 + b"}", {}, 400),
        ("truncated", raw[:-3], {}, 400),
        ("empty", b"", {}, 400),
        ("invalid-utf8", b'{"model": "\xff\xfe"}', {}, 400),
        ("array-body", b"[" + raw + b"]", {}, 400),
        ("no-model", json.dumps({k: v for k, v in good.items() if k != "model"}).encode(), {}, 400),
        ("model-number", json.dumps({**good, "model": 4}).encode(), {}, 400),
        ("model-null", json.dumps({**good, "model": None}).encode(), {}, 400),
        ("model-lone-surrogate", surrogate_model, {}, 400),
        ("oversize", raw[:-1] + b',"pad":"' + b"x" * 40_000 + b'"}', {}, 413),
        ("no-key", raw, {"Authorization": ""}, 401),
        ("wrong-key", raw, {"Authorization": "Bearer sk-ss-nope"}, 401),
        ("key-with-nul-escape", raw, {"Authorization": "Bearer " + KEY + "%00"}, 401),
        ("header-latin1-user", raw, {"X-Spendstream-User": "caf\xe9"}, 400),
        ("header-utf8-bytes-user", raw, {"X-Spendstream-User": "\u00c3\u00a9t\u00c3\u00a9"}, 200),
        ("header-invalid-utf8-team", raw, {"X-Spendstream-Team": "\xff\xfe"}, 400),
        ("header-long-feature", raw, {"X-Spendstream-Feature": "f" * 4000}, 400),
        ("header-feature-at-the-limit", raw, {"X-Spendstream-Feature": "f" * 256}, 200),
        ("header-template-user", raw, {"X-Spendstream-User": "*"}, 400),  # user:* would be every user's scope
        ("header-spaced-customer", raw, {"X-Spendstream-Customer": "acme "}, 400),
        ("header-other-team-than-the-key", raw, {"X-Spendstream-Team": "ops"}, 403),
        ("header-the-keys-own-team", raw, {"X-Spendstream-Team": "qa"}, 200),
        ("header-another-division", raw, {"X-Spendstream-Division": "technology"}, 403),  # out of its hard caps
        ("header-another-org", raw, {"X-Spendstream-Org": "shadow"}, 403),
        ("model-of-a-megabyte", json.dumps({**good, "model": "m" * 257}).encode(), {}, 400),
        ("stream-one", json.dumps({**good, "stream": 1}).encode(), {}, 400),  # served, unmetered, by lax upstreams
        ("stream-text", json.dumps({**good, "stream": "true"}).encode(), {}, 400),
        ("stream-null", json.dumps({**good, "stream": None}).encode(), {}, 200),  # the API's default, as OpenAI's
    ]


def test_gateway_refuses_hostile_requests_and_keeps_serving(gateway: GatewayThread, broker: EmbeddedBroker) -> None:
    served = 0
    for path, good in GOOD.items():
        for name, raw, headers, expected in gateway_cases(good):
            key = None if "Authorization" in headers else KEY
            status, _, body = http(gateway.url + path, raw=raw, key=key, headers=headers)
            assert status == expected, (path, name, status, body[:300])
            if status >= 400:
                error = json.loads(body)["error"]
                assert error["message"] and error["code"] and error["type"], (path, name)
            else:
                served += 1
            status, _, body = http(gateway.url + path, good, key=KEY)
            assert status == 200, (f"{path} after {name}", body[:300])
            served += 1
    events = read_usage(broker.bootstrap, served, timeout=30)
    assert len(events) == served  # every served request is metered, none of the refused ones is
    assert {"\u00e9t\u00e9", "f" * 256} <= {e["user"] for e in events} | {e["feature"] for e in events}
    assert {e["team"] for e in events} == {"qa"}  # a header never moved a request to another team
    assert gateway.gateway.counts["internal_error"] == 0
    assert gateway.gateway.emitter is not None and gateway.gateway.emitter.stats.failed == 0


@pytest.mark.parametrize("prompt_tokens", [2**70, 10**16, 10**11 + 1])
def test_an_upstream_reporting_absurd_token_counts_is_still_metered(prompt_tokens: int) -> None:
    """Counts that fit Int64 but could overflow a priced cost (10**16 tokens) are out of range too."""
    from spendstream.core.events import UsageStatus
    from spendstream.edge.call_event import build_event

    event = build_event(
        attribution={"team": "web"},
        provider="openai",
        model_requested="gpt-4o",
        model_served="gpt-4o",
        raw_usage={"prompt_tokens": prompt_tokens, "completion_tokens": 3},
        latency_ms=5,
        status=UsageStatus.ok,
        decision="",
        tags={},
    )
    assert event.input_tokens == 0
    assert "out of range" in event.tags["usage_error"]


def test_a_price_table_that_prices_past_the_ceiling_still_meters_the_call() -> None:
    from spendstream.core.events import MAX_EVENT_COST_NANOS, UsageStatus
    from spendstream.core.policy import parse_policy
    from spendstream.edge.call_event import build_event

    absurd = parse_policy(
        "pricing:\n  overrides:\n"
        "    - {provider: openai, model: gpt-4o, input_per_mtok: '1e12', output_per_mtok: '1'}\n"
    ).price_table
    event = build_event(
        attribution={"team": "web"},
        provider="openai",
        model_requested="gpt-4o",
        model_served="gpt-4o",
        raw_usage={"prompt_tokens": 1000, "completion_tokens": 3},
        latency_ms=5,
        status=UsageStatus.ok,
        decision="",
        tags={},
        prices=absurd,
    )
    assert (event.input_tokens, event.cost_nanos) == (0, 0)
    assert f"ceiling of {MAX_EVENT_COST_NANOS}" in event.tags["usage_error"]


def test_an_event_older_than_the_ledger_keeps_is_refused_naming_occurred_at() -> None:
    """The ledger's TTL would delete it at once: a 202 would be a promise nobody keeps."""
    expired = event_dict(occurred_at=datetime(2025, 1, 31, 12, tzinfo=UTC).isoformat())  # + 13 months: 2026-02-28
    kept = event_dict(occurred_at=datetime(2025, 2, 1, 12, 0, 1, tzinfo=UTC).isoformat())  # a second after NOW
    assert len(parse_batch([expired], NOW, SKEW, 10)) == 1  # without a TTL (a caller that does not judge it)
    try:
        parse_batch([kept, expired], NOW, SKEW, 10, ledger_ttl_months=13)
    except BadRequest as exc:
        [problem] = exc.problems
        assert problem["index"] == 1 and problem["field"] == "occurred_at"
        assert "older than the ledger keeps (13 months" in problem["message"]
    else:
        raise AssertionError("an event the ledger would delete was accepted")
    assert len(parse_batch([kept], NOW, SKEW, 10, ledger_ttl_months=13)) == 1


def test_an_event_beyond_the_processors_lateness_is_accepted_and_said_not_to_count_in_budgets() -> None:
    """The ledger records it (chargeback is exact); no budget window counts it, and the 202 says which."""
    on_time, late = event_dict(), event_dict(occurred_at=(NOW - timedelta(days=2)).isoformat())
    events = parse_batch([on_time, late], NOW, SKEW, 10, ledger_ttl_months=13)
    [said] = late_events(events, NOW, timedelta(days=1))
    assert (said["index"], said["event_id"], said["field"]) == (1, late["event_id"], "occurred_at")
    assert "arrived 2 d later, beyond the allowed lateness of 1 d" in said["message"]  # not "2 days, 0:00:00"
    assert "recorded in the ledger" in said["message"]


def test_a_body_that_does_not_inflate_after_a_401_is_one_log_line_not_a_traceback(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp reads the rest of a refused request's body; garbage under ``Content-Encoding: gzip`` raised there and
    was logged as an unhandled exception, 20 lines per request from anyone who can reach the port."""

    async def run() -> None:
        async with TestClient(TestServer(create_app(settings))) as client:
            for path, content_type in (("/v1/usage", "application/json"), ("/v1/traces", "application/x-protobuf")):
                headers = {"Connection": "close", "Content-Encoding": "gzip", "Content-Type": content_type}
                response = await client.post(path, data=b"not gzip\n", headers=headers)
                assert response.status == 401, path
                await response.read()
            await asyncio.sleep(0.1)  # the server reads the body after answering

    with caplog.at_level("INFO"):
        asyncio.run(run())
    assert not [r for r in caplog.records if r.name == "aiohttp.server"], [r.getMessage() for r in caplog.records]
    lines = [r for r in caplog.records if r.name == "spendstream.http"]
    assert len(lines) == 2 and all(r.exc_info is None and "content-encoding" in r.getMessage() for r in lines)

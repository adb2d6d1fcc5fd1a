"""CloudEvents 1.0 on ``POST /v1/usage`` of a running ``spendstream api`` (real broker): structured, batch and
binary mode; ``id`` is the event_id (a non-UUID id becomes the UUID5 of source and id, so a re-sent CloudEvent
is counted once), ``time`` the occurred_at; the same token, scope and bounds as plain JSON, and problems name
the CloudEvent attribute to fix."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import test_api_access
from spendstream.runtime.embedded_broker import EmbeddedBroker
from test_api_access import RunningApi, call, create_token
from test_gateway import read_usage

api = test_api_access.api  # the fixture that runs ``spendstream api``

USAGE_TYPE = "io.spendstream.usage.v1"


def usage(**kw: Any) -> dict[str, Any]:
    return {"org": "acme", "team": "marketing", "provider": "openai", "model_requested": "gpt-4o-mini",
            "input_tokens": 10, "output_tokens": 2, **kw}  # fmt: skip


def cloudevent(ce_id: str | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0", "id": ce_id or str(uuid.uuid4()), "source": "/services/checkout", "type": USAGE_TYPE,
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"), "datacontenttype": "application/json",
        "data": usage(), **kw,
    }  # fmt: skip


def post(api: RunningApi, body: Any, content_type: str, token: str | None, **headers: str) -> Any:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return call(api.port, "POST", "/v1/usage", json.dumps(body).encode(), Content_Type=content_type, **auth, **headers)


def test_cloudevents_structured_batch_and_binary_become_usage_events(api: RunningApi, broker: EmbeddedBroker):
    token = create_token(api.env, "--role", "ingest", "--team", "marketing")
    an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=250_000)  # within the lateness
    on_the_hour = an_hour_ago.replace(minute=0, second=0, microsecond=0)
    structured = cloudevent("order-42", time=an_hour_ago.isoformat().replace("+00:00", "Z"))
    assert post(api, structured, "application/cloudevents+json", None).status == 401  # same auth as JSON

    first = post(api, structured, "application/cloudevents+json; charset=utf-8", token)
    assert first.status == 202, first.body
    derived = first.json()["event_ids"][0]
    assert uuid.UUID(derived).version == 5
    again = post(api, structured, "application/cloudevents+json", token)  # a re-sent CloudEvent: the same id
    assert again.status == 202 and again.json()["event_ids"] == [derived]
    elsewhere = post(api, {**structured, "source": "/services/other"}, "application/cloudevents+json", token)
    assert elsewhere.json()["event_ids"] != [derived], "ids are unique per source, as CloudEvents defines"

    batch = [cloudevent(), cloudevent(data=usage(input_tokens=30)), cloudevent()]
    accepted = post(api, batch, "application/cloudevents-batch+json", token)
    assert accepted.status == 202 and accepted.json()["event_ids"] == [ce["id"] for ce in batch]  # UUID ids as is

    binary_id = str(uuid.uuid4())
    ce_time = on_the_hour.isoformat().replace("+00:00", "Z")
    binary = post(api, usage(input_tokens=7), "application/json", token, ce_specversion="1.0", ce_id=binary_id,
                  ce_source="/services/search", ce_type=USAGE_TYPE, ce_time=ce_time)  # fmt: skip
    assert binary.status == 202 and binary.json()["event_ids"] == [binary_id], binary.body

    published = {str(e["event_id"]): e for e in read_usage(broker.bootstrap, 7)}
    assert set(published) == {derived, elsewhere.json()["event_ids"][0], *(ce["id"] for ce in batch), binary_id}
    assert published[derived]["occurred_at"] == an_hour_ago
    assert published[binary_id]["occurred_at"] == on_the_hour
    assert (published[binary_id]["input_tokens"], published[batch[1]["id"]]["input_tokens"]) == (7, 30)
    assert published[derived]["team"] == "marketing"


def test_bad_cloudevents_are_refused_whole_naming_the_attribute(api: RunningApi, broker: EmbeddedBroker) -> None:
    token = create_token(api.env, "--role", "ingest", "--team", "marketing")
    future = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    cases = [
        (cloudevent(type="com.example.order.created"), "type"),
        ({k: v for k, v in cloudevent().items() if k != "source"}, "source"),
        (cloudevent(specversion="0.3"), "specversion"),
        (cloudevent(data="not an object"), "data"),
        (cloudevent(datacontenttype="text/plain"), "datacontenttype"),
        (cloudevent(datacontenttype="application/json; charset=latin-1"), "datacontenttype"),
        (cloudevent(data=usage(input_tokens=-5)), "data.input_tokens"),
        (cloudevent(data=usage(input_tokens=10**16)), "data.input_tokens"),  # the same bound as plain JSON
        (cloudevent(time=future), "time"),
        (cloudevent(data=usage(event_id=str(uuid.uuid4()))), "data.event_id"),
    ]
    for body, field in cases:
        reply = post(api, [cloudevent(), body], "application/cloudevents-batch+json", token)
        assert reply.status == 400, (field, reply.body)
        assert [(p["index"], p["field"]) for p in reply.json()["problems"]] == [(1, field)], reply.body
    other_team = post(api, cloudevent(data=usage(team="sales")), "application/cloudevents+json", token)
    assert other_team.status == 403 and other_team.json()["problems"][0]["field"] == "data.team"
    not_a_batch = post(api, cloudevent(), "application/cloudevents-batch+json", token)
    assert not_a_batch.status == 400 and "array" in not_a_batch.json()["problems"][0]["message"]
    too_many = post(api, [cloudevent() for _ in range(5001)], "application/cloudevents-batch+json", token)
    assert too_many.status == 413
    no_type = post(api, usage(), "application/json", token, ce_specversion="1.0", ce_id="x", ce_source="/s")
    assert no_type.status == 400 and no_type.json()["problems"][0]["field"] == "type"
    assert read_usage(broker.bootstrap, 1, timeout=2) == []  # nothing of a refused request was published
    # a media type with its charset (an attacker session found it refused)
    charset = cloudevent(datacontenttype="application/json; charset=utf-8")
    assert post(api, charset, "application/cloudevents+json", token).status == 202

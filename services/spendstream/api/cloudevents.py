"""CloudEvents 1.0 on ``POST /v1/usage``: a usage event wrapped as a CloudEvent becomes a plain usage event (pure).

Three modes of the CloudEvents HTTP binding:

* structured, ``Content-Type: application/cloudevents+json``: one CloudEvent, its ``data`` the usage event;
* batch, ``application/cloudevents-batch+json``: a JSON array of them;
* binary, ``application/json`` with ``ce-specversion``, ``ce-id``, ``ce-source``, ``ce-type`` (``ce-time``)
  headers: the body is the usage event itself.

``type`` must be ``io.spendstream.usage.v1``. ``time`` becomes ``occurred_at``. ``id`` becomes ``event_id``: as it
is when it is a UUID, else the UUID5 of ``source`` and ``id`` (the pair CloudEvents makes unique), so a re-sent
CloudEvent is counted once either way. A usage event that names its own ``event_id`` or ``occurred_at`` must agree.
Problems name the CloudEvent attribute (``id``, ``type``, ``data.input_tokens``) the client has to fix.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from spendstream.core.events import UsageEvent

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
USAGE_TYPE = "io.spendstream.usage.v1"
SPEC_VERSION = "1.0"
# UUID5 namespace of event ids derived from (source, id): fixed, so every API derives the same id.
EVENT_ID_NAMESPACE = uuid.UUID("4f5d3c1e-6a0b-5c27-9e8d-2b7f41a6c9d0")
_REQUIRED = ("specversion", "id", "source", "type")
# Where a usage-event field came from, for problems: the CloudEvent attribute the client wrote.
_ATTRIBUTE_OF = {"event_id": "id", "occurred_at": "time"}


class CloudEventProblem(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _is_json_media_type(value: object) -> bool:
    """``application/json``, with parameters as RFC 9110 allows (``; charset=utf-8``, the only charset JSON has)."""
    if not isinstance(value, str):
        return False
    media, *parameters = (part.strip().lower() for part in value.split(";"))
    return media == "application/json" and all(p.replace('"', "") in ("charset=utf-8", "") for p in parameters)


def is_cloudevents(content_type: str, headers: Mapping[str, str]) -> bool:
    return content_type in (STRUCTURED, BATCH) or "ce-specversion" in headers


def from_binary(headers: Mapping[str, str], body: Any) -> dict[str, Any]:
    """The structured form of a binary-mode request: ``ce-*`` headers are the attributes, the body the data."""
    attributes = {k.lower().removeprefix("ce-"): v for k, v in headers.items() if k.lower().startswith("ce-")}
    return {**attributes, "data": body}


def event_id(source: str, ce_id: str) -> str:
    try:
        return str(uuid.UUID(ce_id))
    except ValueError:
        return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{source}\n{ce_id}"))


def to_usage(cloudevent: Any) -> dict[str, Any]:
    """The usage event a CloudEvent carries; raises ``CloudEventProblem`` naming the attribute at fault."""
    if not isinstance(cloudevent, dict):
        raise CloudEventProblem("event", "a CloudEvent must be a JSON object")
    for name in _REQUIRED:
        if not isinstance(cloudevent.get(name), str) or not cloudevent[name]:
            raise CloudEventProblem(name, "required CloudEvents attribute (a non-empty string)")
    if cloudevent["specversion"] != SPEC_VERSION:
        raise CloudEventProblem("specversion", f"expected {SPEC_VERSION!r}, got {cloudevent['specversion']!r}")
    if cloudevent["type"] != USAGE_TYPE:
        raise CloudEventProblem("type", f"expected {USAGE_TYPE!r}, got {cloudevent['type']!r}")
    content_type = cloudevent.get("datacontenttype", "application/json")
    if not _is_json_media_type(content_type):
        raise CloudEventProblem(
            "datacontenttype", f"expected 'application/json' (charset utf-8, if any), got {content_type!r}"
        )
    if "data_base64" in cloudevent or not isinstance(cloudevent.get("data"), dict):
        raise CloudEventProblem("data", "must be the usage event as a JSON object")
    usage = dict(cloudevent["data"])
    derived = {"event_id": event_id(cloudevent["source"], cloudevent["id"])}
    if "time" in cloudevent:
        if not isinstance(cloudevent["time"], str):
            raise CloudEventProblem("time", "must be an RFC 3339 timestamp")
        derived["occurred_at"] = cloudevent["time"]
    for name, value in derived.items():
        if name in usage and not _same(name, usage[name], value):
            raise CloudEventProblem(f"data.{name}", f"differs from the CloudEvent's {_ATTRIBUTE_OF[name]} {value!r}")
        usage[name] = value
    return usage


def _same(name: str, given: Any, derived: str) -> bool:
    try:
        if name == "event_id":
            return uuid.UUID(str(given)) == uuid.UUID(derived)
        return datetime.fromisoformat(str(given).replace("Z", "+00:00")) == datetime.fromisoformat(
            derived.replace("Z", "+00:00")
        )
    except ValueError:
        return False


def attribute_of(field: str | None) -> str | None:
    """The CloudEvent attribute a usage-event problem is about (``input_tokens`` -> ``data.input_tokens``)."""
    head = (field or "").split(".")[0]
    if head in _ATTRIBUTE_OF:
        return _ATTRIBUTE_OF[head]
    return f"data.{field}" if head in UsageEvent.model_fields else field

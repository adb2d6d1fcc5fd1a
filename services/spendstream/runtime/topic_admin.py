"""Create the spendstream topics idempotently (``spendstream topics create``); tell whether a broker answers."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from spendstream.core.topics import topic_specs


def create_topics(
    kafka_config: dict[str, Any], usage_partitions: int, replication_factor: int = 1, timeout: float = 15.0
) -> dict[str, str]:
    """Create every missing topic; return ``{topic: "created" | "exists"}``.

    Existing topics are left as they are (their partition count is never changed here,
    since that would re-key attribution).
    """
    admin = AdminClient(kafka_config)
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(spec.name, spec.partitions, replication_factor, config=spec.config)
        for spec in topic_specs(usage_partitions)
        if spec.name not in existing
    ]
    outcome = {spec.name: "exists" for spec in topic_specs(usage_partitions) if spec.name in existing}
    if wanted:
        for name, future in admin.create_topics(wanted, operation_timeout=timeout).items():
            try:
                future.result(timeout)
                outcome[name] = "created"
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise
                outcome[name] = "exists"
    return outcome


class BrokerUnreachable(RuntimeError):
    """No broker answered at the configured address; the message names it and the setting."""


_SILENT = logging.getLogger("spendstream.broker_probe")
_SILENT.disabled = True  # librdkafka would otherwise print one error per reconnect attempt


def require_broker(kafka_config: dict[str, Any], timeout: float = 5.0) -> None:
    """Raise :class:`BrokerUnreachable` unless a broker at ``bootstrap.servers`` answers a metadata request.

    The probe is silent, so a command that needs the broker can say once, in one line, that there is none.
    """
    bootstrap = kafka_config.get("bootstrap.servers", "?")
    admin = AdminClient({**kafka_config, "logger": _SILENT, "error_cb": lambda _error: None})
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerUnreachable(
            f"no Kafka broker answers at {bootstrap} (SPENDSTREAM_KAFKA_BOOTSTRAP): {exc.args[0].str()}; "
            "start one (spendstream dev, or spendstream broker) or point SPENDSTREAM_KAFKA_BOOTSTRAP at it"
        ) from None

"""Create the spendstream topics idempotently (``spendstream topics create``)."""

from __future__ import annotations

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

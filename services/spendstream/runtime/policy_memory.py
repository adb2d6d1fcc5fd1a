"""The last applied policy survives a restart of the embedded stack.

The embedded broker is memory-only, so ``spendstream.policy`` starts empty on every ``spendstream dev``. While the
stack runs, ``PolicyRecorder`` keeps the newest valid record of the topic (its raw bytes) in
``<data dir>/policy-in-force.avro``; the next start publishes that record again (``republish_last_policy``) before
any service starts, so the processors resume under the policy that was in force, not the startup file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from spendstream.core.codec import AvroCodec
from spendstream.core.events import PolicyRecord
from spendstream.core.policy_log import LAST_POLICY_FILE, last_policy_recorded, read_policy_record
from spendstream.core.record_signature import RecordSigner, RecordVerifier, signature_headers
from spendstream.core.topics import POLICY


def republish_last_policy(
    kafka_conf: dict[str, Any], data_dir: Path, signer: RecordSigner | None = None
) -> PolicyRecord | None:
    """Publish the recorded policy record again, signed by ``signer`` (None if there is none, or it is not a valid
    policy)."""
    recorded = last_policy_recorded(data_dir)
    if recorded is None:
        return None
    value, record, _ = recorded
    producer = Producer(kafka_conf)
    key = record.name.encode()
    producer.produce(POLICY, value, key=key, headers=signature_headers(signer, POLICY, key, value))
    if producer.flush(15):
        raise RuntimeError(f"the broker did not confirm the restored policy {record.name}")
    return record


class PolicyRecorder(threading.Thread):
    """Follows ``spendstream.policy`` and writes the record in force to the data directory (atomically): the newest
    valid record by publication that ``verifier`` vouches for. A record every service refused (unsigned, or a
    replayed older one) must not come back, signed, at the next start."""

    def __init__(
        self,
        kafka_conf: dict[str, Any],
        data_dir: Path,
        verifier: RecordVerifier | None = None,
        on_change: Callable[[PolicyRecord], None] | None = None,
    ) -> None:
        super().__init__(name="policy-recorder", daemon=True)
        self.verifier = verifier
        self.on_change = on_change  # told of each policy put in force after the first one read
        self.kafka_conf = kafka_conf
        self.path = data_dir / LAST_POLICY_FILE
        self.stopping = threading.Event()

    def run(self) -> None:
        codec = AvroCodec("policy")
        consumer = Consumer({**self.kafka_conf, "group.id": "spendstream-policy-recorder", "enable.auto.commit": False})
        consumer.assign([TopicPartition(POLICY, 0, OFFSET_BEGINNING)])
        recorded: PolicyRecord | None = None
        try:
            while not self.stopping.is_set():
                message = consumer.poll(0.5)
                if message is None or message.error():
                    continue
                read = read_policy_record(codec, message, self.verifier, recorded)
                if read.outcome != "adopt":
                    continue
                if recorded is not None and self.on_change is not None and read.record is not None:
                    self.on_change(read.record)
                recorded = read.record
                partial = self.path.with_suffix(".tmp")
                partial.write_bytes(message.value())
                partial.replace(self.path)
        finally:
            consumer.close()

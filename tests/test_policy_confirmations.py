"""``policy apply``'s wait for the processors' confirmations, read from their heartbeats on a real broker."""

from __future__ import annotations

import threading
import time

from confluent_kafka import Producer

from spendstream.core.codec import AvroCodec
from spendstream.core.events import Heartbeat
from spendstream.core.policy_log import wait_for_confirmations
from spendstream.core.topics import ENFORCEMENT, HEARTBEAT_KEY_PREFIX
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics


def test_a_worker_that_exited_to_take_the_policy_is_gone_not_pending(broker: EmbeddedBroker) -> None:
    """A worker exits to take a policy with another timezone and starts again under another pid: its last heartbeat
    (the old version) made `policy apply` report it as pending and exit 3, though the new worker confirmed."""
    conf = {"bootstrap.servers": broker.bootstrap}
    create_topics(conf, usage_partitions=1)
    codec, producer = AvroCodec("heartbeat"), Producer(conf)

    def beat(worker: str, version: str) -> None:
        value = codec.encode(Heartbeat(worker=worker, policy_version=version, interval_s=0.5).to_avro())
        producer.produce(ENFORCEMENT, value, key=HEARTBEAT_KEY_PREFIX + worker.encode())
        producer.flush(5)

    stop = threading.Event()

    def restarted() -> None:
        time.sleep(0.5)  # the old worker's last beat, then the new one's, every interval
        beat("processor@1", "v1")
        while not stop.is_set():
            beat("processor@2", "v2")
            time.sleep(0.5)

    thread = threading.Thread(target=restarted)
    thread.start()
    try:
        result = wait_for_confirmations(conf, "v2", 8.0)
    finally:
        stop.set()
        thread.join()
    assert result.confirmed == ["processor@2"] and result.pending == {}

"""The seal on the processor's internal messages: only a holder of the signing key makes one that verifies, and only
for the usage topic it was made for."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from spendstream.core.record_signature import RecordSigner, write_key_pair
from spendstream.processor.internal_seal import SEAL_HEADER, InternalSeal, UnsealedLog, seal_headers, usage_epoch
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics


def test_a_seal_vouches_for_its_partition_value_and_usage_topic_only(tmp_path: Path) -> None:
    signer = RecordSigner.from_file(write_key_pair(tmp_path / "a")[0])
    seal = InternalSeal(signer, b"usage-topic-1")
    other = InternalSeal(RecordSigner.from_file(write_key_pair(tmp_path / "b")[0]), b"usage-topic-1")
    value = b'{"p":0,"at":1,"w":1,"s":{}}'
    headers = seal.headers(3, value)
    assert seal.vouches_for(3, value, headers)
    assert seal.vouches_for(3, value, dict(headers))  # faust may hand headers over as a mapping
    assert not seal.vouches_for(2, value, headers)  # replayed on another partition
    assert not seal.vouches_for(3, value + b" ", headers)
    assert not seal.vouches_for(3, value, [])
    assert not seal.vouches_for(3, value, None)
    assert not seal.vouches_for(3, None, headers)
    assert not seal.vouches_for(3, value, [(SEAL_HEADER, "text")])
    assert not other.vouches_for(3, value, headers)  # another key pair's processor
    # a total captured before the usage topic was recreated (a restart of the embedded broker: offsets from 0 again)
    # would outrank every total after it; an attacker session replayed one and the team's next events went uncounted
    assert not InternalSeal(signer, b"usage-topic-2").vouches_for(3, value, headers)
    assert seal_headers(None, 3, value) is None and seal_headers(seal, 3, value) == headers


def test_the_epoch_is_the_usage_topics_id_which_a_new_broker_gives_anew(tmp_path: Path) -> None:
    epochs = []
    for run in range(2):
        with EmbeddedBroker(log_path=tmp_path / f"broker{run}.log") as broker:
            conf = {"bootstrap.servers": broker.bootstrap}
            create_topics(conf, usage_partitions=2)
            epochs.append(usage_epoch(conf))
            assert usage_epoch(conf) == epochs[-1]  # every worker of a deployment reads the same
    assert all(epochs) and epochs[0] != epochs[1]


def test_a_flood_of_unsealed_messages_is_one_log_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Stage 2 logged every message it ignored: a client flooding the internal topic flooded the log and its disk."""
    clock = [1000.0]
    unsealed = UnsealedLog(interval_s=60.0, clock=lambda: clock[0])
    with caplog.at_level(logging.ERROR, logger="spendstream.processor.internal_seal"):
        for offset in range(10_000):
            unsealed.ignored_one(3, offset)
        assert len(caplog.records) == 1 and "ignored 1 message(s)" in caplog.records[0].getMessage()
        clock[0] += 61
        unsealed.ignored_one(3, 10_000)
    assert len(caplog.records) == 2
    assert "ignored 10000 message(s)" in caplog.records[1].getMessage()
    assert "partition 3 at offset 10000" in caplog.records[1].getMessage()

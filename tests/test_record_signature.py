"""Signed governing records: a client that may write to the broker cannot forge a decision, a heartbeat or a
policy that an edge or the processor applies."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from spendstream.core.codec import AvroCodec
from spendstream.core.config import ConfigError, load_settings
from spendstream.core.events import Decision, PolicyRecord
from spendstream.core.policy import parse_policy
from spendstream.core.policy_log import publish_policy, read_policy_log
from spendstream.core.record_signature import (
    SIGNATURE_HEADER,
    RecordSigner,
    RecordVerifier,
    SignatureKeyError,
    write_key_pair,
)
from spendstream.core.topics import ENFORCEMENT, POLICY
from spendstream.edge.enforcer import Enforcer
from spendstream.runtime.embedded_broker import EmbeddedBroker
from stub_upstream import publish_decisions, publish_heartbeat, wait_for


@pytest.fixture
def keys(tmp_path: Path) -> tuple[RecordSigner, RecordVerifier]:
    signing, verify = write_key_pair(tmp_path / "keys")
    return RecordSigner.from_file(signing), RecordVerifier.from_file(verify)


def test_a_signature_vouches_for_its_topic_key_and_value_only(keys: tuple[RecordSigner, RecordVerifier]) -> None:
    signer, verifier = keys
    headers = signer.headers(ENFORCEMENT, b"team:marketing", b"shutoff")
    assert verifier.verifies(ENFORCEMENT, b"team:marketing", b"shutoff", headers)
    assert not verifier.verifies(ENFORCEMENT, b"team:marketing", b"allow", headers)  # another value
    assert not verifier.verifies(ENFORCEMENT, b"team:sales", b"shutoff", headers)  # replayed under another key
    assert not verifier.verifies(POLICY, b"team:marketing", b"shutoff", headers)  # or on another topic
    assert not verifier.verifies(ENFORCEMENT, b"team:marketing", None, headers)  # a tombstone is not its value
    assert not verifier.verifies(ENFORCEMENT, b"team:marketing", b"shutoff", None)
    assert not verifier.verifies(ENFORCEMENT, b"team:marketing", b"shutoff", [(SIGNATURE_HEADER, b"\x00" * 64)])
    tombstone = signer.headers(ENFORCEMENT, b"team:marketing", None)
    assert verifier.verifies(ENFORCEMENT, b"team:marketing", None, tombstone)
    assert not verifier.verifies(ENFORCEMENT, b"team:marketing", b"", tombstone)  # empty value: not a tombstone


def test_another_key_pair_does_not_verify(keys: tuple[RecordSigner, RecordVerifier], tmp_path: Path) -> None:
    signer, _ = keys
    _, other = write_key_pair(tmp_path / "other")
    headers = signer.headers(ENFORCEMENT, b"k", b"v")
    assert not RecordVerifier.from_file(other).verifies(ENFORCEMENT, b"k", b"v", headers)


def test_the_private_key_is_readable_by_its_owner_only_and_bad_files_are_named(tmp_path: Path) -> None:
    signing, verify = write_key_pair(tmp_path)
    assert stat.S_IMODE(os.stat(signing).st_mode) == 0o600
    with pytest.raises(SignatureKeyError, match="Ed25519 private key"):
        RecordSigner.from_file(verify)  # the public key where the private one belongs
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(SignatureKeyError, match=r"junk\.pem"):
        RecordVerifier.from_file(tmp_path / "junk.pem")


def test_settings_find_the_data_directorys_keys_or_name_a_missing_file(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    assert settings.record_signer() is None and settings.record_verifier() is None
    write_key_pair(tmp_path)
    assert settings.record_signer() is not None and settings.record_verifier() is not None
    with pytest.raises(ConfigError, match="SPENDSTREAM_VERIFY_KEY: no such file"):
        load_settings(data_dir=tmp_path, verify_key=tmp_path / "missing.pem").record_verifier()


def test_an_edge_that_verifies_ignores_forged_decisions_tombstones_and_heartbeats(
    broker: EmbeddedBroker, keys: tuple[RecordSigner, RecordVerifier]
) -> None:
    """The attack: marketing is shut off; a client with write access to the topic publishes an ``allow`` with a
    version far ahead of the processor's, a tombstone of the scope and a heartbeat. None of it is applied; the
    processor's signed decisions still are."""
    signer, verifier = keys
    shutoff = Decision(scope="team:marketing", action="shutoff", version=5, reason="monthly budget spent")
    publish_decisions(broker.bootstrap, [shutoff], signer)
    with Enforcer(broker.bootstrap, verifier=verifier, policy_topic=None) as enforcer:
        assert enforcer.wait_ready(10)
        assert enforcer.check(team="marketing", model="gpt-4o").action == "shutoff"
        forged = Decision(scope="team:marketing", action="allow", version=5 + 10**15)
        publish_decisions(broker.bootstrap, [forged, ("team:marketing", None)])
        publish_heartbeat(broker.bootstrap)  # forged proof that a processor is alive
        assert wait_for(lambda: enforcer.stats["unsigned"] >= 3, 5)
        assert enforcer.check(team="marketing", model="gpt-4o").action == "shutoff"
        assert enforcer.staleness_s == float("inf")  # no processor has proven it is alive
        # the processor's own next decision (a lower version than the forgery) is applied
        publish_decisions(broker.bootstrap, [Decision(scope="team:marketing", action="allow", version=6)], signer)
        assert wait_for(lambda: enforcer.check(team="marketing", model="gpt-4o").action == "allow", 5)
        publish_heartbeat(broker.bootstrap, signer=signer)
        assert wait_for(lambda: enforcer.staleness_s < 5, 5)


def test_an_edge_without_a_verify_key_applies_what_it_reads(broker: EmbeddedBroker) -> None:
    """The behaviour without keys (the edge logs at start that it does not verify)."""
    publish_decisions(broker.bootstrap, [Decision(scope="team:marketing", action="shutoff", version=1)])
    with Enforcer(broker.bootstrap, policy_topic=None) as enforcer:
        assert enforcer.wait_ready(10)
        assert enforcer.check(team="marketing").action == "shutoff"


def test_a_policy_not_signed_is_not_the_policy_in_force(
    broker: EmbeddedBroker, keys: tuple[RecordSigner, RecordVerifier]
) -> None:
    signer, verifier = keys
    conf = {"bootstrap.servers": broker.bootstrap}
    signed = parse_policy("name: acme\nbudgets: [{scope: 'team:marketing', period: month, amount_usd: 100}]\n")
    publish_policy(conf, signed, signer=signer)
    # a policy without budgets, published by a client that may write to the topic but has no signing key
    forged = PolicyRecord(name="acme", version="forged", document=parse_policy("name: acme\n").to_json())
    producer = Producer(conf)
    producer.produce(POLICY, AvroCodec("policy").encode(forged.to_avro()), key=b"acme")
    assert producer.flush(10) == 0
    found = read_policy_log(conf, verifier=verifier)
    assert found.in_force is not None and found.in_force.policy.version == signed.version
    assert any("not signed" in problem for problem in found.rejected)
    unverified = read_policy_log(conf).in_force  # what a reader that does not verify adopts: no budgets at all
    assert unverified is not None and unverified.policy.version != signed.version and not unverified.policy.budgets

    with Enforcer(broker.bootstrap, verifier=verifier) as enforcer:
        assert enforcer.wait_ready(10)
        assert wait_for(lambda: enforcer.policy is not None, 5)
        time.sleep(0.5)  # the follower has read the forged record too
        assert enforcer.policy is not None and enforcer.policy.version == signed.version


def test_keygen_writes_a_pair_and_never_replaces_one_unasked(tmp_path: Path) -> None:
    import subprocess
    import sys

    def keygen(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SPENDSTREAM_DATA_DIR": str(tmp_path / "data")}
        command = [sys.executable, "-m", "spendstream.cli", "keygen", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    made = keygen(str(tmp_path / "signing"), "--public-dir", str(tmp_path / "verify"))
    assert made.returncode == 0, made.stderr
    signing, verify = tmp_path / "signing" / "signing-key.pem", tmp_path / "verify" / "verify-key.pem"
    signer, verifier = RecordSigner.from_file(signing), RecordVerifier.from_file(verify)
    assert verifier.verifies(POLICY, b"acme", b"v", signer.headers(POLICY, b"acme", b"v"))
    before = signing.read_bytes()
    again = keygen(str(tmp_path / "signing"), "--public-dir", str(tmp_path / "verify"))
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    kept = keygen(str(tmp_path / "signing"), "--public-dir", str(tmp_path / "verify"), "--keep")
    assert kept.returncode == 0 and signing.read_bytes() == before  # what provisioning runs at every start
    forced = keygen(str(tmp_path / "signing"), "--public-dir", str(tmp_path / "verify"), "--force")
    assert forced.returncode == 0 and signing.read_bytes() != before


def _republish(bootstrap: str, offset: int) -> None:
    """Publish the record at ``offset`` of the policy topic again, byte for byte, signature included."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "replay", "enable.auto.commit": False})
    consumer.assign([TopicPartition(POLICY, 0, OFFSET_BEGINNING)])
    try:
        while (message := consumer.poll(5)) is not None and message.offset() < offset:
            pass
        assert message is not None and message.offset() == offset
        producer = Producer({"bootstrap.servers": bootstrap})
        producer.produce(POLICY, message.value(), key=message.key(), headers=message.headers())
        assert producer.flush(10) == 0
    finally:
        consumer.close()


def _last_policy_value(bootstrap: str) -> bytes:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "last", "enable.auto.commit": False})
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(POLICY, 0), timeout=5)
        consumer.assign([TopicPartition(POLICY, 0, high - 1)])
        message = consumer.poll(5)
        assert message is not None
        return message.value()
    finally:
        consumer.close()


def test_a_replayed_older_signed_policy_is_not_put_back_in_force(
    broker: EmbeddedBroker, keys: tuple[RecordSigner, RecordVerifier]
) -> None:
    """A review replayed the first of two signed policies byte for byte: the newest record on the topic was in
    force, so the older policy (without the later hard cap) came back at once. The one published last is in force;
    the processor refuses the replay with an alert and publishes the record in force again, so compaction keeps
    it."""
    from datetime import timedelta

    from spendstream.processor.policy_in_force import PolicyFollower, PolicyHolder

    signer, verifier = keys
    conf = {"bootstrap.servers": broker.bootstrap}
    loose = parse_policy("name: acme\nbudgets: [{scope: 'team:marketing', period: month, amount_usd: 1000000}]\n")
    tight = parse_policy("name: acme\nbudgets: [{scope: 'team:marketing', period: month, amount_usd: 100}]\n")
    publish_policy(conf, loose, signer=signer)
    publish_policy(conf, tight, signer=signer)
    found = read_policy_log(conf, verifier=verifier)
    assert found.in_force is not None and found.in_force.policy.version == tight.version
    holder = PolicyHolder(tight, timedelta(days=1))
    processor = PolicyFollower(holder, conf, 1, found.next_offset, verifier, found.in_force)
    processor.start()
    try:
        with Enforcer(broker.bootstrap, verifier=verifier) as enforcer:
            assert enforcer.wait_ready(10) and wait_for(lambda: enforcer.policy is not None, 5)
            _republish(broker.bootstrap, 0)  # the loose policy again, validly signed
            assert wait_for(lambda: _last_policy_value(broker.bootstrap) == found.in_force.value, 10)
            time.sleep(0.5)
            assert enforcer.policy.version == tight.version and holder.policy.version == tight.version
        after = read_policy_log(conf, verifier=verifier)
        assert after.in_force is not None and after.in_force.policy.version == tight.version
    finally:
        processor.stopping.set()
        processor.join(10)


def test_dev_s_policy_memory_records_only_what_every_service_adopts(
    broker: EmbeddedBroker, keys: tuple[RecordSigner, RecordVerifier], tmp_path: Path
) -> None:
    """A review published an unsigned policy: every service refused it, but ``dev``'s memory of the policy in force
    recorded it, and the next start signed it and put it in force."""
    from spendstream.runtime.policy_memory import LAST_POLICY_FILE, PolicyRecorder

    signer, verifier = keys
    conf = {"bootstrap.servers": broker.bootstrap}
    announced: list[str] = []  # what dev's console says of a policy applied while it runs (a user session)
    recorder = PolicyRecorder(conf, tmp_path, verifier, lambda record: announced.append(record.version))
    recorder.start()
    try:
        genuine = parse_policy("name: acme\nbudgets: [{scope: 'team:marketing', period: month, amount_usd: 100}]\n")
        publish_policy(conf, genuine, signer=signer)
        memory = tmp_path / LAST_POLICY_FILE
        assert wait_for(memory.is_file, 10)
        recorded = memory.read_bytes()
        publish_policy(conf, parse_policy("name: acme\n"))  # unsigned
        _republish(broker.bootstrap, 0)  # the genuine one again: nothing newer
        time.sleep(1.5)
        assert memory.read_bytes() == recorded and announced == []  # the first one read is not news
        tighter = parse_policy("name: acme\nbudgets: [{scope: 'team:marketing', period: month, amount_usd: 50}]\n")
        publish_policy(conf, tighter, signer=signer)
        assert wait_for(lambda: announced == [tighter.version], 10)
    finally:
        recorder.stopping.set()
        recorder.join(10)


def _last_value(bootstrap: str, topic: str, key: bytes) -> bytes | None:
    """The value of ``key``'s last record on ``topic``: what compaction would keep."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "last-record", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    last = None
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=5)
        offset = 0
        while offset < high and (message := consumer.poll(5)) is not None:
            offset = message.offset() + 1
            if message.key() == key:
                last = message.value()
    finally:
        consumer.close()
    return last


def test_a_forged_replayed_or_deleted_decision_never_stays_the_last_record_of_its_scope(
    broker: EmbeddedBroker, keys: tuple[RecordSigner, RecordVerifier]
) -> None:
    """Compaction keeps a key's last record: a forged allow, a tombstone or an older signed decision replayed after
    marketing's shutoff would, once compacted, be all a restarted edge reads. The processor's guard publishes the
    shutoff again after each; a newer signed decision is in force from then on, and a restarted edge reads it."""
    from spendstream.processor.decision_guard import DecisionGuard

    signer, verifier = keys
    key = b"team:marketing"
    older = Decision(scope="team:marketing", action="allow", version=3)
    shutoff = Decision(scope="team:marketing", action="shutoff", version=5, reason="monthly budget spent")
    publish_decisions(broker.bootstrap, [older, shutoff], signer)
    publish_decisions(broker.bootstrap, [Decision(scope="team:marketing", action="allow", version=10**15)])
    shutoff_value = AvroCodec("decision").encode(shutoff.to_avro())
    guard = DecisionGuard({"bootstrap.servers": broker.bootstrap}, verifier)
    guard.start()  # a forgery already on the topic when it starts is answered once it has read the history
    try:
        assert wait_for(lambda: guard.restored == 1, 10)
        for displacing, signing in (([("team:marketing", None)], None), ([older], signer)):
            publish_decisions(broker.bootstrap, displacing, signing)
            assert wait_for(lambda: _last_value(broker.bootstrap, ENFORCEMENT, key) == shutoff_value, 10)
        assert guard.restored == 3
        lifted = Decision(scope="team:marketing", action="allow", version=6)
        publish_decisions(broker.bootstrap, [lifted], signer)
        time.sleep(1)
        assert guard.restored == 3 and guard.in_force[key].version == 6
        with Enforcer(broker.bootstrap, verifier=verifier, policy_topic=None) as enforcer:
            assert enforcer.wait_ready(10) and enforcer.check(team="marketing").action == "allow"
    finally:
        guard.stopping.set()
        guard.join(10)


def test_a_record_refused_under_the_name_of_the_policy_in_force_is_followed_by_it_again(
    broker: EmbeddedBroker, keys: tuple[RecordSigner, RecordVerifier]
) -> None:
    """An unsigned policy or a tombstone under the name of the policy in force is refused, but compaction would keep
    it and drop the policy: a processor restarted after that would enforce its seed file or no budget at all."""
    from datetime import timedelta

    from spendstream.processor.policy_in_force import PolicyFollower, PolicyHolder

    signer, verifier = keys
    conf = {"bootstrap.servers": broker.bootstrap}
    tight = parse_policy("name: acme\nbudgets: [{scope: 'team:marketing', period: month, amount_usd: 100}]\n")
    publish_policy(conf, tight, signer=signer)
    found = read_policy_log(conf, verifier=verifier)
    assert found.in_force is not None
    processor = PolicyFollower(
        PolicyHolder(tight, timedelta(days=1)), conf, 1, found.next_offset, verifier, found.in_force
    )
    processor.start()
    try:
        publish_policy(conf, parse_policy("name: acme\n"))  # unsigned, no budgets
        assert wait_for(lambda: _last_policy_value(broker.bootstrap) == found.in_force.value, 10)
        producer = Producer(conf)
        producer.produce(POLICY, None, key=b"acme")
        assert producer.flush(10) == 0
        assert wait_for(lambda: _last_policy_value(broker.bootstrap) == found.in_force.value, 10)
    finally:
        processor.stopping.set()
        processor.join(10)

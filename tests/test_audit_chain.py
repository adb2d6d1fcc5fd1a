"""The audit chain: intact chains verify; a modified, deleted, duplicated or truncated record is named."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.api.budget_requests import read_requests
from spendstream.core import topics
from spendstream.core.audit_chain import Break, ChainedRow, Head, Verified, verify_chain
from spendstream.core.budget_lifecycle import Kind, decide, new_request
from spendstream.core.codec import AvroCodec
from spendstream.core.config import Settings
from spendstream.core.events import Action, Alert, AlertKind, Decision, PolicyRecord, Severity
from spendstream.core.ledger_store import connect, migrate
from spendstream.core.policy import parse_policy
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics
from spendstream.sink.audit_sink import RESTORED_DECISION_S, AuditSink, restore_budget_requests, restore_decisions
from test_processor import TopicReader

records = st.lists(
    st.fixed_dictionaries(
        {"scope": st.text(max_size=8), "spend": st.integers(0, 2**63 - 1), "rate": st.floats(allow_nan=False)}
    ),
    min_size=1,
    max_size=12,
)


def chain(items: list[dict[str, Any]]) -> list[ChainedRow]:
    head, rows = Head(), []
    for i, record in enumerate(items):
        head, prev = head.next(record)
        rows.append(ChainedRow(head.position, f"r{i}", prev, head.hash, record))
    return rows


@settings(max_examples=100, deadline=None)
@given(records, st.data())
def test_any_modification_or_deletion_is_found_at_its_position(items: list[dict[str, Any]], data: Any) -> None:
    rows = chain(items)
    intact = verify_chain("s", rows, Head(rows[-1].position, rows[-1].record_hash))
    assert isinstance(intact, Verified) and intact.records == len(rows)
    i = data.draw(st.integers(0, len(rows) - 1))
    changed = {**rows[i].record, "spend": rows[i].record["spend"] ^ 1}
    forged = ChainedRow(rows[i].position, "x", rows[i].prev_hash, rows[i].record_hash, changed)
    tampered = [*rows[:i], forged, *rows[i + 1 :]]
    found = verify_chain("s", tampered)
    assert isinstance(found, Break) and found.position == i + 1 and "modified" in found.problem
    if i < len(rows) - 1:  # deleting the last record is a truncation: only an anchor shows it
        found = verify_chain("s", rows[:i] + rows[i + 1 :])
        assert isinstance(found, Break) and found.position == i + 1 and "missing" in found.problem


def test_a_truncated_or_rewritten_tail_needs_the_anchor() -> None:
    rows = chain([{"n": n} for n in range(5)])
    anchor = Head(5, rows[-1].record_hash)
    assert isinstance(verify_chain("s", rows[:3]), Verified)  # the chain alone cannot tell
    truncated = verify_chain("s", rows[:3], anchor)
    assert isinstance(truncated, Break) and "anchored head is gone" in truncated.problem
    rewritten = chain([{"n": n} for n in range(4)] + [{"n": 99}])
    found = verify_chain("s", rewritten, anchor)
    assert isinstance(found, Break) and "rewritten" in found.problem


def test_audit_verify_names_a_modified_and_a_deleted_record(settings: Settings, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    producer = Producer(settings.kafka_client_config())
    decision, alert, policy = AvroCodec("decision"), AvroCodec("alert"), AvroCodec("policy")
    for version in range(1, 5):
        d = Decision(scope="team:marketing", action=Action.shutoff, version=version, throttle_rps=0.5,
                     fallback_models={"gpt-4o": "gpt-4o-mini"}, critical_throttle_rps={"bot": 2.5},
                     expires_at=now + timedelta(days=1), reason=f"r{version}")  # fmt: skip
        producer.produce(topics.ENFORCEMENT, decision.encode(d.to_avro()), key=d.scope)
        a = Alert(scope="team:marketing", kind=AlertKind.threshold, severity=Severity.warning, message=f"m{version}")
        producer.produce(topics.ALERTS, alert.encode(a.to_avro()), key=a.scope)
    p = PolicyRecord(name="default", version="v1", document="{}", published_by="ops")
    producer.produce(topics.POLICY, policy.encode(p.to_avro()), key=b"default")
    request = new_request(Kind.increase, "team:marketing", "month", 10**12, now, now + timedelta(days=3), "dana",
                          "launch", now)  # fmt: skip
    for _ in range(2):  # as two processor workers would announce the same step: chained once
        producer.produce(topics.BUDGET_ADJUSTMENTS, request.to_json(), key=request.id.encode())
    assert producer.flush(10) == 0

    client = connect(settings)
    try:
        migrate(client, settings)
        sink = AuditSink(settings, client)
        seen = 0
        for _ in range(60):
            seen += sink.run_once(max_messages=1000, timeout=0.5)
            if seen >= 11:
                break
        sink.close()
        assert sink.counts == {"decisions": 4, "alerts": 4, "policy_versions": 1, "budget_events": 1, "rejected": 0}
    finally:
        client.close()

    def verify() -> subprocess.CompletedProcess[str]:
        env = {"SPENDSTREAM_DATA_DIR": str(settings.data_dir), "SPENDSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap}
        return subprocess.run([sys.executable, "-m", "spendstream.cli", "audit", "verify"], capture_output=True,
                              text=True, timeout=120, env={**_os_env(), **env})  # fmt: skip

    done = verify()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "decisions: 4 records, chain intact" in done.stdout and "anchors checked: 4" in done.stdout
    assert "budget_events: 1 records, chain intact" in done.stdout

    def tamper(sql: str) -> None:
        client = connect(settings)
        try:
            client.command(sql)
        finally:
            client.close()

    tamper(
        "ALTER TABLE spendstream.decisions UPDATE reason = 'within budget' WHERE version = 2 "
        "SETTINGS mutations_sync = 1"
    )
    done = verify()
    assert done.returncode == 1
    assert "decisions: broken at position 2 (record team:marketing/2): the record was modified" in done.stdout
    assert "alerts: 4 records, chain intact" in done.stdout

    tamper("ALTER TABLE spendstream.alerts DELETE WHERE message = 'm3' SETTINGS mutations_sync = 1")
    done = verify()
    assert "alerts: broken at position 3" in done.stdout and "record 3 is missing" in done.stdout

    tamper("ALTER TABLE spendstream.policy_versions DELETE WHERE 1 SETTINGS mutations_sync = 1")
    done = verify()  # the whole stream is gone: only its anchor tells
    assert "policy_versions: broken at position 1" in done.stdout and "anchored head is gone" in done.stdout


def _os_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_")}


def test_the_chain_resumes_from_the_ledger_after_a_restart(settings: Settings) -> None:
    producer = Producer(settings.kafka_client_config())
    codec = AvroCodec("alert")

    def send(n: int) -> None:
        for i in range(n):
            a = Alert(
                alert_id=uuid.uuid4(), scope="team:x", kind=AlertKind.quota, severity=Severity.info, message=str(i)
            )
            producer.produce(topics.ALERTS, codec.encode(a.to_avro()), key=a.scope)
        assert producer.flush(10) == 0

    client = connect(settings)
    try:
        migrate(client, settings)
        for batch in (3, 2):  # a second sink incarnation continues the chain it finds in the ledger
            send(batch)
            sink = AuditSink(settings, client)
            seen = 0
            for _ in range(60):
                seen += sink.run_once(max_messages=1000, timeout=0.5)
                if seen >= batch:
                    break
            sink.close()
        rows = client.query("SELECT chain_seq FROM spendstream.alerts ORDER BY chain_seq").result_rows
        assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    finally:
        client.close()


def audit_until(settings: Settings, client: Any, table: str, count: int) -> None:
    """Run an audit sink until it wrote ``count`` records to ``table`` (or 30 s passed)."""
    sink = AuditSink(settings, client)
    try:
        for _ in range(60):
            sink.run_once(timeout=0.5)
            if sink.counts[table] == count:
                return
    finally:
        sink.close()


def test_an_empty_broker_gets_the_budget_requests_back_from_the_ledger(settings: Settings) -> None:
    now = datetime.now(UTC)
    asked = new_request(Kind.overage, "team:sales", "month", 10**12, now, now + timedelta(days=3), "alice",
                        "push", now)  # fmt: skip
    approved = decide(asked, True, "vera", "vp", "ok", parse_policy("{}").approval_rules, now)
    producer = Producer(settings.kafka_client_config())
    for step in (asked, approved):
        producer.produce(topics.BUDGET_ADJUSTMENTS, step.to_json(), key=step.id.encode())
    assert producer.flush(10) == 0
    client = connect(settings)
    try:
        migrate(client, settings)
        audit_until(settings, client, "budget_events", 2)
        assert restore_budget_requests(settings, client) == 0  # the topic still holds them
        with EmbeddedBroker() as restarted:  # a memory-only broker starts empty
            create_topics({"bootstrap.servers": restarted.bootstrap}, usage_partitions=1)
            fresh = settings.model_copy(update={"kafka_bootstrap": restarted.bootstrap})
            assert restore_budget_requests(fresh, client) == 1
            assert read_requests(fresh.kafka_client_config()) == {approved.id: approved}
    finally:
        client.close()


def test_records_the_verify_key_does_not_vouch_for_stay_out_of_the_trail_and_are_never_restored(
    settings: Settings, tmp_path: Path
) -> None:
    """A review: an unsigned "approved" step, which the processor ignored, was chained into ``budget_events``; after
    a restart of the embedded stack the ledger's restore republished it signed, and the forged approval raised the
    budget. Unsigned decisions, policies and budget steps go to ``audit_rejects`` with the reason."""
    from spendstream.core.record_signature import RecordSigner, write_key_pair

    signing, _ = write_key_pair(tmp_path)
    keyed = settings.model_copy(update={"data_dir": tmp_path})
    signer = RecordSigner.from_file(signing)
    now = datetime.now(UTC)
    asked = new_request(Kind.overage, "team:sales", "month", 10**12, now, now + timedelta(days=3), "alice",
                        "push", now)  # fmt: skip
    forged = decide(asked, True, "mallory", "vp", "ok", parse_policy("{}").approval_rules, now)
    shutoff = Decision(scope="team:sales", action=Action.shutoff, version=5, expires_at=now + timedelta(days=1))
    lifted = Decision(scope="team:sales", action=Action.allow, version=10**15)
    producer = Producer(keyed.kafka_client_config())
    key, value = asked.id.encode(), asked.to_json()
    producer.produce(
        topics.BUDGET_ADJUSTMENTS, value, key=key, headers=signer.headers(topics.BUDGET_ADJUSTMENTS, key, value)
    )
    producer.produce(topics.BUDGET_ADJUSTMENTS, forged.to_json(), key=key)
    for decision, signing_key in ((shutoff, signer), (lifted, None)):
        key, value = decision.scope.encode(), AvroCodec("decision").encode(decision.to_avro())
        headers = signing_key.headers(topics.ENFORCEMENT, key, value) if signing_key else None
        producer.produce(topics.ENFORCEMENT, value, key=key, headers=headers)
    assert producer.flush(10) == 0
    client = connect(keyed)
    try:
        migrate(client, keyed)
        audit_until(keyed, client, "rejected", 2)
        rejects = client.query("SELECT topic, reason FROM spendstream.audit_rejects ORDER BY topic").result_rows
        assert [topic for topic, _ in rejects] == [topics.BUDGET_ADJUSTMENTS, topics.ENFORCEMENT]
        assert all("not signed" in reason for _, reason in rejects)
        with EmbeddedBroker() as restarted:
            create_topics({"bootstrap.servers": restarted.bootstrap}, usage_partitions=1)
            fresh = keyed.model_copy(update={"kafka_bootstrap": restarted.bootstrap})
            assert restore_budget_requests(fresh, client) == 1
            assert read_requests(fresh.kafka_client_config()) == {asked.id: asked}  # still only asked
            assert restore_decisions(fresh, client, now) == 1  # the shutoff, not the forged allow
    finally:
        client.close()


def test_an_empty_broker_gets_the_decisions_still_in_force_back_from_the_ledger(settings: Settings) -> None:
    """After a restart of the embedded stack a shut-off team, and a feature waiting for approval at $0, were served
    for the seconds until the processor had rebuilt its windows and decided again."""
    now = datetime.now(UTC)
    end = now + timedelta(days=3)
    steps = [
        Decision(scope="team:sales", action=Action.shutoff, version=1, expires_at=end),
        Decision(scope="feature:new", action=Action.shutoff, version=1, expires_at=end),
        Decision(scope="team:ops", action=Action.shutoff, version=1, expires_at=end),
        Decision(scope="team:ops", action=Action.allow, version=2),  # lifted: nothing to restore
        Decision(scope="team:old", action=Action.fallback, version=1, expires_at=now - timedelta(minutes=1)),
        Decision(scope="user:spiky", action=Action.throttle, version=1, throttle_rps=1.0),  # no end of its own
    ]
    codec = AvroCodec("decision")
    producer = Producer(settings.kafka_client_config())
    for decision in steps:
        producer.produce(topics.ENFORCEMENT, codec.encode(decision.to_avro()), key=decision.scope.encode())
    assert producer.flush(10) == 0
    client = connect(settings)
    try:
        migrate(client, settings)
        audit_until(settings, client, "decisions", len(steps))
        assert restore_decisions(settings, client, now) == 0  # the topic still holds them
        with EmbeddedBroker() as restarted:  # a memory-only broker starts empty
            create_topics({"bootstrap.servers": restarted.bootstrap}, usage_partitions=1)
            fresh = settings.model_copy(update={"kafka_bootstrap": restarted.bootstrap})
            assert restore_decisions(fresh, client, now) == 3
            reader = TopicReader(restarted.bootstrap, topics.ENFORCEMENT, "decision")
            try:
                reader.wait(lambda _: len(reader.records) == 3)
                restored = {d["scope"]: d for d in reader.records}
            finally:
                reader.close()
    finally:
        client.close()
    assert sorted(restored) == ["feature:new", "team:sales", "user:spiky"]
    assert [(restored[s]["action"], restored[s]["version"]) for s in sorted(restored)] == [("shutoff", 1)] * 2 + [
        ("throttle", 1)
    ]
    # each bridges the processor's rebuild, no longer: a restriction lifted meanwhile lapses on its own
    assert all(d["expires_at"] == now + RESTORED_DECISION_S for d in restored.values())


def test_audit_verify_without_a_broker_says_so_once(tmp_path: Path) -> None:
    """With the broker down the chains are still verified; stderr says once that no anchor could be read, rather
    than one librdkafka connection error per retry."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    env = {"SPENDSTREAM_DATA_DIR": str(tmp_path), "SPENDSTREAM_KAFKA_BOOTSTRAP": closed}
    ledger = Settings(**{"data_dir": tmp_path, "kafka_bootstrap": closed})
    client = connect(ledger)
    try:
        migrate(client, ledger)
    finally:
        client.close()
    done = subprocess.run([sys.executable, "-m", "spendstream.cli", "audit", "verify"], capture_output=True,
                          text=True, timeout=120, env={**_os_env(), **env})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "decisions: 0 records, chain intact" in done.stdout and "anchors checked: 0" in done.stdout
    assert done.stderr.splitlines() == [
        "spendstream audit verify: no anchors (broker: Failed to get watermark offsets: Local: All broker "
        "connections are down)"
    ]

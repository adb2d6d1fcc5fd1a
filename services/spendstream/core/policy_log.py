"""The policy in force, as every service agrees on it: the newest VALID record on ``spendstream.policy``.

A deployment has one policy in force, whatever its ``name`` (a label shown by ``policy show``, in logs and in
heartbeats). Processors follow it, the sink loads its budgets into the ledger, ``policy show`` prints it. A
record that does not validate is rejected (the processors raise a ``policy`` alert) and the one before it
stays in force. ``SPENDSTREAM_POLICY`` only seeds an empty topic: the first processor that finds no valid
record publishes that file (``seed_policy``).
"""

from __future__ import annotations

import getpass
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from spendstream.core.codec import AvroCodec, DecodeError
from spendstream.core.events import Heartbeat, PolicyRecord
from spendstream.core.policy import Policy, PolicyError, policy_from_json
from spendstream.core.record_signature import RecordSigner, RecordVerifier, signature_headers, vouched_for
from spendstream.core.topics import ENFORCEMENT, HEARTBEAT_KEY_PREFIX, POLICY

log = logging.getLogger(__name__)
# Why a record is not adopted as the policy when services verify what they adopt.
UNSIGNED = "is not signed with the signing key (SPENDSTREAM_SIGNING_KEY) that SPENDSTREAM_VERIFY_KEY pairs with"
# Where ``spendstream dev`` keeps the record in force across restarts of its memory-only broker (raw Avro bytes).
LAST_POLICY_FILE = "policy-in-force.avro"


def last_policy_recorded(data_dir: Path) -> tuple[bytes, PolicyRecord, Policy] | None:
    """The policy record ``spendstream dev`` recorded in ``data_dir`` as (its bytes, the record, the policy); None
    if there is none or it is not a valid policy. Only records the stack verified are recorded."""
    path = data_dir / LAST_POLICY_FILE
    if not path.is_file():
        return None
    value = path.read_bytes()
    try:
        record = PolicyRecord.from_avro(AvroCodec("policy").decode(value))
        return value, record, policy_from_json(record.document)
    except (DecodeError, ValueError, PolicyError):
        return None


@dataclass(frozen=True)
class PolicyInForce:
    policy: Policy
    record: PolicyRecord
    offset: int
    value: bytes = b""  # the message as published (republished verbatim after a replay: ``supersedes``)
    headers: tuple[tuple[str, bytes], ...] = ()


def supersedes(record: PolicyRecord, in_force: PolicyRecord | None) -> bool:
    """Whether ``record`` replaces the policy in force: it was published after it. Not its place on the topic: a
    signed record replayed later (an older policy, with bigger budgets) would otherwise be put back in force."""
    return in_force is None or record.published_at > in_force.published_at


@dataclass(frozen=True)
class PolicyRead:
    """What one message of ``spendstream.policy`` is to a reader whose record in force is given: ``adopt`` (it
    replaces it: ``policy`` is set), ``same`` (the record in force published again), ``replay`` (a valid record
    published before it), ``unsigned`` or ``invalid``; ``problem`` says why it is not adopted."""

    outcome: Literal["adopt", "same", "replay", "unsigned", "invalid"]
    record: PolicyRecord | None = None
    policy: Policy | None = None
    problem: str = ""

    def in_force(self, message: Any) -> PolicyInForce:
        """The adopted record as the policy in force (its message kept to publish it again after a replay)."""
        assert self.policy is not None and self.record is not None
        headers = tuple(message.headers() or ())
        return PolicyInForce(self.policy, self.record, message.offset(), message.value(), headers)


def read_policy_record(
    codec: AvroCodec, message: Any, verifier: RecordVerifier | None, in_force: PolicyRecord | None
) -> PolicyRead:
    """The one rule every reader of the policy topic applies: signed (where it verifies), valid, and published
    after the record in force (``supersedes``)."""
    if not vouched_for(verifier, POLICY, message):
        return PolicyRead("unsigned", problem=f"the policy record at offset {message.offset()} {UNSIGNED}")
    record, policy, problem = decode_policy(codec, message.value())
    if record is None or policy is None:
        return PolicyRead("invalid", record, problem=problem)
    if supersedes(record, in_force):
        return PolicyRead("adopt", record, policy)
    assert in_force is not None
    if record.published_at == in_force.published_at:
        return PolicyRead("same", record)
    return PolicyRead("replay", record, problem=replay_text(record, in_force))


def replay_text(record: PolicyRecord, in_force: PolicyRecord) -> str:
    return (
        f"policy {record.name} version {record.version} was published {record.published_at:%Y-%m-%d %H:%M:%S} UTC, "
        f"before the one in force ({in_force.version}, {in_force.published_at:%Y-%m-%d %H:%M:%S} UTC): a replay, "
        "not adopted"
    )


@dataclass
class PolicyLog:
    """What reading ``spendstream.policy`` to its end found."""

    in_force: PolicyInForce | None = None
    next_offset: int = 0  # where a follower continues
    rejected: list[str] = field(default_factory=list)  # why records newer than the one in force were refused


class PolicyLogUnreadable(RuntimeError):
    """``spendstream.policy`` could not be read to its end, so the policy in force is unknown."""


def decode_policy(codec: AvroCodec, value: bytes | None) -> tuple[PolicyRecord | None, Policy | None, str]:
    """``(record, policy, "")`` for a valid record, else what is wrong with it (record None if undecodable)."""
    try:
        record = PolicyRecord.from_avro(codec.decode(value or b""))
    except (DecodeError, ValueError) as exc:
        return None, None, f"undecodable policy record: {exc}"
    try:
        return record, policy_from_json(record.document), ""
    except PolicyError as exc:
        return record, None, f"policy {record.name} rejected: {exc}"


def read_policy_log(
    kafka_conf: dict[str, Any],
    registry_url: str | None = None,
    timeout: float = 10.0,
    verifier: RecordVerifier | None = None,
) -> PolicyLog:
    """Read ``spendstream.policy`` from the beginning to its end, without a consumer group; raises
    ``KafkaException`` or ``PolicyLogUnreadable`` when the broker does not let it. With a ``verifier``, a record
    not signed with its key pair is rejected like an invalid one."""
    codec = AvroCodec("policy", registry_url)
    consumer = Consumer({**kafka_conf, "group.id": "spendstream-policy-reader", "enable.auto.commit": False})
    log = PolicyLog()
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(POLICY, 0), timeout=timeout)
        if high <= 0:
            return log
        consumer.assign([TopicPartition(POLICY, 0, OFFSET_BEGINNING)])
        # Past the reported end too, until a poll finds nothing: some brokers report the last batch's base offset.
        while (message := consumer.poll(timeout if log.next_offset < high else 0.2)) is not None:
            if message.error():
                continue
            log.next_offset = message.offset() + 1
            read = read_policy_record(codec, message, verifier, log.in_force.record if log.in_force else None)
            if read.outcome == "adopt":
                log.in_force = read.in_force(message)
                log.rejected.clear()
            elif read.problem:
                log.rejected.append(read.problem)
        if log.next_offset < high:  # a partial read must not look like "no policy yet" (a seed would replace it)
            raise PolicyLogUnreadable(f"could not read {POLICY} to its end (offset {log.next_offset} of {high})")
        return log
    finally:
        consumer.close()


def publish_policy(
    kafka_conf: dict[str, Any], policy: Policy, registry_url: str | None = None, signer: RecordSigner | None = None
) -> PolicyRecord:
    """Publish ``policy`` as the policy in force (signed by ``signer``); raises ``RuntimeError`` if the broker does
    not confirm it."""
    record = PolicyRecord(name=policy.name, version=policy.version, document=policy.to_json(), published_by=_who())
    producer = Producer(kafka_conf)
    errors: list[str] = []
    key, value = policy.name.encode(), AvroCodec("policy", registry_url).encode(record.to_avro())
    producer.produce(
        POLICY,
        value,
        key=key,
        headers=signature_headers(signer, POLICY, key, value),
        on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
    )
    if producer.flush(15) or errors:
        raise RuntimeError(f"policy {policy.name} not published: {errors or 'the broker did not confirm it'}")
    return record


def seed_policy(
    kafka_conf: dict[str, Any],
    seed: Policy | None,
    default: Policy,
    registry_url: str | None = None,
    signer: RecordSigner | None = None,
    verifier: RecordVerifier | None = None,
) -> tuple[Policy, int, PolicyInForce | None]:
    """The policy a starting service enforces, the offset to follow the topic from and the record read (None for
    the seed or the default).

    The newest valid record wins; with none, ``seed`` (the ``SPENDSTREAM_POLICY`` file) is published so every
    service agrees on it; with no seed either, ``default`` (no budgets) applies until a policy is applied.
    """
    found = read_policy_log(kafka_conf, registry_url, verifier=verifier)
    if found.in_force is not None:
        return found.in_force.policy, found.next_offset, found.in_force
    unsigned = sum(UNSIGNED in problem for problem in found.rejected)
    if unsigned:  # keys added to a deployment whose policy was applied before: apply it again, signed
        log.error(
            "%s holds %d policy record(s) and none is signed with the key SPENDSTREAM_VERIFY_KEY pairs with; "
            "enforcing %s until a policy is applied with the signing key (`spendstream policy apply FILE`)",
            POLICY, unsigned, "the SPENDSTREAM_POLICY file" if seed is not None else "no budgets",
        )  # fmt: skip
    if seed is None:
        return default, found.next_offset, None
    publish_policy(kafka_conf, seed, registry_url, signer)  # the follower reads it back as the policy in force
    return seed, found.next_offset, None


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


@dataclass
class Confirmations:
    confirmed: list[str] = field(default_factory=list)  # workers whose newest heartbeat carries the version
    pending: dict[str, str] = field(default_factory=dict)  # other workers heard from -> the version they report


def wait_for_confirmations(kafka_conf: dict[str, Any], version: str, wait_s: float) -> Confirmations:
    """Listen to processor heartbeats for up to ``wait_s`` seconds: done early once some worker reports ``version``
    and every worker heard since (for at least two heartbeat intervals) does too. A worker silent for two of its
    intervals is gone, not pending: one that exits to take the policy (a new timezone: it restarts under another
    pid) beat once more before it went."""
    codec = AvroCodec("heartbeat")
    consumer = Consumer({**kafka_conf, "group.id": "spendstream-policy-confirm", "enable.auto.commit": False})
    started = time.time()
    latest: dict[str, str] = {}
    heard: dict[str, float] = {}  # worker -> when it is gone unless it beats again (epoch s)
    settle_s = 0.0
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(ENFORCEMENT, 0), timeout=10)
        consumer.assign([TopicPartition(ENFORCEMENT, 0, max(high - 1, 0))])
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for message in consumer.consume(100, timeout=0.2):
                key = message.key() or b""
                if message.error() or message.value() is None or not key.startswith(HEARTBEAT_KEY_PREFIX):
                    continue
                try:
                    beat = Heartbeat.from_avro(codec.decode(message.value()))
                except (DecodeError, ValueError):
                    continue
                if beat.issued_at.timestamp() < started - beat.interval_s:
                    continue  # from before this wait: maybe a worker that is gone
                latest[beat.worker] = beat.policy_version
                heard[beat.worker] = beat.issued_at.timestamp() + 2 * beat.interval_s
                settle_s = max(settle_s, 2 * beat.interval_s)
            for worker in [w for w, gone_at in heard.items() if gone_at < time.time() and latest[w] != version]:
                del latest[worker], heard[worker]
            agreed = latest and all(v == version for v in latest.values())
            if agreed and time.time() - started >= settle_s:
                break
    finally:
        consumer.close()
    return Confirmations(
        confirmed=sorted(w for w, v in latest.items() if v == version),
        pending={w: v for w, v in sorted(latest.items()) if v != version},
    )

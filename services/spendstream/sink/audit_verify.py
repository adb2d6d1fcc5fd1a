"""``spendstream audit verify``: replay every audit chain of the ledger against its anchors (``core.audit_chain``).

The anchors (each stream's newest head on ``spendstream.audit.heads``) are read BEFORE the ledger: the sink publishes
a head only after its rows landed, so every anchor read is covered by the ledger read that follows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from spendstream.core.audit_chain import Break, ChainedRow, Head, Verified, verify_chain
from spendstream.core.config import Settings
from spendstream.core.topics import AUDIT_HEADS
from spendstream.sink.audit_sink import CHAIN_COLUMNS, Stream, audit_streams


def read_anchors(kafka_conf: dict[str, Any], timeout: float = 5.0) -> dict[str, Head]:
    """The newest anchored head of each stream; empty if the topic holds none."""
    # librdkafka's level 2 (critical) and below: an unreachable broker is said once, by the caller, not by one
    # connection-refused line per retry.
    quiet = {"log_level": 2}
    consumer = Consumer({**kafka_conf, **quiet, "group.id": "spendstream-audit-verify", "enable.auto.commit": False})
    anchors: dict[str, Head] = {}
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(AUDIT_HEADS, 0), timeout=timeout)
        if high <= 0:
            return anchors
        consumer.assign([TopicPartition(AUDIT_HEADS, 0, OFFSET_BEGINNING)])
        position, deadline = 0, time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = consumer.poll(0.3)
            if message is None:
                if position >= high:  # at the reported end and nothing more comes
                    break
                continue
            if message.error() or message.value() is None:
                continue
            position = message.offset() + 1
            head = json.loads(message.value())
            anchors[head["stream"]] = Head(int(head["position"]), str(head["hash"]))
        return anchors
    finally:
        consumer.close()


def verify_ledger(client: Any, db: str, anchors: dict[str, Head]) -> list[Verified | Break]:
    out: list[Verified | Break] = []
    for stream in audit_streams().values():
        result = client.query(
            f"SELECT {', '.join(stream.columns + CHAIN_COLUMNS)} FROM {db}.{stream.table} "
            "WHERE record_hash != '' ORDER BY chain_seq"
        )
        width = len(stream.columns)

        def rows(result: Any = result, stream: Stream = stream, width: int = width) -> Any:
            for values in result.result_rows:
                record = dict(zip(stream.columns, values[:width], strict=True))
                position, prev_hash, record_hash = values[width:]
                yield ChainedRow(position, stream.record_id(record), prev_hash, record_hash, record)

        out.append(verify_chain(stream.table, rows(), anchors.get(stream.table)))
    return out


def report(results: list[Verified | Break], anchored: int) -> tuple[int, str]:
    lines = []
    for result in results:
        if isinstance(result, Break):
            lines.append(str(result))
        else:
            head = f"head {result.head.position} {result.head.hash[:16]}" if result.records else "empty"
            lines.append(f"{result.stream}: {result.records} records, chain intact, {head}")
    lines.append(
        f"anchors checked: {anchored} (without an anchor, records removed from the end of a chain cannot be told)"
    )
    return (1 if any(isinstance(r, Break) for r in results) else 0), "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    audit = subparsers.add_parser("audit", help="check the tamper-evident audit trail of the ledger")
    actions = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = actions.add_parser("verify", help="prove every audit chain intact or name its first broken record")
    verify.set_defaults(handler=run_verify)


def run_verify(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.analytics.commands import LedgerBusy, _open

    try:
        anchors = read_anchors(settings.kafka_client_config())
    except KafkaException as exc:
        print(f"spendstream audit verify: no anchors (broker: {exc.args[0].str()})", file=sys.stderr)
        anchors = {}
    try:
        client = _open(settings)
    except LedgerBusy:
        return _verify_through_api(settings)
    try:
        code, text = report(verify_ledger(client, settings.clickhouse_database, anchors), len(anchors))
    finally:
        client.close()
    print(text)
    return code


def _verify_through_api(settings: Settings) -> int:
    """The embedded ledger belongs to a running sink: ask the API it serves (``GET /v1/audit/verify``)."""
    import urllib.error
    import urllib.request

    from spendstream.core.api_address import read_address

    address = read_address(settings.api_address_path)
    if address is None:
        print(f"spendstream audit verify: the ledger {settings.ledger_dsn} is in use and no API serves it",
              file=sys.stderr)  # fmt: skip
        return 1
    call = urllib.request.Request(
        f"{address.url}/v1/audit/verify", headers={"Authorization": f"Bearer {address.read_token}"}
    )
    try:
        with urllib.request.urlopen(call, timeout=300) as response:
            body = json.load(response)
    except (urllib.error.URLError, OSError) as exc:
        print(f"spendstream audit verify: the API at {address.url} did not answer: {exc}", file=sys.stderr)
        return 1
    print(body["report"])
    return int(body["code"])

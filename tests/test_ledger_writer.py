"""The sink's parts without a broker: decode and staging into a ledger writer, on a real chDB ledger."""

from __future__ import annotations

import uuid
from typing import Any

from spendstream.core.codec import SINGLE_OBJECT_MAGIC, fingerprint
from spendstream.core.config import Settings, load_settings
from spendstream.sink.decode import UsageDecoder, columns_of
from spendstream.sink.ledger_writer import EmbeddedLedgerWriter, ServerLedgerWriter, ledger_writer_for
from spendstream.sink.staging import AvroGroup, split_by_writer
from test_avro_block import CURRENT, NOW, SKEW, arrivals, base_record, encode

TABLE = "spendstream.usage_ledger"
VERSIONS = {SINGLE_OBJECT_MAGIC + fingerprint(CURRENT.name): CURRENT}


def ledger_rows(client: Any) -> dict[str, int]:
    rows = client.query(f"SELECT toString(event_id), cost_nanos FROM {TABLE} ORDER BY event_id").result_rows
    return dict(rows)


def record(cost: int, **fields: Any) -> dict[str, Any]:
    return base_record(event_id=str(uuid.uuid4()), cost_nanos=cost, **fields)


def test_each_client_kind_gets_its_own_writer(offline_settings: Settings) -> None:
    embedded = ledger_writer_for(offline_settings, client=None)
    server = ledger_writer_for(load_settings(clickhouse_dsn="http://default:@localhost:8123"), client=None)
    assert isinstance(embedded, EmbeddedLedgerWriter)
    assert embedded.staging == "spendstream.usage_sink_staging"
    assert isinstance(server, ServerLedgerWriter)
    other = ServerLedgerWriter(None, "spendstream")
    assert server.staging.startswith("spendstream.usage_sink_staging_") and server.staging != other.staging


def test_a_staged_group_lands_without_its_rejected_rows_and_without_copies_the_ledger_holds(ledger: Any) -> None:
    writer = EmbeddedLedgerWriter(ledger, "spendstream")
    writer.open(staged=True)
    held, fresh, bad = record(100), record(200), record(300, input_tokens=-1)
    writer.insert_rows(columns_of(UsageDecoder(SKEW).decode([encode(held)], NOW).records), "held")
    conflicting_copy = {**held, "cost_nanos": 999}
    values = [encode(conflicting_copy), encode(fresh), encode(bad), encode(fresh)]
    groups, others = split_by_writer(values, VERSIONS)
    assert others == [] and list(groups.values()) == [[0, 1, 2, 3]]
    group = AvroGroup.of(CURRENT, values, [0, 1, 2, 3], arrivals(values))

    judged = writer.judge(group, NOW, SKEW)

    assert judged is not None and judged.exact == set()
    assert judged.rejected == {2: "input_tokens is negative: -1"}
    superseded = writer.insert_staged(len(values), set(judged.rejected), "batch-1")
    assert superseded == 2  # the copy of an event the ledger holds, and the second copy of `fresh` in the group
    assert ledger_rows(ledger) == {held["event_id"]: 100, fresh["event_id"]: 200}  # first version wins
    writer.close()
    assert ledger.query("EXISTS TABLE spendstream.usage_sink_staging").result_rows == [(0,)]


def test_rows_decoded_in_python_keep_the_first_version_and_a_retry_writes_nothing(ledger: Any) -> None:
    writer = ServerLedgerWriter(ledger, "spendstream")  # the server kind works on any clickhouse-connect client
    writer.open(staged=False)
    first, later_first = record(100), record(7)
    decoder = UsageDecoder(SKEW)
    values = [encode(first), encode({**first, "cost_nanos": 5}), b"junk", encode(later_first)]
    decoded = decoder.decode(values, NOW)
    assert decoded.kept == [0, 1, 3] and [r.stage for r in decoded.rejected] == ["decode"]

    assert writer.insert_rows(columns_of(decoded.records), "batch-2") == 1
    assert writer.insert_rows(columns_of(decoded.records), "batch-2") == 3  # a replay: every row is already held
    assert ledger_rows(ledger) == {first["event_id"]: 100, later_first["event_id"]: 7}


def test_unpriced_records_are_priced_while_decoding() -> None:
    unpriced = record(0) | {"cost_nanos": None}
    decoded = UsageDecoder(SKEW).decode([encode(unpriced)], NOW)
    assert decoded.rejected == [] and decoded.records[0]["cost_nanos"] > 0


def team_rows(client: Any) -> set[tuple[str, str, int]]:
    return set(client.query(f"SELECT team, toString(event_id), cost_nanos FROM {TABLE}").result_rows)


def test_a_copy_under_another_team_in_the_same_staged_group_lands_as_that_teams_own_row(ledger: Any) -> None:
    """The ledger's key is (org, team, day, event_id): one team's event never decides whether another's row lands,
    even when both arrive in one batch (a team-scoped token must not be able to erase another team's spend)."""
    writer = EmbeddedLedgerWriter(ledger, "spendstream")
    writer.open(staged=True)
    sales = record(5_000_000_000, team="sales")
    marketing = {**sales, "team": "marketing", "cost_nanos": 1}
    values = [encode(marketing), encode(sales), encode({**sales, "cost_nanos": 2})]
    group = AvroGroup.of(CURRENT, values, [0, 1, 2], arrivals(values))
    judged = writer.judge(group, NOW, SKEW)
    assert judged is not None and judged.rejected == {}

    assert writer.insert_staged(len(values), set(), "batch-teams") == 1  # only sales' own later copy
    event_id = sales["event_id"]
    assert team_rows(ledger) == {("marketing", event_id, 1), ("sales", event_id, 5_000_000_000)}
    writer.close()


def test_a_copy_under_another_team_decoded_in_python_lands_as_that_teams_own_row(ledger: Any) -> None:
    writer = ServerLedgerWriter(ledger, "spendstream")
    writer.open(staged=False)
    sales = record(5_000_000_000, team="sales")
    marketing = {**sales, "team": "marketing", "cost_nanos": 1}
    decoded = UsageDecoder(SKEW).decode([encode(marketing), encode(sales), encode({**sales, "cost_nanos": 2})], NOW)

    assert writer.insert_rows(columns_of(decoded.records), "batch-teams") == 1
    event_id = sales["event_id"]
    assert team_rows(ledger) == {("marketing", event_id, 1), ("sales", event_id, 5_000_000_000)}


DAY_US = 86_400_000_000


def test_a_copy_naming_another_day_is_the_same_event_in_a_staged_group_and_across_batches(ledger: Any) -> None:
    """A client that stamps ``occurred_at`` when it sends re-sends an event across midnight UTC with another day:
    the ledger's sorting key has the day, so it was a second row and every report counted the call twice."""
    writer = EmbeddedLedgerWriter(ledger, "spendstream")
    writer.open(staged=True)
    held, fresh = record(100), record(200)
    writer.insert_rows(columns_of(UsageDecoder(SKEW).decode([encode(held)], NOW).records), "held")
    values = [
        encode({**held, "occurred_at": held["occurred_at"] - DAY_US}),  # the ledger holds it under another day
        encode(fresh),
        encode({**fresh, "occurred_at": fresh["occurred_at"] - 2 * DAY_US, "cost_nanos": 201}),  # a later copy
    ]
    group = AvroGroup.of(CURRENT, values, [0, 1, 2], arrivals(values))
    judged = writer.judge(group, NOW, SKEW)
    assert judged is not None and judged.rejected == {}

    assert writer.insert_staged(len(values), set(), "batch-days") == 2
    assert ledger_rows(ledger) == {held["event_id"]: 100, fresh["event_id"]: 200}
    writer.close()


def test_a_copy_naming_another_day_decoded_in_python_is_the_same_event(ledger: Any) -> None:
    writer = ServerLedgerWriter(ledger, "spendstream")
    writer.open(staged=False)
    held, fresh = record(100), record(200)
    decoder = UsageDecoder(SKEW)
    writer.insert_rows(columns_of(decoder.decode([encode(held)], NOW).records), "held")
    copies = [
        encode({**held, "occurred_at": held["occurred_at"] - DAY_US, "cost_nanos": 5}),
        encode(fresh),
        encode({**fresh, "occurred_at": fresh["occurred_at"] - DAY_US}),
    ]

    assert writer.insert_rows(columns_of(decoder.decode(copies, NOW).records), "batch-days") == 2
    assert ledger_rows(ledger) == {held["event_id"]: 100, fresh["event_id"]: 200}


def test_the_index_migration_copies_the_ids_a_ledger_already_holds(ledger: Any, offline_settings: Settings) -> None:
    from spendstream.core.ledger_store import migrations

    writer = ServerLedgerWriter(ledger, "spendstream")
    writer.open(staged=False)
    held = record(100)
    decoder = UsageDecoder(SKEW)
    writer.insert_rows(columns_of(decoder.decode([encode(held)], NOW).records), "held")
    ledger.command("DROP VIEW spendstream.ledger_event_ids_mv")  # the ledger as it was before the migration
    ledger.command("DROP TABLE spendstream.ledger_event_ids")
    index = next(m for m in migrations(offline_settings) if m.name.endswith("_ledger_event_ids"))
    for statement in index.statements:
        ledger.command(statement)

    copy = encode({**held, "occurred_at": held["occurred_at"] - DAY_US})
    assert writer.insert_rows(columns_of(decoder.decode([copy], NOW).records), "after") == 1
    assert ledger_rows(ledger) == {held["event_id"]: 100}


def test_an_event_whose_ledger_row_was_deleted_lands_again(ledger: Any) -> None:
    """``ledger_event_ids`` only names candidates: the ledger's own key decides (an operator who deleted a bad
    import with ``sql --write`` can post it again)."""
    writer = EmbeddedLedgerWriter(ledger, "spendstream")
    writer.open(staged=True)
    event = record(100)
    decoder = UsageDecoder(SKEW)
    writer.insert_rows(columns_of(decoder.decode([encode(event)], NOW).records), "first")
    ledger.command(f"DELETE FROM {TABLE} WHERE event_id = '{event['event_id']}'")
    assert ledger_rows(ledger) == {}

    values = [encode({**event, "cost_nanos": 300})]
    judged = writer.judge(AvroGroup.of(CURRENT, values, [0], arrivals(values)), NOW, SKEW)
    assert judged is not None and judged.rejected == {}
    assert writer.insert_staged(1, set(), "again") == 0
    assert ledger_rows(ledger) == {event["event_id"]: 300}
    writer.close()


def test_each_row_records_when_its_message_reached_the_broker(ledger: Any) -> None:
    """``arrived_at`` (the Kafka timestamp stage 1 judges lateness by), on the staged path and the Python path: a
    rebuild of the budgets from the ledger leaves out what arrived later than the allowed lateness, as stage 1 did."""
    writer = EmbeddedLedgerWriter(ledger, "spendstream")
    writer.open(staged=True)
    staged, decoded = record(1), record(2)
    arrived = [1_700_000_000_123, 1_700_000_000_456]
    judged = writer.judge(AvroGroup.of(CURRENT, [encode(staged)], [0], arrived[:1]), NOW, SKEW)
    assert judged is not None and judged.rejected == {}
    writer.insert_staged(1, set(), "staged")
    writer.insert_rows(columns_of(UsageDecoder(SKEW).decode([encode(decoded)], NOW, arrived[1:]).records), "python")
    rows = ledger.query(f"SELECT toString(event_id), toUnixTimestamp64Milli(arrived_at) FROM {TABLE}").result_rows
    assert dict(rows) == {staged["event_id"]: arrived[0], decoded["event_id"]: arrived[1]}
    writer.close()

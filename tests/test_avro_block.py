"""ClickHouse reading Avro containers and validating in SQL agrees with the Python path, value for value."""

from __future__ import annotations

import io
import re
import unicodedata
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from spendstream.core.attribution import ATTRIBUTION_FIELDS
from spendstream.core.codec import SINGLE_OBJECT_MAGIC, AvroCodec, fingerprint
from spendstream.core.events import usage_record_problem
from spendstream.core.schemas import history_versions, load_schema_json, parsed_schema
from spendstream.sink.avro_block import ARRIVAL_FIELD, ROW_FIELD, SQL_TIME_RANGE, staging_columns, zigzag_varint
from spendstream.sink.decode import UsageDecoder, micros
from spendstream.sink.staging import AvroGroup, Judged, WriterVersion, create_staging, judge_group, split_by_writer

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SKEW = timedelta(minutes=5)
ARRIVED_MS = micros(NOW) // 1000  # when a test's messages reached the broker


def arrivals(values: list[bytes]) -> list[int]:
    return [ARRIVED_MS] * len(values)


V1 = history_versions("usage_event")[0]
CURRENT = WriterVersion.of("usage_event")
OLD = WriterVersion.of(V1)
STAGING = "spendstream.usage_sink_staging"
CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
LONGS = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens", "latency_ms", "occurred_at")


def encode(record: dict[str, Any], name: str = "usage_event") -> bytes:
    """Single-object encode a raw record (no logical types checked), as a broken edge might."""
    buf = io.BytesIO()
    buf.write(SINGLE_OBJECT_MAGIC + fingerprint(name))
    fields = {f["name"] for f in load_schema_json(name)["fields"]}
    fastavro.schemaless_writer(buf, parsed_schema(name), {k: v for k, v in record.items() if k in fields})
    return buf.getvalue()


def base_record(**fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event_id": "0e6a4c1e-5b8f-4d0a-9c1e-3f2a1b0c9d8e",
        "occurred_at": micros(NOW) - 1,
        "org": "acme",
        "division": "",
        "team": "search",
        "project": "",
        "feature": "",
        "user": "",
        "customer": "",
        "environment": "",
        "tags": {},
        "provider": "openai",
        "model_requested": "gpt-4o",
        "model_served": "",
        "input_tokens": 10,
        "output_tokens": 5,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "cost_nanos": 750,
        "price_source": "",
        "latency_ms": 3,
        "status": "ok",
        "decision_applied": "",
        "cache_hit": False,
    }
    return {**record, **fields}


@pytest.fixture
def client(ledger: Any) -> Iterator[Any]:
    create_staging(ledger, STAGING)
    yield ledger


def staged_rows(client: Any) -> list[dict[str, Any]]:
    result = client.query(f"SELECT * FROM {STAGING} ORDER BY {ROW_FIELD}")
    return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]


# -- pure framing -------------------------------------------------------------------------------


@given(st.integers(-(2**63), 2**63 - 1))
def test_zigzag_varint_is_avros_long_encoding(n: int) -> None:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, "long", n)
    assert zigzag_varint(n) == buf.getvalue()


@pytest.mark.parametrize("version", [CURRENT, OLD], ids=["current", "v1"])
def test_container_is_a_valid_avro_file_of_the_bodies_their_positions_and_arrivals(version: WriterVersion) -> None:
    records = [base_record(team=f"t{i}", tags={"k": "é" * i}, input_tokens=i * 1000) for i in range(300)]
    values = [encode(r, version.name) for r in records]
    arrived = [ARRIVED_MS + i * 7 for i in range(300)]
    reader = fastavro.reader(io.BytesIO(version.container.container(values, arrived)))
    codec = AvroCodec("usage_event")
    read = list(reader)
    assert [int.from_bytes(r.pop(ROW_FIELD), "little") for r in read] == list(range(300))
    assert [int.from_bytes(r.pop(ARRIVAL_FIELD), "little", signed=True) for r in read] == arrived
    assert [r.pop("_framing") for r in read] == [v[:10] for v in values]
    reference = [codec.decode(v) for v in values]
    for got, want in zip(read, reference, strict=True):
        assert got == {name: want[name] for name in got}


def test_split_by_writer_groups_known_fingerprints_and_leaves_the_rest() -> None:
    versions = {SINGLE_OBJECT_MAGIC + fingerprint(v.name): v for v in (CURRENT, OLD)}
    current, old = encode(base_record()), encode(base_record(), V1)
    values = [current, b"junk", old, None, current, b"", SINGLE_OBJECT_MAGIC + b"\x00" * 8 + current[10:], old]
    groups, others = split_by_writer(values, versions)
    assert groups == {current[:10]: [0, 4], old[:10]: [2, 7]}
    assert others == [1, 3, 5, 6]


def test_every_kept_schema_version_has_staging_columns() -> None:
    names = {name for name, _ in staging_columns(load_schema_json("usage_event"))}
    for old in history_versions("usage_event"):
        assert {f["name"] for f in load_schema_json(old)["fields"]} <= names


# -- SQL verdicts against the Python path -----------------------------------------------------

texts = st.text(max_size=6)
# names: short ones, the template value "*", and lengths about the 256-character limit (in characters, not bytes)
names = st.one_of(
    texts, st.just("*"), st.integers(250, 260).flatmap(lambda n: st.sampled_from(["x" * n, "é" * n, "*" + "y" * n]))
)
int64 = st.integers(-(2**63), 2**63 - 1)
records = st.fixed_dictionaries(
    {
        "event_id": st.one_of(
            st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()), st.uuids().map(lambda u: u.hex), texts
        ),
        "occurred_at": st.one_of(
            st.integers(micros(NOW) - 10**12, micros(NOW) + 10**9),
            st.integers(micros(datetime(1, 1, 1, tzinfo=UTC)), micros(datetime(9999, 12, 31, tzinfo=UTC))),
        ),
        "org": texts,
        "division": st.just(""),
        "team": names,
        "project": st.just("p"),
        "feature": names,
        "user": st.just(""),
        "customer": names,
        "environment": st.just(""),
        "tags": st.dictionaries(texts, texts, max_size=3),
        "provider": st.sampled_from(["", "openai"]),
        "model_requested": st.one_of(st.sampled_from(["", "gpt-4o", "ü"]), names),
        "model_served": names,
        "input_tokens": st.one_of(st.integers(-3, 1000), int64),
        "output_tokens": st.one_of(st.integers(-3, 1000), int64),
        "cached_input_tokens": st.one_of(st.integers(-3, 600), int64),
        "cache_write_tokens": st.one_of(st.integers(-3, 600), int64),
        "cost_nanos": st.one_of(st.none(), st.integers(-5, 10**12), int64),
        "price_source": texts,
        "latency_ms": st.integers(-3, 10**5),
        "status": st.sampled_from(["ok", "error", "blocked"]),
        "decision_applied": texts,
        "cache_hit": st.booleans(),
    }
)
low, high = (micros(moment) for moment in SQL_TIME_RANGE)


_SEPARATORS = "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"


def unplain(value: str) -> bool:
    """What SQL leaves to Python among names (``avro_block._UNPLAIN_NAME_RE`` and the NFC check)."""
    edge = bool(value) and (value[0] in " \t\n\v\f\r" or value[-1] in " \t\n\v\f\r")
    odd = any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") for c in value)
    return edge or odd or any(c in _SEPARATORS for c in value) or not unicodedata.is_normalized("NFC", value)


def sql_leaves_to_python(record: dict[str, Any], skew: timedelta) -> bool:
    """What SQL is designed not to judge, for records a correct writer produced, plus valid unpriced rows and rows
    whose names Python judges (SQL's earlier checks reject first, as Python's do)."""
    huge = any(not -(2**62) <= record[name] < 2**62 for name in LONGS)
    huge = huge or (record["cost_nanos"] is not None and not -(2**62) <= record["cost_nanos"] < 2**62)
    if huge or not CANONICAL.fullmatch(record["event_id"]) or not low <= record["occurred_at"] < high:
        return True
    logical = {
        **record,
        "occurred_at": datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=record["occurred_at"]),
    }
    odd = [name for name in ATTRIBUTION_FIELDS if unplain(record[name])]
    plain = {**logical, **{name: "x" * len(record[name]) for name in odd}}
    if usage_record_problem(plain, NOW, skew) is not None:
        return False  # rejected by a check before the names'
    if odd:
        return True
    return record["cost_nanos"] is None  # Python prices it, as the processor does


@given(
    st.lists(records, min_size=1, max_size=12),
    st.sampled_from([SKEW, timedelta(0), timedelta(days=1, seconds=5)]),
    st.booleans(),
)
@hyp_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sql_validation_agrees_with_usage_record_problem(
    client: Any, batch: list[dict[str, Any]], skew: timedelta, old: bool
) -> None:
    version = OLD if old else CURRENT
    if old:  # what a v1 writer cannot say takes the reader schema's default
        batch = [{**r, "cache_write_tokens": 0, "price_source": ""} for r in batch]
    values = [encode(r, version.name) for r in batch]
    judged = judge_group(
        client, STAGING, AvroGroup.of(version, values, list(range(len(values))), arrivals(values)), NOW, skew
    )
    assert judged is not None
    assert judged.exact == {i for i, r in enumerate(batch) if sql_leaves_to_python(r, skew)}
    staged = staged_rows(client)
    for i, value in enumerate(values):
        if i in judged.exact:
            continue
        python = UsageDecoder(skew).decode([value], NOW)
        if i in judged.rejected:
            assert python.records == []
            assert [(r.stage, r.reason) for r in python.rejected] == [("validate", judged.rejected[i])]
        else:
            assert python.rejected == []
            (record,) = python.records
            row = {k: v for k, v in staged[i].items() if k != ROW_FIELD}
            assert row == record


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"team": "*"}, "team '*' names every team"),
        ({"user": "*"}, "user '*' names every user"),
        ({"feature": "f" * 257}, "feature is longer than 256 characters (257)"),
        ({"model_served": "m" * 300}, "model_served is longer than 256 characters (300)"),
    ],
)
def test_the_python_decoder_refuses_what_makes_no_scope_on_its_fast_path_too(
    fields: dict[str, Any], reason: str
) -> None:
    """The fast path's "no problem" must imply the full check's: a ``*`` or an over-long name passed it (the ledger
    then held a row the processor dead-lettered), found by the SQL mirror's property test."""
    decoded = UsageDecoder(SKEW).decode([encode(base_record(**fields))], NOW)
    assert decoded.records == []
    [rejected] = decoded.rejected
    assert rejected.stage == "validate" and rejected.reason.startswith(reason)


def ledger_values_of(client: Any, sql: str) -> list[tuple[Any, ...]]:
    return client.query(sql).result_rows


def test_sql_accepted_rows_land_in_the_ledger_as_python_would_write_them(client: Any) -> None:
    from spendstream.sink.avro_block import ledger_select_sql
    from spendstream.sink.decode import LEDGER_COLUMNS, columns_of

    batch = [
        base_record(
            event_id=f"00000000-0000-4000-8000-{i:012x}",
            occurred_at=micros(NOW) - i * 1_000_003,
            tags={"env": "prod", "n": str(i)} if i % 2 else {},
            # unpriced rows are priced in Python (see test_sql_validation_agrees...); a blocked call costs nothing
            cost_nanos=0 if i % 3 == 2 else i,
            status=["ok", "error", "blocked"][i % 3],
            cache_hit=bool(i % 2),
            price_source="override:x",
        )
        for i in range(50)
    ]
    values = [encode(r) for r in batch]
    judged = judge_group(client, STAGING, AvroGroup.of(CURRENT, values, list(range(50)), arrivals(values)), NOW, SKEW)
    assert judged is not None and not judged.exact and not judged.rejected
    columns = ", ".join(LEDGER_COLUMNS)
    client.command(f"INSERT INTO spendstream.usage_ledger ({columns}) {ledger_select_sql(LEDGER_COLUMNS, STAGING, [])}")
    via_sql = ledger_values_of(client, f"SELECT {columns} FROM spendstream.usage_ledger ORDER BY event_id")
    client.command("TRUNCATE TABLE spendstream.usage_ledger")
    decoded = UsageDecoder(SKEW).decode(values, NOW)
    types = dict(row[:2] for row in client.query("DESCRIBE TABLE spendstream.usage_ledger").result_rows)
    client.insert(
        "spendstream.usage_ledger",
        columns_of(decoded.records),
        column_names=LEDGER_COLUMNS,
        column_type_names=[types[c] for c in LEDGER_COLUMNS],
        column_oriented=True,
    )
    via_python = ledger_values_of(client, f"SELECT {columns} FROM spendstream.usage_ledger ORDER BY event_id")
    assert via_sql == via_python and len(via_sql) == 50


def test_strings_clickhouse_keeps_but_fastavro_refuses_are_left_to_python(client: Any) -> None:
    good = encode(base_record(org="abc", tags={"k": "1"}))
    variants = [
        good,
        good.replace(b"\x06abc", b"\x06\xff\xfe\xfd"),  # invalid UTF-8
        good.replace(b"\x06abc", b"\x06\xed\xa0\x80"),  # a surrogate
        good.replace(b"\x06abc", b"\x06\xc0\x80a"[:4]),  # an overlong encoding
        good.replace(b"\x02\x02k\x021\x00", b"\x04\x02k\x021\x02k\x022\x00"),  # a duplicate map key
    ]
    assert len(set(variants)) == len(variants)
    judged = judge_group(
        client, STAGING, AvroGroup.of(CURRENT, variants, list(range(len(variants))), arrivals(variants)), NOW, SKEW
    )
    assert judged == Judged({}, set(range(1, len(variants))))


@pytest.mark.parametrize(
    "damage",
    [
        lambda v: v[:-1],
        lambda v: v[:-9] + b"\x02" + v[-8:],  # cache_hit, before the 7 detail counts and service_tier (1 byte each)
        lambda v: v[:-11] + b"\x12" + v[-10:],  # status, before decision_applied and cache_hit
        lambda v: v + b"\x00",
        lambda v: v + b"\x00\x00\x00\x00",
        lambda v: v.replace(b"\x14", b"\x94\x00", 1),
        lambda v: v.replace(b"\x02\x02k\x021\x00", b"\x01\x08\x02k\x021\x00"),
    ],
    ids=["truncated", "bool 2", "enum index 9", "trailing byte", "trailing position", "long varint", "sized map"],
)
def test_bodies_clickhouse_cannot_read_exactly_fail_the_group(client: Any, damage: Callable[[bytes], bytes]) -> None:
    """ClickHouse refuses the container, or a row comes back at the wrong position or length;
    either way the sink decodes the group in Python, which names the bad value."""
    good = encode(base_record(tags={"k": "1"}))
    assert b"\x14" in good and b"\x02\x02k\x021\x00" in good
    group = AvroGroup.of(CURRENT, [good, damage(good), good], [0, 1, 2], [ARRIVED_MS] * 3)
    try:
        judged = judge_group(client, STAGING, group, NOW, SKEW)
    except Exception:  # ClickHouse's error type depends on the backend
        judged = None
    assert judged is None
    assert judge_group(
        client, STAGING, AvroGroup.of(CURRENT, [good, good], [0, 1], [ARRIVED_MS] * 2), NOW, SKEW
    ) == Judged({}, set())


def test_sql_reason_texts_for_each_rule(client: Any) -> None:
    cases = {
        "input_tokens is negative: -7": base_record(input_tokens=-7),
        "output_tokens is negative: -1": base_record(output_tokens=-1),
        "cached_input_tokens is negative: -2": base_record(cached_input_tokens=-2, latency_ms=-1),
        "latency_ms is negative: -1": base_record(latency_ms=-1),
        "cost_nanos is negative: -9": base_record(cost_nanos=-9),
        "cached_input_tokens + cache_write_tokens exceed input_tokens": base_record(
            cached_input_tokens=2**62 - 1, cache_write_tokens=2**62 - 1, input_tokens=2**62 - 1
        ),
        "occurred_at 2026-03-01T12:05:00.000001+00:00 is more than 0:05:00 in the future": base_record(
            occurred_at=micros(NOW + SKEW) + 1
        ),
        "occurred_at 2099-01-01T00:00:00+00:00 is more than 0:05:00 in the future": base_record(
            occurred_at=micros(datetime(2099, 1, 1, tzinfo=UTC))
        ),
        "missing provider or model_requested": base_record(model_requested=""),
        "": base_record(cost_nanos=-(2**63)),  # a 10-byte varint: the Python path names this one
    }
    values = [encode(r) for r in cases.values()]
    judged = judge_group(
        client, STAGING, AvroGroup.of(CURRENT, values, list(range(len(values))), arrivals(values)), NOW, SKEW
    )
    assert judged is not None
    assert [judged.rejected.get(i, "") for i in range(len(cases))] == list(cases)
    assert judged.exact == {len(cases) - 1}
    for value, reason in zip(values, cases, strict=True):
        (rejected,) = UsageDecoder(SKEW).decode([value], NOW).rejected
        assert rejected.reason == (reason or "cost_nanos is negative: -9223372036854775808")

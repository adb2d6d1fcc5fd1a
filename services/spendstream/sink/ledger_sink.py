"""The ledger sink: ``spendstream.usage`` into ``{db}.usage_ledger``, every event exactly once.

Why the ledger is exact (docs/architecture.md §7.1, §7.2):

* **Nothing is lost.** Offsets are committed explicitly (``last offset + 1`` per partition),
  synchronously, and only after the batch's insert has returned and its dead letters are
  acknowledged by the broker. A crash anywhere before that replays the batch from the last
  commit. Batches are committed in the order they were read, so a commit never covers a batch
  whose insert has not landed.
* **Nothing is counted twice.** A replay may write an event a second time. Two mechanisms
  remove the copy:

  1. Each insert carries ``insert_deduplication_token`` = the batch's ``(partition, first
     offset, last offset)`` ranges and a digest of its records. Retrying a failed or timed-out
     insert of the *same* batch (the common case: ClickHouse answered with an error after writing, or the connection
     dropped) is dropped by ClickHouse itself, so not even a duplicate part is written.
  2. A replay after a crash or rebalance usually has *different* boundaries (a different
     batch size, a batch cut short by the time limit, other partitions mixed in), so its token
     differs and its rows land again. Exactness then rests on the table: ``usage_ledger`` is a
     ReplacingMergeTree whose sorting key ends in ``event_id`` and whose other key columns and
     partition key are functions of the event itself, so every copy of an event has the same
     key and the same partition. Background merges collapse copies eventually, and ``FINAL``
     collapses them at read time, always. Every exact read (views, reports, tests) uses FINAL.

The hot path decodes nothing in Python. Values framed with a known schema fingerprint (the
current UsageEvent schema or a version under ``schemas/history/``) are grouped by writer schema
and wrapped, undecoded, into an Avro container file (:mod:`spendstream.sink.avro_block`) that
ClickHouse reads into a per-sink ``Memory`` staging table. SQL there mirrors
``usage_record_problem`` (same checks, same order, same reason texts); the sink dead-letters the
rows it rejects and moves the rest with ``INSERT INTO usage_ledger SELECT``. Rows SQL does not
judge, and whole groups ClickHouse cannot read (a corrupt body fails the block), take the Python
path: fastavro against a copy of the schema without logical types (timestamps stay integer
microseconds, which is also what a ``DateTime64(6)`` column stores), :func:`fast_problem_free`,
and for anything unusual ``AvroCodec.decode`` and ``usage_record_problem``, which pinpoint the
bad record and supply its dead-letter reason. Values with other framing (registry ids, unknown
fingerprints, garbage) go straight to that path. Writing runs in a writer thread (chDB and the
HTTP client release the GIL) so that framing batch N+1 overlaps writing batch N. Every verdict
of a batch is taken against the ``now`` fixed when it was read, so a retried write produces the
same rows and the same dead letters.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import repeat
from operator import itemgetter
from typing import Any

import fastavro
from clickhouse_connect.driver.exceptions import DataError
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from spendstream.core.codec import SINGLE_OBJECT_MAGIC, AvroCodec, DecodeError, fingerprint
from spendstream.core.config import Settings
from spendstream.core.events import DETAIL_FIELDS, usage_record_problem
from spendstream.core.pricing import EMPTY_TABLE, CostOverflowError, PriceTable, UnknownModelError, price_record
from spendstream.core.schemas import history_versions, load_schema_json
from spendstream.core.topics import USAGE
from spendstream.sink.avro_block import (
    EXACT,
    ROW_FIELD,
    ContainerWriter,
    encoded_length_sql,
    ledger_select_sql,
    problem_sql,
    staging_columns,
)
from spendstream.sink.dead_letters import DeadLetter, DeadLetterPublisher, source_of

log = logging.getLogger(__name__)

LEDGER_TABLE = "usage_ledger"
# Insert columns, in the table's order; ``ingested_at`` is filled in by its DEFAULT.
LEDGER_COLUMNS = (
    "event_id",
    "occurred_at",
    "org",
    "division",
    "team",
    "project",
    "feature",
    "user",
    "customer",
    "environment",
    "tags",
    "provider",
    "model_requested",
    "model_served",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "cost_nanos",
    "price_source",
    "latency_ms",
    "status",
    "decision_applied",
    "cache_hit",
    *DETAIL_FIELDS,
    "service_tier",
)
_ROW = itemgetter(*LEDGER_COLUMNS)
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


# -- pure core: decoding, validation, batch bookkeeping --------------------------------------


def _without_logical_types(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {key: _without_logical_types(value) for key, value in schema.items() if key != "logicalType"}
    if isinstance(schema, list):
        return [_without_logical_types(item) for item in schema]
    return schema


def fast_problem_free(record: dict[str, Any], future_limit_us: int) -> bool:
    """A cheap sufficient condition for ``usage_record_problem(...) is None`` on a raw record.

    ``record`` is decoded without logical types (``occurred_at`` in integer microseconds).
    True guarantees the full check passes; False only means "ask the full check", which
    also accepts UUID spellings other than the canonical lower-case one.
    """
    inp = record["input_tokens"]
    cached = record["cached_input_tokens"]
    written = record["cache_write_tokens"]
    cost = record["cost_nanos"]
    output = record["output_tokens"]
    audio_in, image_in = record["input_audio_tokens"], record["input_image_tokens"]
    reasoning, audio_out = record["reasoning_tokens"], record["output_audio_tokens"]
    image_out = record["output_image_tokens"]
    written_1h = record["cache_write_1h_tokens"]
    return bool(
        cached >= 0
        and written >= 0
        and min(audio_in, image_in, reasoning, audio_out, image_out, written_1h, record["web_search_requests"]) >= 0
        and cached + written + audio_in + image_in <= inp
        and reasoning + audio_out + image_out <= output
        and written_1h <= written
        and output >= 0
        and record["latency_ms"] >= 0
        and (cost is None or cost >= 0)
        and record["occurred_at"] <= future_limit_us
        and record["provider"]
        and record["model_requested"]
        and _CANONICAL_UUID.fullmatch(record["event_id"])
    )


def micros(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (no float on the way)."""
    return (moment - _EPOCH) // _MICROSECOND


@dataclass
class Rejected:
    index: int
    stage: str  # "decode", "validate" or "price"
    reason: str


@dataclass
class DecodedValues:
    records: list[dict[str, Any]]  # raw form: occurred_at in micros, event_id a string
    rejected: list[Rejected]
    kept: list[int] = field(default_factory=list)  # position of each record among the decoded values


class UsageDecoder:
    """Turns UsageEvent values into ledger records, or into rejections with a reason.

    Events that arrive without ``cost_nanos`` are priced here with ``price_record``, the function
    the processor prices them with, so the ledger holds what the spend windows counted.
    """

    def __init__(
        self, max_future_skew: timedelta, registry_url: str | None = None, prices: PriceTable = EMPTY_TABLE
    ) -> None:
        self.codec = AvroCodec("usage_event", registry_url)
        self.max_future_skew = max_future_skew
        self.prices = prices
        self._header = SINGLE_OBJECT_MAGIC + fingerprint("usage_event")
        self._raw_schema = fastavro.parse_schema(_without_logical_types(load_schema_json("usage_event")))

    def decode(self, values: Sequence[bytes | None], now: datetime) -> DecodedValues:
        future_limit_us = micros(now + self.max_future_skew)
        read = fastavro.schemaless_reader
        raw_schema, header = self._raw_schema, self._header
        records: list[dict[str, Any]] = []
        rejected: list[Rejected] = []
        kept: list[int] = []
        for index, value in enumerate(values):
            if value is not None and value[:10] == header:
                stream = io.BytesIO(value)
                stream.seek(10)
                try:
                    record = read(stream, raw_schema, None)
                except Exception:  # corrupt body: the exact path below names the problem
                    record = None
                if record is not None and stream.tell() == len(value) and fast_problem_free(record, future_limit_us):
                    if self._keep_priced(index, record, records, rejected):
                        kept.append(index)
                    continue
            if self._decode_exactly(index, value, now, records, rejected):
                kept.append(index)
        return DecodedValues(records, rejected, kept)

    def _keep_priced(
        self, index: int, record: dict[str, Any], records: list[dict[str, Any]], rejected: list[Rejected]
    ) -> bool:
        if record["cost_nanos"] is None:
            at = _EPOCH + record["occurred_at"] * _MICROSECOND
            try:
                price = price_record(record, at, self.prices)
            except UnknownModelError as exc:
                rejected.append(Rejected(index, "price", f"unknown model, policy rejects it: {exc}"))
                return False
            except CostOverflowError as exc:
                rejected.append(Rejected(index, "price", f"cost overflow: {exc}"))
                return False
            record["cost_nanos"], record["price_source"] = price.cost_nanos, price.source
        records.append(record)
        return True

    def _decode_exactly(
        self, index: int, value: bytes | None, now: datetime, records: list[dict[str, Any]], rejected: list[Rejected]
    ) -> bool:
        try:
            record = self.codec.decode(value or b"")
        except DecodeError as exc:
            rejected.append(Rejected(index, "decode", str(exc)))
            return False
        problem = usage_record_problem(record, now, self.max_future_skew)
        if problem is not None:
            rejected.append(Rejected(index, "validate", problem))
            return False
        record["event_id"] = str(record["event_id"])
        record["occurred_at"] = micros(record["occurred_at"])
        return self._keep_priced(index, record, records, rejected)


def columns_of(records: Sequence[dict[str, Any]]) -> list[Sequence[Any]]:
    """Ledger columns (in ``LEDGER_COLUMNS`` order) of raw records, transposed in C."""
    if not records:
        return [() for _ in LEDGER_COLUMNS]
    return list(zip(*map(_ROW, records), strict=True))


def offset_ranges(partitions: Sequence[int], offsets: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Per partition, the (first, last) offset of a batch read in order (first and last seen)."""
    last = dict(zip(partitions, offsets, strict=True))
    first = dict(zip(reversed(partitions), reversed(offsets), strict=True))
    return {partition: (first[partition], offset) for partition, offset in last.items()}


def dedup_token(ranges: dict[int, tuple[int, int]], values: Iterable[bytes | None]) -> str:
    """Deterministic insert_deduplication_token of a batch: its sorted partition offset ranges and a digest of its
    records. The digest tells apart batches at the same offsets of different topic lives (the memory-only broker of
    `spendstream dev` numbers every restart from 0 again), which ClickHouse would otherwise drop as retries."""
    digest = hashlib.blake2b(digest_size=16)
    for value in values:
        digest.update(value or b"")
    ranges_text = ",".join(f"{p}:{first}-{last}" for p, (first, last) in sorted(ranges.items()))
    return f"usage:{ranges_text}:{digest.hexdigest()}"


def commit_positions(topic: str, ranges: dict[int, tuple[int, int]], owned: Iterable[int]) -> list[TopicPartition]:
    """Offsets to commit after a batch landed: ``last + 1`` for every partition still owned."""
    mine = set(owned)
    return [TopicPartition(topic, p, last + 1) for p, (_, last) in sorted(ranges.items()) if p in mine]


_REASON_KINDS = (
    ("unknown schema fingerprint", "unknown_schema"),
    ("missing event_id", "bad_event_id"),
    ("event_id is not a UUID", "bad_event_id"),
    ("hexadecimal UUID", "bad_event_id"),  # the uuid logical type refuses it while decoding
    ("with base 16", "bad_event_id"),  # ... or fails parsing its hex digits
    ("is negative", "negative_value"),
    ("exceed input_tokens", "cached_exceeds_input"),
    ("in the future", "future_occurred_at"),
    ("missing occurred_at", "missing_occurred_at"),
    ("missing provider or model_requested", "missing_provider_or_model"),
    ("unknown model", "unknown_model"),
    ("the ledger refuses this record", "ledger_refused"),
)


def reason_kind(stage: str, reason: str) -> str:
    """A bounded label for a dead-letter reason (the full reason travels in the header)."""
    for needle, kind in _REASON_KINDS:
        if needle in reason:
            return kind
    return "undecodable" if stage == "decode" else "invalid"


# ClickHouse errors caused by the values sent, never by the server's state: retrying cannot help.
_CONTENT_ERROR_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        131,  # TOO_LARGE_STRING_SIZE
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        407,  # DECIMAL_OVERFLOW
        469,  # VIOLATED_CONSTRAINT (a CHECK an operator put on the ledger)
        691,  # UNKNOWN_ELEMENT_OF_ENUM
    }
)
_ERROR_CODE = re.compile(r"Code: (\d+)\.")


def is_content_error(exc: BaseException) -> bool:
    """True when an insert failed because of what it carried (a value out of a column's range, a type
    the column refuses), so the same rows will fail forever; False for outages and anything unknown,
    which are retried."""
    if isinstance(exc, DataError | OverflowError | struct.error | TypeError | ValueError):
        return True
    code = _ERROR_CODE.search(str(exc))
    return code is not None and int(code.group(1)) in _CONTENT_ERROR_CODES


def refusal_reason(exc: BaseException) -> str:
    cause = f"{exc}; {exc.__cause__}" if exc.__cause__ is not None else str(exc)
    return f"the ledger refuses this record: {cause}"


# -- the service ----------------------------------------------------------------------------


@dataclass
class SinkStats:
    consumed: int = 0
    inserted: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    commits: int = 0
    insert_retries: int = 0
    staged_rows: int = 0
    avro_fallbacks: int = 0
    superseded: int = 0  # copies of an event_id the ledger already held (first version wins), not inserted


SCHEMA_NAME = "usage_event"
_HEADER_LEN = len(SINGLE_OBJECT_MAGIC) + 8
_CHECK_ROW = struct.Struct("<IIB")  # RowBinary of (_i FixedString(4) little-endian, UInt32, UInt8)


@dataclass(frozen=True)
class WriterVersion:
    """One known writer schema of UsageEvent: how to frame its values for ClickHouse and measure them."""

    name: str
    container: ContainerWriter
    length_sql: str

    @classmethod
    def of(cls, name: str) -> WriterVersion:
        schema = load_schema_json(name)
        return cls(name, ContainerWriter(schema, _HEADER_LEN), encoded_length_sql(schema, _HEADER_LEN))


@dataclass
class AvroGroup:
    """Values of one batch written with one schema, framed as an Avro container for ClickHouse."""

    version: WriterVersion
    indices: list[int]  # positions in the batch
    container: bytes
    expected: bytes  # RowBinary (_i, value length, no problem) per row, what the staging check must give back

    @classmethod
    def of(cls, version: WriterVersion, values: Sequence[bytes], indices: list[int]) -> AvroGroup:
        expected = b"".join(map(_CHECK_ROW.pack, range(len(values)), map(len, values), repeat(0)))
        return cls(version, indices, version.container.container(values), expected)


def split_by_writer(
    values: Sequence[bytes | None], versions: dict[bytes, WriterVersion]
) -> tuple[dict[bytes, list[int]], list[int]]:
    """Positions of values by single-object header (known writer schemas only), and all the others."""
    if len(versions) and None not in values:
        for header in versions:  # the common case, every value in one schema, checked in C
            if all(map(bytes.startswith, values, repeat(header))):  # type: ignore[arg-type]
                return {header: list(range(len(values)))}, []
    groups: dict[bytes, list[int]] = {header: [] for header in versions}
    others: list[int] = []
    get = groups.get
    for index, value in enumerate(values):
        positions = get(value[:_HEADER_LEN]) if value is not None else None
        if positions is None:
            others.append(index)
        else:
            positions.append(index)
    return {header: positions for header, positions in groups.items() if positions}, others


@dataclass
class Judged:
    """SQL's verdict on a staged group: rows it rejects (with the reason) and rows left to Python."""

    rejected: dict[int, str]  # row -> usage_record_problem's reason
    exact: set[int]  # rows SQL does not judge (the Python path names their problem)


def create_staging(client: Any, staging: str) -> None:
    """The Memory table a sink loads each group into (its rows live only until the next group)."""
    columns = ", ".join(f"`{name}` {kind}" for name, kind in staging_columns(load_schema_json(SCHEMA_NAME)))
    client.command(f"CREATE OR REPLACE TABLE {staging} ({columns}) ENGINE = Memory")


# First version wins. ``usage_ledger`` is a ReplacingMergeTree without a version column: of two rows with one
# sorting key (org, team, day, event_id) the one inserted LAST survives. A re-sent event_id with other content
# would then replace what the processor counted (it keeps the first version and dead-letters the copy as a
# conflicting duplicate). So the sink never inserts a row whose key the ledger already holds, nor a second row of
# one event_id within a batch: identical replays change nothing, a conflicting copy is dropped here. The lookups
# go through the primary index (the full sorting key). A copy that changes org, team or day is another row.
_KEY = "(org, team, toDate(occurred_at), event_id)"


def superseded_staged_rows(client: Any, staging: str, table: str, excluded: set[int]) -> set[int]:
    """Staged rows (``_i`` positions) not to insert: their key is in the ledger, or an earlier row has their id."""
    staged_key = "(org, team, toDate(fromUnixTimestamp64Micro(occurred_at, 'UTC')), toUUIDOrZero(toString(event_id)))"
    row = f"reinterpretAsUInt32({ROW_FIELD})"
    skip = f" AND {row} NOT IN ({', '.join(map(str, sorted(excluded)))})" if excluded else ""
    rows = client.query(
        f"SELECT {row} FROM {staging} WHERE 1{skip} AND ("
        f"{staged_key} IN (SELECT {_KEY} FROM {table} WHERE {_KEY} IN (SELECT {staged_key} FROM {staging}))"
        f" OR {row} NOT IN (SELECT min({row}) FROM {staging} WHERE 1{skip} GROUP BY event_id))"
    ).result_rows
    return {r[0] for r in rows}


def first_versions(client: Any, table: str, keys_table: str, columns: list[Sequence[Any]]) -> list[Sequence[Any]]:
    """Ledger columns without the rows ``superseded_staged_rows`` would drop (the Python path's rows); their keys
    go through the Memory table ``keys_table`` so the ledger lookup is one indexed join."""
    at = {name: i for i, name in enumerate(LEDGER_COLUMNS)}
    ids, orgs, teams, times = (columns[at[n]] for n in ("event_id", "org", "team", "occurred_at"))
    if not ids:
        return columns
    days = [_day(moment) for moment in times]
    client.command(
        f"CREATE TABLE IF NOT EXISTS {keys_table} (org String, team String, day Date, event_id UUID) ENGINE = Memory"
    )
    client.command(f"TRUNCATE TABLE {keys_table}")
    client.insert(
        keys_table,
        [list(orgs), list(teams), days, [uuid.UUID(str(e)) for e in ids]],
        column_names=["org", "team", "day", "event_id"],
        column_oriented=True,
    )
    held = {
        (o, t, d, str(e))
        for o, t, d, e in client.query(
            f"SELECT org, team, toDate(occurred_at), event_id FROM {table} "
            f"WHERE {_KEY} IN (SELECT org, team, day, event_id FROM {keys_table})"
        ).result_rows
    }
    seen: set[str] = set()
    keep = []
    for i in range(len(ids)):
        event_id = str(ids[i])
        if event_id not in seen and (orgs[i], teams[i], days[i], event_id) not in held:
            keep.append(i)
        seen.add(event_id)
    if len(keep) == len(ids):
        return columns
    return [[column[i] for i in keep] for column in columns]


def _day(occurred_at: Any) -> date:
    """The UTC date of a raw ``occurred_at`` (integer microseconds) or datetime."""
    moment = occurred_at if isinstance(occurred_at, datetime) else _EPOCH + occurred_at * _MICROSECOND
    return moment.astimezone(UTC).date()


def judge_group(client: Any, staging: str, group: AvroGroup, now: datetime, skew: timedelta) -> Judged | None:
    """Load a group into ``staging`` and validate it in SQL; None if its rows did not come back intact.

    Raises what ClickHouse raises when it cannot read the container (a corrupt body fails it).
    """
    client.command(f"TRUNCATE TABLE {staging}")
    client.raw_insert(
        staging, None, group.container, fmt="Avro", settings={"input_format_avro_allow_missing_fields": 1}
    )
    problem = problem_sql(load_schema_json(SCHEMA_NAME), micros(now + skew), skew)
    checked = client.raw_query(
        f"SELECT {ROW_FIELD}, toUInt32({group.version.length_sql}), toUInt8(({problem}) != '') FROM {staging} "
        "SETTINGS max_threads = 1 FORMAT RowBinary"
    )
    if checked == group.expected:  # every position in order, every value read exactly, all valid: the common case
        return Judged({}, set())
    if len(checked) != len(group.expected):
        return None
    flagged = False
    for (row, length, problem_flag), (want_row, want_length, _) in zip(
        sorted(_CHECK_ROW.iter_unpack(checked)), _CHECK_ROW.iter_unpack(group.expected), strict=True
    ):
        if row != want_row or length != want_length:  # see avro_block: then no row's position can be trusted
            return None
        flagged = flagged or bool(problem_flag)
    verdicts = (
        client.query(
            f"SELECT reinterpretAsUInt32({ROW_FIELD}), {problem} AS problem FROM {staging} WHERE problem != ''"
        ).result_rows
        if flagged
        else []
    )
    exact = {row for row, verdict in verdicts if verdict == EXACT}
    return Judged({row: verdict for row, verdict in verdicts if row not in exact}, exact)


@dataclass
class _Written:
    rows: int = 0
    staged_rows: int = 0  # rows that went through ClickHouse's Avro reader and SQL validation
    fallbacks: int = 0  # groups ClickHouse could not read, decoded in Python instead
    superseded: int = 0  # rows not inserted: the ledger holds their event_id's first version
    rejected: list[Rejected] = field(default_factory=list)  # index = position in the batch

    def add(self, rows: int, rejected: list[Rejected]) -> None:
        self.rows += rows
        self.rejected += rejected


@dataclass
class _Batch:
    ranges: dict[int, tuple[int, int]]
    messages: list[Message]
    now: datetime  # every verdict on this batch is taken against this moment, retries included
    groups: list[AvroGroup]
    python_records: list[dict[str, Any]]  # decoded in Python from the start (values no group takes)
    python_indices: list[int]  # their positions in the batch
    python_rejected: list[Rejected]
    token: str
    abandoned: threading.Event = field(default_factory=threading.Event)
    landed: Future[_Written | None] | None = None


class LedgerSink:
    """Consumes usage events in batches, inserts them into the ledger, then commits offsets.

    ``run()`` blocks until :meth:`stop` (also wired to SIGTERM/SIGINT by the CLI) and returns
    an exit code. ``client`` lets a caller own the ClickHouse connection (chDB allows one
    directory per process); by default the sink connects with ``ledger_store.connect``.
    ``avro_fast_path=False`` decodes everything in Python (the reference the fast path is
    measured and tested against).
    """

    def __init__(
        self,
        settings: Settings,
        client: Any = None,
        stop_grace_s: float = 30.0,
        avro_fast_path: bool = True,
        prices: PriceTable = EMPTY_TABLE,
    ) -> None:
        self.settings = settings
        self.stats = SinkStats()
        self._client = client
        self._stop = threading.Event()
        self._stop_grace_s = stop_grace_s
        self._decoder = UsageDecoder(
            timedelta(seconds=settings.max_future_skew_s), settings.schema_registry_url, prices
        )
        self._table = f"{settings.clickhouse_database}.{LEDGER_TABLE}"
        names = [SCHEMA_NAME, *history_versions(SCHEMA_NAME)] if avro_fast_path else []
        self._versions = {SINGLE_OBJECT_MAGIC + fingerprint(name): WriterVersion.of(name) for name in names}
        # chDB: this process owns the directory, so one fixed name; a shared server: one table per sink.
        suffix = "" if settings.ledger_dsn.startswith("chdb://") else "_" + uuid.uuid4().hex[:12]
        self._staging = f"{settings.clickhouse_database}.usage_sink_staging{suffix}"
        self._column_types: list[str] = []
        self._consumer: Consumer | None = None
        self._dlq: DeadLetterPublisher | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ledger-writer")
        self._pending: _Batch | None = None
        self._owned: set[int] = set()
        self._generation = 0
        self._failed = False

    @property
    def client(self) -> Any:
        return self._client

    def set_prices(self, prices: PriceTable) -> None:
        """Price events without ``cost_nanos`` with ``prices`` from the next event on (a new policy in force)."""
        self._decoder.prices = prices

    def stop(self) -> None:
        """Ask the sink to finish the batch in hand, commit it, and return from ``run``."""
        self._stop.set()

    # -- lifecycle -------------------------------------------------------------------------

    def run(self, ready: Callable[[], None] | None = None) -> int:
        from spendstream.core.ledger_store import connect, migrate

        if self._client is None:
            self._client = connect(self.settings)
        # clickhouse-connect logs a traceback for every value it cannot serialise; the sink names the
        # refused record itself, once, after bisecting (see _insert_isolating).
        logging.getLogger("clickhouse_connect.driver.transform").setLevel(logging.CRITICAL)
        applied = migrate(self._client, self.settings)
        if applied:
            log.info("ledger migrations applied: %s", ", ".join(applied))
        self._column_types = self._ledger_column_types()
        if self._versions:
            create_staging(self._client, self._staging)
        kafka = self.settings.kafka_client_config()
        self._dlq = DeadLetterPublisher(kafka)
        self._consumer = Consumer(
            {
                **kafka,
                "group.id": self.settings.sink_group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "client.id": "spendstream-sink",
                # A crashed sink's partitions move to a live one within seconds, not the default 45 s.
                "session.timeout.ms": 10_000,
                "heartbeat.interval.ms": 1_000,
            }
        )
        self._consumer.subscribe([USAGE], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        if ready is not None:
            ready()
        log.info("sink consuming %s as group %s into %s", USAGE, self.settings.sink_group, self._table)
        try:
            self._loop()
        finally:
            self._consumer.close()  # revokes: _on_revoke settles anything still pending
            self._dlq.close()
            self._writer.shutdown(wait=True, cancel_futures=False)
            self._drop_staging()
        log.info("sink stopped: %s", self._progress_line(0.0, 0))
        return 1 if self._failed else 0

    def _loop(self) -> None:
        assert self._consumer is not None
        batch_s = self.settings.sink_batch_ms / 1000
        last_log, logged_rows, logged_consumed = time.monotonic(), 0, 0
        while not self._stop.is_set() and not self._failed:
            generation = self._generation
            messages = self._consumer.consume(self.settings.sink_batch_size, batch_s)
            if generation != self._generation:
                # A rebalance happened inside consume(); what it returned may predate it, and the
                # new assignment re-reads from the committed offsets anyway.
                continue
            batch = self._prepare(messages)
            if self._pending is not None and not self._settle(self._pending):
                self._pending = None
                break
            self._pending = None
            if batch is not None:
                self._pending = batch
                batch.landed = self._writer.submit(self._insert, batch)
            now = time.monotonic()
            if now - last_log >= 10:  # progress only while there is traffic: an idle sink stays quiet
                if self.stats.consumed != logged_consumed:
                    rows = self.stats.inserted - logged_rows
                    log.info("sink progress: %s", self._progress_line(now - last_log, rows))
                last_log, logged_rows, logged_consumed = now, self.stats.inserted, self.stats.consumed
        if self._pending is not None and not self._failed:
            self._settle(self._pending)
            self._pending = None

    def _progress_line(self, seconds: float, rows: int) -> str:
        s = self.stats
        rate = f"{rows:,} rows in {seconds:.0f}s, " if seconds else ""
        return (
            f"{rate}consumed {s.consumed:,}, inserted {s.inserted:,}, "
            f"dead-lettered {sum(s.dead_lettered.values()):,} {dict(s.dead_lettered)}, "
            f"batches {s.batches:,}, commits {s.commits:,}"
        )

    # -- one batch -------------------------------------------------------------------------

    def _prepare(self, messages: list[Message]) -> _Batch | None:
        """Frame a consumed batch for ClickHouse by writer schema; decode the rest in Python."""
        good = messages
        if any(map(Message.error, messages)):  # per-message work stays in C unless something is wrong
            good = []
            for msg in messages:
                err = msg.error()
                if err is None:
                    good.append(msg)
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", err)
        if not good:
            return None
        ranges = offset_ranges(list(map(Message.partition, good)), list(map(Message.offset, good)))
        now = datetime.now(UTC)
        values = list(map(Message.value, good))
        by_header, others = split_by_writer(values, self._versions)
        groups = [
            AvroGroup.of(
                self._versions[header],
                values if len(indices) == len(values) else [values[i] for i in indices],
                indices,
            )
            for header, indices in by_header.items()
        ]
        decoded = self._decoder.decode([values[i] for i in others], now)
        rejected = [Rejected(others[r.index], r.stage, r.reason) for r in decoded.rejected]
        self.stats.consumed += len(good)
        return _Batch(
            ranges,
            good,
            now,
            groups,
            decoded.records,
            [others[i] for i in decoded.kept],
            rejected,
            dedup_token(ranges, values),
        )

    def _insert(self, batch: _Batch) -> _Written | None:
        """Write one batch, retrying with backoff until it lands, is abandoned, or the stop grace ends."""
        delay = 0.2
        stop_deadline: float | None = None
        while not batch.abandoned.is_set():
            try:
                return self._write(batch)
            except Exception as exc:  # any ClickHouse or transport error: the same batch is retried
                self.stats.insert_retries += 1
                log.warning("ledger write of %d values failed (retrying in %.1fs): %s", len(batch.messages), delay, exc)
            if self._stop.is_set():
                stop_deadline = stop_deadline or time.monotonic() + self._stop_grace_s
                if time.monotonic() >= stop_deadline:
                    return None
            batch.abandoned.wait(delay)
            delay = min(delay * 2, 10.0)
        return None

    def _write(self, batch: _Batch) -> _Written:
        """Every insert of a batch; each carries its own deduplication token, so a retry is idempotent."""
        written = _Written()
        for group in batch.groups:
            self._write_group(batch, group, written)
        written.add(0, batch.python_rejected)
        self._insert_isolating(batch.python_records, batch.python_indices, batch.token, written)
        return written

    def _write_group(self, batch: _Batch, group: AvroGroup, written: _Written) -> None:
        """ClickHouse reads and validates one writer schema's values; what it cannot judge goes to Python."""
        token = f"{batch.token}:{group.version.name}"
        try:
            judged = judge_group(self._client, self._staging, group, batch.now, self._decoder.max_future_skew)
        except Exception as exc:  # a corrupt body fails the whole block; an outage fails the Python insert too
            log.info("ClickHouse could not read %s values, decoding them in Python: %s", group.version.name, exc)
            judged = None
        if judged is None:
            log.info(
                "%s values did not come back from ClickHouse in place, decoding them in Python", group.version.name
            )
            written.fallbacks += 1
            self._write_in_python(batch, group.indices, f"{token}:py", written)
            return
        count = len(group.indices)
        excluded = judged.exact | judged.rejected.keys()
        superseded = superseded_staged_rows(self._client, self._staging, self._table, excluded)
        excluded |= superseded
        written.superseded += len(superseded)
        if len(excluded) < count:
            try:
                self._client.command(
                    f"INSERT INTO {self._table} ({', '.join(LEDGER_COLUMNS)}) "
                    + ledger_select_sql(LEDGER_COLUMNS, self._staging, sorted(excluded)),
                    settings={"insert_deduplication_token": token},
                )
            except Exception as exc:
                if not is_content_error(exc):
                    raise
                log.warning(
                    "the ledger refused staged %s values, isolating them in Python: %s", group.version.name, exc
                )
                written.fallbacks += 1
                self._write_in_python(batch, group.indices, f"{token}:py", written)
                return
        rejected = [Rejected(group.indices[row], "validate", reason) for row, reason in judged.rejected.items()]
        written.add(count - len(excluded), rejected)
        written.staged_rows += count - len(judged.exact)
        if judged.exact:
            self._write_in_python(batch, [group.indices[row] for row in sorted(judged.exact)], f"{token}:py", written)

    def _write_in_python(self, batch: _Batch, indices: list[int], token: str, written: _Written) -> None:
        decoded = self._decoder.decode([batch.messages[i].value() for i in indices], batch.now)
        written.add(0, [Rejected(indices[r.index], r.stage, r.reason) for r in decoded.rejected])
        self._insert_isolating(decoded.records, [indices[i] for i in decoded.kept], token, written)

    def _insert_isolating(
        self, records: list[dict[str, Any]], indices: list[int], token: str, written: _Written
    ) -> None:
        """Insert records; if the ledger refuses them for their content, bisect until the refused ones are alone.

        A refused record becomes a dead letter, everything else lands. Each part carries a token derived
        from its position, so a retry after an outage repeats the same parts and ClickHouse drops repeats.
        Failures that are not about content (an outage) propagate and the whole batch is retried.
        """
        if not records:
            return
        try:
            superseded = self._insert_columns(columns_of(records), token)
        except Exception as exc:
            if not is_content_error(exc):
                raise
            if len(records) == 1:
                log.warning("the ledger refuses one record for its content; it goes to the DLQ: %s", exc)
                written.add(0, [Rejected(indices[0], "insert", refusal_reason(exc))])
                return
            middle = len(records) // 2
            self._insert_isolating(records[:middle], indices[:middle], f"{token}<", written)
            self._insert_isolating(records[middle:], indices[middle:], f"{token}>", written)
            return
        written.add(len(records) - superseded, [])
        written.superseded += superseded

    def _insert_columns(self, columns: list[Sequence[Any]], token: str) -> int:
        """Insert the first versions among ``columns``; returns how many rows were superseded (not inserted)."""
        rows = len(columns[0])
        columns = first_versions(self._client, self._table, f"{self._staging}_keys", columns)
        if not columns[0]:
            return rows
        self._client.insert(
            self._table,
            columns,
            column_names=LEDGER_COLUMNS,
            column_type_names=self._column_types,
            column_oriented=True,
            settings={"insert_deduplication_token": token},
        )
        return rows - len(columns[0])

    def _settle(self, batch: _Batch, timeout: float | None = None) -> bool:
        """Wait for a batch's writes, then make its dead letters durable and commit its offsets."""
        assert batch.landed is not None and self._dlq is not None and self._consumer is not None
        try:
            written = batch.landed.result(timeout)
        except TimeoutError:
            written = None
        if written is None:
            batch.abandoned.set()
            if timeout is None:  # only the stop grace ends an unbounded wait
                log.error("giving up on an unwritten batch at shutdown; its offsets stay uncommitted")
                self._failed = True
            return False
        for rejected in written.rejected:
            msg = batch.messages[rejected.index]
            self._dlq.publish(
                DeadLetter(
                    msg.key(),
                    msg.value(),
                    rejected.reason,
                    source_of(msg.topic(), msg.partition(), msg.offset()),
                    rejected.stage,
                )
            )
            self.stats.dead_lettered[reason_kind(rejected.stage, rejected.reason)] += 1
        while not self._dlq.flush(5.0):
            log.warning("dead letters not yet acknowledged; offsets stay uncommitted until they are")
            if self._stop.is_set():
                self._failed = True
                return False
        self.stats.inserted += written.rows
        self.stats.superseded += written.superseded
        self.stats.staged_rows += written.staged_rows
        self.stats.avro_fallbacks += written.fallbacks
        self.stats.batches += 1
        positions = commit_positions(USAGE, batch.ranges, self._owned)
        if positions:
            try:
                self._consumer.commit(offsets=positions, asynchronous=False)
                self.stats.commits += 1
            except KafkaException as exc:  # the batch is in the ledger; a replay is deduplicated
                log.warning("offset commit failed (the batch will be replayed): %s", exc)
        return True

    # -- rebalancing -----------------------------------------------------------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._owned.update(tp.partition for tp in partitions)
        log.info("assigned partitions %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit the in-flight batch if it lands soon; otherwise abandon it (the next owner replays it)."""
        self._generation += 1
        pending, self._pending = self._pending, None
        if pending is not None:
            self._settle(pending, timeout=None if self._stop.is_set() else 10.0)
        self._owned.difference_update(tp.partition for tp in partitions)
        log.info("revoked partitions %s", sorted(tp.partition for tp in partitions))

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._generation += 1
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.abandoned.set()
        self._owned.difference_update(tp.partition for tp in partitions)
        log.warning("lost partitions %s; the in-flight batch will be replayed by their new owner", sorted(self._owned))

    def _drop_staging(self) -> None:
        if not self._versions or self._client is None:
            return
        try:
            self._client.command(f"DROP TABLE IF EXISTS {self._staging}")
            self._client.command(f"DROP TABLE IF EXISTS {self._staging}_keys")
        except Exception as exc:  # an unreachable server keeps an empty Memory table; nothing is lost
            log.warning("could not drop the staging table %s: %s", self._staging, exc)

    def _ledger_column_types(self) -> list[str]:
        types = {row[0]: row[1] for row in self._client.query(f"DESCRIBE TABLE {self._table}").result_rows}
        return [types[name] for name in LEDGER_COLUMNS]

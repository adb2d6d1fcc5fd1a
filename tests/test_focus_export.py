"""``spendstream export focus`` and ``GET /v1/exports/focus``: every row of a month's export obeys the FOCUS 1.2
column rules spendstream implements, and the costs add up to the ledger (read FINAL) to the nano-dollar.

The ledger is filled and read with ``spendstream sql``, the export written by the CLI process and by a running
``spendstream api``; nothing is mocked."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import test_api_access
from test_api_access import RunningApi, base_env, call, cli, create_token

api = test_api_access.api  # the fixture that runs ``spendstream api`` on ``tmp_path/stack-a``

# FOCUS 1.2: the columns a FOCUS dataset must carry (Mandatory), and the Conditional ones that apply to metered
# LLM usage (ConsumedQuantity/Unit for usage, SkuId, SubAccount for providers with a sub-account, Tags).
MANDATORY = {
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency", "BillingPeriodEnd",
    "BillingPeriodStart", "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargePeriodEnd",
    "ChargePeriodStart", "ContractedCost", "EffectiveCost", "InvoiceIssuerName", "ListCost", "PricingQuantity",
    "PricingUnit", "ProviderName", "PublisherName", "ServiceCategory", "ServiceName",
}  # fmt: skip
CONDITIONAL_HERE = {"ConsumedQuantity", "ConsumedUnit", "SkuId", "SubAccountId", "SubAccountName", "Tags"}
NOT_NULL = {
    "BilledCost", "BillingAccountId", "BillingCurrency", "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory",
    "ChargePeriodEnd", "ChargePeriodStart", "ContractedCost", "EffectiveCost", "InvoiceIssuerName", "ListCost",
    "ProviderName", "PublisherName", "ServiceCategory", "ServiceName",
}  # fmt: skip
COSTS = ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost")
QUANTITIES = ("ConsumedQuantity", "PricingQuantity")
DATETIMES = ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd")
CHARGE_CATEGORIES = {"Usage", "Purchase", "Tax", "Credit", "Adjustment"}
CHARGE_FREQUENCIES = {"One-Time", "Recurring", "Usage-Based"}
PRICING_CATEGORIES = {"Standard", "Dynamic", "Committed", "Other"}
SERVICE_CATEGORIES = {
    "AI and Machine Learning", "Analytics", "Business Applications", "Compute", "Databases", "Developer Tools",
    "Multicloud", "Identity", "Integration", "Internet of Things", "Management and Governance", "Media",
    "Migration", "Mobile", "Networking", "Security", "Storage", "Web", "Other",
}  # fmt: skip
DECIMAL = re.compile(r"^-?\d+(\.\d+)?$")  # FOCUS numeric format: no exponent, unit, currency sign or separator
DATETIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")  # FOCUS date/time format: ISO 8601 in UTC
COLUMN_NAME = re.compile(r"^(x_[A-Za-z0-9_]+|[A-Z][A-Za-z0-9]+)$")  # PascalCase; custom columns prefixed x_

MONTH = "2026-11"
LEDGER_COLUMNS = (
    "event_id, occurred_at, org, division, team, project, feature, user, customer, environment, provider, "
    "model_requested, model_served, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, "
    "cost_nanos, status"
)
DUPLICATE_ID = "0f0e0d0c-0b0a-4908-8706-050403020100"


def seed(env: dict[str, str]) -> None:
    """Usage across a month and its neighbours: many groups, a 750 nano-USD call, unpriced calls, a cost above
    USD 12 with a last nano, calls at the first and the last microsecond of the month, and an event replayed."""
    generated = (
        f"INSERT INTO usage_ledger ({LEDGER_COLUMNS}) SELECT generateUUIDv4(), "
        "toDateTime64('2026-10-30 00:00:00', 6, 'UTC') + toIntervalSecond(number * 3637), 'acme', "
        "['research', 'go-to-market'][number % 2 + 1], ['search', 'marketing', 'support'][number % 3 + 1], "
        "'', ['chat', 'summarise'][number % 2 + 1], 'u' || toString(number % 7), '', 'prod', "
        "['openai', 'anthropic'][number % 2 + 1], ['gpt-4o', 'claude-sonnet-4'][number % 2 + 1], '', "
        "100 + number % 900, number % 300, number % 50, 0, "
        "if(number % 11 = 0, NULL, toInt64(1000 + number * 7919 % 5000000)), 'ok' FROM numbers(900)"
    )
    literal = (
        f"INSERT INTO usage_ledger ({LEDGER_COLUMNS}) VALUES "
        "(generateUUIDv4(), '2026-11-03 10:00:00', 'acme', '', 'tiny', '', '', '', '', '', 'openai', 'gpt-4o-mini',"
        " 'gpt-4o-mini', 5, 0, 0, 0, 750, 'ok'), "
        "(generateUUIDv4(), '2026-11-01 00:00:00.000000', 'acme', '', 'edges', '', '', '', 'cust-1', '',"
        " 'anthropic', 'claude-opus-4', '', 1000000, 20000, 0, 500000, 12000000001, 'ok'), "
        "(generateUUIDv4(), '2026-11-30 23:59:59.999999', 'acme', '', 'edges', '', '', '', '', '', 'openai',"
        " 'gpt-4o', 'gpt-4o-2024-08-06', 7, 3, 0, 0, 33, 'error'), "
        "(generateUUIDv4(), '2026-10-31 23:59:59.999999', 'acme', '', 'edges', '', '', '', '', '', 'openai',"
        " 'gpt-4o', '', 1, 1, 0, 0, 999999, 'ok'), "
        "(generateUUIDv4(), '2026-12-01 00:00:00', 'acme', '', 'edges', '', '', '', '', '', 'openai', 'gpt-4o',"
        " '', 1, 1, 0, 0, 888888, 'ok'), "
        "(generateUUIDv4(), '2026-11-20 09:00:00', 'acme', '', 'refused', '', '', '', '', '', 'openai', 'gpt-4o',"
        " 'gpt-4o', 0, 0, 0, 0, NULL, 'blocked')"
    )
    replay = (
        f"INSERT INTO usage_ledger ({LEDGER_COLUMNS}) VALUES ('{DUPLICATE_ID}', '2026-11-15 12:00:00', 'acme', '',"
        " 'replayed', '', '', '', '', '', 'openai', 'gpt-4o', '', 10, 10, 0, 0, 4000, 'ok')"
    )
    for statement in (generated, literal, replay, replay):  # the replay lands twice: FINAL counts it once
        done = cli(env, "sql", "--write", statement)
        assert done.returncode == 0, done.stderr


def ledger_figures(env: dict[str, str]) -> dict[str, Any]:
    done = cli(
        env, "sql", "--format", "json",
        "SELECT toString(sum(ifNull(cost_nanos, 0))) AS nanos, countIf(status != 'blocked') AS requests, "
        "toString(sum(input_tokens + output_tokens)) AS tokens FROM usage_ledger FINAL "
        "WHERE occurred_at >= '2026-11-01 00:00:00' AND occurred_at < '2026-12-01 00:00:00'",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["rows"][0]


def check_focus_rows(header: list[str], rows: list[dict[str, str]]) -> None:
    """The FOCUS 1.2 column rules spendstream implements, on every row of a CSV export."""
    assert set(header) >= MANDATORY | CONDITIONAL_HERE, sorted(MANDATORY | CONDITIONAL_HERE - set(header))
    assert all(COLUMN_NAME.match(name) for name in header), header
    assert len(set(header)) == len(header)
    period_start, period_end = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    for row in rows:
        where = f"row {row}"
        assert all(row[name] != "" for name in NOT_NULL), where
        for name in (*COSTS, *QUANTITIES):
            assert DECIMAL.match(row[name]), (name, where)
        assert len({row[name] for name in COSTS}) == 1, "no discount or amortization: the four costs agree"
        times = {name: row[name] for name in DATETIMES}
        assert all(DATETIME.match(text) for text in times.values()), where
        at = {name: datetime.fromisoformat(text) for name, text in times.items()}
        assert (at["BillingPeriodStart"], at["BillingPeriodEnd"]) == (period_start, period_end), where
        assert at["ChargePeriodStart"] < at["ChargePeriodEnd"], where
        assert period_start <= at["ChargePeriodStart"] and at["ChargePeriodEnd"] <= period_end, where
        assert row["BillingCurrency"] == "USD" and row["PricingCurrency"] == "USD", where
        assert row["ChargeCategory"] in CHARGE_CATEGORIES and row["ChargeCategory"] == "Usage", where
        assert row["ChargeClass"] in ("", "Correction"), where
        assert row["ChargeFrequency"] in CHARGE_FREQUENCIES, where
        assert row["PricingCategory"] in PRICING_CATEGORIES, where
        assert row["ServiceCategory"] in SERVICE_CATEGORIES, where
        assert row["ServiceCategory"] == "AI and Machine Learning" and row["ServiceSubcategory"] == "Generative AI"
        # Usage rows (not corrections) carry a consumed quantity and unit, and a pricing quantity and unit.
        assert row["ConsumedQuantity"] and row["ConsumedUnit"] and row["PricingQuantity"] and row["PricingUnit"]
        assert row["SkuId"], where
        tags = json.loads(row["Tags"])
        assert isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values()), where
        assert set(tags) <= {"org", "division", "team", "project", "feature", "user", "customer", "environment"}
        assert row["SubAccountId"] == tags.get("team", ""), where
        assert Decimal(row["BilledCost"]) == Decimal(int(row["x_BilledCostNanos"])).scaleb(-9), where
        assert int(row["ConsumedQuantity"]) == int(row["x_InputTokens"]) + int(row["x_OutputTokens"]), where


def read_csv(text: str) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text))
    return list(reader.fieldnames or []), list(reader)


@pytest.fixture
def seeded_env(tmp_path: Path) -> dict[str, str]:
    env = base_env(tmp_path / "stack-a")
    seed(env)
    return env


def test_focus_csv_obeys_the_column_rules_and_adds_up_to_the_ledger(seeded_env: dict[str, str], tmp_path: Path):
    out = tmp_path / "focus.csv"
    done = cli(seeded_env, "export", "focus", "--month", MONTH, "--format", "csv", "--output", str(out))
    assert done.returncode == 0, done.stderr
    header, rows = read_csv(out.read_text())
    check_focus_rows(header, rows)
    ledger = ledger_figures(seeded_env)
    assert sum(Decimal(row["BilledCost"]) for row in rows) == Decimal(ledger["nanos"]).scaleb(-9)
    assert sum(int(row["x_BilledCostNanos"]) for row in rows) == int(ledger["nanos"])
    assert sum(int(row["x_Requests"]) for row in rows) == ledger["requests"]
    assert sum(int(row["ConsumedQuantity"]) for row in rows) == int(ledger["tokens"])
    # The grain: one row per UTC day, attribution, provider and model.
    keys = [(r["ChargePeriodStart"], r["Tags"], r["ProviderName"], r["x_Model"]) for r in rows]
    assert len(keys) == len(set(keys)) and len(rows) > 50
    tiny = next(row for row in rows if json.loads(row["Tags"]).get("team") == "tiny")
    assert (tiny["BilledCost"], tiny["SkuId"], tiny["ProviderName"]) == ("0.00000075", "openai/gpt-4o-mini", "OpenAI")
    first = next(row for row in rows if row["x_Model"] == "claude-opus-4")
    assert (first["BilledCost"], first["ChargePeriodStart"]) == ("12.000000001", "2026-11-01T00:00:00Z")
    assert json.loads(first["Tags"]) == {"org": "acme", "team": "edges", "customer": "cust-1"}
    last = next(row for row in rows if row["x_Model"] == "gpt-4o-2024-08-06")
    assert last["ChargePeriodEnd"] == "2026-12-01T00:00:00Z", "the last microsecond of the month is in it"
    replayed = next(row for row in rows if json.loads(row["Tags"]).get("team") == "replayed")
    assert (replayed["x_Requests"], replayed["BilledCost"]) == ("1", "0.000004")
    assert sum(int(row["x_UnpricedRequests"]) for row in rows) > 0
    assert not [row for row in rows if json.loads(row["Tags"]).get("team") == "refused"]  # a refused call is no usage


def test_focus_parquet_has_decimal_costs_and_the_same_rows_as_csv(seeded_env: dict[str, str], tmp_path: Path):
    target = tmp_path / "f.parquet"
    done = cli(seeded_env, "export", "focus", "--month", MONTH, "--format", "parquet", "--output", str(target))
    assert done.returncode == 0, done.stderr
    table = pq.read_table(target)
    for name in COSTS:
        assert table.schema.field(name).type == pa.decimal128(38, 9), name
    for name in QUANTITIES:
        assert pa.types.is_decimal(table.schema.field(name).type), name
    for name in DATETIMES:
        assert table.schema.field(name).type.tz == "UTC", name
    as_csv = cli(seeded_env, "export", "focus", "--month", MONTH)  # standard output, csv by default
    assert as_csv.returncode == 0, as_csv.stderr
    header, rows = read_csv(as_csv.stdout)
    assert table.column_names == header and table.num_rows == len(rows)
    parquet_rows = table.to_pylist()
    for from_csv, from_parquet in zip(rows, parquet_rows, strict=True):
        for name in COSTS:
            assert from_parquet[name] == Decimal(from_csv[name])
        assert from_parquet["ChargePeriodStart"].strftime("%Y-%m-%dT%H:%M:%SZ") == from_csv["ChargePeriodStart"]
        assert from_parquet["Tags"] == from_csv["Tags"]
    ledger = ledger_figures(seeded_env)
    assert sum(row["BilledCost"] for row in parquet_rows) == Decimal(ledger["nanos"]).scaleb(-9)


def test_focus_export_refuses_a_bad_month_with_usage(tmp_path: Path) -> None:
    env = base_env(tmp_path / "empty")
    for args in (["--month", "2026-13"], ["--month", MONTH, "--format", "xlsx"], []):
        done = cli(env, "export", "focus", *args)
        assert done.returncode == 2, done
        assert "usage: spendstream export focus" in done.stderr and "Traceback" not in done.stderr
    assert cli(env, "ledger", "migrate").returncode == 0  # a ledger without usage (none at all is an error)
    empty = cli(env, "export", "focus", "--month", MONTH)
    assert empty.returncode == 0, empty.stderr
    assert read_csv(empty.stdout)[1] == [] and "BilledCost" in empty.stdout


def test_api_serves_the_focus_export_to_a_viewer_and_the_cli_reads_it_through_the_api(
    tmp_path: Path, seeded_env: dict[str, str], api: RunningApi
) -> None:
    """``seeded_env`` fills ``stack-a`` before the ``api`` fixture starts ``spendstream api`` on it."""
    path = f"/v1/exports/focus?month={MONTH}&format=csv"
    assert call(api.port, "GET", path).status == 401
    viewer = create_token(api.env, "--role", "viewer", "--name", "finops")
    reply = call(api.port, "GET", path, Authorization=f"Bearer {viewer}")
    assert reply.status == 200, reply.body[:300]
    assert reply.headers["content-type"].startswith("text/csv")
    assert reply.headers["content-disposition"] == 'attachment; filename="focus-2026-11.csv"'
    header, rows = read_csv(reply.body.decode())
    check_focus_rows(header, rows)
    assert int(reply.headers["x-spendstream-rows"]) == len(rows) > 50
    parquet = call(api.port, "GET", f"/v1/exports/focus?month={MONTH}&format=parquet", Authorization=f"Bearer {viewer}")
    assert parquet.status == 200 and pq.read_table(pa.BufferReader(parquet.body)).num_rows == len(rows)
    bad_queries = (("month=2026-13", "month"), ("format=csv", "month"), (f"month={MONTH}&format=x", "format"))
    for bad, field in bad_queries:
        refused = call(api.port, "GET", f"/v1/exports/focus?{bad}", Authorization=f"Bearer {viewer}")
        assert refused.status == 400 and refused.json()["problems"][0]["field"] == field, refused.body
    # The API owns the embedded ledger: the CLI of the same data directory exports through it, byte for byte.
    through = cli(api.env, "export", "focus", "--month", MONTH, "--output", str(tmp_path / "via-api.csv"))
    assert through.returncode == 0 and "read through the API" in through.stderr, through.stderr
    assert (tmp_path / "via-api.csv").read_bytes() == reply.body

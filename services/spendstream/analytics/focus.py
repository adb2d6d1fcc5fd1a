"""FOCUS 1.2 export of the ledger: the cost and usage rows FinOps tools load next to their cloud bills.

Grain: one row per UTC day x attribution (org, division, team, project, feature, user, customer, environment)
x provider x model (served, else requested), aggregated in ClickHouse from the ledger read ``FINAL`` (a replayed
event counts once). A day is the charge period, the UTC calendar month the billing period (providers invoice
API usage by UTC month). Token kinds are not split into rows: the ledger prices a call as a whole, and a split
would have to re-price it; the counts per kind ride in ``x_`` columns instead.

Every cost column is the exact sum of ``cost_nanos`` as a decimal (integer arithmetic; 750 nano-USD is
``0.00000075``). spendstream records what a call cost by the policy's price table or the provider's report, with
no commitment discount or amortization, so BilledCost = EffectiveCost = ListCost = ContractedCost. Calls without a
price count zero and are counted in ``x_UnpricedRequests``. Calls the gateway refused (``blocked``) used nothing and
are left out.

The rows stream: ClickHouse returns blocks, each block is written (CSV, or a Parquet row group with
``decimal128`` cost columns) before the next is read.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import IO, Any

from spendstream.analytics.money import next_month
from spendstream.analytics.report_model import spreadsheet_text
from spendstream.core.attribution import ATTRIBUTION_FIELDS
from spendstream.core.events import NANOS_PER_USD

FORMATS = ("csv", "parquet")
SERVICE_CATEGORY = "AI and Machine Learning"
SERVICE_SUBCATEGORY = "Generative AI"
# Display names FinOps tools already know; another provider keeps the name the edges report.
PROVIDER_NAMES = {
    "openai": "OpenAI",
    "anthropic": "Anthropic",
    "google": "Google",
    "gemini": "Google",
    "vertex_ai": "Google",
    "azure": "Microsoft",
    "azure_openai": "Microsoft",
    "bedrock": "Amazon Web Services",
    "mistral": "Mistral AI",
    "cohere": "Cohere",
    "groq": "Groq",
    "deepseek": "DeepSeek",
    "xai": "xAI",
}


@dataclass(frozen=True)
class FocusColumn:
    name: str
    kind: str  # cost (decimal, 9 places), quantity (decimal, whole), datetime, string, json, integer


COLUMNS = (
    FocusColumn("BilledCost", "cost"),
    FocusColumn("BillingAccountId", "string"),
    FocusColumn("BillingAccountName", "string"),
    FocusColumn("BillingCurrency", "string"),
    FocusColumn("BillingPeriodEnd", "datetime"),
    FocusColumn("BillingPeriodStart", "datetime"),
    FocusColumn("ChargeCategory", "string"),
    FocusColumn("ChargeClass", "string"),
    FocusColumn("ChargeDescription", "string"),
    FocusColumn("ChargeFrequency", "string"),
    FocusColumn("ChargePeriodEnd", "datetime"),
    FocusColumn("ChargePeriodStart", "datetime"),
    FocusColumn("ConsumedQuantity", "quantity"),
    FocusColumn("ConsumedUnit", "string"),
    FocusColumn("ContractedCost", "cost"),
    FocusColumn("EffectiveCost", "cost"),
    FocusColumn("InvoiceIssuerName", "string"),
    FocusColumn("ListCost", "cost"),
    FocusColumn("PricingCategory", "string"),
    FocusColumn("PricingCurrency", "string"),
    FocusColumn("PricingQuantity", "quantity"),
    FocusColumn("PricingUnit", "string"),
    FocusColumn("ProviderName", "string"),
    FocusColumn("PublisherName", "string"),
    FocusColumn("ServiceCategory", "string"),
    FocusColumn("ServiceName", "string"),
    FocusColumn("ServiceSubcategory", "string"),
    FocusColumn("SkuId", "string"),
    FocusColumn("SubAccountId", "string"),
    FocusColumn("SubAccountName", "string"),
    FocusColumn("Tags", "json"),
    FocusColumn("x_BilledCostNanos", "integer"),
    FocusColumn("x_Model", "string"),
    FocusColumn("x_Requests", "integer"),
    FocusColumn("x_UnpricedRequests", "integer"),
    FocusColumn("x_InputTokens", "integer"),
    FocusColumn("x_OutputTokens", "integer"),
    FocusColumn("x_CachedInputTokens", "integer"),
    FocusColumn("x_CacheWriteTokens", "integer"),
)
COLUMN_NAMES = tuple(c.name for c in COLUMNS)

_QUERY = """
SELECT toDate(occurred_at) AS day, org, team, toJSONString(mapFilter((k, v) -> v != '', map({tags}))), provider,
       if(model_served != '', model_served, model_requested) AS model,
       sum(toInt128(ifNull(cost_nanos, 0))), count(), countIf(cost_nanos IS NULL),
       sum(toInt128(input_tokens)), sum(toInt128(output_tokens)),
       sum(toInt128(cached_input_tokens)), sum(toInt128(cache_write_tokens))
FROM {db}.usage_ledger FINAL
WHERE occurred_at >= {{start:DateTime64(6, 'UTC')}} AND occurred_at < {{end:DateTime64(6, 'UTC')}}
  AND status != 'blocked'
GROUP BY day, {attribution}, provider, model
ORDER BY day, {attribution}, provider, model
"""


def decimal_usd(nanos: int) -> str:
    """Exact USD of a nano-USD amount as a decimal without trailing zeros (750 -> "0.00000075", 12e9 -> "12")."""
    whole, fraction = divmod(abs(nanos), NANOS_PER_USD)
    sign = "-" if nanos < 0 else ""
    return f"{sign}{whole}.{fraction:09d}".rstrip("0") if fraction else f"{sign}{whole}"


def billing_period(month: date) -> tuple[datetime, datetime]:
    """[start, end) of a UTC calendar month."""
    start = month.replace(day=1)
    return datetime.combine(start, time(), UTC), datetime.combine(next_month(start), time(), UTC)


def focus_row(record: tuple[Any, ...], period: tuple[datetime, datetime]) -> tuple[Any, ...]:
    """One FOCUS row (in ``COLUMNS`` order) from one aggregated ledger group."""
    day, org, team, tags, provider, model, cost, requests, unpriced, tin, tout, tcached, twrite = record
    provider_name = PROVIDER_NAMES.get(provider, provider or "unknown")
    usd = cost  # nano-USD; each writer renders it as an exact decimal
    tokens = tin + tout
    charge_start = datetime.combine(day, time(), UTC)
    return (
        usd, org or "unattributed", org or None, "USD", period[1], period[0], "Usage", None,
        f"{model or 'unknown model'} tokens from {provider_name}", "Usage-Based",
        charge_start + timedelta(days=1), charge_start, tokens, "Tokens", usd, usd, provider_name, usd,
        "Standard", "USD", tokens, "Tokens", provider_name, provider_name, SERVICE_CATEGORY,
        f"{provider_name} API", SERVICE_SUBCATEGORY, f"{provider or 'unknown'}/{model or 'unknown'}",
        team or None, team or None, tags,
        cost, model, requests, unpriced, tin, tout, tcached, twrite,
    )  # fmt: skip


def focus_blocks(client: Any, db: str, month: date) -> Iterator[list[tuple[Any, ...]]]:
    """The month's FOCUS rows, a ClickHouse block at a time."""
    period = billing_period(month)
    query = _QUERY.format(
        db=db,
        attribution=", ".join(f"`{name}`" for name in ATTRIBUTION_FIELDS),
        tags=", ".join(f"'{name}', `{name}`" for name in ATTRIBUTION_FIELDS),  # the non-empty attribution, as JSON
    )
    with client.query_row_block_stream(query, parameters={"start": period[0], "end": period[1]}) as stream:
        for block in stream:
            yield [focus_row(record, period) for record in block]


@functools.lru_cache(maxsize=1024)
def _timestamp(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _string(value: str | None) -> str | None:
    return spreadsheet_text(value) if value else value


# names (string columns) are kept from running as spreadsheet formulas; the rest is written as is (None: empty)
_CSV_TEXT = {"cost": decimal_usd, "datetime": _timestamp, "string": _string}
_CSV_CONVERSIONS = [(i, _CSV_TEXT[c.kind]) for i, c in enumerate(COLUMNS) if c.kind in _CSV_TEXT]


def write_csv(blocks: Iterator[list[tuple[Any, ...]]], out: IO[str]) -> int:
    """CSV with a header row; empty cells are nulls; returns the number of rows."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMN_NAMES)
    count = 0
    for block in blocks:
        cells = [list(row) for row in block]
        for row in cells:
            for index, text in _CSV_CONVERSIONS:
                row[index] = text(row[index])
        writer.writerows(cells)
        count += len(block)
    return count


def parquet_schema() -> Any:
    import pyarrow as pa

    types = {
        "cost": pa.decimal128(38, 9),
        "quantity": pa.decimal128(38, 0),
        "datetime": pa.timestamp("s", tz="UTC"),
        "string": pa.string(),
        "json": pa.string(),
        "integer": pa.int64(),
    }
    return pa.schema([pa.field(c.name, types[c.kind]) for c in COLUMNS])


def write_parquet(blocks: Iterator[list[tuple[Any, ...]]], out: IO[bytes]) -> int:
    """Parquet, one row group per ClickHouse block; costs as decimal128(38, 9); returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema()
    count = 0
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for block in blocks:
            columns = list(zip(*block, strict=True)) if block else [() for _ in COLUMNS]
            arrays = [
                _arrow_column(pa, c.kind, field.type, values)
                for c, field, values in zip(COLUMNS, schema, columns, strict=True)
            ]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            count += len(block)
    return count


def _arrow_column(pa: Any, kind: str, arrow_type: Any, values: Sequence[Any]) -> Any:
    """Costs arrive as nano-USD: the unscaled integers of decimal128(38, 9), so no value is converted."""
    if kind == "cost":
        return pa.array(values, pa.decimal128(38, 0)).view(arrow_type)
    if kind == "quantity":
        return pa.array(values, pa.decimal128(38, 0))
    return pa.array(values, arrow_type)


def export_focus(client: Any, db: str, month: date, fmt: str, out: IO[Any]) -> int:
    """Write the month's FOCUS export to ``out`` (text for csv, binary for parquet); returns the row count."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    blocks = focus_blocks(client, db, month)
    return write_csv(blocks, out) if fmt == "csv" else write_parquet(blocks, out)

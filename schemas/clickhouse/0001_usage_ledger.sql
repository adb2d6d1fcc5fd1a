-- The usage ledger: one row per UsageEvent, deduplicated by event_id.
-- ReplacingMergeTree collapses replays (same sorting key = same event) at merge time; reads
-- that must be exact use FINAL (every view does). event_id is last in the sorting key, and
-- team/day before it are functions of the event, so duplicates always share a key.
-- {ttl_months} is filled in from SPENDSTREAM_LEDGER_TTL_MONTHS.
CREATE TABLE IF NOT EXISTS {db}.usage_ledger
(
    event_id            UUID,
    occurred_at         DateTime64(6, 'UTC'),
    org                 LowCardinality(String),
    division            LowCardinality(String),
    team                LowCardinality(String),
    project             LowCardinality(String),
    feature             LowCardinality(String),
    user                String,
    customer            String,
    environment         LowCardinality(String),
    tags                Map(String, String),
    provider            LowCardinality(String),
    model_requested     LowCardinality(String),
    model_served        LowCardinality(String),
    input_tokens        Int64,
    output_tokens       Int64,
    cached_input_tokens Int64,
    cache_write_tokens  Int64,
    cost_nanos          Nullable(Int64),
    price_source        LowCardinality(String),
    latency_ms          Int64,
    status              Enum8('ok' = 1, 'error' = 2, 'blocked' = 3),
    decision_applied    LowCardinality(String),
    cache_hit           Bool,
    ingested_at         DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (org, team, toDate(occurred_at), event_id)
TTL toDateTime(occurred_at) + INTERVAL {ttl_months} MONTH
SETTINGS non_replicated_deduplication_window = 1000

CREATE DATABASE IF NOT EXISTS {db} ON CLUSTER '{cluster}';

CREATE TABLE IF NOT EXISTS {db}.usage_ledger_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{db}/usage_ledger', '{replica}')
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (org, team, toDate(occurred_at), event_id)
TTL toDateTime(occurred_at) + INTERVAL 13 MONTH;

CREATE TABLE IF NOT EXISTS {db}.usage_ledger ON CLUSTER '{cluster}' AS {db}.usage_ledger_local
ENGINE = Distributed('{cluster}', {db}, usage_ledger_local, cityHash64(org, team));

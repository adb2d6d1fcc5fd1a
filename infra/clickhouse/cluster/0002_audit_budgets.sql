CREATE TABLE IF NOT EXISTS {db}.decisions_local ON CLUSTER '{cluster}'
(
    scope           LowCardinality(String),
    action          Enum8('allow' = 1, 'alert' = 2, 'fallback' = 3, 'throttle' = 4, 'shutoff' = 5),
    fallback_models Map(String, String),
    throttle_rps    Nullable(Float64),
    allowed_models  Array(String),
    reason          String,
    spend_nanos     Int64,
    limit_nanos     Int64,
    period          LowCardinality(String),
    period_start    Nullable(DateTime64(6, 'UTC')),
    expires_at      Nullable(DateTime64(6, 'UTC')),
    version         UInt64,
    issued_at       DateTime64(6, 'UTC'),
    policy_version  LowCardinality(String),
    ingested_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{db}/decisions', '{replica}')
ORDER BY (scope, version);

CREATE TABLE IF NOT EXISTS {db}.decisions ON CLUSTER '{cluster}' AS {db}.decisions_local
ENGINE = Distributed('{cluster}', {db}, decisions_local, cityHash64(scope));

CREATE TABLE IF NOT EXISTS {db}.alerts_local ON CLUSTER '{cluster}'
(
    alert_id       UUID,
    scope          LowCardinality(String),
    kind           Enum8('threshold' = 1, 'spike' = 2, 'forecast' = 3, 'quota' = 4, 'policy' = 5),
    severity       Enum8('info' = 1, 'warning' = 2, 'critical' = 3),
    message        String,
    spend_nanos    Int64,
    limit_nanos    Int64,
    period         LowCardinality(String),
    occurred_at    DateTime64(6, 'UTC'),
    policy_version LowCardinality(String),
    ingested_at    DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{db}/alerts', '{replica}')
ORDER BY alert_id;

CREATE TABLE IF NOT EXISTS {db}.alerts ON CLUSTER '{cluster}' AS {db}.alerts_local
ENGINE = Distributed('{cluster}', {db}, alerts_local, cityHash64(alert_id));

CREATE TABLE IF NOT EXISTS {db}.audit_rejects_local ON CLUSTER '{cluster}'
(
    topic LowCardinality(String), partition Int32, offset Int64, reason String, raw String,
    rejected_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{db}/audit_rejects', '{replica}')
ORDER BY (topic, partition, offset);

CREATE TABLE IF NOT EXISTS {db}.audit_rejects ON CLUSTER '{cluster}' AS {db}.audit_rejects_local
ENGINE = Distributed('{cluster}', {db}, audit_rejects_local, cityHash64(topic, partition, offset));

-- Budgets are small and read by every shard's reports: one replicated copy on every node
-- (a single-shard cluster macro '{all_replicas_cluster}' is the usual way), no Distributed table.
CREATE TABLE IF NOT EXISTS {db}.budgets ON CLUSTER '{cluster}'
(
    month Date, scope LowCardinality(String), period LowCardinality(String), limit_nanos Int64,
    monthly_limit_nanos Int64, policy_version LowCardinality(String), loaded_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/{db}/budgets', '{replica}', loaded_at)
ORDER BY (month, scope, period);

CREATE TABLE IF NOT EXISTS {db}.reprice_audit_local ON CLUSTER '{cluster}'
(
    reprice_id UUID, repriced_at DateTime64(3, 'UTC'), event_id UUID, occurred_at DateTime64(6, 'UTC'),
    team LowCardinality(String), provider LowCardinality(String), model LowCardinality(String),
    old_cost_nanos Nullable(Int64), new_cost_nanos Int64, old_price_source LowCardinality(String),
    new_price_source LowCardinality(String)
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{db}/reprice_audit', '{replica}')
PARTITION BY toYYYYMM(repriced_at)
ORDER BY (reprice_id, team, event_id);

CREATE TABLE IF NOT EXISTS {db}.reprice_audit ON CLUSTER '{cluster}' AS {db}.reprice_audit_local
ENGINE = Distributed('{cluster}', {db}, reprice_audit_local, cityHash64(team));

-- The audit trail of what the pipeline decided and announced, written by sink/audit_sink.py.
-- Each row carries the policy_version it acted on, so an audit can name the policy in force.
-- Both tables are ReplacingMergeTree keyed on the record's own identity: a redelivered Decision
-- (same scope and version) or Alert (same alert_id) collapses, and exact reads use FINAL.
CREATE TABLE IF NOT EXISTS {db}.decisions
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
ENGINE = ReplacingMergeTree
ORDER BY (scope, version);

CREATE TABLE IF NOT EXISTS {db}.alerts
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
ENGINE = ReplacingMergeTree
ORDER BY alert_id;

-- Records the audit sink could not decode: kept with their reason and raw bytes, never dropped.
CREATE TABLE IF NOT EXISTS {db}.audit_rejects
(
    topic       LowCardinality(String),
    partition   Int32,
    offset      Int64,
    reason      String,
    raw         String,
    rejected_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (topic, partition, offset);

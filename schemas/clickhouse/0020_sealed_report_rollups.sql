-- Sealed rollups: exact report figures without reading every ledger row (analytics/rollup.py explains it).
--
-- A bucket (a UTC hour, or a UTC day for the user and customer rankings) is sealed by aggregating its
-- ledger rows with FINAL (replays collapsed, the first version of each event_id) into a rollup tagged
-- with a seal id. ledger_inserted counts every row ever inserted into the ledger per hour; it only
-- grows, so a seal stays valid while the count it recorded is still the count: any later insert into
-- the bucket (a late event, a replayed copy, a repriced row) changes it, and reports then read that
-- bucket from the ledger with FINAL until it is sealed again. Reports therefore never count a
-- duplicate or miss a correction, whatever the rollup holds.
CREATE TABLE IF NOT EXISTS {db}.ledger_inserted
(
    hour DateTime('UTC'),
    rows UInt64
)
ENGINE = SummingMergeTree
ORDER BY hour
TTL hour + INTERVAL {ttl_months} MONTH;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.ledger_inserted_mv TO {db}.ledger_inserted AS
SELECT toStartOfHour(toDateTime(occurred_at, 'UTC')) AS hour, count() AS rows
FROM {db}.usage_ledger
GROUP BY hour;

-- Rows inserted before the view existed (counting one twice only makes a seal stale, never wrong).
INSERT INTO {db}.ledger_inserted
SELECT toStartOfHour(toDateTime(occurred_at, 'UTC')) AS hour, count() FROM {db}.usage_ledger GROUP BY hour;

-- The seal of each bucket: the ledger_inserted count it was taken at and the id its rollup rows carry.
CREATE TABLE IF NOT EXISTS {db}.ledger_seals
(
    bucket   DateTime('UTC'),
    width_s  UInt32,
    inserted UInt64,
    seal     UInt64,
    sealed_at DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree(sealed_at)
ORDER BY (width_s, bucket)
TTL bucket + INTERVAL {ttl_months} MONTH;

-- Hourly figures by the low-cardinality attribution (team, feature, model, ...).
CREATE TABLE IF NOT EXISTS {db}.ledger_hourly
(
    hour        DateTime('UTC'),
    seal        UInt64,
    org         LowCardinality(String),
    team        LowCardinality(String),
    project     LowCardinality(String),
    feature     LowCardinality(String),
    environment LowCardinality(String),
    provider    LowCardinality(String),
    model       LowCardinality(String),
    cost_nanos  Int128,
    requests    UInt64,
    cache_hits  UInt64,
    tokens      Int128
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, seal, team, feature, model)
TTL hour + INTERVAL {ttl_months} MONTH;

-- Daily figures per user and per customer (too many keys for an hourly grain).
CREATE TABLE IF NOT EXISTS {db}.ledger_daily_keys
(
    day        DateTime('UTC'),
    seal       UInt64,
    dimension  LowCardinality(String),
    key        String,
    cost_nanos Int128,
    requests   UInt64,
    cache_hits UInt64,
    tokens     Int128
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (dimension, day, seal, key)
TTL day + INTERVAL {ttl_months} MONTH

-- = schemas/clickhouse/0020_sealed_report_rollups.sql for a cluster (analytics/rollup.py takes and reads the seals).
--
-- The insert counter lives next to each shard's ledger, like spend_daily in 0003: ledger_inserted_mv fires on
-- the local insert into usage_ledger_local (a Distributed insert forwards its rows there), so each shard
-- counts the rows it received. rollup.py reads ledger_inserted, the Distributed table, with sum(rows) GROUP BY
-- bucket: the count a seal records and the count it is checked against are cluster-wide. On each shard the
-- ledger part is written before the view's counter part, so the seal argument of 0020 holds per shard, and
-- therefore for the sum. What the operator must set for it to hold (README.md, "Sealed report rollups"):
--   * distributed_product_mode = 'global' for the API's user. The seal check joins ledger_seals (Distributed)
--     with a subquery over ledger_inserted (Distributed): 'deny', the default, refuses that query, and 'local'
--     would compare each shard's own count with a cluster-wide seal, so no seal would ever hold.
--   * distributed_foreground_insert = 1 (insert_distributed_sync before 23.x) for the API's user: a seal's
--     rollup rows must be on the shards before its ledger_seals row makes them readable.
--   * load_balancing = 'in_order' for the sink's and the API's users when shards have several replicas:
--     ledger and counter parts replicate independently, so only the replica that took the insert is sure to
--     hold every ledger row its counter counts. After a replica failover, TRUNCATE ledger_seals_local ON CLUSTER
--     (reports read the ledger with FINAL until the next seal run; nothing is lost).
-- TTLs are 13 months, as the ledger's in 0001; change them together.
CREATE TABLE IF NOT EXISTS {db}.ledger_inserted_local ON CLUSTER '{cluster}'
(
    hour DateTime('UTC'),
    rows UInt64
)
ENGINE = ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/{db}/ledger_inserted', '{replica}')
ORDER BY hour
TTL hour + INTERVAL 13 MONTH;

-- Only sums are read, so any sharding key is exact; hour spreads the backfill below.
CREATE TABLE IF NOT EXISTS {db}.ledger_inserted ON CLUSTER '{cluster}' AS {db}.ledger_inserted_local
ENGINE = Distributed('{cluster}', {db}, ledger_inserted_local, cityHash64(hour));

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.ledger_inserted_mv ON CLUSTER '{cluster}' TO {db}.ledger_inserted_local AS
SELECT toStartOfHour(toDateTime(occurred_at, 'UTC')) AS hour, count() AS rows
FROM {db}.usage_ledger_local
GROUP BY hour;

-- Rows inserted before the view existed, counted once for the whole cluster: apply this file from ONE node
-- (counting a row twice only makes a seal stale, never wrong).
INSERT INTO {db}.ledger_inserted
SELECT toStartOfHour(toDateTime(occurred_at, 'UTC')) AS hour, count() FROM {db}.usage_ledger GROUP BY hour;

-- Every seal of one bucket lands on one shard, so ReplacingMergeTree(sealed_at) with FINAL stays exact.
CREATE TABLE IF NOT EXISTS {db}.ledger_seals_local ON CLUSTER '{cluster}'
(
    bucket    DateTime('UTC'),
    width_s   UInt32,
    inserted  UInt64,
    seal      UInt64,
    sealed_at DateTime64(6, 'UTC')
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{db}/ledger_seals', '{replica}', sealed_at)
ORDER BY (width_s, bucket)
TTL bucket + INTERVAL 13 MONTH;

CREATE TABLE IF NOT EXISTS {db}.ledger_seals ON CLUSTER '{cluster}' AS {db}.ledger_seals_local
ENGINE = Distributed('{cluster}', {db}, ledger_seals_local, cityHash64(width_s, bucket));

-- The rollups are plain MergeTree read as sums per (bucket, seal): any sharding key is exact.
CREATE TABLE IF NOT EXISTS {db}.ledger_hourly_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{db}/ledger_hourly', '{replica}')
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, seal, team, feature, model)
TTL hour + INTERVAL 13 MONTH;

CREATE TABLE IF NOT EXISTS {db}.ledger_hourly ON CLUSTER '{cluster}' AS {db}.ledger_hourly_local
ENGINE = Distributed('{cluster}', {db}, ledger_hourly_local, cityHash64(team));

CREATE TABLE IF NOT EXISTS {db}.ledger_daily_keys_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{db}/ledger_daily_keys', '{replica}')
PARTITION BY toYYYYMM(day)
ORDER BY (dimension, day, seal, key)
TTL day + INTERVAL 13 MONTH;

CREATE TABLE IF NOT EXISTS {db}.ledger_daily_keys ON CLUSTER '{cluster}' AS {db}.ledger_daily_keys_local
ENGINE = Distributed('{cluster}', {db}, ledger_daily_keys_local, cityHash64(dimension, key));

-- = schemas/clickhouse/0024_ledger_event_ids.sql for a cluster: the sink's first-version lookup by
-- (org, team, event_id), whatever occurred_at day a copy names. Sharded like the ledger (cityHash64(org, team)),
-- so an event's id is on the shard that holds its rows; the view fires on each shard's local ledger insert.
-- The TTL is 13 months, as the ledger's in 0001; change them together.
CREATE TABLE IF NOT EXISTS {db}.ledger_event_ids_local ON CLUSTER '{cluster}'
(
    org      LowCardinality(String),
    team     LowCardinality(String),
    event_id UUID,
    day      Date
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{db}/ledger_event_ids', '{replica}')
PARTITION BY toYYYYMM(day)
ORDER BY (org, team, event_id)
TTL day + INTERVAL 13 MONTH;

CREATE TABLE IF NOT EXISTS {db}.ledger_event_ids ON CLUSTER '{cluster}' AS {db}.ledger_event_ids_local
ENGINE = Distributed('{cluster}', {db}, ledger_event_ids_local, cityHash64(org, team));

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.ledger_event_ids_mv ON CLUSTER '{cluster}' TO {db}.ledger_event_ids_local AS
SELECT org, team, event_id, toDate(occurred_at) AS day FROM {db}.usage_ledger_local;

-- The ids the ledger held before the view existed: apply this file from ONE node (a second copy of an id is
-- harmless: the lookup asks only whether it is there).
INSERT INTO {db}.ledger_event_ids SELECT org, team, event_id, toDate(occurred_at) FROM {db}.usage_ledger;

-- The rollup lives next to each shard's ledger part: the view fires on the local insert
-- (Distributed forwards rows to usage_ledger_local), and spend_daily reads across shards.
CREATE TABLE IF NOT EXISTS {db}.spend_daily_local ON CLUSTER '{cluster}'
(
    day Date, team LowCardinality(String), feature LowCardinality(String), model LowCardinality(String),
    environment LowCardinality(String), cost_nanos Int64, requests UInt64, errors UInt64, cache_hits UInt64,
    unpriced UInt64, input_tokens Int64, output_tokens Int64, cached_input_tokens Int64
)
ENGINE = ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/{db}/spend_daily', '{replica}')
PARTITION BY toYYYYMM(day)
ORDER BY (day, team, feature, model, environment);

CREATE TABLE IF NOT EXISTS {db}.spend_daily ON CLUSTER '{cluster}' AS {db}.spend_daily_local
ENGINE = Distributed('{cluster}', {db}, spend_daily_local, cityHash64(team));

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.spend_daily_mv ON CLUSTER '{cluster}' TO {db}.spend_daily_local AS
SELECT
    toDate(occurred_at) AS day, team, feature, if(model_served != '', model_served, model_requested) AS model,
    environment, sum(ifNull(l.cost_nanos, 0)) AS cost_nanos, count() AS requests,
    countIf(status = 'error') AS errors, countIf(cache_hit) AS cache_hits, countIf(l.cost_nanos IS NULL) AS unpriced,
    sum(l.input_tokens) AS input_tokens, sum(l.output_tokens) AS output_tokens,
    sum(l.cached_input_tokens) AS cached_input_tokens
FROM {db}.usage_ledger_local AS l
GROUP BY day, team, feature, model, environment;

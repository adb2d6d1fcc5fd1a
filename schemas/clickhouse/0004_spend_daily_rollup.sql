-- spend_daily: spend per UTC day x team x feature x model x environment, kept by a
-- materialized view for the dashboard's trend charts (milliseconds over any ledger size).
--
-- Exactness under replays: the ledger collapses a replayed event_id at merge time, but the
-- view sees every INSERT, so a replayed batch (sink crash between insert and offset commit)
-- or a repriced row is added to the rollup a second time. The rollup is therefore an upper
-- bound between rebuilds; every exact report (chargeback, CFO weekly, forecast, top, model mix,
-- latency) reads the ledger with FINAL instead. `rebuild_spend_daily` (POST
-- /v1/admin/rollup/rebuild, and run by `spendstream ledger reprice`) recomputes chosen days
-- from the ledger FINAL and makes them exact again.
CREATE TABLE IF NOT EXISTS {db}.spend_daily
(
    day                 Date,
    team                LowCardinality(String),
    feature             LowCardinality(String),
    model               LowCardinality(String),
    environment         LowCardinality(String),
    cost_nanos          Int64,
    requests            UInt64,
    errors              UInt64,
    cache_hits          UInt64,
    unpriced            UInt64,
    input_tokens        Int64,
    output_tokens       Int64,
    cached_input_tokens Int64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, team, feature, model, environment);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.spend_daily_mv TO {db}.spend_daily AS
SELECT
    toDate(occurred_at) AS day,
    team,
    feature,
    if(model_served != '', model_served, model_requested) AS model,
    environment,
    sum(ifNull(l.cost_nanos, 0)) AS cost_nanos,
    count() AS requests,
    countIf(status = 'error') AS errors,
    countIf(cache_hit) AS cache_hits,
    countIf(l.cost_nanos IS NULL) AS unpriced,
    sum(l.input_tokens) AS input_tokens,
    sum(l.output_tokens) AS output_tokens,
    sum(l.cached_input_tokens) AS cached_input_tokens
FROM {db}.usage_ledger AS l
GROUP BY day, team, feature, model, environment;

-- A report's requests are the calls served, by a provider or the cache: a call the gateway refused (status
-- 'blocked', $0) stays in the ledger for the audit, but counted as a request it made a refused burst look like
-- traffic and divided the spend per request by calls that cost nothing. The views count served calls from now on;
-- the sealed rollups counted every row, so they are emptied here and sealed again as reports need them (they
-- are a cache of the ledger: until then reports read the ledger with FINAL).
TRUNCATE TABLE IF EXISTS {db}.ledger_seals;
TRUNCATE TABLE IF EXISTS {db}.ledger_hourly;
TRUNCATE TABLE IF EXISTS {db}.ledger_daily_keys;

CREATE OR REPLACE VIEW {db}.cost_by_feature_monthly AS
SELECT toStartOfMonth(occurred_at) AS month, feature, sum(ifNull(cost_nanos, 0)) AS spend_nanos,
       countIf(status != 'blocked') AS requests, sum(input_tokens + output_tokens) AS tokens
FROM {db}.usage_ledger FINAL GROUP BY month, feature;

CREATE OR REPLACE VIEW {db}.cost_by_user_monthly AS
SELECT toStartOfMonth(occurred_at) AS month, user, sum(ifNull(cost_nanos, 0)) AS spend_nanos,
       countIf(status != 'blocked') AS requests, sum(input_tokens + output_tokens) AS tokens
FROM {db}.usage_ledger FINAL GROUP BY month, user;

CREATE OR REPLACE VIEW {db}.cost_by_customer_monthly AS
SELECT toStartOfMonth(occurred_at) AS month, customer, sum(ifNull(cost_nanos, 0)) AS spend_nanos,
       countIf(status != 'blocked') AS requests, sum(input_tokens + output_tokens) AS tokens
FROM {db}.usage_ledger FINAL GROUP BY month, customer;

-- Model mix by UTC month: requests served and spend per provider and model served, premium flagged.
CREATE OR REPLACE VIEW {db}.model_mix_monthly AS
SELECT toStartOfMonth(occurred_at) AS month, provider,
       if(model_served != '', model_served, model_requested) AS model, match(model, '^(?:[^/]*/)?(?:gpt-4o|chatgpt-4o-latest|gpt-4|gpt-4-turbo(-preview)?|gpt-4\\.1|gpt-4\\.5(-preview)?|gpt-5|o1(-preview|-pro)?|o3(-pro)?|claude-3-opus(-latest)?|claude-3-5-sonnet(-latest)?|claude-3-7-sonnet(-latest)?|claude-(sonnet|opus)-4(-[0-9])?|gemini-1\\.5-pro(-latest)?|gemini-2\\.5-pro)(?:-20\\d\\d-?\\d\\d-?\\d\\d|-\\d\\d\\d\\d)?$') AS premium,
       countIf(status != 'blocked') AS requests, sum(ifNull(cost_nanos, 0)) AS spend_nanos
FROM {db}.usage_ledger FINAL GROUP BY month, provider, model;

-- What cost-aware routing and the response cache saved (0006 explains it), over the calls served.
CREATE OR REPLACE VIEW {db}.routing_savings_monthly AS
SELECT
    toStartOfMonth(occurred_at) AS month,
    team,
    countIf(status != 'blocked') AS requests,
    countIf(mapContains(tags, 'requested_model')) AS rerouted_requests,
    countIf(cache_hit) AS cache_hits,
    countIf(cache_hit) / requests AS cache_hit_rate,
    toInt64(sum(ifNull(cost_nanos, 0))) AS routed_nanos,
    toInt64(sum(
        if(status = 'ok' AND mapContains(tags, 'requested_cost_nanos'),
           toInt64OrZero(tags['requested_cost_nanos']),
           ifNull(cost_nanos, 0) + if(cache_hit, toInt64OrZero(tags['saved_nanos']), 0))
    )) AS requested_nanos,
    requested_nanos - routed_nanos AS savings_nanos,
    toInt64(sumIf(toInt64OrZero(tags['saved_nanos']), cache_hit)) AS cache_savings_nanos,
    savings_nanos - cache_savings_nanos AS routing_savings_nanos
FROM {db}.usage_ledger FINAL
GROUP BY month, team
ORDER BY month, team;

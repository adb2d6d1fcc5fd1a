-- What cost-aware routing and the response cache saved, per month (UTC) and team. Reads the ledger
-- with FINAL, so it is exact under replays. Money columns are Int64 nano-USD; ratios Float64.
--
-- requested_nanos is the spend had every request gone to the model its client asked for, uncached:
--   * a routed call carries tags['requested_cost_nanos'] (its own token counts priced on the
--     requested model; for a cache hit, the gateway's estimate). Only successful calls use it: a
--     failed call would have cost the same on either model.
--   * a cache hit that was not rerouted saved tags['saved_nanos'] (what its original call cost).
--   * everything else cost what it cost.
-- savings = requested - routed = cache_savings (saved_nanos of every hit) + routing_savings.
CREATE VIEW IF NOT EXISTS {db}.routing_savings_monthly AS
SELECT
    toStartOfMonth(occurred_at) AS month,
    team,
    count() AS requests,
    countIf(mapContains(tags, 'requested_model')) AS rerouted_requests,
    countIf(cache_hit) AS cache_hits,
    countIf(cache_hit) / count() AS cache_hit_rate,
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

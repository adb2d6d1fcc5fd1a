-- Budgets as loaded from a policy, one row per (month, scope, period), so reports compare
-- budget with actual for any month, including months whose policy has since changed.
-- monthly_limit_nanos is the limit converted to a calendar month (a day budget times the days
-- of that month, a week budget times days/7, a quarter budget divided by 3), computed on load.
CREATE TABLE IF NOT EXISTS {db}.budgets
(
    month               Date,
    scope               LowCardinality(String),
    period              LowCardinality(String),
    limit_nanos         Int64,
    monthly_limit_nanos Int64,
    policy_version      LowCardinality(String),
    loaded_at           DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(loaded_at)
ORDER BY (month, scope, period);

-- Every cost figure that `spendstream ledger reprice` replaced: the old and new cost of each
-- ledger row, so a corrected price table never erases what was charged before.
CREATE TABLE IF NOT EXISTS {db}.reprice_audit
(
    reprice_id       UUID,
    repriced_at      DateTime64(3, 'UTC'),
    event_id         UUID,
    occurred_at      DateTime64(6, 'UTC'),
    team             LowCardinality(String),
    provider         LowCardinality(String),
    model            LowCardinality(String),
    old_cost_nanos   Nullable(Int64),
    new_cost_nanos   Int64,
    old_price_source LowCardinality(String),
    new_price_source LowCardinality(String)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(repriced_at)
ORDER BY (reprice_id, team, event_id);

-- A team with several budgets (a day's and a month's, say) is held by the tightest of them over a month: $1 a day
-- and $100 a month allow $31 in March, not $131. The views that compare spend with team budgets take, per team and
-- month, the smallest monthly equivalent of its budgets (as the spendstream reports do) instead of their sum; each
-- view is written out whole, as a replaced view must be.

CREATE OR REPLACE VIEW {db}.chargeback_monthly AS
WITH
    spend AS (
        SELECT toStartOfMonth(occurred_at) AS month, team, sum(ifNull(cost_nanos, 0)) AS actual
        FROM {db}.usage_ledger FINAL
        GROUP BY month, team
    ),
    shared AS (SELECT month, actual AS shared_total FROM spend WHERE team = ''),
    dept AS (
        SELECT month, department, sum(b) AS budget_nanos, sum(a) AS actual_nanos
        FROM (
            SELECT month, team AS department, toInt64(0) AS b, actual AS a FROM spend WHERE team != ''
            UNION ALL
            SELECT month, substring(scope, 6), min(monthly_limit_nanos), toInt64(0)
            FROM {db}.budgets FINAL WHERE startsWith(scope, 'team:') GROUP BY month, scope
            UNION ALL
            SELECT month, '(unattributed)', toInt64(0), shared_total FROM shared
            WHERE month NOT IN (SELECT month FROM spend WHERE team != '' AND actual > 0)
        )
        GROUP BY month, department
    ),
    weighted AS (
        SELECT
            d.month AS month, d.department AS department, d.budget_nanos AS budget_nanos,
            d.actual_nanos AS actual_nanos,
            if(d.department = '(unattributed)', toInt64(0), d.actual_nanos) AS weight,
            toInt128(s.shared_total) AS shared_total,
            sum(weight) OVER (PARTITION BY d.month) AS weights,
            if(weights > 0 AND weight > 0, intDiv(shared_total * weight, weights), 0) AS base,
            if(weights > 0 AND weight > 0, (shared_total * weight) % weights, 0) AS fraction
        FROM dept AS d LEFT JOIN shared AS s ON d.month = s.month
    )
SELECT
    month,
    department,
    budget_nanos,
    actual_nanos,
    budget_nanos - actual_nanos AS variance_nanos,
    toInt64(base + if(weights > 0 AND weight > 0 AND row_number() OVER (PARTITION BY month ORDER BY weight > 0 DESC,
        fraction DESC, department) <= shared_total - sum(base) OVER (PARTITION BY month), 1, 0)) AS shared_nanos,
    actual_nanos + shared_nanos AS chargeback_nanos
FROM weighted
ORDER BY month, department;

CREATE OR REPLACE VIEW {db}.cfo_weekly AS
WITH
    toMonday(today()) AS this_week,
    usage AS (
        SELECT toMonday(occurred_at) AS week, feature, ifNull(cost_nanos, 0) AS cost, cache_hit,
               match(if(model_served != '', model_served, model_requested), '^(?:[^/]*/)?(?:gpt-4o|chatgpt-4o-latest|gpt-4|gpt-4-turbo(-preview)?|gpt-4\\.1|gpt-4\\.5(-preview)?|gpt-5|o1(-preview|-pro)?|o3(-pro)?|claude-3-opus(-latest)?|claude-3-5-sonnet(-latest)?|claude-3-7-sonnet(-latest)?|claude-(sonnet|opus)-4(-[0-9])?|gemini-1\\.5-pro(-latest)?|gemini-2\\.5-pro)(?:-20\\d\\d-?\\d\\d-?\\d\\d|-\\d\\d\\d\\d)?$') AS premium
        FROM {db}.usage_ledger FINAL
        WHERE occurred_at >= this_week - 7 AND occurred_at < this_week + 7
    ),
    top AS (
        SELECT feature AS top_feature, sum(cost) AS top_feature_nanos FROM usage WHERE week = this_week
        GROUP BY feature ORDER BY top_feature_nanos DESC, feature LIMIT 1
    ),
    budget AS (
        SELECT sum(intDiv(b.total, toDayOfMonth(toLastDayOfMonth(d.day)))) AS budget_nanos
        FROM (SELECT this_week + number AS day FROM numbers(7)) AS d
        LEFT JOIN (
            SELECT month, sum(binding) AS total FROM (
                SELECT month, min(monthly_limit_nanos) AS binding FROM {db}.budgets FINAL
                WHERE startsWith(scope, 'team:') GROUP BY month, scope
            ) GROUP BY month
        ) AS b ON toStartOfMonth(d.day) = b.month
    ),
    totals AS (
        SELECT
            sumIf(cost, week = this_week) AS spend_nanos,
            sumIf(cost, week = this_week - 7) AS previous_nanos,
            countIf(cache_hit AND week = this_week) / nullIf(countIf(week = this_week), 0) AS cache_hit_rate,
            sumIf(cost, premium AND week = this_week) / nullIf(spend_nanos, 0) AS premium_share
        FROM usage
    )
SELECT this_week AS week, spend_nanos, previous_nanos, (spend_nanos - previous_nanos) / nullIf(previous_nanos, 0) AS change,
       budget_nanos, spend_nanos / nullIf(budget_nanos, 0) AS budget_used, top_feature, top_feature_nanos,
       cache_hit_rate, premium_share
FROM totals CROSS JOIN budget LEFT JOIN top ON 1 = 1;

CREATE OR REPLACE VIEW {db}.forecast_month_end AS
WITH
    now64(6) AS at,
    toStartOfMonth(at) AS month,
    dateDiff('second', at, toDateTime64(month + INTERVAL 1 MONTH, 6, 'UTC')) AS remaining_s
SELECT
    team,
    sumIf(b, kind = 'budget') AS budget_nanos,
    sumIf(c, kind = 'mtd') AS mtd_nanos,
    sumIf(c, kind = 'last7') AS last7_nanos,
    toInt64(mtd_nanos + intDiv(toInt128(last7_nanos) * remaining_s, 604800)) AS forecast_nanos,
    forecast_nanos - budget_nanos AS over_budget_nanos
FROM (
    SELECT 'mtd' AS kind, team, ifNull(cost_nanos, 0) AS c, toInt64(0) AS b FROM {db}.usage_ledger FINAL
    WHERE occurred_at >= month AND occurred_at < at
    UNION ALL
    SELECT 'last7', team, ifNull(cost_nanos, 0), toInt64(0) FROM {db}.usage_ledger FINAL
    WHERE occurred_at >= at - INTERVAL 7 DAY AND occurred_at < at
    UNION ALL
    SELECT 'budget', substring(scope, 6), toInt64(0), min(monthly_limit_nanos) FROM {db}.budgets FINAL
    WHERE month = toStartOfMonth(at) AND startsWith(scope, 'team:') GROUP BY scope
)
GROUP BY team
ORDER BY team;
